"""`attribute` targets (an int, [B], [B, K], "all", masks, callables), their errors and the jit cache; `normalize`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import _attribute

RNG = np.random.default_rng(0)


def _normal(*shape, scale=1.0):
  return jnp.asarray(RNG.normal(size=shape) * scale, jnp.float32)


def mlp(p, x):
  h = jax.nn.relu(x @ p["w1"] + p["b1"])
  return h @ p["w2"] + p["b2"]


PARAMS = {"w1": _normal(4, 6), "b1": _normal(6, scale=0.1), "w2": _normal(6, 3), "b2": _normal(3, scale=0.1)}
X = _normal(5, 4)
COMP = jaxlrp.EpsilonGammaBox(-3.0, 3.0)


class SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Dense(6)(x.reshape(x.shape[0], -1))


CNN = SmallCNN()
XI = jnp.asarray(RNG.uniform(size=(3, 8, 8, 2)), jnp.float32)
CNN_PARAMS = CNN.init(jax.random.key(0), XI)


def lrp_vjp(f, comp, p, x, cotangent):
  """The reference: jax.vjp of the LRP-transformed model with an explicit output cotangent."""
  g = jaxlrp.lrp(f, comp, argnums=1)
  out, vjp = jax.vjp(lambda xx: g(p, xx), x)
  return vjp(cotangent)[0]


def grad_vjp(f, p, x, cotangent):
  out, vjp = jax.vjp(lambda xx: f(p, xx), x)
  return vjp(cotangent)[0]


def assert_close(actual, expected, tol=1e-6):
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=0, atol=tol * max(scale, 1e-30))


# ---- K targets per sample -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [jaxlrp.EpsilonPlusFlat(), jaxlrp.EpsilonGammaBox(0.0, 1.0),
                                    jaxlrp.GradientXInput()], ids=["EpsilonPlusFlat", "EpsilonGammaBox", "GxI"])
def test_bk_targets_equal_k_separate_calls_cnn(method):
  target = jnp.array([[0, 5, 2, 2], [1, 1, 3, 0], [4, 2, 5, 1]])  # [B=3, K=4], repeats allowed
  res = jaxlrp.attribute(CNN.apply, XI, method, target=target, params=CNN_PARAMS)
  assert res.relevance.shape == (3, 4, 8, 8, 2)
  np.testing.assert_array_equal(res.target, target)
  out = CNN.apply(CNN_PARAMS, XI)
  np.testing.assert_allclose(res.score, jnp.take_along_axis(out, target, axis=1), rtol=1e-6)
  for k in range(4):
    single = jaxlrp.attribute(CNN.apply, XI, method, target=target[:, k], params=CNN_PARAMS)
    assert_close(res.relevance[:, k], single.relevance)


def test_all_targets_equal_explicit_one_hot_cotangents():
  res = jaxlrp.attribute(mlp, X, COMP, target="all", params=PARAMS)
  assert res.relevance.shape == (5, 3, 4)
  np.testing.assert_array_equal(res.target, np.broadcast_to(np.arange(3), (5, 3)))
  np.testing.assert_array_equal(res.score, res.output)
  for c in range(3):
    expected = lrp_vjp(mlp, COMP, PARAMS, X, jax.nn.one_hot(jnp.full((5,), c), 3))
    assert_close(res.relevance[:, c], expected)
  same = jaxlrp.attribute(mlp, X, COMP, target=jnp.tile(jnp.arange(3), (5, 1)), params=PARAMS)
  assert_close(same.relevance, res.relevance)


def test_target_batch_size_chunks_the_k_backward_passes():
  target = jnp.array([[0, 1, 2, 1, 0]] * 5)
  full = jaxlrp.attribute(mlp, X, COMP, target=target, params=PARAMS)
  for chunk in (1, 2, 5, 9):
    res = jaxlrp.attribute(mlp, X, COMP, target=target, params=PARAMS, target_batch_size=chunk)
    assert_close(res.relevance, full.relevance)
  with pytest.raises(ValueError, match=r"target_batch_size must be None or an int >= 1; got 0"):
    jaxlrp.attribute(mlp, X, COMP, target=target, params=PARAMS, target_batch_size=0)


def test_k_targets_run_one_forward_pass():
  # Vmapping the VJP function over K cotangents batches the backward; the forward is traced once. A second
  # forward would show up as extra dot_generals in the program.
  def n_dots(target):
    jaxpr = jax.make_jaxpr(lambda x: jaxlrp.attribute(mlp, x, COMP, target=target, params=PARAMS).relevance)(X)
    return str(jaxpr).count("dot_general")

  assert n_dots(jnp.zeros((5, 7), jnp.int32)) == n_dots(jnp.zeros((5,), jnp.int32))
  assert n_dots("all") == n_dots(0)


def test_single_int_and_per_sample_targets_keep_the_old_layout():
  res = jaxlrp.attribute(mlp, X, COMP, target=2, params=PARAMS)
  assert res.relevance.shape == X.shape
  np.testing.assert_array_equal(res.target, np.full(5, 2))
  np.testing.assert_allclose(res.score, res.output[:, 2])
  assert_close(res.relevance, lrp_vjp(mlp, COMP, PARAMS, X, jax.nn.one_hot(jnp.full((5,), 2), 3)))


# ---- callables and masks ------------------------------------------------------------------------------------------

def test_callable_contrast_equals_difference_cotangent():
  res = jaxlrp.attribute(mlp, X, COMP, target=lambda out: out[:, 1] - out[:, 2], params=PARAMS)
  cot = jnp.broadcast_to(jnp.array([0.0, 1.0, -1.0]), (5, 3))
  assert res.relevance.shape == X.shape and res.target is None
  assert_close(res.relevance, lrp_vjp(mlp, COMP, PARAMS, X, cot))
  np.testing.assert_allclose(res.score, res.output[:, 1] - res.output[:, 2], rtol=1e-6)


def test_callable_similarity_uses_the_score_gradient_at_the_output():
  ref = jnp.array([0.5, -1.0, 2.0])

  def cosine(out):
    return out @ ref / (jnp.linalg.norm(out, axis=1) * jnp.linalg.norm(ref))

  out = mlp(PARAMS, X)
  # d cos / d out, by hand: ref / (|o| |r|) - cos * o / |o|^2.
  norm = jnp.linalg.norm(out, axis=1, keepdims=True)
  cos = cosine(out)[:, None]
  cot = ref / (norm * jnp.linalg.norm(ref)) - cos * out / norm ** 2
  res = jaxlrp.attribute(mlp, X, COMP, target=cosine, params=PARAMS)
  assert_close(res.relevance, lrp_vjp(mlp, COMP, PARAMS, X, cot), tol=1e-5)
  np.testing.assert_allclose(res.score, cosine(out), rtol=1e-6)
  # Gradient form: the output relevance out * ds/dout of a scale-invariant score sums to zero (documented).
  np.testing.assert_allclose((out * cot).sum(1), 0.0, atol=1e-5)
  # The gradient attributors explain the score itself: d cos(f(x)) / dx.
  grad = jaxlrp.attribute(mlp, X, jaxlrp.VanillaGradient(), target=cosine, params=PARAMS)
  expected = jax.grad(lambda x: cosine(mlp(PARAMS, x)).sum())(X)
  assert_close(grad.relevance, expected, tol=1e-5)


def test_callable_with_k_scores_and_closed_over_constants():
  refs = _normal(3, 2)  # closed over: a constant of the traced score, passed as an argument

  res = jaxlrp.attribute(mlp, X, COMP, target=lambda out: out @ refs, params=PARAMS)
  assert res.relevance.shape == (5, 2, 4)
  for k in range(2):
    assert_close(res.relevance[:, k], lrp_vjp(mlp, COMP, PARAMS, X, jnp.broadcast_to(refs[:, k], (5, 3))))


def test_mask_target_explains_the_masked_sum():
  mask = jnp.asarray(RNG.uniform(size=(5, 3)) > 0.5)
  res = jaxlrp.attribute(mlp, X, COMP, target=mask, params=PARAMS)
  assert_close(res.relevance, lrp_vjp(mlp, COMP, PARAMS, X, mask.astype(jnp.float32)))
  np.testing.assert_allclose(res.score, (res.output * mask).sum(1), rtol=1e-6)
  np.testing.assert_array_equal(res.target, mask)
  weights = _normal(5, 3)  # a float mask weights the outputs
  res_w = jaxlrp.attribute(mlp, X, jaxlrp.VanillaGradient(), target=weights, params=PARAMS)
  assert_close(res_w.relevance, grad_vjp(mlp, PARAMS, X, weights))


def test_masks_on_a_non_class_output_and_k_masks():
  def seg(p, x):  # a per-position output [B, T, C]: integer targets do not apply, masks do
    return jnp.tanh(x[:, :, None] * p["w2"][None, :3, :])

  x = _normal(2, 3)
  mask = jnp.zeros((2, 3, 3)).at[:, 1:, 0].set(1.0)
  res = jaxlrp.attribute(seg, x, jaxlrp.VanillaGradient(), target=mask, params=PARAMS)
  assert_close(res.relevance, grad_vjp(seg, PARAMS, x, mask))
  masks = jnp.stack([mask, 1.0 - mask], axis=1)  # [B, K=2, T, C]
  res_k = jaxlrp.attribute(seg, x, jaxlrp.VanillaGradient(), target=masks, params=PARAMS)
  assert res_k.relevance.shape == (2, 2, 3) and res_k.score.shape == (2, 2)
  assert_close(res_k.relevance[:, 1], grad_vjp(seg, PARAMS, x, 1.0 - mask))
  np.testing.assert_allclose(res_k.score.sum(1), res_k.output.sum((1, 2)), rtol=1e-5)


# ---- errors -------------------------------------------------------------------------------------------------------

def test_target_errors_say_what_is_accepted():
  f = lambda x: mlp(PARAMS, x)  # noqa: E731
  comp = jaxlrp.EpsilonPlus()
  with pytest.raises(ValueError, match=r"one int per sample \(shape \(5,\)\), or K ints per sample \(shape \(5, K\)\)"):
    jaxlrp.attribute(f, X, comp, target=jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match=r"got shape \(5, 2, 1\)"):
    jaxlrp.attribute(f, X, comp, target=jnp.zeros((5, 2, 1), jnp.int32))
  with pytest.raises(TypeError, match=r"integer class indices, or be a mask .* shape \(5, 3\).*got dtype float32"):
    jaxlrp.attribute(f, X, comp, target=jnp.zeros(5))
  with pytest.raises(TypeError, match=r"mask .*got dtype bool and shape \(5, 4\)"):
    jaxlrp.attribute(f, X, comp, target=jnp.zeros((5, 4), bool))
  with pytest.raises(ValueError, match=r"class indices must lie in \[0, 3\); got values from 0 to 3"):
    jaxlrp.attribute(f, X, comp, target=[0, 1, 2, 3, 0])
  with pytest.raises(ValueError, match=r"class indices must lie in \[0, 3\)"):
    jaxlrp.attribute(f, X, comp, target=-1)
  with pytest.raises(ValueError, match=r'"all", a mask or a callable; got the string \'every\''):
    jaxlrp.attribute(f, X, comp, target="every")
  with pytest.raises(ValueError, match=r"one floating score per sample, shape \(5,\).*returned float32\[\]"):
    jaxlrp.attribute(f, X, comp, target=lambda out: out.sum())
  with pytest.raises(ValueError, match=r"returned int32\[5\]"):
    jaxlrp.attribute(f, X, comp, target=lambda out: jnp.argmax(out, 1))
  with pytest.raises(ValueError, match=r"target callable failed on the model output \(shape \(5, 3\)"):
    jaxlrp.attribute(f, X, comp, target=lambda out: out[:, :, 0])
  with pytest.raises(ValueError, match=r"integer targets index the classes .*\[batch, classes\].*mask"):
    jaxlrp.attribute(lambda x: f(x)[:, :, None], X, comp, target=0)
  with pytest.raises(ValueError, match=r'target="all" needs f\(x\) of shape \[batch, classes\]'):
    jaxlrp.attribute(lambda x: f(x)[:, 0], X, comp, target="all")
  with pytest.raises(TypeError, match=r"dtype complex64"):
    jaxlrp.attribute(f, X, comp, target=jnp.zeros((5, 3), jnp.complex64))


def test_method_errors_point_to_the_right_name():
  f = lambda x: mlp(PARAMS, x)  # noqa: E731
  with pytest.raises(TypeError, match=r"not the rule Gradient\(\)\. jaxlrp.Gradient is the LRP rule.*VanillaGradient"):
    jaxlrp.attribute(f, X, jaxlrp.Gradient(), target=0)
  with pytest.raises(TypeError, match=r"wrap it: jaxlrp.Composite\(\('linear', Epsilon"):
    jaxlrp.attribute(f, X, jaxlrp.Epsilon(), target=0)
  with pytest.raises(TypeError, match="needs a jaxlrp.Composite .* or an attributor"):
    jaxlrp.attribute(f, X, "epsilon", target=0)
  with pytest.raises(TypeError, match="floating-point input; got x of dtype int32"):
    jaxlrp.attribute(lambda x: f(x.astype(jnp.float32)), jnp.zeros((5, 4), jnp.int32), jaxlrp.VanillaGradient(),
                     target=0)


# ---- compilation --------------------------------------------------------------------------------------------------

def test_jit_and_the_compiled_cache():
  k_target = jnp.array([[0, 2]] * 5)
  expected = jaxlrp.attribute(mlp, X, COMP, target=k_target, params=PARAMS).relevance
  jitted = jax.jit(lambda x, t: jaxlrp.attribute(mlp, x, COMP, target=t, params=PARAMS).relevance)
  assert_close(jitted(X, k_target), expected)
  # New target values and a fresh (but identical) callable reuse the compiled functions: no new cache entry,
  # no re-trace.
  jaxlrp.attribute(mlp, X, COMP, target=lambda out: out[:, 0] - out[:, 1], params=PARAMS)
  jaxlrp.attribute(mlp, X, COMP, target=jnp.full((5, 2), 1), params=PARAMS)
  n_entries = len(_attribute._compiled)
  fns = list(_attribute._compiled.values())[-2:]
  n_traces = [fn._cache_size() for fn in fns]
  for t in range(3):
    jaxlrp.attribute(mlp, X, COMP, target=lambda out: out[:, 0] - out[:, 1], params=PARAMS)
    jaxlrp.attribute(mlp, X, COMP, target=jnp.full((5, 2), t), params=PARAMS)
  assert len(_attribute._compiled) == n_entries
  assert [fn._cache_size() for fn in fns] == n_traces


def test_vmap_over_samples():
  per_sample = jax.vmap(lambda x: jaxlrp.attribute(mlp, x[None], COMP, target=jnp.array([[0, 1]]),
                                                   params=PARAMS).relevance[0])(X)
  batched = jaxlrp.attribute(mlp, X, COMP, target=jnp.array([[0, 1]] * 5), params=PARAMS).relevance
  assert_close(per_sample, batched, tol=1e-5)


# ---- normalize ----------------------------------------------------------------------------------------------------

def test_normalize_methods_per_sample_and_per_target():
  r = _normal(3, 2, 4, 4)
  r = r.at[1].set(0.0)  # an all-zero sample stays zero
  n = np.asarray(r, np.float64).reshape(3, 2, -1)
  for method, divisor in (("sum", n.sum(-1)), ("abs_sum", np.abs(n).sum(-1)), ("max_abs", np.abs(n).max(-1))):
    out = jaxlrp.normalize(r, method, batch_dims=2)
    with np.errstate(invalid="ignore", divide="ignore"):
      expected = np.where(divisor[..., None] == 0, 0.0, n / divisor[..., None]).reshape(r.shape)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert out.shape == r.shape and out.dtype == r.dtype
  per_sample = jaxlrp.normalize(r, "abs_sum")
  np.testing.assert_allclose(jnp.abs(per_sample).sum((1, 2, 3)), [1.0, 0.0, 1.0], rtol=1e-5)
  whole = jaxlrp.normalize(r, "max_abs", batch_dims=0)
  assert float(jnp.abs(whole).max()) == 1.0
  np.testing.assert_allclose(whole * jnp.abs(r).max(), r, rtol=1e-6)


def test_normalize_low_precision_and_errors():
  r = jnp.array([[1.0, -4.0], [2.0, 2.0]], jnp.bfloat16)
  out = jaxlrp.normalize(r, "max_abs")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), [[0.25, -1.0], [1.0, 1.0]])
  assert jax.jit(lambda r: jaxlrp.normalize(r, "sum"))(r).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="method must be one of"):
    jaxlrp.normalize(r, "l2")
  with pytest.raises(ValueError, match=r"batch_dims must be an int in \[0, 2\)"):
    jaxlrp.normalize(r, batch_dims=2)
  with pytest.raises(TypeError, match="floating-point relevance"):
    jaxlrp.normalize(jnp.ones((2, 2), jnp.int32))
