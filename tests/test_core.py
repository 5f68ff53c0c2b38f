"""The transform's contract: forward unchanged, error messages, selection, preprocessing, pytrees, attribute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp

RNG = np.random.default_rng(0)


def _normal(*shape, scale=1.0):
  return jnp.asarray(RNG.normal(size=shape) * scale, jnp.float32)


def mlp(p, x):
  h = jax.nn.relu(x @ p["w1"] + p["b1"])
  return h @ p["w2"] + p["b2"]


PARAMS = {"w1": _normal(4, 6), "b1": _normal(6, scale=0.1), "w2": _normal(6, 3), "b2": _normal(3, scale=0.1)}
X = _normal(5, 4)


def relevance(f, comp, p, x, target=0, **kw):
  g = jaxlrp.lrp(f, comp, argnums=1, **kw)
  return jax.grad(lambda x: g(p, x)[:, target].sum())(x)


# ---- errors -------------------------------------------------------------------------------------------------------

def test_unsupported_op_names_primitive_place_and_fix():
  def f(p, x):
    h = (x @ p["w1"]) * (x @ p["w1"][:, ::-1])  # a product of two data values: no rule
    return h @ p["w2"]

  g = jaxlrp.lrp(f, jaxlrp.EpsilonPlus(), argnums=1)
  np.testing.assert_array_equal(g(PARAMS, X), f(PARAMS, X))  # the forward never raises
  with pytest.raises(jaxlrp.UnsupportedOpError) as err:
    jax.grad(lambda x: g(PARAMS, x)[0, 0])(X)
  msg = str(err.value)
  assert "`mul` of two data-dependent operands" in msg
  assert "test_core.py" in msg  # the user's source line
  assert "strict=False" in msg


def test_strict_false_uses_the_gradient():
  def f(p, x):
    h = (x @ p["w1"]) * (x @ p["w1"][:, ::-1])
    return h @ p["w2"]

  r = relevance(f, jaxlrp.Composite(("dense", jaxlrp.Zero())), PARAMS, X, strict=False)
  # Bias-free LRP-0 in gradient form with the plain gradient through the product: gradient x input.
  expected = X * jax.grad(lambda x: f(PARAMS, x)[:, 0].sum())(X)
  np.testing.assert_allclose(r, expected, rtol=1e-4, atol=1e-5)


def test_unexplained_head_with_unsupported_ops_does_not_fail():
  def f(p, x):
    logits = mlp(p, x)
    return logits, logits * logits[:, ::-1]  # a head nobody explains, with a bilinear product

  g = jaxlrp.lrp(f, jaxlrp.EpsilonPlus(), argnums=1)
  r = jax.grad(lambda x: g(PARAMS, x)[0][:, 1].sum())(X)
  np.testing.assert_allclose(r, relevance(mlp, jaxlrp.EpsilonPlus(), PARAMS, X, target=1), rtol=1e-6)
  with pytest.raises(jaxlrp.UnsupportedOpError):
    jax.grad(lambda x: g(PARAMS, x)[1][:, 1].sum())(X)


def test_selector_matching_nothing_is_an_error_unless_allowed():
  comp = jaxlrp.Composite((jaxlrp.Path("params/Conv_7*"), jaxlrp.Gamma()))
  with pytest.raises(jaxlrp.SelectorError, match=r"Path\('params/Conv_7\*'\).*matched no op") as err:
    relevance(mlp, comp, PARAMS, X)
  assert "w1" in str(err.value)  # lists the paths it saw
  ok = jaxlrp.Composite((jaxlrp.Path("params/Conv_7*", allow_empty=True), jaxlrp.Gamma()))
  relevance(mlp, ok, PARAMS, X)


def test_unknown_kind_string_suggests_path_and_name():
  with pytest.raises(jaxlrp.SelectorError, match=r"Unknown op kind 'Dense_0'.*jaxlrp.Path\('Dense_0'\)"):
    jaxlrp.Composite(("Dense_0", jaxlrp.Epsilon()))


def test_integer_input_is_rejected_with_a_hint():
  f = lambda table, ids: table[ids]  # noqa: E731
  g = jaxlrp.lrp(f, jaxlrp.EpsilonPlus(), argnums=1)
  with pytest.raises(TypeError, match=r"floating-point inputs.*int32.*embedding output"):
    g(jnp.ones((10, 3)), jnp.array([1, 2]))


def test_zbox_bounds_of_the_wrong_shape():
  comp = jaxlrp.Composite((jaxlrp.First(), jaxlrp.ZBox(jnp.zeros(3), 1.0)))
  with pytest.raises(ValueError, match=r"ZBox bound `low` has shape \(3,\).*\(5, 4\)"):
    relevance(mlp, comp, PARAMS, X)


def test_input_rule_deep_in_the_network_is_rejected():
  comp = jaxlrp.Composite((jaxlrp.Last(), jaxlrp.Flat()))
  with pytest.raises(jaxlrp.RulePlacementError,
                     match=r"Flat is an input-layer rule.*parameter w2.*another layer.*First\(\)"):
    relevance(mlp, comp, PARAMS, X)


@pytest.mark.parametrize("before, op", [
    (jnp.tanh, "tanh"),
    (lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True), "div"),
    (lambda x: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2), (1, 2), "VALID"), "reduce_window_max"),
])
def test_input_rule_after_nonlinear_preprocessing_names_the_op(before, op):
  # A preset's First() picks the first layer; when the model transforms the input nonlinearly before it, the error
  # names that op (not "assign it with First()", which the preset did) and the fixes.
  f = lambda p, x: mlp(p, jnp.tile(before(x), (1, 2))[:, :4])  # noqa: E731
  with pytest.raises(jaxlrp.RulePlacementError, match=rf"(?s)Flat is an input-layer rule.*parameter w1.*through "
                                                      rf"`{op}` at .*Apply that op before calling the model.*"
                                                      rf"EpsilonPlus\(\)"):
    relevance(f, jaxlrp.EpsilonPlusFlat(), PARAMS, X)


def test_attribute_target_validation():
  f = lambda x: mlp(PARAMS, x)  # noqa: E731
  with pytest.raises(ValueError, match=r"target must be an int or one int per sample \(shape \(5,\)\)"):
    jaxlrp.attribute(f, X, jaxlrp.EpsilonPlus(), target=jnp.zeros((5, 2, 1), jnp.int32))
  with pytest.raises(TypeError, match="integer class indices"):
    jaxlrp.attribute(f, X, jaxlrp.EpsilonPlus(), target=jnp.zeros(5))
  with pytest.raises(ValueError, match=r"\[batch, classes\]"):
    jaxlrp.attribute(lambda x: f(x)[:, 0], X, jaxlrp.EpsilonPlus(), target=0)


def test_bad_rule_arguments():
  with pytest.raises(ValueError, match="alpha - beta = 1"):
    jaxlrp.AlphaBeta(2.0, 2.0)
  with pytest.raises(ValueError, match="zero_params supports only 'bias'"):
    jaxlrp.Epsilon(zero_params=("kernel",))
  with pytest.raises(TypeError, match="needs a jaxlrp.Composite"):
    jaxlrp.lrp(mlp, jaxlrp.Epsilon())
  with pytest.raises(TypeError, match="must be a jaxlrp rule"):
    jaxlrp.Composite(("dense", "epsilon"))


# ---- behaviour ----------------------------------------------------------------------------------------------------

def test_epsilon_matches_hand_computation():
  w = jnp.array([[1.0], [2.0]])
  g = jaxlrp.lrp(lambda w, x: x @ w, jaxlrp.Composite(("dense", jaxlrp.Epsilon(0.5))), argnums=1)
  r = jax.grad(lambda x: g(w, x)[0])(jnp.array([1.0, 1.0]))
  np.testing.assert_allclose(r, [1 * 3 / 3.5, 2 * 3 / 3.5], rtol=1e-6)


def test_preprocessing_inside_the_model_passes_relevance_and_maps_zbox_bounds():
  mean, std = jnp.array([0.2, -0.1, 0.3, 0.0]), jnp.array([0.5, 2.0, 1.0, 0.25])

  def inside(p, x):
    return mlp(p, (x - mean) / std)

  x = jnp.asarray(RNG.uniform(size=(5, 4)), jnp.float32)
  comp_in = jaxlrp.EpsilonGammaBox(0.0, 1.0) + jaxlrp.Composite((jaxlrp.First(), jaxlrp.ZBox(0.0, 1.0)))
  comp_out = jaxlrp.Composite((jaxlrp.First(), jaxlrp.ZBox((0.0 - mean) / std, (1.0 - mean) / std)))
  r_in = relevance(inside, comp_in, PARAMS, x)
  r_out = relevance(mlp, jaxlrp.EpsilonGammaBox(0.0, 1.0) + comp_out, PARAMS, (x - mean) / std)
  np.testing.assert_allclose(r_in, r_out, rtol=1e-5, atol=1e-6)


def test_forward_is_bit_exact_and_pytrees_pass_through():
  def f(p, inputs):
    a = inputs["a"] @ p["w1"]
    b = jnp.tanh(inputs["b"] @ p["w1"])
    return {"sum": a + b, "a": a}

  inputs = {"a": X, "b": X[::-1]}
  g = jaxlrp.lrp(f, jaxlrp.EpsilonPlus(), argnums=1)
  out, ref = g(PARAMS, inputs), f(PARAMS, inputs)
  assert jax.tree.structure(out) == jax.tree.structure(ref)
  jax.tree.map(np.testing.assert_array_equal, out, ref)
  r = jax.grad(lambda i: g(PARAMS, i)["a"][:, 0].sum())(inputs)
  assert jnp.all(r["b"] == 0) and jnp.abs(r["a"]).sum() > 0


def test_tuple_argnums_explains_each_argument():
  f = lambda p, x1, x2: (x1 @ p["w1"] + x2 @ p["w1"]) @ p["w2"]  # noqa: E731
  g = jaxlrp.lrp(f, jaxlrp.Composite(("dense", jaxlrp.Zero())), argnums=(1, 2))
  r1, r2 = jax.grad(lambda a, b: g(PARAMS, a, b)[0, 0], argnums=(0, 1))(X, 2 * X)
  # LRP-0 through a linear net equals gradient x input for each argument.
  gx1, gx2 = jax.grad(lambda a, b: f(PARAMS, a, b)[0, 0], argnums=(0, 1))(X, 2 * X)
  np.testing.assert_allclose(r1, X * gx1, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(r2, 2 * X * gx2, rtol=1e-4, atol=1e-6)


def test_attribute_equals_lrp_vjp_per_sample_targets_and_jit():
  target = jnp.array([0, 1, 2, 0, 1])
  f = lambda p, x: mlp(p, x)  # noqa: E731
  res = jaxlrp.attribute(f, X, jaxlrp.EpsilonGammaBox(-3.0, 3.0), target=target, params=PARAMS)
  g = jaxlrp.lrp(f, jaxlrp.EpsilonGammaBox(-3.0, 3.0), argnums=1)
  out, vjp = jax.vjp(lambda x: g(PARAMS, x), X)
  (expected,) = vjp(jax.nn.one_hot(target, 3))
  np.testing.assert_allclose(res.relevance, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(res.output, out)
  np.testing.assert_array_equal(res.target, target)
  jitted = jax.jit(lambda x: jaxlrp.attribute(f, x, jaxlrp.EpsilonGammaBox(-3.0, 3.0), target=target,
                                              params=PARAMS).relevance)
  np.testing.assert_allclose(jitted(X), expected, rtol=1e-6, atol=1e-7)


def test_attribute_with_closed_over_params_matches_params_argument():
  res_closed = jaxlrp.attribute(lambda x: mlp(PARAMS, x), X, jaxlrp.EpsilonPlusFlat(), target=1)
  res_arg = jaxlrp.attribute(mlp, X, jaxlrp.EpsilonPlusFlat(), target=1, params=PARAMS)
  np.testing.assert_allclose(res_closed.relevance, res_arg.relevance, rtol=1e-6, atol=1e-7)


def test_zero_params_removes_bias_from_the_denominator():
  w, b = jnp.array([[1.0], [2.0]]), jnp.array([1.0])
  f = lambda p, x: x @ p[0] + p[1]  # noqa: E731
  x = jnp.array([1.0, 1.0])
  for zp, den in (((), 4.0), (("bias",), 3.0)):
    g = jaxlrp.lrp(f, jaxlrp.Composite(("dense", jaxlrp.Epsilon(0.0, zero_params=zp))), argnums=1)
    r = jax.grad(lambda x: g((w, b), x)[0])(x)
    np.testing.assert_allclose(r, [1 * 4 / den, 2 * 4 / den], rtol=1e-6)


def test_show_rules_reports_paths_names_and_rules(capsys):
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(4, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), (2, 2))
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  net = Net()
  x = jnp.ones((2, 8, 8, 3))
  params = net.init(jax.random.PRNGKey(0), x)
  rows = jaxlrp.show_rules(net.apply, jaxlrp.EpsilonPlusFlat(), params, x, argnums=1)
  printed = capsys.readouterr().out
  assert [(r.kind, r.name, r.path, type(r.rule).__name__) for r in rows] == [
      ("conv", "Net/Conv_0", "params/Conv_0/kernel", "Flat"),
      ("activation", "Net", None, "Pass"),
      ("avg_pool", "Net", None, "Norm"),
      ("dense", "Net/Dense_0", "params/Dense_0/kernel", "Epsilon"),
  ]
  assert "params/Conv_0/kernel" in printed and "Flat(epsilon=1e-06)" in printed


def test_composites_combine_and_last_match_wins():
  comp = jaxlrp.Composite(("linear", jaxlrp.Epsilon())) + jaxlrp.Composite((jaxlrp.Path("w2"), jaxlrp.Zero()))
  rows = jaxlrp.show_rules(mlp, comp, PARAMS, X, argnums=1, print_table=False)
  assert [repr(r.rule) for r in rows if r.kind == "dense"] == ["Epsilon(epsilon=1e-06)", "Epsilon(epsilon=0.0)"]
  assert repr(comp) == "Composite(('linear', Epsilon(epsilon=1e-06)), (Path('w2'), Epsilon(epsilon=0.0)))"


def test_gate_sends_all_relevance_to_the_signal():
  w = _normal(4, 4)
  f = lambda w, x: (x @ w) * jax.nn.sigmoid(x @ w.T)  # noqa: E731 - signal * sigmoid gate
  rows = jaxlrp.show_rules(f, jaxlrp.EpsilonPlus(), w, X, argnums=1, print_table=False)
  assert [r.kind for r in rows].count("gate") == 1
  g = jaxlrp.lrp(f, jaxlrp.Composite(("dense", jaxlrp.Zero())), argnums=1)
  r = jax.grad(lambda x: g(w, x).sum())(X)
  # The gate is a constant: the relevance is LRP-0 of the signal branch seeded with the whole output.
  gate = jax.nn.sigmoid(X @ w.T)
  expected = X * jax.grad(lambda x: ((x @ w) * gate).sum())(X)
  np.testing.assert_allclose(r, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(r.sum(), f(w, X).sum(), rtol=1e-4)


def test_standalone_norm_passes_relevance():
  w, v = _normal(4, 4), _normal(4, 4)
  mean, scale, shift = _normal(4), _normal(4), _normal(4)
  f = lambda p, x: ((x @ p[0] + x @ p[1]) - mean) * scale + shift  # noqa: E731 - a BatchNorm after a residual add
  rows = jaxlrp.show_rules(f, jaxlrp.EpsilonPlus(), (w, v), X, argnums=1, print_table=False)
  assert [r.kind for r in rows] == ["dense", "dense", "add", "norm"]
  g = jaxlrp.lrp(f, jaxlrp.Composite(("dense", jaxlrp.Zero())), argnums=1)
  r = jax.grad(lambda x: g((w, v), x).sum())(X)
  np.testing.assert_allclose(r.sum(), f((w, v), X).sum(), rtol=1e-4)  # Pass, Norm and LRP-0 conserve


def test_batchnorm_in_training_mode_is_rejected_with_the_fix():
  import flax.linen as nn

  class Net(nn.Module):
    train: bool

    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=not self.train)(x)
      return nn.Dense(2)(nn.relu(x).mean((1, 2)))

  x = jnp.asarray(RNG.normal(size=(2, 6, 6, 3)), jnp.float32)
  variables = Net(train=False).init(jax.random.PRNGKey(0), x)
  train_apply = lambda v, x: Net(train=True).apply(v, x, mutable=["batch_stats"])[0]  # noqa: E731
  g = jaxlrp.lrp(train_apply, jaxlrp.EpsilonPlus(), argnums=1)
  with pytest.raises(jaxlrp.UnsupportedOpError, match=r"(?s)Net/BatchNorm_0.*training mode.*use_running_average=True"):
    g(variables, x)
  relevance(Net(train=False).apply, jaxlrp.EpsilonPlus(), variables, x)  # inference mode is fine


def test_stack_passes_relevance_like_concatenate():
  # jnp.stack is its own primitive in this JAX release; relevance must pass through it as through concatenate.
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
  stacked = lambda w, x: jax.nn.relu(jnp.stack([x @ w, 2.0 * (x @ w)], axis=1)).sum(1)  # noqa: E731
  concat = lambda w, x: jax.nn.relu(  # noqa: E731
      jnp.concatenate([(x @ w)[:, None], (2.0 * (x @ w))[:, None]], axis=1)).sum(1)
  r = {name: jax.grad(lambda x: jaxlrp.lrp(f, jaxlrp.EpsilonPlus(), argnums=1)(w, x)[:, 0].sum())(x)
       for name, f in [("stack", stacked), ("concat", concat)]}
  np.testing.assert_allclose(r["stack"], r["concat"], rtol=1e-6, atol=1e-7)
  # LRP-0 (Epsilon on the dense layer): the relevance sums to the score 3 * relu(x @ w)[:, 0].
  np.testing.assert_allclose(r["stack"].sum(1), 3.0 * np.maximum(np.asarray(x @ w)[:, 0], 0), rtol=1e-4, atol=1e-5)


def test_group_norm_normalised_in_groups_then_reshaped_back():
  # GroupNorm as Flax, Equinox and research code write it: reshape [B, C] -> [B, G, C/G], normalise the last axis,
  # reshape back, per-channel scale and shift. The norm's epilogue then holds a reshape; its twin normalises in the
  # [B, C] layout with the group statistics repeated per channel. Same function, same relevance: exactly with
  # unstabilised rules (float64); EpsilonPlus's stabilisers sit on differently built statistics (jnp.var of the
  # grouped view computes its own mean), 3e-6 of max|R| apart.
  with jax.enable_x64(True):
    _group_norm_twins(np.random.default_rng(7))


def _group_norm_twins(rng):
  w1, w2, scale, x = (jnp.asarray(rng.normal(size=s)) for s in ((4, 8), (8, 3), (8,), (5, 4)))
  shift = jnp.asarray(0.1 * rng.normal(size=8))

  def grouped(x):
    h = (x @ w1).reshape(-1, 2, 4)
    h = (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + 1e-5)
    return jax.nn.relu(h.reshape(-1, 8) * scale + shift) @ w2

  def flat(x):
    h = x @ w1
    g = h.reshape(-1, 2, 4)
    mean, var = jnp.repeat(g.mean(-1), 4, axis=-1), jnp.repeat(g.var(-1), 4, axis=-1)
    return jax.nn.relu((h - mean) * jax.lax.rsqrt(var + 1e-5) * scale + shift) @ w2

  np.testing.assert_allclose(grouped(x), flat(x), rtol=1e-12)
  exact = jaxlrp.Composite(("linear", jaxlrp.Epsilon(0.0)), ("add", jaxlrp.Norm(0.0)), ("sum", jaxlrp.Norm(0.0)))
  for composite, tol in ((jaxlrp.EpsilonPlus() + exact, 1e-9), (jaxlrp.AttnLRP(), 1e-9), (jaxlrp.EpsilonPlus(), 1e-5)):
    r = {name: jax.grad(lambda x: jaxlrp.lrp(lambda _, x: f(x), composite, argnums=1)(0, x)[:, 0].sum())(x)
         for name, f in [("grouped", grouped), ("flat", flat)]}
    assert r["grouped"].dtype == jnp.float64
    np.testing.assert_allclose(r["grouped"], r["flat"], rtol=tol, atol=tol * float(jnp.abs(r["flat"]).max()))


@pytest.mark.parametrize("quantise", [
    lambda h: h + jax.lax.stop_gradient(jnp.round(h) - h),  # straight-through estimator
    lambda h: jax.nn.relu(h) + jax.lax.stop_gradient(jnp.round(h)),
])
def test_values_held_by_stop_gradient_are_constants(quantise):
  # Quantisation-aware models add values computed from a layer's output behind stop_gradient: constants of the
  # explanation, through which the gradient passes unchanged. Under LRP-0 the relevance is then the model's own
  # gradient x input, and the forward is the model's.
  w1, w2 = _normal(4, 8, scale=2.0), _normal(8, 3)
  f = lambda x: quantise(x @ w1) @ w2  # noqa: E731
  g = jaxlrp.lrp(lambda _, x: f(x), jaxlrp.Composite(("dense", jaxlrp.Zero())), argnums=1)
  np.testing.assert_array_equal(g(0, X), f(X))
  r = jax.grad(lambda x: g(0, x)[:, 0].sum())(X)
  np.testing.assert_allclose(r, X * jax.grad(lambda x: f(x)[:, 0].sum())(X), rtol=1e-5, atol=1e-6)


def test_cumulative_sum_is_a_sum():
  # jnp.cumsum (running totals over time steps or features) is linear: a sum per output element, under the sums'
  # rule. With Norm(0) and LRP-0 on a bias-free net it is exact: relevance == gradient x input, sum == score.
  w1, w2 = _normal(4, 6), _normal(6, 3)
  f = lambda x: jax.nn.relu(jnp.cumsum(x @ w1, axis=-1)) @ w2  # noqa: E731
  composite = jaxlrp.Composite(("dense", jaxlrp.Zero()), ("sum", jaxlrp.Norm(0.0)))
  rows = jaxlrp.show_rules(lambda _, x: f(x), composite, 0, X, argnums=1, print_table=False)
  assert [r.kind for r in rows] == ["dense", "sum", "activation", "dense"]
  r = jax.grad(lambda x: jaxlrp.lrp(lambda _, x: f(x), composite, argnums=1)(0, x)[:, 0].sum())(X)
  np.testing.assert_allclose(r, X * jax.grad(lambda x: f(x)[:, 0].sum())(X), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(r.sum(1), f(X)[:, 0], rtol=1e-5, atol=1e-5)
  r_eps = jax.grad(lambda x: jaxlrp.lrp(lambda _, x: f(x), jaxlrp.EpsilonPlus(), argnums=1)(0, x)[:, 0].sum())(X)
  assert np.all(np.isfinite(r_eps))


def test_params_with_none_fields_and_python_numbers():
  # A parameter tree holding None (an Equinox Linear without bias) next to a Python number (closed over): the
  # arrays keep their places. LRP-0 on a linear model is gradient x input.
  w = _normal(4, 3)
  p = {"a_unused": None, "scale": 2.0, "w": w}
  f = lambda p, x: p["scale"] * (x @ p["w"])  # noqa: E731
  res = jaxlrp.attribute(f, X, jaxlrp.Composite(("dense", jaxlrp.Zero())), target=1, params=p)
  np.testing.assert_allclose(res.relevance, X * 2.0 * w[:, 1], rtol=1e-6, atol=1e-6)


def test_checkpoint_names_and_optimization_barriers_are_identities():
  # checkpoint_name marks a value for a remat policy (save_only_these_names); optimization_barrier orders
  # computation. Both are identities: under LRP-0 and ReLU the relevance is gradient x input.
  from jax.ad_checkpoint import checkpoint_name
  w1, w2 = _normal(4, 6), _normal(6, 3)

  def f(x):
    h = checkpoint_name(jax.nn.relu(x @ w1), "hidden")
    return jax.lax.optimization_barrier(h) @ w2

  remat = jax.checkpoint(f, policy=jax.checkpoint_policies.save_only_these_names("hidden"))
  for fn in (f, remat):
    g = jaxlrp.lrp(lambda _, x: fn(x), jaxlrp.Composite(("dense", jaxlrp.Zero())), argnums=1)
    r = jax.grad(lambda x: g(0, x)[:, 0].sum())(X)
    np.testing.assert_allclose(r, X * jax.grad(lambda x: f(x)[:, 0].sum())(X), rtol=1e-5, atol=1e-6)


def test_stop_gradient_values_after_a_layer_are_not_its_epilogue():
  # x @ w + stop_gradient(x) and the hand-written stable softmax exp(s - stop_gradient(max s)): the held value is
  # computed after the layer, so it cannot be the layer's bias (a KeyError in the forward before). It is a constant
  # of the explanation: under LRP-0 the relevance is the model's gradient x input.
  w, v = _normal(4, 4), _normal(4, 3)
  for f in (lambda x: (x @ w + jax.lax.stop_gradient(x)) @ v,
            lambda x: jnp.exp((s := x @ w) - jax.lax.stop_gradient(s.max(-1, keepdims=True))) @ v):
    g = jaxlrp.lrp(lambda _, x: f(x), jaxlrp.Composite(("dense", jaxlrp.Zero()), ("activation", jaxlrp.Gradient())),
                   argnums=1)
    np.testing.assert_array_equal(jax.jit(g)(0, X), jax.jit(f)(X))
    r = jax.grad(lambda x: g(0, x)[:, 0].sum())(X)
    np.testing.assert_allclose(r, X * jax.grad(lambda x: f(x)[:, 0].sum())(X), rtol=1e-5, atol=1e-6)
