r"""`tune`: choose rule parameters (gamma, epsilon, which layers get which rule) by an explanation-quality metric.

Rules, composites and attributors are pytrees whose numeric hyperparameters are leaves and whose selectors and
rule types are static. Candidates that differ only in leaves (the same composite with another gamma) share one
program: their leaves are stacked and all of them are explained and scored in one `jax.vmap`-ped, compiled call.
Candidates with another structure (other selectors or rule types, e.g. Gamma on two layers instead of one) are
evaluated in one compiled call per structure.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlrp import _jax, metrics
from jaxlrp._attribute import attribute
from jaxlrp._attributors import Attributor
from jaxlrp._composites import Composite
from jaxlrp._core import with_array_params

__all__ = ["TuneResult", "tune"]

Method = Composite | Attributor


@dataclasses.dataclass(frozen=True, eq=False)  # eq on NumPy fields would be ambiguous
class TuneResult:
  """The record of a `tune` run: every candidate with its parameter values and scores.

  Attributes:
    candidates: the K evaluated methods (composites or attributors), in the order of the grid / the draws / the list.
    values: `{name: [K values]}`, the parameter values that built each candidate (empty for an explicit list).
    scores: `[K, B]` NumPy array, the metric of candidate k on sample b.
    mean: `[K]`, the mean score over the samples (NaN if any sample's score is NaN).
    stderr: `[K]`, the standard error of that mean, `std(scores, ddof=1) / sqrt(B)` (NaN for B = 1).
    best_index: the index of the best candidate: the largest mean (the smallest with `maximize=False`).
    maximize: whether higher scores are better.
    structures: the number of distinct candidate structures, i.e. of compiled programs.
  """

  candidates: tuple
  values: dict
  scores: np.ndarray
  mean: np.ndarray
  stderr: np.ndarray
  best_index: int
  maximize: bool
  structures: int

  @property
  def best(self) -> Method:
    """The best candidate (a `jaxlrp.Composite`, or an attributor if those were tuned)."""
    return self.candidates[self.best_index]

  @property
  def best_values(self) -> dict:
    """The parameter values of the best candidate, `{name: value}` (empty for an explicit list)."""
    return {name: column[self.best_index] for name, column in self.values.items()}

  def table(self, digits: int = 4) -> str:
    """The candidates as a Markdown table: parameter values (or the candidate itself), mean, standard error; the best
    row is marked with `*`.

    Example:
      >>> import numpy as np, jaxlrp
      >>> scores = np.array([[1.0, 3.0], [2.0, 6.0]])
      >>> res = jaxlrp.TuneResult((jaxlrp.EpsilonGammaBox(0, 1, gamma=0.0), jaxlrp.EpsilonGammaBox(0, 1)),
      ...                         {"gamma": [0.0, 0.25]}, scores, scores.mean(1), np.array([1.0, 2.0]), 1, True, 1)
      >>> print(res.table(digits=2))
      | best | gamma | mean | std. error |
      |---|---|---:|---:|
      |  | 0.0 | 2.00 | 1.00 |
      | * | 0.25 | 4.00 | 2.00 |
    """
    names = list(self.values) or ["candidate"]
    columns = [self.values[n] for n in self.values] or [[repr(c) for c in self.candidates]]
    lines = ["| best | " + " | ".join(names) + " | mean | std. error |",
             "|---|" + "---|" * len(names) + "---:|---:|"]
    for k in range(len(self.candidates)):
      cells = [str(col[k]) for col in columns]
      lines.append(f"| {'*' if k == self.best_index else ''} | " + " | ".join(cells)
                   + f" | {self.mean[k]:.{digits}f} | {self.stderr[k]:.{digits}f} |")
    return "\n".join(lines)


# ---- candidates ----------------------------------------------------------------------------------------------------

def _check_method(method, where: str) -> None:
  if not isinstance(method, (Composite, Attributor)):
    raise TypeError(f"tune: {where} must be a jaxlrp.Composite (or an attributor such as jaxlrp.SmoothGrad()); "
                    f"got {method!r}.")


def _grid_axis(name: str, values, random: bool) -> list:
  """One grid entry as a list of candidate values (or, in a random search, a callable drawing one)."""
  if random and callable(values):
    return values
  if isinstance(values, (str, bytes)) or callable(values) or not hasattr(values, "__len__"):
    kind = "a callable (only a random search, samples=..., draws from callables)" if callable(values) else repr(values)
    raise ValueError(f"tune: grid[{name!r}] must be a non-empty sequence of values, e.g. [0.0, 0.25, 1.0]; got {kind}.")
  if hasattr(values, "ndim") and values.ndim != 1:
    raise ValueError(f"tune: grid[{name!r}] must be one-dimensional (one value per grid point); got an array of shape "
                     f"{tuple(values.shape)}. For array-valued parameters (e.g. per-channel ZBox bounds) pass a list "
                     f"of arrays.")
  values = values.tolist() if isinstance(values, (np.ndarray, jax.Array)) else list(values)
  if not values:
    raise ValueError(f"tune: grid[{name!r}] is empty; give at least one value.")
  return values


def _build(factory: Callable, point: dict) -> Method:
  try:
    method = factory(**point)
  except TypeError as e:
    raise TypeError(f"tune: the candidate function failed on the grid point {point!r} ({e}). It is called with one "
                    f"keyword argument per grid entry: its parameters must be named like the grid's keys "
                    f"{list(point)}.") from e
  _check_method(method, f"the candidate function's result for {point!r}")
  return method


def _scalar(v):
  """A drawn value as a plain Python number where it is a scalar (readable in `values` and tables)."""
  arr = np.asarray(v)
  return arr.item() if arr.ndim == 0 and arr.dtype.kind in "biuf" else v


def _random_points(grid: dict, samples: int, key) -> list[dict]:
  """`samples` points: each entry drawn independently, uniformly from its list or by calling it with a key."""
  key = jax.random.key(key) if isinstance(key, int) else key
  keys = jax.random.split(key, samples * len(grid))  # one flat split: fast to compile on a CPU
  points = [{} for _ in range(samples)]
  for j, (name, axis) in enumerate(grid.items()):
    axis_keys = keys[j * samples:(j + 1) * samples]
    if callable(axis):
      for point, k in zip(points, axis_keys):
        point[name] = _scalar(axis(k))
    else:
      picks = np.asarray(jax.random.randint(axis_keys[0], (samples,), 0, len(axis)))
      for point, i in zip(points, picks):
        point[name] = axis[int(i)]
  return points


def _candidates(candidates, grid, samples, key) -> tuple[list, dict]:
  """The candidate methods and the `{name: [values]}` that built them."""
  if samples is not None and (not isinstance(samples, (int, np.integer)) or isinstance(samples, bool) or samples < 1):
    raise ValueError(f"tune: samples must be None (grid search) or an int >= 1 (random search); got {samples!r}.")
  if callable(candidates) and not isinstance(candidates, (Composite, Attributor)):
    if not isinstance(grid, Mapping) or not grid:
      raise ValueError("tune: with a candidate function, pass grid={name: values, ...} (a non-empty dict); the "
                       "function is called with one keyword argument per entry.")
    axes = {name: _grid_axis(name, values, samples is not None) for name, values in grid.items()}
    if samples is None:
      points = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    else:
      if key is None:
        raise ValueError("tune: a random search (samples=...) needs key=jax.random.key(seed).")
      points = _random_points(axes, int(samples), key)
    methods = [_build(candidates, p) for p in points]
    return methods, {name: [p[name] for p in points] for name in axes}
  if grid is not None or samples is not None:
    raise ValueError("tune: grid= and samples= go with a candidate function (e.g. lambda gamma: "
                     "jaxlrp.EpsilonGammaBox(0.0, 1.0, gamma=gamma)); got a list of candidates.")
  if isinstance(candidates, (Composite, Attributor)) or not isinstance(candidates, Sequence) or not candidates:
    raise TypeError(f"tune: candidates must be a non-empty list of composites, or a function building one from the "
                    f"grid's values; got {candidates!r}.")
  for i, c in enumerate(candidates):
    _check_method(c, f"candidates[{i}]")
  return list(candidates), {}


# ---- stacking candidates of one structure ----------------------------------------------------------------------------

def _host(v) -> np.ndarray:
  if isinstance(v, jax.Array) and jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(v))
  return np.asarray(v)


def _signature(method) -> tuple:
  """Candidates with equal signatures share a compiled program: the pytree structure and the leaves' shapes."""
  leaves, treedef = jax.tree_util.tree_flatten(method)
  return treedef, tuple(np.shape(leaf) for leaf in leaves)


def _stack(methods: list) -> tuple[Any, Any]:
  """One method whose varying leaves are stacked along a new leading axis, and its `vmap` in_axes (0 for stacked
  leaves, None for leaves equal in every candidate: those stay unbatched)."""
  columns = list(zip(*(jax.tree_util.tree_leaves(m) for m in methods)))
  treedef = jax.tree_util.tree_structure(methods[0])
  leaves, axes = [], []
  for column in columns:
    first = _host(column[0])
    if all(np.array_equal(first, _host(v)) for v in column[1:]):
      leaves.append(column[0])
      axes.append(None)
    else:
      leaves.append(jnp.stack([jnp.asarray(v) for v in column]))
      axes.append(0)
  return jax.tree_util.tree_unflatten(treedef, leaves), jax.tree_util.tree_unflatten(treedef, axes)


# ---- scoring -------------------------------------------------------------------------------------------------------

def _default_metric(model, x, relevance, target):
  return metrics.aopc(model, x, relevance, target, steps=16)


def _check_target(target, batch: int, classes: int):
  dtype = target.dtype if hasattr(target, "dtype") else np.asarray(target).dtype
  if not np.issubdtype(dtype, np.integer):
    raise TypeError(f"tune: target must be an int or an int array [B] of class indices; got {target!r}.")
  if np.shape(target) not in ((), (batch,)):
    raise ValueError(f"tune: target must be an int or one int per sample, shape ({batch},); got shape "
                     f"{np.shape(target)}.")
  if not isinstance(target, jax.Array):
    arr = np.asarray(target)
    if arr.min() < 0 or arr.max() >= classes:
      raise ValueError(f"tune: target class indices must lie in [0, {classes}); got {arr.min()} to {arr.max()}.")
  return jnp.broadcast_to(jnp.asarray(target, jnp.int32), (batch,))


_COMPILED: collections.OrderedDict = collections.OrderedDict()


def _cached_score_program(jaxpr, has_params: bool, metric: Callable, batch: int, axes, size: int, chunk_size):
  """`_score_program`, reused across `tune` calls with the same model program, metric (by identity), candidate
  structure and count: repeated searches (e.g. one per data batch) compile once. Keeps the 32 most recent."""
  key = (str(jaxpr), has_params, metric, batch, jax.tree_util.tree_structure(axes), size, chunk_size)
  try:
    hash(key)
  except TypeError:  # an unhashable selector or metric: no reuse
    return _score_program(jaxpr, has_params, metric, batch, axes, size, chunk_size)
  fn = _COMPILED.get(key)
  if fn is None:
    fn = _COMPILED[key] = _score_program(jaxpr, has_params, metric, batch, axes, size, chunk_size)
    while len(_COMPILED) > 32:
      _COMPILED.popitem(last=False)
  _COMPILED.move_to_end(key)
  return fn


def _score_program(jaxpr, has_params: bool, metric: Callable, batch: int, axes, size: int, chunk_size):
  """The jitted function scoring `size` stacked candidates of one structure: `[size, B]`."""

  def score_one(method, consts, params, x, target):
    flat = _jax.jaxpr_as_fun(jaxpr, consts)
    f = lambda *a: flat(*jax.tree_util.tree_leaves(a))[0]  # noqa: E731 - the model, traced once by tune
    relevance = attribute(f, x, method, target=target, params=params if has_params else None).relevance
    forward = (lambda xx: f(params, xx)) if has_params else f
    s = metric(forward, x, relevance, target)
    if jnp.shape(s) != (batch,) or not jnp.issubdtype(jnp.result_type(s), jnp.floating):
      raise ValueError(f"tune: the metric must return one floating score per sample, shape ({batch},); it returned "
                       f"{jnp.result_type(s)} of shape {jnp.shape(s)}. Reduce other axes inside it (e.g. "
                       f"lambda m, x, r, t: metrics.perturbation_curve(m, x, r, t)[:, -1]).")
    return s

  def score_all(methods, consts, params, x, target):
    one = lambda m: score_one(m, consts, params, x, target)  # noqa: E731
    if chunk_size is None or chunk_size >= size:
      # axis_size: leaves equal in every candidate stay unbatched (all of them, for repeated candidates)
      return jax.vmap(one, in_axes=(axes,), axis_size=size)(methods)
    full = jax.tree_util.tree_map(lambda leaf, a: leaf if a == 0 else jnp.broadcast_to(leaf, (size, *jnp.shape(leaf))),
                                  methods, axes)  # lax.map maps every leaf: broadcast the shared ones
    return jax.lax.map(one, full, batch_size=chunk_size)

  return jax.jit(score_all)


def tune(model: Callable, x, candidates: Sequence[Method] | Callable[..., Method], *, target, grid=None,
         params=None, metric: Callable | None = None, maximize: bool = True, samples: int | None = None, key=None,
         chunk_size: int | None = None) -> TuneResult:
  r"""Chooses LRP rule parameters (gamma, epsilon, which layers get which rule) by an explanation-quality metric.

  Each candidate method `c` (a `jaxlrp.Composite`, or an attributor) explains the batch with `jaxlrp.attribute`,
  and the metric scores its relevance per sample; `tune` returns all scores and the candidate with the best mean:

  .. math::
      c^\star = \operatorname*{arg\,max}_{c \in \mathcal C} \; \frac{1}{B} \sum_{b=1}^{B}
      m\big(f, x_b, R_c(x_b, t_b), t_b\big)

  (`arg min` with `maximize=False`), with `R_c` the relevance of candidate `c` for target `t_b` and `m` the metric,
  by default AOPC of the MoRF perturbation curve (`jaxlrp.metrics.aopc(..., steps=16)`: 16 evenly spaced steps
  until every pixel / feature is set to 0). Every candidate is scored on the same samples (and the same random
  draws, if the metric uses a fixed key), so differences between candidates are paired.

  Candidates are either an explicit list, or a function of keyword arguments with a `grid` of values:

  - grid search (`samples=None`): every combination of the grid's values (the Cartesian product, in
    `itertools.product` order);
  - random search (`samples=n`, `key`): n points, each entry drawn independently, uniformly from its list, or by
    calling it with a PRNG key (e.g. `lambda k: 10 ** jax.random.uniform(k, minval=-6, maxval=-1)` for a
    log-uniform epsilon).

  Compilation: candidates with the same pytree structure (the same selectors and rule types; only the numeric
  hyperparameters such as gamma, epsilon or ZBox bounds differ) are stacked and evaluated in one compiled call,
  vmapped over the candidates; a candidate with another structure (e.g. another layer range for Gamma, expressed
  by other selectors) gets its own compiled call. Memory: a vmapped call holds all its candidates' perturbed copies
  at once; `chunk_size` evaluates that many candidates at a time (`jax.lax.map`) instead.

  Args:
    model: `model(x) -> [B, classes]`, or `model(params, x)` when `params` is given (as `jaxlrp.attribute`).
    x: the inputs `[B, ...]` to explain and score (use a tuning split, not the evaluation set).
    candidates: a list of composites / attributors, or a function `(**values) -> Composite` called once per grid
      point, e.g. `lambda gamma: jaxlrp.EpsilonGammaBox(0.0, 1.0, gamma=gamma)`.
    target: an int or an int array `[B]` of class indices (e.g. the predictions).
    grid: with a candidate function, `{name: values}`: a sequence of values per keyword (one-dimensional; a list
      of arrays for array-valued parameters), or, in a random search, a callable `key -> value`.
    params: optional parameters, passed as `model`'s first argument (lets `jaxlrp.Path` selectors see them).
    metric: a callable `(model, x, relevance, target) -> [B]` scores, where `model` takes `x` only (the parameters
      are bound), e.g. `lambda m, x, r, t: metrics.aopc(m, x, r, t, patch=2, baseline="mean")` or
      `metrics.selectivity` with `maximize=False`. It runs inside `jax.jit` and `jax.vmap`: use jax.numpy and the
      `jaxlrp.metrics` functions, and a fixed `key` for random metrics. Default: AOPC(MoRF), 16 steps.
    maximize: whether a higher mean score is better.
    samples: the number of random-search points (`None`: grid search).
    key: the PRNG key (or int seed) of a random search.
    chunk_size: evaluate at most this many candidates of one structure per step (`None`: all at once).

  Returns:
    A `TuneResult`: `candidates`, `values` (`{name: [K values]}`), `scores` `[K, B]`, `mean` and `stderr` `[K]`,
    `best_index`, `best` (the chosen composite) and `best_values`; `table()` formats it as Markdown.

  Raises:
    ValueError: a grid entry that is not a non-empty one-dimensional sequence, a metric that does not return `[B]`
      floating scores, a target of the wrong shape, `samples` without `key`, or all mean scores NaN.
    TypeError: a candidate that is not a composite or attributor, or a candidate function that does not accept the
      grid's names.

  Example:
    >>> import jax, jax.numpy as jnp, jaxlrp
    >>> w1 = jax.random.normal(jax.random.key(0), (6, 8))
    >>> w2 = jax.random.normal(jax.random.key(1), (8, 3))
    >>> f = lambda p, x: jax.nn.relu(x @ p[0]) @ p[1]
    >>> x = jax.random.normal(jax.random.key(2), (16, 6))
    >>> res = jaxlrp.tune(f, x, lambda gamma: jaxlrp.Composite(("dense", jaxlrp.Gamma(gamma))), params=(w1, w2),
    ...                   target=f((w1, w2), x).argmax(-1), grid={"gamma": [0.0, 0.25, 1.0]})
    >>> res.values, res.scores.shape, res.structures
    ({'gamma': [0.0, 0.25, 1.0]}, (3, 16), 1)
    >>> bool(res.mean[res.best_index] == res.mean.max()), res.best == res.candidates[res.best_index]
    (True, True)
  """
  methods, values = _candidates(candidates, grid, samples, key)
  if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool)
                                 or chunk_size < 1):
    raise ValueError(f"tune: chunk_size must be None or an int >= 1; got {chunk_size!r}.")
  metric = _default_metric if metric is None else metric
  if not callable(metric):
    raise TypeError(f"tune: metric must be a callable (model, x, relevance, target) -> [B]; got {metric!r}.")
  x = jnp.asarray(x)
  if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"tune: x must be a floating-point batch [B, ...]; got {x.dtype} of shape {x.shape}.")
  has_params = params is not None
  model, params = with_array_params(model, params)  # an Equinox module passed whole
  args = (params, x) if has_params else (x,)
  closed, _ = _jax.make_jaxpr(model, *args)
  out = closed.out_avals
  if len(out) != 1 or len(out[0].shape) != 2 or out[0].shape[0] != x.shape[0]:
    raise ValueError(f"tune: the model must return one array [B, classes] with B = {x.shape[0]}; it returns "
                     f"{[tuple(a.shape) for a in out]}.")
  target = _check_target(target, x.shape[0], out[0].shape[1])

  groups: dict = {}
  for i, method in enumerate(methods):
    groups.setdefault(_signature(method), []).append(i)
  scores = np.empty((len(methods), x.shape[0]), np.float32)
  for members in groups.values():
    stacked, axes = _stack([methods[i] for i in members])
    fn = _cached_score_program(closed.jaxpr, has_params, metric, x.shape[0], axes, len(members), chunk_size)
    scores[members] = np.asarray(fn(stacked, list(closed.consts), params, x, target))

  mean = scores.mean(axis=1)
  batch = scores.shape[1]
  stderr = scores.std(axis=1, ddof=1) / math.sqrt(batch) if batch > 1 else np.full(len(methods), np.nan, np.float32)
  if np.all(np.isnan(mean)):
    raise ValueError("tune: every candidate's mean score is NaN (the metric returned NaN for some sample of each "
                     "candidate); use a metric without NaNs, e.g. wrap it in jnp.nan_to_num.")
  best = int(np.nanargmax(mean) if maximize else np.nanargmin(mean))
  return TuneResult(tuple(methods), values, scores, mean, stderr, best, bool(maximize), len(groups))
