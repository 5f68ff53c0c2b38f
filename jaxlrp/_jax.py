"""The one adapter between jaxlrp and JAX's unstable program-representation APIs.

`jax.extend` promises no compatibility across releases, so every use of it lives here (DESIGN.md section 4).
The rest of jaxlrp sees a flat list of `Eqn` records over integer value ids.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.extend import core as jcore
from jax.extend import source_info_util
from jax.extend.core import primitives as P

__all__ = ["Eqn", "Lit", "Program", "P", "Region", "SymbolicZero", "bind", "flatten_program", "source_line"]

# Call-like primitives whose bodies are inlined, with the parameter holding the body.
_INLINE = {P.jit_p: "jaxpr", P.closed_call_p: "call_jaxpr", P.remat_p: "jaxpr"}


@dataclasses.dataclass(frozen=True, eq=False)
class Region:
  """Equations `eqns[start:stop]` of a flattened program came from one `jax.checkpoint` body (`params`: its
  `policy` and `prevent_cse`), so the interpreter can re-wrap them in `jax.checkpoint`."""

  start: int
  stop: int
  params: Any


@dataclasses.dataclass(frozen=True)
class Lit:
  """A literal operand (a scalar folded into the program)."""

  val: Any


@dataclasses.dataclass(eq=False)
class Eqn:
  """One equation of the flattened program; operands are value ids (int) or `Lit`."""

  prim: Any
  ins: list  # int | Lit
  outs: list  # int
  params: dict
  name_stack: Any  # a jax NameStack, absolute (call prefixes applied)
  source_info: Any
  ctx: Any
  out_avals: list

  @property
  def name(self) -> str:
    return str(self.name_stack)

  @property
  def prim_name(self) -> str:
    return self.prim.name


@dataclasses.dataclass
class Program:
  """A flattened jaxpr: `eqns` over ids; `avals[i]` is the abstract value of id i."""

  eqns: list
  invars: list  # ids of the function's flat arguments
  outvars: list  # ids or Lit
  constvars: list  # ids of hoisted constants
  consts: list  # their values
  avals: dict
  regions: list = dataclasses.field(default_factory=list)  # Region per inlined checkpoint body


def flatten_program(closed, prefix=None) -> Program:
  """Inlines call-like equations of a ClosedJaxpr into one flat equation list over integer ids.

  `prefix` is the name stack of the equation that holds `closed` (the body of a scan or cond), since the name
  stacks inside a body are relative.
  """
  avals: dict[int, Any] = {}
  eqns: list[Eqn] = []
  const_ids: list[int] = []
  const_vals: list[Any] = []
  regions: list[Region] = []
  counter = iter(range(1 << 62))

  def fresh(aval) -> int:
    i = next(counter)
    avals[i] = aval
    return i

  def walk(jaxpr, env: dict, prefix) -> None:
    def read(a):
      return Lit(a.val) if isinstance(a, jcore.Literal) else env[a]

    for e in jaxpr.eqns:
      stack = prefix + e.source_info.name_stack
      body_key = _INLINE.get(e.primitive)
      if body_key is not None:
        body = e.params[body_key]
        inner_jaxpr = body.jaxpr if hasattr(body, "jaxpr") else body
        inner_consts = body.consts if hasattr(body, "consts") else []
        inner_env = {}
        for v, c in zip(inner_jaxpr.constvars, inner_consts):
          inner_env[v] = _add_const(c, v.aval)
        for v, a in zip(inner_jaxpr.invars, e.invars):
          inner_env[v] = read(a)
        start = len(eqns)
        walk(inner_jaxpr, inner_env, stack)
        if e.primitive is P.remat_p and len(eqns) > start:
          regions.append(Region(start, len(eqns), {"policy": e.params["policy"],
                                                   "prevent_cse": e.params["prevent_cse"]}))
        for outer, inner in zip(e.outvars, inner_jaxpr.outvars):
          if not isinstance(outer, jcore.DropVar):
            env[outer] = Lit(inner.val) if isinstance(inner, jcore.Literal) else inner_env[inner]
        continue
      ins = [read(a) for a in e.invars]
      outs = [fresh(v.aval) for v in e.outvars]
      for v, i in zip(e.outvars, outs):
        if not isinstance(v, jcore.DropVar):
          env[v] = i
      eqns.append(Eqn(e.primitive, ins, outs, dict(e.params), stack, e.source_info, e.ctx,
                       [v.aval for v in e.outvars]))

  def _add_const(value, aval) -> int:
    i = fresh(aval)
    const_ids.append(i)
    const_vals.append(value)
    return i

  env: dict = {}
  for v, c in zip(closed.jaxpr.constvars, closed.consts):
    env[v] = _add_const(c, v.aval)
  invars = [fresh(v.aval) for v in closed.jaxpr.invars]
  env.update(zip(closed.jaxpr.invars, invars))
  walk(closed.jaxpr, env, prefix if prefix is not None else source_info_util.new_name_stack())
  outvars = [Lit(v.val) if isinstance(v, jcore.Literal) else env[v] for v in closed.jaxpr.outvars]
  return Program(eqns, invars, outvars, const_ids, const_vals, avals, regions)


def bind(eqn: Eqn, *args):
  """Binds `eqn`'s primitive to `args` inside its name stack and context; returns a list of outputs."""
  params = eqn.prim.get_bind_params(eqn.params)
  stack = source_info_util.current_name_stack() + eqn.name_stack
  with source_info_util.user_context(eqn.source_info.traceback, name_stack=stack), eqn.ctx.manager:
    out = eqn.prim.bind(*args, **params)
  return list(out) if eqn.prim.multiple_results else [out]


def replay(eqns, env: dict) -> dict:
  """Binds `eqns` in order, reading and writing `env` (id -> value); literals are read in place."""
  for e in eqns:
    env.update(zip(e.outs, bind(e, *[a.val if isinstance(a, Lit) else env[a] for a in e.ins])))
  return env


def bind_with(eqn: Eqn, args, **overrides):
  """Like `bind`, with some parameters replaced (e.g. `preferred_element_type` for an upcast replay)."""
  params = eqn.prim.get_bind_params({**eqn.params, **overrides})
  out = eqn.prim.bind(*args, **params)
  return list(out) if eqn.prim.multiple_results else [out]


def source_line(eqn: Eqn) -> str:
  """`file.py:LINE (function)` of the user code that produced `eqn`, or '' when unknown."""
  try:
    return source_info_util.summarize(eqn.source_info)
  except Exception:  # noqa: BLE001 - source info is best effort across releases
    return ""


def is_float(aval) -> bool:
  return hasattr(aval, "dtype") and jax.numpy.issubdtype(aval.dtype, jax.numpy.inexact)


def make_jaxpr(f, *args):
  """Traces `f` to a ClosedJaxpr and its output pytree structure."""
  closed, shape = jax.make_jaxpr(f, return_shape=True)(*args)
  return closed, jax.tree_util.tree_structure(shape)


def jaxpr_as_fun(jaxpr, consts):
  """A function evaluating an open `jaxpr` with `consts` (arrays or tracers) bound to its constvars."""
  return jcore.jaxpr_as_fun(jcore.ClosedJaxpr(jaxpr, consts))
