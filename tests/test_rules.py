"""Every rule against the independent NumPy matrix-form references (tests/reference.py, DESIGN.md section 2).

Each case builds a single layer (dense or conv, plain JAX or flax.linen) with mixed-sign inputs, weights and
biases, computes the jaxlrp relevance of the input as a VJP with a mixed-sign cotangent ``c`` (so the output
relevance is ``R = z * c``, API.md) and compares it with the float64 reference fed with the same ``R``:
``max|R_lib - R_ref| <= 1e-5 * max|R_ref|`` in float32.

Worst error ratios measured (max|R_lib - R_ref| / max|R_ref|, JAX 0.10.2 CPU float32) are printed at the end
of the module with ``pytest -s`` and recorded in the comment at the end of this file.
"""
from __future__ import annotations

import zlib
from collections import defaultdict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import AlphaBeta, Composite, Epsilon, First, Flat, Gamma, Last, WSquare, ZBox, Zero, ZPlus

try:
    from tests import reference as ref
except ImportError:  # tests/ itself on sys.path (pytest rootdir-relative import)
    import reference as ref

TOL = 1e-5
BATCH = 2
LOW, HIGH = -1.5, 2.0  # ZBox bounds; inputs are drawn from U(-1, 1) (mixed sign, inside the box)

_RATIOS: dict = defaultdict(float)


def _seed(*names) -> int:
    return zlib.crc32("/".join(map(str, names)).encode())


def _record(rule, layer, ratio):
    key = (rule, layer)
    _RATIOS[key] = max(_RATIOS[key], float(ratio))


@pytest.fixture(scope="module", autouse=True)
def _print_ratios():
    yield
    if not _RATIOS:
        return
    rules = sorted({r for r, _ in _RATIOS})
    print("\nworst error ratio max|R_lib - R_ref| / max|R_ref| per rule (over layer types):")
    for r in rules:
        items = {l: v for (rr, l), v in _RATIOS.items() if rr == r}
        worst = max(items, key=items.get)
        print(f"  {r:24s} {items[worst]:.2e}  (worst on {worst})")
    print("per rule x layer:")
    for (r, l), v in sorted(_RATIOS.items()):
        print(f"  {r:24s} {l:28s} {v:.2e}")


# ------------------------------------------------------------------------------------------------ layers
class Layer:
    """One layer: f(params, x), params, per-sample input shape, the reference matrix W (out x in),
    bias vector b (out,), and the connectivity matrix for Flat."""

    def __init__(self, name, f, params, x_shape, W, b, conn):
        self.name, self.f, self.params, self.x_shape = name, f, params, x_shape
        self.W, self.b, self.conn = W, b, conn


def _dense(name, n_in=12, n_out=7, linen=False):
    rng = np.random.default_rng(_seed("layer", name))
    w = (rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
    b = (0.5 * rng.normal(size=n_out)).astype(np.float32)
    if linen:
        mod = nn.Dense(n_out)
        params = {"params": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}
        f = lambda p, x: mod.apply(p, x)  # noqa: E731
    else:
        params = {"w": jnp.asarray(w), "b": jnp.asarray(b)}
        f = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
    return Layer(name, f, params, (n_in,), w.T.astype(np.float64), b.astype(np.float64), np.ones((n_out, n_in)))


def _conv(name, in_spatial, cin, k_spatial, cout, *, strides=None, padding="SAME", dilation=None, groups=1,
          linen=False):
    rng = np.random.default_rng(_seed("layer", name))
    nd = len(in_spatial)
    fan_in = int(np.prod(k_spatial)) * (cin // groups)
    K = (rng.normal(size=tuple(k_spatial) + (cin // groups, cout)) / np.sqrt(fan_in)).astype(np.float32)
    b = (0.5 * rng.normal(size=cout)).astype(np.float32)
    strides_t = tuple(strides) if strides is not None else (1,) * nd
    dil_t = tuple(dilation) if dilation is not None else (1,) * nd
    if linen:
        mod = nn.Conv(cout, tuple(k_spatial), strides=strides_t, padding=padding, kernel_dilation=dil_t,
                      feature_group_count=groups)
        params = {"params": {"kernel": jnp.asarray(K), "bias": jnp.asarray(b)}}
        f = lambda p, x: mod.apply(p, x)  # noqa: E731
    else:
        sp = "HWD"[:nd] if nd > 1 else "W"
        dn = ("N" + sp + "C", sp + "IO", "N" + sp + "C")

        def f(p, x):
            y = jax.lax.conv_general_dilated(x, p["w"], strides_t, padding, rhs_dilation=dil_t,
                                             dimension_numbers=dn, feature_group_count=groups)
            return y + p["b"]

        params = {"w": jnp.asarray(K), "b": jnp.asarray(b)}
    kw = dict(strides=strides_t, padding=padding, dilation=dil_t, feature_group_count=groups)
    W = ref.conv_matrix(K, in_spatial, **kw)
    pads = ref.resolve_padding(padding, in_spatial, k_spatial, strides_t, dil_t)
    out_spatial = ref.conv_out_shape(in_spatial, k_spatial, strides_t, pads, dil_t)
    conn = ref.conv_matrix(np.ones_like(K), in_spatial, **kw)
    return Layer(name, f, params, tuple(in_spatial) + (cin,), W, ref.conv_bias(b, out_spatial), conn)


def _padded_input_conv(name, mode):
    """A 3x3 convolution (6x6x3 -> 6x6x4) whose input the model pads itself: ``jnp.pad`` with zeros before a VALID
    convolution (as research code writes it), or Flax's ``padding="CIRCULAR"`` (wrap-around copies). The
    reference is the layer as a matrix of the *unpadded* input, ``W = W_valid P`` with ``P`` the 0/1 padding
    matrix: the model's pads are not inputs, and a wrapped copy adds its share to the pixel it copies."""
    rng = np.random.default_rng(_seed("layer", name))
    K = (rng.normal(size=(3, 3, 3, 4)) / np.sqrt(27)).astype(np.float32)
    b = (0.5 * rng.normal(size=4)).astype(np.float32)
    params = {"params": {"kernel": jnp.asarray(K), "bias": jnp.asarray(b)}}
    pads = ((1, 1), (1, 1), (0, 0))
    if mode == "zeros":
        mod = nn.Conv(4, (3, 3), padding="VALID")
        f = lambda p, x: mod.apply(p, jnp.pad(x, ((0, 0),) + pads))  # noqa: E731
    else:
        mod = nn.Conv(4, (3, 3), padding="CIRCULAR")
        f = lambda p, x: mod.apply(p, x)  # noqa: E731
    index = np.pad(np.arange(6 * 6 * 3).reshape(6, 6, 3) + 1, pads, mode="constant" if mode == "zeros" else "wrap")
    P = np.zeros((index.size, 6 * 6 * 3))
    rows = np.flatnonzero(index.reshape(-1))
    P[rows, index.reshape(-1)[rows] - 1] = 1.0
    W = ref.conv_matrix(K, (8, 8)) @ P
    conn = ref.conv_matrix(np.ones_like(K), (8, 8)) @ P
    return Layer(name, f, params, (6, 6, 3), W, ref.conv_bias(b, (6, 6)), conn)


LAYERS = {
    "dense": lambda: _dense("dense"),
    "dense_linen": lambda: _dense("dense_linen", 9, 5, linen=True),
    "conv3x3_pad1": lambda: _conv("conv3x3_pad1", (6, 6), 3, (3, 3), 4, padding=((1, 1), (1, 1))),
    "conv3x3_stride2_same": lambda: _conv("conv3x3_stride2_same", (8, 7), 3, (3, 3), 4, strides=(2, 2)),
    "conv3x3_dil2": lambda: _conv("conv3x3_dil2", (7, 7), 2, (3, 3), 3, dilation=(2, 2)),
    "conv_grouped": lambda: _conv("conv_grouped", (5, 5), 4, (3, 3), 6, groups=2),
    "conv_depthwise": lambda: _conv("conv_depthwise", (5, 5), 4, (3, 3), 8, groups=4),
    "conv1d": lambda: _conv("conv1d", (11,), 3, (4,), 5, strides=(2,), dilation=(2,)),
    "conv_linen_asym": lambda: _conv("conv_linen_asym", (6, 7), 3, (2, 3), 4, padding=((0, 2), (1, 0)),
                                     strides=(1, 2), linen=True),
    "conv_explicit_zero_pad": lambda: _padded_input_conv("conv_explicit_zero_pad", "zeros"),
    "conv_linen_circular": lambda: _padded_input_conv("conv_linen_circular", "circular"),
}
_LAYER_CACHE: dict = {}


def layer(name) -> Layer:
    if name not in _LAYER_CACHE:
        _LAYER_CACHE[name] = LAYERS[name]()
    return _LAYER_CACHE[name]


def _data(lay: Layer, tag):
    rng = np.random.default_rng(_seed("data", lay.name, tag))
    x = rng.uniform(-1, 1, size=(BATCH,) + lay.x_shape).astype(np.float32)
    y = np.asarray(lay.f(lay.params, jnp.asarray(x)))
    c = rng.normal(size=y.shape).astype(np.float32)
    return x, c


# ------------------------------------------------------------------------------------------------ rules
# name -> (jaxlrp rule factory (given the layer, for ZBox bounds), reference function, reference kwargs)
RULE_CASES = {
    "zero": (lambda lay: Zero(), ref.zero, {}),
    "epsilon": (lambda lay: Epsilon(), ref.epsilon, {}),
    "epsilon_0.25": (lambda lay: Epsilon(epsilon=0.25), ref.epsilon, dict(eps=0.25)),
    "zplus": (lambda lay: ZPlus(), ref.zplus, {}),
    "alpha2beta1": (lambda lay: AlphaBeta(), ref.alphabeta, {}),
    "alpha1beta0": (lambda lay: AlphaBeta(alpha=1.0, beta=0.0), ref.alphabeta, dict(alpha=1.0, beta=0.0)),
    "gamma": (lambda lay: Gamma(), ref.gamma, {}),
    "gamma_1.0_eps0.1": (lambda lay: Gamma(gamma=1.0, epsilon=0.1), ref.gamma, dict(gamma=1.0, eps=0.1)),
    "zbox": (lambda lay: ZBox(LOW, HIGH), ref.zbox, dict(low=LOW, high=HIGH)),
    "wsquare": (lambda lay: WSquare(), ref.wsquare, {}),
    "flat": (lambda lay: Flat(), ref.flat, {}),
    # zero_params=("bias",)
    # Epsilon with the bias zeroed divides R = (Wx + b) c by stab(Wx): where |Wx| << |b| that is ill-conditioned
    # by nature (float32 Wx carries ~1e-7 absolute error whichever way it is computed; measured 1.9e-3 on
    # conv3x3_pad1 with eps=1e-6, where one |Wx| = 2e-5 next to b = -1.19), so the stabiliser is made to matter.
    "epsilon_nobias": (lambda lay: Epsilon(epsilon=0.1, zero_params=("bias",)), ref.epsilon,
                       dict(eps=0.1, zero_bias=True)),
    "zplus_nobias": (lambda lay: ZPlus(zero_params=("bias",)), ref.zplus, dict(zero_bias=True)),
    "alpha2beta1_nobias": (lambda lay: AlphaBeta(zero_params=("bias",)), ref.alphabeta, dict(zero_bias=True)),
    "gamma_nobias": (lambda lay: Gamma(zero_params=("bias",)), ref.gamma, dict(zero_bias=True)),
    "wsquare_nobias": (lambda lay: WSquare(zero_params=("bias",)), ref.wsquare, dict(zero_bias=True)),
}
NOBIAS_LAYERS = ("dense", "conv3x3_pad1", "conv_grouped", "conv_linen_asym")


def lrp_vjp(f, composite, params, x, c):
    """(f(params, x) through jaxlrp, relevance of x) for cotangent c."""
    g = jaxlrp.lrp(f, composite, argnums=1)
    out, vjp = jax.vjp(g, params, jnp.asarray(x))
    _, rx = vjp(jnp.asarray(c))
    return out, rx


def _check(rule_name, layer_name, got, want, x):
    got = np.asarray(got)
    assert got.shape == x.shape and got.dtype == x.dtype, (got.shape, got.dtype)
    assert np.all(np.isfinite(got)), "non-finite relevance"
    scale = np.max(np.abs(want))
    assert scale > 0
    ratio = np.max(np.abs(got.astype(np.float64) - want)) / scale
    _record(rule_name, layer_name, ratio)
    assert ratio <= TOL, f"{rule_name} on {layer_name}: max error {ratio:.3e} x max|R_ref|"


def _single(rule_name, layer_name, composite_rule, ref_fn, ref_kw, *, tag="x"):
    lay = layer(layer_name)
    x, c = _data(lay, tag)
    out, rx = lrp_vjp(lay.f, Composite(("linear", composite_rule)), lay.params, x, c)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(lay.f(lay.params, jnp.asarray(x))))
    z = np.stack([lay.W @ xi.reshape(-1).astype(np.float64) + lay.b for xi in x]).reshape(c.shape)
    np.testing.assert_allclose(np.asarray(out), z, rtol=1e-4, atol=1e-5)  # the reference layer is the layer
    R = z * c.astype(np.float64)
    W = lay.conn if ref_fn is ref.flat else lay.W
    want = ref.batched(ref_fn, W, lay.b, x, R, **ref_kw)
    _check(rule_name, layer_name, rx, want, x)


_CASES = [(r, l) for r in RULE_CASES for l in LAYERS if not r.endswith("_nobias") or l in NOBIAS_LAYERS]


@pytest.mark.parametrize("rule_name,layer_name", _CASES)
def test_rule_on_layer(rule_name, layer_name):
    make, ref_fn, ref_kw = RULE_CASES[rule_name]
    _single(rule_name, layer_name, make(layer(layer_name)), ref_fn, ref_kw)


@pytest.mark.parametrize("layer_name", ["dense", "conv3x3_pad1", "conv3x3_stride2_same", "conv_depthwise",
                                        "conv1d"])
def test_zbox_array_bounds(layer_name):
    """Per-channel (and, for dense, per-feature) array bounds broadcast to the explained input."""
    lay = layer(layer_name)
    C = lay.x_shape[-1]
    rng = np.random.default_rng(_seed("bounds", layer_name))
    low = (-1.0 - rng.uniform(0, 1, size=C)).astype(np.float32)
    high = (1.0 + rng.uniform(0, 1, size=C)).astype(np.float32)
    _single("zbox_array", layer_name, ZBox(jnp.asarray(low), jnp.asarray(high)), ref.zbox,
            dict(low=low, high=high), tag="bounds")
    if len(lay.x_shape) > 1:  # bounds given with the full (broadcastable) rank of the batch
        shape = (1,) * len(lay.x_shape) + (C,)
        _single("zbox_array", layer_name, ZBox(jnp.asarray(low.reshape(shape)), jnp.asarray(high.reshape(shape))),
                ref.zbox, dict(low=low, high=high), tag="bounds")


# ------------------------------------------------------------------------------------------------ epilogues
EPILOGUE_RULES = {
    "epsilon": (Epsilon(), ref.epsilon, {}),
    "zplus": (ZPlus(), ref.zplus, {}),
    "alpha2beta1": (AlphaBeta(), ref.alphabeta, {}),
    "gamma": (Gamma(), ref.gamma, {}),
    "zbox": (ZBox(LOW, HIGH), ref.zbox, dict(low=LOW, high=HIGH)),
    "wsquare": (WSquare(), ref.wsquare, {}),
    "gamma_nobias": (Gamma(zero_params=("bias",)), ref.gamma, dict(zero_bias=True)),
}


@pytest.mark.parametrize("rule_name", sorted(EPILOGUE_RULES))
@pytest.mark.parametrize("base", ["dense", "conv3x3_pad1"])
def test_folded_batchnorm_epilogue(rule_name, base):
    """Layer followed by an inference BatchNorm with mixed-sign scale: the rule applies to the folded layer
    W' = W * s (per output), b' = (b - mean) * s + beta  (DESIGN.md: absorbed epilogue, Zennit's merged numbers)."""
    lay = layer(base)
    C = lay.params["b"].shape[0]
    rng = np.random.default_rng(_seed("bn", base))
    mean = rng.normal(size=C).astype(np.float32)
    var = rng.uniform(0.5, 2.0, size=C).astype(np.float32)
    gam = (rng.uniform(0.5, 1.5, size=C) * np.where(np.arange(C) % 2 == 0, 1, -1)).astype(np.float32)
    beta = rng.normal(size=C).astype(np.float32)
    bn_eps = 1e-5

    def f(p, x):
        y = lay.f(p["layer"], x)
        return (y - p["mean"]) * jax.lax.rsqrt(p["var"] + bn_eps) * p["gamma"] + p["beta"]

    params = {"layer": lay.params, "mean": jnp.asarray(mean), "var": jnp.asarray(var), "gamma": jnp.asarray(gam),
              "beta": jnp.asarray(beta)}
    s = (gam.astype(np.float64) / np.sqrt(var.astype(np.float64) + bn_eps))
    t = beta - mean * s
    reps = lay.W.shape[0] // C
    s_full, t_full = np.tile(s, reps), np.tile(t, reps)
    W = lay.W * s_full[:, None]
    b = lay.b * s_full + t_full
    x, c = _data(lay, "bn")
    rule, ref_fn, ref_kw = EPILOGUE_RULES[rule_name]
    out, rx = lrp_vjp(f, Composite(("linear", rule)), params, x, c)
    z = np.asarray(out).astype(np.float64)
    z_ref = np.stack([W @ xi.reshape(-1).astype(np.float64) + b for xi in x]).reshape(z.shape)
    np.testing.assert_allclose(z, z_ref, rtol=1e-4, atol=1e-5)
    want = ref.batched(ref_fn, W, b, x, z_ref * c.astype(np.float64), **ref_kw)
    _check(rule_name + "+bn", base, rx, want, x)


@pytest.mark.parametrize("relu_input", [False, True], ids=["mixed_input", "relu_input"])
@pytest.mark.parametrize("rule_name", sorted(EPILOGUE_RULES))
@pytest.mark.parametrize("base", ["dense", "conv3x3_pad1"])
def test_unfoldable_scale_epilogue(rule_name, base, relu_input):
    """A mixed-sign scale that varies per sample as well as per feature cannot go into the weight: the rule runs
    with it as a per-output scale, splitting (W s)+ = W+ s+ + W- s-. The reference is the per-sample folded layer
    W_i = W * s_i (per output), b_i = b * s_i + t. With a ReLU before the layer (a non-negative input: the rules'
    cheaper branches) the reference takes relu(x); the ReLU passes relevance unchanged."""
    if relu_input and rule_name in ("zbox", "wsquare"):
        pytest.skip("input-layer rules ignore the sign of the input")
    lay = layer(base)
    C = lay.params["b"].shape[0]
    rng = np.random.default_rng(_seed("scale", base))
    out_rank = 2 if base == "dense" else 4
    scale = (rng.uniform(0.5, 1.5, size=(BATCH, C)) * rng.choice([-1.0, 1.0], size=(BATCH, C))).astype(np.float32)
    shift = rng.normal(size=C).astype(np.float32)
    scale_b = scale.reshape((BATCH,) + (1,) * (out_rank - 2) + (C,))

    def f(p, x):
        x = jax.nn.relu(x) if relu_input else x
        return lay.f(p["layer"], x) * p["scale"] + p["shift"]

    params = {"layer": lay.params, "scale": jnp.asarray(scale_b), "shift": jnp.asarray(shift)}
    x, c = _data(lay, "scale")
    xin = np.maximum(x, 0) if relu_input else x
    reps = lay.W.shape[0] // C
    rule, ref_fn, ref_kw = EPILOGUE_RULES[rule_name]
    out, rx = lrp_vjp(f, Composite(("linear", rule)), params, x, c)
    want, z_ref = [], []
    for i in range(BATCH):
        s_full, t_full = np.tile(scale[i].astype(np.float64), reps), np.tile(shift.astype(np.float64), reps)
        W, b = lay.W * s_full[:, None], lay.b * s_full + t_full
        zi = W @ xin[i].reshape(-1).astype(np.float64) + b
        z_ref.append(zi.reshape(c.shape[1:]))
        want.append(ref.batched(ref_fn, W, b, xin[i:i + 1], (zi.reshape(c.shape[1:]) * c[i])[None], **ref_kw)[0])
    np.testing.assert_allclose(np.asarray(out), np.stack(z_ref), rtol=1e-4, atol=1e-5)
    _check(rule_name + "+scale" + ("+relu" if relu_input else ""), base, rx, np.stack(want), x)


@pytest.mark.parametrize("rule_name", [r for r in RULE_CASES if not r.endswith("_nobias")])
def test_rule_on_gathered_features_and_concatenated_constants(rule_name):
    """A dense layer on features the model gathers from the input (a permuted subset) and concatenates with
    constants: ``concat([x[:, idx], c]) @ w + b``. The rule sees the layer's whole input, constants included
    (ZPlus counts ``w+ c+``, as Zennit would on that tensor), and the relevance of the gathered copies goes back to
    the input features they copy; constants and features that are not gathered get none. Flat and WSquare count
    only the explained input's elements (the constants are neither inputs nor bias), as for the zeros a model pads
    an image with."""
    make, ref_fn, ref_kw = RULE_CASES[rule_name]
    rng = np.random.default_rng(_seed("layer", "gather_concat"))
    idx, const = np.array([4, 0, 7, 2, 5, 1]), np.array([0.5, -1.0], np.float32)
    w = (rng.normal(size=(8, 5)) / np.sqrt(8)).astype(np.float32)
    b = (0.5 * rng.normal(size=5)).astype(np.float32)

    def f(p, x):
        return jnp.concatenate([x[:, idx], jnp.broadcast_to(const, (x.shape[0], 2))], axis=1) @ p["w"] + p["b"]

    x = rng.uniform(-1, 1, size=(BATCH, 9)).astype(np.float32)
    c = rng.normal(size=(BATCH, 5)).astype(np.float32)
    out, rx = lrp_vjp(f, Composite(("linear", make(None))), {"w": jnp.asarray(w), "b": jnp.asarray(b)}, x, c)
    A = np.eye(9)[idx]  # gathered features = A x
    W, b64 = w.T.astype(np.float64), b.astype(np.float64)
    feats = np.concatenate([x.astype(np.float64) @ A.T, np.broadcast_to(const, (BATCH, 2))], axis=1)
    R = (feats @ W.T + b64) * c
    if ref_fn in (ref.flat, ref.wsquare):
        want = ref.batched(ref_fn, W[:, :6] @ A, b64, x, R, **ref_kw)
    elif ref_fn is ref.zbox:  # the bounds map through the concatenation: a constant is its own bound
        bound = lambda v: np.concatenate([np.full(6, v), const])  # noqa: E731
        want = ref.batched(ref_fn, W, b64, feats, R, low=bound(LOW), high=bound(HIGH))[:, :6] @ A
    else:
        want = ref.batched(ref_fn, W, b64, feats, R, **ref_kw)[:, :6] @ A
    np.testing.assert_allclose(np.asarray(out), feats @ W.T + b64, rtol=1e-4, atol=1e-5)
    _check(rule_name, "dense_gather_concat", rx, want, x)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_zbox_through_preprocessing(sign):
    """ZBox bounds are in the units of the explained input and map through elementwise affine preprocessing.
    In raw units the layer is W' = W / sd (per input column), b' = b - W (m / sd); ZBox on (W', b') with the raw
    bounds is the same as ZBox on (W, b) with the mapped bounds (for sd < 0 the mapped bounds swap)."""
    lay = layer("conv3x3_pad1")
    C = lay.x_shape[-1]
    rng = np.random.default_rng(_seed("pre", sign))
    m = rng.normal(size=C).astype(np.float32) * 0.3
    sd = (sign * rng.uniform(0.5, 2.0, size=C)).astype(np.float32)

    def f(p, x):
        return lay.f(p, (x - m) / sd)

    x, c = _data(lay, "pre")
    low, high = -1.0, 1.0  # raw units; x ~ U(-1, 1)
    out, rx = lrp_vjp(f, Composite(("linear", ZBox(low, high))), lay.params, x, c)
    n_pos = int(np.prod(lay.x_shape[:-1]))
    m_full = np.tile(m.astype(np.float64), n_pos)
    sd_full = np.tile(sd.astype(np.float64), n_pos)
    W = lay.W / sd_full[None, :]
    b = lay.b - lay.W @ (m_full / sd_full)
    z_ref = np.stack([W @ xi.reshape(-1).astype(np.float64) + b for xi in x]).reshape(c.shape)
    np.testing.assert_allclose(np.asarray(out), z_ref, rtol=1e-4, atol=1e-4)
    want = ref.batched(ref.zbox, W, b, x, z_ref * c.astype(np.float64), low=low, high=high)
    _check("zbox+preproc" + ("" if sign > 0 else "_negscale"), "conv3x3_pad1", rx, want, x)


# ------------------------------------------------------------------------------------------------ two layers
TWO_LAYER = {
    # name: (first rule, last rule, reference (fn, kw) for first, for last)
    "gamma|epsilon": (Gamma(), Epsilon(), (ref.gamma, {}), (ref.epsilon, {})),
    "zplus|alpha2beta1": (ZPlus(), AlphaBeta(), (ref.zplus, {}), (ref.alphabeta, {})),
    "zbox|gamma": (ZBox(-1.0, 1.0), Gamma(), (ref.zbox, dict(low=-1.0, high=1.0)), (ref.gamma, {})),
    "flat|zplus": (Flat(), ZPlus(), (ref.flat, {}), (ref.zplus, {})),
    "wsquare|gamma_nobias": (WSquare(), Gamma(zero_params=("bias",)), (ref.wsquare, {}),
                             (ref.gamma, dict(zero_bias=True))),
    "gamma_nobias|epsilon": (Gamma(zero_params=("bias",)), Epsilon(), (ref.gamma, dict(zero_bias=True)),
                             (ref.epsilon, {})),
    "gamma_1.0|alpha1beta0": (Gamma(gamma=1.0), AlphaBeta(1.0, 0.0), (ref.gamma, dict(gamma=1.0)),
                              (ref.alphabeta, dict(alpha=1.0, beta=0.0))),
    "alpha2beta1|zero": (AlphaBeta(), Zero(), (ref.alphabeta, {}), (ref.zero, {})),
}


def _two_layer_dense():
    l1, l2 = _dense("two_1", 10, 16), _dense("two_2", 16, 5)
    f = lambda p, x: l2.f(p["l2"], jax.nn.relu(l1.f(p["l1"], x)))  # noqa: E731
    return f, {"l1": l1.params, "l2": l2.params}, l1, l2


def _two_layer_conv():
    l1 = _conv("twoc_1", (6, 6), 3, (3, 3), 5)
    l2 = _conv("twoc_2", (6, 6), 5, (3, 3), 4, strides=(2, 2))
    f = lambda p, x: l2.f(p["l2"], jax.nn.relu(l1.f(p["l1"], x)))  # noqa: E731
    return f, {"l1": l1.params, "l2": l2.params}, l1, l2


def _chain_reference(l1, l2, x, c, ref1, ref2):
    """Reference for  x -> layer 1 (ref1) -> relu (Pass) -> layer 2 (ref2), output relevance z2 * c."""
    (f1, kw1), (f2, kw2) = ref1, ref2
    out = []
    for xi, ci in zip(x, c):
        xi = xi.reshape(-1).astype(np.float64)
        z1 = l1.W @ xi + l1.b
        a1 = np.maximum(z1, 0.0)
        z2 = l2.W @ a1 + l2.b
        R2 = z2 * ci.reshape(-1).astype(np.float64)
        Ra1 = f2(l2.W, l2.b, a1, R2, **kw2)
        Rz1 = Ra1  # Pass through the relu
        W1 = l1.conn if f1 is ref.flat else l1.W
        out.append(f1(W1, l1.b, xi, Rz1, **kw1))
    return np.stack(out).reshape(x.shape)


@pytest.mark.parametrize("net", ["dense", "conv"])
@pytest.mark.parametrize("case", sorted(TWO_LAYER))
def test_two_layers_first_last(case, net):
    r1, r2, ref1, ref2 = TWO_LAYER[case]
    f, params, l1, l2 = _two_layer_dense() if net == "dense" else _two_layer_conv()
    rng = np.random.default_rng(_seed("two", case, net))
    x = rng.uniform(-1, 1, size=(BATCH,) + l1.x_shape).astype(np.float32)
    y = f(params, jnp.asarray(x))
    c = rng.normal(size=y.shape).astype(np.float32)
    comp = Composite(("linear", Epsilon(0.5)), (First(), r1), (Last(), r2))
    out, rx = lrp_vjp(f, comp, params, x, c)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(y))
    want = _chain_reference(l1, l2, x, c, ref1, ref2)
    _check("2layer:" + case, net, rx, want, x)


# Three layers: the middle one has a non-negative input (after a ReLU) AND feeds a ReLU, which is where the
# sign-fact fast paths apply (ZPlus / AlphaBeta / Gamma with x- = 0; Gamma with R = 0 where z <= 0).
THREE_LAYER = {
    # name: (first, middle, last rules; reference (fn, kw) for each)
    "zbox|gamma|epsilon": ((ZBox(-1.0, 1.0), Gamma(), Epsilon()),
                           ((ref.zbox, dict(low=-1.0, high=1.0)), (ref.gamma, {}), (ref.epsilon, {}))),
    "flat|gamma_nobias|zplus": ((Flat(), Gamma(zero_params=("bias",)), ZPlus()),
                                ((ref.flat, {}), (ref.gamma, dict(zero_bias=True)), (ref.zplus, {}))),
    "wsquare|gamma_1.0_eps0.1|zero": ((WSquare(), Gamma(gamma=1.0, epsilon=0.1), Zero()),
                                      ((ref.wsquare, {}), (ref.gamma, dict(gamma=1.0, eps=0.1)), (ref.zero, {}))),
    "epsilon|zplus|alpha1beta0": ((Epsilon(), ZPlus(), AlphaBeta(1.0, 0.0)),
                                  ((ref.epsilon, {}), (ref.zplus, {}), (ref.alphabeta, dict(alpha=1.0, beta=0.0)))),
    "zplus_nobias|zplus_nobias|gamma": ((ZPlus(zero_params=("bias",)),) * 2 + (Gamma(),),
                                        ((ref.zplus, dict(zero_bias=True)),) * 2 + ((ref.gamma, {}),)),
    "epsilon|alpha2beta1|gamma": ((Epsilon(), AlphaBeta(), Gamma()),
                                  ((ref.epsilon, {}), (ref.alphabeta, {}), (ref.gamma, {}))),
}


def _chain(layers):
    def f(p, x):
        for i, lay in enumerate(layers):
            x = lay.f(p[i], x)
            if i < len(layers) - 1:
                x = jax.nn.relu(x)
        return x

    return f, [lay.params for lay in layers]


def _chain_reference_n(layers, x, c, refs):
    """x -> layer_0 -> relu (Pass) -> ... -> layer_{n-1}, output relevance z_{n-1} * c, rule refs[i] on layer i."""
    out = []
    for xi, ci in zip(x, c):
        acts = [xi.reshape(-1).astype(np.float64)]
        for i, lay in enumerate(layers):
            zi = lay.W @ acts[-1] + lay.b
            acts.append(np.maximum(zi, 0.0) if i < len(layers) - 1 else zi)
        R = acts[-1] * ci.reshape(-1).astype(np.float64)
        for i in reversed(range(len(layers))):
            fn, kw = refs[i]
            W = layers[i].conn if fn is ref.flat else layers[i].W
            R = fn(W, layers[i].b, acts[i], R, **kw)  # a relu passes relevance unchanged
        out.append(R)
    return np.stack(out).reshape(x.shape)


@pytest.mark.parametrize("net", ["dense", "conv"])
@pytest.mark.parametrize("case", sorted(THREE_LAYER))
def test_three_layers_middle_after_and_before_relu(case, net):
    rules, refs = THREE_LAYER[case]
    if net == "dense":
        layers = [_dense("three_1", 10, 16), _dense("three_2", 16, 12), _dense("three_3", 12, 5)]
    else:
        layers = [_conv("threec_1", (6, 6), 3, (3, 3), 5), _conv("threec_2", (6, 6), 5, (3, 3), 6),
                  _conv("threec_3", (6, 6), 6, (3, 3), 4, strides=(2, 2))]
    f, params = _chain(layers)
    rng = np.random.default_rng(_seed("three", case, net))
    x = rng.uniform(-1, 1, size=(BATCH,) + layers[0].x_shape).astype(np.float32)
    y = f(params, jnp.asarray(x))
    c = rng.normal(size=y.shape).astype(np.float32)
    comp = Composite(("linear", rules[1]), (First(), rules[0]), (Last(), rules[2]))
    out, rx = lrp_vjp(f, comp, params, x, c)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(y))
    _check("3layer:" + case, net, rx, _chain_reference_n(layers, x, c, refs), x)

# ------------------------------------------------------------------------------------------------ degenerate
@pytest.mark.parametrize("after_relu", [False, True])
@pytest.mark.parametrize("alpha,beta", [(2.0, 1.0), (1.0, 0.0)])
def test_alphabeta_output_with_empty_part(alpha, beta, after_relu):
    """An output with no negative (or no positive) contributions w_ji x_i has zb = 0 (za = 0): stab makes the
    quotient R / 1e-6 huge, but every term it multiplies is exactly 0, so the output sends nothing through that
    part.  Here (no bias) output 0 has only positive contributions (zb_0 = 0) and, in the signed case, output 2
    only negative ones (za_2 = 0).  Every input column also holds weights of both signs, so W-^T c computed as
    W^T c - W+^T c would cancel the huge quotient against itself."""
    W = np.array([[0.7, 0.3, -0.3], [-0.4, 0.9, 0.6], [-0.2, -0.5, 0.8]], np.float32)  # (out, in)
    x = np.array([0.83, 0.57, -0.61 if not after_relu else 0.0], np.float32)
    c = np.array([1.0, -0.7, 1.3], np.float32)
    if after_relu:  # identity layer -> relu -> W: the W layer's input carries the relu's sign fact
        f = lambda p, x: jax.nn.relu(x @ p["i"]) @ p["w"].T  # noqa: E731
        params = {"i": jnp.eye(3, dtype=jnp.float32), "w": jnp.asarray(W)}
        comp = Composite(("dense", Zero()), (Last(), AlphaBeta(alpha, beta)))
    else:
        f = lambda p, x: x @ p["w"].T  # noqa: E731
        params = {"w": jnp.asarray(W)}
        comp = Composite(("dense", AlphaBeta(alpha, beta)))
    out, rx = lrp_vjp(f, comp, params, x, c)
    R = (W.astype(np.float64) @ x) * c
    want = ref.alphabeta(W, None, x, R, alpha=alpha, beta=beta)
    if after_relu:  # the identity layer under LRP-0 passes relevance through where x > 0 (and 0 where x = 0)
        want = np.where(x > 0, want, 0.0)
    _check(f"alphabeta({alpha:g},{beta:g})_degenerate", "dense_after_relu" if after_relu else "dense", rx, want, x)


# Worst error ratios measured (max|R_lib - R_ref| / max|R_ref|, float32, JAX 0.10.2 CPU; core at commit 69dc092):
#   single layers -- dense, linen Dense, conv 3x3 pad 1, 3x3 stride 2 SAME, dilation 2, grouped, depthwise, 1D,
#   linen Conv with asymmetric padding:
#     zero 1.7e-7, epsilon 2.4e-7, epsilon(0.25) 2.8e-7, zplus 1.6e-7, alpha2beta1 2.3e-7, alpha1beta0 1.6e-7,
#     gamma 2.5e-7, gamma(1, eps 0.1) 2.0e-7, zbox 1.6e-7, zbox with array bounds 2.3e-7, zbox through
#     (x - m) / sd 3.1e-7 (1.4e-7 with sd < 0), wsquare 2.0e-7, flat 2.0e-6 on linen Dense (|R_x| = |sum_j R_j| / n
#     is small next to sum_j |R_j|: inherent cancellation; <= 2.3e-7 elsewhere), *_nobias <= 2.9e-7,
#     folded BatchNorm epilogue (all rules) <= 2.5e-7, AlphaBeta with za or zb = 0 <= 7.9e-8;
#   two layers (First / Last): <= 4.6e-7; three layers (sign-fact fast paths in the middle layer): <= 3.3e-7.
# Before commit 6da0db3 AlphaBeta formed W-^T c as W^T c - W+^T c: 9.4e-3 on conv_depthwise, 2.8e-2 on the
# alpha2beta1|zero two-layer net, 3.5e-2 in test_alphabeta_output_with_empty_part.


@pytest.mark.parametrize("scale", [False, True], ids=["no_scale", "scale"])
def test_weight_stacked_ops_equal_separate_ops(scale):
  """LayerMath's weight-stacked convolutions (one vmapped op over [W+, W-]) give the separate ops' values."""
  from jaxlrp._rules import LayerMath
  rng = np.random.default_rng(_seed("stacked", scale))
  x = jnp.asarray(rng.uniform(-1, 1, (2, 6, 6, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 5)), jnp.float32)
  s = jnp.asarray(rng.uniform(-1, 1, (2, 6, 6, 5)), jnp.float32) if scale else None
  lin = lambda v, V: jax.lax.conv_general_dilated(v, V, (1, 1), "SAME",  # noqa: E731
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  z = lin(x, w)
  c1, c2 = (jnp.asarray(rng.normal(size=z.shape), jnp.float32) for _ in range(2))
  ops = {"F_many": lambda m: m.F_many(("P", "N", "W"), m.x),
         "T_sum": lambda m: (m.T_sum([("P", c1), ("N", c2), ("W", c1)]),),
         "T_many": lambda m: m.T_many(("P", "N"), c1)}
  for name, op in ops.items():
    got, want = (op(LayerMath(lin, x, w, z, s, jnp.zeros(()), False, stack_forward=flag, stack_transpose=flag))
                 for flag in (True, False))
    for g, r in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5 * float(jnp.abs(r).max()),
                                 err_msg=name)


def test_conv_stacking_reads_channels_from_the_kernel_layout():
  """The stacking choice reads input and output channels through the convolution's dimension numbers."""
  import types

  from jaxlrp._core import _conv_stacking

  def unit(kernel_layout, shape):
    dn = jax.lax.conv_dimension_numbers((1, 8, 8, 1), shape, ("NHWC", kernel_layout, "NHWC"))
    main = types.SimpleNamespace(prim_name="conv_general_dilated", params={"dimension_numbers": dn})
    return types.SimpleNamespace(kind="conv", main=main, data_pos=(0,)), shape

  # (in, out) = (3, 64): an image's first layer; (64, 64): narrow; (64, 256): wide outputs
  assert _conv_stacking(*unit("HWIO", (7, 7, 3, 64))) == (False, True)
  assert _conv_stacking(*unit("OIHW", (64, 3, 7, 7))) == (False, True)
  assert _conv_stacking(*unit("HWIO", (3, 3, 64, 64))) == (True, False)
  assert _conv_stacking(*unit("OIHW", (256, 64, 1, 1))) == (False, False)
