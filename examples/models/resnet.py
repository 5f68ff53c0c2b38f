"""ResNet-18 and ResNet-50 (He et al. 2016, "v1.5": stride in the 3x3 convolution) in Flax linen.

Written as in Flax's own ImageNet example (``flax/examples/imagenet/models.py``): ``ResNetBlock`` and
``BottleneckResNetBlock`` take ``conv``/``norm``/``act`` as module factories, convolutions are
``partial(nn.Conv, use_bias=False)``, BatchNorm is ``nn.BatchNorm(use_running_average=not train)``, a block whose
shape changes gets a 1x1 projection shortcut (``conv_proj``/``norm_proj``), the last BatchNorm of each block starts
at zero scale, and the head is a global average pool ``jnp.mean(x, axis=(1, 2))`` and a ``Dense``. ``num_filters``
is the width (64 in the paper). Two departures: no ``axis_name="batch"`` on BatchNorm (the example trains under
``pmap``; this file is used on one device), and ``small_inputs=True`` swaps the 7x7/2 stem and its max pool for a
3x3/1 stem, as CIFAR-sized ResNets do.

    model, variables = resnet.init(resnet.ResNet18(num_classes=10, num_filters=8), (2, 32, 32, 3), seed=0)
    logits = model.apply(variables, x, train=False)
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from .common import init_linen

ModuleDef = Any


class ResNetBlock(nn.Module):
    """ResNet block."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: Tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)

        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)

        return self.act(residual + y)


class BottleneckResNetBlock(nn.Module):
    """Bottleneck ResNet block."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: Tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (1, 1))(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3), self.strides)(y)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters * 4, (1, 1))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)

        if residual.shape != y.shape:
            residual = self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)

        return self.act(residual + y)


class ResNet(nn.Module):
    """ResNetV1.5."""

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    num_filters: int = 64
    dtype: Any = jnp.float32
    act: Callable = nn.relu
    conv: ModuleDef = nn.Conv
    small_inputs: bool = False

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = partial(self.conv, use_bias=False, dtype=self.dtype)
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)

        if self.small_inputs:
            x = conv(self.num_filters, (3, 3), name="conv_init")(x)
            x = norm(name="bn_init")(x)
            x = nn.relu(x)
        else:
            x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
            x = norm(name="bn_init")(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=self.act)(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        x = jnp.asarray(x, self.dtype)
        return x


ResNet18 = partial(ResNet, stage_sizes=[2, 2, 2, 2], block_cls=ResNetBlock)
ResNet34 = partial(ResNet, stage_sizes=[3, 4, 6, 3], block_cls=ResNetBlock)
ResNet50 = partial(ResNet, stage_sizes=[3, 4, 6, 3], block_cls=BottleneckResNetBlock)


def init(model: ResNet, input_shape=(1, 224, 224, 3), seed: int = 0):
    """Seeded variables ``{"params", "batch_stats"}`` (He-normal kernels, BatchNorm as if trained; see ``common``).

    Returns ``(model, variables)``. Apply with ``model.apply(variables, x, train=False)`` (the default ``train=True``
    uses batch statistics and needs ``mutable=["batch_stats"]``, as in Flax's example).
    """
    return model, init_linen(model, input_shape, seed=seed, dtype=model.dtype, train=False)
