"""Gradient-based attributors behind `jaxlrp.attribute`: VanillaGradient, GradientXInput, SmoothGrad and
IntegratedGradients against hand-written references; IG completeness; K targets; errors; the jit cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import _attribute

RNG = np.random.default_rng(1)


def _normal(*shape, scale=1.0):
  return jnp.asarray(RNG.normal(size=shape) * scale, jnp.float32)


def smooth_net(p, x):
  """A small smooth network (tanh, softplus): the integrand of IG is smooth along the path."""
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  h = jax.nn.softplus(h @ p["w2"] + p["b2"])
  return h @ p["w3"] + p["b3"]


def relu_net(p, x):
  return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"][:, :3] + p["b3"]


PARAMS = {"w1": _normal(6, 16, scale=0.6), "b1": _normal(16, scale=0.1), "w2": _normal(16, 8, scale=0.4),
          "b2": _normal(8, scale=0.1), "w3": _normal(8, 3), "b3": _normal(3, scale=0.1)}
X = _normal(4, 6)
TARGET = jnp.array([0, 2, 1, 2])


def grad_of_score(x, target, f=smooth_net):
  """d f(x)[b, t_b] / dx for each sample (one jax.grad per call)."""
  return jax.grad(lambda xx: f(PARAMS, xx)[jnp.arange(xx.shape[0]), target].sum())(x)


def test_vanilla_gradient_and_gradient_x_input():
  res = jaxlrp.attribute(smooth_net, X, jaxlrp.VanillaGradient(), target=TARGET, params=PARAMS)
  g = grad_of_score(X, TARGET)
  np.testing.assert_allclose(res.relevance, g, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(res.output, smooth_net(PARAMS, X))
  gxi = jaxlrp.attribute(smooth_net, X, jaxlrp.GradientXInput(), target=TARGET, params=PARAMS)
  np.testing.assert_allclose(gxi.relevance, X * g, rtol=1e-6, atol=1e-7)


def test_gradient_x_input_equals_lrp_zero_on_a_relu_network():
  gxi = jaxlrp.attribute(relu_net, X, jaxlrp.GradientXInput(), target=TARGET, params=PARAMS)
  lrp0 = jaxlrp.attribute(relu_net, X, jaxlrp.Composite(("dense", jaxlrp.Zero())), target=TARGET, params=PARAMS)
  np.testing.assert_allclose(gxi.relevance, lrp0.relevance, rtol=1e-4, atol=1e-6)


# ---- SmoothGrad ---------------------------------------------------------------------------------------------------

def smoothgrad_reference(x, target, noise_level, samples, key):
  """SmoothGrad by hand: the documented noise draw, one gradient per noisy copy, averaged in float64."""
  x_np = np.asarray(x, np.float64)
  span = x_np.reshape(len(x_np), -1).max(1) - x_np.reshape(len(x_np), -1).min(1)
  sigma = (noise_level * span).reshape((-1,) + (1,) * (x.ndim - 1))
  eps = np.asarray(jax.random.normal(key, (samples, *x.shape), x.dtype), np.float64)
  total = np.zeros(x.shape)
  for i in range(samples):
    noisy = jnp.asarray(x_np + sigma * eps[i], jnp.float32)
    total += np.asarray(grad_of_score(noisy, target), np.float64)
  return total / samples


def test_smoothgrad_matches_the_hand_written_reference():
  sg = jaxlrp.SmoothGrad(noise_level=0.15, samples=12, key=3)
  res = jaxlrp.attribute(smooth_net, X, sg, target=TARGET, params=PARAMS)
  expected = smoothgrad_reference(X, TARGET, 0.15, 12, jax.random.key(3))
  np.testing.assert_allclose(res.relevance, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(res.output, smooth_net(PARAMS, X))  # the output at x, not at a noisy copy
  # The noise is not trivial: SmoothGrad differs from the gradient.
  assert float(jnp.abs(res.relevance - grad_of_score(X, TARGET)).max()) > 1e-3


def test_smoothgrad_keys_chunks_and_zero_noise():
  run = lambda **kw: jaxlrp.attribute(smooth_net, X, jaxlrp.SmoothGrad(**kw), target=TARGET,  # noqa: E731
                                      params=PARAMS).relevance
  base = run(samples=10, key=7)
  np.testing.assert_array_equal(run(samples=10, key=jax.random.key(7)), base)
  np.testing.assert_array_equal(run(samples=10, key=jax.random.PRNGKey(7)), base)
  np.testing.assert_allclose(run(samples=10, key=7, batch_size=3), base, rtol=1e-6, atol=1e-7)
  assert not np.allclose(run(samples=10, key=8), base)
  np.testing.assert_allclose(run(samples=3, noise_level=0.0), grad_of_score(X, TARGET), rtol=1e-6, atol=1e-7)


# ---- Integrated Gradients -----------------------------------------------------------------------------------------

def ig_reference(x, baseline, target, alphas, weights):
  """IG by hand: a loop over the path points, each with its own jax.grad, summed in float64."""
  x_np, b_np = np.asarray(x, np.float64), np.broadcast_to(np.asarray(baseline, np.float64), x.shape)
  total = np.zeros(x.shape)
  for a, w in zip(alphas, weights):
    point = jnp.asarray(b_np + a * (x_np - b_np), jnp.float32)
    total += w * np.asarray(grad_of_score(point, target), np.float64)
  return (x_np - b_np) * total


def _nodes(steps, quadrature):
  if quadrature == "midpoint":
    return [(k + 0.5) / steps for k in range(steps)], [1.0 / steps] * steps
  if quadrature == "trapezoid":
    return [k / steps for k in range(steps + 1)], [0.5 / steps] + [1.0 / steps] * (steps - 1) + [0.5 / steps]
  nodes, weights = np.polynomial.legendre.leggauss(steps)
  return list((nodes + 1) / 2), list(weights / 2)


@pytest.mark.parametrize("quadrature", ["midpoint", "trapezoid", "gauss_legendre"])
def test_integrated_gradients_matches_the_hand_written_reference(quadrature):
  baseline = _normal(4, 6, scale=0.3)  # one baseline per sample
  ig = jaxlrp.IntegratedGradients(baseline=baseline, steps=7, quadrature=quadrature)
  res = jaxlrp.attribute(smooth_net, X, ig, target=TARGET, params=PARAMS)
  expected = ig_reference(X, baseline, TARGET, *_nodes(7, quadrature))
  np.testing.assert_allclose(res.relevance, expected, rtol=1e-5, atol=1e-6)
  chunked = jaxlrp.attribute(smooth_net, X, jaxlrp.IntegratedGradients(baseline, 7, quadrature, batch_size=3),
                             target=TARGET, params=PARAMS)
  np.testing.assert_allclose(chunked.relevance, res.relevance, rtol=1e-6, atol=1e-7)


def test_integrated_gradients_completeness_with_256_steps():
  x = _normal(4, 6, scale=1.5)
  for baseline in (0.0, jnp.full((6,), 0.5)):
    res = jaxlrp.attribute(smooth_net, x, jaxlrp.IntegratedGradients(baseline, steps=256), target=TARGET,
                           params=PARAMS)
    f_x = smooth_net(PARAMS, x)[jnp.arange(4), TARGET]
    f_b = smooth_net(PARAMS, jnp.broadcast_to(baseline, x.shape))[jnp.arange(4), TARGET]
    delta = np.asarray(f_x - f_b, np.float64)
    assert np.abs(delta).min() > 0.05  # a meaningful difference to conserve
    total = np.asarray(res.relevance, np.float64).sum(1)
    np.testing.assert_allclose(total, delta, rtol=1e-3)


def test_integrated_gradients_completeness_for_all_classes_and_a_callable_score():
  ig = jaxlrp.IntegratedGradients(steps=256)
  res = jaxlrp.attribute(smooth_net, X, ig, target="all", params=PARAMS)
  assert res.relevance.shape == (4, 3, 6)
  delta = smooth_net(PARAMS, X) - smooth_net(PARAMS, jnp.zeros_like(X))
  np.testing.assert_allclose(res.relevance.sum(-1), delta, rtol=1e-3, atol=1e-4)
  # A nonlinear score of the output: IG explains score(f(x)) - score(f(0)).
  score = lambda out: jax.nn.logsumexp(out, axis=1)  # noqa: E731
  res_s = jaxlrp.attribute(smooth_net, X, ig, target=score, params=PARAMS)
  delta_s = score(smooth_net(PARAMS, X)) - score(smooth_net(PARAMS, jnp.zeros_like(X)))
  np.testing.assert_allclose(res_s.relevance.sum(-1), delta_s, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", [jaxlrp.SmoothGrad(samples=4, key=1), jaxlrp.IntegratedGradients(steps=5)],
                         ids=["SmoothGrad", "IG"])
def test_k_targets_equal_separate_calls(method):
  target = jnp.array([[0, 1], [2, 2], [1, 0], [2, 0]])
  res = jaxlrp.attribute(smooth_net, X, method, target=target, params=PARAMS)
  assert res.relevance.shape == (4, 2, 6)
  for k in range(2):
    single = jaxlrp.attribute(smooth_net, X, method, target=target[:, k], params=PARAMS)
    np.testing.assert_allclose(res.relevance[:, k], single.relevance, rtol=0,
                               atol=1e-6 * float(jnp.abs(single.relevance).max()))


# ---- errors and compilation ---------------------------------------------------------------------------------------

def test_attributor_argument_errors():
  with pytest.raises(ValueError, match=r"SmoothGrad: samples must be an int >= 1; got 0"):
    jaxlrp.SmoothGrad(samples=0)
  with pytest.raises(ValueError, match=r"noise_level must be >= 0"):
    jaxlrp.SmoothGrad(noise_level=-0.1)
  with pytest.raises(ValueError, match=r"IntegratedGradients: batch_size must be an int >= 1; got 0"):
    jaxlrp.IntegratedGradients(batch_size=0)
  with pytest.raises(ValueError, match=r"quadrature must be one of \('midpoint', 'trapezoid', 'gauss_legendre'\)"):
    jaxlrp.IntegratedGradients(quadrature="simpson")
  with pytest.raises(ValueError, match=r"steps must be an int >= 1; got 2.5"):
    jaxlrp.IntegratedGradients(steps=2.5)
  with pytest.raises(ValueError, match=r"baseline \(shape \(5,\)\) must be a scalar or broadcast to the input's "
                                       r"shape \(4, 6\)"):
    jaxlrp.attribute(smooth_net, X, jaxlrp.IntegratedGradients(jnp.zeros(5)), target=0, params=PARAMS)
  with pytest.raises(TypeError, match=r"key must be an int seed or a jax.random.key; got float32\[\]"):
    jaxlrp.attribute(smooth_net, X, jaxlrp.SmoothGrad(samples=2, key=0.5), target=0, params=PARAMS)


def test_hyperparameters_are_arguments_and_counts_are_static():
  def run(method):
    return jaxlrp.attribute(smooth_net, X, method, target=TARGET, params=PARAMS).relevance

  run(jaxlrp.SmoothGrad(noise_level=0.1, samples=4, key=0))
  fn = next(reversed(_attribute._compiled.values()))
  n = fn._cache_size()
  run(jaxlrp.SmoothGrad(noise_level=0.2, samples=4, key=5))  # new noise level and key: same executable
  assert fn._cache_size() == n
  run(jaxlrp.SmoothGrad(noise_level=0.2, samples=5, key=5))  # a new sample count: a new trace
  assert fn._cache_size() == n + 1
  jitted = jax.jit(lambda x, level: jaxlrp.attribute(smooth_net, x, jaxlrp.IntegratedGradients(steps=8),
                                                     target=TARGET, params=PARAMS).relevance * level)
  expected = run(jaxlrp.IntegratedGradients(steps=8))
  np.testing.assert_allclose(jitted(X, 2.0), 2 * expected, rtol=1e-6, atol=1e-7)
