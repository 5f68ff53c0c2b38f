"""Control flow: a scanned network equals its unrolled twin, gates inside recurrent cells, cond, while.

First() and Last() see through loop and branch bodies as through the unrolled program: a layer in a body that reads
a slice of the explained input is first at every step; a layer stack scanned over its weights, whose carry starts
as the input, has its first layer at iteration 0 only (that iteration runs outside the scan with its own rules) and
its last at the final iteration; a layer after a loop that holds layers is neither. Input-layer rules (Flat, ZBox)
inside a body receive the explained input in relevance form, so their relevance reaches the input unchanged.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp

RNG = np.random.default_rng(11)
WS = jnp.asarray(RNG.normal(size=(4, 6, 6)) * 0.5, jnp.float32)
BS = jnp.asarray(RNG.normal(size=(4, 6)) * 0.1, jnp.float32)
X = jnp.asarray(RNG.normal(size=(3, 6)), jnp.float32)
COMPOSITES = {
    "epsilon": jaxlrp.Composite(("dense", jaxlrp.Epsilon())),
    "zplus": jaxlrp.Composite(("dense", jaxlrp.ZPlus())),
    "gamma": jaxlrp.Composite(("dense", jaxlrp.Gamma())),
    "alphabeta": jaxlrp.Composite(("dense", jaxlrp.AlphaBeta())),
    "plusflat": jaxlrp.EpsilonPlusFlat(),
}


def scanned(p, x):
  def step(h, wb):
    return jax.nn.relu(h @ wb[0] + wb[1]), None

  return jax.lax.scan(step, x, p)[0]


def fori(p, x):
  return jax.lax.fori_loop(0, 4, lambda i, h: jax.nn.relu(h @ p[0][i] + p[1][i]), x)


def unrolled(p, x):
  for i in range(len(p[0])):
    x = jax.nn.relu(x @ p[0][i] + p[1][i])
  return x


def relevance(f, comp, p, x):
  g = jaxlrp.lrp(f, comp, argnums=1)
  return jax.grad(lambda x: g(p, x)[:, 0].sum())(x)


@pytest.mark.parametrize("name", COMPOSITES)
@pytest.mark.parametrize("loop", [scanned, fori], ids=["scan", "fori_loop"])
def test_loop_equals_its_unrolled_twin(loop, name):
  comp = COMPOSITES[name]
  r_loop, r_ref = relevance(loop, comp, (WS, BS), X), relevance(unrolled, comp, (WS, BS), X)
  assert float(jnp.abs(r_loop - r_ref).max()) <= 1e-5 * float(jnp.abs(r_ref).max())
  np.testing.assert_array_equal(jaxlrp.lrp(loop, comp, argnums=1)((WS, BS), X), loop((WS, BS), X))


def lstm(w, xs):
  def cell(carry, x):
    h, c = carry
    i, f, g, o = jnp.split(jnp.concatenate([x, h], -1) @ w, 4, -1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h

  zeros = jnp.zeros((xs.shape[1], w.shape[1] // 4))
  return jax.lax.scan(cell, (zeros, zeros), xs)[0][0]


def test_lstm_gates_are_signal_take_all_and_conserve_without_biases():
  w = jnp.asarray(RNG.normal(size=(12, 24)) * 0.3, jnp.float32)
  xs = jnp.asarray(RNG.normal(size=(7, 3, 6)), jnp.float32)
  kinds = [r.kind for r in jaxlrp.show_rules(lstm, jaxlrp.EpsilonPlus(), w, xs, argnums=1, print_table=False)]
  assert kinds.count("gate") == 3
  g = jaxlrp.lrp(lstm, jaxlrp.Composite(("dense", jaxlrp.Zero())), argnums=1)
  r = jax.grad(lambda xs: g(w, xs)[:, 0].sum())(xs)
  # tanh keeps the identity rule (stabiliser 1e-10) and the gates are constants: relevance is conserved.
  np.testing.assert_allclose(r.sum(), lstm(w, xs)[:, 0].sum(), rtol=1e-4)


def test_cond_gives_each_branch_its_rules():
  def f(p, x):
    return jax.lax.cond(p[2], lambda x: jax.nn.relu(x @ p[0]), lambda x: jnp.tanh(x @ p[1]), x)

  for take_first in (True, False):
    p = (WS[0], WS[1], jnp.asarray(take_first))
    branch = (lambda p, x: jax.nn.relu(x @ p[0])) if take_first else (lambda p, x: jnp.tanh(x @ p[1]))
    for comp in (jaxlrp.EpsilonPlus(), jaxlrp.Composite(("dense", jaxlrp.Gamma()))):
      np.testing.assert_allclose(relevance(f, comp, p, X), relevance(branch, comp, p, X), rtol=1e-5, atol=1e-6)


def test_while_loop_on_the_data_path_is_rejected_with_the_fix():
  f = lambda w, x: jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ w, c[1] + 1), (x, 0))[0]  # noqa: E731
  with pytest.raises(jaxlrp.UnsupportedOpError, match=r"(?s)while_loop.*not reverse-differentiable.*lax.scan"):
    jaxlrp.lrp(f, jaxlrp.EpsilonPlus(), argnums=1)(WS[0], X)


def remat_stack(ws, x, policy=jax.checkpoint_policies.nothing_saveable):
  def block(w, x):
    return jax.nn.relu(jax.nn.relu(x @ w[0]) @ w[1]) + x

  for w in ws:
    x = (block if policy is None else jax.checkpoint(block, policy=policy))(w, x)
  return x


@pytest.mark.parametrize("name", ["epsilon", "gamma", "alphabeta", "plusflat"])
def test_checkpointed_blocks_stay_checkpointed_and_equal_the_plain_stack(name):
  rng = np.random.default_rng(5)
  ws = [tuple(jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in ((6, 12), (12, 6))) for _ in range(3)]
  policy = jax.checkpoint_policies.dots_saveable
  checkpointed = lambda ws, x: remat_stack(ws, x, policy)  # noqa: E731
  plain = lambda ws, x: remat_stack(ws, x, None)  # noqa: E731
  r_ckpt = jax.jit(lambda x: relevance(checkpointed, COMPOSITES[name], ws, x))(X)
  r_plain = relevance(plain, COMPOSITES[name], ws, X)
  np.testing.assert_allclose(r_ckpt, r_plain, rtol=1e-6, atol=1e-6 * float(jnp.abs(r_plain).max()))
  g = jaxlrp.lrp(checkpointed, COMPOSITES[name], argnums=1)
  eqns = jax.make_jaxpr(lambda x: g(ws, x))(X).jaxpr.eqns
  remats = [e for e in eqns if e.primitive.name == "remat2"]
  assert len(remats) == 3 and all(e.params["policy"] is policy for e in remats)


# ---- First() / Last() and input-layer rules inside loop and branch bodies -------------------------------------------

def rule_names(f, comp, p, x):
  rows = jaxlrp.show_rules(f, comp, p, x, argnums=1, print_table=False)
  return [type(r.rule).__name__ for r in rows if r.kind == "dense"]


def test_flat_at_every_step_spreads_each_steps_share_evenly():
  # ys_t = x_t @ wx inside a scan, then a head on the sum over steps. Epsilon (head) and Norm (sum) pass step t's
  # share y_t . head on (up to eps); Flat on every step's layer spreads it evenly over the D features of x_t.
  wx, head = WS[0][:, :4], BS[0][:4]
  xs = jnp.asarray(RNG.normal(size=(2, 5, 6)), jnp.float32)

  def f(p, x):
    ys = jax.lax.scan(lambda c, xt: (c, xt @ p[0]), 0.0, x.swapaxes(0, 1))[1]
    return ys.sum(0) @ p[1][:, None]

  p = (wx, head)
  assert rule_names(f, jaxlrp.EpsilonPlusFlat(), p, xs) == ["Epsilon", "Flat"]  # the head, then the body's layer
  share = np.einsum("btd,dk,k->bt", np.asarray(xs, np.float64), np.asarray(wx), np.asarray(head))
  r = relevance(f, jaxlrp.EpsilonPlusFlat(), p, xs)
  np.testing.assert_allclose(r, np.repeat(share[..., None] / 6, 6, axis=-1), rtol=1e-4, atol=1e-6)


def reversed_scan(p, x):
  return jax.lax.scan(lambda h, wb: (jax.nn.relu(h @ wb[0] + wb[1]), None), x, p, reverse=True, unroll=2)[0]


def reversed_unrolled(p, x):
  for i in reversed(range(len(p[0]))):
    x = jax.nn.relu(x @ p[0][i] + p[1][i])
  return x


STACK_TWINS = {"scan": (scanned, unrolled), "fori_loop": (fori, unrolled),
               "reverse": (reversed_scan, reversed_unrolled)}
BOX = jaxlrp.Composite(("dense", jaxlrp.Epsilon()), (jaxlrp.First(), jaxlrp.ZBox(-4.0, 4.0)),
                       (jaxlrp.Last(), jaxlrp.Epsilon(0.5)))


@pytest.mark.parametrize("length", [1, 2, 4])
@pytest.mark.parametrize("loop", STACK_TWINS)
def test_a_scanned_stack_has_its_first_layer_at_iteration_0_and_its_last_at_the_end(loop, length):
  # The stack's carry starts as the explained input: ZBox on iteration 0 only, Epsilon(0.5) on the final iteration
  # only, Epsilon between (a length-1 stack is one layer, first and last: Last() wins).
  f, twin = STACK_TWINS[loop]
  p = (WS[:length], BS[:length])
  if loop == "fori_loop":
    f = lambda p, x: jax.lax.fori_loop(0, length, lambda i, h: jax.nn.relu(h @ p[0][i] + p[1][i]), x)  # noqa: E731
  expected = {1: ["Epsilon"], 2: ["ZBox", "Epsilon"], 4: ["ZBox", "Epsilon", "Epsilon"]}[length]
  assert rule_names(f, BOX, p, X) == expected
  r, r_ref = relevance(f, BOX, p, X), relevance(twin, BOX, p, X)
  np.testing.assert_allclose(r, r_ref, rtol=1e-6, atol=1e-6 * float(jnp.abs(r_ref).max()))
  np.testing.assert_array_equal(jaxlrp.lrp(f, BOX, argnums=1)(p, X), f(p, X))


def test_an_empty_scan_passes_the_input_and_its_relevance_through():
  # length 0: the output is the initial carry, x itself; its relevance is x times the cotangent (column 0 here)
  g = jaxlrp.lrp(scanned, jaxlrp.EpsilonPlusFlat(), argnums=1)
  np.testing.assert_array_equal(g((WS[:0], BS[:0]), X), X)
  np.testing.assert_array_equal(relevance(scanned, jaxlrp.EpsilonPlusFlat(), (WS[:0], BS[:0]), X),
                                jnp.zeros_like(X).at[:, 0].set(X[:, 0]))


def test_cond_puts_the_first_layer_rule_in_every_branch():
  def f(p, x):
    return jax.lax.cond(p[2], lambda x: jax.nn.relu(x @ p[0]), lambda x: jnp.tanh(x[:, ::-1] @ p[1]), x) @ p[0]

  comp = jaxlrp.EpsilonPlusFlat()
  assert rule_names(f, comp, (WS[0], WS[1], True), X) == ["Epsilon", "Flat", "Flat"]  # the head after the cond
  for take_first in (True, False):
    p = (WS[0], WS[1], jnp.asarray(take_first))
    if take_first:
      branch = lambda p, x: jax.nn.relu(x @ p[0]) @ p[0]  # noqa: E731
    else:
      branch = lambda p, x: jnp.tanh(x[:, ::-1] @ p[1]) @ p[0]  # noqa: E731
    np.testing.assert_allclose(relevance(f, comp, p, X), relevance(branch, comp, p, X), rtol=1e-5, atol=1e-6)


def rnn_both_uses(p, x):
  # x_t feeds the first layer (Flat: relevance) and a residual add (gradient form): its relevance is the sum.
  def step(h, xt):
    return jnp.tanh(xt @ p[0] + h @ p[1]) + 0.5 * xt, None

  return jax.lax.scan(step, jnp.zeros_like(x[:, 0]), x.swapaxes(0, 1))[0] @ p[2]


def rnn_fori_closure(p, x):
  # fori_loop over time steps, closing over x: x is a constant of the scan, x[:, t] a dynamic slice at the counter
  step = lambda t, h: jnp.tanh(x[:, t] @ p[0] + h @ p[1])  # noqa: E731
  return jax.lax.fori_loop(0, x.shape[1], step, jnp.zeros_like(x[:, 0])) @ p[2]


def rnn_preprocessed(p, x):
  # (x - m) / s before the loop: ZBox bounds (per element, in the input's units) map through it and into the body
  x = (x - 0.5) / 2.0
  step = lambda h, xt: (jnp.tanh(xt @ p[0] + h @ p[1]), None)  # noqa: E731
  return jax.lax.scan(step, jnp.zeros_like(x[:, 0]), x.swapaxes(0, 1))[0] @ p[2]


def rnn_padded(p, x):
  # Four of the six features, padded back to six with zeros, and a zero step padded in front: the body's
  # input-layer rules count the pads as no input (Flat divides by 4 inputs, not 6)
  x = jnp.pad(x[..., :4], ((0, 0), (1, 0), (0, 2)))
  step = lambda h, xt: (jnp.tanh(xt @ p[0] + h @ p[1]), None)  # noqa: E731
  return jax.lax.scan(step, jnp.zeros_like(x[:, 0]), x.swapaxes(0, 1))[0] @ p[2]


def twin(kind):
  def f(p, x):
    if kind == "preprocessed":
      x = (x - 0.5) / 2.0
    if kind == "padded":
      x = jnp.pad(x[..., :4], ((0, 0), (1, 0), (0, 2)))
    h = jnp.zeros_like(x[:, 0])
    for t in range(x.shape[1]):
      h = jnp.tanh(x[:, t] @ p[0] + h @ p[1]) + (0.5 * x[:, t] if kind == "both_uses" else 0.0)
    return h @ p[2]

  return f


XS = jnp.asarray(RNG.normal(size=(3, 4, 6)), jnp.float32)
LOW = jnp.asarray(RNG.uniform(-4.0, -2.0, size=XS.shape), jnp.float32)


@pytest.mark.parametrize("kind, f", [("both_uses", rnn_both_uses), ("fori_closure", rnn_fori_closure),
                                     ("preprocessed", rnn_preprocessed), ("padded", rnn_padded)])
def test_input_layer_rules_inside_a_scan_equal_the_unrolled_loop(kind, f):
  p = (WS[0], WS[1] * 0.5, WS[2])
  # Step 0 differs by one sum stabiliser under the default Norm (see test_recurrent.py): compare it under Norm(0).
  flat = (jaxlrp.EpsilonPlusFlat(), 1)
  box = (jaxlrp.Composite(("dense", jaxlrp.Epsilon()), ("add", jaxlrp.Norm(0.0)),
                         (jaxlrp.First(), jaxlrp.ZBox(LOW, 3.0))), 0)
  for comp, start in (flat, box):
    r, r_ref = relevance(f, comp, p, XS), relevance(twin(kind), comp, p, XS)
    np.testing.assert_allclose(r[:, start:], r_ref[:, start:], rtol=1e-5, atol=1e-5 * float(jnp.abs(r_ref).max()))
