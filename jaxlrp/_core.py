"""`lrp`: trace, canonicalise, analyse, assign rules, interpret with rule ops in gradient form."""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import types
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlrp import _jax
from jaxlrp._composites import Composite, OpInfo, as_selector
from jaxlrp._errors import RulePlacementError, UnsupportedOpError
from jaxlrp._graph import Analysis, Unit, analyse
from jaxlrp._jax import Lit, bind, bind_with
from jaxlrp._jax import replay as _replay
from jaxlrp._rules import LAYER_KINDS, LayerMath, Rule, ZBox, compute_dtype, stabilize

__all__ = ["lrp", "plan"]

_SHAPE_OPS = ("reshape", "squeeze", "expand_dims", "transpose")
_WEIGHT_TRACE_OPS = ("convert_element_type", "transpose", "reshape", "squeeze", "expand_dims", "copy",
                     "broadcast_in_dim", "reduce_precision", "sharding_constraint", "device_put")


@dataclasses.dataclass
class Plan:
  """Everything `lrp` decides before running: the program, what was recognised, and the rule of each op."""

  program: _jax.Program
  analysis: Analysis
  ops: list  # OpInfo per unit
  rules: list  # Rule per unit
  out_tree: Any
  strict: bool
  leaf_shapes: dict  # relevance-form root id (an explained leaf; in a body an input) -> shape of the explained leaf
  children: dict  # scan/cond unit -> plans of its body (one per stage plan, see `schedule`) / branches
  tapped: frozenset = frozenset()  # ids of intermediate values read out through taps (see `run`)
  tap_cotangent: bool = False  # taps add `d` (the gradient is the cotangent) instead of `v * d` (the relevance)
  schedule: dict = dataclasses.field(default_factory=dict)  # scan unit -> [Stage]: which plan runs which iterations

  @functools.cached_property
  def analysis_sets(self) -> Any:
    """Set/dict views of the analysis' lists, for membership tests while interpreting."""
    a = self.analysis
    return types.SimpleNamespace(input_region=set(a.input_region), unsupported=dict(a.unsupported))

  def reads_outside(self, r: _jax.Region) -> set:
    """Ids that something outside `eqns[r.start:r.stop]` reads (equations, outputs, ReLUs absorbed by layers)."""
    cache = self.__dict__.setdefault("_reads_outside", {})
    if r not in cache:
      eqns = self.program.eqns
      reads = {x for i, e in enumerate(eqns) if not r.start <= i < r.stop for x in e.ins if isinstance(x, int)}
      reads.update(x for x in self.program.outvars if isinstance(x, int))
      index = {e: i for i, e in enumerate(eqns)}
      for unit in self.analysis.units:
        if unit.kind in LAYER_KINDS and not r.start <= index[unit.eqns[0]] < r.stop:
          relu = _relu_before(self, unit)
          if relu is not None:
            reads.add(relu.data_ins[0])
      cache[r] = reads
    return cache[r]


@dataclasses.dataclass(frozen=True, eq=False)
class Stage:
  """`count` consecutive iterations of a scan run with `plan`. A peeled stage (one iteration, run outside
  `lax.scan`) is the first or last iteration when its rules differ from the other iterations': a scanned layer
  stack whose carry starts as the explained input has its first layer (Flat, ZBox) at iteration 0 only."""

  plan: Plan
  count: int
  peeled: bool = False


# ---- planning -----------------------------------------------------------------------------------------------------

def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _arg_paths(args) -> tuple[list, list]:
  """Flat leaves of `args` with their '/'-joined key paths (without the argument index)."""
  flat, paths = [], []
  for arg in args:
    for path, leaf in jax.tree_util.tree_flatten_with_path(arg)[0]:
      flat.append(leaf)
      paths.append("/".join(_key_name(k) for k in path))
  return flat, paths


def _is_array(leaf) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic)) or hasattr(leaf, "__jax_array__")


def split_arrays(tree) -> tuple[Any, Callable]:
  """`(arrays, rebuild)`: `tree` with its non-array leaves (an Equinox module's activation functions and Python
  numbers, as `eqx.filter_jit` treats them) replaced by None, and `rebuild(arrays)` that puts them back."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  is_array = [_is_array(leaf) for leaf in leaves]
  arrays = treedef.unflatten([leaf if a else None for leaf, a in zip(leaves, is_array)])

  def rebuild(arrays_tree):
    # The arrays in leaf order (None is an empty subtree: neither the held-out places nor the tree's own Nones).
    got = iter(jax.tree_util.tree_leaves(arrays_tree))
    return treedef.unflatten([next(got) if a else leaf for leaf, a in zip(leaves, is_array)])

  return arrays, rebuild


def arrays_only(f: Callable, args: Sequence, kwargs: dict | None = None) -> tuple[Callable, tuple]:
  """`(f', args')` with `f'(*args') == f(*args, **kwargs)`, where `args'` holds only the arrays of `args`.

  The other leaves (`split_arrays`) and the keyword arguments are closed over: constants of the explanation, as
  static arguments under `jax.jit`. Returns `f` and `args` themselves when there is nothing to close over."""
  if not kwargs and all(_is_array(leaf) for leaf in jax.tree_util.tree_leaves(args)):
    return f, tuple(args)
  kwargs = dict(kwargs or {})
  arrays, rebuilds = zip(*(split_arrays(a) for a in args)) if args else ((), ())

  def with_constants(*arrays_args):
    return f(*(rebuild(a) for rebuild, a in zip(rebuilds, arrays_args)), **kwargs)

  return functools.wraps(f)(with_constants), tuple(arrays)


def with_array_params(model: Callable, params) -> tuple[Callable, Any]:
  """`(model', params')` with `model'(params', *rest) == model(params, *rest)` and only arrays in `params'` (an
  Equinox module passed whole: its other leaves are closed over, `split_arrays`); unchanged otherwise."""
  if params is None or all(_is_array(leaf) for leaf in jax.tree_util.tree_leaves(params)):
    return model, params
  arrays, rebuild = split_arrays(params)
  return (lambda p, *rest: model(rebuild(p), *rest)), arrays


def _weight_path(analysis: Analysis, wid, paths: dict):
  hops = 0
  while wid is not None and wid not in paths and wid in analysis.producer and hops < 16:
    e = analysis.producer[wid]
    ids = [a for a in e.ins if isinstance(a, int)]
    if e.prim_name not in _WEIGHT_TRACE_OPS or len(ids) != 1:
      return None
    wid, hops = ids[0], hops + 1
  return paths.get(wid)


def plan(f: Callable, composite: Composite, args: Sequence, argnums, strict: bool = True) -> Plan:
  """Traces `f(*args)` and decides the rule of every recognised op (used by `lrp` and `show_rules`)."""
  if not isinstance(composite, Composite):
    raise TypeError(f"lrp needs a jaxlrp.Composite (e.g. jaxlrp.EpsilonPlusFlat()); got {composite!r}. "
                    f"A single rule can be wrapped as jaxlrp.Composite(('linear', rule)).")
  nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
  if not nums or any(not isinstance(i, int) or not -len(args) <= i < len(args) for i in nums):
    raise ValueError(f"argnums={argnums!r} does not index the {len(args)} positional arguments.")
  nums = tuple(i % len(args) for i in nums)
  closed, out_tree = _jax.make_jaxpr(f, *args)
  program = _jax.flatten_program(closed)
  _, paths = _arg_paths(args)
  sizes = [len(jax.tree_util.tree_leaves(a)) for a in args]
  offsets = np.cumsum([0] + sizes)
  explained = [program.invars[j] for i in nums for j in range(offsets[i], offsets[i + 1])]
  if not explained:
    raise ValueError(f"Argument(s) {nums} of {getattr(f, '__name__', 'f')} hold no arrays to explain.")
  for i in explained:
    aval = program.avals[i]
    if not _jax.is_float(aval):
      where = paths[program.invars.index(i)] or f"argument {nums}"
      raise TypeError(
          f"jaxlrp explains floating-point inputs, but {where} has dtype {aval.dtype} (shape {aval.shape}). "
          f"For token ids, explain the embedding output instead (pass the embedded array as the argument), "
          f"or pass argnums for the float argument.")
  path_of = dict(zip(program.invars, paths))
  positions = _Positions()
  leaf_shapes = {i: tuple(program.avals[i].shape) for i in explained}
  result = positions.root = _build(program, explained, path_of, strict, positions, True, leaf_shapes)
  result.out_tree = out_tree
  plans = list(_walk(result))
  ops = [op for q in plans for op in q.ops]
  rules = iter(composite.assign(ops))
  for q in plans:
    q.rules = [next(rules) for _ in q.ops]
    _check_placement(q)
  for q in plans:
    _merge_stages(q)
  return result


def _build(program, explained, path_of, strict, positions, relevance_inputs, leaf_shapes) -> Plan:
  """Analyses one program (the top level or a loop/branch body) and, recursively, the bodies it calls."""
  analysis = analyse(program, explained, relevance_inputs=relevance_inputs)
  ops = [
      OpInfo(u.index, u.kind, u.name, _weight_path(analysis, u.weight, path_of), _jax.source_line(u.main),
             functools.partial(positions.is_first, u), functools.partial(positions.is_last, u))
      for u in analysis.units
  ]
  result = Plan(program, analysis, ops, [], None, strict, leaf_shapes, {})
  for e in analysis.loops:
    raise UnsupportedOpError(
        f"A `while_loop` at {e.name or '<top level>'} ({_jax.source_line(e)}) carries the explained data, and "
        f"while loops are not reverse-differentiable, so relevance cannot flow back through them. Fix: use "
        f"jax.lax.scan, or jax.lax.fori_loop with static (Python int) bounds, which lowers to a scan.")
  for unit in analysis.units:
    if unit.kind == "cond":
      result.children[unit] = _branches(unit, result, path_of, strict, positions)
    elif unit.kind == "scan":
      result.schedule[unit] = _scan_stages(unit, result, path_of, strict, positions)
      result.children[unit] = _stage_plans(result.schedule[unit])
  return result


def _body_inputs(outer: Plan, program, ins, path_of) -> tuple[dict, set, dict]:
  """What a body's inputs inherit from the operands `ins` outside: parameter paths, the inputs in relevance form
  (an operand in relevance form outside: the explained input or a slice of it) and their explained leaves' shapes."""
  a = outer.analysis
  paths = {program.invars[k]: p for k, x in enumerate(ins) if isinstance(x, int)
           for p in [_weight_path(a, x, path_of)] if p is not None}
  relevance = {program.invars[k] for k, x in enumerate(ins) if isinstance(x, int) and x in a.relevance_form}
  shapes = {program.invars[k]: outer.leaf_shapes[a.explained_root(x)]
            for k, x in enumerate(ins) if isinstance(x, int) and x in a.relevance_form}
  return paths, relevance, shapes


def _branches(unit: Unit, outer: Plan, path_of: dict, strict: bool, positions) -> list:
  """A plan per branch of a cond; the branches' inputs are data (and in relevance form) as their operands are."""
  e = unit.main
  ins = e.ins[1:]
  plans = []
  for body in e.params["branches"]:
    program = _jax.flatten_program(body, prefix=e.name_stack)
    paths, relevance, shapes = _body_inputs(outer, program, ins, path_of)
    explained = [v for v, a in zip(program.invars, ins) if isinstance(a, int) and a in outer.analysis.data
                 and _jax.is_float(program.avals[v])]
    plans.append(_build(program, explained, paths, strict, positions, relevance, shapes))
  return plans


def _scan_stages(unit: Unit, outer: Plan, path_of: dict, strict: bool, positions) -> list:
  """The stages of a scan: one plan for all iterations, and peeled first / last iterations where a carry could
  make their rules differ (First() and input-layer rules at iteration 0 when the carry starts as data, Last() at
  the final iteration). Peeled plans whose rules equal the others' are merged back after assignment."""
  e = unit.main
  a = outer.analysis
  nc, ncarry, n = e.params["num_consts"], e.params["num_carry"], e.params["length"]
  program = _jax.flatten_program(e.params["jaxpr"], prefix=e.name_stack)
  is_data = [isinstance(x, int) and x in a.data for x in e.ins]
  while True:  # a carry is data once the body makes it so: iterate to the fixpoint
    data = {program.invars[k] for k, d in enumerate(is_data) if d and _jax.is_float(program.avals[program.invars[k]])}
    probe = analyse(program, list(data), relevance_inputs=False)
    grown = [k for k in range(ncarry) if not is_data[nc + k] and isinstance(program.outvars[k], int)
             and program.outvars[k] in probe.data]
    if not grown:
      break
    for k in grown:
      is_data[nc + k] = True
  explained = [v for v, d in zip(program.invars, is_data) if d and _jax.is_float(program.avals[v])]
  paths, relevance, shapes = _body_inputs(outer, program, e.ins, path_of)
  carries = set(program.invars[nc:nc + ncarry])
  steady_relevance = relevance - carries  # later iterations read the carry from the body: gradient form

  def build(rel):
    return _build(program, explained, paths, strict, positions, rel, shapes)

  if n <= 1:  # the one iteration (if any) is both the first and the last
    return [Stage(build(relevance if n == 1 else steady_relevance), n)]
  data_carry = [k for k in range(ncarry) if is_data[nc + k]]
  stages = [Stage(build(steady_relevance), n)]
  if any(isinstance(e.ins[nc + k], int) and e.ins[nc + k] in a.data for k in data_carry):
    stages = [Stage(build(relevance), 1, True), Stage(stages[0].plan, n - 1)]
  if data_carry:
    stages[-1:] = [Stage(stages[-1].plan, stages[-1].count - 1), Stage(build(steady_relevance), 1, True)]
  return stages


def _stage_plans(stages: list) -> list:
  """The distinct plans of a scan's stages, in the order they run (what `_walk` and `show_rules` list)."""
  plans = []
  for s in stages:
    if not any(s.plan is q for q in plans):
      plans.append(s.plan)
  return plans


def _same_plan(a: Plan, b: Plan) -> bool:
  """Two plans of one body that compute the same: the same units and rules, recursively.

  Plans of one body differ in the inputs they take in relevance form. That alone changes no number: ops of an input
  region that only move or scale values pass relevance as their gradient does, and a shift (x - m) makes a norm
  unit where the input is in gradient form, which the unit comparison sees."""
  if a is b:
    return True
  ua, ub = a.analysis.units, b.analysis.units
  if (len(ua) != len(ub)
      or any(x.main is not y.main or x.kind != y.kind or len(x.eqns) != len(y.eqns) for x, y in zip(ua, ub))
      or any(r is not s for r, s in zip(a.rules, b.rules))):
    return False
  for x, y in zip(ua, ub):
    if x.kind == "cond" and not all(_same_plan(p, q) for p, q in zip(a.children[x], b.children[y])):
      return False
    if x.kind == "scan":
      sa, sb = a.schedule[x], b.schedule[y]
      if len(sa) != len(sb) or any(s.count != t.count or s.peeled != t.peeled or not _same_plan(s.plan, t.plan)
                                   for s, t in zip(sa, sb)):
        return False
  return True


def _merge_stages(p: Plan) -> None:
  """Runs peeled iterations whose plan computes the same as the other iterations' inside the one `lax.scan`."""
  for unit, stages in p.schedule.items():
    steady = next((s.plan for s in stages if not s.peeled), stages[0].plan)
    merged: list = []
    for s in stages:
      if s.peeled and _same_plan(s.plan, steady):
        s = Stage(steady, 1)
      if merged and not s.peeled and not merged[-1].peeled and merged[-1].plan is s.plan:
        merged[-1] = Stage(s.plan, merged[-1].count + s.count)
      else:
        merged.append(s)
    p.schedule[unit] = [s for s in merged if s.count or len(merged) == 1]
    p.children[unit] = _stage_plans(p.schedule[unit])


def _walk(p: Plan):
  yield p
  for children in p.children.values():
    for child in children:
      yield from _walk(child)


# ---- First() / Last() across loop and branch bodies ---------------------------------------------------------------

class _Positions:
  """First()/Last() facts over a plan and its bodies, computed per `kinds` when a selector first asks.

  A layer in a loop body is first when it reads a slice of the explained input (every x_t @ W_x of an RNN, as in
  the unrolled loop) or a carry that starts as the explained input, at that carry's first iteration only (a
  scanned layer stack); a scan or cond whose body holds a layer counts as one for what comes after it."""

  def __init__(self):
    self.root: Plan | None = None
    self._first: dict = {}
    self._last: dict = {}

  def is_first(self, unit: Unit, kinds) -> bool:
    if kinds not in self._first:
      self._first[kinds] = _firsts(self.root, kinds, None, ())[0]
    return unit in self._first[kinds]

  def is_last(self, unit: Unit, kinds) -> bool:
    if kinds not in self._last:
      self._last[kinds] = _lasts(self.root, kinds, ())[0]
    return unit in self._last[kinds]


def _firsts(p: Plan, kinds, fresh, reached) -> tuple[set, set, set]:
  """First layers in `p` and its bodies, given the marks of its inputs (see `Analysis.first_units`)."""
  nested: set = set()

  def through(unit, fresh, reached):
    f, r, found = _control_firsts(p, unit, kinds, fresh, reached)
    nested.update(found)
    return f, r

  firsts, fresh, reached = p.analysis.first_units(kinds, fresh, reached, through)
  return firsts | nested, fresh, reached


def _control_firsts(p: Plan, unit: Unit, kinds, fresh: set, reached: set) -> tuple[set, set, set]:
  """The marks of a scan's or cond's outputs and the first layers in its bodies (the final pass of each)."""
  e, found = unit.main, set()
  if unit.kind == "cond":
    out_f, out_r = set(), set()
    for q in p.children[unit]:
      f_in = {v for v, x in zip(q.program.invars, e.ins[1:]) if x in fresh}
      r_in = {v for v, x in zip(q.program.invars, e.ins[1:]) if x in reached}
      firsts, f, r = _firsts(q, kinds, f_in, r_in)
      found |= firsts
      out_f.update(o for o, v in zip(e.outs, q.program.outvars) if v in f)
      out_r.update(o for o, v in zip(e.outs, q.program.outvars) if v in r)
    return out_f, out_r, found
  nc, ncarry = e.params["num_consts"], e.params["num_carry"]
  in_f = [isinstance(x, int) and x in fresh for x in e.ins]
  in_r = [isinstance(x, int) and x in reached for x in e.ins]
  carry_f, carry_r = in_f[nc:nc + ncarry], in_r[nc:nc + ncarry]
  ys_f = ys_r = [False] * (len(e.outs) - ncarry)
  for stage in p.schedule[unit]:
    if not stage.count:
      continue
    q = stage.plan
    while True:  # over many iterations a carry holds what it starts with and what the body makes of it
      marks_f = in_f[:nc] + carry_f + in_f[nc + ncarry:]
      marks_r = in_r[:nc] + carry_r + in_r[nc + ncarry:]
      firsts, f, r = _firsts(q, kinds, {v for v, m in zip(q.program.invars, marks_f) if m},
                             {v for v, m in zip(q.program.invars, marks_r) if m})
      out_f = [v in f for v in q.program.outvars]
      out_r = [v in r for v in q.program.outvars]
      grown_f = [x or y for x, y in zip(carry_f, out_f)]
      grown_r = [x or y for x, y in zip(carry_r, out_r)]
      if stage.count == 1 or (grown_f, grown_r) == (carry_f, carry_r):
        break
      carry_f, carry_r = grown_f, grown_r
    found |= firsts
    carry_f, carry_r = out_f[:ncarry], out_r[:ncarry]
    ys_f = [x or y for x, y in zip(ys_f, out_f[ncarry:])]
    ys_r = [x or y for x, y in zip(ys_r, out_r[ncarry:])]
  out_f = {o for o, m in zip(e.outs, carry_f + ys_f) if m}
  out_r = {o for o, m in zip(e.outs, carry_r + ys_r) if m}
  return out_f, out_r, found


def _lasts(p: Plan, kinds, feeds) -> tuple[set, set]:
  """Last layers in `p` and its bodies, given which of its outputs feed a layer after it."""
  nested: set = set()

  def through(unit, feeds):
    ins, found = _control_lasts(p, unit, kinds, feeds)
    nested.update(found)
    return ins

  lasts, feeds = p.analysis.last_units(kinds, feeds, through)
  return lasts | nested, feeds


def _control_lasts(p: Plan, unit: Unit, kinds, feeds: set) -> tuple[set, set]:
  """The operands of a scan or cond that feed a layer (in its bodies or after it), and the last layers inside."""
  e, found = unit.main, set()
  out_feed = [o in feeds for o in e.outs]
  if unit.kind == "cond":
    ins = set()
    for q in p.children[unit]:
      lasts, f = _lasts(q, kinds, {v for v, m in zip(q.program.outvars, out_feed) if m and isinstance(v, int)})
      found |= lasts
      ins.update(x for x, v in zip(e.ins[1:], q.program.invars) if v in f)
    return ins, found
  nc, ncarry = e.params["num_consts"], e.params["num_carry"]
  carry_feed, ys_feed = out_feed[:ncarry], out_feed[ncarry:]
  fixed = [False] * len(e.ins)
  for stage in reversed(p.schedule[unit]):
    if not stage.count:
      continue
    q = stage.plan
    while True:  # before the final iteration, a carry feeds what the next iteration feeds it into
      marks = carry_feed + ys_feed
      lasts, f = _lasts(q, kinds, {v for v, m in zip(q.program.outvars, marks) if m and isinstance(v, int)})
      in_feed = [v in f for v in q.program.invars]
      grown = [x or y for x, y in zip(carry_feed, in_feed[nc:nc + ncarry])]
      if stage.count == 1 or grown == carry_feed:
        break
      carry_feed = grown
    found |= lasts
    carry_feed = in_feed[nc:nc + ncarry]
    fixed = [x or y for x, y in zip(fixed, in_feed)]
  marks = fixed[:nc] + carry_feed + fixed[nc + ncarry:]
  return {x for x, m in zip(e.ins, marks) if m and isinstance(x, int)}, found


def _where(op: OpInfo) -> str:
  loc = f" ({op.source})" if op.source else ""
  return f"{op.kind} op #{op.index} at {op.name or '<top level>'}{loc}" + (f", parameter {op.path}" if op.path else "")


def _region_end(a: Analysis, v: int):
  """The equation where the explained input stops reaching `v` by copies and affine maps: the first one on the
  way from the input to `v` whose operand is in relevance form but whose result is not."""
  frontier, seen = [v], set()
  while frontier:
    e = a.producer.get(frontier.pop())
    if e is None or e in seen:
      continue
    seen.add(e)
    ins = [x for x in e.ins if isinstance(x, int) and x in a.data]
    if any(x in a.relevance_form for x in ins):
      return e
    frontier.extend(ins)
  return None


def _placement_message(a: Analysis, unit: Unit, op: OpInfo, rule: Rule) -> str:
  name = type(rule).__name__
  end = _region_end(a, unit.data_ins[0])
  if end is not None and a.unit_of.get(end) is not None and a.unit_of[end].kind in LAYER_KINDS:
    how = "by another layer before it: select the layer that reads the input, e.g. with jaxlrp.First()"
  else:
    src = _jax.source_line(end) if end is not None else ""
    what = (f"`{end.prim_name}` at {end.name or '<top level>'}" + (f" ({src})" if src else "")) if end else "ops"
    how = (f"through {what}, which is not a copy, a pad or an elementwise affine map of it (the maps that keep "
           f"its relevance). Apply that op before calling the model and explain its output, or use a composite "
           f"without input-layer rules (jaxlrp.EpsilonPlus(), jaxlrp.EpsilonAlpha2Beta1())")
  return (f"{name} is an input-layer rule (it produces relevance of the explained input), but it was assigned to "
          f"the {_where(op)}, whose input is computed from the explained input {how}; or use a rule such as "
          f"Epsilon or Gamma on this layer.")


def _check_placement(p: Plan) -> None:
  a = p.analysis
  for unit in a.batch_statistics:
    op = p.ops[unit.index]
    raise UnsupportedOpError(
        f"The normalisation at {op.name or '<top level>'}{' (' + op.source + ')' if op.source else ''} computes its "
        f"statistics from the batch (a reduction over axis 0): a BatchNorm in training mode. Each sample's "
        f"relevance would depend on the other samples. Fix: run the model in inference mode "
        f"(linen: BatchNorm(use_running_average=True); nnx: model.eval(); Equinox: eqx.nn.inference_mode(model)). "
        f"jaxlrp takes axis 0 for the batch axis: for time-major data ([T, B, ...]) whose statistics are per "
        f"sample, explain the batch-major layout (transpose at the start of f).")
  for unit, op, rule in zip(a.units, p.ops, p.rules):
    if rule is None or not rule.input_rule:
      continue
    if unit.data_ins[0] not in a.relevance_form:
      raise RulePlacementError(_placement_message(a, unit, op, rule))
    if isinstance(rule, ZBox):
      root = a.explained_root(unit.data_ins[0])
      shape = p.leaf_shapes[root]
      for label, bound in (("low", rule.low), ("high", rule.high)):
        if bound is None:
          raise ValueError("ZBox needs both bounds: ZBox(low, high), e.g. ZBox(0.0, 1.0) for images in [0, 1].")
        try:
          ok = np.broadcast_shapes(np.shape(bound), shape) == shape
        except ValueError:
          ok = False
        if not ok:
          raise ValueError(
              f"ZBox bound `{label}` has shape {np.shape(bound)}, which does not broadcast to the explained "
              f"input's shape {shape} (used by the {_where(op)}). Pass a scalar, a per-channel array such as "
              f"shape {shape[-1:]}, or an array of the input's shape. Under jax.vmap the input has no batch axis.")


# ---- rule ops -----------------------------------------------------------------------------------------------------

def _cast(x, dtype):
  return jnp.asarray(x).astype(dtype)


def _is_data_lhs_conv(unit: Unit) -> bool:
  """A `conv_general_dilated` layer with the data as its lhs (the weight as the kernel)."""
  return unit.kind == "conv" and unit.main.prim_name == "conv_general_dilated" and unit.data_pos[0] == 0


def _conv_stacking(unit: Unit, weight_shape) -> tuple:
  """`(stack_forward, stack_transpose)` for a layer's `LayerMath`: where a weight-stacked convolution is faster.

  Measured on XLA CPU with ResNet-50's shapes at batch 8 (2 cores): the two sign-split forwards of a 3x3
  convolution with 64 input and 64 output channels take 23 ms stacked and 41 ms apart, of a 1x1 convolution from
  64 to 256 channels 63 ms stacked and 24 ms apart (the stacked output is copied into a new layout), with no
  difference at 128 channels; two transposes of the 7x7 convolution on an image's 3 channels take 122 ms as one
  transpose of the stacked op and 193 ms apart, with no gain for wider inputs.
  """
  if not _is_data_lhs_conv(unit):
    return False, False
  rhs_spec = unit.main.params["dimension_numbers"].rhs_spec
  out_ch, in_ch = weight_shape[rhs_spec[0]], weight_shape[rhs_spec[1]]
  return out_ch <= 64 and in_ch >= 8, in_ch <= 4


def _conv_sample_axis(unit: Unit, x):
  """The data input's batch axis for a convolution whose output at one sample depends on that sample alone (no
  batch groups, no reshaping epilogue), else None: Flat and WSquare then count fan-ins on one sample (a whole
  first-layer convolution of ones over the batch saved, and its buffer: 103 MB at ResNet-50 b32). Not for a
  sharded input (an explicit mesh axis or shard_map's manual axes): a one-sample array would not match its type."""
  main = unit.main
  if (not _is_data_lhs_conv(unit) or main.params.get("batch_group_count", 1) != 1
      or any(e.prim_name in _SHAPE_OPS for e in unit.epilogue) or _explicitly_sharded(x) or _varying_axes(x)):
    return None
  return main.params["dimension_numbers"].lhs_spec[0]


def _lin_fn(unit: Unit, consts: dict, dtype) -> Callable:
  """`(v, V) -> main(v; V)` followed by the epilogue's shape-only ops, in `dtype` (for the rule's backward)."""
  main = unit.main
  wpos = 1 - unit.data_pos[0]
  overrides = {"preferred_element_type": None} if "preferred_element_type" in main.params else {}

  def lin(v, V):
    args = []
    for i, a in enumerate(main.ins):
      if i == unit.data_pos[0]:
        args.append(v)
      elif i == wpos:
        args.append(V)
      else:
        args.append(_cast(a.val if isinstance(a, Lit) else consts[a], dtype))
    out = bind_with(main, args, **overrides)[0]
    for e in unit.epilogue:
      if e.prim_name in _SHAPE_OPS:
        out = bind_with(e, [out])[0]
    return out

  return lin


def _varying_axes(v) -> frozenset:
  """The manual mesh axes `v` varies over inside `shard_map` (empty elsewhere)."""
  return frozenset(getattr(getattr(jax.typeof(v), "mat", None), "varying", None) or ())


def _same_varying_axes(args: list) -> list:
  """`args` cast to vary over the union of their manual axes: under `shard_map(check_vma=True)` a primitive needs
  operands that agree, and `_affine` starts from fresh (non-varying) zeros and ones."""
  axes = frozenset().union(*map(_varying_axes, args))
  if not axes:
    return args
  return [a if _varying_axes(a) == axes else jax.lax.pcast(a, tuple(sorted(axes - _varying_axes(a))), to="varying")
          for a in args]


def _affine(unit: Unit, consts: dict, u_shape, dtype):
  """The folded epilogue `z = u * s + t`: `t = E(0)`, `s = E(1) - t` (s is None when the epilogue only shifts)."""

  def run(u):
    cur_id, cur = unit.main.outs[0], u
    for e in unit.epilogue:
      if e.prim_name == "convert_element_type":
        pass
      elif e.prim_name in _SHAPE_OPS:
        cur = bind_with(e, [cur])[0]
      else:
        args = [cur if a == cur_id else _cast(a.val if isinstance(a, Lit) else consts[a], dtype) for a in e.ins]
        cur = bind_with(e, _same_varying_axes(args))[0]
      cur_id = e.outs[0]
    return cur

  t = run(jnp.zeros(u_shape, dtype))
  s = run(jnp.ones(u_shape, dtype)) - t if unit.has_scale else None
  return s, t


def _scale_for_weight(s, fold_axes, weight_rank: int):
  """The per-feature scale `s` (output-shaped) reshaped to broadcast against the weight."""
  out_axes, weight_axes = fold_axes
  s = s[tuple(slice(None) if d in out_axes else 0 for d in range(s.ndim))]  # feature axes, increasing order
  order = sorted(range(len(out_axes)), key=lambda k: out_axes[k])
  targets = [weight_axes[k] for k in order]  # the weight axis of each remaining axis of s
  s = jnp.transpose(s, np.argsort(targets))
  shape = [1] * weight_rank
  for ax, n in zip(sorted(targets), s.shape):
    shape[ax] = n
  return s.reshape(shape)


def _layer_op(unit: Unit, rule: Rule, bounds_given: bool, relu: Unit | None = None):
  """A custom-VJP op replaying `unit` forward bit for bit; its backward is `rule.propagate`.

  With `relu` (a ReLU activation unit whose output is the layer's input, given the Pass rule), the op takes the
  ReLU's *input* `u` and applies the ReLU itself: its residuals are then `u` and the layer output `z`, which the
  neighbouring ops keep anyway, instead of the ReLU output as a third activation per layer. The backward
  recomputes `relu(u)` and ends with the ReLU's Pass rule (`g_u = g_x` where `x > 0`, else 0).
  """
  data_id = unit.data_ins[0]
  const_ids = unit.const_ins
  treedef = jax.tree_util.tree_structure(rule)

  def layer_input(u):
    if relu is None:
      return u
    return _replay(relu.eqns, {relu.data_ins[0]: u})[relu.outs[0]]

  def forward(u, consts):
    env = _replay(unit.eqns, {data_id: layer_input(u), **dict(zip(const_ids, consts))})
    return env[unit.outs[0]]

  @jax.custom_vjp
  def op(u, consts, leaves, bounds, mask):
    return forward(u, consts)

  def fwd(u, consts, leaves, bounds, mask):
    z = forward(u, consts)
    return z, (u, consts, leaves, bounds, mask, z)

  def bwd(res, g):
    u, consts, leaves, bounds, mask, z = res
    rule_ = jax.tree_util.tree_unflatten(treedef, leaves)
    cd = compute_dtype(u.dtype)
    # XLA schedules work as early as its inputs allow: the rule's modified forwards (W+ x, ...) and a recomputed
    # ReLU would run during the forward pass, or be merged with the forward's own ReLU, and be held until the
    # backward reaches this layer (one more activation per layer). A zero taken from the cotangent makes them
    # wait for it.
    env = dict(zip(const_ids, consts))
    if _explicitly_sharded(g) and unit.weight is not None:
      # Taking one element of a cotangent sharded over explicit mesh axes is a sharding error (and a collective):
      # order by a barrier instead, which XLA CPU does not respect for memory but which is correct.
      u, env[unit.weight], _ = jax.lax.optimization_barrier((u, env[unit.weight], jax.lax.stop_gradient(g)))
      after_g = jnp.zeros((), cd)
    else:
      after_g = _zero_after(jax.lax.stop_gradient(g.reshape(-1)[0].astype(cd)))
    x = layer_input(u + after_g.astype(u.dtype)) if relu is not None else u
    lin = _lin_fn(unit, env, cd)
    s, t = _affine(unit, env, unit.main.out_avals[0].shape, cd)
    xc = x.astype(cd)
    w = env[unit.weight].astype(cd) + after_g if unit.weight is not None else None
    if w is None:
      raise RulePlacementError(f"{type(rule_).__name__} needs a weight operand; {unit.kind} ops have none.")
    if s is not None and unit.fold_axes is not None:  # fold a per-feature scale (BatchNorm) into the weight
      w, s = w * _scale_for_weight(s, unit.fold_axes, w.ndim), None
    m = LayerMath(lin, xc, w, z.astype(cd), s, t, unit.nonneg_input and not rule_.input_rule,
                  tuple(_cast(b, cd) for b in bounds) if bounds_given else None, unit.feeds_relu,
                  *_conv_stacking(unit, w.shape), sample_axis=_conv_sample_axis(unit, xc),
                  input_mask=None if mask is None else mask.astype(cd))
    out = rule_.propagate(m, z.astype(cd) * g.astype(cd))
    if relu is not None:  # relu(u) > 0 exactly where u > 0; masking by u keeps the mask independent of g
      out = jnp.where(u > 0, out, jnp.zeros((), out.dtype))
    return out.astype(u.dtype), None, None, None, None

  op.defvjp(fwd, bwd)
  return op


def _max_pool_op(e, x_shape: tuple) -> Callable:
  """`reduce_window_max` whose VJP routes the cotangent through the winner of each window, chosen in the forward.

  The gradient of a max pool (XLA's select_and_scatter) selects each window's winner inside the backward pass, so
  K vmapped cotangents (many targets per call) select K times. Here the forward records the winner's position in
  its window (an int8 per output, the first maximum in row-major window order, as select_and_scatter breaks ties)
  and the backward only places the cotangent: the result equals the gradient, and the selection is shared.
  Windows that tile the input (stride == window: Flax's max_pool default) are placed by one reshape; overlapping
  windows by one strided pad per window offset."""
  wd, ws, pad = e.params["window_dimensions"], e.params["window_strides"], e.params["padding"]
  offsets = list(itertools.product(*[range(w) for w in wd]))
  tiled = all(s == w for s, w in zip(ws, wd))

  def window_slices(x, y_shape):
    xp = jax.lax.pad(x, jnp.array(-jnp.inf, x.dtype), [(lo, hi, 0) for lo, hi in pad])  # floats only
    return [jax.lax.slice(xp, off, [o + (n - 1) * s + 1 for o, n, s in zip(off, y_shape, ws)], ws) for off in offsets]

  @jax.custom_vjp
  def op(x):
    return bind(e, x)[0]

  def fwd(x):
    y = bind(e, x)[0]
    winner = jnp.argmax(jnp.stack(window_slices(x, y.shape)), axis=0)
    return y, winner.astype(jnp.int8 if len(offsets) <= 127 else jnp.int32)

  def bwd(winner, g):
    padded = [n + lo + hi for n, (lo, hi) in zip(x_shape, pad)]
    if tiled:
      parts = jax.nn.one_hot(winner, len(offsets), dtype=g.dtype, axis=0) * g
      parts = parts.reshape(tuple(wd) + g.shape)  # [w0, .., wd, n0, .., nd]
      d = g.ndim
      perm = [i for j in range(d) for i in (d + j, j)]  # interleave: [n0, w0, n1, w1, ..]
      full = parts.transpose(perm).reshape([n * w for n, w in zip(g.shape, wd)])
      full = jax.lax.pad(full, jnp.zeros((), g.dtype), [(0, p - f, 0) for p, f in zip(padded, full.shape)])
    else:
      full = None
      for k, off in enumerate(offsets):
        part = jnp.where(winner == k, g, jnp.zeros((), g.dtype))
        placed = jax.lax.pad(part, jnp.zeros((), g.dtype),
                             [(o, p - o - (n - 1) * s - 1, s - 1) for o, p, n, s in zip(off, padded, g.shape, ws)])
        full = placed if full is None else full + placed
    lows = [lo for lo, _ in pad]
    return (jax.lax.slice(full, lows, [lo + n for lo, n in zip(lows, x_shape)]),)

  op.defvjp(fwd, bwd)
  return op


def _explicitly_sharded(v) -> bool:
  """`v`'s type carries a sharding over explicit mesh axes (`jax.sharding.AxisType.Explicit`)."""
  spec = getattr(getattr(jax.typeof(v), "sharding", None), "spec", None)
  return spec is not None and any(entry is not None for entry in spec)


@jax.custom_batching.custom_vmap
def _zero_after(v):
  """`0 * v`: a zero that XLA cannot compute before `v` exists (see `_layer_op`'s backward)."""
  return jnp.zeros((), v.dtype) * v


@_zero_after.def_vmap
def _zero_after_vmap(axis_size, in_batched, v):
  # Unbatched under vmap (e.g. many targets per call: vmapped cotangents): a batched zero would batch the weights
  # it is added to, and every modified forward and transpose would run once per target.
  return _zero_after(v[0] if in_batched[0] else v), False


@jax.custom_vjp
def _rescale(z, t, epsilon):
  return z


def _rescale_fwd(z, t, epsilon):
  return z, (z, t, epsilon)


def _rescale_bwd(res, g):
  z, t, epsilon = res
  cd = compute_dtype(z.dtype)
  zc = z.astype(cd)
  out = g.astype(cd) * zc / stabilize(zc - t.astype(cd), jnp.asarray(epsilon, cd))
  return out.astype(z.dtype), None, None


_rescale.defvjp(_rescale_fwd, _rescale_bwd)


def _identity_op(unit: Unit):
  """Identity rule from the unit's first data input `z` to its outputs `a_k`: `g_z = sum_k g_k * a_k / stab(z)`.

  Activation regions and norms; further data inputs (a norm's standard deviation) are constants here.
  """
  root = unit.data_ins[0]
  const_ids = unit.data_ins[1:] + unit.const_ins

  def forward(z, consts):
    env = _replay(unit.eqns, {root: z, **dict(zip(const_ids, consts))})
    return [env[o] for o in unit.outs]

  @jax.custom_vjp
  def op(z, consts, epsilon):
    return forward(z, consts)

  def fwd(z, consts, epsilon):
    outs = forward(z, consts)
    return outs, (z, outs, epsilon)

  def bwd(res, gs):
    z, outs, epsilon = res
    cd = compute_dtype(z.dtype)
    rel = sum(g.astype(cd) * a.astype(cd) for g, a in zip(gs, outs) if _jax.is_float(a))
    if rel.shape != z.shape:  # an epilogue reshape (GroupNorm: normalised per group, then reshaped back)
      rel = jax.vjp(moves, z.astype(cd))[1](rel)[0]
    gz = rel / stabilize(z.astype(cd), jnp.asarray(epsilon, cd))
    return gz.astype(z.dtype), None, None

  def moves(v):
    """The unit's reshapes and transposes alone, applied to `v` (z's shape): where each element of z ends up.
    Units with them are chains (a norm and its epilogue), whose other ops are elementwise."""
    for e in unit.eqns:
      if e.prim_name in _SHAPE_OPS:
        v = bind_with(e, [v])[0]
    return v

  op.defvjp(fwd, bwd)
  return op


def _uniform_op(eqn, data_pos: tuple):
  """A product of two data values whose backward gives each factor half: the gradient scaled by 1/2."""

  def assemble(a, b, others):
    args, it = [], iter(others)
    for i in range(len(eqn.ins)):
      args.append(a if i == data_pos[0] else b if i == data_pos[1] else next(it))
    return args

  @jax.custom_vjp
  def op(a, b, others):
    return bind(eqn, *assemble(a, b, others))[0]

  def fwd(a, b, others):
    return op(a, b, others), (a, b, others)

  def bwd(res, g):
    a, b, others = res
    _, vjp = jax.vjp(lambda a, b: bind(eqn, *assemble(a, b, others))[0], a, b)
    ga, gb = vjp(g)
    return (ga * 0.5).astype(a.dtype), (gb * 0.5).astype(b.dtype), None

  op.defvjp(fwd, bwd)
  return op


@jax.custom_vjp
def _to_gradient_form(x):
  return x


def _tgf_fwd(x):
  return x, x


def _tgf_bwd(x, g):
  cd = compute_dtype(x.dtype)
  return ((x.astype(cd) * g.astype(cd)).astype(x.dtype),)


_to_gradient_form.defvjp(_tgf_fwd, _tgf_bwd)


def _pass_op(eqn, data_pos: int):
  """An elementwise affine op of the input region: forward unchanged, relevance passes through unchanged."""

  @jax.custom_vjp
  def op(x, others):
    args = list(others)
    args.insert(data_pos, x)
    return bind(eqn, *args)[0]

  def fwd(x, others):
    return op(x, others), x

  def bwd(x, g):
    return g.astype(x.dtype), None

  op.defvjp(fwd, bwd)
  return op


def _unsupported_op(eqn, message: str):
  """Binds `eqn` unchanged; raises `UnsupportedOpError` only if relevance actually reaches it."""

  @jax.custom_vjp
  def op(*args):
    return bind(eqn, *args)

  def fwd(*args):
    return bind(eqn, *[a.value for a in args]), None

  def bwd(_, gs):
    if any(not isinstance(g, _jax.SymbolicZero) for g in gs):
      raise UnsupportedOpError(message)
    return (None,) * len(eqn.ins)

  op.defvjp(fwd, bwd, symbolic_zeros=True)
  return op


def _unsupported_message(eqn, reason: str) -> str:
  src = _jax.source_line(eqn)
  return (
      f"jaxlrp has no LRP rule for {reason} at "
      f"{eqn.name or '<top level>'}{' (' + src + ')' if src else ''}, and relevance reaches it from the output.\n"
      f"Fix: restructure the model so this op is one jaxlrp recognises (see jaxlrp.show_rules), or pass "
      f"strict=False to jaxlrp.lrp to propagate its plain gradient (gradient x input) through it.")


# ---- interpretation -----------------------------------------------------------------------------------------------

def _bounds(p: Plan, unit: Unit, rule: ZBox, env: dict):
  """ZBox bounds mapped from the explained input's units through the input region to the layer's input."""
  mapped = [_mapped_bound(p, env, unit.data_ins[0], bound) for bound in (rule.low, rule.high)]
  return jnp.minimum(*mapped), jnp.maximum(*mapped)


def _mapped_bound(p: Plan, env, target: int, bound):
  """A ZBox bound given in the explained input's units, mapped through the input region to the value `target`;
  or, for `bound=INPUT_MASK`, the mask of the elements of `target` that are copies of explained-input elements
  (`_replay_mask`).

  At the top level the bound is broadcast to the explained leaf; in a body the enclosing scan or cond passes it
  already mapped to the body's input (under the key `("bound", input id, _bound_key(bound))`, see
  `_child_bounds`)."""
  a = p.analysis
  root = a.explained_root(target)
  local = collections.ChainMap({}, env)
  start = env.get(("bound", root, _bound_key(bound)))
  if start is None:
    value = 1 if bound is INPUT_MASK else bound
    start = jnp.broadcast_to(jnp.asarray(value, p.program.avals[root].dtype), p.leaf_shapes[root])
    start = _same_varying_axes([start, env[root]])[0]  # under shard_map: varying like the input it bounds
  local[root] = start
  chain = a.region_chain(target)
  return (_replay_mask(chain, local, root) if bound is INPUT_MASK else _replay(chain, local))[target]


INPUT_MASK = "input mask"  # `_mapped_bound`'s stand-in bound for the explained-input mask


def _bound_key(bound) -> int:
  """The key of a bound among the mapped bounds: its id, -1 for `INPUT_MASK` (keys stay ints: pytree dict keys
  must sort)."""
  return -1 if bound is INPUT_MASK else id(bound)


def _replay_mask(chain: list, env, root: int):
  """Replays the input-region `chain` on the mask of explained-input elements (1 where an element is a copy of
  one, 0 where it is a constant): elementwise shifts and scales keep it, padding and concatenated constants
  are 0, moves and gathers carry it along."""
  mine = {root}
  for e in chain:
    args = []
    for a in e.ins:
      v = a.val if isinstance(a, Lit) else env[a]
      if e.prim_name in _ADDS_CONSTANTS and not (isinstance(a, int) and a in mine):
        v = jnp.zeros_like(v)  # the pad value; a concatenated constant
      args.append(v)
    if e.prim_name in ("add", "sub", "mul", "div", "neg"):  # (the input region's shape-preserving affine ops)
      out = next(v for a, v in zip(e.ins, args) if isinstance(a, int) and a in mine).astype(e.out_avals[0].dtype)
    else:
      out = bind(e, *args)[0]
    env[e.outs[0]] = out
    mine.add(e.outs[0])
  return env


_ADDS_CONSTANTS = ("pad", "concatenate")  # input-region ops that can put constants beside the input's elements


def _has_constants(a: Analysis, x: int, env) -> bool:
  """Some elements of `x` (in relevance form) may be constants: its input region pads or concatenates, or the
  enclosing scan or cond passed an explained-input mask for its root."""
  return (any(e.prim_name in _ADDS_CONSTANTS for e in a.region_chain(x))
          or ("bound", a.explained_root(x), _bound_key(INPUT_MASK)) in env)


def _input_mask(p: Plan, unit: Unit, env):
  """The explained-input mask of an input-layer rule's input, where it may hold constants (Flat and WSquare count
  only the input's elements: as for a convolution's own zero padding); else None."""
  x = unit.data_ins[0]
  return _mapped_bound(p, env, x, INPUT_MASK) if _has_constants(p.analysis, x, env) else None


def _child_bounds(p: Plan, env, children: list, ins: list) -> dict:
  """The ZBox bounds used in `children` (bodies whose input k reads the operand `ins[k]`) mapped to the operands
  in relevance form: {k: {_bound_key(bound): value}} (empty without input-layer rules). The explained-input mask
  (`INPUT_MASK`) goes along where the operand's input region pads or concatenates constants."""
  rules = [r for q in children for c in _walk(q) for r in c.rules if r is not None and r.input_rule]
  bounds = {id(b): b for r in rules if isinstance(r, ZBox) for b in (r.low, r.high)}
  if not rules:
    return {}
  a, mapped = p.analysis, {}
  for k, x in enumerate(ins):
    if not (isinstance(x, int) and x in a.relevance_form):
      continue
    own = dict(bounds)
    if _has_constants(a, x, env):
      own[_bound_key(INPUT_MASK)] = INPUT_MASK
    mapped[k] = {i: _mapped_bound(p, env, x, b) for i, b in own.items()}
  return mapped


def _bound_keys(q: Plan, mapped: dict) -> dict:
  """`_child_bounds` values for the inputs of `q` in relevance form, keyed for `run`'s environment."""
  rf, invars = q.analysis.relevance_form, q.program.invars
  return {("bound", invars[k], i): v for k, d in mapped.items() if invars[k] in rf for i, v in d.items()}


def run(p: Plan, flat_args: Sequence, taps: dict | None = None, outputs: Sequence | None = None,
        bounds: dict | None = None) -> list:
  """Evaluates the planned program on `flat_args` with rule ops bound in place of the recognised units.

  `taps` maps ids of `p.tapped` to zero arrays `d`: the value `v` continues as `v + v * d` (the same numbers), so
  the gradient with respect to `d` is `v` times the cotangent at `v`: its relevance (with `p.tap_cotangent`,
  `v + d`: the gradient is the cotangent itself). `outputs` replaces the program's outputs by other ids (the
  part of the program below an intermediate value). `bounds`: ZBox bounds of a body's inputs (`_bound_keys`).
  Inputs in the analysis' relevance form are taken as they are (their cotangent is relevance); the outputs are
  returned in gradient form.
  """
  prog, a = p.program, p.analysis
  env: dict = dict(zip(prog.constvars, prog.consts))
  env.update(zip(prog.invars, flat_args))
  env.update(bounds or {})
  # Data-independent equations first (parameters, biases, masks), so that every unit can be bound at its first
  # equation: a unit's other inputs are then all available, whatever order the program computed them in.
  independent = [e for e in prog.eqns if e in a.live and e not in a.depends_on_data]
  for e in independent:
    env.update(zip(e.outs, bind(e, *[x.val if isinstance(x, Lit) else env[x] for x in e.ins])))
  if taps:
    env = _Tapped(env, taps, p.tap_cotangent)
  _interpret(p, 0, len(prog.eqns), env, set(independent), None)
  return [_reader(p, env)[1](x) for x in (prog.outvars if outputs is None else outputs)]


class _Tapped(collections.UserDict):
  """An environment that applies the relevance taps (`v -> v + v * d`) as the values are written."""

  def __init__(self, env: dict, taps: dict, additive: bool = False):
    super().__init__()
    self.data, self.taps, self.additive = env, taps, additive

  def __setitem__(self, key, value):
    d = self.taps.get(key) if isinstance(key, int) else None
    if d is not None:
      d = d.astype(value.dtype)
      value = value + d if self.additive else value + value * d
    self.data[key] = value


def _reader(p: Plan, env) -> tuple[Callable, Callable]:
  """`read(x)` and `read_grad(x)` over `env`; `read_grad` converts an input-region value to gradient form once
  (cached in `env` under `("grad", x)`)."""

  def read(x):
    return x.val if isinstance(x, Lit) else env[x]

  def read_grad(x):
    if isinstance(x, int) and x in p.analysis.relevance_form:
      key = ("grad", x)
      if key not in env:
        env[key] = _to_gradient_form(env[x])
      return env[key]
    return read(x)

  return read, read_grad


def _interpret(p: Plan, lo: int, hi: int, env, skip: set, inside) -> None:
  """Interprets `eqns[lo:hi]` into `env`; a `jax.checkpoint` region starting here is re-wrapped (see `_region`)."""
  a, eqns = p.analysis, p.program.eqns
  read, read_grad = _reader(p, env)
  starts: dict = {}
  for r in p.program.regions:  # the outermost regions within [lo, hi), other than the one being interpreted
    if r is not inside and lo <= r.start and r.stop <= hi and r.stop - r.start > starts.get(r.start, (0, 0))[0]:
      starts[r.start] = (r.stop - r.start, r)
  i = lo
  while i < hi:
    if i in starts:
      r = starts[i][1]
      (env.data if isinstance(env, _Tapped) else env).update(_region(p, r, env, skip))  # tapped inside
      i = r.stop
      continue
    e = eqns[i]
    i += 1
    if e not in a.live or e in skip:
      continue
    unit = a.unit_of.get(e)
    if unit is not None:
      if e is unit.eqns[0]:
        env.update(zip(unit.outs, _emit(p, unit, env, read, read_grad)))
      continue
    if e in p.analysis_sets.input_region:
      dpos = [k for k, x in enumerate(e.ins) if isinstance(x, int) and x in a.relevance_form]
      if e.prim_name in ("add", "sub", "mul", "div", "neg"):
        others = [read(x) for k, x in enumerate(e.ins) if k != dpos[0]]
        outs = [_pass_op(e, dpos[0])(read(e.ins[dpos[0]]), others)]
      else:
        outs = bind(e, *[read(x) for x in e.ins])
    elif e in p.analysis_sets.unsupported and p.strict:
      reason = p.analysis_sets.unsupported[e]
      outs = _unsupported_op(e, _unsupported_message(e, reason))(*[read_grad(x) for x in e.ins])
    else:
      outs = bind(e, *[read_grad(x) for x in e.ins])
    env.update(zip(e.outs, outs))


def _region(p: Plan, r: _jax.Region, env, skip: set) -> dict:
  """Interprets a `jax.checkpoint` body inside `jax.checkpoint` with its policy, so that its rule ops'
  residuals are recomputed in the backward pass as the model's author asked. Values from outside are closed
  over; the values later equations need come out."""
  needed = p.reads_outside(r)

  def body():
    inner = collections.ChainMap({}, env.data if isinstance(env, _Tapped) else env)
    local = _Tapped(inner, env.taps, env.additive) if isinstance(env, _Tapped) else inner
    _interpret(p, r.start, r.stop, local, skip, r)
    return {k: v for k, v in inner.maps[0].items() if isinstance(k, int) and k in needed}

  return jax.checkpoint(body, policy=r.params["policy"], prevent_cse=r.params["prevent_cse"])()


def _emit_control(p: Plan, unit: Unit, env, read, read_grad) -> list:
  """Re-binds a scan or cond with bodies that run the interpreter (rules apply per step / per branch).

  Operands that a body takes in relevance form (slices of the explained input, for an input-layer rule on the
  layer that reads them) go in as they are, so the cotangent the body returns for them is relevance; the others
  go in gradient form. A scan runs its stages in order (`Stage`), peeled iterations outside `lax.scan`; only the
  first stage's plan may take an initial carry in relevance form (each stage returns its carries in gradient form)."""
  e, children = unit.main, p.children[unit]

  def operand(k, q, ins):
    x = ins[k]
    if isinstance(x, Lit):
      return x.val
    return read(x) if q.program.invars[k] in q.analysis.relevance_form else read_grad(x)

  if unit.kind == "cond":
    ins = e.ins[1:]
    args = [operand(k, children[0], ins) for k in range(len(ins))]
    mapped = _child_bounds(p, env, children, ins)
    branches = [functools.partial(lambda q, *a: run(q, list(a), bounds=_bound_keys(q, mapped)), q) for q in children]
    return list(jax.lax.switch(read(e.ins[0]), branches, *args))
  nc, ncarry = e.params["num_consts"], e.params["num_carry"]
  n, reverse, unroll = e.params["length"], e.params["reverse"], e.params["unroll"]
  stages = p.schedule[unit]
  args = [operand(k, stages[0].plan, e.ins) for k in range(len(e.ins))]
  consts, carry, xs = args[:nc], args[nc:nc + ncarry], args[nc + ncarry:]
  mapped = _child_bounds(p, env, children, e.ins)
  fixed = {k: d for k, d in mapped.items() if k < nc + ncarry}
  sliced = {k: d for k, d in mapped.items() if k >= nc + ncarry}  # bounds of the xs: scanned along with them

  def body(q, carry, x):
    x, xb = x
    outs = run(q, consts + list(carry) + list(x), bounds=_bound_keys(q, {**fixed, **xb}))
    return outs[:ncarry], outs[ncarry:]

  def scan(q, carry, xs, xb, length):
    return jax.lax.scan(functools.partial(body, q), carry, (xs, xb), length=length, reverse=reverse, unroll=unroll)

  if len(stages) == 1:
    carry, ys = scan(stages[0].plan, carry, xs, sliced, n)
    return list(carry) + list(ys)
  parts, done = [], 0
  for s in stages:
    lo = done if not reverse else n - done - s.count  # the iterations of this stage cover xs[lo:lo + count]
    pick = (lambda v, lo=lo: v[lo]) if s.peeled else (lambda v, lo=lo, m=s.count: v[lo:lo + m])
    x_s, xb_s = [pick(x) for x in xs], {k: {i: pick(v) for i, v in d.items()} for k, d in sliced.items()}
    if s.peeled:
      carry, ys = body(s.plan, carry, (x_s, xb_s))
      ys = [y[None] for y in ys]
    else:
      carry, ys = scan(s.plan, carry, x_s, xb_s, s.count)
    parts.append(list(ys))
    done += s.count
  if reverse:
    parts.reverse()
  ys = [jnp.concatenate(col) if len(col) > 1 else col[0] for col in zip(*parts)]
  return list(carry) + ys


def _emit(p: Plan, unit: Unit, env: dict, read, read_grad) -> list:
  if unit.kind in ("scan", "cond"):
    return _emit_control(p, unit, env, read, read_grad)
  rule = p.rules[unit.index]
  if rule is None and not p.strict:
    return _replay_unit(unit, read, read_grad)
  if rule is None:  # no rule in the composite: bind unchanged, raise if relevance reaches it
    message = _missing_rule_message(unit, p.ops[unit.index])
    ins = [read_grad(a) if isinstance(a, int) else a.val for e in unit.eqns[:1] for a in e.ins]
    local = {unit.main.outs[0]: _unsupported_op(unit.main, message)(*ins)[0]}
    local.update({c: read(c) for c in unit.const_ins})
    _replay(unit.eqns[1:], local)
    return [local[o] for o in unit.outs]
  if rule.mode == "signal":  # the second data input (a gate, a standard deviation) is a constant
    env_ = {unit.data_ins[0]: read_grad(unit.data_ins[0])}
    env_.update({d: jax.lax.stop_gradient(read_grad(d)) for d in unit.data_ins[1:]})
    env_.update({c: read(c) for c in unit.const_ins})
    _replay(unit.eqns, env_)
    return [env_[o] for o in unit.outs]
  if rule.mode == "uniform":
    a, b = (read_grad(d) for d in unit.data_ins)
    others = [x.val if isinstance(x, Lit) else read(x) for i, x in enumerate(unit.main.ins) if i not in unit.data_pos]
    local = {unit.main.outs[0]: _uniform_op(unit.main, unit.data_pos)(a, b, others)}
    local.update({c: read(c) for c in unit.const_ins})
    _replay(unit.epilogue, local)
    return [local[o] for o in unit.outs]
  if unit.kind in ("activation", "norm") and rule.mode == "pass" and not unit.relu_only:
    consts = [jax.lax.stop_gradient(read_grad(d)) for d in unit.data_ins[1:]] + [read(c) for c in unit.const_ins]
    return _identity_op(unit)(read_grad(unit.data_ins[0]), consts, rule.epsilon)
  if rule.mode == "gradient" and _is_plain_max_pool(unit):
    return [_max_pool_op(unit.main, p.program.avals[unit.data_ins[0]].shape)(read_grad(unit.data_ins[0]))]
  if rule.mode in ("gradient", "pass"):
    return _replay_unit(unit, read, read_grad)
  if rule.mode == "rescale":
    if isinstance(rule.epsilon, (int, float)) and rule.epsilon == 0 and not getattr(rule, "zero_bias", False):
      # LRP-0: z / stab(z) is exactly 1 in floating point unless |z| < ~1e-31, so the rescale is the identity and
      # the rule is the plain gradient (as in LXT); skipping it saves a residual and a pass per layer.
      return _replay_unit(unit, read, read_grad)
    if getattr(rule, "zero_bias", False):
      (z,) = _replay_unit(unit, read, read_grad)
      cd = compute_dtype(z.dtype)
      t = _affine(unit, {c: read(c) for c in unit.const_ins}, unit.main.out_avals[0].shape, cd)[1]
      return [_rescale(z, t, rule.epsilon)]
    # Rescale before trailing reshapes/transposes (attention heads): the cotangent is then scaled in the layer's
    # own layout, and XLA needs no transposed copy of z.
    head, tail = _split_shape_tail(unit.eqns)
    env_ = {d: read_grad(d) for d in unit.data_ins}
    env_.update({c: read(c) for c in unit.const_ins})
    _replay(head, env_)
    mid = head[-1].outs[0]
    env_[mid] = _rescale(env_[mid], jnp.zeros((), env_[mid].dtype), rule.epsilon)
    _replay(tail, env_)
    return [env_[o] for o in unit.outs]
  relu = _relu_before(p, unit)
  if relu is not None:
    x = read_grad(relu.data_ins[0])
  else:
    x = read(unit.data_ins[0]) if rule.input_rule else read_grad(unit.data_ins[0])
  consts = [read(c) for c in unit.const_ins]
  is_box = isinstance(rule, ZBox)
  bounds = _bounds(p, unit, rule, env) if is_box else ()
  mask = _input_mask(p, unit, env) if rule.input_rule else None
  return [_layer_op(unit, rule, is_box, relu)(x, consts, jax.tree_util.tree_leaves(rule), bounds, mask)]


def _is_plain_max_pool(unit: Unit) -> bool:
  """A lone undilated `reduce_window_max` on floats (see `_max_pool_op`)."""
  e = unit.main
  return (unit.kind == "max_pool" and unit.eqns == [e] and e.prim_name == "reduce_window_max"
          and all(d == 1 for d in e.params["base_dilation"] + e.params["window_dilation"])
          and jnp.issubdtype(e.out_avals[0].dtype, jnp.floating))


def _split_shape_tail(eqns: list) -> tuple[list, list]:
  """`eqns` (a chain) split before its trailing shape-only ops."""
  k = len(eqns)
  while k > 1 and eqns[k - 1].prim_name in _SHAPE_OPS and eqns[k - 1].ins[0] == eqns[k - 2].outs[0]:
    k -= 1
  return eqns[:k], eqns[k:]


def _relu_before(p: Plan, unit: Unit) -> Unit | None:
  """The ReLU unit (Pass or gradient rule, one data input) whose output is the data input of `unit`, a layer with
  a custom-VJP rule (see `_layer_op`), if any."""
  own = p.rules[unit.index]
  if own is None or own.mode != "custom" or own.input_rule or unit.kind not in LAYER_KINDS:
    return None
  e = p.analysis.producer.get(unit.data_ins[0])
  act = p.analysis.unit_of.get(e)
  if (act is None or act.kind != "activation" or not act.relu_only or len(act.data_ins) != 1
      or act.outs != [unit.data_ins[0]] or act.outs[0] in p.tapped):
    return None
  rule = p.rules[act.index]
  return act if rule is not None and rule.mode in ("pass", "gradient") else None


def _missing_rule_message(unit: Unit, op: OpInfo) -> str:
  what = {"bilinear": f"a product of two data-dependent values (`{unit.main.prim_name}` of two data-dependent "
                      f"operands, e.g. attention scores q.k^T)"}.get(unit.kind, f"the {unit.kind} op")
  return (f"The composite assigns no rule to {what}: {_where(op)}, and relevance reaches it.\n"
          f"Fix: add a pair for it, e.g. jaxlrp.Composite((\"{unit.kind}\", jaxlrp.Uniform())) (AttnLRP's uniform "
          f"rule), use jaxlrp.AttnLRP(), or pass strict=False to propagate its plain gradient.")


def _replay_unit(unit: Unit, read, read_grad) -> list:
  env = {d: read_grad(d) for d in unit.data_ins}
  env.update({c: read(c) for c in unit.const_ins})
  _replay(unit.eqns, env)
  return [env[o] for o in unit.outs]


# ---- the transform ------------------------------------------------------------------------------------------------

def lrp(f: Callable, composite: Composite, *, argnums: int | Sequence[int] = 0, strict: bool = True) -> Callable:
  r"""Transforms `f` so that its gradient is the LRP relevance of `args[argnums]`.

  `g = lrp(f, composite)` has `f`'s signature and returns exactly `f(*args)` (the forward is the original
  computation, bit for bit under `jax.jit`; called eagerly, the ops of a `jax.jit` function inside `f`, such as
  `jax.nn.gelu` or `jnp.var`, run one by one and may round differently from their fused original, by an ulp).
  Its VJP is replaced layer by layer with the composite's rules, so

  - `jax.grad(lambda *a: g(*a)[b, t])(*args)` is the relevance of `args[argnums]` when the output relevance is
    the score `f(*args)[b, t]` (the relevance of an output is its value times the cotangent);
  - `jax.vjp(g, *args)` with cotangent `c` explains the output weighted by `c`;
  - `jit`, `vmap`, grad-of-grad and `jax.checkpoint` compose with `g`.

  Arguments other than `argnums` (typically the parameters) are constants of the explanation, and so are keyword
  arguments (`train=False`) and non-array leaves (an Equinox module passed whole: its activation functions and
  Python numbers, as `eqx.filter_jit` treats them). Pass the parameters as an argument rather than closing over
  them to select layers by parameter path and to keep compilation fast. `f` is traced at every call of `g`; wrap
  `g` (or the gradient) in `jax.jit`.

  Args:
    f: a function of arrays (pure `jax.numpy`, Flax linen `model.apply`, nnx or Equinox code).
    composite: a `jaxlrp.Composite` (e.g. `jaxlrp.EpsilonPlusFlat()`).
    argnums: the argument (or tuple of arguments) to explain.
    strict: with `True`, relevance reaching an op jaxlrp has no rule for raises `UnsupportedOpError`; with
      `False` such ops propagate their plain gradient.

  Returns:
    A function with `f`'s signature and outputs.

  Example:
    >>> import jax, jax.numpy as jnp, jaxlrp
    >>> def f(params, x):
    ...   h = jax.nn.relu(x @ params["w1"] + params["b1"])
    ...   return h @ params["w2"]
    >>> params = {"w1": jnp.array([[1.0, -1.0], [2.0, 1.0]]), "b1": jnp.zeros(2), "w2": jnp.array([[1.0], [1.0]])}
    >>> x = jnp.array([1.0, 1.0])
    >>> g = jaxlrp.lrp(f, jaxlrp.Composite(("dense", jaxlrp.Epsilon())), argnums=1)
    >>> bool(jnp.array_equal(g(params, x), f(params, x)))
    True
    >>> r = jax.grad(lambda x: g(params, x)[0])(x)
    >>> round(float(r.sum()), 4)  # relevance is conserved: the score is 3
    3.0
  """
  if not isinstance(composite, Composite):
    raise TypeError(f"lrp needs a jaxlrp.Composite (e.g. jaxlrp.EpsilonPlusFlat()); got {composite!r}. "
                    f"A single rule can be wrapped as jaxlrp.Composite(('linear', rule)).")

  @functools.wraps(f)
  def transformed(*args, **kwargs):
    fn, args = arrays_only(f, args, kwargs)
    p = plan(fn, composite, args, argnums, strict)
    flat = jax.tree_util.tree_leaves(args)
    return jax.tree_util.tree_unflatten(p.out_tree, run(p, flat))

  return transformed


def select_layers(p: Plan, layers: dict) -> dict:
  """`{label: selector}` -> `{label: unit}`; each selector must match exactly one op of the top-level program."""
  if not isinstance(layers, dict) or not layers:
    raise TypeError(f"layers must be a non-empty dict {{label: selector}}, e.g. {{'block1': jaxlrp.Path('*Conv_1*')}}; "
                    f"got {layers!r}.")
  found = {}
  for label, sel in layers.items():
    selector = as_selector(sel)
    hits = [p.analysis.units[op.index] for op in p.ops if selector(op)]
    if len(hits) != 1:
      listing = "\n".join(f"  {op.kind} at {_where(op)}" for op in p.ops if op.kind not in ("scan", "cond"))
      what = "matches no op" if not hits else f"matches {len(hits)} ops"
      raise ValueError(f"The layer selector {label!r}: {selector!r} {what} of the top-level program; it must match "
                       f"exactly one (combine selectors with &, or use Path / Name). Ops found:\n{listing}")
    found[label] = hits[0]
  return found


def lrp_vjp(f: Callable, composite: Composite, *args, argnums: int | Sequence[int] = 0, layers: dict | None = None,
            strict: bool = True):
  r"""Like `jax.vjp` of `lrp(f, composite)`, also reading out the relevance of intermediate values.

  Returns `(out, vjp_fn)`; `vjp_fn(cotangent)` gives `(relevance, layer_relevance)`: the relevance of
  `args[argnums]` (as `jax.vjp` would return it for those arguments, a tuple when `argnums` is a tuple) and a dict
  `{label: relevance of the output of that layer}` for `layers={label: selector}` (each selector must match
  one recognised op; a layer's output is its value after the folded epilogue, e.g. after BatchNorm, before the
  activation; the Pass rule of the activation makes that the relevance of the activation too). Everything comes
  from one forward and one backward pass.

  Example:
    >>> import jax, jax.numpy as jnp, jaxlrp
    >>> def f(params, x):
    ...   h = jax.nn.relu(x @ params["w1"])
    ...   return h @ params["w2"]
    >>> params = {"w1": jnp.array([[1.0, -1.0], [2.0, 1.0]]), "w2": jnp.array([[1.0], [1.0]])}
    >>> x = jnp.array([[1.0, 1.0]])
    >>> comp = jaxlrp.Composite(("dense", jaxlrp.Zero()))
    >>> out, vjp = jaxlrp.lrp_vjp(f, comp, params, x, argnums=1, layers={"hidden": jaxlrp.Path("w1")})
    >>> r_x, r_layers = vjp(jnp.ones_like(out))
    >>> r_layers["hidden"].tolist(), r_x.tolist()  # the score 3 at every layer
    ([[3.0, 0.0]], [[1.0, 2.0]])
  """
  if not isinstance(composite, Composite):
    raise TypeError(f"lrp_vjp needs a jaxlrp.Composite (e.g. jaxlrp.EpsilonPlusFlat()); got {composite!r}.")
  f, args = arrays_only(f, args)
  p = plan(f, composite, args, argnums, strict)
  units = select_layers(p, layers) if layers is not None else {}
  p.tapped = frozenset(u.outs[0] for u in units.values())
  nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
  nums = tuple(i % len(args) for i in nums)

  def g(explained, deltas):
    full = list(args)
    for i, a in zip(nums, explained):
      full[i] = a
    taps = {units[k].outs[0]: d for k, d in deltas.items()}
    return jax.tree_util.tree_unflatten(p.out_tree, run(p, jax.tree_util.tree_leaves(full), taps))

  zeros = {k: jnp.zeros(p.program.avals[u.outs[0]].shape, p.program.avals[u.outs[0]].dtype) for k, u in units.items()}
  out, vjp = jax.vjp(g, tuple(args[i] for i in nums), zeros)

  def vjp_fn(cotangent):
    r_args, r_layers = vjp(cotangent)
    return (r_args[0] if isinstance(argnums, int) else r_args), r_layers

  return out, vjp_fn
