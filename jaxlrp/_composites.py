"""Composites: ordered (selector, rule) pairs, the last match wins, on top of a base map; and the presets.

A composite reads like a table (RelevancePropagation.jl): general maps first, special cases after.

    Composite(("dense", Epsilon()), ("conv", Gamma(0.25)), (First(), ZBox(-3.0, 3.0)))
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable

import jax

from jaxlrp._errors import SelectorError
from jaxlrp._graph import KINDS
from jaxlrp._rules import (
    AlphaBeta, ConstantStd, Epsilon, Flat, Gamma, Gradient, Norm, Pass, Rule, SignalTakeAll, Uniform, ZBox, ZPlus,
)

__all__ = [
    "Composite", "Kind", "First", "Last", "Path", "Name", "Where", "OpInfo",
    "EpsilonPlus", "EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat",
    "AttnLRP", "CPLRP",
]

KIND_GROUPS = {"linear": ("dense", "conv"), "pool": ("avg_pool", "max_pool")}
_LAYERS = ("dense", "conv")


@dataclasses.dataclass(frozen=True)
class OpInfo:
  """What selectors see of one recognised op: its kind, where it is, and which parameter it uses."""

  index: int
  kind: str
  name: str  # the name stack, e.g. "Net/Conv_0" (linen)
  path: str | None  # the weight's parameter path, e.g. "params/Conv_0/kernel"
  source: str  # "file.py:12 (fn)"
  is_first: Callable[[tuple], bool] = dataclasses.field(repr=False, compare=False)
  is_last: Callable[[tuple], bool] = dataclasses.field(repr=False, compare=False)


def _expand_kinds(kinds) -> tuple:
  kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
  out = []
  for k in kinds:
    if k in KIND_GROUPS:
      out.extend(KIND_GROUPS[k])
    elif k in KINDS:
      out.append(k)
    else:
      known = ", ".join(repr(k) for k in (*KINDS, *KIND_GROUPS))
      raise SelectorError(
          f"Unknown op kind {k!r}. Known kinds: {known}. To select by parameter path or name stack use "
          f"jaxlrp.Path({k!r}) or jaxlrp.Name({k!r}).")
  return tuple(out)


class Selector:
  """Base of selectors. `a & b` matches ops that both match."""

  allow_empty: bool = True

  def __call__(self, op: OpInfo) -> bool:  # pragma: no cover - abstract
    raise NotImplementedError

  def __and__(self, other) -> "And":
    return And(self, as_selector(other))


@dataclasses.dataclass(frozen=True)
class Kind(Selector):
  """Ops of a kind: "dense", "conv", "activation", "norm" (a standalone elementwise scale-and-shift such as a
  BatchNorm with no layer before it), "gate" (signal * sigmoid branch), "add", "sum", "avg_pool", "max_pool", or a group
  ("linear" = dense|conv, "pool" = avg_pool|max_pool). A kind selector may match nothing (a preset with conv
  rules works on an MLP).

  Example:
    >>> import jaxlrp
    >>> jaxlrp.Composite((jaxlrp.Kind("linear"), jaxlrp.Epsilon()))
    Composite(('linear', Epsilon(epsilon=1e-06)))
  """

  kind: str
  allow_empty: bool = True

  def __post_init__(self):
    _expand_kinds(self.kind)

  def __call__(self, op):
    return op.kind in _expand_kinds(self.kind)

  def __repr__(self):
    return repr(self.kind)


@dataclasses.dataclass(frozen=True)
class First(Selector):
  """The first layer(s) reached from the explained input: ops of `kinds` with no op of `kinds` before them.

  Loops and branches count as they run, as in the unrolled program: a layer in a `lax.scan` body that reads a slice
  of the explained input (the input projection `x_t @ W_x` of an RNN) is first at every step, and the layer after
  the loop is not; a layer stack scanned over its weights whose carry starts as the input has its first layer at
  iteration 0 only (jaxlrp runs that iteration outside the scan with its own rules); a layer reading the input in
  each branch of a `cond` / `switch` is first in each.

  Example:
    >>> import jaxlrp
    >>> jaxlrp.Composite((jaxlrp.First(kinds=("conv",)), jaxlrp.ZBox(0.0, 1.0)))
    Composite((First(kinds=('conv',)), ZBox(low=0.0, high=1.0, epsilon=1e-06)))
  """

  kinds: tuple = _LAYERS
  allow_empty: bool = False

  def __post_init__(self):
    object.__setattr__(self, "kinds", _expand_kinds(self.kinds))

  def __call__(self, op):
    return op.kind in self.kinds and op.is_first(self.kinds)

  def __repr__(self):
    return "First()" if self.kinds == _LAYERS else f"First(kinds={self.kinds})"


@dataclasses.dataclass(frozen=True)
class Last(Selector):
  """The last layer(s) before the output: ops of `kinds` with no op of `kinds` after them.

  Loops count as they run: in a scanned layer stack that ends the model, only the final iteration's layer is last.

  Example:
    >>> import jaxlrp
    >>> jaxlrp.Composite((jaxlrp.Last(), jaxlrp.Epsilon(0.0)))
    Composite((Last(), Epsilon(epsilon=0.0)))
  """

  kinds: tuple = _LAYERS
  allow_empty: bool = False

  def __post_init__(self):
    object.__setattr__(self, "kinds", _expand_kinds(self.kinds))

  def __call__(self, op):
    return op.kind in self.kinds and op.is_last(self.kinds)

  def __repr__(self):
    return "Last()" if self.kinds == _LAYERS else f"Last(kinds={self.kinds})"


def _glob(pattern: str, text: str | None) -> bool:
  if text is None:
    return False
  parts = text.split("/")
  return any(fnmatch.fnmatchcase("/".join(parts[:n]), pattern) for n in range(len(parts), 0, -1))


@dataclasses.dataclass(frozen=True)
class Path(Selector):
  """Layers whose weight has a parameter path matching a glob (`*` crosses `/`), or whose parent path does.

  Paths join `jax.tree_util.tree_flatten_with_path` keys of the function's arguments with "/", without the
  argument index: linen `params/Dense_0/kernel`, nnx `linear1/kernel/value`-style attribute paths, Equinox
  `layers/0/weight`. Parameters must be passed as arguments (not closed over) to have paths.

  Example:
    >>> import jaxlrp
    >>> jaxlrp.Composite((jaxlrp.Path("params/Conv_0"), jaxlrp.Flat()))
    Composite((Path('params/Conv_0'), Flat(epsilon=1e-06)))
  """

  pattern: str
  allow_empty: bool = False

  def __call__(self, op):
    return _glob(self.pattern, op.path)

  def __repr__(self):
    return f"Path({self.pattern!r})"


@dataclasses.dataclass(frozen=True)
class Name(Selector):
  """Ops whose name stack (linen module path, e.g. "Net/Dense_0", or a `jax.named_scope`) matches a glob.

  Example:
    >>> import jaxlrp
    >>> jaxlrp.Composite((jaxlrp.Name("*/Dense_1"), jaxlrp.Epsilon(0.25)))
    Composite((Name('*/Dense_1'), Epsilon(epsilon=0.25)))
  """

  pattern: str
  allow_empty: bool = False

  def __call__(self, op):
    return _glob(self.pattern, op.name)

  def __repr__(self):
    return f"Name({self.pattern!r})"


@dataclasses.dataclass(frozen=True)
class Where(Selector):
  """Ops for which `predicate(op: OpInfo)` is true.

  Example:
    >>> import jaxlrp
    >>> sel = jaxlrp.Where(lambda op: op.index < 2, allow_empty=True)
  """

  predicate: Callable[[OpInfo], bool]
  allow_empty: bool = False

  def __call__(self, op):
    return bool(self.predicate(op))

  def __repr__(self):
    return f"Where({getattr(self.predicate, '__name__', 'predicate')})"


@dataclasses.dataclass(frozen=True)
class And(Selector):
  left: Selector
  right: Selector

  @property
  def allow_empty(self):
    return self.left.allow_empty and self.right.allow_empty

  def __call__(self, op):
    return self.left(op) and self.right(op)

  def __repr__(self):
    return f"{self.left!r} & {self.right!r}"


def as_selector(s) -> Selector:
  if isinstance(s, Selector):
    return s
  if isinstance(s, str):
    return Kind(s)
  if callable(s):
    return Where(s)
  raise TypeError(f"A selector is a kind string, a jaxlrp selector or a predicate on OpInfo; got {s!r}.")


BASE_MAP = (
    (Kind("linear"), Gradient()),
    (Kind("activation"), Pass()),
    (Kind("norm"), Pass()),
    (Kind("gate"), SignalTakeAll()),
    (Kind("softmax"), Gradient()),
    (Kind("add"), Norm()),
    (Kind("sum"), Norm()),
    (Kind("avg_pool"), Norm()),
    (Kind("max_pool"), Gradient()),
)


class Composite:
  """An ordered list of `(selector, rule)` pairs; for each op the last matching pair whose rule applies to the
  op's kind wins, on top of the base map (activations: Pass, sums and average pools: Norm, max pools and
  unmatched layers: Gradient).

  A selector is an op-kind string, `Kind`, `First`, `Last`, `Path`, `Name`, `Where` or a combination with `&`.
  A non-kind selector that matches nothing raises `SelectorError` unless built with `allow_empty=True`.
  Composites combine with `+` (the right-hand pairs come later, so they win).

  Example:
    >>> import jaxlrp
    >>> c = jaxlrp.Composite(("dense", jaxlrp.Epsilon()), ("conv", jaxlrp.Gamma(0.25)))
    >>> c + jaxlrp.Composite((jaxlrp.First(), jaxlrp.Flat()))
    Composite(('dense', Epsilon(epsilon=1e-06)), ('conv', Gamma(gamma=0.25, epsilon=1e-06)), (First(), Flat(epsilon=1e-06)))
  """

  def __init__(self, *pairs):
    checked = []
    for pair in pairs:
      if not (isinstance(pair, tuple) and len(pair) == 2):
        raise TypeError(f"Composite takes (selector, rule) pairs; got {pair!r}.")
      selector, rule = pair
      if not isinstance(rule, Rule):
        raise TypeError(f"The second item of a Composite pair must be a jaxlrp rule (e.g. jaxlrp.Epsilon()); "
                        f"got {rule!r}.")
      checked.append((as_selector(selector), rule))
    self.pairs = tuple(checked)

  def __add__(self, other: "Composite") -> "Composite":
    if not isinstance(other, Composite):
      return NotImplemented
    return Composite(*self.pairs, *other.pairs)

  def __repr__(self):
    return "Composite(" + ", ".join(f"({s!r}, {r!r})" for s, r in self.pairs) + ")"

  def __eq__(self, other):
    return isinstance(other, Composite) and self.pairs == other.pairs

  def __hash__(self):  # consistent with __eq__: equal composites have equal selectors and rule types
    return hash(tuple((s, type(r)) for s, r in self.pairs))

  def assign(self, ops: list) -> list:
    """The rule for each op (a list aligned with `ops`); raises if a non-kind selector matches nothing."""
    rules = []
    for op in ops:
      rule = None
      for selector, r in (*BASE_MAP, *self.pairs):
        if op.kind in r.kinds and selector(op):
          rule = r
      rules.append(rule)
    for selector, r in self.pairs:
      if not selector.allow_empty and not any(op.kind in r.kinds and selector(op) for op in ops):
        kinds = sorted(r.kinds)
        seen = "\n".join(f"  {op.kind:<10} {op.name or '-':<28} {op.path or '-'}" for op in ops) or "  (none)"
        raise SelectorError(
            f"Selector {selector!r} (rule {r!r}) matched no op of a kind the rule applies to ({kinds}).\n"
            f"Ops found (kind | name stack | parameter path):\n{seen}\n"
            f"Fix the pattern, or pass allow_empty=True to the selector if matching nothing is intended.")
    return rules


# Composites are pytrees: the rules' numeric hyperparameters are leaves, the selectors are static.
jax.tree_util.register_pytree_node(
    Composite,
    lambda c: (tuple(r for _, r in c.pairs), tuple(s for s, _ in c.pairs)),
    lambda sels, rules: Composite(*zip(sels, rules)),
)


# ---- presets (Zennit's maps and parameters) ---------------------------------------------------------------------

def EpsilonPlus(epsilon: float = 1e-6) -> Composite:
  """Epsilon on dense layers, ZPlus on convolutions (Kohlbrenner et al. 2020; Zennit's `EpsilonPlus`).

  Example:
    >>> import jaxlrp
    >>> jaxlrp.EpsilonPlus()
    Composite(('dense', Epsilon(epsilon=1e-06)), ('conv', ZPlus(epsilon=1e-06)))
  """
  return Composite(("dense", Epsilon(epsilon)), ("conv", ZPlus()))


def EpsilonPlusFlat(epsilon: float = 1e-6) -> Composite:
  """EpsilonPlus, and Flat on the first dense-or-conv layer (Zennit's `EpsilonPlusFlat`).

  Example:
    >>> import jaxlrp
    >>> jaxlrp.EpsilonPlusFlat()
    Composite(('dense', Epsilon(epsilon=1e-06)), ('conv', ZPlus(epsilon=1e-06)), (First(), Flat(epsilon=1e-06)))
  """
  return EpsilonPlus(epsilon) + Composite((First(allow_empty=True), Flat()))


def EpsilonGammaBox(low: Any, high: Any, gamma: float = 0.25, epsilon: float = 1e-6) -> Composite:
  """Epsilon on dense layers, Gamma on convolutions, ZBox(low, high) on the first convolution
  (Kohlbrenner et al. 2020; Zennit's `EpsilonGammaBox`). `low`/`high` are in the units of the explained input.

  Example:
    >>> import jaxlrp
    >>> jaxlrp.EpsilonGammaBox(low=-3.0, high=3.0)
    Composite(('dense', Epsilon(epsilon=1e-06)), ('conv', Gamma(gamma=0.25, epsilon=1e-06)), (First(kinds=('conv',)), ZBox(low=-3.0, high=3.0, epsilon=1e-06)))
  """
  return Composite(("dense", Epsilon(epsilon)), ("conv", Gamma(gamma)),
                   (First(kinds=("conv",), allow_empty=True), ZBox(low, high)))


def EpsilonAlpha2Beta1(epsilon: float = 1e-6) -> Composite:
  """Epsilon on dense layers, AlphaBeta(2, 1) on convolutions (Zennit's `EpsilonAlpha2Beta1`).

  Example:
    >>> import jaxlrp
    >>> jaxlrp.EpsilonAlpha2Beta1()
    Composite(('dense', Epsilon(epsilon=1e-06)), ('conv', AlphaBeta(alpha=2.0, beta=1.0, epsilon=1e-06)))
  """
  return Composite(("dense", Epsilon(epsilon)), ("conv", AlphaBeta(2.0, 1.0)))


def EpsilonAlpha2Beta1Flat(epsilon: float = 1e-6) -> Composite:
  """EpsilonAlpha2Beta1, and Flat on the first dense-or-conv layer (Zennit's `EpsilonAlpha2Beta1Flat`).

  Example:
    >>> import jaxlrp
    >>> len(jaxlrp.EpsilonAlpha2Beta1Flat().pairs)
    3
  """
  return EpsilonAlpha2Beta1(epsilon) + Composite((First(allow_empty=True), Flat()))


def AttnLRP(epsilon: float = 0.0) -> Composite:
  """AttnLRP (Achtibat et al. 2024): Epsilon on dense and conv layers, the uniform rule on products of two data
  values (attention scores, attention x values, gated MLPs), the Taylor rule (the gradient) on softmax, LayerNorm
  and RMSNorm with the standard deviation held constant, the identity rule on activations, and the gradient on
  residual adds and means.

  The default `epsilon=0` is LXT 2.1's efficient mode (the plain gradient on linear layers), which jaxlrp matches
  to float rounding; pass a small `epsilon` (e.g. 1e-6) for the stabilised epsilon rule.

  Example:
    >>> import jaxlrp
    >>> [type(rule).__name__ for _, rule in jaxlrp.AttnLRP().pairs]
    ['Epsilon', 'Uniform', 'Uniform', 'Gradient', 'ConstantStd', 'Pass', 'Gradient', 'Gradient']
  """
  return Composite(("linear", Epsilon(epsilon)), ("bilinear", Uniform()), ("gate", Uniform()),
                   ("softmax", Gradient()), ("norm", ConstantStd()), ("activation", Pass()),
                   ("add", Gradient()), ("sum", Gradient()))


def CPLRP(epsilon: float = 0.0) -> Composite:
  """CP-LRP (Ali et al. 2022, "XAI for Transformers: Better Explanations through Conservative Propagation"):
  AttnLRP's map, but attention weights and gates are constants, so no relevance flows through queries, keys or
  gate branches; all relevance of `A v` goes to the values.

  Example:
    >>> import jaxlrp
    >>> type(jaxlrp.CPLRP().pairs[-1][1]).__name__
    'SignalTakeAll'
  """
  return AttnLRP(epsilon) + Composite(("gate", SignalTakeAll()))
