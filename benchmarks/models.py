"""Benchmark models: VGG-16 in Flax linen with random (seeded) weights.

VGG-16 (Simonyan & Zisserman 2015, configuration "D"): 13 3x3 convolutions with ReLU in five blocks, each block
closed by a 2x2 max pool, then a classifier of dense layers 4096-4096-1000 (ReLU between them). Inputs are NHWC.
The classifier's first layer takes the flattened last feature map, so its width follows the input size
(7x7x512 at 224x224, 2x2x512 at 64x64).

``vgg16()`` builds the real architecture; ``vgg16_small()`` the same shape of network with narrower layers, for
smoke tests. The weights are random (drawn with NumPy, see ``init``): He-normal kernels (the scale VGG was
trained with) and small random biases, so the activations neither vanish nor explode and the biases are not all
zero (LRP rules treat biases specially).

    >>> import jax
    >>> model = vgg16_small()
    >>> params, x = init(model, 0, batch=2, size=32)
    >>> model.apply(params, x).shape
    (2, 10)
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# "M" is a 2x2 max pool with stride 2; integers are the output channels of a 3x3 convolution (padding SAME).
VGG16_FEATURES: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
)

# The same scales for `model.init`; `init` below draws with NumPy instead (much faster to set up).
_kernel_init = nn.initializers.he_normal()
_bias_init = nn.initializers.normal(stddev=0.01)


class VGG(nn.Module):
    """A VGG-style network: ``features`` (conv widths and "M" pools), then ReLU dense layers, then the logits."""

    features: Sequence[int | str] = VGG16_FEATURES
    hidden: Sequence[int] = (4096, 4096)
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for spec in self.features:
            if spec == "M":
                x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
            else:
                x = nn.Conv(int(spec), kernel_size=(3, 3), padding="SAME",
                            kernel_init=_kernel_init, bias_init=_bias_init)(x)
                x = nn.relu(x)
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.Dense(width, kernel_init=_kernel_init, bias_init=_bias_init)(x)
            x = nn.relu(x)
        return nn.Dense(self.num_classes, kernel_init=_kernel_init, bias_init=_bias_init)(x)


def vgg16(num_classes: int = 1000) -> VGG:
    """VGG-16: 13 convolutions, 5 max pools, dense 4096-4096-``num_classes``."""
    return VGG(features=VGG16_FEATURES, hidden=(4096, 4096), num_classes=num_classes)


def vgg16_small(num_classes: int = 10, width_divisor: int = 16, hidden: int = 64) -> VGG:
    """VGG-16's layer structure with every conv width divided by ``width_divisor`` and narrow dense layers."""
    features = tuple(s if s == "M" else max(1, int(s) // width_divisor) for s in VGG16_FEATURES)
    return VGG(features=features, hidden=(hidden, hidden), num_classes=num_classes)


def init(model: VGG, key: jax.Array | int, *, batch: int, size: int, dtype=jnp.float32):
    """Random parameters and a random input batch ``[batch, size, size, 3]`` (NHWC) for ``model``.

    The parameters follow the shapes of ``model.init`` but are drawn with NumPy from ``key`` (an int seed or a JAX
    key): kernels He-normal (std ``sqrt(2 / fan_in)``), biases normal with std 0.01. Compiling ``model.init``
    itself takes 10-20 s on a small CPU (the threefry and truncated-normal ops of every layer), which a
    benchmark or a smoke test need not pay. ``size`` must be divisible by 32 (five 2x2 pools).
    """
    if size % 32:
        raise ValueError(f"size must be a multiple of 32 for VGG's five 2x2 max pools, got {size}")
    seed = key if isinstance(key, int) else int(jax.random.randint(key, (), 0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, size, size, 3)), dtype)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), dtype))

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "kernel" in name:
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)
        else:
            value = rng.standard_normal(leaf.shape) * 0.01
        return jnp.asarray(value, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    return params, x
