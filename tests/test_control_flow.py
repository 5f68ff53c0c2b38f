"""Control flow: a scanned network equals its unrolled twin, gates inside recurrent cells, cond, while."""

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
  for i in range(4):
    x = jax.nn.relu(x @ p[0][i] + p[1][i])
  return x


def relevance(f, comp, p, x):
  g = jaxlrp.lrp(f, comp, argnums=1)
  return jax.grad(lambda x: g(p, x)[:, 0].sum())(x)


@pytest.mark.parametrize("name", COMPOSITES)
@pytest.mark.parametrize("loop", [scanned, fori], ids=["scan", "fori_loop"])
def test_loop_equals_its_unrolled_twin(loop, name):
  comp = COMPOSITES[name]
  if name == "plusflat":  # First() sees the layer inside the loop body; select the unrolled twin's first layer
    comp = jaxlrp.EpsilonPlus()
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
