"""Smoke test of the benchmark models (shapes only; the benchmarks themselves make no timing assertions)."""

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

_MODELS = Path(__file__).resolve().parent.parent / "benchmarks" / "models.py"


def _load_models():
    spec = importlib.util.spec_from_file_location("_benchmark_models", _MODELS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Flax modules are dataclasses, which look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


def test_small_vgg_forward_shape():
    models = _load_models()
    model = models.vgg16_small(num_classes=10)
    params, x = models.init(model, 0, batch=2, size=32)
    assert x.shape == (2, 32, 32, 3)
    out = jax.jit(model.apply)(params, x)
    assert out.shape == (2, 10)
    assert out.dtype == jnp.float32
    assert bool(jnp.isfinite(out).all())
    # VGG-16's structure: 13 convolutions and 3 dense layers.
    names = list(params["params"])
    assert sum(n.startswith("Conv_") for n in names) == 13
    assert sum(n.startswith("Dense_") for n in names) == 3


def _load(name: str, filename: str):
    path = _MODELS.parent / filename
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_small_resnet_forward_and_torch_twin():
    """ResNet-50's structure at base width 8: shapes, BatchNorm count, finite logits; the torch twin (if torch is
    installed) computes the same function from the same variables."""
    import numpy as np
    import pytest

    models = _load_models()
    model = models.resnet50_small(num_classes=10, num_filters=8)
    variables, x = models.init(model, 0, batch=2, size=32)
    out = jax.jit(model.apply)(variables, x)
    assert out.shape == (2, 10)
    assert bool(jnp.isfinite(out).all())
    params = variables["params"]
    blocks = [n for n in params if n.startswith("BottleneckResNetBlock_")]
    assert len(blocks) == 16
    assert sum("conv_proj" in params[b] for b in blocks) == 4
    n_bn = 1 + sum(3 + ("norm_proj" in params[b]) for b in blocks)
    assert n_bn == 53
    scales = np.concatenate([np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)
                             if jax.tree_util.keystr(p).endswith("['scale']")])
    assert (scales < 0).any() and (scales > 0).any()  # BatchNorm scales of both signs

    torch = pytest.importorskip("torch")
    tm = _load("_benchmark_torch_models", "torch_models.py")
    twin = tm.load_flax_variables(tm.TorchResNet50(width=8, num_classes=10), jax.tree_util.tree_map(np.asarray, variables))
    with torch.no_grad():
        out_t = twin(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(out_t, np.asarray(out), rtol=1e-4, atol=1e-4 * float(np.abs(out_t).max()))


def test_metrics_benchmark_times_the_loops_copies():
    # benchmarks/metrics.py bounds the loop by its "model passes only": the copies it evaluates must be the loop's.
    import numpy as np

    bench = _load("_benchmark_metrics", "metrics.py")
    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 1.0, size=(3, 4, 4, 1)).astype(np.float32)
    relevance = rng.normal(size=x.shape).astype(np.float32)
    relevance[0, 0, :] = 5.0  # four tied most relevant pixels: the lower indices go first
    w = rng.normal(size=(16, 5)).astype(np.float32)
    target = np.array([0, 3, 4])

    def forward(_, v):
        return np.asarray(v).reshape(v.shape[0], -1) @ w

    copies = bench.perturbed_copies(x, relevance, steps=4, per_step=3)  # a partial curve: 12 of 16 pixels
    scores = np.stack([forward(None, c)[np.arange(3), target] for c in copies], axis=1)
    np.testing.assert_array_equal(scores, bench.python_loop_curve(forward, None, x, relevance, target, 4, 3))
    # by hand: step 1 removes pixels 0, 1, 2 of sample 0 (tied with pixel 3, which goes in step 2)
    assert np.flatnonzero(copies[1, 0].ravel() == 0).tolist() == [0, 1, 2]
    assert np.flatnonzero(copies[2, 0].ravel() == 0)[:4].tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(copies[0], x)
    assert copies.shape == (5, 3, 4, 4, 1) and int((copies[4] == 0).sum()) == 3 * 12
