"""Cross-check against Zennit 1.0 on real architectures: VGG-16-BN and ResNet-50 at 64 x 64 (batch 2), full width.

The torch models (``tests/crosscheck/zennit_cnns.py``) are in eval mode with randomised BatchNorm statistics and
affine parameters (some BatchNorm scales negative). Zennit gets canonizers built from its public pieces
(``SequentialMergeBatchNorm`` for VGG; ``NamedMergeBatchNorm`` with every conv/BN pair for the ResNet, whose residual
adds go through ``zennit.layer.Sum``). The Flax linen twins keep ``nn.BatchNorm(use_running_average=True)`` and the
plain ``nn.relu(residual + y)`` and are handed to jaxlrp unmodified: jaxlrp must fold the BatchNorms and split the
residual adds by itself and reproduce Zennit's numbers, ``max|R_jax - R_zennit| <= 1e-4 * max|R_zennit|``, for the
five preset composites with argmax targets (Zennit's output relevance ``one_hot(t) * output``, jaxlrp's cotangent
``one_hot(t)``).

Precision. VGG-16-BN runs in float32. The full-width ResNet-50 runs in float64 on both sides (torch ``.double()``,
``jax.enable_x64``): in float32 the rounding through its 54 layers alone moves *each* library by up to
5e-4 x max|R| from the exact (float64) result (Zennit's EpsilonPlus: 5.5e-4; jaxlrp's: 4e-5, its EpsilonGammaBox
4.6e-4), so a float32 comparison measures rounding, not the rules. In float64 the two agree to about 1e-12.

Needs the ``compare`` extra (``.ci/install-compare``). Run with ``-s`` to see the table of measured errors.
"""
from __future__ import annotations

import functools
import pathlib
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.crosscheck

torch = pytest.importorskip("torch", reason="cross-check needs torch (pip install torch==2.13.0, see .ci/install-compare)")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from crosscheck import zennit_cnns as zc  # noqa: E402
from crosscheck import zennit_twins as zt  # noqa: E402

zt.install_torchvision_standin()
pytest.importorskip(
    "zennit",
    reason="cross-check needs zennit 1.0 (pip install --no-deps --ignore-requires-python zennit==1.0.0)",
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxlrp  # noqa: E402

TOL = 1e-4  # max|R_jax - R_zennit| <= TOL * max|R_zennit|
FORWARD_TOL = 1e-4  # max|y_a - y_b| <= FORWARD_TOL * max|y_b|: torch vs Flax, and Zennit's merged model vs torch

DTYPES = {"vgg16_bn": np.float32, "resnet50": np.float64}  # see the module docstring

_RESULTS: dict[tuple[str, str], float] = {}


def precision(kind: str):
    """The JAX precision context of `kind`'s comparison."""
    return jax.enable_x64(DTYPES[kind] == np.float64)


@pytest.fixture(scope="module", autouse=True)
def _print_table():
    yield
    if not _RESULTS:
        return
    lines = [
        "",
        f"Zennit parity on real CNNs, {zc.INPUT_SHAPE[0]} x {zc.INPUT_SHAPE[2]} x {zc.INPUT_SHAPE[3]}, argmax targets: "
        f"max|R_jax - R_zennit| / max|R_zennit|  (tolerance {TOL:g})",
        f"{'composite':24}" + "".join(f" {m:>10}" for m in zc.MODELS),
    ]
    for preset in zc.PRESETS:
        cells = [_RESULTS.get((m, preset)) for m in zc.MODELS]
        lines.append(f"{preset:24}" + "".join(f" {'-' if v is None else f'{v:.2e}':>10}" for v in cells))
    lines.append(f"worst over {len(_RESULTS)} cases: {max(_RESULTS.values()):.3e}")
    print("\n".join(lines))


@functools.lru_cache(maxsize=None)
def twin(kind: str) -> zc.CNNTwin:
    """The twin in `kind`'s precision (the torch model converted in place, the inputs cast)."""
    tw = zc.make_cnn_twin(kind)
    dtype = DTYPES[kind]
    if dtype == np.float64:
        tw.torch_model.double()
        with precision(kind):
            tw.variables = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), tw.variables)
    tw.x_torch, tw.x_jax = tw.x_torch.astype(dtype), tw.x_jax.astype(dtype)
    return tw


@functools.lru_cache(maxsize=None)
def torch_logits(kind: str) -> np.ndarray:
    tw = twin(kind)
    return zt.torch_forward(tw.torch_model, tw.x_torch)


def targets(kind: str) -> np.ndarray:
    return torch_logits(kind).argmax(axis=1).astype(np.int32)


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return zt.max_rel_err(a, np.asarray(ref, np.float64))


@functools.lru_cache(maxsize=None)
def zennit_ref(kind: str, preset: str, canonize: bool = True) -> np.ndarray:
    tw = twin(kind)
    canonizers = zc.zennit_canonizers(kind, tw.torch_model) if canonize else None
    comp = zc.zennit_composite(preset, tw.x_torch, canonizers)
    out, rel = zt.zennit_relevance(tw.torch_model, tw.x_torch, comp, targets(kind))
    assert rel_err(out, torch_logits(kind)) <= FORWARD_TOL  # the merged model computes the same function
    assert np.any(rel != 0)
    return rel.astype(np.float64)


@functools.lru_cache(maxsize=None)
def jitted_vjp(kind: str, preset: str):
    """jit((variables, x, cotangent) -> (output, relevance)) through jax.vjp of jaxlrp.lrp on the unmodified model."""
    model = twin(kind).flax_model
    g = jaxlrp.lrp(lambda v, x: model.apply(v, x), zc.jaxlrp_composite(preset), argnums=1)

    @jax.jit
    def explain(variables, x, cot):
        out, vjp = jax.vjp(lambda xx: g(variables, xx), x)
        return out, vjp(cot)[0]

    return explain


@pytest.mark.parametrize("kind", zc.MODELS)
def test_twin_forwards_agree(kind):
    tw = twin(kind)
    y_torch = torch_logits(kind)
    with precision(kind):
        y_jax = np.asarray(tw.flax_model.apply(tw.variables, jnp.asarray(tw.x_jax)))
    assert y_jax.dtype == y_torch.dtype == DTYPES[kind]
    assert rel_err(y_jax, y_torch) <= FORWARD_TOL
    # the variables are exactly the tree linen would initialise
    with precision(kind):
        init = jax.eval_shape(tw.flax_model.init, jax.random.key(0), tw.x_jax)
    assert jax.tree.structure(init) == jax.tree.structure(tw.variables)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, init, tw.variables)))
    # the models are not degenerate: some BatchNorm scales are negative, the samples have different argmax classes
    frac = float(np.mean(zc.bn_scales(tw.torch_model) < 0))
    assert 0.1 < frac < 0.5, frac
    assert len(set(targets(kind).tolist())) == 2


@pytest.mark.parametrize("kind", zc.MODELS)
def test_zennit_canonizer_merges_every_batchnorm(kind):
    """The Zennit side really is the canonized model: every BatchNorm is merged into its conv, and undone after."""
    tw = twin(kind)
    model = tw.torch_model
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handles = []
    for canonizer in zc.zennit_canonizers(kind, model):
        handles += canonizer.apply(model)
    try:
        assert len(handles) == len(bns)
        assert {id(h.batch_norm) for h in handles} == {id(m) for m in bns}
        for bn in bns:
            assert torch.all(bn.weight == 1) and torch.all(bn.running_var == 1) and bn.eps == 0
        assert rel_err(zt.torch_forward(model, tw.x_torch), torch_logits(kind)) <= FORWARD_TOL
    finally:
        for h in reversed(handles):
            h.remove()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", zc.MODELS)
def test_cases_discriminate(kind):
    """Negative controls: the presets differ from each other, and merging the BatchNorms matters (Zennit without
    its canonizer gives other numbers), so neither a wrong rule nor an unfolded BatchNorm can pass at TOL."""
    for i, a in enumerate(zc.PRESETS):
        for b in zc.PRESETS[i + 1:]:
            err = rel_err(zennit_ref(kind, a), zennit_ref(kind, b))
            assert err > 100 * TOL, (a, b, err)
    err = rel_err(zennit_ref(kind, "EpsilonPlus", canonize=False), zennit_ref(kind, "EpsilonPlus"))
    assert err > 100 * TOL, err


@pytest.mark.parametrize("preset", zc.PRESETS)
@pytest.mark.parametrize("kind", zc.MODELS)
def test_zennit_parity(kind, preset, record_property):
    tw = twin(kind)
    ref = zennit_ref(kind, preset)
    with precision(kind):
        x = jnp.asarray(tw.x_jax)
        cot = jax.nn.one_hot(targets(kind), zc.NUM_CLASSES, dtype=x.dtype)
        out, rel = jitted_vjp(kind, preset)(tw.variables, x, cot)
    assert rel_err(np.asarray(out), torch_logits(kind)) <= FORWARD_TOL
    rel = np.asarray(rel)
    assert rel.shape == x.shape and rel.dtype == x.dtype
    err = rel_err(zt.to_torch_layout(rel), ref)
    _RESULTS[(kind, preset)] = err
    record_property("max_rel_err", err)
    assert err <= TOL, (
        f"{kind}/{preset}: max|R_jax - R_zennit| / max|R_zennit| = {err:.3e} > {TOL:g} "
        f"(max|R_zennit| = {np.max(np.abs(ref)):.3e})"
    )
