"""`attribute` (explain class scores, compiled once per program) and `show_rules` (the assignment table)."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlrp import _jax
from jaxlrp._composites import Composite
from jaxlrp._core import _walk, lrp, plan

__all__ = ["Attribution", "attribute", "RuleRow", "show_rules"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Attribution:
  """The result of `attribute`.

  Attributes:
    relevance: relevance of the explained input, same shape and dtype; sample b sums to its score minus what
      biases and stabilisers absorb.
    output: the model output `f(x)`, shape `[B, C]`.
    target: the explained class of each sample, shape `[B]`.
  """

  relevance: Any
  output: Any
  target: Any


def _check_target(target, out_shape):
  if len(out_shape) != 2:
    raise ValueError(f"attribute expects f(x) of shape [batch, classes]; got an output of shape {out_shape}. "
                     f"For other outputs use jax.vjp(jaxlrp.lrp(f, composite), x) with your own cotangent.")
  shape = np.shape(target)
  if shape not in ((), (out_shape[0],)):
    raise ValueError(f"target must be an int or one int per sample (shape ({out_shape[0]},)); got shape {shape} "
                     f"for an output of shape {out_shape}.")
  if not np.issubdtype(np.asarray(target).dtype if not hasattr(target, "dtype") else target.dtype, np.integer):
    raise TypeError(f"target must hold integer class indices; got dtype "
                    f"{getattr(target, 'dtype', type(target).__name__)}.")


def _attribution_impl(jaxpr, strict, has_params, consts, params, x, target, composite):
  flat_fn = _jax.jaxpr_as_fun(jaxpr, consts)
  f = lambda *args: flat_fn(*jax.tree_util.tree_leaves(args))[0]  # noqa: E731 - f's one output
  g = lrp(f, composite, argnums=1 if has_params else 0, strict=strict)
  args = (params, x) if has_params else (x,)
  out, vjp = jax.vjp(lambda xx: g(*args[:-1], xx), x)
  onehot = jax.nn.one_hot(jnp.broadcast_to(target, out.shape[:1]), out.shape[1], dtype=out.dtype)
  (relevance,) = vjp(onehot)
  return Attribution(relevance, out, jnp.broadcast_to(target, out.shape[:1]))


_compiled: collections.OrderedDict = collections.OrderedDict()


def _compiled_for(key, jaxpr, strict, has_params):
  fn = _compiled.get(key)
  if fn is None:
    fn = jax.jit(lambda consts, params, x, target, composite: _attribution_impl(
        jaxpr, strict, has_params, consts, params, x, target, composite))
    _compiled[key] = fn
    while len(_compiled) > 32:
      _compiled.popitem(last=False)
  _compiled.move_to_end(key)
  return fn


def attribute(f: Callable, x, composite: Composite, *, target, params=None, strict: bool = True) -> Attribution:
  """Explains the class scores `f(x)[b, target_b]` with the composite's LRP rules.

  Sample b starts from relevance equal to its score (all rules are linear in this seed). The program is traced
  once per call, and compiled once per distinct program: constants `f` closes over are passed to the compiled
  function as arguments rather than embedded (compiling large closed-over weights is slow), and the composite's
  hyperparameters are arguments too. Works under `jax.jit` and `jax.vmap` (no host round trips).

  Args:
    f: the model, `f(x)` or, when `params` is given, `f(params, x)` (e.g. a linen `model.apply`). Passing
      `params` lets `jaxlrp.Path` selectors see parameter paths.
    x: the input batch, `[B, ...]`, floating point.
    composite: a `jaxlrp.Composite`.
    target: an int, or integer array `[B]` with one class per sample.
    params: optional parameters, passed as `f`'s first argument.
    strict: see `jaxlrp.lrp`.

  Returns:
    An `Attribution(relevance, output, target)`.

  Example:
    >>> import jax, jax.numpy as jnp, jaxlrp
    >>> w = jnp.array([[1.0, -1.0], [2.0, 0.5]])
    >>> res = jaxlrp.attribute(lambda x: x @ w, jnp.ones((1, 2)), jaxlrp.EpsilonPlus(), target=0)
    >>> res.output
    Array([[ 3. , -0.5]], dtype=float32)
    >>> res.relevance  # sums to the score 3
    Array([[0.9999997, 1.9999994]], dtype=float32)
  """
  if not isinstance(composite, Composite):
    raise TypeError(f"attribute needs a jaxlrp.Composite (e.g. jaxlrp.EpsilonPlusFlat()); got {composite!r}.")
  has_params = params is not None
  args = (params, x) if has_params else (x,)
  closed, _ = _jax.make_jaxpr(f, *args)
  out_avals = closed.out_avals
  if len(out_avals) != 1:
    raise ValueError(f"attribute expects f to return one array [batch, classes]; it returns {len(out_avals)} "
                     f"arrays. Wrap f to select the output to explain.")
  _check_target(target, tuple(out_avals[0].shape))
  key = (str(closed.jaxpr), strict, has_params)
  fn = _compiled_for(key, closed.jaxpr, strict, has_params)
  return fn(list(closed.consts), params, x, jnp.asarray(target), composite)


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
