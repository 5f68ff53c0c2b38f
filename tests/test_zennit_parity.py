"""Cross-check against Zennit 1.0: the same models, the same composites, the same relevance.

A CNN and an MLP are written in plain torch with seeded random weights and mixed-sign biases, and twinned in
Flax linen with the same weights. Zennit (run as a black box) seeds the output relevance with
``one_hot(target) * output``; jaxlrp's equivalent is cotangent ``one_hot(target)``. Every case must agree to
``max|R_jax - R_zennit| <= 1e-4 * max|R_zennit|``.

Needs the ``compare`` extra (``.ci/install-compare``): torch (CPU) and zennit (installed with --no-deps).
Run with ``-s`` to see the table of measured errors.
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
FORWARD_TOL = 1e-5

KINDS = ("cnn", "mlp")
TARGETS = ("argmax", "other")
PATHS = ("lrp_vjp", "lrp_grad", "attribute")
# lrp_vjp: jit(vjp(lrp(f))) with cotangent one_hot(target), compiled once per (model, composite);
# lrp_grad: eager jax.grad of sum(lrp(f)(params, x)[b, t_b]), no jit (the slow path: argmax targets only);
# attribute: jaxlrp.attribute(model.apply, x, composite, target=t, params=params).
TARGET_PATHS = [(t, p) for p in PATHS for t in TARGETS if not (p == "lrp_grad" and t != "argmax")]
CASE_NAMES = [c.name for c in zt.CASES]

_RESULTS: dict[tuple[str, str, str, str], float] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_table():
    yield
    if not _RESULTS:
        return
    lines = ["", f"Zennit parity: max|R_jax - R_zennit| / max|R_zennit|  (tolerance {TOL:g})"]
    header = f"{'model':5} {'composite':24}" + "".join(f" {p + '/' + t:>17}" for t, p in TARGET_PATHS)
    lines.append(header)
    for kind in KINDS:
        for case in CASE_NAMES:
            cells = []
            for t, p in TARGET_PATHS:
                v = _RESULTS.get((kind, case, t, p))
                cells.append(f" {'-' if v is None else f'{v:.2e}':>17}")
            if any(c.strip() != "-" for c in cells):
                lines.append(f"{kind:5} {case:24}" + "".join(cells))
    worst = max(_RESULTS.values())
    lines.append(f"worst over {len(_RESULTS)} cases: {worst:.3e}")
    print("\n".join(lines))


@functools.lru_cache(maxsize=None)
def twin(kind: str) -> zt.Twin:
    return zt.make_twin(kind)


@functools.lru_cache(maxsize=None)
def targets(kind: str) -> dict[str, np.ndarray]:
    tw = twin(kind)
    return zt.pick_targets(zt.torch_forward(tw.torch_model, tw.x_torch))


@functools.lru_cache(maxsize=None)
def zennit_ref(kind: str, case: str, target: str) -> np.ndarray:
    tw = twin(kind)
    comp = zt.CASES_BY_NAME[case].zennit(tw.x_torch)
    out, rel = zt.zennit_relevance(tw.torch_model, tw.x_torch, comp, targets(kind)[target])
    np.testing.assert_allclose(out, zt.torch_forward(tw.torch_model, tw.x_torch), rtol=1e-6, atol=1e-6)
    assert np.any(rel != 0)
    return rel.astype(np.float64)


def _apply_fn(kind: str):
    model = twin(kind).flax_model
    return lambda params, x: model.apply(params, x)


@functools.lru_cache(maxsize=None)
def jitted_vjp(kind: str, case: str):
    """jit(x, cotangent -> relevance) through jax.vjp of jaxlrp.lrp; compiled once per (model, composite)."""
    g = jaxlrp.lrp(_apply_fn(kind), zt.CASES_BY_NAME[case].jaxlrp(), argnums=1)

    @jax.jit
    def explain(params, x, cot):
        out, vjp = jax.vjp(lambda xx: g(params, xx), x)
        return out, vjp(cot)[0]

    return explain


def jax_relevance(kind: str, case: str, target: str, path: str) -> np.ndarray:
    tw = twin(kind)
    t = targets(kind)[target]
    x = jnp.asarray(tw.x_jax)
    if path == "lrp_vjp":
        cot = jax.nn.one_hot(t, zt.NUM_CLASSES, dtype=jnp.float32)
        out, rel = jitted_vjp(kind, case)(tw.params, x, cot)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(tw.flax_model.apply(tw.params, x)))
    elif path == "lrp_grad":
        g = jaxlrp.lrp(_apply_fn(kind), zt.CASES_BY_NAME[case].jaxlrp(), argnums=1)
        rows = jnp.arange(x.shape[0])
        rel = jax.grad(lambda p, xx: jnp.sum(g(p, xx)[rows, t]), argnums=1)(tw.params, x)  # eager, no jit
    elif path == "attribute":
        res = jaxlrp.attribute(
            tw.flax_model.apply, x, zt.CASES_BY_NAME[case].jaxlrp(), target=jnp.asarray(t), params=tw.params
        )
        np.testing.assert_array_equal(np.asarray(res.target), t)
        rel = res.relevance
    else:
        raise ValueError(path)
    rel = np.asarray(rel)
    assert rel.shape == x.shape and rel.dtype == x.dtype
    return zt.to_torch_layout(rel)


@pytest.mark.parametrize("kind", KINDS)
def test_twin_forwards_agree(kind):
    tw = twin(kind)
    y_torch = zt.torch_forward(tw.torch_model, tw.x_torch)
    y_jax = np.asarray(tw.flax_model.apply(tw.params, jnp.asarray(tw.x_jax)))
    err = np.max(np.abs(y_torch - y_jax)) / np.max(np.abs(y_torch))
    assert err <= FORWARD_TOL, err
    # the twin's parameter tree is exactly what linen would initialise
    init = jax.eval_shape(tw.flax_model.init, jax.random.key(0), tw.x_jax)
    assert jax.tree.structure(init) == jax.tree.structure(tw.params)
    assert jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, init, tw.params)) == [True] * len(
        jax.tree.leaves(init)
    )


def test_torchvision_standin_only_when_needed():
    mod = sys.modules["torchvision"]
    if getattr(mod, zt.STANDIN_FLAG, False):
        from torchvision.models.resnet import BasicBlock, Bottleneck
        from torchvision.ops import FrozenBatchNorm2d

        for cls in (BasicBlock, Bottleneck, FrozenBatchNorm2d):
            assert issubclass(cls, torch.nn.Module)
    assert zt.install_torchvision_standin() == bool(getattr(mod, zt.STANDIN_FLAG, False))


# On the MLP (no convolution) several of Zennit's composites coincide: all dense layers get Epsilon, and the two
# Flat presets differ only on convolutions.
SAME_ON_MLP = [
    {"EpsilonPlus", "EpsilonGammaBox", "EpsilonAlpha2Beta1", "Epsilon"},
    {"EpsilonPlusFlat", "EpsilonAlpha2Beta1Flat"},
]


@pytest.mark.parametrize("kind", KINDS)
def test_cases_discriminate(kind):
    """Negative control: the models tell the rules apart, so a wrong rule assignment cannot pass at TOL."""
    same = SAME_ON_MLP if kind == "mlp" else []
    for i, a in enumerate(CASE_NAMES):
        for b in CASE_NAMES[i + 1:]:
            expect_same = any({a, b} <= group for group in same)
            for target in TARGETS:
                err = zt.max_rel_err(zennit_ref(kind, a, target), zennit_ref(kind, b, target))
                if expect_same:
                    assert err <= TOL, (a, b, target, err)
                else:
                    assert err > 100 * TOL, (a, b, target, err)


@pytest.mark.parametrize(("target", "path"), TARGET_PATHS)
@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_zennit_parity(kind, case, target, path, record_property):
    ref = zennit_ref(kind, case, target)
    rel = jax_relevance(kind, case, target, path)
    err = zt.max_rel_err(rel, ref)
    _RESULTS[(kind, case, target, path)] = err
    record_property("max_rel_err", err)
    assert err <= TOL, (
        f"{kind}/{case}/{target}/{path}: max|R_jax - R_zennit| / max|R_zennit| = {err:.3e} > {TOL:g} "
        f"(max|R_zennit| = {np.max(np.abs(ref)):.3e})"
    )
