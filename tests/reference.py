"""Independent NumPy (float64) references for the LRP rules, in matrix form.

Written from the formulas of DESIGN.md section 2 only (not from jaxlrp and not from Zennit's code).

A layer is a matrix ``W`` (out x in) and a bias ``b`` (out,); ``x`` is the input vector (in,) and ``R`` the
relevance of the layer output ``z = W x + b`` (out,).  Every rule returns the relevance of ``x`` (in,).

Convolutions are checked through the same formulas: :func:`conv_matrix` builds the dense matrix of a
``conv_general_dilated`` (channels-last input, spatial..-I-O kernel, stride, padding, dilation,
feature groups) and :func:`conv_bias` the matching bias vector.  Flat's fan-in then comes out right at padded
borders automatically, because the connectivity matrix only holds the in-bounds taps.

:func:`batched` applies a single-vector rule to every sample of a batch.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

EPS = 1e-6  # the default stabiliser of every rule

__all__ = [
    "EPS", "stab", "sgn0", "pos", "neg",
    "zero", "epsilon", "zplus", "alphabeta", "gamma", "zbox", "wsquare", "flat",
    "RULES", "conv_matrix", "conv_bias", "conv_out_shape", "resolve_padding", "batched",
]


# ----------------------------------------------------------------------------------------------- basics
def _f64(a):
    return np.asarray(a, dtype=np.float64)


def sgn0(z):
    """Sign with sgn0(0) = +1."""
    return np.where(_f64(z) >= 0, 1.0, -1.0)


def stab(z, eps=EPS):
    """stab(z) = z + eps * sgn0(z)."""
    z = _f64(z)
    return z + eps * sgn0(z)


def pos(a):
    return np.maximum(_f64(a), 0.0)


def neg(a):
    return np.minimum(_f64(a), 0.0)


def _prep(W, b, x, R, zero_bias):
    W, x, R = _f64(W), _f64(x), _f64(R)
    assert W.ndim == 2 and x.shape == (W.shape[1],) and R.shape == (W.shape[0],), (W.shape, x.shape, R.shape)
    b = np.zeros(W.shape[0]) if (b is None or zero_bias) else np.broadcast_to(_f64(b), (W.shape[0],))
    return W, b, x, R


# ----------------------------------------------------------------------------------------------- rules
def epsilon(W, b, x, R, *, eps=EPS, zero_bias=False):
    """R_x = x * W^T (R / stab(z)),  z = W x + b."""
    W, b, x, R = _prep(W, b, x, R, zero_bias)
    z = W @ x + b
    return x * (W.T @ (R / stab(z, eps)))


def zero(W, b, x, R, *, zero_bias=False):
    """LRP-0: Epsilon with eps = 0 (divides by 0 where z == 0)."""
    return epsilon(W, b, x, R, eps=0.0, zero_bias=zero_bias)


def zplus(W, b, x, R, *, eps=EPS, zero_bias=False):
    """z+ = W+ x+ + W- x- + b+;  R_x = x+ * W+^T s + x- * W-^T s,  s = R / stab(z+)."""
    W, b, x, R = _prep(W, b, x, R, zero_bias)
    Wp, Wn, xp, xn = pos(W), neg(W), pos(x), neg(x)
    zp = Wp @ xp + Wn @ xn + pos(b)
    s = R / stab(zp, eps)
    return xp * (Wp.T @ s) + xn * (Wn.T @ s)


def alphabeta(W, b, x, R, *, alpha=2.0, beta=1.0, eps=EPS, zero_bias=False):
    """za = W+x+ + W-x- + b+,  zb = W-x+ + W+x- + b-;
    R_x = alpha [x+ W+^T(R/stab za) + x- W-^T(R/stab za)] - beta [x+ W-^T(R/stab zb) + x- W+^T(R/stab zb)]."""
    W, b, x, R = _prep(W, b, x, R, zero_bias)
    Wp, Wn, xp, xn = pos(W), neg(W), pos(x), neg(x)
    za = Wp @ xp + Wn @ xn + pos(b)
    zb = Wn @ xp + Wp @ xn + neg(b)
    sa = R / stab(za, eps)
    sb = R / stab(zb, eps)
    return alpha * (xp * (Wp.T @ sa) + xn * (Wn.T @ sa)) - beta * (xp * (Wn.T @ sb) + xn * (Wp.T @ sb))


def gamma(W, b, x, R, *, gamma=0.25, eps=EPS, zero_bias=False):
    """Generalised (sign-split) gamma.
    Wu = W + g W+, bu = b + g b+, Wd = W + g W-, bd = b + g b-;
    zu = Wu x+ + Wd x- + bu,  zd = Wd x+ + Wu x- + bd;
    su = [z > 0] R / stab(zu),  sd = [z < 0] R / stab(zd)  with the unmodified z = W x + b
    (bias zeroed too when zero_bias);
    R_x = x+ (Wu^T su + Wd^T sd) + x- (Wd^T su + Wu^T sd)."""
    W, b, x, R = _prep(W, b, x, R, zero_bias)
    g = gamma
    Wu, Wd = W + g * pos(W), W + g * neg(W)
    bu, bd = b + g * pos(b), b + g * neg(b)
    xp, xn = pos(x), neg(x)
    z = W @ x + b
    zu = Wu @ xp + Wd @ xn + bu
    zd = Wd @ xp + Wu @ xn + bd
    su = np.where(z > 0, R / stab(zu, eps), 0.0)
    sd = np.where(z < 0, R / stab(zd, eps), 0.0)
    return xp * (Wu.T @ su + Wd.T @ sd) + xn * (Wd.T @ su + Wu.T @ sd)


def zbox(W, b, x, R, *, low, high, eps=EPS, zero_bias=False):
    """s = R / stab(W x - W+ L - W- H) (the bias cancels);  R_x = x W^T s - L W+^T s - H W-^T s.
    ``low``/``high``: scalars or arrays broadcast to x.  ``b``/``zero_bias`` are accepted and have no effect."""
    W, _, x, R = _prep(W, b, x, R, zero_bias)
    L = np.broadcast_to(_f64(low), x.shape)
    H = np.broadcast_to(_f64(high), x.shape)
    Wp, Wn = pos(W), neg(W)
    s = R / stab(W @ x - Wp @ L - Wn @ H, eps)
    return x * (W.T @ s) - L * (Wp.T @ s) - H * (Wn.T @ s)


def wsquare(W, b, x, R, *, eps=EPS, zero_bias=False):
    """R_x = (W^2)^T (R / stab(W^2 1 + b^2)).  ``x`` only fixes the shape."""
    W, b, x, R = _prep(W, b, x, R, zero_bias)
    W2 = W * W
    return W2.T @ (R / stab(W2 @ np.ones(W.shape[1]) + b * b, eps))


def flat(W, b, x, R, *, eps=EPS, zero_bias=False):
    """All weights 1, bias 0, input 1:  R_x = M^T (R / stab(n)),  n = M 1 = fan-in of each output.

    ``W`` is the *connectivity*: every structurally present entry counts as 1 (for a dense layer pass any
    weight matrix or ``np.ones``; for a conv pass ``conv_matrix(np.ones_like(kernel), ...)``; a weight that happens
    to be exactly 0 in a real conv kernel would otherwise be lost, hence the ones kernel).  ``b``, ``x``,
    ``zero_bias`` are accepted for a uniform signature and have no effect."""
    W, _, x, R = _prep(W, b, x, R, zero_bias)
    M = (W != 0).astype(np.float64)
    n = M @ np.ones(W.shape[1])
    return M.T @ (R / stab(n, eps))


RULES = {
    "zero": zero, "epsilon": epsilon, "zplus": zplus, "alphabeta": alphabeta, "gamma": gamma,
    "zbox": zbox, "wsquare": wsquare, "flat": flat,
}


def batched(rule, W, b, X, R, **kw):
    """Apply ``rule`` per sample: X is (B, ...) (each sample flattened row-major to W's input), R is (B, ...)
    (flattened to W's output).  ``low``/``high`` (ZBox) may be arrays broadcastable to one sample X[i]; they are
    broadcast and flattened like it.  Returns the relevance shaped like X."""
    X = _f64(X)
    R = _f64(R)
    B = X.shape[0]
    kw = dict(kw)
    for key in ("low", "high"):
        if key in kw:
            kw[key] = np.broadcast_to(_f64(kw[key]), X.shape[1:]).reshape(-1)
    out = np.stack([rule(W, b, X[i].reshape(-1), R[i].reshape(-1), **kw) for i in range(B)])
    return out.reshape(X.shape)


# ----------------------------------------------------------------------------------------------- conv
def resolve_padding(padding, in_spatial, kernel_spatial, strides, dilation):
    """(lo, hi) per spatial dim for "VALID", "SAME" (XLA: out = ceil(in/stride), extra padding at the end)
    or explicit pairs."""
    nd = len(in_spatial)
    keff = [(k - 1) * d + 1 for k, d in zip(kernel_spatial, dilation)]
    if isinstance(padding, str):
        p = padding.upper()
        if p == "VALID":
            return [(0, 0)] * nd
        if p == "SAME":
            pads = []
            for n, k, s in zip(in_spatial, keff, strides):
                out = -(-n // s)
                total = max((out - 1) * s + k - n, 0)
                pads.append((total // 2, total - total // 2))
            return pads
        raise ValueError(f"unknown padding {padding!r}")
    pads = [tuple(int(v) for v in p) for p in padding]
    assert len(pads) == nd
    return pads


def conv_out_shape(in_spatial, kernel_spatial, strides, pads, dilation):
    keff = [(k - 1) * d + 1 for k, d in zip(kernel_spatial, dilation)]
    return tuple((n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in zip(in_spatial, keff, strides, pads))


def conv_matrix(kernel, in_spatial, *, strides=None, padding="VALID", dilation=None, feature_group_count=1):
    """Dense matrix of ``lax.conv_general_dilated`` for ONE sample, channels-last.

    kernel: (*k_spatial, C_in / groups, C_out) (HWIO / WIO ...).  in_spatial: spatial shape of the input.
    Rows index the output flattened as (*out_spatial, C_out), columns the input flattened as (*in_spatial, C_in)
    (row-major, i.e. ``y.reshape(-1) == M @ x.reshape(-1)`` for an NHWC sample).
    Built by direct construction: for every kernel tap, every output position reads input position
    ``out * stride - pad_lo + tap * dilation`` when it is in bounds (padding contributes nothing)."""
    K = _f64(kernel)
    nd = K.ndim - 2
    in_spatial = tuple(int(n) for n in in_spatial)
    assert len(in_spatial) == nd
    k_spatial = K.shape[:nd]
    cin_g, cout = K.shape[nd], K.shape[nd + 1]
    G = int(feature_group_count)
    assert cout % G == 0, "C_out must be divisible by feature_group_count"
    cin, cout_g = cin_g * G, cout // G
    strides = tuple(strides) if strides is not None else (1,) * nd
    dilation = tuple(dilation) if dilation is not None else (1,) * nd
    pads = resolve_padding(padding, in_spatial, k_spatial, strides, dilation)
    out_spatial = conv_out_shape(in_spatial, k_spatial, strides, pads, dilation)
    n_out, n_in = math.prod(out_spatial), math.prod(in_spatial)
    M = np.zeros((n_out * cout, n_in * cin))
    out_pos = np.indices(out_spatial).reshape(nd, -1).T  # (P_out, nd), row-major order
    out_lin = np.arange(n_out)
    lo = np.array([p[0] for p in pads])
    st, dl, hi_bound = np.array(strides), np.array(dilation), np.array(in_spatial)
    for tap in itertools.product(*[range(k) for k in k_spatial]):
        in_pos = out_pos * st - lo + np.array(tap) * dl
        valid = np.all((in_pos >= 0) & (in_pos < hi_bound), axis=1)
        if not valid.any():
            continue
        op = out_lin[valid]
        ip = np.ravel_multi_index(tuple(in_pos[valid].T), in_spatial)
        for g in range(G):
            oc = g * cout_g + np.arange(cout_g)
            ic = g * cin_g + np.arange(cin_g)
            rows = op[:, None, None] * cout + oc[None, None, :]
            cols = ip[:, None, None] * cin + ic[None, :, None]
            vals = K[tap][:, oc]  # (cin_g, cout_g)
            np.add.at(M, (np.broadcast_to(rows, (len(op), cin_g, cout_g)),
                          np.broadcast_to(cols, (len(op), cin_g, cout_g))),
                      np.broadcast_to(vals, (len(op), cin_g, cout_g)))
    return M


def conv_bias(b, out_spatial):
    """Per-channel bias (C_out,) repeated at every output position, flattened as (*out_spatial, C_out)."""
    b = _f64(b)
    return np.tile(b, math.prod(out_spatial))
