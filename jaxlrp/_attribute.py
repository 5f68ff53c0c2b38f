"""`attribute` (explain chosen outputs with LRP or a gradient method, compiled once per program), `normalize`
(scale relevance maps for display and comparison) and `show_rules` (the assignment table)."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlrp import _jax
from jaxlrp._attributors import Attributor
from jaxlrp._composites import Composite, Selector, as_selector
from jaxlrp._core import _walk, arrays_only, lrp, lrp_vjp, plan, with_array_params
from jaxlrp._rules import Rule

__all__ = ["Attribution", "attribute", "normalize", "RuleRow", "show_rules"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Attribution:
  """The result of `attribute`.

  Attributes:
    relevance: the attribution of the explained input. With one target per sample it has the shape and dtype of
      `x` (`[B, ...]`). With K targets per sample (`target` of shape `[B, K]`, `"all"`, K masks, or a callable
      returning `[B, K]`) it is `[B, K, ...]`: `relevance[:, k]` explains the k-th target of each sample.
      For LRP, sample b's map sums to its explained score minus what biases and stabilisers absorb.
    output: the model output `f(x)`.
    target: what was explained: the class indices (`[B]` or `[B, K]`; `"all"` gives `arange(C)` broadcast to
      `[B, C]`), the mask for a mask target, `None` for a callable target.
    score: the explained score of each sample, `[B]`, or of each sample and target, `[B, K]`: `f(x)[b, t]`, the
      masked sum, or the callable's value.
    layers: with `attribute(..., layers=...)`, a dict `{label: relevance of that layer's output}` from the same
      backward pass (labels as in `attribute`); each entry is shaped like the layer output, `[B, ...]`, or
      `[B, K, ...]` for K targets. `None` when no layers were asked for.
  """

  relevance: Any
  output: Any
  target: Any
  score: Any = None
  layers: Any = None


@dataclasses.dataclass(frozen=True)
class _Target:
  """How a `target` argument seeds the backward pass. The static part (`kind`, `multi`, the traced score program)
  is part of the compiled function; the data (indices, mask, the score program's constants) is an argument."""

  kind: str  # "index" | "all" | "mask" | "fn"
  multi: bool  # K targets per sample: the cotangents get a leading K axis, the relevance a K axis at position 1
  fn: Any = None  # kind "fn": the Jaxpr of the score callable

  def key(self):
    return self.kind, self.multi, None if self.fn is None else str(self.fn)

  def _score_fn(self, consts):
    flat = _jax.jaxpr_as_fun(self.fn, consts)
    return lambda out: flat(out)[0]

  def cotangent(self, out, data):
    """The output cotangent: `out.shape`, or `[K, *out.shape]` for K targets."""
    if self.kind == "index":
      if self.multi:
        return jnp.moveaxis(jax.nn.one_hot(data, out.shape[1], dtype=out.dtype), 1, 0)
      return jax.nn.one_hot(jnp.broadcast_to(data, out.shape[:1]), out.shape[1], dtype=out.dtype)
    if self.kind == "all":
      c = out.shape[1]
      return jnp.broadcast_to(jnp.eye(c, dtype=out.dtype)[:, None, :], (c, *out.shape))
    if self.kind == "mask":
      mask = data.astype(out.dtype)
      return jnp.moveaxis(mask, 1, 0) if self.multi else mask
    # A score s(out): the cotangent is ds/dout (one backward through s per target).
    score, score_vjp = jax.vjp(self._score_fn(data), out)
    if self.multi:
      k = score.shape[1]
      seeds = jnp.broadcast_to(jnp.eye(k, dtype=score.dtype)[:, None, :], (k, *score.shape))
      return jax.vmap(score_vjp)(seeds)[0]
    return score_vjp(jnp.ones_like(score))[0]

  def score(self, out, data):
    if self.kind == "index":
      idx = data if self.multi else jnp.broadcast_to(data, out.shape[:1])[:, None]
      picked = jnp.take_along_axis(out, idx, axis=1)
      return picked if self.multi else picked[:, 0]
    if self.kind == "all":
      return out
    if self.kind == "mask":
      mask = data.astype(out.dtype)
      prod = out[:, None] * mask if self.multi else out * mask
      return prod.sum(axis=tuple(range(2 if self.multi else 1, prod.ndim)))
    return self._score_fn(data)(out)

  def record(self, out, data):
    if self.kind == "index":
      return data if self.multi else jnp.broadcast_to(data, out.shape[:1])
    if self.kind == "all":
      return jnp.broadcast_to(jnp.arange(out.shape[1]), out.shape)
    return data if self.kind == "mask" else None


def _shape_dtype(target):
  if hasattr(target, "shape") and hasattr(target, "dtype"):
    return tuple(target.shape), np.dtype(target.dtype)
  arr = np.asarray(target)
  return arr.shape, arr.dtype


def _prepare_target(target, out_aval) -> tuple[_Target, Any]:
  """Checks `target` against the output (shapes and dtypes only: no host round trip) and splits it into the
  static `_Target` and its data."""
  shape = tuple(out_aval.shape)
  batch = shape[0] if shape else None
  classes_hint = ("For other outputs pass a mask of the output's shape or a callable target, or use "
                  "jax.vjp(jaxlrp.lrp(f, composite), x) with your own cotangent.")
  if isinstance(target, str):
    if target != "all":
      raise ValueError(f'target must be an int, an int array [B] or [B, K], "all", a mask or a callable; '
                       f'got the string {target!r}.')
    if len(shape) != 2:
      raise ValueError(f'target="all" needs f(x) of shape [batch, classes]; got an output of shape {shape}. '
                       + classes_hint)
    return _Target("all", True), None
  if callable(target):
    try:
      closed = jax.make_jaxpr(target)(jax.ShapeDtypeStruct(shape, out_aval.dtype))
    except Exception as e:  # noqa: BLE001 - re-raised with what the callable receives
      raise ValueError(f"target callable failed on the model output (shape {shape}, dtype {out_aval.dtype}): "
                       f"{type(e).__name__}: {e}") from e
    outs = closed.out_avals
    if len(outs) != 1 or not outs[0].shape or outs[0].shape[0] != batch or len(outs[0].shape) > 2 \
        or not jnp.issubdtype(outs[0].dtype, jnp.floating):
      got = ", ".join(f"{a.dtype}{list(a.shape)}" for a in outs)
      raise ValueError(f"a target callable must map the output (shape {shape}) to one floating score per sample, "
                       f"shape ({batch},), or K scores per sample, shape ({batch}, K); it returned {got}.")
    return _Target("fn", len(outs[0].shape) == 2, closed.jaxpr), list(closed.consts)
  tshape, dtype = _shape_dtype(target)
  if np.issubdtype(dtype, np.integer):
    if len(shape) != 2:
      raise ValueError(f"integer targets index the classes of f(x) of shape [batch, classes]; got an output of "
                       f"shape {shape}. " + classes_hint)
    if tshape not in ((), (batch,)) and not (len(tshape) == 2 and tshape[0] == batch):
      raise ValueError(f"target must be an int or one int per sample (shape ({batch},)), or K ints per sample "
                       f"(shape ({batch}, K)); got shape {tshape} for an output of shape {shape}.")
    if not isinstance(target, jax.Array):  # host values are checked here; device arrays are not read back
      arr = np.asarray(target)
      if arr.size and (arr.min() < 0 or arr.max() >= shape[1]):
        raise ValueError(f"target class indices must lie in [0, {shape[1]}); got values from {arr.min()} to "
                         f"{arr.max()}.")
    return _Target("index", len(tshape) == 2), jnp.asarray(target)
  if dtype == np.bool_ or np.issubdtype(dtype, np.floating):
    if tshape == shape:
      return _Target("mask", False), jnp.asarray(target)
    if len(tshape) == len(shape) + 1 and tshape[0] == batch and tshape[2:] == shape[1:]:
      return _Target("mask", True), jnp.asarray(target)
    raise TypeError(f"target must hold integer class indices, or be a mask (boolean or float) of the output's "
                    f"shape {shape} (or K masks, shape ({batch}, K, {', '.join(map(str, shape[1:]))})); got "
                    f"dtype {dtype} and shape {tshape}.")
  raise TypeError(f"target must hold integer class indices or be a boolean/float mask; got dtype {dtype}.")


def _layer_dict(layers) -> dict | None:
  """`layers` as `{label: selector}`: a dict keeps its labels; a list (or tuple) of selectors is labelled by
  position, and a single selector is the list `[selector]` (label 0)."""
  if layers is None:
    return None
  if isinstance(layers, dict):
    found = dict(layers)
  elif isinstance(layers, (list, tuple)):
    found = dict(enumerate(layers))
  elif isinstance(layers, (str, Selector)) or callable(layers):
    found = {0: layers}
  else:
    raise TypeError(f"layers must be a selector (e.g. jaxlrp.Path('*Conv_1*')), a list of selectors or a dict "
                    f"{{label: selector}}; got {layers!r}.")
  if not found:
    raise ValueError("layers is empty; pass at least one selector, or leave layers=None.")
  try:
    sorted(found)  # the result dict is a pytree: JAX sorts its keys
  except TypeError:
    raise TypeError(f"the labels of layers must be of one sortable type (e.g. all strings); got "
                    f"{list(found)!r}.") from None
  for label, sel in found.items():
    try:
      found[label] = as_selector(sel)
    except TypeError as e:
      raise TypeError(f"layers[{label!r}]: {e}") from None
  return found


def _layers_key(layers: dict | None):
  """The layer selectors as part of the compile cache key (the selectors themselves where hashable: a `Where`
  predicate is keyed by identity, which the cache entry keeps alive)."""
  if layers is None:
    return None
  key = tuple(layers.items())
  try:
    hash(key)
  except TypeError:
    return repr(key)
  return key


def _attribution_impl(jaxpr, strict, has_params, spec, chunk, layers, consts, params, x, target, method):
  flat_fn = _jax.jaxpr_as_fun(jaxpr, consts)
  f = lambda *args: flat_fn(*jax.tree_util.tree_leaves(args))[0]  # noqa: E731 - f's one output
  is_lrp = isinstance(method, Composite)
  model = lrp(f, method, argnums=1 if has_params else 0, strict=strict) if is_lrp else f
  forward = (lambda xx: model(params, xx)) if has_params else model

  def vjp_of(xx):
    """`(out, vjp)`; `vjp(c)` is the relevance (gradient) of `xx`, or `(relevance, {label: layer relevance})`."""
    if layers is None:
      out, vjp = jax.vjp(forward, xx)
      return out, lambda c: vjp(c)[0]
    args = (params, xx) if has_params else (xx,)
    return lrp_vjp(f, method, *args, argnums=len(args) - 1, layers=layers, strict=strict)

  def pullback(xx):
    # One forward; the K cotangents share it (vmap of the VJP function, not of the forward).
    out, vjp = vjp_of(xx)
    cot = spec.cotangent(out, target)
    if not spec.multi:
      return out, vjp(cot)
    if chunk is None or chunk >= cot.shape[0]:
      return out, jax.vmap(vjp)(cot)
    return out, jax.lax.map(vjp, cot, batch_size=chunk)

  out, relevance = pullback(x) if is_lrp else method.explain(forward, pullback, x)
  layer_relevance = None
  if layers is not None:
    relevance, layer_relevance = relevance
  if spec.multi:  # the K axis of the cotangents goes after the batch axis
    relevance, layer_relevance = jax.tree_util.tree_map(lambda r: jnp.moveaxis(r, 0, 1),
                                                        (relevance, layer_relevance))
  return Attribution(relevance, out, spec.record(out, target), spec.score(out, target), layer_relevance)


_compiled: collections.OrderedDict = collections.OrderedDict()


def _compiled_for(key, jaxpr, strict, has_params, spec, chunk, layers):
  fn = _compiled.get(key)
  if fn is None:
    fn = jax.jit(lambda consts, params, x, target, method: _attribution_impl(
        jaxpr, strict, has_params, spec, chunk, layers, consts, params, x, target, method))
    _compiled[key] = fn
    while len(_compiled) > 32:
      _compiled.popitem(last=False)
  _compiled.move_to_end(key)
  return fn


def _check_method(method) -> None:
  if isinstance(method, (Composite, Attributor)):
    return
  if isinstance(method, Rule):
    hint = (" jaxlrp.Gradient is the LRP rule for single ops; the plain-gradient attribution is "
            "jaxlrp.VanillaGradient()." if type(method).__name__ == "Gradient" else "")
    raise TypeError(f"attribute needs a jaxlrp.Composite or an attributor, not the rule {method!r}.{hint} To apply "
                    f"a rule to every layer wrap it: jaxlrp.Composite(('linear', {method!r})).")
  raise TypeError(f"attribute needs a jaxlrp.Composite (e.g. jaxlrp.EpsilonPlusFlat()) or an attributor "
                  f"(jaxlrp.VanillaGradient(), GradientXInput(), SmoothGrad(), IntegratedGradients()); got {method!r}.")


def attribute(f: Callable, x, method: Composite | Attributor, *, target, params=None, layers=None,
              strict: bool = True, target_batch_size: int | None = None) -> Attribution:
  """Explains chosen outputs of `f(x)` with LRP (a `Composite`) or a gradient-based attributor.

  `method` is a `jaxlrp.Composite` (LRP with its rules) or one of `jaxlrp.VanillaGradient()`,
  `jaxlrp.GradientXInput()`, `jaxlrp.SmoothGrad(...)`, `jaxlrp.IntegratedGradients(...)`: the same call compares
  methods on the same targets.

  Targets. Each target defines a score per sample, and the output cotangent of the backward pass is the gradient
  of that score with respect to the output, `c = ds/dout`:

  - an int `t`, or an int array `[B]` (one class per sample): `s_b = f(x)[b, t_b]`, `c` one-hot;
  - an int array `[B, K]`: K classes per sample, all in one compiled call (one forward pass; the backward pass is
    vmapped over the K one-hot cotangents); the relevance gets a K axis, `[B, K, ...]`;
  - `"all"`: every class, `[B, C, ...]` (K = C);
  - a boolean or float mask of the output's shape: the masked sum `s_b = sum_j mask[b, j] * f(x)[b, j]`, `c = mask`
    (e.g. a region of a segmentation output); K masks `[B, K, *out.shape[1:]]` give a K axis;
  - a callable `score(out)` returning one score per sample `[B]` (or K scores, `[B, K]`), e.g.
    `lambda out: out[:, 3] - out[:, 5]` (a contrast) or `lambda out: out @ ref` (a similarity to a reference
    direction); `c = ds/dout`, evaluated at `out`. Score b must depend on `out[b]` only.

  The gradient-based attributors explain the score itself (their gradient is `ds/dx`, evaluated along the noise or
  path for SmoothGrad and Integrated Gradients). LRP propagates in gradient form (the relevance of a value `v` is
  `v` times its cotangent), so it starts from the output relevance `out * c`. For the index and mask targets, and
  any callable linear in `out` (a contrast, a dot product with a fixed vector), this sums to the score. In general
  it sums to `sum_j out_j ds/dout_j`, which equals `s` only for scores homogeneous of degree one in `out`: for a
  score that ignores the scale of `out` (cosine similarity) the total is zero. To explain a similarity to `ref`,
  use `lambda out: out @ (ref / jnp.linalg.norm(ref))` rather than the cosine.

  Intermediate relevance (LRP only). `layers` reads out the relevance of chosen layers' outputs in the same
  backward pass (no second pass), as `jaxlrp.lrp_vjp` does: `res.layers[label]` is shaped like the layer output
  (`[B, ...]`, or `[B, K, ...]` for K targets, like `relevance`). A layer's output is its value after the folded
  epilogue (e.g. after a folded BatchNorm), before the activation. `layers` is a dict `{label: selector}`, a list
  of selectors (labelled by position: `res.layers[0]`, `res.layers[1]`, ...), or one selector (label 0). Each
  selector must match exactly one recognised op, e.g. `jaxlrp.Path("*Conv_1*")`, `jaxlrp.Name("*Dense_0*")`, or
  `jaxlrp.Last(kinds=("conv",))`; `jaxlrp.show_rules` lists the ops. Under LRP-0 on a bias-free ReLU network each
  layer's relevance sums to the score, like the input's. The gradient attributors have no layer relevance:
  `layers` raises for them.

  Compilation: the program is traced once per call, and compiled once per distinct program and target kind:
  constants `f` closes over are passed to the compiled function as arguments rather than embedded (compiling large
  closed-over weights is slow); the composite's and the attributor's hyperparameters, the target indices, mask and
  the constants of a target callable are arguments too. Works under `jax.jit` and `jax.vmap` (no host round
  trips); integer targets given as host values (ints, lists, NumPy) are range-checked, device arrays are not (an
  index out of range explains nothing: zero relevance).

  Args:
    f: the model, `f(x)` or, when `params` is given, `f(params, x)` (e.g. a linen `model.apply`). Passing
      `params` lets `jaxlrp.Path` selectors see parameter paths. One output array, `[B, C]` for class targets.
    x: the input batch, `[B, ...]`, floating point.
    method: a `jaxlrp.Composite` or an attributor.
    target: an int, an int array `[B]` or `[B, K]`, `"all"`, a mask, or a callable, as above.
    params: optional parameters, passed as `f`'s first argument (a pytree; an Equinox module may be passed whole:
      its non-array leaves are constants).
    strict: see `jaxlrp.lrp` (LRP only).
    layers: optional layers whose output relevance to return: a selector, a list of selectors or a dict
      `{label: selector}`, as above (LRP only).
    target_batch_size: with K targets, run the backward pass for at most this many of them at a time
      (`jax.lax.map`), to bound memory: all K at once cost about K single-target backward passes' memory (e.g.
      `"all"` with 1000 classes). `None`: all K in one vmapped pass (fastest).

  Returns:
    An `Attribution(relevance, output, target, score, layers)`; `relevance` is `[B, ...]`, or `[B, K, ...]` for K
    targets; `layers` is `None` unless `layers` was given.

  Example:
    >>> import jax, jax.numpy as jnp, jaxlrp
    >>> w = jnp.array([[1.0, -1.0], [2.0, 0.5]])
    >>> res = jaxlrp.attribute(lambda x: x @ w, jnp.ones((1, 2)), jaxlrp.EpsilonPlus(), target=0)
    >>> res.output
    Array([[ 3. , -0.5]], dtype=float32)
    >>> res.relevance  # sums to the score 3
    Array([[0.9999997, 1.9999994]], dtype=float32)
    >>> jaxlrp.attribute(lambda x: x @ w, jnp.ones((1, 2)), jaxlrp.EpsilonPlus(), target="all").relevance.shape
    (1, 2, 2)
    >>> contrast = jaxlrp.attribute(lambda x: x @ w, jnp.ones((1, 2)), jaxlrp.GradientXInput(),
    ...                             target=lambda out: out[:, 0] - out[:, 1])
    >>> contrast.relevance, contrast.score
    (Array([[2. , 1.5]], dtype=float32), Array([3.5], dtype=float32))

    Intermediate relevance: the hidden layer of a two-layer ReLU net, under LRP-0 (every layer sums to the score).

    >>> p = {"w1": jnp.array([[1.0, -1.0], [2.0, 1.0]]), "w2": jnp.array([[1.0, 0.0], [1.0, 2.0]])}
    >>> net = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
    >>> res = jaxlrp.attribute(net, jnp.ones((1, 2)), jaxlrp.Composite(("linear", jaxlrp.Epsilon(0.0))),
    ...                        target=0, params=p, layers={"hidden": jaxlrp.Path("w1")})
    >>> res.score, res.layers["hidden"], res.relevance
    (Array([3.], dtype=float32), Array([[3., 0.]], dtype=float32), Array([[1., 2.]], dtype=float32))
  """
  _check_method(method)
  layers = _layer_dict(layers)
  if layers is not None and not isinstance(method, Composite):
    raise TypeError(f"layers= reads relevance out of the LRP backward pass and needs a jaxlrp.Composite; "
                    f"{type(method).__name__} is a gradient attributor, which has no layer relevance. For the "
                    f"gradient at an intermediate value use jax.vjp on the part of f above it; for LRP at that "
                    f"layer pass a composite (e.g. jaxlrp.EpsilonPlusFlat()).")
  has_params = params is not None
  f, params = with_array_params(f, params)  # an Equinox module passed whole: its other leaves are constants
  args = (params, x) if has_params else (x,)
  if not isinstance(method, Composite) and not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise TypeError(f"attribute explains a floating-point input; got x of dtype {jnp.result_type(x)}. Gradient "
                    f"methods cannot differentiate integers: explain an embedding or a float cast inside f.")
  if isinstance(method, Attributor):
    method.check(x)
  closed, _ = _jax.make_jaxpr(f, *args)
  out_avals = closed.out_avals
  if len(out_avals) != 1:
    raise ValueError(f"attribute expects f to return one array; it returns {len(out_avals)} arrays. Wrap f to "
                     f"select the output to explain.")
  spec, data = _prepare_target(target, out_avals[0])
  if target_batch_size is not None and (not isinstance(target_batch_size, int) or isinstance(target_batch_size, bool)
                                        or target_batch_size < 1):
    raise ValueError(f"target_batch_size must be None or an int >= 1; got {target_batch_size!r}.")
  key = (str(closed.jaxpr), strict, has_params, spec.key(), target_batch_size, _layers_key(layers))
  fn = _compiled_for(key, closed.jaxpr, strict, has_params, spec, target_batch_size, layers)
  return fn(list(closed.consts), params, x, data, method)


_NORMALIZATIONS = ("sum", "abs_sum", "max_abs")


def normalize(relevance, method: str = "max_abs", *, batch_dims: int = 1):
  """Scales each relevance map by its sum, its sum of absolute values, or its largest absolute value.

  - `"sum"`: each map sums to 1 (divides by the signed total, e.g. the explained score under LRP). Where positive
    and negative relevance nearly cancel the total is small and the result large: prefer `"abs_sum"` to compare maps.
  - `"abs_sum"`: the absolute values of each map sum to 1 (L1 normalisation; signs kept).
  - `"max_abs"`: the largest absolute value of each map is 1, values in [-1, 1] (for a colour map centred at zero).

  A map whose divisor is 0 (all zero) stays 0. Low-precision inputs are scaled in float32 and cast back.

  Args:
    relevance: an array `[B, ...]` (or `[B, K, ...]`, from K targets).
    method: "sum", "abs_sum" or "max_abs".
    batch_dims: how many leading axes index separate maps: 1 for `[B, ...]` (per sample), 2 for `[B, K, ...]`
      (per sample and target), 0 to scale the whole array as one map.

  Example:
    >>> import jax.numpy as jnp, jaxlrp
    >>> r = jnp.array([[1.0, 3.0], [2.0, -1.0]])
    >>> jaxlrp.normalize(r, "sum")
    Array([[ 0.25,  0.75],
           [ 2.  , -1.  ]], dtype=float32)
    >>> jaxlrp.normalize(r, "max_abs", batch_dims=0)
    Array([[ 0.33333334,  1.        ],
           [ 0.6666667 , -0.33333334]], dtype=float32)
  """
  if method not in _NORMALIZATIONS:
    raise ValueError(f"normalize: method must be one of {_NORMALIZATIONS}; got {method!r}.")
  relevance = jnp.asarray(relevance)
  if not jnp.issubdtype(relevance.dtype, jnp.floating):
    raise TypeError(f"normalize expects floating-point relevance; got dtype {relevance.dtype}.")
  if not isinstance(batch_dims, int) or isinstance(batch_dims, bool) or not 0 <= batch_dims < max(relevance.ndim, 1):
    raise ValueError(f"normalize: batch_dims must be an int in [0, {relevance.ndim}) for relevance of shape "
                     f"{relevance.shape}; got {batch_dims!r}.")
  if relevance.size == 0:
    return relevance
  r = relevance.astype(jnp.promote_types(relevance.dtype, jnp.float32))
  axes = tuple(range(batch_dims, r.ndim))
  if method == "sum":
    divisor = r.sum(axis=axes, keepdims=True)
  elif method == "abs_sum":
    divisor = jnp.abs(r).sum(axis=axes, keepdims=True)
  else:
    divisor = jnp.abs(r).max(axis=axes, keepdims=True)
  zero = divisor == 0
  return jnp.where(zero, 0, r / jnp.where(zero, 1, divisor)).astype(relevance.dtype)


@dataclasses.dataclass(frozen=True)
class RuleRow:
  """One row of `show_rules`: which rule jaxlrp will apply to which recognised op."""

  index: int
  kind: str
  name: str
  path: str | None
  rule: Any
  source: str


def show_rules(f: Callable, composite: Composite, *args, argnums=0, strict: bool = True, print_table: bool = True):
  """Prints and returns the rule assignment for `f(*args)`: name stack | parameter path | op kind | rule.

  Use it before explaining a model you did not write, to see what jaxlrp recognised and which rule each op gets.

  Example:
    >>> import jax.numpy as jnp, jaxlrp
    >>> f = lambda p, x: jnp.maximum(x @ p["w"], 0.0) @ p["v"]
    >>> p = {"w": jnp.ones((3, 4)), "v": jnp.ones((4, 2))}
    >>> rows = jaxlrp.show_rules(f, jaxlrp.EpsilonPlusFlat(), p, jnp.ones((1, 3)), argnums=1, print_table=False)
    >>> [(r.kind, r.path, type(r.rule).__name__) for r in rows]
    [('dense', 'w', 'Flat'), ('activation', None, 'Pass'), ('dense', 'v', 'Epsilon')]
  """
  f, args = arrays_only(f, args)
  p = plan(f, composite, args, argnums, strict)
  rows = [RuleRow(op.index, op.kind, op.name, op.path, rule, op.source)
          for q in _walk(p) for op, rule in zip(q.ops, q.rules) if op.kind not in ("scan", "cond")]
  if print_table:
    header = ("#", "name stack", "parameter path", "op", "rule")
    body = [(str(r.index), r.name or "-", r.path or "-", r.kind,
             repr(r.rule) if r.rule is not None else "none (raises if relevance reaches it)") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print(line(header))
    print("-+-".join("-" * w for w in widths))
    for b in body:
      print(line(b))
    if p.analysis.unsupported:
      print("\nOps without a rule on the data path (relevance reaching them raises with strict=True):")
      for e, reason in p.analysis.unsupported:
        print(f"  {reason} at {e.name or '<top level>'} {_jax.source_line(e)}")
  return rows
