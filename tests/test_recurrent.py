"""Recurrent nets and control flow: scanned == unrolled, conservation through gates, per-branch rules.

1. LSTM and GRU cells written several ways (flax linen cells under `nn.RNN`, flax nnx cells under `nnx.RNN`,
   hand-written cells under `lax.scan`, a conv front-end before a linen LSTM, a linen ConvLSTM) give the same relevance
   as their unrolled twin (the same weights, a Python loop over time steps calling the same cell), for every preset;
   so do a linen `nn.scan` layer stack and a `lax.fori_loop`. The forward of `lrp(f)` is `f` bit for bit. The Flat
   and ZBox presets put their input-layer rule where the twin has it: on every step's input projection (each reads
   a slice of the explained input), and on iteration 0 only of a layer stack whose carry starts as the input.
2. Bias-free LSTMs and GRUs started from a zero carry conserve relevance under LRP-0 with the gates as constants
   (signal-take-all): sum R == score.
3. `lax.cond` / `lax.switch` give each branch the rules it gets when run alone.

Where a scan and its unrolled twin differ, the difference is tested or marked:
- Step 0 (tested). In the twin the initial carry is a constant, so step 0's recurrent projection is data-independent
  and folds into the input projection as a bias (one Epsilon stabiliser); in the scan body the carry is data, so the
  two projections are layers joined by an add (Norm): a second stabiliser. Step 0's relevance differs by about
  eps / |W_x x_0| (up to 5e-5 of max|R| measured); with Norm(0.0) on adds the two agree. Where the input projection
  has a sign-split rule (the ConvLSTM's input conv under ZPlus or AlphaBeta), the folded recurrent bias enters the
  rule's b+ / b- terms in the twin only: step 0 then differs by 29% (EpsilonPlus) and 12% (EpsilonAlpha2Beta1) of
  max|R|, so the ConvLSTM is compared at step 0 with Epsilon on its convs.
- Strict xfails, each with a minimal reproducer: a bias added after a split of a layer output is not absorbed; a
  sigmoid gate times a constant (GRU step 0 with b_hn != 0) is not a gate. The styles below avoid both (bias
  placement, zero b_hn) so that everything else is compared at 1e-5.
"""

import functools

import flax.linen as nn
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import jaxlrp

B, T, D, H = 2, 5, 3, 4
PRESETS = {
  "EpsilonPlus": jaxlrp.EpsilonPlus(),
  "EpsilonPlusFlat": jaxlrp.EpsilonPlusFlat(),
  "EpsilonGammaBox": jaxlrp.EpsilonGammaBox(low=-3.0, high=3.0),
  "EpsilonAlpha2Beta1": jaxlrp.EpsilonAlpha2Beta1(),
  "EpsilonAlpha2Beta1Flat": jaxlrp.EpsilonAlpha2Beta1Flat(),
  "dense-Epsilon": jaxlrp.Composite(("dense", jaxlrp.Epsilon())),
}


def relevance(f, composite, params, x):
  """Relevance of `x` for output 0 of every sample, seeded with its score."""
  g = jaxlrp.lrp(f, composite, argnums=1)
  return jax.grad(lambda x: g(params, x)[:, 0].sum())(x)


def fill(params, seed, keep=()):
  """Random values for every float leaf of `params` (arrays or shapes): kernels N(0, 1/fan_in), biases N(0, 0.3^2)
  (nonzero, so the epilogues matter), zeros where the path contains a `keep` string. NumPy only: an eager linen init
  of nn.RNN compiles its own scan (seconds)."""
  rng = np.random.default_rng(seed)
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    if not jnp.issubdtype(leaf.dtype, jnp.floating):  # nnx state also holds RNG keys and counters
      out.append(leaf)
    elif any(k in name for k in keep):
      out.append(jnp.zeros(leaf.shape, leaf.dtype))
    elif "bias" in name:
      out.append(jnp.asarray(rng.normal(size=leaf.shape) * 0.3, leaf.dtype))
    else:
      fan_in = int(np.prod(leaf.shape[:-1])) or 1
      out.append(jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype))
  return jax.tree_util.tree_unflatten(tree, out)


def shapes(model, x):
  return jax.eval_shape(model.init, jax.random.key(0), x)


# ---- the styles: (scanned, unrolled, params, x), both functions f(params, x) -> [B, 2] ------------------------------

def _x(seed, shape=(B, T, D)):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


class LinenRNN(nn.Module):
  """A linen cell under nn.RNN (a lax.scan over time), then a dense head on the last output."""

  cell: type
  conv_front: bool = False  # a 1D convolution over time before the cell (the conv presets then differ)

  @nn.compact
  def __call__(self, x):
    if self.conv_front:
      x = nn.relu(nn.Conv(5, (3,), name="conv")(x))
    y = nn.RNN(self.cell(H, name="cell"))(x)
    return nn.Dense(2, name="head")(y[:, -1].reshape(x.shape[0], -1))


def _linen(cell, conv_front=False, keep=()):
  model = LinenRNN(cell, conv_front)
  x = _x(0)
  params = fill(shapes(model, x), 2, keep)

  def unrolled(params, x):
    p = params["params"]
    if conv_front:
      x = nn.relu(nn.Conv(5, (3,)).apply({"params": p["conv"]}, x))
    module = cell(H)
    carry = module.initialize_carry(jax.random.key(0), x[:, 0].shape)
    for t in range(x.shape[1]):
      carry, y = module.apply({"params": p["cell"]}, carry, x[:, t])
    return nn.Dense(2).apply({"params": p["head"]}, y.reshape(x.shape[0], -1))

  return model.apply, unrolled, params, x


def _linen_convlstm():
  """nn.ConvLSTMCell: the convolutions (the conv presets' rules) sit inside the scan body."""
  module = LinenRNN(functools.partial(nn.ConvLSTMCell, kernel_size=(3,)))
  x = _x(0, (B, T, 6, 2))
  params = fill(shapes(module, x), 2)

  def unrolled(params, x):
    p = params["params"]
    cell = nn.ConvLSTMCell(H, (3,))
    carry = cell.initialize_carry(jax.random.key(0), x[:, 0].shape)
    for t in range(x.shape[1]):
      carry, y = cell.apply({"params": p["cell"]}, carry, x[:, t])
    return nn.Dense(2).apply({"params": p["head"]}, y.reshape(x.shape[0], -1))

  return module.apply, unrolled, params, x


def _nnx(cell_cls, keep=()):
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.rnn = nnx.RNN(cell_cls(D, H, rngs=rngs))
      self.head = nnx.Linear(H, 2, rngs=rngs)

    def __call__(self, x):
      return self.head(self.rnn(x)[:, -1])

  # nnx.RNN runs nnx.scan, which cannot close over a module under a trace: pass the state as an argument.
  graphdef, state = nnx.split(Net(nnx.Rngs(1)))
  state = fill(state, 2, keep)

  def scanned(state, x):
    return nnx.merge(graphdef, state)(x)

  def unrolled(state, x):
    net = nnx.merge(graphdef, state)
    carry = net.rnn.cell.initialize_carry(x[:, 0].shape, nnx.Rngs(0))
    for t in range(x.shape[1]):
      carry, y = net.rnn.cell(carry, x[:, t])
    return net.head(y)

  return scanned, unrolled, state, _x(0)


def lstm_cell(p, carry, x):
  """PyTorch-style LSTM: W_ih x + b_ih + W_hh h + b_hh, gates i, f, g, o. (The Keras spelling x Wx + h Wh + b is
  checked in test_bias_after_a_sum_of_layers_is_a_bias.)"""
  h, c = carry
  i, f, g, o = jnp.split((x @ p["wx"] + p["bx"]) + (h @ p["wh"] + p["bh"]), 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  h = jax.nn.sigmoid(o) * jnp.tanh(c)
  return (h, c), h


def gru_cell(p, h, x):
  """PyTorch-style GRU: h' = (1 - z) * n + z * h with n = tanh(W_in x + b_in + r * (W_hn h + b_hn))."""
  xr, xz, xn = jnp.split(x @ p["wx"] + p["bx"], 3, axis=-1)
  hr, hz, hn = jnp.split(h @ p["wh"] + p["bh"], 3, axis=-1)
  r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
  n = jnp.tanh(xn + r * hn)
  h = (1.0 - z) * n + z * h
  return h, h


def hand_params(cell, d, h, seed, bias=True):
  rng = np.random.default_rng(seed)
  k = 4 if cell == "lstm" else 3
  p = {"wx": rng.normal(size=(d, k * h)) / np.sqrt(d), "wh": rng.normal(size=(h, k * h)) / np.sqrt(h),
       "head": rng.normal(size=(h, 2))}
  p["bx"] = rng.normal(size=(k * h,)) * 0.3 * bias
  p["bh"] = rng.normal(size=(k * h,)) * 0.3 * bias
  if cell == "gru":  # b_hn (the last third of bh) stays zero: see test_gru_reset_gate_times_a_constant_at_step_zero
    p["bh"][2 * h:] = 0.0
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), p)


def hand_carry(cell, batch, h):
  zeros = jnp.zeros((batch, h), jnp.float32)
  return (zeros, zeros) if cell == "lstm" else zeros


def hand_scanned(cell):
  step = lstm_cell if cell == "lstm" else gru_cell

  def f(p, x):  # x: [B, T, D]
    carry = hand_carry(cell, x.shape[0], p["wh"].shape[0])
    _, ys = jax.lax.scan(functools.partial(step, p), carry, jnp.swapaxes(x, 0, 1))
    return ys[-1] @ p["head"]

  return f


def hand_unrolled(cell):
  step = lstm_cell if cell == "lstm" else gru_cell

  def f(p, x):
    carry = hand_carry(cell, x.shape[0], p["wh"].shape[0])
    for t in range(x.shape[1]):
      carry, y = step(p, carry, x[:, t])
    return y @ p["head"]

  return f


def _hand(cell):
  return hand_scanned(cell), hand_unrolled(cell), hand_params(cell, D, H, 3), _x(0)


STYLES = {
  # Recurrent biases zero: step 0 of the twin adds them after the cell's split (test_bias_after_a_split_is_a_bias).
  "linen-OptimizedLSTMCell": lambda: _linen(nn.OptimizedLSTMCell, keep=tuple(f"'h{g}']['bias" for g in "ifgo")),
  "linen-LSTMCell": lambda: _linen(nn.LSTMCell),
  "linen-GRUCell": lambda: _linen(nn.GRUCell, keep=("'hn']['bias",)),  # b_hn = 0: see the GRU xfail below
  "nnx-LSTMCell": lambda: _nnx(nnx.LSTMCell),
  "nnx-GRUCell": lambda: _nnx(nnx.GRUCell),  # its recurrent projection has no bias
  "hand-LSTM": lambda: _hand("lstm"),
  "hand-GRU": lambda: _hand("gru"),
  "conv-then-linen-LSTMCell": lambda: _linen(nn.LSTMCell, conv_front=True),
  "linen-ConvLSTMCell": _linen_convlstm,
}


@functools.cache
def style(name):
  return STYLES[name]()


CONV_STYLES = ("conv-then-linen-LSTMCell", "linen-ConvLSTMCell")
SAME_ON_DENSE = ("EpsilonPlus", "EpsilonGammaBox", "EpsilonAlpha2Beta1", "dense-Epsilon")
FLAT_ON_DENSE = ("EpsilonPlusFlat", "EpsilonAlpha2Beta1Flat")  # Epsilon on dense layers, Flat on the first ones
SAME = {group[0]: group for group in (SAME_ON_DENSE, FLAT_ON_DENSE)}
SKIPPED_ON_DENSE = SAME_ON_DENSE[1:] + FLAT_ON_DENSE[1:]


def assert_same_rules(f, params, x, group):
  rules = lambda c: [(r.kind, r.rule) for r in jaxlrp.show_rules(f, c, params, x, argnums=1, print_table=False)]
  assert all(rules(PRESETS[q]) == rules(PRESETS[group[0]]) for q in group[1:])


def _cases():
  for s in STYLES:
    for p in PRESETS:
      # Without convolutions the four non-Flat presets are one map (Epsilon on dense layers), and so are the two Flat
      # presets (checked below): run one of each.
      if s not in CONV_STYLES and p in SKIPPED_ON_DENSE:
        continue
      yield pytest.param(s, p, id=f"{s}-{p}")


@pytest.mark.parametrize("style_name, preset", list(_cases()))
def test_scan_equals_unrolled(style_name, preset):
  scanned, unrolled, params, x = style(style_name)
  composite = PRESETS[preset]
  if style_name not in CONV_STYLES and preset in SAME:
    assert_same_rules(scanned, params, x, SAME[preset])
  if preset == "EpsilonPlus":  # the forward does not depend on the rules: check it once per style
    np.testing.assert_array_equal(jaxlrp.lrp(scanned, composite, argnums=1)(params, x), scanned(params, x))
  r_scan, r_ref = relevance(scanned, composite, params, x), relevance(unrolled, composite, params, x)
  scale = float(jnp.abs(r_ref).max())
  assert scale > 0
  # Steps after the first are the same computation; step 0 differs by one stabiliser (next test).
  assert float(jnp.abs(r_scan[:, 1:] - r_ref[:, 1:]).max()) <= 1e-5 * scale


@pytest.mark.parametrize("style_name", ["linen-LSTMCell", "nnx-GRUCell", "hand-LSTM", "conv-then-linen-LSTMCell",
                                        "linen-ConvLSTMCell"])
def test_step_zero_differs_only_by_the_sum_stabiliser(style_name):
  # The unrolled twin folds step 0's recurrent projection (a constant there) into the input projection's bias; the
  # scan body joins two data layers with an add (Norm). Without a stabiliser on sums the two agree at every step.
  scanned, unrolled, params, x = style(style_name)
  # Epsilon on the ConvLSTM's convs: under ZPlus / AlphaBeta the folded bias changes the rule (module docstring).
  rules = ("linear", jaxlrp.Epsilon()) if style_name == "linen-ConvLSTMCell" else ("dense", jaxlrp.Epsilon())
  composite = jaxlrp.EpsilonPlus() + jaxlrp.Composite(rules, ("add", jaxlrp.Norm(0.0)))
  r_scan, r_ref = relevance(scanned, composite, params, x), relevance(unrolled, composite, params, x)
  assert float(jnp.abs(r_scan - r_ref).max()) <= 1e-5 * float(jnp.abs(r_ref).max())


def test_bias_after_a_sum_of_layers_is_a_bias():
  # Keras-style cells compute x Wx + h Wh + b. Epsilon gives the bias its share as for x (Wx + Wh) + b: the add of
  # two layer outputs takes the bias as one more term of its proportional split.
  rng = np.random.default_rng(0)
  w1, w2, b, x = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((3, 4), (3, 4), (4,), (2, 3)))
  composite = jaxlrp.Composite(("dense", jaxlrp.Epsilon()))
  r_sum = relevance(lambda w, x: jnp.tanh(x @ w[0] + x @ w[1] + w[2]), composite, (w1, w2, b), x)
  r_merged = relevance(lambda w, x: jnp.tanh(x @ (w[0] + w[1]) + w[2]), composite, (w1, w2, b), x)
  np.testing.assert_allclose(r_sum, r_merged, rtol=1e-4, atol=1e-6)


@pytest.mark.xfail(strict=True, reason="a sigmoid gate times a constant is an activation tail, not a gate (report)")
def test_gru_reset_gate_times_a_constant_at_step_zero():
  # With b_hn != 0, step 0 of the unrolled GRU computes r * b_hn (h0 = 0 is a constant): one data factor, so no gate
  # unit, and relevance flows through the reset gate's sigmoid into x_0. In the scan the same product is a gate (the
  # carry is data) and signal-take-all sends its share to b_hn. Measured: 4.9% of max|R| at step 0.
  p = hand_params("gru", D, H, 3)
  p["bh"] = p["bh"].at[2 * H:].set(0.5)
  x = _x(0)
  comp = jaxlrp.EpsilonPlus()
  r_scan, r_ref = relevance(hand_scanned("gru"), comp, p, x), relevance(hand_unrolled("gru"), comp, p, x)
  assert float(jnp.abs(r_scan - r_ref).max()) <= 1e-3 * float(jnp.abs(r_ref).max())


@pytest.mark.xfail(strict=True, reason="a bias added after a split of a layer's output is not absorbed (report)")
def test_bias_after_a_split_is_a_bias():
  # Fused-gate kernels split the layer output and may add per-gate biases after the split (OptimizedLSTMCell at step 0
  # of an unrolled loop, where the recurrent term is a constant). Epsilon should let the bias absorb its share in both
  # spellings; after a split the add lands in the tanh's activation region and all relevance reaches x.
  rng = np.random.default_rng(0)
  w, c, x = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((3, 8), (4,), (2, 3)))

  def split_then_bias(w, x):
    a, b = jnp.split(x @ w, 2, axis=-1)
    return jnp.tanh(a + c) * jax.nn.sigmoid(b)

  def slice_then_bias(w, x):
    return jnp.tanh(x @ w[:, :4] + c) * jax.nn.sigmoid(x @ w[:, 4:])

  composite = jaxlrp.Composite(("dense", jaxlrp.Epsilon()))
  np.testing.assert_allclose(relevance(split_then_bias, composite, w, x), relevance(slice_then_bias, composite, w, x),
                             rtol=1e-5, atol=1e-6)


def test_first_layer_rule_through_a_scan():
  # A tanh RNN then a dense head. The unrolled twin puts Flat on x_t @ wx at every step (each reads the explained
  # input); the scan must too, and not on the head after the loop (the loop holds layers) nor on h @ wh.
  rng = np.random.default_rng(0)
  w = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((D, H), (H, H), (H, 2))]
  x = _x(0)

  def scanned(w, x):
    h = jax.lax.scan(lambda h, xt: (jnp.tanh(xt @ w[0] + h @ w[1]), None), jnp.zeros((B, H)), x.swapaxes(0, 1))[0]
    return h @ w[2]

  def unrolled(w, x):
    h = jnp.zeros((B, H))
    for t in range(T):
      h = jnp.tanh(x[:, t] @ w[0] + h @ w[1])
    return h @ w[2]

  composite = jaxlrp.EpsilonPlusFlat()
  rows = jaxlrp.show_rules(scanned, composite, w, x, argnums=1, print_table=False)
  assert [(r.path, type(r.rule).__name__) for r in rows if r.kind == "dense"] == [
    ("2", "Epsilon"), ("0", "Flat"), ("1", "Epsilon")]
  r_ref = relevance(unrolled, composite, w, x)
  np.testing.assert_allclose(relevance(scanned, composite, w, x), r_ref, atol=1e-5 * float(jnp.abs(r_ref).max()))


# ---- layer stacks: linen nn.scan and lax.fori_loop -------------------------------------------------------------------

class Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return nn.relu(nn.Dense(h.shape[-1])(h)), None


class Stack(nn.Module):
  """Four Dense+relu blocks as one nn.scan over stacked parameters, then a head."""

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=4)
    return nn.Dense(2, name="head")(scan(name="blocks")(x, None)[0])


def stack_unrolled(params, x):
  p = params["params"]
  for i in range(4):
    layer = jax.tree_util.tree_map(lambda a: a[i], p["blocks"]["Dense_0"])
    x = nn.relu(nn.Dense(x.shape[-1]).apply({"params": layer}, x))
  return nn.Dense(2).apply({"params": p["head"]}, x)


def stack_fori(params, x):
  p = params["params"]
  k, b = p["blocks"]["Dense_0"]["kernel"], p["blocks"]["Dense_0"]["bias"]
  x = jax.lax.fori_loop(0, 4, lambda i, h: jax.nn.relu(h @ k[i] + b[i]), x)
  return x @ p["head"]["kernel"] + p["head"]["bias"]


@functools.cache
def stack_params():
  x = _x(5, (3, 6))
  return fill(shapes(Stack(), x), 1), x


@pytest.mark.parametrize("preset", [p for p in PRESETS if p not in SKIPPED_ON_DENSE])
@pytest.mark.parametrize("loop", [Stack().apply, stack_fori], ids=["nn.scan", "fori_loop"])
def test_layer_stack_equals_unrolled(loop, preset):
  params, x = stack_params()
  composite = PRESETS[preset]
  if preset in SAME:  # the presets of a group assign the same rules to a dense-only stack
    assert_same_rules(loop, params, x, SAME[preset])
  np.testing.assert_array_equal(jaxlrp.lrp(loop, composite, argnums=1)(params, x), loop(params, x))
  r_loop, r_ref = relevance(loop, composite, params, x), relevance(stack_unrolled, composite, params, x)
  assert float(jnp.abs(r_loop - r_ref).max()) <= 1e-5 * float(jnp.abs(r_ref).max())


# ---- conservation: bias-free LSTM / GRU, LRP-0 on dense layers, gates as constants ----------------------------------

# Gates are constants (signal-take-all, the default), LRP-0 on the dense layers, and no stabiliser on the sums (the
# default Norm(1e-6) absorbs about 1e-6 / |z|: 1e-3 of the score on a width-1 LSTM whose cell state is ~1e-3).
# LSTM: c = f c' + i g and h = o tanh(c) pass all relevance to g and c', tanh keeps it (identity rule), and the sums
# split it proportionally. GRU: h = (1 - z) n + z h' sends the (1 - z) n share to n and the z h' share to h'; n =
# tanh(W_in x + r (W_hn h')) keeps it, and r (W_hn h') passes its share to W_hn h'. Nothing is lost without biases.
CONSERVING = jaxlrp.Composite(("dense", jaxlrp.Zero()), ("add", jaxlrp.Norm(0.0)))


def _settings(n):
  return settings(max_examples=n, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def assert_conserves(f, params, x):
  g = jaxlrp.lrp(f, CONSERVING, argnums=1)

  @jax.jit  # one compilation per example (eager scans compile their forward and backward separately)
  def run(params, x):
    out, pull = jax.vjp(lambda x: g(params, x), x)
    return out[:, 0], pull(jnp.zeros_like(out).at[:, 0].set(1.0))[0]

  score, r = run(params, x)
  sums = r.reshape(r.shape[0], -1).sum(-1)
  np.testing.assert_allclose(sums, score, rtol=1e-4, atol=1e-7)


@_settings(6)
@given(cell=st.sampled_from(["lstm", "gru"]), t=st.integers(1, 64), d=st.integers(1, 6), h=st.integers(1, 8),
       batch=st.integers(1, 3), seed=st.integers(0, 1000))
@example(cell="lstm", t=64, d=6, h=8, batch=3, seed=1)
@example(cell="gru", t=64, d=6, h=8, batch=3, seed=2)
def test_hand_written_cells_conserve(cell, t, d, h, batch, seed):
  p = hand_params(cell, d, h, seed, bias=False)
  assert_conserves(hand_scanned(cell), p, _x(seed, (batch, t, d)))


class BiasFreeRNN(nn.Module):
  cell: type
  width: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, use_bias=False)(nn.RNN(self.cell(self.width))(x)[:, -1])


@_settings(6)
@given(cell=st.sampled_from([nn.LSTMCell, nn.OptimizedLSTMCell, nn.GRUCell]), t=st.integers(1, 64),
       d=st.integers(1, 6), h=st.integers(1, 8), batch=st.integers(1, 3), seed=st.integers(0, 1000))
@example(cell=nn.OptimizedLSTMCell, t=64, d=6, h=8, batch=3, seed=1)
@example(cell=nn.GRUCell, t=64, d=6, h=8, batch=3, seed=2)
def test_linen_cells_conserve(cell, t, d, h, batch, seed):
  # Linen cells always have biases: set them to zero (the default initialiser's value); the carry starts at zero.
  model = BiasFreeRNN(cell, h)
  x = _x(seed, (batch, t, d))
  assert_conserves(model.apply, fill(shapes(model, x), seed, keep=("bias",)), x)


# ---- cond / switch: each branch gets its own rules ------------------------------------------------------------------

def conv_branch(p, x):
  y = jax.lax.conv_general_dilated(x, p["k"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
  return jnp.mean(jax.nn.relu(y + p["kb"]), axis=1)


def dense_branch(p, x):
  return jax.nn.relu(x.reshape(x.shape[0], -1) @ p["w"] + p["wb"])


def position_branch(p, x):
  return jnp.tanh(x @ p["v"]).mean(axis=1)


BRANCHES = [conv_branch, dense_branch, position_branch]


def switched(p, x, i):
  return jax.lax.switch(i, [functools.partial(b, p) for b in BRANCHES], x) @ p["head"]


def conditioned(p, x, i):
  return jax.lax.cond(i == 0, functools.partial(conv_branch, p), functools.partial(dense_branch, p), x) @ p["head"]


@functools.cache
def branch_inputs():
  rng = np.random.default_rng(7)
  sizes = {"k": (3, 3, 4), "kb": (4,), "w": (24, 4), "wb": (4,), "v": (3, 4), "head": (4, 2)}
  p = {k: jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32) for k, s in sizes.items()}
  return p, jnp.asarray(rng.normal(size=(3, 8, 3)), jnp.float32)


BRANCH_COMPOSITES = {
  "EpsilonAlpha2Beta1": jaxlrp.EpsilonAlpha2Beta1(),  # AlphaBeta on the conv, Epsilon on the dense layers
  "conv-Gamma-dense-Epsilon": jaxlrp.Composite(("conv", jaxlrp.Gamma(0.25)), ("dense", jaxlrp.Epsilon(1e-2))),
  # ZBox / Flat on the first layer, which here sits inside each branch (on the conv only for ZBox).
  "EpsilonGammaBox": jaxlrp.EpsilonGammaBox(low=-3.0, high=3.0),
  "EpsilonPlusFlat": jaxlrp.EpsilonPlusFlat(),
}


@functools.cache
def branch_alone(name, i):
  p, x = branch_inputs()
  return relevance(lambda p, x: BRANCHES[i](p, x) @ p["head"], BRANCH_COMPOSITES[name], p, x)


@pytest.mark.parametrize("name", BRANCH_COMPOSITES)
@pytest.mark.parametrize("control", ["switch", "cond"])
def test_each_branch_gets_its_own_rules(control, name):
  p, x = branch_inputs()
  f, n = (switched, 3) if control == "switch" else (conditioned, 2)
  g = jaxlrp.lrp(f, BRANCH_COMPOSITES[name], argnums=1)
  # The branch index is a traced argument: one compilation serves every branch.
  explain = jax.jit(lambda p, x, i: jax.grad(lambda x: g(p, x, i)[:, 0].sum())(x))
  for i in range(n):
    r = explain(p, x, i)
    alone = branch_alone(name, i)
    np.testing.assert_allclose(r, alone, rtol=1e-5, atol=1e-6 * float(jnp.abs(alone).max()))
  np.testing.assert_array_equal(g(p, x, 0), f(p, x, 0))
