"""Seeded weights "as if trained" for the example models, drawn with NumPy.

Drawing the weights on the host (on the shapes ``jax.eval_shape`` reports) is much faster than compiling a model's
own initialisers (on CPU, XLA takes seconds to compile the random-number kernels of a ResNet's ``init``) and gives
the same numbers on every JAX version and device. The distributions:

- kernels / weights: He normal, ``N(0, 2 / fan_in)`` (as torchvision initialises VGG and ResNet convolutions);
- biases of convolutions and dense layers: ``N(0, bias_std)``;
- BatchNorm: running mean ``N(0, bn_std)``, running variance ``exp(N(0, bn_std))``, scale ``1 + N(0, bn_std)``,
  offset ``N(0, bn_std)``, so that no BatchNorm is the identity (a fresh one is; ResNets even start the last
  BatchNorm of a block at scale zero).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BIAS_STD = 0.05
BN_STD = 0.1


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def he_normal(rng: np.random.Generator, shape, fan_in: int, dtype=np.float32) -> np.ndarray:
    return rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), shape).astype(dtype)


def fill_linen(shapes, seed: int = 0, bias_std: float = BIAS_STD, bn_std: float = BN_STD):
    """Seeded linen variables for the tree of ``jax.ShapeDtypeStruct`` that ``jax.eval_shape(model.init, ...)``
    returns: ``{"params": ..., "batch_stats": ...}``. Modules with ``batch_stats`` are BatchNorms."""
    rng = np.random.default_rng(seed)
    bn_modules = {_keys(p)[:-1] for p, _ in jax.tree_util.tree_flatten_with_path(shapes.get("batch_stats", {}))[0]}

    def draw(path, s):
        keys = _keys(path)
        collection, module, name = keys[0], keys[1:-1], keys[-1]
        shape, dtype = s.shape, s.dtype
        if module in bn_modules:
            value = {
                "mean": lambda: rng.normal(0.0, bn_std, shape),
                "var": lambda: np.exp(rng.normal(0.0, bn_std, shape)),
                "scale": lambda: 1.0 + rng.normal(0.0, bn_std, shape),
                "bias": lambda: rng.normal(0.0, bn_std, shape),
            }[name]()
        elif name == "kernel":  # Dense (in, out), Conv / ConvTranspose (*window, in, out)
            value = he_normal(rng, shape, int(np.prod(shape[:-1])))
        elif name == "bias":
            value = rng.normal(0.0, bias_std, shape)
        else:
            raise ValueError(f"don't know how to initialise {collection}/{'/'.join(module)}/{name}")
        return jnp.asarray(value, dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def init_linen(model, input_shape, seed: int = 0, dtype=jnp.float32, **kwargs):
    """Seeded variables for a linen ``model`` applied to ``jnp.zeros(input_shape)`` (``kwargs`` go to ``init``,
    e.g. ``train=False``)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape, dtype), **kwargs))
    return fill_linen(shapes, seed=seed)
