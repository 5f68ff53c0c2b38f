"""Concept relevance (CRP, Achtibat et al. 2023, "From attribution maps to human-understandable explanations
through Concept Relevance Propagation", Nature Machine Intelligence 5): relevance conditioned on channels of a
layer, and relevance maximisation (the reference inputs of a dataset that use a concept most).

The conditional relevance of input `x` for concept `c` of layer `L` is the LRP backward pass in which, on arrival
at `L`, the relevance of every channel but `c` is set to zero:

.. math:: R(x \\mid c) = \\mathrm{LRP}_{x \\leftarrow L}\\big(R_L \\odot \\mathbb{1}[\\text{channel} = c]\\big)

Since the backward pass below `L` is linear in the relevance arriving at `L`, the conditional relevances of all
channels of `L` sum to the relevance that flows through `L` (all of it, when every path from the input to the
output passes `L`). Here the backward pass above `L` runs once; the one below `L` runs once per concept, all
concepts in one vmapped call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlrp._composites import Composite
from jaxlrp._core import arrays_only, lrp_vjp, plan, run, select_layers, with_array_params

__all__ = ["ConceptRelevance", "conditional_relevance", "relevance_maximization"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ConceptRelevance:
  """The result of `conditional_relevance`.

  Attributes:
    relevance: `[K, B, *x.shape[1:]]`, the input relevance conditioned on each of the K channels.
    channel_relevance: `[B, K]`, the relevance of each channel at the layer (summed over its other axes).
    layer_relevance: the relevance of the whole layer output, `[B, ...]` (unconditioned).
    output: the model output `f(x)`, `[B, C]`.
    target: the explained class of each sample, `[B]`.
    channels: `[K]`, the channel indices.
  """

  relevance: Any
  channel_relevance: Any
  layer_relevance: Any
  output: Any
  target: Any
  channels: Any


def _seed(out, target):
  if jnp.ndim(out) != 2:
    raise ValueError(f"conditional_relevance expects f(x) of shape [batch, classes]; got shape {jnp.shape(out)}.")
  target = jnp.argmax(out, axis=1) if target is None else jnp.broadcast_to(jnp.asarray(target), out.shape[:1])
  return jax.nn.one_hot(target, out.shape[1], dtype=out.dtype), target


def conditional_relevance(f: Callable, x, composite: Composite, *, layer, target=None, channels=None,
                          params=None, axis: int = -1, strict: bool = True) -> ConceptRelevance:
  r"""Concept-conditional relevance (CRP) of `x` for channels of one layer, all channels in one call.

  Args:
    f: `f(x)` or, with `params`, `f(params, x)`, returning class scores `[B, C]`.
    x: the input batch.
    composite: the LRP composite (e.g. `jaxlrp.EpsilonPlusFlat()`).
    layer: a selector matching exactly one recognised op (e.g. `jaxlrp.Path("*Conv_1*")`); the concept lives in
      the op's output (after its folded epilogue).
    target: the explained class (int or one per sample); `None` explains the predicted class.
    channels: the channel indices to condition on (default: all channels of the layer).
    params: the first argument of `f`, a constant of the explanation.
    axis: the channel axis of the layer output (last by default: NHWC convs, `[B, T, D]` hidden states).

  Returns:
    A `ConceptRelevance`; `relevance.sum(0)` over all channels is the relevance that flows through the layer.

  Example:
    >>> import jax, jax.numpy as jnp, jaxlrp
    >>> def f(w, x):
    ...   return jax.nn.relu(x @ w[0]) @ w[1]
    >>> w = (jnp.array([[1.0, 2.0], [1.0, -1.0]]), jnp.array([[1.0], [1.0]]))
    >>> crp = jaxlrp.conditional_relevance(f, jnp.array([[1.0, 1.0]]), jaxlrp.Composite(("dense", jaxlrp.Zero())),
    ...                                    layer=jaxlrp.Path("0"), params=w, target=0)
    >>> crp.channel_relevance.tolist()  # hidden units 2 and 1: the score 3 splits by channel
    [[2.0, 1.0]]
    >>> crp.relevance[:, 0].tolist()    # input relevance through each channel
    [[1.0, 1.0], [2.0, -1.0]]
  """
  args = (x,) if params is None else (params, x)
  argnum = len(args) - 1
  f, args = arrays_only(f, args)
  p = plan(f, composite, args, argnum, strict)
  unit = select_layers(p, {"layer": layer})["layer"]
  v_id = unit.outs[0]
  aval = p.program.avals[v_id]
  if len(aval.shape) < 2 or aval.shape[0] != jnp.shape(x)[0]:
    raise ValueError(f"The layer output has shape {aval.shape}; conditional relevance needs a batch axis first "
                     f"(batch {jnp.shape(x)[0]}) and a channel axis.")
  ax = axis % len(aval.shape)
  if ax == 0:
    raise ValueError("axis must name the channel axis of the layer output, not its batch axis 0.")
  n_channels = aval.shape[ax]
  channels = jnp.arange(n_channels) if channels is None else jnp.asarray(channels)
  p.tapped, p.tap_cotangent = frozenset({v_id}), True
  head = list(jax.tree_util.tree_leaves(args[:argnum]))

  def full(xx, d):
    return jax.tree_util.tree_unflatten(p.out_tree, run(p, head + jax.tree_util.tree_leaves(xx), {v_id: d}))

  def lower(xx):
    return run(p, head + jax.tree_util.tree_leaves(xx), outputs=[v_id])[0]

  out, vjp_full = jax.vjp(full, x, jnp.zeros(aval.shape, aval.dtype))
  seed, target = _seed(out, target)
  _, cot = vjp_full(seed)  # the cotangent arriving at the layer (gradient form: relevance = value * cotangent)
  value, vjp_lower = jax.vjp(lower, x)
  layer_rel = value * cot
  shape = [1] * len(aval.shape)
  shape[ax] = n_channels
  masks = jax.nn.one_hot(channels, n_channels, dtype=cot.dtype)  # [K, n_channels]
  masks = masks.reshape((-1, *shape))
  relevance = jax.vmap(lambda m: vjp_lower(cot * m)[0])(masks)
  other = tuple(i for i in range(len(aval.shape)) if i not in (0, ax))
  channel_rel = jnp.take(layer_rel.sum(axis=other), channels, axis=1)
  return ConceptRelevance(relevance, channel_rel, layer_rel, out, target, channels)


def relevance_maximization(f: Callable, batches: Iterable, composite: Composite, *, layer, k: int = 8,
                           target=None, params=None, axis: int = -1, strict: bool = True):
  r"""Relevance maximisation (Achtibat et al. 2023): per channel of `layer`, the `k` dataset samples whose
  relevance at that channel (summed over its other axes) is largest.

  Args:
    f, composite, layer, target, params, axis, strict: as in `conditional_relevance`.
    batches: an iterable of input batches (arrays); samples are numbered in iteration order.
    k: how many reference samples per channel.

  Returns:
    `(indices, scores)`, both `[channels, k]` NumPy arrays, best first (indices into the concatenated batches).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, jaxlrp
    >>> def f(w, x):
    ...   return jax.nn.relu(x @ w[0]) @ w[1]
    >>> w = (jnp.eye(2), jnp.ones((2, 1)))
    >>> data = [np.array([[1.0, 0.0], [0.0, 2.0]], np.float32), np.array([[3.0, 1.0]], np.float32)]
    >>> idx, score = jaxlrp.relevance_maximization(f, data, jaxlrp.Composite(("dense", jaxlrp.Zero())),
    ...                                            layer=jaxlrp.Path("0"), params=w, k=2, target=0)
    >>> idx.tolist(), score.tolist()
    ([[2, 0], [1, 2]], [[3.0, 1.0], [2.0, 1.0]])
  """
  scores = []
  f, params = with_array_params(f, params)  # an Equinox module passed whole: jit takes its arrays

  @jax.jit
  def channel_relevance(params, x):
    args = (x,) if params is None else (params, x)
    out, vjp = lrp_vjp(f, composite, *args, argnums=len(args) - 1, layers={"layer": layer}, strict=strict)
    rel = vjp(_seed(out, target)[0])[1]["layer"]
    ax = axis % rel.ndim
    return rel.sum(axis=tuple(i for i in range(rel.ndim) if i not in (0, ax)))

  for batch in batches:
    batch = jnp.asarray(batch)
    scores.append(np.asarray(channel_relevance(params, batch)))
  if not scores:
    raise ValueError("relevance_maximization got no batches.")
  all_scores = np.concatenate(scores, axis=0).T  # [channels, samples]
  k = min(k, all_scores.shape[1])
  order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(all_scores, order, axis=1)
