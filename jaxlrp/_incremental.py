"""Incremental evaluation of a model's first dense layer under cumulative input perturbation.

`metrics.perturbation_curve` evaluates the model on `steps + 1` copies of the batch, copy k with the elements
removed by step k set to the baseline. When the input feeds one dense layer first (an MLP on tabular data
`x @ W`, or `x.reshape(B, -1) @ W` on images), the copies' pre-activations follow from one pass over the elements:

    z_k = x_k W = z_0 + sum over the elements i removed by step k of (b_i - x_i) W[i, :]

Gathering each step's elements in removal order (from static tables of each region's elements and each step's
regions, no sort) and taking a running sum of these contributions gives every z_k at the cost of about one
first-layer forward instead of `steps + 1`; only the rest of the program (everything after the dot_general, a bias
add included) runs per copy.

`first_dense` finds that split in the traced program of `fn(params, x)`. It returns None, and the caller evaluates
every copy through the whole model, unless x reaches exactly one dot_general, as its lhs, through shape-only
operations (row-major reshape, squeeze, broadcast_in_dim that only adds unit axes (expand_dims), copy, float to
float casts), none of these values has any other use (nor is an output), and the dot contracts all axes of the lhs
but the leading batch axis, without batch dimensions. Anything else (a convolution first, x used twice, a scaling
before the layer, a per-position dense layer on `[B, T, C]`) falls back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlrp import _jax
from jaxlrp._jax import Lit


@dataclasses.dataclass(frozen=True, eq=False)
class FirstDense:
  """The program of `fn(params, x)` split at its first dense layer `z = dot_general(lhs(x), w)`.

  Holds no values of the traced function's own constants (they are passed in as `consts`, like `_Traced.bind`),
  only those of inlined call bodies, which the traced program embeds anyway.
  """

  weight_eqns: tuple  # computing w from params and constants (no x)
  rest_eqns: tuple  # computing the outputs from z, params and constants
  dot: _jax.Eqn
  param_ids: tuple  # flat parameter leaves
  const_ids: tuple  # the traced function's constants, then those of inlined bodies
  inner_consts: tuple  # values of the inlined bodies' constants
  outvars: tuple
  lhs_shape: tuple  # [B, ...]: x as the dot reads it (same elements in row-major order)
  lhs_dtype: Any
  weight_axes: tuple  # transposes w to [contracted axes in the lhs' order..., free axes...]

  @property
  def out_aval(self):
    return self.dot.out_avals[0]

  def _env(self, consts, params) -> dict:
    return dict(zip(self.const_ids, [*consts, *self.inner_consts])) | dict(zip(self.param_ids, params))

  def weight(self, consts, params):
    """The dot's weight operand; `params` are the flat parameter leaves."""
    w = self.dot.ins[1]
    return w.val if isinstance(w, Lit) else _jax.replay(self.weight_eqns, self._env(consts, params))[w]

  def lhs(self, v):
    """`v` (shaped like x) as the dot reads x."""
    return v.reshape(self.lhs_shape).astype(self.lhs_dtype)

  def rest(self, consts, params, z) -> list:
    """The program's flat outputs given the dot's output `z` (one copy of the batch)."""
    env = self._env(consts, params)
    env[self.dot.outs[0]] = z
    env = _jax.replay(self.rest_eqns, env)
    return [a.val if isinstance(a, Lit) else env[a] for a in self.outvars]


def _needed(eqns, targets, known) -> tuple:
  """The equations of `eqns` (in order) that `targets` depend on, not looking past the ids in `known`."""
  want = {t for t in targets if isinstance(t, int)} - known
  picked = []
  for e in reversed(eqns):
    if want.intersection(e.outs):
      picked.append(e)
      want.update(a for a in e.ins if isinstance(a, int) and a not in known)
  return tuple(reversed(picked))


def _is_float(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


def _keeps_elements(e, aval_in) -> bool:
  """True if `e` only reshapes (row-major) or casts float to float its one operand."""
  name = e.prim_name
  if name in ("squeeze", "copy"):
    return True
  if name == "reshape":
    return e.params.get("dimensions") is None
  if name == "broadcast_in_dim":  # expand_dims: unit axes added, the operand's axes kept in order
    dims = tuple(e.params["broadcast_dimensions"])
    return list(dims) == sorted(dims) and math.prod(e.out_avals[0].shape) == math.prod(aval_in.shape)
  if name == "convert_element_type":
    return _is_float(aval_in.dtype) and _is_float(e.params["new_dtype"])
  return False


def first_dense(closed) -> FirstDense | None:
  """The split of the ClosedJaxpr of `fn(params, x)` at x's only dense layer, or None (see the module docstring)."""
  try:
    prog = _jax.flatten_program(closed)
  except Exception:  # noqa: BLE001 - an exotic program: evaluate it whole
    return None
  uses: dict[int, list] = {}
  for e in prog.eqns:
    for pos, a in enumerate(e.ins):
      if isinstance(a, int):
        uses.setdefault(a, []).append((e, pos))
  outputs = {a for a in prog.outvars if isinstance(a, int)}
  x_id = prog.invars[-1]
  batch = prog.avals[x_id].shape[0] if prog.avals[x_id].ndim else None
  v, chain = x_id, {x_id}
  while True:  # follow x through shape-only operations to its one consumer
    if v in outputs or len(uses.get(v, ())) != 1:
      return None
    e, pos = uses[v][0]
    if e.prim_name == "dot_general":
      break
    if len(e.ins) != 1 or len(e.outs) != 1 or not _keeps_elements(e, prog.avals[v]):
      return None
    v = e.outs[0]
    chain.add(v)
  dot = e
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dot.params["dimension_numbers"]
  lhs = prog.avals[v]
  if (pos != 0 or lhs_batch or rhs_batch or lhs.ndim < 2 or lhs.shape[0] != batch
      or sorted(lhs_contract) != list(range(1, lhs.ndim)) or not _is_float(dot.out_avals[0].dtype)):
    return None
  w = dot.ins[1]
  w_ndim = np.ndim(w.val) if isinstance(w, Lit) else prog.avals[w].ndim
  contracted = [r for _, r in sorted(zip(lhs_contract, rhs_contract))]
  weight_axes = tuple(contracted + [d for d in range(w_ndim) if d not in rhs_contract])
  known = set(prog.constvars) | set(prog.invars[:-1])
  weight_eqns = _needed(prog.eqns, [w], known)
  rest_eqns = _needed(prog.eqns, prog.outvars, known | {dot.outs[0]})
  if any(a in chain for e in weight_eqns + rest_eqns for a in e.ins if isinstance(a, int)):
    return None  # cannot happen when the chain's values have the one use found above; kept as a guard
  n_own = len(closed.jaxpr.constvars)
  return FirstDense(weight_eqns, rest_eqns, dot, tuple(prog.invars[:-1]), tuple(prog.constvars),
                    tuple(prog.consts[n_own:]), tuple(prog.outvars), tuple(lhs.shape), lhs.dtype, weight_axes)


def region_members(ids: np.ndarray, n: int) -> np.ndarray:
  """`[n, m]`: the element indices of each region (`ids[i]` is element i's region), in index order, padded with -1
  to the largest region's size m (regions at a border can be smaller)."""
  sizes = np.bincount(ids, minlength=n)
  table = np.full((n, int(sizes.max())), -1, np.int32)
  order = np.argsort(ids, kind="stable")
  slot = np.arange(len(ids)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
  table[ids[order], slot] = order
  return table


def step_table(counts: np.ndarray) -> np.ndarray:
  """`[S, P]`: for each step k = 1..S, the positions in the removal order of the regions it removes
  (`counts[k - 1]` up to `counts[k]`), padded with -1 to the largest step's P."""
  counts = np.asarray(counts, np.int64)
  sizes = np.diff(counts)
  width = max(1, int(sizes.max(initial=0)))
  slots = np.arange(width)[None]
  return np.where(slots < sizes[:, None], counts[:-1, None] + slots, -1).astype(np.int32)


def curve(split: FirstDense, w, x, base, sequence, members: np.ndarray, counts: np.ndarray, score, block: int):
  """The scores of the copies of the batch with the first `counts[k]` regions of each sample's order removed,
  `[B, S + 1]`, evaluating only the layers after the first dense one per copy.

  `sequence` (`[B, n]`, int) lists each sample's regions in removal order; `members` (`[n, m]`, static) each
  region's elements, padded with -1; `counts` (`[S + 1]`, static) the schedule; `score(z)` maps the dot's output for
  one copy of the batch to `[B]`. A `lax.scan` over blocks of `block` steps carries the pre-activations: each block
  gathers its steps' `(b_i - x_i) W[i, :]`, sums them per step, takes a running sum and scores its copies, so no
  `[B, D, H]` array is ever held (the block's `[B, block, H]` stays in cache).
  """
  acc = jnp.promote_types(split.out_aval.dtype, jnp.float32)
  lhs = split.lhs(x)
  z0 = _jax.bind(split.dot, lhs, w)[0]  # the unperturbed copy exactly as the model computes it
  batch, size = lhs.shape[0], math.prod(lhs.shape[1:])
  weight = jnp.transpose(w, split.weight_axes).reshape(size, -1).astype(acc)  # [D, H]: rows in x's element order
  weight = jnp.concatenate([weight, jnp.zeros_like(weight[:1])])  # row D: the padding's zero row
  delta = (split.lhs(jnp.broadcast_to(base, x.shape)).astype(acc) - lhs.astype(acc)).reshape(batch, size)
  delta = jnp.concatenate([delta, jnp.zeros_like(delta[:, :1])], axis=1)
  n = sequence.shape[1]
  # a padding slot points at region n, whose members are all the zero row D
  members = np.concatenate([np.where(members < 0, size, members), np.full((1, members.shape[1]), size)])
  sequence = jnp.concatenate([sequence, jnp.full((batch, 1), n, sequence.dtype)], axis=1)
  table = step_table(counts)
  steps, width = table.shape
  blocks = -(-steps // block)
  table = np.concatenate([table, np.full((blocks * block - steps, width), -1, np.int32)])
  table = np.where(table < 0, n, table).reshape(blocks, block, width)
  members = jnp.asarray(members, jnp.int32)

  def run_block(carry, positions):  # positions: [block, width] slots of the removal order
    regions = jnp.take(sequence, positions.reshape(-1), axis=1)  # [B, block * width]
    elements = jnp.take(members, regions, axis=0).reshape(batch, -1)  # [B, block * width * m]
    d = jnp.take_along_axis(delta, elements, axis=1)
    change = (d[..., None] * weight[elements]).reshape(batch, block, -1, weight.shape[1]).sum(axis=2)
    z = carry[:, None] + jnp.cumsum(change, axis=1)  # [B, block, H]
    copies = jax.vmap(lambda zk: score(zk.reshape(z0.shape).astype(z0.dtype)), in_axes=1, out_axes=1)(z)
    return z[:, -1], copies

  _, scores = jax.lax.scan(run_block, z0.reshape(batch, -1).astype(acc), jnp.asarray(table))
  scores = jnp.moveaxis(scores, 0, 1).reshape(batch, blocks * block)[:, :steps]
  return jnp.concatenate([score(z0)[:, None], scores], axis=1)
