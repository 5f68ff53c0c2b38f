"""Explanation quality metrics, compiled: perturbation curves, faithfulness, randomisation checks, complexity and
localisation.

Every metric returns one value (or one curve) per sample as a JAX array. Each call runs as one `jax.jit`-compiled
program: all perturbation steps, random subsets or randomisation stages are evaluated in one vmapped model call (or
in `jax.lax.map` chunks of `chunk_size` copies), never in a Python loop per step. The programs are
cached by the traced model (its jaxpr) and the static options, so a fresh `lambda` around the same model reuses the
compiled executable, and the arrays a model closes over are passed to it as arguments rather than embedded. The
model is traced on every call (milliseconds for a Flax model); to call a metric many times, e.g. per batch of a
data set, wrap the call in `jax.jit` (`jax.jit(lambda p, x, r, t: metrics.aopc(f, x, r, t, params=p))`), which
traces it once.

Conventions:

- Inputs `x` are `[B, D]` (tabular) or channels-last `[B, *spatial, C]` (images `[B, H, W, C]`, sequences
  `[B, T, C]`). Relevance has the shape of `x`, or `x.shape[:-1]` (a map without the channel axis).
- Perturbation metrics act on regions: `patch x patch` blocks of the spatial axes, across all channels (`patch=1`:
  single pixels, or single features of `[B, D]` inputs). A region's relevance is the sum over its elements. Regions
  are numbered row-major over the grid of `ceil(H / patch) x ceil(W / patch)` blocks (edge blocks may be smaller).
- The model is `model(x) -> [B, classes]`, or `model(params, x)` when `params=` is given (as in `jaxlrp.attribute`).
  `output_fn` (e.g. `jax.nn.softmax`) maps the model output before the target's score is read.
  `target` is an int or an int array `[B]`.
- Randomness only comes from explicit `key` arguments (`jax.random.key`).
- The metrics are traceable: `jax.vmap` over a leading axis of candidate relevance maps scores K candidates in one
  call, e.g. `jax.vmap(lambda r: metrics.aopc(f, x, r, t, steps=16))(rs)` for `rs` of shape `[K, B, ...]`.

Perturbation baselines (`baseline=`): the value a removed region is set to.

- `"zeros"`: 0.
- `"mean"`: each sample's mean over all its elements (one scalar per sample).
- `"blur"`: the sample blurred by a Gaussian of standard deviation `blur_sigma` pixels over the spatial axes (kernel
  radius `int(3 sigma + 0.5)`, edges repeated: `scipy.ndimage.gaussian_filter(..., mode="nearest", truncate=3)`).
- `"uniform"`: uniform noise, one draw per element of each sample, fixed across the steps (needs `key`), in
  `uniform_range=(low, high)`, by default each sample's own `[min, max]`.
- a number, or an array broadcastable to `x` (e.g. a data-set mean `x_train.mean(0)`).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxlrp import metrics
  >>> f = lambda x: jnp.stack([x.sum(-1), -x.sum(-1)], axis=-1)   # class 0 scores the sum of the features
  >>> x = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  >>> metrics.perturbation_curve(f, x, x, 0)                      # most relevant first, set to 0
  Array([[10.,  6.,  3.,  1.,  0.]], dtype=float32)
  >>> metrics.aopc(f, x, x, 0), metrics.aopc(f, x, -x, 0)         # the true ranking beats the reversed one
  (Array([6.], dtype=float32), Array([4.], dtype=float32))
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlrp import _incremental, _jax
from jaxlrp._core import with_array_params

__all__ = [
  "perturbation_curve", "aopc", "selectivity", "aopc_from_curve", "auc_from_curve", "faithfulness_correlation",
  "mprt", "MPRTResult", "random_logit", "pearson", "spearman", "cosine", "gini", "entropy",
  "relevance_mass", "relevance_rank", "pointing_game",
]

Similarity = str | Callable[[jax.Array, jax.Array], jax.Array]

_ORDERS = ("morf", "lerf", "random")
_BASELINES = ("zeros", "mean", "blur", "uniform")


# ---- compiled programs ---------------------------------------------------------------------------------------------

_COMPILED: collections.OrderedDict = collections.OrderedDict()


def _compiled(key, build: Callable[[], Callable]) -> Callable:
  """The jitted function cached under `key` (built by `build()` on a miss); keeps the 32 most recent."""
  fn = _COMPILED.get(key)
  if fn is None:
    fn = _COMPILED[key] = jax.jit(build())
    while len(_COMPILED) > 32:
      _COMPILED.popitem(last=False)
  _COMPILED.move_to_end(key)
  return fn


class _Traced(NamedTuple):
  """A user function traced at example arguments: `bind(consts)(*args)` evaluates it with its closed-over arrays
  `consts` (passed to the compiled program as arguments); `key` identifies the program."""

  key: tuple
  consts: list
  bind: Callable
  out_tree: Any = None  # of the function's output


def _trace(fn: Callable, *args, closed_out: list | None = None) -> _Traced:
  """Traces `fn`; `closed_out`, if given, receives the ClosedJaxpr (not kept in `_Traced`, which the cached compiled
  function holds on to: it would keep the first call's constants alive)."""
  closed, out_tree = _jax.make_jaxpr(fn, *args)
  if closed_out is not None:
    closed_out.append(closed)
  jaxpr = closed.jaxpr

  def bind(consts):
    flat = _jax.jaxpr_as_fun(jaxpr, consts)
    return lambda *a: jax.tree_util.tree_unflatten(out_tree, flat(*jax.tree_util.tree_leaves(a)))

  key = (str(jaxpr), str(out_tree), str(jax.tree_util.tree_structure(args)))
  return _Traced(key, list(closed.consts), bind, out_tree)


def _static_key(fn):
  """`fn` as part of a cache key: itself where hashable, else its identity. An id is safe here: the compiled
  program cached under the key closes over `fn`, so `fn` lives, and keeps its id, as long as the key does."""
  try:
    hash(fn)
    return fn
  except TypeError:
    return ("id", id(fn))


# On a CPU, evaluating all perturbed copies of a batch in one call is slower than in chunks once the copies' values
# outgrow the caches: the quickstart CNN on digits (batch 128, 65 copies, largest value per copy 128 x 8 x 8 x 32)
# took 52 ms one copy per call, 81 ms 16 per call and 165 ms all at once; the MLP 64-64-10 (largest value 128 x 64)
# 0.8 ms 16 per call and 1.3 ms one per call. About this many elements of the model's largest value per call did
# best for both. Accelerators take everything at once.
_CPU_ELEMENTS_PER_CALL = 2 ** 17


def _auto_chunk(chunk_size: int | None, elements_per_copy: int) -> int | None:
  """`chunk_size`, or by default: all copies at once on an accelerator, ~2^17 elements per call on a CPU."""
  if chunk_size is not None:
    return chunk_size
  if jax.default_backend() != "cpu":
    return None
  return max(1, _CPU_ELEMENTS_PER_CALL // max(1, elements_per_copy))


def _largest_value(closed, x) -> int:
  """Elements of the largest value the traced model computes for one copy of the batch (at least x's)."""
  try:
    avals = _jax.flatten_program(closed).avals.values()
  except Exception:  # noqa: BLE001 - an exotic program: size the chunks by x alone
    return x.size
  return max([x.size] + [math.prod(a.shape) for a in avals if hasattr(a, "shape")])


def _map(fn: Callable, xs, chunk_size: int | None):
  """`fn` over the leading axis of `xs`: one vmap, or `lax.map` over chunks of `chunk_size`."""
  n = jax.tree_util.tree_leaves(xs)[0].shape[0]
  if chunk_size is None or chunk_size >= n:
    return jax.vmap(fn)(xs)
  return jax.lax.map(fn, xs, batch_size=chunk_size)


# ---- argument checks -----------------------------------------------------------------------------------------------

def _check_positive_int(name: str, value, allow_none: bool = True) -> None:
  if value is None and allow_none:
    return
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be {'None or ' if allow_none else ''}an int >= 1; got {value!r}.")


def _check_input(x, relevance, name: str) -> tuple[jax.Array, jax.Array]:
  x, relevance = jnp.asarray(x), jnp.asarray(relevance)
  if x.ndim < 2:
    raise ValueError(f"{name}: x must be batched, [B, D] or [B, *spatial, C]; got shape {x.shape}.")
  if relevance.shape != x.shape and not (x.ndim >= 3 and relevance.shape == x.shape[:-1]):
    allowed = f"{x.shape}" + (f" or {x.shape[:-1]} (without channels)" if x.ndim >= 3 else "")
    raise ValueError(f"{name}: relevance must have the shape of x, {allowed}; got {relevance.shape}.")
  return x, relevance


def _targets(target, batch: int):
  """The checked target, `[B]` int32 (host values stay on the host: no eager device op per call)."""
  if not isinstance(target, jax.Array):
    target = np.asarray(target)
  if not jnp.issubdtype(target.dtype, jnp.integer) or target.ndim > 1 or target.size not in (1, batch):
    raise ValueError(f"target must be an int or an int array [B] with B = {batch}; got {target.dtype} of shape "
                     f"{target.shape}.")
  if isinstance(target, jax.Array):
    return target  # broadcast inside the compiled program (_batch_targets)
  return np.broadcast_to(target.astype(np.int32), (batch,))


def _batch_targets(target, batch: int):
  return jnp.broadcast_to(jnp.asarray(target).astype(jnp.int32), (batch,))


def _pick(out, target):
  """`out[b, target[b]]` for a `[B, C]` output."""
  if out.ndim != 2:
    raise ValueError(f"the model must return [B, classes]; got an output of shape {out.shape}.")
  return jnp.take_along_axis(out, target[:, None], axis=1)[:, 0]


def _draw(sampler: Callable, key, shape: tuple[int, ...], dtype=jnp.float32):
  """`sampler(key, shape)` drawn flat and reshaped: XLA on CPU compiles a multi-dimensional threefry draw many
  times slower (seconds) than a flat one."""
  return sampler(key, (math.prod(shape),), dtype).reshape(shape)


@functools.cache
def _unused_key():
  with jax.ensure_compile_time_eval():  # a concrete key even when first asked for inside a trace
    return jax.random.key(0)


def _key_or_dummy(key, needed: bool, why: str):
  if key is None:
    if needed:
      raise ValueError(f"{why} needs a PRNG key: pass key=jax.random.key(seed).")
    return _unused_key()  # a placeholder argument, never drawn from
  return key


# ---- regions -------------------------------------------------------------------------------------------------------

def _region_ids(shape: tuple[int, ...], patch: int) -> tuple[np.ndarray, int]:
  """Region index of each element of one sample of shape `shape` (`[D]` or `[*spatial, C]`), and their number."""
  if len(shape) == 1:
    return np.arange(shape[0]) // patch, math.ceil(shape[0] / patch)
  spatial = shape[:-1]
  grid = tuple(math.ceil(s / patch) for s in spatial)
  blocks = np.meshgrid(*[np.arange(s) // patch for s in spatial], indexing="ij")
  pixel = np.ravel_multi_index(tuple(blocks), grid)
  return np.broadcast_to(pixel[..., None], shape), math.prod(grid)


def _region_relevance(relevance, x_shape: tuple[int, ...], patch: int, n: int):
  """`[B, n]`: relevance summed over each region (float32)."""
  ids, _ = _region_ids(x_shape, patch)
  if relevance.ndim != len(x_shape) + 1:  # a map without the channel axis
    ids = ids[..., 0]
  flat = relevance.reshape(relevance.shape[0], -1).astype(jnp.float32)
  return jax.vmap(lambda r: jax.ops.segment_sum(r, ids.reshape(-1), num_segments=n))(flat)


# Up to this many regions per sample, their positions in the removal order are counted by pairwise comparison
# ([B, n, n] booleans) instead of sorted: XLA's CPU sort took ~1 ms for 128 x 64 features, the MLP's whole forward
# over all 65 copies about as long.
_PAIRWISE_RANK_MAX = 256
# Above that and up to this many, a CPU sorts with a bitonic network of elementwise passes: 3x faster than XLA's
# CPU sort for 128 x 256-4096 keys (6 vs 18 ms for 1024), slower for 8 x 50176.
_BITONIC_MAX = 8192


def _order_keys(scores, order: str, key):
  """Keys whose ascending order is the removal order."""
  if order == "morf":
    return -scores
  if order == "lerf":
    return scores
  return _draw(jax.random.uniform, key, scores.shape)


def _pairwise_rank(keys):
  """Each key's position in the stable ascending order, by comparing all pairs (ties: lower index first)."""
  n = keys.shape[-1]
  earlier = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]  # [i, j]: j < i
  a, b = keys[..., :, None], keys[..., None, :]  # region i against region j
  return jnp.sum((b < a) | ((b == a) & earlier), axis=-1, dtype=jnp.int32)


def _bitonic_argsort(keys):
  """Stable ascending argsort along the last axis (ties: lower index first; -0.0 ties 0.0, as `<` sees them) by a
  bitonic sorting network over (key, index) pairs, padded to a power of two with +inf."""
  n = keys.shape[-1]
  size = 1 << max(0, (n - 1).bit_length())
  lead = keys.shape[:-1]
  k = jnp.concatenate([keys, jnp.full(lead + (size - n,), jnp.inf, keys.dtype)], -1) if size > n else keys
  i = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), k.shape)
  position = np.arange(size)
  span = 2
  while span <= size:  # merge bitonic runs of `span`, comparing elements `half` apart
    half = span // 2
    while half >= 1:
      pairs = lead + (size // (2 * half), 2, half)
      kr, ir = k.reshape(pairs), i.reshape(pairs)
      ka, kb, ia, ib = kr[..., 0, :], kr[..., 1, :], ir[..., 0, :], ir[..., 1, :]
      a_first = (ka < kb) | ((ka == kb) & (ia < ib))
      ascending = (position.reshape(pairs[len(lead):])[:, 0, :] & span) == 0
      keep = a_first == ascending
      k = jnp.stack([jnp.where(keep, ka, kb), jnp.where(keep, kb, ka)], -2).reshape(k.shape)
      i = jnp.stack([jnp.where(keep, ia, ib), jnp.where(keep, ib, ia)], -2).reshape(i.shape)
      half //= 2
    span *= 2
  return i[..., :n]


def _argsort(keys):
  n = keys.shape[-1]
  if jax.default_backend() == "cpu" and n <= _BITONIC_MAX:
    return _bitonic_argsort(keys)
  return jnp.argsort(keys, axis=-1, stable=True)


def _rank(scores, order: str, key):
  """Position of each region in the removal order, `[B, n]` (0 = removed first). Ties: lower index first."""
  keys = _order_keys(scores, order, key)
  if keys.shape[-1] > _PAIRWISE_RANK_MAX:
    return _inverse_permutation(_argsort(keys))
  return _pairwise_rank(keys)


def _removal_order(scores, order: str, key):
  """The regions in removal order, `[B, n]` (the inverse permutation of `_rank`)."""
  keys = _order_keys(scores, order, key)
  if keys.shape[-1] > _PAIRWISE_RANK_MAX:
    return _argsort(keys)
  return _inverse_permutation(_pairwise_rank(keys))


def _inverse_permutation(p):
  """`q` with `q[..., p[..., k]] = k` (a scatter, not a second sort)."""
  positions = jnp.broadcast_to(jnp.arange(p.shape[-1], dtype=p.dtype), p.shape)
  flat_p, flat_pos = p.reshape(-1, p.shape[-1]), positions.reshape(-1, p.shape[-1])
  inverse = jax.vmap(lambda row, pos: jnp.zeros_like(row).at[row].set(pos, unique_indices=True))(flat_p, flat_pos)
  return inverse.reshape(p.shape)


def _schedule(n: int, steps: int | None, per_step: int | None) -> np.ndarray:
  """Number of regions removed at each step k = 0..steps."""
  _check_positive_int("steps", steps)
  _check_positive_int("per_step", per_step)
  if per_step is None and steps is None:
    per_step = 1
  if per_step is not None:
    steps = math.ceil(n / per_step) if steps is None else steps
    return np.minimum(np.arange(steps + 1) * per_step, n).astype(np.int32)
  return (np.arange(steps + 1) * n // steps).astype(np.int32)


# ---- baselines -----------------------------------------------------------------------------------------------------

def _gaussian_blur(x, sigma: float):
  """Separable Gaussian blur over the spatial axes of `[B, *spatial, C]`, edge padding (scipy's mode="nearest")."""
  radius = int(3.0 * sigma + 0.5)
  if radius == 0:
    return x
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  kernel = np.exp(-0.5 * (t / sigma) ** 2)
  kernel = (kernel / kernel.sum()).astype(np.float32)
  for axis in range(1, x.ndim - 1):
    size = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad, mode="edge")
    x = sum(float(w) * jax.lax.slice_in_dim(padded, j, j + size, axis=axis) for j, w in enumerate(kernel))
  return x


class _BaselineSpec(NamedTuple):
  kind: str            # "zeros" | "mean" | "blur" | "uniform" | "value"
  blur_sigma: float
  has_range: bool


def _baseline_spec(baseline, x, blur_sigma, uniform_range, key) -> tuple[_BaselineSpec, Any, Any]:
  """Static description plus the array arguments (the value, the uniform range) of a baseline."""
  value = None
  if isinstance(baseline, str):
    if baseline not in _BASELINES:
      raise ValueError(f"baseline must be one of {_BASELINES}, a number or an array; got {baseline!r}.")
    kind = baseline
    if kind == "blur" and x.ndim < 3:
      raise ValueError(f"baseline='blur' needs spatial axes, x of shape [B, *spatial, C]; got {x.shape}. Use "
                       f"'mean', 'zeros', 'uniform' or a value for [B, D] inputs.")
    if kind == "uniform" and key is None:
      raise ValueError("baseline='uniform' needs a PRNG key: pass key=jax.random.key(seed).")
  else:
    kind = "value"
    value = jnp.asarray(baseline, x.dtype)
    try:
      jnp.broadcast_shapes(value.shape, x.shape)
    except ValueError:
      raise ValueError(f"a baseline array must broadcast to x's shape {x.shape}; got {value.shape}.") from None
  if not (isinstance(blur_sigma, (int, float)) and blur_sigma >= 0):
    raise ValueError(f"blur_sigma must be a number >= 0; got {blur_sigma!r}.")
  urange = None if uniform_range is None else jnp.asarray(uniform_range, x.dtype)
  if urange is not None and urange.shape != (2,):
    raise ValueError(f"uniform_range must be (low, high); got {uniform_range!r}.")
  return _BaselineSpec(kind, float(blur_sigma), urange is not None), value, urange


def _baseline_values(spec: _BaselineSpec, x, key, value, urange):
  """The baseline, broadcastable to `x`."""
  axes = tuple(range(1, x.ndim))
  if spec.kind == "zeros":
    return jnp.zeros((), x.dtype)
  if spec.kind == "mean":
    return x.mean(axis=axes, keepdims=True)
  if spec.kind == "blur":
    return _gaussian_blur(x, spec.blur_sigma)
  if spec.kind == "uniform":
    if spec.has_range:
      low, high = urange[0], urange[1]
    else:
      low, high = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
    return low + (high - low) * _draw(jax.random.uniform, key, x.shape, x.dtype)
  return value


# ---- perturbation curves -------------------------------------------------------------------------------------------

class _CurveSpec(NamedTuple):
  order: str
  patch: int
  n_regions: int
  baseline: _BaselineSpec
  chunk_size: int | None  # as given: None picks per path (`_auto_chunk`)
  incremental: bool | None
  schedule: tuple  # regions removed after each step k = 0..S


# Traces of model functions, reused for an equal function at the same argument types (as `jax.jit` reuses its
# traces): re-tracing a flax model costs about a millisecond per call, more than a small model's whole curve.
_TRACES: collections.OrderedDict = collections.OrderedDict()


def _trace_key(model, output_fn, params, x):
  """The cache key of a model's trace, or None where a cached trace could go stale or leak: an unhashable function,
  or arguments that are tracers (a trace under an outer transformation is a one-time cost anyway)."""
  leaves = jax.tree_util.tree_leaves((params, x))
  if any(isinstance(v, jax.core.Tracer) for v in leaves):
    return None
  try:
    key = ("model", model, output_fn, params is None, jax.tree_util.tree_structure((params, x)),
           tuple(jax.typeof(v) for v in leaves))  # shape, dtype, weak type and (explicit) sharding
    hash(key)
  except TypeError:
    return None
  return key


def _model_program(model, output_fn, params, x, closed_out: list | None = None) -> _Traced:
  """The traced `model` (with `output_fn`), cached when the function is hashable and closes over no arrays.

  A function that closes over arrays (a lambda over a parameter dict, an nnx or Equinox module holding its weights)
  is traced on every call, so that a change to those arrays is always seen."""
  key = _trace_key(model, output_fn, params, x)
  hit = _TRACES.get(key) if key is not None else None
  if hit is not None:
    _TRACES.move_to_end(key)
    traced, closed = hit
  else:
    if params is None:
      fn = (lambda p, xx: model(xx)) if output_fn is None else (lambda p, xx: output_fn(model(xx)))
    else:
      fn = model if output_fn is None else (lambda p, xx: output_fn(model(p, xx)))
    found: list = []
    traced = _trace(fn, params, x, closed_out=found)
    closed = found[0]
    if key is not None and not traced.consts:
      _TRACES[key] = (traced, closed)
      while len(_TRACES) > 32:
        _TRACES.popitem(last=False)
  if closed_out is not None:
    closed_out.append(closed)
  return traced


def _incremental_pays(steps_plus_one: int, split: _incremental.FirstDense) -> bool:
  """By default the first layer is evaluated incrementally when there are enough copies to pay for it.

  The incremental path gathers the removed elements' weight rows once (about one first-layer forward in all) and
  scans over blocks of steps; the plain path runs one first-layer matrix product per copy. Measured in `jax.jit` on
  a 2-core CPU (MLPs D-64-10, batch 128, plain vs incremental): D = 64: 17 copies 0.45 vs 0.96 ms, 65 copies 1.31
  vs 1.26 ms; D = 1024: 17 copies 11.7 vs 10.5 ms, 1025 copies 161 vs 17 ms. This takes the incremental path
  from max(16, 4096 / D) copies on.
  """
  return steps_plus_one >= max(16, 4096 // max(1, math.prod(split.lhs_shape[1:])))


def _curve_impl(spec: _CurveSpec, traced: _Traced, split: _incremental.FirstDense | None, largest: int, consts,
                params, x, relevance, target, key, value, urange):
  model = traced.bind(consts)
  target = _batch_targets(target, x.shape[0])
  counts = np.asarray(spec.schedule, np.int32)
  k_order, k_noise = jax.random.split(key)
  ids, _ = _region_ids(x.shape[1:], spec.patch)
  scores = _region_relevance(relevance, x.shape[1:], spec.patch, spec.n_regions)
  base = _baseline_values(spec.baseline, x, k_noise, value, urange)
  if split is not None and (spec.incremental or _incremental_pays(len(counts), split)):
    return _incremental_curve(spec, split, traced, consts, params, x, ids, _removal_order(scores, spec.order, k_order),
                              base, target, counts)
  rank = _rank(scores, spec.order, k_order)
  rank_x = jnp.take(rank, ids, axis=1)  # [B, *x.shape[1:]]: when each element is removed

  def score_after(count):
    return _pick(model(params, jnp.where(rank_x < count, base, x)), target)

  return _map(score_after, jnp.asarray(counts), _auto_chunk(spec.chunk_size, largest)).T


def _incremental_curve(spec: _CurveSpec, split: _incremental.FirstDense, traced: _Traced, consts, params, x, ids,
                       sequence, base, target, counts):
  """`_curve_impl`'s curve with the first dense layer evaluated once for all copies (`jaxlrp._incremental`)."""
  leaves = jax.tree_util.tree_leaves(params)
  members = _incremental.region_members(ids.reshape(-1), sequence.shape[-1])  # [n, m], padded with -1

  def score(z):
    return _pick(jax.tree_util.tree_unflatten(traced.out_tree, split.rest(consts, leaves, z)), target)

  # steps per scan block: by default about 2^17 gathered weight elements (the block's working set stays in cache)
  width = _incremental.step_table(counts).shape[1] * members.shape[1] * math.prod(split.out_aval.shape)
  block = min(len(counts) - 1, _auto_chunk(spec.chunk_size, width) or len(counts))
  return _incremental.curve(split, split.weight(consts, leaves), x, base, sequence, members, counts, score,
                            max(1, block))


def perturbation_curve(model: Callable, x, relevance, target, *, params=None, order: str = "morf", patch: int = 1,
                       steps: int | None = None, per_step: int | None = None, baseline="zeros", key=None,
                       output_fn: Callable | None = None, blur_sigma: float = 1.0,
                       uniform_range: tuple[float, float] | None = None, chunk_size: int | None = None,
                       incremental: bool | None = None) -> jax.Array:
  """Pixel flipping / region perturbation: the target's score as regions are removed in order of relevance.

  Regions (single pixels or features for `patch=1`, `patch x patch` blocks otherwise) are ranked by their summed
  relevance and replaced by the baseline cumulatively, `n_k` regions after step k:

  .. math::
      c_k = g\\big(f(x^{(k)})\\big)_t, \\qquad x^{(k)}_i = \\begin{cases} b_i & \\text{region}(i) \\in
      \\text{first } n_k \\text{ regions of the order} \\\\ x_i & \\text{otherwise} \\end{cases}

  with `g = output_fn` (identity by default), `c_0` the unperturbed score. Orders: `"morf"` (most relevant first,
  Bach et al. 2015; Samek et al. 2017), `"lerf"` (least relevant first), `"random"` (a uniformly random order per
  sample from `key`: the reference curve). Equal relevance: the lower region index goes first.

  Schedule, with n the number of regions: `per_step` alone (default 1) removes `per_step` regions per step until
  all are gone (`steps = ceil(n / per_step)`); `steps` alone spreads the removal evenly, `n_k = floor(k n / steps)`
  (ending with all removed); both give a partial curve of `steps` steps of `per_step` regions.

  References:
    Bach et al. 2015, "On pixel-wise explanations for non-linear classifier decisions by layer-wise relevance
    propagation", PLOS ONE. Samek et al. 2017, "Evaluating the visualization of what a deep neural network has
    learned", IEEE TNNLS.

  Args:
    model: `model(x) -> [B, classes]`, or `model(params, x)` when `params` is given.
    x: inputs `[B, D]` or `[B, *spatial, C]`.
    relevance: like `x`, or `x.shape[:-1]` for a map without channels.
    target: int or int array `[B]`: the class whose score is tracked.
    params: optional first argument of `model`.
    order: `"morf"`, `"lerf"` or `"random"` (needs `key`).
    patch: region side length in elements of the spatial axes (1: pixel flipping).
    steps: number of steps (see the schedule).
    per_step: regions removed per step (see the schedule).
    baseline: `"zeros"`, `"mean"`, `"blur"`, `"uniform"` (needs `key`), a number or an array broadcastable to `x`
      (see the module docstring).
    key: PRNG key for `order="random"` and `baseline="uniform"` (split between the two).
    output_fn: applied to the model output before the target's score is read, e.g. `jax.nn.softmax`.
    blur_sigma: Gaussian standard deviation in pixels for `baseline="blur"`.
    uniform_range: `(low, high)` for `baseline="uniform"`; default: each sample's `[min, max]`.
    chunk_size: evaluate this many steps (perturbed copies of the batch) per model call, in a `jax.lax.map` over
      chunks (bounded memory). `None` (default): all `steps + 1` copies in one vmapped call on an accelerator;
      on a CPU, chunks of about 2^17 elements of the model's largest value (faster there once the copies outgrow
      the caches). With the incremental first layer: steps per scan block (default on a CPU: about 2^17 gathered
      weights per block).
    incremental: evaluate the first dense layer incrementally when the input feeds only it (exact): for a model
      whose input reaches one `dot_general` through reshapes or casts only (an MLP on `[B, D]`,
      `x.reshape(B, -1) @ W` on images), the copies' pre-activations are `z_0` plus running sums of
      `(b_i - x_i) W[i, :]` in removal order, one first-layer pass instead of `steps + 1`, and only the layers after
      it run per copy. `None` (default): where that pays, from `max(16, 4096 / D)` copies on (e.g. all 1024 steps
      of one feature of D = 1024: 9x faster on a CPU); `True`: always where the model allows it; `False`: never.
      A convolution first, or an input used twice, runs every copy through the whole model.

  Returns:
    `[B, steps + 1]`: the score before (column 0) and after each step.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxlrp import metrics
    >>> f = lambda x: x.reshape(x.shape[0], -1).sum(-1, keepdims=True)   # one class: the sum of the pixels
    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> metrics.perturbation_curve(f, x, x, 0, patch=2)                  # 2x2 blocks, most relevant first
    Array([[120.,  70.,  28.,  10.,   0.]], dtype=float32)
    >>> metrics.perturbation_curve(f, x, x, 0, order="lerf", steps=2, baseline=1.0)
    Array([[120., 100.,  16.]], dtype=float32)
  """
  x, relevance = _check_input(x, relevance, "perturbation_curve")
  if order not in _ORDERS:
    raise ValueError(f"order must be one of {_ORDERS}; got {order!r}.")
  _check_positive_int("patch", patch, allow_none=False)
  _check_positive_int("chunk_size", chunk_size)
  _, n = _region_ids(x.shape[1:], patch)
  counts = _schedule(n, steps, per_step)
  base_spec, value, urange = _baseline_spec(baseline, x, blur_sigma, uniform_range, key)
  key = _key_or_dummy(key, order == "random", "order='random'")
  target = _targets(target, x.shape[0])
  model, params = with_array_params(model, params)  # an Equinox module passed whole
  closed: list = []
  traced = _model_program(model, output_fn, params, x, closed_out=closed)
  spec = _CurveSpec(order, int(patch), n, base_spec, chunk_size, None if incremental is None else bool(incremental),
                    tuple(int(c) for c in counts))

  def build():  # on a cache miss only: derived from the traced program, which the key identifies
    split = _incremental.first_dense(closed[0]) if spec.incremental is not False else None
    largest = _largest_value(closed[0], x)
    return lambda *a: _curve_impl(spec, traced, split, largest, *a)

  fn = _compiled(("curve", spec, traced.key), build)
  return fn(traced.consts, params, x, relevance, target, key, value, urange)


@jax.jit
def aopc_from_curve(curve) -> jax.Array:
  """Area over the perturbation curve (Samek et al. 2017): the mean score drop over the steps k = 0..L.

  .. math::
      \\mathrm{AOPC} = \\frac{1}{L + 1} \\sum_{k=0}^{L} \\big(c_0 - c_k\\big)

  Higher is better for a MoRF curve (the score falls fast); for a LeRF curve lower is better.

  Args:
    curve: `[..., L + 1]`, e.g. from `perturbation_curve`.

  Returns:
    `[...]`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxlrp import metrics
    >>> metrics.aopc_from_curve(jnp.array([[10.0, 6.0, 3.0, 1.0, 0.0]]))   # (0 + 4 + 7 + 9 + 10) / 5
    Array([6.], dtype=float32)
  """
  curve = jnp.asarray(curve)
  return jnp.mean(curve[..., :1] - curve, axis=-1)


@jax.jit
def auc_from_curve(curve) -> jax.Array:
  """Area under the perturbation curve, trapezoidal, over the step axis scaled to [0, 1].

  .. math::
      \\mathrm{AUC} = \\frac{1}{L} \\sum_{k=0}^{L-1} \\frac{c_k + c_{k+1}}{2}

  Args:
    curve: `[..., L + 1]` with `L >= 1`.

  Returns:
    `[...]`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxlrp import metrics
    >>> metrics.auc_from_curve(jnp.array([[10.0, 6.0, 3.0, 1.0, 0.0]]))   # (8 + 4.5 + 2 + 0.5) / 4
    Array([3.75], dtype=float32)
  """
  curve = jnp.asarray(curve)
  if curve.shape[-1] < 2:
    raise ValueError(f"auc_from_curve needs at least two points; got a curve of shape {curve.shape}.")
  return jnp.mean(0.5 * (curve[..., 1:] + curve[..., :-1]), axis=-1)


def aopc(model: Callable, x, relevance, target, **curve_options) -> jax.Array:
  """AOPC (Samek et al. 2017) of a perturbation curve: `aopc_from_curve(perturbation_curve(...))`.

  .. math::
      \\mathrm{AOPC} = \\frac{1}{L + 1} \\sum_{k=0}^{L} \\big(c_0 - c_k\\big)

  With the default `order="morf"` higher is better: removing the most relevant regions first should destroy the
  score fastest.

  References:
    Samek et al. 2017, "Evaluating the visualization of what a deep neural network has learned", IEEE TNNLS.

  Args:
    model, x, relevance, target: as in `perturbation_curve`.
    **curve_options: any keyword of `perturbation_curve` (`params`, `order`, `patch`, `steps`, `per_step`,
      `baseline`, `key`, `output_fn`, ...).

  Returns:
    `[B]`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxlrp import metrics
    >>> f = lambda x: x.sum(-1, keepdims=True)
    >>> x = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    >>> metrics.aopc(f, x, x, 0), metrics.aopc(f, x, x, 0, order="lerf")
    (Array([6.], dtype=float32), Array([4.], dtype=float32))
  """
  return aopc_from_curve(perturbation_curve(model, x, relevance, target, **curve_options))


def selectivity(model: Callable, x, relevance, target, **curve_options) -> jax.Array:
  """Selectivity (Montavon et al. 2018): area under the curve of removing the most relevant regions first.

  `auc_from_curve(perturbation_curve(..., order="morf"))`: the score after each step, trapezoidal over the steps
  scaled to [0, 1]. Lower is better (a sharp drop).

  .. math::
      \\mathrm{AUC} = \\frac{1}{L} \\sum_{k=0}^{L-1} \\frac{c_k + c_{k+1}}{2}

  References:
    Montavon, Samek and Mueller 2018, "Methods for interpreting and understanding deep neural networks", Digital
    Signal Processing.

  Args:
    model, x, relevance, target: as in `perturbation_curve`.
    **curve_options: keywords of `perturbation_curve` (`order` defaults to `"morf"`).

  Returns:
    `[B]`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxlrp import metrics
    >>> f = lambda x: x.sum(-1, keepdims=True)
    >>> x = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    >>> metrics.selectivity(f, x, x, 0)       # curve 10, 6, 3, 1, 0
    Array([3.75], dtype=float32)
  """
  return auc_from_curve(perturbation_curve(model, x, relevance, target, **curve_options))


# ---- faithfulness correlation --------------------------------------------------------------------------------------

class _FaithSpec(NamedTuple):
  patch: int
  n_regions: int
  subset_size: int
  num_subsets: int
  given: bool
  baseline: _BaselineSpec
  similarity: Any
  chunk_size: int | None  # as given in the cache key; `build` fills in the default


def _faith_impl(spec: _FaithSpec, traced: _Traced, similarity, consts, params, x, relevance, target, subsets, key,
                value, urange):
  model = traced.bind(consts)
  batch, n = x.shape[0], spec.n_regions
  target = _batch_targets(target, batch)
  k_subsets, k_noise = jax.random.split(key)
  if spec.given:  # region indices [B, S, m] -> masks [B, S, n]
    masks = jnp.zeros((batch, spec.num_subsets, n), bool).at[
        jnp.arange(batch)[:, None, None], jnp.arange(spec.num_subsets)[None, :, None], subsets].set(True)
  else:  # the m smallest of n uniform draws: a uniformly random m-subset, per sample and subset
    draws = _draw(jax.random.uniform, k_subsets, (batch, spec.num_subsets, n))
    masks = jnp.argsort(jnp.argsort(draws, axis=-1), axis=-1) < spec.subset_size
  region_relevance = _region_relevance(relevance, x.shape[1:], spec.patch, n)
  subset_relevance = jnp.einsum("bsn,bn->bs", masks.astype(jnp.float32), region_relevance)
  ids, _ = _region_ids(x.shape[1:], spec.patch)
  base = _baseline_values(spec.baseline, x, k_noise, value, urange)
  full = _pick(model(params, x), target)

  def drop(mask):  # mask [B, n]
    return full - _pick(model(params, jnp.where(jnp.take(mask, ids, axis=1), base, x)), target)

  drops = _map(drop, jnp.moveaxis(masks, 1, 0), spec.chunk_size).T  # [B, S]
  return similarity(subset_relevance, drops)


def faithfulness_correlation(model: Callable, x, relevance, target, *, params=None, key=None, subsets=None,
                             num_subsets: int = 100, subset_size: int | None = None, patch: int = 1,
                             baseline="zeros", output_fn: Callable | None = None, similarity: Similarity = "pearson",
                             blur_sigma: float = 1.0, uniform_range: tuple[float, float] | None = None,
                             chunk_size: int | None = None) -> jax.Array:
  """Faithfulness correlation (Bhatt et al. 2020): does the relevance of a region set predict the score it carries?

  For random subsets `S_1..S_M` of `m` regions each, per sample, the correlation across subsets between their
  summed relevance and the score drop when they are set to the baseline:

  .. math::
      \\mu_F = \\mathrm{corr}_{j}\\Big(\\sum_{i \\in S_j} R_i,\\; f(x)_t - f(x_{[S_j = b]})_t\\Big)

  Higher is better (1: the relevance sums predict the drops linearly, with Pearson).

  References:
    Bhatt, Weller and Moura 2020, "Evaluating and aggregating feature-based model explanations", IJCAI.

  Args:
    model, x, relevance, target, params, patch, baseline, output_fn, blur_sigma, uniform_range: as in
      `perturbation_curve` (regions are the units of the subsets).
    key: PRNG key: draws the subsets (when `subsets` is not given) and the `"uniform"` baseline.
    subsets: optional int array `[B, num_subsets, subset_size]` of region indices (distinct within a subset) to use
      instead of random ones, e.g. to reproduce another tool's draws.
    num_subsets: M, the number of random subsets per sample.
    subset_size: m, regions per subset; default 10% of the regions (at least 1).
    similarity: `"pearson"` (Bhatt et al.), `"spearman"`, `"cosine"`, or a callable `(a [B, M], b [B, M]) -> [B]`.
    chunk_size: evaluate this many subsets per model call (`jax.lax.map`); `None`: as in `perturbation_curve`.

  Returns:
    `[B]` (NaN for a sample whose subset sums or drops are all equal).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxlrp import metrics
    >>> w = jnp.array([[3.0], [-1.0], [2.0], [0.5], [1.0], [-2.0]])
    >>> f = lambda x: x @ w                              # linear: the drop of S is sum_{i in S} w_i x_i
    >>> x = jnp.ones((2, 6))
    >>> key = jax.random.key(0)
    >>> r = metrics.faithfulness_correlation(f, x, x * w[:, 0], 0, key=key, num_subsets=20, subset_size=2)
    >>> bool(jnp.allclose(r, 1.0))                       # gradient x input of a linear model is exact
    True
  """
  x, relevance = _check_input(x, relevance, "faithfulness_correlation")
  _check_positive_int("patch", patch, allow_none=False)
  _check_positive_int("chunk_size", chunk_size)
  _, n = _region_ids(x.shape[1:], patch)
  if subsets is not None:
    subsets = jnp.asarray(subsets)
    if subsets.ndim != 3 or subsets.shape[0] != x.shape[0] or not jnp.issubdtype(subsets.dtype, jnp.integer):
      raise ValueError(f"subsets must be an int array [B, num_subsets, subset_size] with B = {x.shape[0]}; got "
                       f"{subsets.dtype} of shape {subsets.shape}.")
    num_subsets, subset_size = subsets.shape[1:]
  else:
    _check_positive_int("num_subsets", num_subsets, allow_none=False)
    _check_positive_int("subset_size", subset_size)
    subset_size = max(1, n // 10) if subset_size is None else subset_size
    if subset_size > n:
      raise ValueError(f"subset_size {subset_size} exceeds the number of regions {n}.")
    key = _key_or_dummy(key, True, "random subsets (subsets=None)")
  base_spec, value, urange = _baseline_spec(baseline, x, blur_sigma, uniform_range, key)
  key = _key_or_dummy(key, False, "")
  sim = _similarity(similarity)
  target = _targets(target, x.shape[0])
  model, params = with_array_params(model, params)  # an Equinox module passed whole
  closed: list = []
  traced = _model_program(model, output_fn, params, x, closed_out=closed)
  spec = _FaithSpec(int(patch), n, int(subset_size), int(num_subsets), subsets is not None, base_spec,
                    _static_key(sim), chunk_size)

  def build():  # on a cache miss only: the chunk size follows from the traced program, which the key identifies
    chunked = spec._replace(chunk_size=_auto_chunk(chunk_size, _largest_value(closed[0], x)))
    return lambda *a: _faith_impl(chunked, traced, sim, *a)

  fn = _compiled(("faithfulness", spec, traced.key), build)
  return fn(traced.consts, params, x, relevance, target, subsets, key, value, urange)


# ---- similarities --------------------------------------------------------------------------------------------------

def _flat_pair(a, b):
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.shape[0] != b.shape[0]:
    raise ValueError(f"similarity: a and b need the same batch size; got {a.shape} and {b.shape}.")
  dtype = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
  return a.reshape(a.shape[0], -1).astype(dtype), b.reshape(b.shape[0], -1).astype(dtype)


@jax.jit
def pearson(a, b) -> jax.Array:
  """Pearson correlation of each sample's flattened `a` and `b`, `[B, ...] -> [B]` (NaN where one is constant).

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxlrp import metrics
    >>> metrics.pearson(jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[2.0, 4.0, 7.0]])).round(4)
    Array([0.9934], dtype=float32)
  """
  a, b = _flat_pair(a, b)
  a = a - a.mean(-1, keepdims=True)
  b = b - b.mean(-1, keepdims=True)
  return (a * b).sum(-1) / jnp.sqrt((a * a).sum(-1) * (b * b).sum(-1))


def _average_ranks(v):
  """Ranks 1..N along the last axis of `[B, N]`, ties get their mean rank (scipy.stats.rankdata's 'average')."""
  n = v.shape[-1]
  order = jnp.argsort(v, axis=-1)
  s = jnp.take_along_axis(v, order, axis=-1)
  i = jnp.broadcast_to(jnp.arange(n), v.shape)
  starts = s[..., 1:] != s[..., :-1]  # a new group of equal values begins at i + 1
  first = jax.lax.cummax(jnp.where(jnp.pad(starts, ((0, 0), (1, 0)), constant_values=True), i, 0), axis=1)
  last = jax.lax.cummin(jnp.where(jnp.pad(starts, ((0, 0), (0, 1)), constant_values=True), i, n), axis=1,
                        reverse=True)
  sorted_ranks = 0.5 * (first + last).astype(v.dtype) + 1
  return jnp.zeros_like(v).at[jnp.arange(v.shape[0])[:, None], order].set(sorted_ranks)


@jax.jit
def spearman(a, b) -> jax.Array:
  """Spearman rank correlation of each sample's flattened `a` and `b`, `[B, ...] -> [B]`; ties get average ranks
  (as `scipy.stats.spearmanr`).

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxlrp import metrics
    >>> metrics.spearman(jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[2.0, 4.0, 7.0]]))
    Array([1.], dtype=float32)
  """
  a, b = _flat_pair(a, b)
  return pearson(_average_ranks(a), _average_ranks(b))


@jax.jit
def cosine(a, b) -> jax.Array:
  """Cosine similarity of each sample's flattened `a` and `b`, `[B, ...] -> [B]`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxlrp import metrics
    >>> metrics.cosine(jnp.array([[1.0, 0.0]]), jnp.array([[1.0, 1.0]]))
    Array([0.70710677], dtype=float32)
  """
  a, b = _flat_pair(a, b)
  return (a * b).sum(-1) / jnp.sqrt((a * a).sum(-1) * (b * b).sum(-1))


_SIMILARITIES = {"pearson": pearson, "spearman": spearman, "cosine": cosine}


def _similarity(similarity: Similarity) -> Callable:
  if callable(similarity):
    return similarity
  if similarity not in _SIMILARITIES:
    raise ValueError(f"similarity must be one of {tuple(_SIMILARITIES)} or a callable (a, b) -> [B]; "
                     f"got {similarity!r}.")
  return _SIMILARITIES[similarity]


# ---- randomisation sanity checks -----------------------------------------------------------------------------------

def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaf_paths(params) -> list[str]:
  return ["/".join(_key_name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _natural(s: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _is_variables(params) -> bool:
  """A Flax variables dict ({"params": ..., "batch_stats": ...}): only its "params" collection holds weights."""
  return isinstance(params, dict) and "params" in params


def _first_use(closed, num_leaves: int) -> list[float]:
  """For each of the first `num_leaves` flat arguments of a traced function, the index of the first equation of
  its flattened program that reads it (inf if none): the forward pass reads a layer's weights in layer order."""
  try:
    program = _jax.flatten_program(closed)
  except Exception:  # noqa: BLE001 - an exotic program: fall back to the order of names
    return [math.inf] * num_leaves
  first: dict[int, int] = {}
  for k, eqn in enumerate(program.eqns):
    for a in eqn.ins:
      if isinstance(a, int) and a not in first:
        first[a] = k
  return [first.get(i, math.inf) for i in program.invars[:num_leaves]]


def _layer_assignment(params, layers: Sequence[str] | None, first_use: Sequence[float]
                      ) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Layer names (top first) and, per parameter leaf, the index of its layer (len(names): never randomised)."""
  paths = _leaf_paths(params)
  if not paths:
    raise ValueError("mprt: params has no leaves to randomise.")
  parents = [p.rsplit("/", 1)[0] if "/" in p else p for p in paths]
  if layers is None:
    weights = [not _is_variables(params) or p.startswith("params/") for p in paths]
    use: dict[str, float] = {}
    for parent, is_weight, k in zip(parents, weights, first_use):
      if is_weight:
        use[parent] = min(use.get(parent, math.inf), k)
    # Bottom-up = the order the explanation first reads each layer's weights (names break ties), reversed.
    names = tuple(sorted(use, key=lambda n: (use[n], _natural(n)), reverse=True))
    return names, tuple(names.index(p) if w else len(names) for p, w in zip(parents, weights))
  if isinstance(layers, str):
    raise TypeError(f"layers must be a sequence of glob patterns, top (output) layer first; got the string "
                    f"{layers!r}: wrap it in a list.")
  names = tuple(layers)
  index = []
  for path, parent in zip(paths, parents):
    hits = [i for i, g in enumerate(names) if fnmatch.fnmatchcase(path, g) or fnmatch.fnmatchcase(parent, g)]
    index.append(hits[0] if hits else len(names))
  for i, g in enumerate(names):
    if i not in index:
      raise ValueError(f"mprt: the layer pattern {g!r} matches no parameter leaf (or only leaves an earlier pattern "
                       f"took). Leaf paths: {paths}.")
  return names, tuple(index)


def _default_random_params(params, key):
  """Each floating leaf redrawn from N(mean(leaf), std(leaf)^2): the location and scale of the trained leaf, none of
  its structure (a constant leaf, e.g. a zero bias or a unit BatchNorm scale, stays as it is)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  leaves = [jnp.asarray(leaf) for leaf in leaves]
  floating = [jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in leaves]
  sizes = [leaf.size if f else 0 for leaf, f in zip(leaves, floating)]
  noise = jax.random.normal(key, (sum(sizes),), jnp.float32)  # one flat draw, sliced per leaf
  offsets = np.cumsum([0] + sizes)
  out = []
  for leaf, f, start, size in zip(leaves, floating, offsets, sizes):
    if f:
      v = leaf.astype(jnp.float32)
      leaf = (v.mean() + v.std() * noise[start:start + size].reshape(leaf.shape)).astype(leaf.dtype)
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MPRTResult:
  """The result of `mprt`.

  Attributes:
    similarity: `[B, L]`; column l compares the explanation after randomising the top `l + 1` layers with the
      original one.
    layers: the L layer names, top (output) layer first: column l randomised `layers[:l + 1]`.
  """

  similarity: jax.Array
  layers: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))


class _MPRTSpec(NamedTuple):
  layer_index: tuple[int, ...]
  num_layers: int
  draw: bool
  similarity: Any
  chunk_size: int | None


def _mprt_impl(spec: _MPRTSpec, traced: _Traced, similarity, consts, params, random_params, x, target, key):
  explain = traced.bind(consts)
  target = _batch_targets(target, x.shape[0])
  if spec.draw:
    random_params = _default_random_params(params, key)
  original = explain(params, x, target)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  random_leaves = jax.tree_util.tree_leaves(random_params)

  def stage(level):  # the top `level + 1` layers randomised (cascading, top-down)
    mixed = [jnp.where(level >= i, r, p) if i < spec.num_layers else p
             for i, p, r in zip(spec.layer_index, leaves, random_leaves)]
    return similarity(original, explain(jax.tree_util.tree_unflatten(treedef, mixed), x, target))

  return _map(stage, jnp.arange(spec.num_layers), spec.chunk_size).T  # [B, L]


def mprt(explain: Callable, params, x, target, *, key=None, random_params=None, layers: Sequence[str] | None = None,
         similarity: Similarity = "spearman", chunk_size: int | None = None) -> MPRTResult:
  """Model parameter randomisation test, cascading (Adebayo et al. 2018): how much the explanation changes as the
  model's layers are randomised one after another from the top.

  Stage l (l = 0..L-1) replaces the parameters of the top `l + 1` layers by random ones and compares its
  explanation with the original one, per sample:

  .. math::
      s_{b,l} = \\mathrm{sim}\\big(E(\\theta, x_b, t_b),\\; E(\\theta^{(l)}, x_b, t_b)\\big)

  A method that depends on the parameters gives similarities that fall as layers are randomised.

  Layers. By default a layer is the parent of parameter leaves (their `tree_flatten_with_path` keys joined with
  "/", without the last key, e.g. `"params/Dense_1"` for `"params/Dense_1/kernel"`); of a Flax variables dict only
  the `"params"` collection is randomised (not e.g. BatchNorm statistics). They are ordered by where `explain`
  first reads them (its forward pass reads the bottom layer first), top first. Pass `layers` (fnmatch globs over
  leaf or parent paths, top first) to choose otherwise; `result.layers` names the columns.

  References:
    Adebayo et al. 2018, "Sanity checks for saliency maps", NeurIPS.

  Args:
    explain: `explain(params, x, target) -> relevance` (shaped like `x`), e.g.
      `lambda p, x, t: jaxlrp.attribute(model.apply, x, composite, target=t, params=p).relevance`; `target` arrives
      as an int array `[B]`.
    params: the parameter pytree.
    x: inputs `[B, ...]`.
    target: int or int array `[B]`.
    key: PRNG key for the random parameters (when `random_params` is not given): each floating leaf is redrawn from
      `N(mean(leaf), std(leaf)^2)` (a constant leaf, e.g. a zero bias, stays as it is).
    random_params: optional random parameters, a pytree like `params` (e.g. a fresh `model.init`); stage l takes
      the leaves of the top `l + 1` layers from it.
    layers: optional fnmatch globs over the parameter paths, one per layer, top first.
    similarity: `"spearman"` (default, as Adebayo et al.), `"pearson"`, `"cosine"` or a callable
      `(a [B, ...], b [B, ...]) -> [B]`. Use the absolute value inside `explain` for the absolute variant.
    chunk_size: explain this many stages at once (`jax.lax.map`). `None` (default): all L stages in one vmapped
      call on an accelerator, one after the other on a CPU (a vmap over parameters batches the weights, which
      a CPU runs no faster).

  Returns:
    `MPRTResult(similarity [B, L], layers)`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxlrp import metrics
    >>> params = {"l1": {"w": jnp.eye(2)}, "l0": {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}}
    >>> explain = lambda p, x, t: x * (p["l0"]["w"] @ p["l1"]["w"])[:, t].T    # gradient x input of x @ w0 @ w1
    >>> flipped = jax.tree.map(lambda w: -w, params)                            # a "random" model
    >>> res = metrics.mprt(explain, params, jnp.ones((1, 2)), 0, random_params=flipped, similarity="cosine")
    >>> res.layers, res.similarity
    (('l1', 'l0'), Array([[-1.,  1.]], dtype=float32))
  """
  x = jnp.asarray(x)
  _check_positive_int("chunk_size", chunk_size)
  if random_params is not None:
    if jax.tree_util.tree_structure(random_params) != jax.tree_util.tree_structure(params):
      raise ValueError("mprt: random_params must have the tree structure of params.")
  else:
    key = _key_or_dummy(key, True, "mprt without random_params")
  key = _key_or_dummy(key, False, "")
  sim = _similarity(similarity)
  target = _targets(target, x.shape[0])
  closed: list = []
  traced = _trace(explain, params, x, jax.ShapeDtypeStruct((x.shape[0],), jnp.int32), closed_out=closed)
  num_leaves = len(jax.tree_util.tree_leaves(params))
  names, index = _layer_assignment(params, layers, _first_use(closed[0], num_leaves) if layers is None else ())
  stages = chunk_size if chunk_size is not None else (None if jax.default_backend() != "cpu" else 1)
  spec = _MPRTSpec(index, len(names), random_params is None, _static_key(sim), stages)
  fn = _compiled(("mprt", spec, traced.key), lambda: lambda *a: _mprt_impl(spec, traced, sim, *a))
  return MPRTResult(fn(traced.consts, params, random_params, x, target, key), names)


def _random_logit_impl(num_classes: int, traced: _Traced, similarity, consts, params, x, target, key):
  explain = traced.bind(consts)
  target = _batch_targets(target, x.shape[0])
  # Another class, uniform over the num_classes - 1 others: draw k in [0, C - 2], skip the target.
  k = jax.random.randint(key, target.shape, 0, num_classes - 1)
  other = k + (k >= target)
  return similarity(explain(params, x, target), explain(params, x, other))


def random_logit(explain: Callable, x, target, *, num_classes: int, key, params=None,
                 similarity: Similarity = "spearman") -> jax.Array:
  """Random logit test (Sixt et al. 2020): the similarity of the explanation of the target class with that of a
  random other class. A class-sensitive method gives a low similarity.

  .. math::
      s_b = \\mathrm{sim}\\big(E(x_b, t_b),\\; E(x_b, u_b)\\big), \\qquad u_b \\sim \\mathcal{U}(\\{0..C-1\\}
      \\setminus \\{t_b\\})

  References:
    Sixt, Granz and Landgraf 2020, "When explanations lie: why many modified BP attributions fail", ICML.

  Args:
    explain: `explain(x, target) -> relevance`, or `explain(params, x, target)` when `params` is given;
      `target` arrives as an int array `[B]`.
    x: inputs `[B, ...]`.
    target: int or int array `[B]`.
    num_classes: C, the number of classes (>= 2).
    key: PRNG key drawing the other classes.
    params: optional first argument of `explain`.
    similarity: `"spearman"` (default), `"pearson"`, `"cosine"` or a callable `(a, b) -> [B]`.

  Returns:
    `[B]`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxlrp import metrics
    >>> w = jnp.array([[1.0, -1.0], [2.0, 1.0]])
    >>> explain = lambda x, t: x * w[:, t].T                   # gradient x input of x @ w
    >>> metrics.random_logit(explain, jnp.ones((1, 2)), 0, num_classes=2, key=jax.random.key(0),
    ...                      similarity="cosine")
    Array([0.31622776], dtype=float32)
  """
  x = jnp.asarray(x)
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
    raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}.")
  key = _key_or_dummy(key, True, "random_logit")
  sim = _similarity(similarity)
  target = _targets(target, x.shape[0])
  fn_ = (lambda p, xx, t: explain(xx, t)) if params is None else explain
  traced = _trace(fn_, params, x, jax.ShapeDtypeStruct((x.shape[0],), jnp.int32))
  fn = _compiled(("random_logit", int(num_classes), _static_key(sim), traced.key),
                 lambda: lambda *a: _random_logit_impl(int(num_classes), traced, sim, *a))
  return fn(traced.consts, params, x, target, key)


def input_invariance(explain: Callable, x, target, *, shift, params=None, shifted_params=None,
                     similarity: Similarity = "pearson") -> jax.Array:
  """Input invariance (Kindermans et al. 2019): the explanation of a model should not change when the input is
  shifted by a constant `c` and the model's first layer compensates (its bias `b' = b - W c`), since the two models
  compute the same function of the signal.

  .. math::
      s_b = \\mathrm{sim}\\big(E_{\\theta}(x_b, t_b),\\; E_{\\theta'}(x_b + c, t_b)\\big), \\qquad
      f_{\\theta'}(x + c) = f_{\\theta}(x)

  The gradient passes (1 for every sample); gradient x input and LRP rules that read the input (z-rules, LRP-0)
  generally do not; rules with a reference point that moves with the shift (ZBox with shifted bounds) can.

  References:
    Kindermans, Hooker, Adebayo, Alber, Schütt, Dähne, Erhan and Kim 2019, "The (un)reliability of saliency
    methods", in Explainable AI: Interpreting, Explaining and Visualizing Deep Learning, Springer.

  Args:
    explain: `explain(x, target) -> relevance`, or `explain(params, x, target)` when `params` is given.
    x: inputs `[B, ...]`.
    target: int or int array `[B]`.
    shift: the constant `c`, broadcastable to `x`.
    params: the original model's parameters (the first argument of `explain`), if any.
    shifted_params: the compensated model's parameters (required with `params`); building them is model-specific
      (e.g. `b' = b - c @ W` for a first dense layer `x @ W + b`).
    similarity: `"pearson"` (default), `"spearman"`, `"cosine"` or a callable `(a, b) -> [B]`.

  Returns:
    `[B]`: the similarity of the two explanations per sample (1 for an input-invariant method).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxlrp import metrics
    >>> w, b, c = jnp.array([[1.0, -1.0], [2.0, 1.0]]), jnp.zeros(2), jnp.array([1.0, 1.0])
    >>> f = lambda p, x: x @ p["w"] + p["b"]
    >>> grad = lambda p, x, t: jax.grad(lambda x: f(p, x)[:, t].sum())(x)
    >>> gxi = lambda p, x, t: x * grad(p, x, t)
    >>> p, p_shifted = {"w": w, "b": b}, {"w": w, "b": b - c @ w}
    >>> x = jnp.array([[0.5, -2.0], [1.0, 3.0]])
    >>> metrics.input_invariance(grad, x, 0, shift=c, params=p, shifted_params=p_shifted, similarity="cosine")
    Array([1., 1.], dtype=float32)
    >>> metrics.input_invariance(gxi, x, 0, shift=c, params=p, shifted_params=p_shifted, similarity="cosine")
    Array([0.8682431, 0.9968153], dtype=float32)
  """
  x = jnp.asarray(x)
  if (params is None) != (shifted_params is None):
    raise ValueError("input_invariance needs both params and shifted_params (the compensated model), or neither.")
  sim = _similarity(similarity)
  t = _targets(target, x.shape[0])
  shifted = x + jnp.asarray(shift, x.dtype)
  if params is None:
    return sim(explain(x, t), explain(shifted, t))
  return sim(explain(params, x, t), explain(shifted_params, shifted, t))


# ---- complexity ----------------------------------------------------------------------------------------------------

def _flat_abs(relevance):
  relevance = jnp.asarray(relevance)
  if relevance.ndim < 1:
    raise ValueError("relevance must be batched, [B, ...].")
  flat = relevance.reshape(relevance.shape[0], -1)
  return jnp.abs(flat.astype(jnp.promote_types(flat.dtype, jnp.float32)))


@jax.jit
def gini(relevance) -> jax.Array:
  """Gini index of each sample's `|R|` (Chalasani et al. 2020): 0 for uniform relevance, `1 - 1/N` when one
  element holds it all. Higher is sparser (simpler).

  .. math::
      G = \\frac{\\sum_{i=1}^{N} (2i - N - 1)\\, a_{(i)}}{N \\sum_{i} a_{(i)}}, \\qquad a_{(1)} \\le \\dots \\le
      a_{(N)} \\text{ the sorted } |R_i|

  An all-zero map counts as uniform: 0.

  References:
    Chalasani et al. 2020, "Concise explanations of neural networks using adversarial training", ICML.

  Args:
    relevance: `[B, ...]`.

  Returns:
    `[B]`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxlrp import metrics
    >>> metrics.gini(jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, -2.0]]))
    Array([0.  , 0.75], dtype=float32)
  """
  a = jnp.sort(_flat_abs(relevance), axis=-1)
  n = a.shape[-1]
  i = jnp.arange(1, n + 1, dtype=a.dtype)
  total = a.sum(-1)
  g = ((2 * i - n - 1) * a).sum(-1) / (n * jnp.where(total > 0, total, 1))
  return jnp.where(total > 0, g, 0)


@jax.jit
def entropy(relevance) -> jax.Array:
  """Entropy of each sample's normalised `|R|` (Bhatt et al. 2020's complexity): `log N` for uniform relevance,
  0 when one element holds it all. Lower is simpler.

  .. math::
      H = -\\sum_i p_i \\log p_i, \\qquad p_i = \\frac{|R_i|}{\\sum_j |R_j|}, \\quad 0 \\log 0 = 0

  An all-zero map counts as uniform: `log N`.

  References:
    Bhatt, Weller and Moura 2020, "Evaluating and aggregating feature-based model explanations", IJCAI.

  Args:
    relevance: `[B, ...]`.

  Returns:
    `[B]`, in nats.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxlrp import metrics
    >>> metrics.entropy(jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, -2.0]]))   # log 4, 0
    Array([1.3862944, 0.       ], dtype=float32)
  """
  a = _flat_abs(relevance)
  total = a.sum(-1, keepdims=True)
  p = jnp.where(total > 0, a / jnp.where(total > 0, total, 1), 1.0 / a.shape[-1])
  return 0.0 - jax.scipy.special.xlogy(p, p).sum(-1)  # 0.0 - : no negative zero


# ---- localisation --------------------------------------------------------------------------------------------------

def _flat_with_mask(relevance, mask):
  relevance = jnp.asarray(relevance)
  mask = jnp.broadcast_to(jnp.asarray(mask), relevance.shape).astype(bool)
  batch = relevance.shape[0]
  return relevance.reshape(batch, -1).astype(jnp.promote_types(relevance.dtype, jnp.float32)), mask.reshape(batch, -1)


@functools.partial(jax.jit, static_argnames="positive")
def relevance_mass(relevance, mask, *, positive: bool = True) -> jax.Array:
  """Relevance mass accuracy (Arras et al. 2022): the share of relevance that falls inside the ground-truth mask.

  .. math::
      \\mathrm{RMA} = \\frac{\\sum_{i \\in M} R_i^{+}}{\\sum_i R_i^{+}}

  with `R+ = max(R, 0)` (Arras et al. consider positive relevance only); `positive=False` uses the signed `R`
  (Quantus' `RelevanceMassAccuracy`). NaN when the denominator is 0.

  References:
    Arras, Osman and Samek 2022, "CLEVR-XAI: a benchmark dataset for the ground truth evaluation of neural network
    explanations", Information Fusion.

  Args:
    relevance: `[B, ...]`.
    mask: boolean (or 0/1) array broadcastable to `relevance`: True inside the planted signal / object.
    positive: keep only positive relevance.

  Returns:
    `[B]`, in [0, 1] with `positive=True`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxlrp import metrics
    >>> r = jnp.array([[3.0, 1.0, -2.0, 0.0]])
    >>> mask = jnp.array([[True, False, True, False]])
    >>> metrics.relevance_mass(r, mask), metrics.relevance_mass(r, mask, positive=False)
    (Array([0.75], dtype=float32), Array([0.5], dtype=float32))
  """
  r, m = _flat_with_mask(relevance, mask)
  if positive:
    r = jnp.maximum(r, 0)
  total = r.sum(-1)
  return jnp.where(total != 0, (r * m).sum(-1) / jnp.where(total != 0, total, 1), jnp.nan)


@jax.jit
def relevance_rank(relevance, mask) -> jax.Array:
  """Relevance rank accuracy (Arras et al. 2022): of the K most relevant elements, K the mask's size, the share
  inside the mask.

  .. math::
      \\mathrm{RRA} = \\frac{|\\mathrm{top}_K(R) \\cap M|}{K}, \\qquad K = |M|

  Equal relevance at the cut: the lower index counts as higher-ranked. NaN for an empty mask.

  References:
    Arras, Osman and Samek 2022, "CLEVR-XAI: a benchmark dataset for the ground truth evaluation of neural network
    explanations", Information Fusion.

  Args:
    relevance: `[B, ...]`.
    mask: boolean array broadcastable to `relevance`.

  Returns:
    `[B]`, in [0, 1].

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxlrp import metrics
    >>> r = jnp.array([[3.0, 1.0, 2.0, 0.0]])
    >>> metrics.relevance_rank(r, jnp.array([[True, False, False, True]]))   # top 2 are elements 0 and 2
    Array([0.5], dtype=float32)
  """
  r, m = _flat_with_mask(relevance, mask)
  rank = jnp.argsort(jnp.argsort(-r, axis=-1, stable=True), axis=-1)
  k = m.sum(-1, keepdims=True)
  hits = ((rank < k) & m).sum(-1)
  return jnp.where(k[:, 0] > 0, hits / jnp.maximum(k[:, 0], 1), jnp.nan).astype(r.dtype)


@jax.jit
def pointing_game(relevance, mask) -> jax.Array:
  """Pointing game (Zhang et al. 2018): 1 where the maximum of the relevance lies inside the mask, else 0.

  .. math::
      \\mathrm{hit} = \\big[\\exists\\, i \\in M : R_i = \\max_j R_j\\big]

  With several maxima a hit is any of them inside (as Quantus). For a tolerance around the maximum (the paper uses
  15 pixels) dilate the mask. Reduce channels first (e.g. `relevance.sum(-1)`) to point at pixels.

  References:
    Zhang et al. 2018, "Top-down neural attention by excitation backprop", IJCV.

  Args:
    relevance: `[B, ...]`.
    mask: boolean array broadcastable to `relevance`.

  Returns:
    `[B]`, 0.0 or 1.0 (average over samples for the accuracy).

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxlrp import metrics
    >>> r = jnp.array([[0.1, 0.9, 0.3], [0.8, 0.1, 0.2]])
    >>> metrics.pointing_game(r, jnp.array([False, True, False]))
    Array([1., 0.], dtype=float32)
  """
  r, m = _flat_with_mask(relevance, mask)
  top = r == r.max(-1, keepdims=True)
  return jnp.any(top & m, axis=-1).astype(r.dtype)
