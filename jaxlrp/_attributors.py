r"""Gradient-based attribution methods that `jaxlrp.attribute` runs in place of an LRP composite.

`jaxlrp.attribute(f, x, method, target=...)` takes either a `jaxlrp.Composite` (LRP) or one of the attributors
below, so methods are compared through one call with the same targets, jit cache and `Attribution` record:

- `VanillaGradient()`: the gradient of the explained score (Simonyan et al. 2014).
- `GradientXInput()`: gradient times input (Shrikumar et al. 2016).
- `SmoothGrad(noise_level, samples, key)`: the gradient averaged over noisy copies of the input (Smilkov et al. 2017).
- `IntegratedGradients(baseline, steps, quadrature)`: the path integral of the gradient from a baseline to the input
  (Sundararajan et al. 2017).

Naming: `jaxlrp.Gradient` is the LRP *rule* that propagates relevance with the ordinary gradient through one op
(e.g. max pools); the attribution method over the whole model is `VanillaGradient`. `jaxlrp.attribute(f, x,
jaxlrp.Gradient(), ...)` raises an error that says so.

Every method evaluates all its samples or steps in one batched (vmapped) call; `batch_size` bounds the memory
by evaluating them in chunks of that many (`jax.lax.map`). Attributors are pytrees: the numeric hyperparameters
(`noise_level`, `key`, `baseline`) are traced arguments of the compiled function, the counts are static.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Attributor", "VanillaGradient", "GradientXInput", "SmoothGrad", "IntegratedGradients"]


def _attributor(*data_fields: str, meta_fields: tuple = ()):
  """Makes a frozen dataclass a pytree: numeric hyperparameters are leaves, counts and options are static."""

  def wrap(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=list(data_fields), meta_fields=list(meta_fields))

  return wrap


def _check_count(owner: str, name: str, value, minimum: int = 1) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{owner}: {name} must be an int >= {minimum}; got {value!r}.")


def _check_batch_size(owner: str, batch_size) -> None:
  if batch_size is not None:
    _check_count(owner, "batch_size", batch_size)


def _map(fn: Callable, xs, batch_size: int | None):
  """`fn` over the leading axis of `xs`: one vmapped call, or chunks of `batch_size` (less memory)."""
  n = jax.tree_util.tree_leaves(xs)[0].shape[0]
  if batch_size is None or batch_size >= n:
    return jax.vmap(fn)(xs)
  return jax.lax.map(fn, xs, batch_size=batch_size)


class Attributor:
  """Base class of the attribution methods that `jaxlrp.attribute` accepts besides an LRP composite.

  A subclass implements `explain(forward, pullback, x) -> (output, attribution)`: `forward(x)` is the model
  output, and `pullback(x)` returns `(output, grad)` with `grad` the gradient of the explained score(s) with respect
  to `x`, with a leading axis of size K when K targets are explained (`[K, *x.shape]`). `jaxlrp.attribute`
  builds both from `f` and `target` and moves the K axis to position 1 afterwards.
  """

  def check(self, x) -> None:
    """Raises if the hyperparameters do not fit the input `x` (shapes only; called before compiling)."""

  def explain(self, forward: Callable, pullback: Callable, x) -> tuple[Any, Any]:  # pragma: no cover - abstract
    raise NotImplementedError


@_attributor()
class VanillaGradient(Attributor):
  r"""The gradient of the explained score with respect to the input, :math:`\partial s / \partial x`.

  A sensitivity, not a decomposition: it does not sum to the score. Named so because `jaxlrp.Gradient` is the LRP
  rule for single ops. Reference: Simonyan, Vedaldi & Zisserman 2014, "Deep inside convolutional networks".

  Example:
    >>> import jax.numpy as jnp, jaxlrp
    >>> w = jnp.array([[1.0, -1.0], [2.0, 0.5]])
    >>> jaxlrp.attribute(lambda x: x @ w, jnp.ones((1, 2)), jaxlrp.VanillaGradient(), target=1).relevance
    Array([[-1. ,  0.5]], dtype=float32)
  """

  def explain(self, forward, pullback, x):
    return pullback(x)


@_attributor()
class GradientXInput(Attributor):
  r"""Gradient times input, :math:`x \odot \partial s / \partial x`.

  For a linear model without bias it sums to the score; through ReLU networks it equals LRP-0 (the Zero rule
  everywhere). Reference: Shrikumar et al. 2016, "Not just a black box".

  Example:
    >>> import jax.numpy as jnp, jaxlrp
    >>> w = jnp.array([[1.0, -1.0], [2.0, 0.5]])
    >>> x = jnp.array([[1.0, 3.0]])
    >>> jaxlrp.attribute(lambda x: x @ w, x, jaxlrp.GradientXInput(), target=0).relevance  # sums to x @ w[:, 0] = 7
    Array([[1., 6.]], dtype=float32)
  """


  def explain(self, forward, pullback, x):
    out, grad = pullback(x)
    return out, x * grad


@_attributor("noise_level", "key", meta_fields=("samples", "batch_size"))
class SmoothGrad(Attributor):
  r"""The gradient averaged over `samples` noisy copies of the input (Smilkov et al. 2017, "SmoothGrad").

  .. math:: \hat g(x) = \frac{1}{n} \sum_{i=1}^{n} \nabla s(x + \epsilon_i), \qquad
            \epsilon_i \sim \mathcal N(0, \sigma_b^2), \quad \sigma_b = \text{noise\_level} \cdot
            (\max x_b - \min x_b)

  The noise level is relative to each sample's input range (the paper's sigma / (x_max - x_min); it recommends
  10-20 %). The noise is `sigma * jax.random.normal(key, (samples, *x.shape), x.dtype)` with `sigma` of shape
  `[B, 1, ...]`: the same key gives the same noise. All samples run in one vmapped call (memory: `samples` times a
  gradient's), or in chunks of `batch_size` samples.

  Args:
    noise_level: the noise standard deviation as a fraction of each sample's range `max(x_b) - min(x_b)`.
    samples: the number of noisy copies `n`.
    key: an int seed or a `jax.random.key`.
    batch_size: evaluate this many noisy copies at a time (`None`: all at once).

  Example:
    >>> import jax.numpy as jnp, jaxlrp
    >>> w = jnp.array([[1.0, -1.0], [2.0, 0.5]])
    >>> sg = jaxlrp.SmoothGrad(noise_level=0.2, samples=8, key=0)
    >>> jaxlrp.attribute(lambda x: x @ w, jnp.ones((1, 2)), sg, target=0).relevance  # linear: the gradient
    Array([[1., 2.]], dtype=float32)
  """

  noise_level: Any = 0.1
  samples: int = 50
  key: Any = 0
  batch_size: int | None = None

  def __post_init__(self):
    _check_count("SmoothGrad", "samples", self.samples)
    _check_batch_size("SmoothGrad", self.batch_size)
    if isinstance(self.noise_level, (int, float)) and self.noise_level < 0:
      raise ValueError(f"SmoothGrad: noise_level must be >= 0 (a fraction of the input range); "
                       f"got {self.noise_level}.")

  def prng_key(self):
    """The key as a typed `jax.random.key` (from an int seed, a typed key or a legacy uint32[2] key)."""
    key = jnp.asarray(self.key) if not isinstance(self.key, jax.Array) else self.key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
      return key
    if key.shape == (2,) and key.dtype == jnp.uint32:
      return jax.random.wrap_key_data(key)
    if key.shape == () and jnp.issubdtype(key.dtype, jnp.integer):
      return jax.random.key(key)
    raise TypeError(f"SmoothGrad: key must be an int seed or a jax.random.key; got {key.dtype}{list(key.shape)}.")

  def explain(self, forward, pullback, x):
    axes = tuple(range(1, x.ndim))
    span = jnp.max(x, axis=axes, keepdims=True) - jnp.min(x, axis=axes, keepdims=True)
    sigma = jnp.asarray(self.noise_level, x.dtype) * span
    noisy = x + sigma * jax.random.normal(self.prng_key(), (self.samples, *x.shape), x.dtype)
    grads = _map(lambda xx: pullback(xx)[1], noisy, self.batch_size)
    return forward(x), jnp.mean(grads, axis=0)


_QUADRATURES = ("midpoint", "trapezoid", "gauss_legendre")


def quadrature_nodes(steps: int, quadrature: str) -> tuple[np.ndarray, np.ndarray]:
  """Nodes `alpha` in [0, 1] and weights (summing to 1) of the rule that integrates over the path.

  `midpoint`: `steps` points `(k + 1/2) / steps`, weights `1 / steps` (error O(steps^-2)). `trapezoid`: `steps + 1`
  points `k / steps`, weights `1 / steps` with halves at both ends (error O(steps^-2); evaluates the baseline and the
  input). `gauss_legendre`: `steps` Gauss-Legendre points (exact for polynomials of degree < 2 steps along the path).

  Example:
    >>> from jaxlrp._attributors import quadrature_nodes
    >>> quadrature_nodes(2, "trapezoid")
    (array([0. , 0.5, 1. ]), array([0.25, 0.5 , 0.25]))
  """
  if quadrature == "midpoint":
    return (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
  if quadrature == "trapezoid":
    weights = np.full(steps + 1, 1.0 / steps)
    weights[[0, -1]] /= 2
    return np.arange(steps + 1) / steps, weights
  if quadrature == "gauss_legendre":
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return (nodes + 1) / 2, weights / 2
  raise ValueError(f"quadrature must be one of {_QUADRATURES}; got {quadrature!r}.")


@_attributor("baseline", meta_fields=("steps", "quadrature", "batch_size"))
class IntegratedGradients(Attributor):
  r"""Integrated Gradients (Sundararajan, Taly & Yan 2017, "Axiomatic attribution for deep networks").

  .. math:: \mathrm{IG}(x) = (x - \bar x) \odot \int_0^1 \nabla s(\bar x + \alpha (x - \bar x))\, d\alpha
            \approx (x - \bar x) \odot \sum_k w_k \nabla s(\bar x + \alpha_k (x - \bar x))

  with baseline :math:`\bar x`. Completeness: the attributions of a sample sum to :math:`s(x) - s(\bar x)` up to
  the quadrature error. The nodes and weights are those of `quadrature` (`quadrature_nodes`: "midpoint" Riemann sum,
  "trapezoid" or "gauss_legendre"). All steps run in one vmapped call (memory: about `steps` times a gradient's),
  or in chunks of `batch_size` steps.

  Args:
    baseline: a scalar or an array broadcastable to `x` (e.g. a black image, a blurred input, per-sample baselines).
    steps: the number of subintervals (`midpoint`, `trapezoid`, which evaluates `steps + 1` points) or of
      Gauss-Legendre nodes.
    quadrature: "midpoint", "trapezoid" or "gauss_legendre".
    batch_size: evaluate this many path points at a time (`None`: all at once).

  Example:
    >>> import jax.numpy as jnp, jaxlrp
    >>> f = lambda x: jnp.stack([(x ** 2).sum(1), x.sum(1)], axis=1)
    >>> ig = jaxlrp.IntegratedGradients(steps=4)
    >>> jaxlrp.attribute(f, jnp.array([[1.0, 2.0]]), ig, target=0).relevance  # x_i^2: exact for a quadratic
    Array([[1., 4.]], dtype=float32)
  """

  baseline: Any = 0.0
  steps: int = 64
  quadrature: str = "midpoint"
  batch_size: int | None = None

  def __post_init__(self):
    _check_count("IntegratedGradients", "steps", self.steps)
    _check_batch_size("IntegratedGradients", self.batch_size)
    if self.quadrature not in _QUADRATURES:
      raise ValueError(f"IntegratedGradients: quadrature must be one of {_QUADRATURES}; got {self.quadrature!r}.")

  def check(self, x) -> None:
    shape = np.shape(self.baseline)
    try:
      ok = np.broadcast_shapes(shape, np.shape(x)) == np.shape(x)
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f"IntegratedGradients: the baseline (shape {shape}) must be a scalar or broadcast to the "
                       f"input's shape {np.shape(x)}.")

  def explain(self, forward, pullback, x):
    alphas, weights = quadrature_nodes(self.steps, self.quadrature)
    baseline = jnp.broadcast_to(jnp.asarray(self.baseline, x.dtype), x.shape)
    delta = x - baseline
    alphas = jnp.asarray(alphas, x.dtype).reshape((-1,) + (1,) * x.ndim)
    grads = _map(lambda xx: pullback(xx)[1], baseline + alphas * delta, self.batch_size)
    return forward(x), delta * jnp.tensordot(jnp.asarray(weights, grads.dtype), grads, axes=1)
