"""Real CNNs with no model surgery: the models in ``examples/models`` explained as their communities write them.

VGG-16 / VGG-16-BN, ResNet-18 / ResNet-50 (Flax's ImageNet-example style), a U-Net (transposed-conv and
``jax.image.resize`` upsampling; classification and segmentation-score heads), a dilated 1D sequence CNN (global
max and mean pooling), and a ResNet basic block in Flax nnx and in Equinox, all at small sizes (32 x 32, batch 2,
reduced widths). For each model:

1. the forward of ``jaxlrp.lrp(f, composite)`` equals ``f`` bit for bit (eager, and for one model under ``jit``);
2. the five presets give finite, non-zero relevance of the input's shape;
3. ``jaxlrp.show_rules`` finds the model's conv and dense layers (BatchNorm folded into them, not listed);
4. LRP-0 (``Composite(("linear", Zero()))``) conserves relevance on the same model with its shifts zeroed (biases,
   BatchNorm means and offsets: BatchNorm becomes a pure per-channel scale), and equals gradient x input;
5. ``Path`` (and linen ``Name``) selectors on the real parameter trees: linen module globs, ``**/Conv_0``, nnx
   attribute paths, Equinox field paths.

Runtime: the five presets of a model are compiled as one program, with XLA's backend optimisations off (compile
time dominates at these sizes; none of the checks depends on it). The weights come from the models' NumPy ``init``
helpers (compiling the models' own random initialisers would take longer than the tests).
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from collections import Counter
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlrp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository root: examples.models
from examples.models import conv1d, eqx_resnet, nnx_resnet, resnet, unet, vgg  # noqa: E402

PRESETS = {
    "EpsilonPlus": jaxlrp.EpsilonPlus(),
    "EpsilonPlusFlat": jaxlrp.EpsilonPlusFlat(),
    "EpsilonGammaBox": jaxlrp.EpsilonGammaBox(-3.0, 3.0),
    "EpsilonAlpha2Beta1": jaxlrp.EpsilonAlpha2Beta1(),
    "EpsilonAlpha2Beta1Flat": jaxlrp.EpsilonAlpha2Beta1Flat(),
}
LRP0 = jaxlrp.Composite(("linear", jaxlrp.Zero()))
# LRP-0 with (almost) no stabiliser on sums either: the default Norm(1e-6) on a residual add whose output is ~1e-5
# moves relevance by ~10% there; without it, LRP-0 is gradient x input exactly (piecewise-linear networks).
LRP0_EXACT = LRP0 + jaxlrp.Composite(*((kind, jaxlrp.Norm(1e-30)) for kind in ("add", "sum", "avg_pool")))

# Compile-time savers for the (many, small) programs of this module.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

BATCH = 2
NUM_CLASSES = 5


# --------------------------------------------------------------------------------------------------------------
# The cases: f(params, x) -> [B, classes], seeded params, an input, and the same model with its shifts zeroed
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    f: Callable  # f(params, x) -> [B, C]
    params: Any
    x: jax.Array
    shiftless: Any  # params with biases / BatchNorm means and offsets zeroed (for the conservation check)
    n_conv: int
    n_dense: int  # dense layers with a parameter path (jax.image.resize's interpolation matrices have none)
    n_param_free_dense: int = 0
    f_shiftless: Callable | None = None  # f for `shiftless` when it differs (Equinox: statistics in a closed-over state)


def _image(channels: int, seed: int = 1) -> jax.Array:
    x = np.random.default_rng(seed).normal(0.0, 1.0, (BATCH, 32, 32, channels))
    return jnp.asarray(np.clip(x, -3.0, 3.0), jnp.float32)  # inside EpsilonGammaBox(-3, 3)'s box


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _zero_shifts(tree):
    """Zeros every leaf whose path names a bias or a (running) mean: linen variables and nnx states alike."""

    def zero(path, leaf):
        return jnp.zeros_like(leaf) if {"bias", "mean"} & set(_keys(path)) else leaf

    return jax.tree_util.tree_map_with_path(zero, tree)


def _linen(model, shape, seed=0, apply_kwargs=None, wrap=None, **counts) -> Case:
    module = {"VGG": vgg, "ResNet": resnet, "UNet": unet, "SeqCNN": conv1d}[type(model).__name__]
    model, variables = module.init(model, shape, seed=seed)
    kwargs = apply_kwargs or {}

    def f(v, x):
        out = model.apply(v, x, **kwargs)
        return wrap(out) if wrap else out

    x = _image(shape[-1]) if len(shape) == 4 else jnp.asarray(conv1d.random_dna(1, *shape[:2]))
    return Case(f, variables, x, _zero_shifts(variables), **counts)


def _nnx_case() -> Case:
    model = nnx_resnet.tiny_resnet(3, num_classes=NUM_CLASSES, width=8, seed=0)
    graphdef, state = nnx.split(model)
    f = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    return Case(f, state, _image(3), _zero_shifts(state), n_conv=6, n_dense=1)


def _eqx_apply(static, state):
    return lambda p, x: eqx_resnet.apply(eqx.combine(p, static), state, x)


def _eqx_zero_shifts(model, state):
    is_bn = lambda m: isinstance(m, eqx.nn.BatchNorm)  # noqa: E731
    leaves, treedef = jax.tree.flatten(state)
    state = jax.tree.unflatten(treedef, leaves)  # a clone: State.set retires the state it is called on
    for bn in (m for m in jax.tree.leaves(model, is_leaf=is_bn) if is_bn(m)):
        _, var = state.get(bn.batch_state_index)
        state = state.set(bn.batch_state_index, (jnp.zeros_like(var), var))
    zero_bias = lambda path, leaf: jnp.zeros_like(leaf) if "bias" in _keys(path) else leaf  # noqa: E731
    return jax.tree_util.tree_map_with_path(zero_bias, model), state


def _eqx_case() -> Case:
    model, state = eqx_resnet.tiny_resnet(3, num_classes=NUM_CLASSES, width=8, seed=0)
    params, static = eqx.partition(model, eqx.is_array)
    model0, state0 = _eqx_zero_shifts(model, state)
    params0, _ = eqx.partition(model0, eqx.is_array)
    x = jnp.transpose(_image(3), (0, 3, 1, 2))  # NCHW
    return Case(_eqx_apply(static, state), params, x, params0, n_conv=6, n_dense=1,
                f_shiftless=_eqx_apply(static, state0))


def _segment_score(out):
    """A segmentation-score head: the mean class score over the central 16 x 16 pixels, [B, classes]."""
    return out[:, 8:24, 8:24, :].mean(axis=(1, 2))


CASES: dict[str, Callable[[], Case]] = {
    "vgg16": lambda: _linen(vgg.vgg16(NUM_CLASSES, width=0.125), (BATCH, 32, 32, 3), n_conv=13, n_dense=3),
    "vgg16_bn": lambda: _linen(vgg.vgg16_bn(NUM_CLASSES, width=0.125), (BATCH, 32, 32, 3), n_conv=13, n_dense=3),
    # 1 stem + 8 blocks x 2 + 3 projections; Flax's example's default train=True must be switched off.
    "resnet18": lambda: _linen(resnet.ResNet18(num_classes=NUM_CLASSES, num_filters=8), (BATCH, 32, 32, 3),
                               apply_kwargs={"train": False}, n_conv=20, n_dense=1),
    # 1 stem + 16 bottlenecks x 3 + 4 projections.
    "resnet50": lambda: _linen(resnet.ResNet50(num_classes=NUM_CLASSES, num_filters=4), (BATCH, 32, 32, 3),
                               apply_kwargs={"train": False}, n_conv=53, n_dense=1),
    # 3 levels: 2 x 2 encoder convs, 2 bottleneck convs, 2 x (up conv + 2 convs); dense head.
    "unet_transpose_classify": lambda: _linen(unet.UNet(NUM_CLASSES, (8, 16, 32), up_mode="transpose",
                                                        head="classify"), (BATCH, 32, 32, 1), n_conv=12, n_dense=1),
    # Bilinear jax.image.resize: each resize is two einsums with a constant interpolation matrix ("dense", no path).
    "unet_bilinear_segment": lambda: _linen(unet.UNet(NUM_CLASSES, (8, 16, 32), up_mode="bilinear", head="segment"),
                                            (BATCH, 32, 32, 1), wrap=_segment_score, n_conv=13, n_dense=0,
                                            n_param_free_dense=4),
    "unet_nearest_segment": lambda: _linen(unet.UNet(NUM_CLASSES, (8, 16, 32), up_mode="nearest", head="segment"),
                                           (BATCH, 32, 32, 1), wrap=_segment_score, n_conv=13, n_dense=0),
    "conv1d_maxpool": lambda: _linen(conv1d.SeqCNN(NUM_CLASSES, features=8, pool="max"), (BATCH, 64, 4),
                                     n_conv=4, n_dense=2),
    "conv1d_meanpool": lambda: _linen(conv1d.SeqCNN(NUM_CLASSES, features=8, pool="mean"), (BATCH, 64, 4),
                                      n_conv=4, n_dense=2),
    "nnx_resnet": _nnx_case,
    "eqx_resnet": _eqx_case,
}
NAMES = list(CASES)


@pytest.fixture(scope="module")
def cases():
    return {}


def _case(cases, name) -> Case:
    if name not in cases:
        cases[name] = CASES[name]()
    return cases[name]


def _targets(out) -> jax.Array:
    return jnp.argmax(out, axis=-1)


def _relevances(f, params, x, composites, targets, *, gradient_x_input=False):
    """Relevance of x for each composite (cotangent one_hot(target)), compiled as one program; with
    `gradient_x_input`, the plain gradient x input is appended."""
    onehot = jax.nn.one_hot(targets, NUM_CLASSES, dtype=x.dtype)

    def run(params, x):
        rel = [jax.grad(lambda x: jnp.sum(jaxlrp.lrp(f, c, argnums=1)(params, x) * onehot))(x) for c in composites]
        if gradient_x_input:
            rel.append(jax.grad(lambda x: jnp.sum(f(params, x) * onehot))(x) * x)
        return rel

    return [np.asarray(r) for r in jax.jit(run, compiler_options=FAST_COMPILE)(params, x)]


@pytest.fixture(scope="module")
def preset_relevance(cases):
    """{model: {preset: relevance}}, filled on first use (one compiled program per model)."""
    store: dict[str, dict[str, np.ndarray]] = {}

    def get(name):
        if name not in store:
            c = _case(cases, name)
            rel = _relevances(c.f, c.params, c.x, list(PRESETS.values()), _targets(c.f(c.params, c.x)))
            store[name] = dict(zip(PRESETS, rel))
        return store[name]

    return get


# --------------------------------------------------------------------------------------------------------------
# 1. Forward bit for bit
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_forward_bit_for_bit(cases, name):
    c = _case(cases, name)
    expected = np.asarray(c.f(c.params, c.x))
    assert expected.shape == (BATCH, NUM_CLASSES) and np.all(np.isfinite(expected))
    got = np.asarray(jaxlrp.lrp(c.f, jaxlrp.EpsilonGammaBox(-3.0, 3.0), argnums=1)(c.params, c.x))
    np.testing.assert_array_equal(got, expected)


def test_forward_bit_for_bit_under_jit(cases):
    c = _case(cases, "resnet18")
    g = jaxlrp.lrp(c.f, jaxlrp.EpsilonAlpha2Beta1Flat(), argnums=1)
    np.testing.assert_array_equal(np.asarray(jax.jit(g)(c.params, c.x)), np.asarray(jax.jit(c.f)(c.params, c.x)))


# --------------------------------------------------------------------------------------------------------------
# 2. The five presets
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_presets_finite(preset_relevance, cases, name):
    c = _case(cases, name)
    rel = preset_relevance(name)
    for preset, r in rel.items():
        assert r.shape == c.x.shape and r.dtype == c.x.dtype, preset
        assert np.all(np.isfinite(r)), preset
        assert np.all(np.abs(r).reshape(BATCH, -1).max(axis=1) > 0), preset  # every sample gets relevance
    # The presets are not all the same rule under another name.
    flat = [r.ravel() for r in rel.values()]
    assert min(np.max(np.abs(a - b)) for i, a in enumerate(flat) for b in flat[i + 1 :]) > 0


# --------------------------------------------------------------------------------------------------------------
# 3. What jaxlrp recognises
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_show_rules_finds_layers(cases, name, capsys):
    c = _case(cases, name)
    rows = jaxlrp.show_rules(c.f, jaxlrp.EpsilonPlusFlat(), c.params, c.x, argnums=1)
    table = capsys.readouterr().out
    kinds = Counter(r.kind for r in rows)
    with_path = Counter(r.kind for r in rows if r.path)
    assert with_path["conv"] == kinds["conv"] == c.n_conv, table
    assert with_path["dense"] == c.n_dense, table
    assert kinds["dense"] == c.n_dense + c.n_param_free_dense, table
    # Every BatchNorm is folded into its conv: no standalone scale-and-shift ("norm") is left over.
    assert kinds["norm"] == 0, table
    # The first layer is the one reading the input: Flat there, ZPlus on the other convs, Epsilon on dense layers.
    layers = [r for r in rows if r.kind in ("conv", "dense")]
    assert isinstance(layers[0].rule, jaxlrp.Flat), table
    assert all(isinstance(r.rule, jaxlrp.ZPlus) for r in layers[1:] if r.kind == "conv"), table
    assert all(isinstance(r.rule, jaxlrp.Epsilon) for r in layers[1:] if r.kind == "dense"), table


# --------------------------------------------------------------------------------------------------------------
# 4. Conservation (LRP-0, no shifts)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_lrp0_conserves_without_shifts(cases, name):
    """LRP-0 on the model with its shifts zeroed: relevance sums to the score; without the sums' stabiliser it
    equals gradient x input element by element (the networks are piecewise linear)."""
    c = _case(cases, name)
    f = c.f_shiftless or c.f
    out = np.asarray(f(c.shiftless, c.x))
    t = jnp.asarray(np.argmax(out, axis=-1))
    rel, rel_exact, gxi = _relevances(f, c.shiftless, c.x, [LRP0, LRP0_EXACT], t, gradient_x_input=True)
    total = rel.reshape(BATCH, -1).sum(axis=1, dtype=np.float64)
    score = out[np.arange(BATCH), np.asarray(t)]
    np.testing.assert_allclose(total, score, rtol=1e-4, atol=1e-6 * np.abs(out).max())

    assert np.max(np.abs(rel_exact - gxi)) <= 1e-5 * np.max(np.abs(gxi))


# --------------------------------------------------------------------------------------------------------------
# 5. Selecting layers by parameter path / name stack on the real trees
# --------------------------------------------------------------------------------------------------------------

# label: (model, composite, {rule type: number of conv/dense layers expected to get it})
_PLUS = jaxlrp.EpsilonPlus()
PATH_CASES = {
    # linen ResNet-18 (Flax's example names blocks ResNetBlock_<k>, the projection conv_proj):
    "linen block glob": (
        "resnet18",
        _PLUS + jaxlrp.Composite((jaxlrp.Path("params/ResNetBlock_1*"), jaxlrp.Gamma(0.5))),
        {jaxlrp.Gamma: 2, jaxlrp.ZPlus: 18, jaxlrp.Epsilon: 1},
    ),
    "linen **/Conv_0": (
        "resnet18",
        _PLUS + jaxlrp.Composite((jaxlrp.Path("**/Conv_0"), jaxlrp.AlphaBeta(1.0, 0.0))),
        {jaxlrp.AlphaBeta: 8, jaxlrp.ZPlus: 12, jaxlrp.Epsilon: 1},
    ),
    "linen projections and stem": (
        "resnet18",
        _PLUS + jaxlrp.Composite(
            (jaxlrp.Path("*/conv_proj/kernel"), jaxlrp.Epsilon(0.1)),
            (jaxlrp.Path("params/conv_init"), jaxlrp.Flat()),
        ),
        {jaxlrp.Flat: 1, jaxlrp.Epsilon: 4, jaxlrp.ZPlus: 16},
    ),
    "linen name stack": (
        "resnet50",
        _PLUS + jaxlrp.Composite((jaxlrp.Name("ResNet/BottleneckResNetBlock_1[0-5]/*"), jaxlrp.Gamma())),
        {jaxlrp.Gamma: 6 * 3 + 1, jaxlrp.ZPlus: 53 - 19, jaxlrp.Epsilon: 1},  # block 13 has conv_proj
    ),
    "vgg last three convs": (
        "vgg16_bn",
        _PLUS + jaxlrp.Composite((jaxlrp.Path("params/Conv_1[0-2]"), jaxlrp.Gamma())),
        {jaxlrp.Gamma: 3, jaxlrp.ZPlus: 10, jaxlrp.Epsilon: 3},
    ),
    "unet decoder": (
        "unet_transpose_classify",
        _PLUS + jaxlrp.Composite(
            (jaxlrp.Path("params/Up_*"), jaxlrp.Gamma()),
            (jaxlrp.Path("params/Up_*/ConvTranspose_0"), jaxlrp.Epsilon(0.01)),
        ),
        {jaxlrp.Gamma: 4, jaxlrp.Epsilon: 2 + 1, jaxlrp.ZPlus: 6},
    ),
    "conv1d dilated tower": (
        "conv1d_maxpool",
        _PLUS + jaxlrp.Composite((jaxlrp.Path("params/DilatedBlock_*/Conv_0/kernel"), jaxlrp.Gamma())),
        {jaxlrp.Gamma: 3, jaxlrp.ZPlus: 1, jaxlrp.Epsilon: 2},
    ),
    # nnx: attribute paths of the nnx.State (with a trailing /value on the variables).
    "nnx attribute paths": (
        "nnx_resnet",
        _PLUS + jaxlrp.Composite(
            (jaxlrp.Path("layer2/*"), jaxlrp.Gamma()),
            (jaxlrp.Path("layer2/shortcut/layers/0/kernel/value"), jaxlrp.Epsilon(0.1)),
            (jaxlrp.Path("stem"), jaxlrp.Flat()),
        ),
        {jaxlrp.Flat: 1, jaxlrp.ZPlus: 2, jaxlrp.Gamma: 2, jaxlrp.Epsilon: 2},
    ),
    # Equinox: field paths of the eqx.partition-ed model (weight, not kernel).
    "equinox field paths": (
        "eqx_resnet",
        _PLUS + jaxlrp.Composite(
            (jaxlrp.Path("layer2/*"), jaxlrp.Gamma()),
            (jaxlrp.Path("layer2/shortcut/layers/0/weight"), jaxlrp.Epsilon(0.1)),
            (jaxlrp.Path("stem/weight"), jaxlrp.Flat()),
        ),
        {jaxlrp.Flat: 1, jaxlrp.ZPlus: 2, jaxlrp.Gamma: 2, jaxlrp.Epsilon: 2},
    ),
}


@pytest.mark.parametrize("label", list(PATH_CASES))
def test_path_selection(cases, label, capsys):
    name, composite, expected = PATH_CASES[label]
    c = _case(cases, name)
    rows = jaxlrp.show_rules(c.f, composite, c.params, c.x, argnums=1)
    table = capsys.readouterr().out
    got = Counter(type(r.rule) for r in rows if r.kind in ("conv", "dense"))
    assert got == Counter(expected), table


def test_path_selection_end_to_end(cases):
    """A path composite changes exactly the selected layers' rule: the relevance differs from the preset's, and
    selecting the same layers by an equivalent glob gives the same relevance bit for bit."""
    c = _case(cases, "nnx_resnet")
    t = _targets(c.f(c.params, c.x))
    by_path = _PLUS + jaxlrp.Composite((jaxlrp.Path("layer2/*"), jaxlrp.Gamma()))
    by_glob = _PLUS + jaxlrp.Composite((jaxlrp.Path("layer2/*/kernel/value"), jaxlrp.Gamma()))
    r_path, r_glob, r_plus = _relevances(c.f, c.params, c.x, [by_path, by_glob, _PLUS], t)
    np.testing.assert_array_equal(r_path, r_glob)
    assert np.max(np.abs(r_path - r_plus)) > 1e-3 * np.max(np.abs(r_plus))


def test_path_matching_nothing_raises(cases):
    c = _case(cases, "resnet18")
    comp = _PLUS + jaxlrp.Composite((jaxlrp.Path("params/layer1*"), jaxlrp.Gamma()))  # torchvision naming
    with pytest.raises(jaxlrp.SelectorError):
        jaxlrp.show_rules(c.f, comp, c.params, c.x, argnums=1, print_table=False)


# --------------------------------------------------------------------------------------------------------------
# 6. The same basic-block ResNet in nnx and in Equinox (stateful BatchNorm) gives the same relevance
# --------------------------------------------------------------------------------------------------------------


def _get(module, path: str):
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


# (conv, BatchNorm) attribute paths, the same in TinyResNet's nnx and Equinox versions.
_CONV_BN = [
    ("stem", "bn"),
    ("layer1.conv1", "layer1.bn1"),
    ("layer1.conv2", "layer1.bn2"),
    ("layer2.conv1", "layer2.bn1"),
    ("layer2.conv2", "layer2.bn2"),
    ("layer2.shortcut.layers.0", "layer2.shortcut.layers.1"),
]


def _nnx_to_eqx(model: nnx_resnet.TinyResNet):
    """An Equinox TinyResNet (and its BatchNorm state) holding the nnx model's weights."""
    emodel, estate = eqx_resnet.tiny_resnet(3, num_classes=NUM_CLASSES, width=8, seed=1)
    for conv, bn in _CONV_BN:
        kernel = jnp.transpose(_get(model, conv).kernel.get_value(), (3, 2, 0, 1))  # HWIO -> OIHW
        nbn = _get(model, bn)
        estate = estate.set(_get(emodel, bn).batch_state_index, (nbn.mean.get_value(), nbn.var.get_value()))
        emodel = eqx.tree_at(lambda m, conv=conv: _get(m, conv).weight, emodel, kernel)
        emodel = eqx.tree_at(lambda m, bn=bn: (_get(m, bn).weight, _get(m, bn).bias), emodel,
                             (nbn.scale.get_value(), nbn.bias.get_value()))
    emodel = eqx.tree_at(lambda m: (m.fc.weight, m.fc.bias), emodel,
                         (model.fc.kernel.get_value().T, model.fc.bias.get_value()))
    return emodel, estate


def test_nnx_and_equinox_agree():
    model = nnx_resnet.tiny_resnet(3, num_classes=NUM_CLASSES, width=8, seed=0)
    graphdef, state = nnx.split(model)
    f_nnx = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    emodel, estate = _nnx_to_eqx(model)
    params, static = eqx.partition(emodel, eqx.is_array)
    f_eqx = _eqx_apply(static, estate)

    x = _image(3)
    x_eqx = jnp.transpose(x, (0, 3, 1, 2))
    out = np.asarray(f_nnx(state, x))
    np.testing.assert_allclose(np.asarray(f_eqx(params, x_eqx)), out, rtol=1e-5, atol=1e-5)
    t = jnp.asarray(np.argmax(out, axis=-1))
    comps = [PRESETS["EpsilonGammaBox"], PRESETS["EpsilonAlpha2Beta1Flat"]]
    r_nnx = _relevances(f_nnx, state, x, comps, t)
    r_eqx = [np.transpose(r, (0, 2, 3, 1)) for r in _relevances(f_eqx, params, x_eqx, comps, t)]
    for a, b in zip(r_eqx, r_nnx):
        assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(b))
