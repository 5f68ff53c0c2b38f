"""Program analysis: which equations touch the explained data, and which LRP structures they form.

Works on the flattened program of `_jax.flatten_program`. Finds, on the data path from the explained input:
- linear layers (`dot_general` / `conv_general_dilated` with exactly one data operand) and their affine epilogue
  (bias, scale, casts and size-preserving reshapes by data-independent operands), also parameter-free linear ops
  (`reduce_sum` with its mean division, average pooling) and residual adds;
- activation regions (elementwise chains rooted at one data value);
- the input region (casts, reshapes, padding, concatenated constants, gathers and elementwise affine preprocessing
  between the input and the first layers), where the propagated quantity is relevance itself rather than a
  gradient;
- max pools, structural ops whose ordinary VJP is already the proportional rule, and unsupported ops.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from jaxlrp._jax import Eqn, Lit, P, Program, is_float

# Ops that only move, copy, select or cast elements: their ordinary VJP already is the proportional rule.
STRUCTURAL = frozenset(
    p.name
    for p in (
        P.reshape_p, P.transpose_p, P.broadcast_in_dim_p, P.concatenate_p, P.slice_p, P.pad_p, P.squeeze_p,
        P.convert_element_type_p, P.rev_p, P.copy_p, P.gather_p, P.dynamic_slice_p, P.select_n_p,
        P.reduce_precision_p, P.dynamic_update_slice_p, P.sharding_constraint_p,
    )
) | {"expand_dims", "device_put", "split", "stack", "top_k",  # top_k: its values are copies of the largest
       "name", "optimization_barrier"}  # identities (checkpoint_name, optimization_barrier)

# Structural ops that may sit between the explained input and the first layer (input region).
_PERMUTING = frozenset(
    p.name
    for p in (
        P.reshape_p, P.transpose_p, P.broadcast_in_dim_p, P.slice_p, P.squeeze_p, P.convert_element_type_p,
        P.rev_p, P.copy_p, P.reduce_precision_p, P.sharding_constraint_p,
        P.dynamic_slice_p,  # x[:, t] at a loop counter t (fori_loop over time steps)
    )
) | {"expand_dims", "device_put"}

_AFFINE = frozenset({"add", "sub", "mul", "div", "neg", "convert_element_type"})
_ADDITIVE = frozenset({"add", "sub", "add_any"})

# Elementwise primitives allowed inside an activation region.
ELEMENTWISE = frozenset(
    {
        "add", "sub", "mul", "div", "neg", "max", "min", "abs", "sign", "exp", "exp2", "log", "log1p", "expm1",
        "tanh", "logistic", "erf", "erfc", "erf_inv", "sqrt", "rsqrt", "cbrt", "integer_pow", "pow", "square",
        "sin", "cos", "tan", "atan", "sinh", "cosh", "asinh", "select_n", "clamp", "convert_element_type",
        "custom_jvp_call", "reduce_precision", "copy", "nextafter", "floor", "ceil", "round", "is_finite",
    }
)
_COMPARISONS = frozenset({"gt", "ge", "lt", "le", "eq", "ne", "and", "or", "not", "is_finite"})
_LINEAR_ELEMENTWISE = frozenset({"add", "sub", "mul", "div", "neg", "convert_element_type", "copy",
                                 "reduce_precision"})

KINDS = ("dense", "conv", "bilinear", "gate", "softmax", "norm", "activation", "add", "sum", "avg_pool", "max_pool")
# Ops that pick elements of one value: a selection of gate values is a gate (a step's slice of precomputed gates).
_SELECTING = frozenset({"slice", "dynamic_slice", "gather", "rev", "top_k"})
_SHAPE_ONLY = frozenset({"reshape", "broadcast_in_dim", "convert_element_type", "squeeze", "expand_dims",
                         "transpose", "copy"})


@dataclasses.dataclass(eq=False, repr=False)
class Unit:
  """A recognised structure on the data path, replaced by one rule op during interpretation."""

  kind: str
  eqns: list  # member equations in program order; the unit is emitted at the last one
  data_ins: list  # ids of the data operands
  outs: list  # ids visible outside the unit
  main: Eqn  # the linear op, or the first equation of a region
  data_pos: tuple = ()  # positions of the data operands among main.ins
  weight: Optional[int] = None  # id of the weight operand of a dense/conv layer
  epilogue: list = dataclasses.field(default_factory=list)
  has_scale: bool = False  # the epilogue multiplies or divides (the folded scale s is not 1)
  relu_only: bool = False  # an activation region made only of relu
  nonneg_input: bool = False  # the data input is known to be >= 0 (sign fact)
  feeds_relu: bool = False  # the output's only use is a ReLU (its relevance is 0 where the output is <= 0)
  fold_axes: Optional[tuple] = None  # (output axes, weight axes) when the epilogue scale is per output feature
  index: int = -1

  @property
  def name(self) -> str:
    return self.main.name

  def __repr__(self):
    return f"Unit({self.kind} #{self.index} at {self.name or '-'}: {[e.prim_name for e in self.eqns]})"

  @property
  def const_ins(self) -> list:
    """Ids of non-data operands used by member equations, in first-use order, excluding internal values."""
    internal = {o for e in self.eqns for o in e.outs}
    seen, result = set(self.data_ins), []
    for e in self.eqns:
      for a in e.ins:
        if isinstance(a, int) and a not in internal and a not in seen:
          seen.add(a)
          result.append(a)
    return result


@dataclasses.dataclass
class Analysis:
  program: Program
  explained: list  # ids of the explained leaves
  live: set  # equations that reach an output
  data: set  # ids of floating values that depend on the explained input
  relevance_form: set  # ids in the input region (the propagated quantity is relevance there)
  input_region: list  # equations of the input region, in order
  units: list
  unit_of: dict  # eqn -> unit
  unsupported: list  # (eqn, reason)
  depends_on_data: set  # equations whose value depends on the explained input (any dtype, through stop_gradient)
  batch_statistics: list  # norms whose statistics mix the batch (BatchNorm in training mode)
  loops: list  # while loops on the data path (not reverse-differentiable)
  producer: dict  # id -> eqn
  nonneg: set

  # ---- position queries used by First()/Last() selectors --------------------------------------------------------
  def first_units(self, kinds, fresh=None, reached=(), through=None) -> tuple[set, set, set]:
    """Layers of `kinds` computed from the explained input with no layer of `kinds` before them.

    Values carry two marks: `fresh` (computed from the explained input without a layer of `kinds`; by default the
    explained inputs) and `reached` (computed through such a layer). A layer is first when one of its data inputs
    is fresh and none is reached; in a loop body an input can carry neither mark (a carry that starts as a
    constant). `through(unit, fresh, reached)` gives the (fresh, reached) outputs of a scan or cond unit from its
    bodies; without it such a unit passes the marks of its inputs to all its outputs.

    Returns:
      (firsts, fresh, reached): the first layers and the marked ids.
    """
    fresh = set(self.explained if fresh is None else fresh)
    reached = set(reached)
    firsts = set()
    for e in self.program.eqns:
      if e not in self.live:
        continue
      unit = self.unit_of.get(e)
      if unit is not None and unit.main is e and unit.kind in ("scan", "cond") and through is not None:
        f, r = through(unit, fresh, reached)
        fresh.update(f)
        reached.update(r)
      elif unit is not None and unit.main is e and unit.kind in kinds:
        if any(d in fresh for d in unit.data_ins) and not any(d in reached for d in unit.data_ins):
          firsts.add(unit)
        reached.update(e.outs)
      else:
        ins = [a for a in e.ins if isinstance(a, int)]
        if any(a in reached for a in ins):
          reached.update(e.outs)
        if any(a in fresh for a in ins):
          fresh.update(e.outs)
    return firsts, fresh, reached

  def last_units(self, kinds, feeds=(), through=None) -> tuple[set, set]:
    """Layers of `kinds` with no layer of `kinds` after them on the way to an output.

    `feeds` are ids upstream of a layer of `kinds` outside this program (outputs of a loop body that the next
    iteration or the code after the loop feeds into a layer). `through(unit, feeds)` gives the inputs of a scan or
    cond unit that feed a layer, in its bodies or after it.

    Returns:
      (lasts, feeds): the last layers and the ids upstream of a layer of `kinds`.
    """
    feeds = set(feeds)
    lasts = set()
    for e in reversed(self._data_eqns()):
      unit = self.unit_of.get(e)
      if unit is not None and unit.main is e and unit.kind in ("scan", "cond") and through is not None:
        feeds.update(through(unit, feeds))
        continue
      if unit is not None and unit.eqns[-1] is e and unit.kind in kinds:
        if not any(o in feeds for o in unit.outs):
          lasts.add(unit)
      outs_feed = any(o in feeds for o in e.outs)
      if unit is not None and unit.main is e and unit.kind in kinds:
        feeds.update(a for a in e.ins if isinstance(a, int))
      elif outs_feed or (unit is not None and any(o in feeds for o in unit.outs)):
        feeds.update(a for a in e.ins if isinstance(a, int))
    return lasts, feeds

  def _data_eqns(self):
    return [e for e in self.program.eqns if e in self.live and any(
        isinstance(a, int) and a in self.data for a in e.ins)]

  def region_chain(self, target: int) -> list:
    """The input-region equations that `target` is computed from, in order."""
    needed, chain = {target}, []
    for e in reversed(self.input_region):
      if any(o in needed for o in e.outs):
        chain.append(e)
        needed.update(a for a in e.ins if isinstance(a, int) and a in self.relevance_form)
    return chain[::-1]

  def explained_root(self, target: int) -> int:
    """The explained leaf that an input-region value derives from."""
    v = target
    while v not in self.explained:
      e = self.producer[v]
      v = next(a for a in e.ins if isinstance(a, int) and a in self.relevance_form)
    return v


def _through(v, prims, producer, data):
  """Walks back from `v` through single-data-operand ops named in `prims`; returns (value, eqns passed)."""
  passed = []
  while v in producer and producer[v].prim_name in prims:
    e = producer[v]
    nxt = [a for a in e.ins if isinstance(a, int) and (a in data or e.prim_name == "stop_gradient")]
    if len(nxt) != 1:
      break
    passed.append(e)
    v = nxt[0]
  return v, passed


def _softmax_at(div: Eqn, data, producer, uses):
  """Recognises `exp(x - max(x)) / sum(exp(x - max(x)))` ending at `div` (jax.nn.softmax and hand-written)."""
  num, den = div.ins
  if not (isinstance(num, int) and isinstance(den, int) and num in data and den in data):
    return None
  d, chain = _through(den, ("broadcast_in_dim", "reshape", "expand_dims"), producer, data)
  red = producer.get(d)
  ex = producer.get(num)
  if red is None or ex is None or red.prim_name != "reduce_sum" or red.ins[0] != num or ex.prim_name != "exp":
    return None
  if any(u not in (red, div) for u in uses.get(num, ())):
    return None
  members = [div, red, ex, *chain]
  x = ex.ins[0]
  sub = producer.get(x)
  if sub is not None and sub.prim_name == "sub" and isinstance(sub.ins[1], int):
    m, max_chain = _through(sub.ins[1], ("broadcast_in_dim", "reshape", "expand_dims", "stop_gradient", "max"),
                            producer, data | {sub.ins[1]})
    top = producer.get(m)
    if top is not None and top.prim_name == "reduce_max" and top.ins[0] == sub.ins[0]:
      members += [sub, top, *max_chain]
      x = sub.ins[0]
  return Unit("softmax", members, [x], [div.outs[0]], div, (0,))


def _input_region_op(e: Eqn, dins: list, dependent: set, shape) -> bool:
  """`e` (all of whose data operands `dins` are in relevance form) keeps its result in relevance form: an op that
  moves, copies or casts elements (`_PERMUTING`), pads with a constant, concatenates with constants (CoordConv
  channels, circular padding), gathers at data-independent indices, or shifts and scales elementwise by constants.
  Its ordinary VJP then maps relevance back exactly: copies add up, constants drop out."""
  name = e.prim_name
  if name == "concatenate":
    return True
  if len(dins) != 1:
    return False
  d = dins[0]
  if name in _PERMUTING:
    return True
  if name in ("pad", "gather"):  # the data operand first; the pad value or the indices data-independent
    return e.ins[0] == d and not any(isinstance(a, int) and a in dependent for a in e.ins[1:])
  return name in _AFFINE and shape(e.outs[0]) == shape(d) and not (name == "div" and e.ins[0] != d)


def _is_relu(e: Eqn) -> bool:
  if e.prim_name == "custom_jvp_call":  # jax.nn.relu: custom_jvp around jit[name=relu] around max(x, 0)
    body = e.params["call_jaxpr"].jaxpr.eqns
    return len(body) == 1 and body[0].primitive.name == "jit" and body[0].params.get("name") == "relu"
  if e.prim_name == "max":
    return any(isinstance(a, Lit) and np.all(np.asarray(a.val) == 0) for a in e.ins)
  return False


def analyse(program: Program, explained: list, relevance_inputs=True) -> Analysis:
  """Analyses `program` with the ids `explained` as data.

  `relevance_inputs` names the explained ids that start an input region, whose propagated quantity is relevance:
  `True` for all of them (the top level), or a collection of ids (in a loop or branch body: the inputs whose
  operands outside are in relevance form, such as the slices of the explained input a scan iterates over); the
  other explained ids are ordinary data."""
  avals = program.avals
  producer = {o: e for e in program.eqns for o in e.outs}

  # Liveness: equations that reach an output.
  needed = {a for a in program.outvars if isinstance(a, int)}
  live = set()
  for e in reversed(program.eqns):
    if any(o in needed for o in e.outs) or e.params.get("effects"):
      live.add(e)
      needed.update(a for a in e.ins if isinstance(a, int))

  uses: dict = {}
  for e in program.eqns:
    if e in live:
      for a in e.ins:
        if isinstance(a, int):
          uses.setdefault(a, []).append(e)
  outputs = {a for a in program.outvars if isinstance(a, int)}

  # Data dependence first (a later operand can make an earlier-looking epilogue a bilinear product).
  data = {i for i in explained if is_float(avals[i])}
  for e in program.eqns:
    if e in live and e.prim_name != "stop_gradient" and any(isinstance(a, int) and a in data for a in e.ins):
      data.update(o for o in e.outs if is_float(avals[o]))
  dependent = set(explained)
  depends_on_data = set()
  for e in program.eqns:
    if any(isinstance(a, int) and a in dependent for a in e.ins):
      depends_on_data.add(e)
      dependent.update(e.outs)
  starts = explained if relevance_inputs is True else (relevance_inputs or ())
  relevance_form = {i for i in starts if i in data}
  input_region: list = []
  units: list = []
  unit_of: dict = {}
  unsupported: list = []
  loops: list = []  # while loops on the data path
  regions: dict = {}  # root id -> activation region under construction
  root_of: dict = {}  # region member value -> its root

  def data_ins(e):
    return [a for a in e.ins if isinstance(a, int) and a in data]

  def shape(i):
    return tuple(avals[i].shape)

  def _region_with(v, prims) -> bool:
    """`v` is (a reshape/broadcast of) a region value computed with one of `prims`."""
    while v not in root_of and v in producer and producer[v].prim_name in _SHAPE_ONLY | _SELECTING | {"mul", "div"}:
      ins = [a for a in producer[v].ins if isinstance(a, int) and a in data]
      if len(ins) != 1:
        return False
      v = ins[0]
    return v in root_of and any(e.prim_name in prims for e in regions[root_of[v]].eqns)

  def _is_gate_branch(v) -> bool:
    """A sigmoid branch (SE blocks, LSTM gates, SiLU) or a softmax output (attention weights)."""
    if _region_with(v, ("logistic",)):
      return True
    while v in producer and (producer[v].prim_name in _SHAPE_ONLY | _SELECTING or _masks(producer[v])):
      v = next((a for a in producer[v].ins if isinstance(a, int) and a in data), None)
    return v in producer and getattr(unit_of.get(producer[v]), "kind", None) == "softmax"

  def _masks(e) -> bool:
    """`e` multiplies one data value by a constant or selects it against one: a top-k mask on router weights
    (`w * stop_gradient(one_hot(argmax(w)))`, `jnp.where(keep, w, 0)`), a padding mask on attention weights."""
    return e.prim_name in ("mul", "select_n") and len(data_ins(e)) == 1 and (
        e.prim_name == "mul" or not (isinstance(e.ins[0], int) and e.ins[0] in data))

  def _is_std_branch(v, divides: bool) -> bool:
    """An inverse standard deviation (`rsqrt(var + eps)`), or a standard deviation when dividing by it."""
    return _region_with(v, ("sqrt",) if divides else ("rsqrt",))

  def _classify_product(e, dins):
    """A product of two data values: a norm (x * inverse std), a gate (x * sigmoid, attention weights x values)
    or another bilinear product (q . k^T, gated MLPs without a sigmoid)."""
    a, b = dins
    pos = lambda *vs: tuple(e.ins.index(v) for v in vs)  # noqa: E731
    if e.prim_name == "div":
      if e.ins[0] == a and _is_std_branch(b, divides=True):
        unit = Unit("norm", [e], [a, b], [e.outs[0]], e, pos(a, b))
        absorb_epilogue(unit)
        return unit
      return None
    if e.prim_name == "mul":
      stds = [d for d in dins if _is_std_branch(d, divides=False)]
      if len(stds) == 1:
        signal = a if stds[0] == b else b
        unit = Unit("norm", [e], [signal, stds[0]], [e.outs[0]], e, pos(signal, stds[0]))
        absorb_epilogue(unit)
        return unit
    gates = [d for d in dins if _is_gate_branch(d)]
    if len(gates) == 1:
      signal = a if gates[0] == b else b
      unit = Unit("gate", [e], [signal, gates[0]], [e.outs[0]], e, pos(signal, gates[0]))
    else:
      unit = Unit("bilinear", [e], [a, b], [e.outs[0]], e, pos(a, b))
    absorb_epilogue(unit, masks=True)
    return unit

  def claim(unit: Unit):
    unit.index = len(units)
    units.append(unit)
    for e in unit.eqns:
      unit_of[e] = unit

  def absorb_epilogue(unit: Unit, masks: bool = False, shifts_only: bool = False):
    """Appends the single-use affine / cast / shape ops after `unit`'s output to its epilogue.

    `shifts_only` (a sum of data values): only constants added or subtracted (`x @ Wx + h @ Wh + b`: one more term
    of the sum's proportional split), and nothing when a scale follows (a standalone norm: BatchNorm after a
    residual add)."""
    cur, chain, has_scale = unit.outs[0], [], unit.has_scale
    while cur not in outputs and len(uses.get(cur, ())) == 1:
      n = uses[cur][0]
      if n in unit_of:
        break
      name = n.prim_name
      others = [a for a in n.ins if a != cur]
      # (an operand computed from the data behind stop_gradient may come after the unit: not an epilogue)
      if any(isinstance(a, int) and (a in data or a in dependent) for a in others) or n.ins.count(cur) != 1:
        break
      out = n.outs[0]
      if shifts_only:
        if name in ("mul", "div"):
          return
        if name not in ("add", "sub") or shape(out) != shape(cur) or (name == "sub" and n.ins[1] == cur):
          break
      elif name in ("add", "sub", "mul", "div"):
        if shape(out) != shape(cur) or (name == "div" and n.ins[0] != cur):
          break
        if name in ("mul", "div") or (name == "sub" and n.ins[1] == cur):
          has_scale = True
      elif name == "convert_element_type":
        if not is_float(avals[out]):
          break
      elif name == "select_n" and masks:  # attention masks: where(mask, scores, -inf)
        if shape(out) != shape(cur):
          break
      elif name not in ("reshape", "squeeze", "expand_dims", "transpose"):
        break
      chain.append(n)
      cur = out
    unit.epilogue.extend(chain)
    unit.eqns.extend(chain)
    unit.outs = [cur]
    unit.has_scale = has_scale

  for e in program.eqns:
    if e in live and e.prim_name == "div":
      softmax = _softmax_at(e, data, producer, uses)
      if softmax is not None and not any(m in unit_of for m in softmax.eqns):
        order = {id(x): i for i, x in enumerate(program.eqns)}
        softmax.eqns.sort(key=lambda x: order[id(x)])
        claim(softmax)

  for e in program.eqns:
    if e not in live or e in unit_of:
      continue
    dins = data_ins(e)
    if not dins:
      continue
    float_outs = [o for o in e.outs if is_float(avals[o])]
    name = e.prim_name
    if not float_outs and name in _COMPARISONS and len(e.outs) == 1 and shape(e.outs[0]) == shape(dins[0]):
      roots = {root_of.get(d, d) for d in dins}
      if len(roots) == 1 and roots.pop() in regions:  # e.g. the `x > 0` of a leaky relu: part of its region
        region = regions[root_of.get(dins[0], dins[0])]
        region.eqns.append(e)
        root_of[e.outs[0]] = region.data_ins[0]
        continue
    if not float_outs or name == "stop_gradient":
      continue  # discrete results (comparisons, argmax) are constants of the explanation

    # Input region: casts, reshapes, padding, gathers and elementwise affine preprocessing of the explained input.
    if all(d in relevance_form for d in dins) and len(e.outs) == 1 and _input_region_op(e, dins, dependent, shape):
      relevance_form.add(e.outs[0])
      input_region.append(e)
      continue

    if name in ("scan", "cond"):  # re-bound with an interpreted body
      claim(Unit(name, [e], dins, list(e.outs), e, tuple(i for i, a in enumerate(e.ins) if a in dins)))
      continue
    if name == "while":
      loops.append(e)
      continue
    if name in ("dot_general", "mul", "div") and len(dins) == 2 and (
        name == "dot_general" or len({root_of.get(d, d) for d in dins}) == 2):
      product = _classify_product(e, dins)
      if product is not None:
        claim(product)
        continue
    if name in ("dot_general", "conv_general_dilated"):
      if len(dins) != 1:
        unsupported.append((e, f"`{name}` of two data-dependent operands"))
        continue
      pos = tuple(i for i, a in enumerate(e.ins) if a == dins[0])
      weight = e.ins[1 - pos[0]]
      unit = Unit("dense" if name == "dot_general" else "conv", [e], dins, [e.outs[0]], e, pos,
                  weight=weight if isinstance(weight, int) else None)
      absorb_epilogue(unit)
      claim(unit)
      continue
    if name in ("reduce_sum", "reduce_window_sum", "cumsum"):  # (a cumulative sum: a sum per output element)
      unit = Unit("avg_pool" if name == "reduce_window_sum" else "sum", [e], dins, [e.outs[0]], e, (0,))
      absorb_epilogue(unit)
      claim(unit)
      continue
    if name in ("reduce_window_max", "reduce_max", "argmax"):
      claim(Unit("max_pool", [e], dins, [e.outs[0]], e, (0,)))
      continue

    # An operand computed from the data behind `stop_gradient` (straight-through estimators: h + sg(round(h) - h))
    # is a constant of the explanation that may read the region's own values: the op stays out of regions (which
    # would need it before it exists) and keeps its ordinary VJP where it is linear in the data.
    held = any(isinstance(a, int) and a not in data and a in dependent and is_float(avals[a]) for a in e.ins)
    if held and len(dins) == 1 and (name in ("add", "sub", "mul") or (name == "div" and e.ins[0] == dins[0])):
      continue
    if name in ELEMENTWISE and len(e.outs) == 1 and all(shape(d) == shape(e.outs[0]) for d in dins) and not held:
      roots = {root_of.get(d, d) for d in dins}
      if len(roots) == 1:
        root = roots.pop()
        region = regions.get(root)
        if region is None:
          region = regions[root] = Unit("activation", [], [root], [], e, (0,))
        region.eqns.append(e)
        root_of[e.outs[0]] = root
        continue
    if name in _ADDITIVE and len(dins) == 2:
      unit = Unit("add", [e], dins, [e.outs[0]], e, tuple(i for i, a in enumerate(e.ins) if a in dins))
      absorb_epilogue(unit, shifts_only=True)
      claim(unit)
      continue
    if name in STRUCTURAL:
      if name in ("gather", "dynamic_slice", "dynamic_update_slice") and any(
          a in data for a in e.ins[1:] if isinstance(a, int) and name != "dynamic_update_slice"):
        unsupported.append((e, f"`{name}` with data-dependent indices"))
      continue
    if name in ("mul", "div") and len(dins) == 1 and not (name == "div" and e.ins[0] != dins[0]):
      continue  # scaling by a constant: linear, the ordinary VJP is the proportional rule
    unsupported.append((e, f"`{name}`" + (" of two data-dependent operands" if len(dins) > 1 else "")))

  # Finalise regions: those with a nonlinearity are activations; affine ones with a shift are standalone
  # norms (a BatchNorm with no layer before it); pure scalings keep their ordinary VJP (exact).
  for region in regions.values():
    member_outs = {o for e in region.eqns for o in e.outs}
    region.outs = [o for o in member_outs
                   if o in outputs or any(u not in region.eqns for u in uses.get(o, ()))]
    region.outs.sort(key=lambda o: next(i for i, e in enumerate(region.eqns) if o in e.outs))
    region.main = region.eqns[0]
    if all(e.prim_name in _LINEAR_ELEMENTWISE for e in region.eqns):
      if not any(e.prim_name in ("add", "sub") for e in region.eqns):
        continue
      region.kind = "norm"
    region.relu_only = all(_is_relu(e) for e in region.eqns)
    claim(region)
  units.sort(key=lambda u: program.eqns.index(u.eqns[-1]))
  for i, u in enumerate(units):
    u.index = i

  analysis = Analysis(program, list(explained), live, data, relevance_form, input_region, units, unit_of,
                      unsupported, depends_on_data, [], loops, producer, set())
  analysis.nonneg = _nonneg_facts(analysis)
  for u in units:
    u.nonneg_input = all(d in analysis.nonneg for d in u.data_ins)
    out_uses = uses.get(u.outs[0], []) if len(u.outs) == 1 else []
    consumer = unit_of.get(out_uses[0]) if len(out_uses) == 1 else None
    u.feeds_relu = (u.kind in ("dense", "conv") and u.outs[0] not in outputs and consumer is not None
                    and consumer.kind == "activation" and consumer.relu_only)
    if u.has_scale and u.kind in ("dense", "conv") and u.weight is not None:
      u.fold_axes = _per_feature_scale(u, avals)
    if u.kind == "norm" and len(u.data_ins) == 2 and _reduces_over_batch(u.data_ins[1], producer, avals):
      analysis.batch_statistics.append(u)
  return analysis


def _reduces_over_batch(v, producer, avals, depth: int = 16) -> bool:
  """A normalisation statistic computed by a reduction over axis 0 (BatchNorm in training mode)."""
  frontier, seen = [v], set()
  for _ in range(depth):
    nxt = []
    for x in frontier:
      e = producer.get(x)
      if e is None or id(e) in seen:
        continue
      seen.add(id(e))
      if e.prim_name == "reduce_sum" and 0 in e.params["axes"] and len(avals[e.ins[0]].shape) >= 2:
        return True
      nxt.extend(a for a in e.ins if isinstance(a, int))
    frontier = nxt
  return False


def _feature_axes(unit: Unit, avals):
  """(output axes, weight axes) of the output features of a dense/conv layer; None for batched dots."""
  e = unit.main
  if unit.kind == "conv":
    dn = e.params["dimension_numbers"]
    return (dn.out_spec[1],), (dn.rhs_spec[0],)
  (lc, rc), (lb, rb) = e.params["dimension_numbers"]
  if lb or rb:
    return None
  ranks = [len(avals[a].shape) if isinstance(a, int) else 0 for a in e.ins]
  lhs_free = [d for d in range(ranks[0]) if d not in lc]
  rhs_free = [d for d in range(ranks[1]) if d not in rc]
  if unit.data_pos[0] == 0:  # weight on the right: its free dims are the last output dims
    return tuple(range(len(lhs_free), len(lhs_free) + len(rhs_free))), tuple(rhs_free)
  return tuple(range(len(lhs_free))), tuple(lhs_free)


def _per_feature_scale(unit: Unit, avals):
  """The folded scale can go into the weight when it varies only along the output features (BatchNorm)."""
  axes = _feature_axes(unit, avals)
  if axes is None:
    return None
  rank = len(avals[unit.main.outs[0]].shape)
  for e in unit.epilogue:
    if e.prim_name in _SHAPE_ONLY and e.prim_name != "convert_element_type":
      return None
    if e.prim_name in ("mul", "div"):
      for a in e.ins:
        if isinstance(a, int) and a not in {o for x in unit.eqns for o in x.outs}:
          shp = avals[a].shape
          if len(shp) != rank or any(shp[d] != 1 for d in range(rank) if d not in axes[0]):
            return None
  return axes


_NONNEG_PRESERVING = frozenset({"reshape", "transpose", "broadcast_in_dim", "slice", "squeeze", "expand_dims",
                                "convert_element_type", "rev", "copy", "concatenate", "stack", "gather",
                                "dynamic_slice", "reduce_max", "reduce_window_max", "reduce_precision",
                                "sharding_constraint"})


def _positive_literal_scale(unit: Unit) -> bool:
  """The epilogue only scales by positive literals (e.g. an average pool's division by the window size)."""
  for e in unit.epilogue:
    if e.prim_name in ("add", "sub"):
      return False
    if e.prim_name in ("mul", "div"):
      lits = [a for a in e.ins if isinstance(a, Lit)]
      if len(lits) != 1 or not np.all(np.asarray(lits[0].val) > 0):
        return False
  return True


def _nonneg_facts(a: Analysis) -> set:
  """Ids known to be >= 0: relu outputs and what pooling and moving elements keep non-negative."""
  nonneg: set = set()
  for e in a.program.eqns:
    if e not in a.live:
      continue
    unit = a.unit_of.get(e)
    if unit is not None:
      if e is not unit.eqns[-1]:
        continue
      if unit.kind == "activation" and unit.relu_only:
        nonneg.update(unit.outs)
      elif unit.kind in ("max_pool", "avg_pool", "sum") and all(d in nonneg for d in unit.data_ins):
        if _positive_literal_scale(unit):
          nonneg.update(unit.outs)
      continue
    dins = [x for x in e.ins if isinstance(x, int) and x in a.data]
    if not dins or not all(d in nonneg for d in dins):
      continue
    if e.prim_name in _NONNEG_PRESERVING:
      nonneg.update(e.outs)
    elif e.prim_name == "pad" and isinstance(e.ins[1], Lit) and np.all(np.asarray(e.ins[1].val) >= 0):
      nonneg.update(e.outs)
  return nonneg
