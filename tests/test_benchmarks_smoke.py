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
