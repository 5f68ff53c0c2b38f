"""One CNN and one MLP written four ways (Flax linen, Flax nnx, Equinox, plain jax.numpy) with the same weights.

jaxlrp works on the traced program, so the framework a model is written in must not change its explanation:
for every preset the relevance agrees across the four (after the NCHW -> NHWC transposition for Equinox),
with no change to the model code. Parameter-path selectors are checked in each framework's own spelling.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import jaxlrp

N_CLASSES = 5
BATCH = 3
IMG = (8, 8, 3)  # H, W, C (NHWC for linen / nnx / jnp; Equinox gets NCHW)
MLP_IN = 10
MLP_WIDTH = 16

# Relative tolerance of the cross-framework comparison: max |R_a - R_b| <= RTOL * max |R_ref|.
RTOL = 1e-6


# --------------------------------------------------------------------------------------------------------------
# Reference weights (linen layouts: conv HWIO, dense (in, out)).
# --------------------------------------------------------------------------------------------------------------


def _cnn_weights(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)

    def conv(k, cin, cout):
        w = rng.normal(0.0, np.sqrt(2.0 / (k * k * cin)), (k, k, cin, cout))
        return {"kernel": w.astype(np.float32), "bias": rng.normal(0.0, 0.1, (cout,)).astype(np.float32)}

    def dense(cin, cout):
        w = rng.normal(0.0, np.sqrt(2.0 / cin), (cin, cout))
        return {"kernel": w.astype(np.float32), "bias": rng.normal(0.0, 0.1, (cout,)).astype(np.float32)}

    return {"conv1": conv(3, IMG[2], 4), "conv2": conv(3, 4, 6), "fc1": dense(6, 8), "fc2": dense(8, N_CLASSES)}


def _mlp_weights(seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    sizes = [MLP_IN, MLP_WIDTH, MLP_WIDTH, N_CLASSES]
    return [
        {
            "kernel": rng.normal(0.0, np.sqrt(2.0 / a), (a, b)).astype(np.float32),
            "bias": rng.normal(0.0, 0.1, (b,)).astype(np.float32),
        }
        for a, b in zip(sizes[:-1], sizes[1:])
    ]


# --------------------------------------------------------------------------------------------------------------
# Flax linen
# --------------------------------------------------------------------------------------------------------------


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), padding="SAME")(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.Conv(6, (3, 3), padding="SAME")(x)
        x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(8)(x)
        x = nn.relu(x)
        return nn.Dense(N_CLASSES)(x)


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(MLP_WIDTH)(x))
        x = nn.relu(nn.Dense(MLP_WIDTH)(x))
        return nn.Dense(N_CLASSES)(x)


def _linen_cnn():
    w = _cnn_weights()
    params = {
        "params": {
            "Conv_0": w["conv1"],
            "Conv_1": w["conv2"],
            "Dense_0": w["fc1"],
            "Dense_1": w["fc2"],
        }
    }
    params = jax.tree.map(jnp.asarray, params)
    # The layout must be what linen itself would create.
    ref = jax.eval_shape(LinenCNN().init, jax.random.key(0), jnp.zeros((1, *IMG)))
    assert jax.tree.map(jnp.shape, ref) == jax.tree.map(jnp.shape, params)
    model = LinenCNN()
    return (lambda p, x: model.apply(p, x)), params


def _linen_mlp():
    ws = _mlp_weights()
    params = jax.tree.map(jnp.asarray, {"params": {f"Dense_{i}": w for i, w in enumerate(ws)}})
    ref = jax.eval_shape(LinenMLP().init, jax.random.key(0), jnp.zeros((1, MLP_IN)))
    assert jax.tree.map(jnp.shape, ref) == jax.tree.map(jnp.shape, params)
    model = LinenMLP()
    return (lambda p, x: model.apply(p, x)), params


# --------------------------------------------------------------------------------------------------------------
# Flax nnx (state passed as an argument: nnx.split / nnx.merge)
# --------------------------------------------------------------------------------------------------------------


class NnxCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(IMG[2], 4, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(4, 6, (3, 3), padding="SAME", rngs=rngs)
        self.fc1 = nnx.Linear(6, 8, rngs=rngs)
        self.fc2 = nnx.Linear(8, N_CLASSES, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        x = nnx.relu(self.conv2(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nnx.relu(self.fc1(x))
        return self.fc2(x)


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        sizes = [MLP_IN, MLP_WIDTH, MLP_WIDTH, N_CLASSES]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


def _set(param: nnx.Param, value: np.ndarray) -> None:
    assert param.get_value().shape == value.shape, (param.get_value().shape, value.shape)
    param.set_value(jnp.asarray(value))


def _nnx_cnn():
    w = _cnn_weights()
    model = nnx.eval_shape(lambda: NnxCNN(nnx.Rngs(0)))  # shapes only: every array is replaced below
    for name in ("conv1", "conv2", "fc1", "fc2"):
        layer = getattr(model, name)
        _set(layer.kernel, w[name]["kernel"])
        _set(layer.bias, w[name]["bias"])
    graphdef, state = nnx.split(model)
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(state))
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state


def _nnx_mlp():
    ws = _mlp_weights()
    model = nnx.eval_shape(lambda: NnxMLP(nnx.Rngs(0)))
    for layer, w in zip(model.layers, ws):
        _set(layer.kernel, w["kernel"])
        _set(layer.bias, w["bias"])
    graphdef, state = nnx.split(model)
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(state))
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state


# --------------------------------------------------------------------------------------------------------------
# Equinox (unbatched CHW modules; the model function vmaps over the batch). Linear puts the data on the rhs.
# --------------------------------------------------------------------------------------------------------------


class EqxCNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    pool: eqx.nn.AvgPool2d
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.conv1 = eqx.nn.Conv2d(IMG[2], 4, 3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(4, 6, 3, padding=1, key=k2)
        self.pool = eqx.nn.AvgPool2d(2, 2)
        self.fc1 = eqx.nn.Linear(6, 8, key=k3)
        self.fc2 = eqx.nn.Linear(8, N_CLASSES, key=k4)

    def __call__(self, x):  # x: (C, H, W)
        x = jax.nn.relu(self.conv1(x))
        x = self.pool(x)
        x = jax.nn.relu(self.conv2(x))
        x = jnp.mean(x, axis=(1, 2))
        x = jax.nn.relu(self.fc1(x))
        return self.fc2(x)


def _eqx_conv(conv: eqx.nn.Conv2d, w) -> eqx.nn.Conv2d:
    assert conv.weight.shape == w["kernel"].shape[::-1][:2] + w["kernel"].shape[:2]
    kernel = np.transpose(w["kernel"], (3, 2, 0, 1))  # HWIO -> OIHW
    bias = w["bias"].reshape(-1, 1, 1)
    conv = eqx.tree_at(lambda c: c.weight, conv, jnp.asarray(kernel))
    return eqx.tree_at(lambda c: c.bias, conv, jnp.asarray(bias))


def _eqx_linear(lin: eqx.nn.Linear, w) -> eqx.nn.Linear:
    assert lin.weight.shape == w["kernel"].shape[::-1]
    lin = eqx.tree_at(lambda l: l.weight, lin, jnp.asarray(w["kernel"].T))
    return eqx.tree_at(lambda l: l.bias, lin, jnp.asarray(w["bias"]))


def _eqx_cnn():
    w = _cnn_weights()
    model = eqx.filter_eval_shape(EqxCNN, jax.random.key(0))  # shapes only: every array is replaced below
    model = eqx.tree_at(lambda m: m.conv1, model, _eqx_conv(model.conv1, w["conv1"]))
    model = eqx.tree_at(lambda m: m.conv2, model, _eqx_conv(model.conv2, w["conv2"]))
    model = eqx.tree_at(lambda m: m.fc1, model, _eqx_linear(model.fc1, w["fc1"]))
    model = eqx.tree_at(lambda m: m.fc2, model, _eqx_linear(model.fc2, w["fc2"]))
    params, static = eqx.partition(model, eqx.is_array)
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(params))
    return (lambda p, x: jax.vmap(eqx.combine(p, static))(x)), params


def _eqx_mlp_module() -> eqx.nn.MLP:
    model = eqx.filter_eval_shape(eqx.nn.MLP, MLP_IN, N_CLASSES, MLP_WIDTH, 2, key=jax.random.key(0))
    for i, w in enumerate(_mlp_weights()):
        model = eqx.tree_at(lambda m, i=i: m.layers[i], model, _eqx_linear(model.layers[i], w))
    return model


def _eqx_mlp():
    params, static = eqx.partition(_eqx_mlp_module(), eqx.is_array)
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(params))
    return (lambda p, x: jax.vmap(eqx.combine(p, static))(x)), params


# --------------------------------------------------------------------------------------------------------------
# Plain jax.numpy with a params dict
# --------------------------------------------------------------------------------------------------------------


def jnp_cnn(params, x):
    def conv(p, x):
        y = lax.conv_general_dilated(
            x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + p["b"]

    x = jax.nn.relu(conv(params["conv1"], x))
    x = lax.reduce_window(x, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0
    x = jax.nn.relu(conv(params["conv2"], x))
    x = jnp.mean(x, axis=(1, 2))
    x = jax.nn.relu(x @ params["fc1"]["w"] + params["fc1"]["b"])
    return x @ params["fc2"]["w"] + params["fc2"]["b"]


def jnp_mlp(params, x):
    for p in params[:-1]:
        x = jax.nn.relu(jnp.dot(x, p["w"]) + p["b"])
    return jnp.dot(x, params[-1]["w"]) + params[-1]["b"]


def _jnp_cnn():
    w = _cnn_weights()
    params = {k: {"w": jnp.asarray(v["kernel"]), "b": jnp.asarray(v["bias"])} for k, v in w.items()}
    return jnp_cnn, params


def _jnp_mlp():
    params = [{"w": jnp.asarray(w["kernel"]), "b": jnp.asarray(w["bias"])} for w in _mlp_weights()]
    return jnp_mlp, params


# --------------------------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    f: Callable  # f(params, x)
    params: Any
    to_native: Callable  # reference-layout x -> the framework's x
    from_native: Callable  # the framework's relevance -> reference layout


_ident = lambda a: a  # noqa: E731
_nhwc_to_nchw = lambda a: jnp.transpose(a, (0, 3, 1, 2))  # noqa: E731
_nchw_to_nhwc = lambda a: jnp.transpose(a, (0, 2, 3, 1))  # noqa: E731


def cnn_impls() -> dict[str, Impl]:
    return {
        "linen": Impl("linen", *_linen_cnn(), _ident, _ident),
        "nnx": Impl("nnx", *_nnx_cnn(), _ident, _ident),
        "equinox": Impl("equinox", *_eqx_cnn(), _nhwc_to_nchw, _nchw_to_nhwc),
        "jnp": Impl("jnp", *_jnp_cnn(), _ident, _ident),
    }


def mlp_impls() -> dict[str, Impl]:
    return {
        "linen": Impl("linen", *_linen_mlp(), _ident, _ident),
        "nnx": Impl("nnx", *_nnx_mlp(), _ident, _ident),
        "equinox": Impl("equinox", *_eqx_mlp(), _ident, _ident),
        "jnp": Impl("jnp", *_jnp_mlp(), _ident, _ident),
    }


IMPLS = {"cnn": cnn_impls, "mlp": mlp_impls}
FRAMEWORKS = ("linen", "nnx", "equinox", "jnp")


def _inputs(arch: str) -> jax.Array:
    rng = np.random.default_rng(42)
    shape = (BATCH, *IMG) if arch == "cnn" else (BATCH, MLP_IN)
    # In [-1, 1]: inside EpsilonGammaBox(-1, 1)'s box.
    return jnp.asarray(rng.uniform(-1.0, 1.0, shape).astype(np.float32))


def _targets() -> jax.Array:
    return jnp.arange(BATCH) % N_CLASSES


def relevance(impl: Impl, composite, x_ref: jax.Array, targets: jax.Array) -> np.ndarray:
    """Relevance of x (reference layout) via jax.grad of the transformed function and a one-hot target."""
    g = jaxlrp.lrp(impl.f, composite, argnums=1)
    onehot = jax.nn.one_hot(targets, N_CLASSES, dtype=jnp.float32)
    r = jax.grad(lambda p, x: jnp.sum(g(p, x) * onehot), argnums=1)(impl.params, impl.to_native(x_ref))
    return np.asarray(impl.from_native(r))


def _err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


PRESETS = {
    "EpsilonPlus": lambda: jaxlrp.EpsilonPlus(),
    "EpsilonPlusFlat": lambda: jaxlrp.EpsilonPlusFlat(),
    "EpsilonGammaBox": lambda: jaxlrp.EpsilonGammaBox(-1.0, 1.0),
    "EpsilonAlpha2Beta1": lambda: jaxlrp.EpsilonAlpha2Beta1(),
    "EpsilonAlpha2Beta1Flat": lambda: jaxlrp.EpsilonAlpha2Beta1Flat(),
}


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def impls():
    return {arch: make() for arch, make in IMPLS.items()}


@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_same_forward(impls, arch):
    """Sanity check of the weight conversion: all four compute the same function."""
    x = _inputs(arch)
    outs = {name: np.asarray(impl.f(impl.params, impl.to_native(x))) for name, impl in impls[arch].items()}
    ref = outs["linen"]
    for name, out in outs.items():
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_presets_agree_across_frameworks(impls, arch, preset):
    x, t = _inputs(arch), _targets()
    rel = {name: relevance(impl, PRESETS[preset](), x, t) for name, impl in impls[arch].items()}
    ref = rel["linen"]
    assert ref.shape == x.shape
    assert np.all(np.isfinite(ref)) and np.max(np.abs(ref)) > 0
    errs = {name: _err(r, ref) for name, r in rel.items()}
    assert max(errs.values()) <= RTOL, errs


def test_presets_differ_on_cnn(impls):
    """Guard against a vacuous agreement: the conv rules of the presets do make a difference on the CNN."""
    x, t = _inputs("cnn"), _targets()
    impl = impls["cnn"]["jnp"]
    rel = {name: relevance(impl, make(), x, t) for name, make in PRESETS.items()}
    names = list(rel)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert _err(rel[a], rel[b]) > 1e-3, (a, b)


@pytest.mark.parametrize("name", FRAMEWORKS)
def test_relevance_shape_dtype(impls, name):
    impl = impls["cnn"][name]
    x = impl.to_native(_inputs("cnn"))
    g = jaxlrp.lrp(impl.f, jaxlrp.EpsilonPlus(), argnums=1)
    r = jax.grad(lambda x: g(impl.params, x)[0, 1])(x)
    assert r.shape == x.shape and r.dtype == x.dtype


# ---- parameter-path selection --------------------------------------------------------------------------------

# Parameter paths as jaxlrp reports them (show_rules), the weight operand's key path joined with "/":
#   linen   params/Conv_0/kernel        (the variables dict)
#   nnx     conv1/kernel/value          (the nnx.State from nnx.split; note the trailing /value)
#   equinox conv1/weight, layers/0/weight  (field paths of the eqx.partition-ed params)
#   jnp     conv1/w, 0/w                (the params dict / list)
# The first dense layer of the MLP, in each framework's own parameter-path spelling.
MLP_FIRST_LAYER = {
    "linen": "params/Dense_0*",
    "nnx": "layers/0/*",
    "equinox": "layers/0/*",
    "jnp": "0/*",
}

# The second convolution of the CNN.
CNN_SECOND_CONV = {
    "linen": "params/Conv_1*",
    "nnx": "conv2*",
    "equinox": "conv2*",
    "jnp": "conv2*",
}

# The first dense layer of the CNN.
CNN_FIRST_DENSE = {
    "linen": "params/Dense_0/kernel",
    "nnx": "fc1/kernel*",
    "equinox": "fc1/weight",
    "jnp": "fc1/w",
}


def _rows_by_rule(impl: Impl, composite, x_ref):
    rows = jaxlrp.show_rules(impl.f, composite, impl.params, impl.to_native(x_ref), argnums=1)
    return rows


@pytest.mark.parametrize("name", FRAMEWORKS)
def test_path_selects_first_mlp_layer(impls, name, capsys):
    """Path("<first layer>") with Flat == EpsilonPlusFlat on an MLP (Flat on the first layer, Epsilon elsewhere)."""
    impl = impls["mlp"][name]
    x, t = _inputs("mlp"), _targets()
    by_path = jaxlrp.Composite(("dense", jaxlrp.Epsilon()), (jaxlrp.Path(MLP_FIRST_LAYER[name]), jaxlrp.Flat()))
    rows = _rows_by_rule(impl, by_path, x)
    flat = [r for r in rows if isinstance(r.rule, jaxlrp.Flat)]
    assert len(flat) == 1, capsys.readouterr().out
    dense_rows = [r for r in rows if r.kind == "dense"]
    assert len(dense_rows) == 3, capsys.readouterr().out
    assert dense_rows[0] is flat[0] or dense_rows[0] == flat[0]

    r_path = relevance(impl, by_path, x, t)
    r_preset = relevance(impl, jaxlrp.EpsilonPlusFlat(), x, t)
    assert _err(r_path, r_preset) <= 1e-6
    # Flat on the first layer really differs from Epsilon on it.
    r_eps = relevance(impl, jaxlrp.Composite(("dense", jaxlrp.Epsilon())), x, t)
    assert _err(r_eps, r_preset) > 1e-3


@pytest.mark.parametrize("name", FRAMEWORKS)
def test_path_selects_cnn_layers(impls, name, capsys):
    """Path selectors on the CNN: Gamma on the second conv, ZPlus on the first dense; all frameworks agree."""
    x, t = _inputs("cnn"), _targets()
    impl = impls["cnn"][name]
    comp = jaxlrp.EpsilonPlus() + jaxlrp.Composite(
        (jaxlrp.Path(CNN_SECOND_CONV[name]), jaxlrp.Gamma(0.5)),
        (jaxlrp.Path(CNN_FIRST_DENSE[name]), jaxlrp.ZPlus()),
    )
    rows = _rows_by_rule(impl, comp, x)
    out = capsys.readouterr().out
    kinds = [r.kind for r in rows if r.kind in ("conv", "dense")]
    rules = [type(r.rule).__name__ for r in rows if r.kind in ("conv", "dense")]
    assert kinds == ["conv", "conv", "dense", "dense"], out
    assert rules == ["ZPlus", "Gamma", "ZPlus", "Epsilon"], out

    r = relevance(impl, comp, x, t)
    ref_impl = impls["cnn"]["linen"]
    ref_comp = jaxlrp.EpsilonPlus() + jaxlrp.Composite(
        (jaxlrp.Path(CNN_SECOND_CONV["linen"]), jaxlrp.Gamma(0.5)),
        (jaxlrp.Path(CNN_FIRST_DENSE["linen"]), jaxlrp.ZPlus()),
    )
    r_ref = relevance(ref_impl, ref_comp, x, t)
    assert _err(r, r_ref) <= RTOL
    assert _err(relevance(impl, jaxlrp.EpsilonPlus(), x, t), r_ref) > 1e-4


@pytest.mark.parametrize("name", FRAMEWORKS)
def test_path_matching_nothing_raises(impls, name):
    impl = impls["mlp"][name]
    comp = jaxlrp.Composite(("dense", jaxlrp.Epsilon()), (jaxlrp.Path("no/such/layer*"), jaxlrp.ZPlus()))
    g = jaxlrp.lrp(impl.f, comp, argnums=1)
    x = _inputs("mlp")
    with pytest.raises(Exception, match="(?i)match"):
        jax.grad(lambda x: g(impl.params, x)[0, 0])(x)
    # ... unless allowed.
    comp = jaxlrp.Composite(
        ("dense", jaxlrp.Epsilon()), (jaxlrp.Path("no/such/layer*", allow_empty=True), jaxlrp.ZPlus())
    )
    r = jax.grad(lambda x: jaxlrp.lrp(impl.f, comp, argnums=1)(impl.params, x)[0, 0])(x)
    assert np.all(np.isfinite(np.asarray(r)))


def test_linen_name_selector_equals_path_selector(impls):
    """Name("LinenCNN/Conv_1") (the linen name stack) selects what Path("params/Conv_1*") selects."""
    x, t = _inputs("cnn"), _targets()
    impl = impls["cnn"]["linen"]
    by_name = jaxlrp.EpsilonPlus() + jaxlrp.Composite((jaxlrp.Name("LinenCNN/Conv_1"), jaxlrp.Gamma(0.5)))
    by_path = jaxlrp.EpsilonPlus() + jaxlrp.Composite((jaxlrp.Path("params/Conv_1*"), jaxlrp.Gamma(0.5)))
    r_name, r_path = relevance(impl, by_name, x, t), relevance(impl, by_path, x, t)
    np.testing.assert_array_equal(r_name, r_path)
    assert _err(relevance(impl, jaxlrp.EpsilonPlus(), x, t), r_path) > 1e-4


def test_show_rules_paths(impls, capsys):
    """The parameter paths jaxlrp reports, one framework each (documents the spellings used above)."""
    x = _inputs("cnn")
    expected_first_conv = {
        "linen": "params/Conv_0",
        "nnx": "conv1",
        "equinox": "conv1",
        "jnp": "conv1",
    }
    for name, impl in impls["cnn"].items():
        rows = jaxlrp.show_rules(impl.f, jaxlrp.EpsilonPlus(), impl.params, impl.to_native(x), argnums=1)
        convs = [r for r in rows if r.kind == "conv"]
        assert len(convs) == 2, name
        assert expected_first_conv[name] in str(convs[0].path), (name, convs[0].path)
    capsys.readouterr()


def test_whole_equinox_module_and_keyword_arguments(impls):
    """The Equinox idiom: the module itself as the parameters, unpartitioned (its activation functions and Python
    numbers are closed over, as `eqx.filter_jit` treats them), and keyword arguments of f (closed over too): the
    same relevance as the partitioned module, from lrp, attribute and show_rules."""
    x, t = _inputs("mlp"), _targets()
    impl, model = impls["mlp"]["equinox"], _eqx_mlp_module()
    assert not all(eqx.is_array(leaf) for leaf in jax.tree.leaves(model))
    composite = jaxlrp.EpsilonPlus()
    want = relevance(impl, composite, x, t)

    def f(m, x, *, scale):
        return jax.vmap(m)(x) * scale

    g = jaxlrp.lrp(f, composite, argnums=1)
    onehot = jax.nn.one_hot(t, N_CLASSES, dtype=jnp.float32)
    np.testing.assert_array_equal(g(model, x, scale=1.0), f(model, x, scale=1.0))
    r = jax.grad(lambda x: jnp.sum(g(model, x, scale=1.0) * onehot))(x)
    np.testing.assert_allclose(r, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    r_jit = eqx.filter_jit(lambda m, x: jax.grad(lambda x: jnp.sum(g(m, x, scale=1.0) * onehot))(x))(model, x)
    np.testing.assert_allclose(r_jit, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    res = jaxlrp.attribute(lambda m, x: f(m, x, scale=1.0), x, composite, target=t, params=model)
    np.testing.assert_allclose(res.relevance, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    rows = jaxlrp.show_rules(lambda m, x: f(m, x, scale=2.0), composite, model, x, argnums=1, print_table=False)
    assert [r.path for r in rows if r.kind == "dense"] == ["layers/0/weight", "layers/1/weight", "layers/2/weight"]
    # Metrics and tune take the module whole too: the same numbers as with the partitioned one.
    whole = lambda m, x: f(m, x, scale=1.0)  # noqa: E731
    np.testing.assert_allclose(jaxlrp.metrics.aopc(whole, x, want, t, params=model),
                               jaxlrp.metrics.aopc(impl.f, x, want, t, params=impl.params), rtol=1e-6)
    tuned = jaxlrp.tune(whole, x, lambda e: jaxlrp.Composite(("dense", jaxlrp.Epsilon(e))), grid={"e": [1e-6, 0.1]},
                        target=t, params=model)
    np.testing.assert_allclose(tuned.scores, jaxlrp.tune(impl.f, x, lambda e: jaxlrp.Composite(
        ("dense", jaxlrp.Epsilon(e))), grid={"e": [1e-6, 0.1]}, target=t, params=impl.params).scores, rtol=1e-6)
