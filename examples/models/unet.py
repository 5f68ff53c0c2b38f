"""A small U-Net (Ronneberger et al. 2015) in Flax linen.

Written the way U-Nets usually are: a ``DoubleConv`` block (conv-BN-ReLU twice), an encoder of blocks separated by
2x2 max pooling, a decoder that upsamples (``nn.ConvTranspose`` with stride 2, or ``jax.image.resize`` + conv),
concatenates the encoder's skip connection on the channel axis and applies another block. Two heads:

- ``head="segment"``: a 1x1 convolution, per-pixel class scores ``[B, H, W, num_classes]``;
- ``head="classify"``: global average pooling of the last decoder block and a ``Dense``, ``[B, num_classes]``.

    model, variables = unet.init(unet.UNet(num_classes=3, features=(8, 16, 32)), (2, 32, 32, 1), seed=0)
    scores = model.apply(variables, x)
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import init_linen


class DoubleConv(nn.Module):
    features: int
    train: bool = False

    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not self.train)(x)
            x = nn.relu(x)
        return x


class Up(nn.Module):
    features: int
    mode: str = "transpose"  # "transpose" (learned) or "bilinear" / "nearest" (jax.image.resize, then a 1x1 conv)
    train: bool = False

    @nn.compact
    def __call__(self, x, skip):
        if self.mode == "transpose":
            x = nn.ConvTranspose(self.features, (2, 2), strides=(2, 2))(x)
        else:
            b, h, w, c = x.shape
            x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method=self.mode)
            x = nn.Conv(self.features, (1, 1))(x)
        x = jnp.concatenate([x, skip], axis=-1)
        return DoubleConv(self.features, train=self.train)(x)


class UNet(nn.Module):
    num_classes: int = 2
    features: Sequence[int] = (16, 32, 64, 128)
    up_mode: str = "transpose"
    head: str = "segment"  # or "classify"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        skips = []
        for f in self.features[:-1]:
            x = DoubleConv(f, train=train)(x)
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = DoubleConv(self.features[-1], train=train)(x)  # bottleneck
        for f, skip in zip(reversed(self.features[:-1]), reversed(skips)):
            x = Up(f, mode=self.up_mode, train=train)(x, skip)
        if self.head == "segment":
            return nn.Conv(self.num_classes, (1, 1), name="head")(x)
        if self.head == "classify":
            x = jnp.mean(x, axis=(1, 2))
            return nn.Dense(self.num_classes, name="head")(x)
        raise ValueError(f"head must be 'segment' or 'classify', got {self.head!r}")


def init(model: UNet, input_shape=(1, 64, 64, 1), seed: int = 0):
    """Seeded variables (He-normal kernels, BatchNorm as if trained; see ``common``). Returns ``(model, variables)``;
    ``model.apply(variables, x)`` is inference (``train=False``)."""
    return model, init_linen(model, input_shape, seed=seed, dtype=model.dtype, train=False)
