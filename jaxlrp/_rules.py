r"""LRP rules: small immutable values with the literature's names, and their backward in gradient form.

Convention (DESIGN.md section 1): jaxlrp propagates a quantity `g` such that the relevance of a value `v` is
`v * g`. A rule receives the relevance `R = z * g_z` of a layer's output `z = (W x) * s + t` (the affine epilogue
folded: `s` a per-output scale, `t` the bias) and returns `g_x`, or, for the input-layer rules (`Flat`,
`WSquare`, `ZBox`), the relevance of `x` itself. Notation: `x+ = max(x, 0)`, `x- = min(x, 0)`, `W` the effective
weight `W s`, `stab(z) = z + eps * sgn0(z)` with `sgn0(0) = +1`.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Rule", "Zero", "Epsilon", "Gamma", "ZPlus", "AlphaBeta", "Flat", "WSquare", "ZBox", "Pass", "Norm",
    "Gradient", "SignalTakeAll", "Uniform", "ConstantStd", "stabilize",
]

LAYER_KINDS = frozenset({"dense", "conv"})
PARAM_FREE_KINDS = frozenset({"add", "sum", "avg_pool"})


def stabilize(z, epsilon):
  """`z + eps * sgn0(z)` with `sgn0(0) = +1`; eps is clamped to the dtype's smallest normal number."""
  eps = jnp.maximum(jnp.asarray(epsilon, z.dtype), jnp.finfo(z.dtype).tiny)
  return z + eps * jnp.where(z >= 0, 1, -1).astype(z.dtype)


def _rule(*data_fields: str, meta_fields: tuple = ()):
  """Makes a frozen dataclass a pytree whose numeric hyperparameters are leaves (traceable, vmappable)."""

  def wrap(cls):
    cls = dataclasses.dataclass(frozen=True, repr=False)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=list(data_fields), meta_fields=list(meta_fields))

  return wrap


def _check_zero_params(zero_params) -> tuple:
  zp = (zero_params,) if isinstance(zero_params, str) else tuple(zero_params or ())
  bad = [p for p in zp if p != "bias"]
  if bad:
    raise ValueError(f"zero_params supports only 'bias' (the folded bias of the layer); got {bad}.")
  return zp


class Rule:
  """Base class of LRP rules.

  `mode` says how the interpreter realises the rule: "gradient" (the ordinary VJP), "rescale" (the ordinary VJP
  after scaling the output cotangent elementwise), "pass" (the identity rule of an elementwise region) or
  "custom" (a custom VJP calling `propagate`). `kinds` are the op kinds the rule applies to.
  """

  mode: ClassVar[str] = "custom"
  kinds: ClassVar[frozenset] = LAYER_KINDS
  input_rule: ClassVar[bool] = False
  zero_params: tuple = ()

  def __post_init__(self):
    if any(f.name == "zero_params" for f in dataclasses.fields(self)):
      object.__setattr__(self, "zero_params", _check_zero_params(self.zero_params))

  @property
  def zero_bias(self) -> bool:
    return "bias" in self.zero_params

  def propagate(self, m: "LayerMath", relevance):  # pragma: no cover - abstract
    raise NotImplementedError

  def __repr__(self) -> str:
    fields = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
              if f.name != "zero_params" or getattr(self, f.name)]
    return f"{type(self).__name__}({', '.join(fields)})"


@_rule("epsilon", meta_fields=("zero_params",))
class Epsilon(Rule):
  r"""LRP-epsilon (Bach et al. 2015; Montavon et al. 2019, "Layer-Wise Relevance Propagation: An Overview").

  .. math:: R_x = x \odot W^\top \frac{R}{\mathrm{stab}(Wx + b)}

  Implemented as a rescaled cotangent (`g_z * z / stab(z)`) followed by the layer's ordinary transpose, so it
  costs what `jax.grad` costs. Applies to dense and conv layers and to parameter-free sums and average pools.

  Example:
    >>> import jax, jax.numpy as jnp, jaxlrp
    >>> f = lambda w, x: x @ w
    >>> g = jaxlrp.lrp(f, jaxlrp.Composite(("dense", jaxlrp.Epsilon(0.1))), argnums=1)
    >>> w, x = jnp.array([[1.0], [2.0]]), jnp.array([1.0, 1.0])
    >>> r = jax.grad(lambda x: g(w, x)[0])(x)  # R = 3; R_x = x * w * 3 / 3.1
    >>> [round(float(v), 4) for v in r]
    [0.9677, 1.9355]
  """

  mode: ClassVar[str] = "rescale"
  kinds: ClassVar[frozenset] = LAYER_KINDS | PARAM_FREE_KINDS
  epsilon: Any = 1e-6
  zero_params: tuple = ()


def Zero(zero_params=()) -> Epsilon:
  r"""LRP-0 (Bach et al. 2015): Epsilon with `epsilon = 0`.

  .. math:: R_x = x \odot W^\top \frac{R}{Wx + b}

  With `epsilon = 0` the rescale `z / z` is 1, so jaxlrp realises LRP-0 as the plain gradient of the layer (as LXT
  does): an output that is exactly zero passes on the cotangent it receives. On bias-free ReLU networks it equals
  gradient x input.

  Example:
    >>> import jaxlrp
    >>> jaxlrp.Zero()
    Epsilon(epsilon=0.0)
  """
  return Epsilon(0.0, zero_params)


@_rule("epsilon", meta_fields=("zero_params",))
class ZPlus(Rule):
  r"""LRP-z+ (Montavon et al. 2017, Deep Taylor Decomposition), in Zennit's sign-split form.

  .. math:: z^+ = W^+x^+ + W^-x^- + b^+,\quad
            R_x = x^+ \odot W^{+\top}\frac{R}{\mathrm{stab}(z^+)} + x^- \odot W^{-\top}\frac{R}{\mathrm{stab}(z^+)}

  Where the input is known to be non-negative (after a ReLU or a pool of ReLU outputs) `x^- = 0` and the rule
  costs one extra forward and one transpose with `W^+`.

  Example:
    >>> import jaxlrp
    >>> jaxlrp.Composite(("conv", jaxlrp.ZPlus()))
    Composite(('conv', ZPlus(epsilon=1e-06)))
  """

  epsilon: Any = 1e-6
  zero_params: tuple = ()

  def propagate(self, m, relevance):
    b = m.bias(self.zero_bias)
    if m.nonneg:
      zp = m.F("P", m.x) + _pos(b)
      return m.T("P", relevance / stabilize(zp, self.epsilon))
    xp, xn = _pos(m.x), _neg(m.x)
    zp = m.F("P", xp) + m.F("N", xn) + _pos(b)
    c = relevance / stabilize(zp, self.epsilon)
    tp, tn = m.T_many(("P", "N"), c)
    return jnp.where(m.x > 0, tp, tn)


@_rule("alpha", "beta", "epsilon", meta_fields=("zero_params",))
class AlphaBeta(Rule):
  r"""LRP-alpha-beta (Bach et al. 2015; Montavon et al. 2019). Requires `alpha - beta = 1`, both >= 0.

  .. math:: z_a = W^+x^+ + W^-x^- + b^+,\quad z_b = W^-x^+ + W^+x^- + b^-

  .. math:: R_x = \alpha\Big[x^+ W^{+\top}\tfrac{R}{\mathrm{stab}(z_a)} + x^- W^{-\top}\tfrac{R}{\mathrm{stab}(z_a)}\Big]
                - \beta\Big[x^+ W^{-\top}\tfrac{R}{\mathrm{stab}(z_b)} + x^- W^{+\top}\tfrac{R}{\mathrm{stab}(z_b)}\Big]

  Example:
    >>> import jaxlrp
    >>> jaxlrp.AlphaBeta(alpha=2.0, beta=1.0)
    AlphaBeta(alpha=2.0, beta=1.0, epsilon=1e-06)
  """

  alpha: Any = 2.0
  beta: Any = 1.0
  epsilon: Any = 1e-6
  zero_params: tuple = ()

  def __post_init__(self):
    super().__post_init__()
    if isinstance(self.alpha, (int, float)) and isinstance(self.beta, (int, float)):
      if self.alpha < 0 or self.beta < 0 or abs(self.alpha - self.beta - 1.0) > 1e-12:
        raise ValueError(f"AlphaBeta needs alpha - beta = 1 and alpha, beta >= 0 (relevance conservation); "
                         f"got alpha={self.alpha}, beta={self.beta}. Try AlphaBeta(2, 1) or AlphaBeta(1, 0).")

  def propagate(self, m, relevance):
    b = m.bias(self.zero_bias)
    a, bt, eps = self.alpha, self.beta, self.epsilon
    if m.nonneg:
      # W- x is computed directly: as W x - W+ x it would lose the digits z_b is made of wherever W+ x dominates
      # (float32 cancellation). Before a ReLU, R = 0 where z <= 0, and where z > 0, z_a = W+ x + b+ exceeds |W- x|,
      # so W+ x = W x - W- x (W x = z - b from the forward) keeps all its digits: one modified forward instead of
      # two. Elsewhere (the output is signed, e.g. before a residual add) either difference could cancel.
      if m.feeds_relu and not self.zero_bias:
        zb_lin = m.F("N", m.x)
        za_lin = m.linear_out - zb_lin
      else:
        za_lin, zb_lin = m.F_many(("P", "N"), m.x)
      za, zb = za_lin + _pos(b), zb_lin + _neg(b)
      ca, cb = relevance / stabilize(za, eps), relevance / stabilize(zb, eps)
      # W-^T is applied directly, not as W^T - W+^T: where z_b is ~0, c_b is huge and the difference of two
      # large transposes would cancel catastrophically.
      return m.T_sum([("P", a * ca), ("N", -bt * cb)])
    xp, xn = _pos(m.x), _neg(m.x)
    fp_p, fn_p = m.F_many(("P", "N"), xp)
    fp_n, fn_n = m.F_many(("P", "N"), xn)
    za = fp_p + fn_n + _pos(b)
    zb = fn_p + fp_n + _neg(b)
    ca, cb = relevance / stabilize(za, eps), relevance / stabilize(zb, eps)
    # Each sign of x needs a sum of two transposes (one op each with `stack_transpose`); W^T - W+^T in place of
    # W-^T would cancel catastrophically where z_a or z_b is ~0 and the cotangent is huge.
    pos = m.T_sum([("P", a * ca), ("N", -bt * cb)])
    neg = m.T_sum([("N", a * ca), ("P", -bt * cb)])
    return jnp.where(m.x > 0, pos, neg)


@_rule("gamma", "epsilon", meta_fields=("zero_params",))
class Gamma(Rule):
  r"""LRP-gamma (Montavon et al. 2019), the generalised sign-split form that Zennit ships.

  With :math:`W_u = W + \gamma W^+`, :math:`b_u = b + \gamma b^+`, :math:`W_d = W + \gamma W^-`,
  :math:`b_d = b + \gamma b^-`:

  .. math:: z_u = W_u x^+ + W_d x^- + b_u,\quad z_d = W_d x^+ + W_u x^- + b_d

  .. math:: s_u = [z > 0]\frac{R}{\mathrm{stab}(z_u)},\quad s_d = [z < 0]\frac{R}{\mathrm{stab}(z_d)}

  .. math:: R_x = x^+ (W_u^\top s_u + W_d^\top s_d) + x^- (W_d^\top s_u + W_u^\top s_d)

  with the unmodified `z = Wx + b`. On non-negative inputs this costs one extra forward and two transposes
  (`W_u^T s_u + W_d^T s_d = W^T(s_u + s_d + gamma s_d) + gamma W^{+T}(s_u - s_d)`, reusing the forward's `Wx`).

  Example:
    >>> import jaxlrp
    >>> jaxlrp.Gamma(0.25)
    Gamma(gamma=0.25, epsilon=1e-06)
  """

  gamma: Any = 0.25
  epsilon: Any = 1e-6
  zero_params: tuple = ()

  def propagate(self, m, relevance):
    b = m.bias(self.zero_bias)
    gm, eps = self.gamma, self.epsilon
    zlin = m.linear_out
    zmask = zlin + b
    if m.nonneg and m.feeds_relu and m.s is None and not self.zero_bias:
      # R = 0 where z <= 0, so s_d = 0 and only W_u = W + gamma W+ is needed: one forward, one transpose.
      zu = zmask + gm * (m.F("P", m.x) + _pos(b))
      su = jnp.where(zmask > 0, relevance / stabilize(zu, eps), 0)
      return m.transpose(m.w + gm * _pos(m.w), su)
    if m.nonneg:
      fp = m.F("P", m.x)
      zu = zmask + gm * (fp + _pos(b))
      zd = zmask + gm * (zlin - fp + _neg(b))
      su = jnp.where(zmask > 0, relevance / stabilize(zu, eps), 0)
      sd = jnp.where(zmask < 0, relevance / stabilize(zd, eps), 0)
      return m.T_sum([("W", su + sd + gm * sd), ("P", gm * (su - sd))])
    xp, xn = _pos(m.x), _neg(m.x)
    fw_p, fp_p = m.F_many(("W", "P"), xp)
    fw_n, fp_n = m.F_many(("W", "P"), xn)
    fn_p, fn_n = fw_p - fp_p, fw_n - fp_n
    zu = fw_p + gm * fp_p + fw_n + gm * fn_n + b + gm * _pos(b)
    zd = fw_p + gm * fn_p + fw_n + gm * fp_n + b + gm * _neg(b)
    su = jnp.where(zmask > 0, relevance / stabilize(zu, eps), 0)
    sd = jnp.where(zmask < 0, relevance / stabilize(zd, eps), 0)
    (tw_u, tp_u), (tw_d, tp_d) = m.T_many(("W", "P"), su), m.T_many(("W", "P"), sd)
    tn_u, tn_d = tw_u - tp_u, tw_d - tp_d
    pos = tw_u + gm * tp_u + tw_d + gm * tn_d
    neg = tw_u + gm * tn_u + tw_d + gm * tp_d
    return jnp.where(m.x > 0, pos, neg)


@_rule("epsilon")
class Flat(Rule):
  r"""Flat rule (Lapuschkin et al. 2019, "Unmasking Clever Hans predictors"): all weights 1, no bias, input 1.

  .. math:: R_x = \mathbf{1}^\top \frac{R}{\mathrm{stab}(n)},\quad n = \text{fan-in of each output}

  The fan-in counts in-bounds taps only (12 at the padded corner of a 3x3 conv over 3 channels, 27 inside).
  An input-layer rule: it produces relevance of the explained input directly.

  Example:
    >>> import jaxlrp
    >>> jaxlrp.Composite((jaxlrp.First(), jaxlrp.Flat()))
    Composite((First(), Flat(epsilon=1e-06)))
  """

  input_rule: ClassVar[bool] = True
  epsilon: Any = 1e-6

  def propagate(self, m, relevance):
    ones_w = jnp.ones_like(m.w)
    n = m.apply(ones_w, m.ones_input())
    return m.transpose(ones_w, relevance / stabilize(n, self.epsilon))


@_rule("epsilon", meta_fields=("zero_params",))
class WSquare(Rule):
  r"""w^2 rule (Montavon et al. 2017, Deep Taylor Decomposition).

  .. math:: R_x = (W^{\odot 2})^\top \frac{R}{\mathrm{stab}(W^{\odot 2}\mathbf{1} + b^{\odot 2})}

  Keeps `b^2` in the denominator unless `zero_params=("bias",)`. An input-layer rule.

  Example:
    >>> import jaxlrp
    >>> jaxlrp.WSquare()
    WSquare(epsilon=1e-06)
  """

  input_rule: ClassVar[bool] = True
  epsilon: Any = 1e-6
  zero_params: tuple = ()

  def propagate(self, m, relevance):
    w2 = m.w * m.w
    s2 = 1.0 if m.s is None else m.s * m.s
    b = m.bias(self.zero_bias)
    den = m.apply(w2, m.ones_input()) * s2 + b * b
    return m.transpose(w2, s2 * relevance / stabilize(den, self.epsilon))


@_rule("low", "high", "epsilon")
class ZBox(Rule):
  r"""z^B rule for bounded inputs (Montavon et al. 2017, Deep Taylor Decomposition).

  .. math:: R_x = x \odot W^\top s - l \odot W^{+\top} s - h \odot W^{-\top} s,\quad
            s = \frac{R}{\mathrm{stab}(Wx - W^+ l - W^- h)}

  (the bias cancels). `low`/`high` are scalars or arrays broadcastable to the explained input, in the units of
  the explained input: elementwise preprocessing inside the model (`x / 255`, `(x - mean) / std`) is applied to
  them automatically. An input-layer rule.

  Example:
    >>> import jaxlrp
    >>> jaxlrp.ZBox(low=0.0, high=1.0)
    ZBox(low=0.0, high=1.0, epsilon=1e-06)
  """

  input_rule: ClassVar[bool] = True
  low: Any = None
  high: Any = None
  epsilon: Any = 1e-6

  def propagate(self, m, relevance):
    low, high = m.bounds
    zb = m.linear_out - m.F("P", low) - m.F("N", high)
    c = relevance / stabilize(zb, self.epsilon)
    # W = W+ + W-, so x W^T c - l W+^T c - h W-^T c takes two transposes, not three.
    tp, tn = m.T_many(("P", "N"), c)
    return (m.x - low) * tp + (m.x - high) * tn


@_rule("epsilon")
class Pass(Rule):
  r"""Identity rule for elementwise activations and standalone norms: relevance passes unchanged,
  :math:`R_z = R_a` for `a = phi(z)`.

  In gradient form `g_z = g_a * a / stab(z)`. For ReLU regions jaxlrp uses the gradient, which is the same
  and exact. `epsilon` defaults to 1e-10 (LXT's identity rule), so the rule is a pass-through in float32.

  Example:
    >>> import jaxlrp
    >>> jaxlrp.Composite(("activation", jaxlrp.Pass()))
    Composite(('activation', Pass(epsilon=1e-10)))
  """

  mode: ClassVar[str] = "pass"
  kinds: ClassVar[frozenset] = frozenset({"activation", "norm"})
  epsilon: Any = 1e-10


@_rule("epsilon")
class Norm(Rule):
  r"""The parameter-free z-rule for sums and average pools (Zennit's Norm).

  .. math:: R_x = x \odot J^\top \frac{R}{\mathrm{stab}(y)}

  with `y` the op's output and `J` its Jacobian (residual adds: the proportional split).

  Example:
    >>> import jaxlrp
    >>> jaxlrp.Composite(("add", jaxlrp.Norm()))
    Composite(('add', Norm(epsilon=1e-06)))
  """

  mode: ClassVar[str] = "rescale"
  kinds: ClassVar[frozenset] = PARAM_FREE_KINDS | {"max_pool"}
  epsilon: Any = 1e-6


@_rule()
class Gradient(Rule):
  r"""The plain gradient: :math:`R_x = x \odot J^\top g` (LRP-0 on linear ops, winner-takes-all on max pools).

  On a softmax `s = softmax(x)` this is the Taylor rule at `x` of AttnLRP (Achtibat et al. 2024),
  :math:`R_x = x \odot (R - s \sum R)`: in gradient form it is exactly the softmax's VJP.

  Example:
    >>> import jaxlrp
    >>> jaxlrp.Composite(("max_pool", jaxlrp.Gradient()))
    Composite(('max_pool', Gradient()))
  """

  mode: ClassVar[str] = "gradient"
  kinds: ClassVar[frozenset] = LAYER_KINDS | PARAM_FREE_KINDS | {"max_pool", "activation", "norm", "gate",
                                                                  "bilinear", "softmax"}


@_rule()
class SignalTakeAll(Rule):
  r"""Gates (Arras et al. 2017, 2019): in `y = signal * gate` with the gate computed by a sigmoid, all relevance
  goes to the signal, :math:`R_{signal} = R_y`; the gate is a constant of the explanation.

  In gradient form the gate operand is held constant (`stop_gradient`), which is exact.

  Example:
    >>> import jaxlrp
    >>> jaxlrp.Composite(("gate", jaxlrp.SignalTakeAll()))
    Composite(('gate', SignalTakeAll()))
  """

  mode: ClassVar[str] = "signal"
  kinds: ClassVar[frozenset] = frozenset({"gate"})


@_rule()
class Uniform(Rule):
  r"""The uniform rule for products of two data values (AttnLRP, Achtibat et al. 2024): each factor gets half.

  For `y = a * b` (or a matrix product such as `q k^T`, `A v`):
  :math:`R_a = R_b = \tfrac12 R_y` elementwise in the bilinear sense, i.e. half the gradient in gradient form
  (a product is homogeneous of degree 2, so `a . da + b . db = 2 y`).

  Example:
    >>> import jaxlrp
    >>> jaxlrp.Composite(("bilinear", jaxlrp.Uniform()))
    Composite(('bilinear', Uniform()))
  """

  mode: ClassVar[str] = "uniform"
  kinds: ClassVar[frozenset] = frozenset({"bilinear", "gate"})


@_rule()
class ConstantStd(Rule):
  r"""LayerNorm / RMSNorm with the standard deviation held constant (AttnLRP; LXT's convention).

  For `y = (x - mean(x)) / std(x)` the division by `std` is linear once `std` is a constant, so relevance follows
  the gradient through the centring (and the affine scale and bias, where the bias absorbs its share).

  Example:
    >>> import jaxlrp
    >>> jaxlrp.Composite(("norm", jaxlrp.ConstantStd()))
    Composite(('norm', ConstantStd()))
  """

  mode: ClassVar[str] = "signal"
  kinds: ClassVar[frozenset] = frozenset({"norm"})


def _pos(v):
  return jnp.maximum(v, 0)


def _neg(v):
  return jnp.minimum(v, 0)


@dataclasses.dataclass
class LayerMath:
  """What a rule needs to know about one linear layer `z = lin(x, w) * s + t`, in the compute dtype.

  `apply(V, v)` is the layer with weight `V` on input `v` (no epilogue arithmetic); `transpose(V, c)` its
  transpose. `F(which, v)` / `T(which, c)` do the same for the effective weight `W s` ("W") and its positive
  ("P") and negative ("N") parts, using `(W s)+ = W+ s+ + W- s-` when `s` varies per output. `F_many`,
  `T_many` and `T_sum` do several of these at once.
  """

  lin: Callable  # (v, V) -> lin(v, V)
  x: Any
  w: Any
  z: Any  # the layer's true output
  s: Optional[Any]  # None when the epilogue does not scale
  t: Any  # folded bias (zeros when there is none)
  nonneg: bool
  bounds: Optional[tuple] = None
  feeds_relu: bool = False  # relevance is zero wherever z <= 0 (the output feeds a ReLU directly)
  stack_forward: bool = False  # F_many / T_many: several weights as one weight-stacked op (see below)
  stack_transpose: bool = False  # T_sum: several transposes as one transpose of the weight-stacked op
  sample_axis: Optional[int] = None  # x's batch axis where one sample's output depends on that sample alone
  input_mask: Optional[Any] = None  # 1 where x holds an explained-input element, 0 at padded constants (None: all)

  def ones_input(self):
    """An input of ones at the explained-input elements (0 at constants the model padded or concatenated to it)
    for sample-independent constants (a fan-in, a denominator): one sample where `sample_axis` is known (the
    result broadcasts over the batch), else shaped like x."""
    if self.input_mask is not None:
      if self.sample_axis is None:
        return self.input_mask
      return jax.lax.slice_in_dim(self.input_mask, 0, 1, axis=self.sample_axis)
    if self.sample_axis is None:
      return jnp.ones_like(self.x)
    shape = list(self.x.shape)
    shape[self.sample_axis] = 1
    return jnp.ones(shape, self.x.dtype)

  @property
  def linear_out(self):
    """`(W s) x`, recovered from the forward as `z - t`."""
    return self.z - self.t

  def bias(self, zero: bool):
    return jnp.zeros_like(self.t) if zero else self.t

  def apply(self, V, v):
    return self.lin(v, V)

  def transpose(self, V, c):
    _, vjp = jax.vjp(lambda u: self.lin(u, V), self.x)
    return vjp(c)[0]

  def _terms(self, which: str):
    """The effective weight of `which` as `[(base, scale)]`: a sum of base weights ("w", "p" = W+, "n" = W-),
    each times a per-output scale (None: 1)."""
    if which == "W":
      return [("w", self.s)]
    a, b = ("p", "n") if which == "P" else ("n", "p")
    if self.s is None:
      return [(a, None)]
    return [(a, _pos(self.s)), (b, _neg(self.s))]

  def _weight(self, base: str):
    if base == "w":
      return self.w
    return _pos(self.w) if base == "p" else _neg(self.w)

  # Several weights applied to one input (or transposed against one cotangent) can run as one convolution over
  # the weights stacked by vmap (stacked output features). Whether that is faster depends on the shapes; on XLA CPU
  # (see `_conv_stacking` in _core) it pays for narrow outputs and, for T_sum, for an image's few input channels,
  # and costs an activation-sized layout copy elsewhere. Dot products never stack: the stacked weights and outputs
  # were copied on every step of a scan.

  def _apply_stacked(self, bases, v):
    if len(bases) == 1 or not self.stack_forward:
      return [self.apply(self._weight(b), v) for b in bases]
    out = jax.vmap(lambda V: self.lin(v, V))(jnp.stack([self._weight(b) for b in bases]))
    return list(out)

  def F_many(self, whiches, v) -> tuple:
    """`(F(which, v) for which in whiches)`; one weight-stacked op with `stack_forward`."""
    terms = [self._terms(which) for which in whiches]
    bases = list(dict.fromkeys(b for t in terms for b, _ in t))
    outs = dict(zip(bases, self._apply_stacked(bases, v)))
    scaled = lambda b, sc: outs[b] if sc is None else outs[b] * sc  # noqa: E731
    return tuple(functools.reduce(operator.add, (scaled(b, sc) for b, sc in t)) for t in terms)

  def F(self, which: str, v):
    return self.F_many((which,), v)[0]

  def T_sum(self, pairs):
    """`sum(T(which, c) for which, c in pairs)`, the cotangents of a shared base weight summed first; with
    `stack_transpose` one transpose (of the weight-stacked op)."""
    cots = {}  # base weight -> its summed cotangent
    for which, c in pairs:
      for b, sc in self._terms(which):
        cb = c if sc is None else c * sc
        cots[b] = cb if b not in cots else cots[b] + cb
    if len(cots) == 1 or not self.stack_transpose:
      return functools.reduce(operator.add, (self.transpose(self._weight(b), c) for b, c in cots.items()))
    weights = jnp.stack([self._weight(b) for b in cots])
    _, vjp = jax.vjp(lambda u: jax.vmap(lambda V: self.lin(u, V))(weights), self.x)
    return vjp(jnp.stack(list(cots.values())))[0]

  def T(self, which: str, c):
    return self.T_sum([(which, c)])

  def T_many(self, whiches, c) -> tuple:
    """`(T(which, c) for which in whiches)` for one cotangent; with `stack_forward` and no scale, one op with
    stacked outputs."""
    if self.s is not None or len(whiches) == 1 or not self.stack_forward:
      return tuple(self.T(which, c) for which in whiches)
    weights = jnp.stack([self._weight(self._terms(which)[0][0]) for which in whiches])
    return tuple(jax.vmap(lambda V: self.transpose(V, c))(weights))


def compute_dtype(dtype) -> np.dtype:
  """The dtype a rule's backward runs in: at least float32."""
  return np.promote_types(dtype, np.float32)
