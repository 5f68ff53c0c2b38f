"""VGG-16 and VGG-16-BN in Flax linen (Simonyan & Zisserman 2015; torchvision's configuration "D").

Written like the common linen ports of torchvision's VGG: a configuration list of channel counts and ``"M"``
(2x2 max pooling), 3x3 convolutions with padding 1, optional BatchNorm after each convolution, then a
three-layer classifier with dropout. ``width`` scales every channel count (``1.0`` is the original network).
torchvision's ``AdaptiveAvgPool2d((7, 7))`` is left out: the classifier takes the flattened last feature map,
whatever its size (1x1 for 32x32 inputs, 7x7 for 224x224).

    model, variables = vgg.init(vgg.vgg16_bn(num_classes=10, width=0.125), (2, 32, 32, 3), seed=0)
    logits = model.apply(variables, x)            # inference: BatchNorm uses the running statistics
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from .common import init_linen

# torchvision's cfgs["D"].
VGG16_CFG: tuple[Any, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    cfg: Sequence[Any] = VGG16_CFG
    num_classes: int = 1000
    width: float = 1.0
    batch_norm: bool = False
    hidden: int = 4096  # classifier width (scaled by ``width`` too)
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for v in self.cfg:
            if v == "M":
                x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
            else:
                x = nn.Conv(max(1, int(v * self.width)), kernel_size=(3, 3), padding=1, dtype=self.dtype)(x)
                if self.batch_norm:
                    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)(x)
                x = nn.relu(x)
        x = x.reshape((x.shape[0], -1))
        hidden = max(1, int(self.hidden * self.width))
        x = nn.Dense(hidden, dtype=self.dtype)(x)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(hidden, dtype=self.dtype)(x)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return x


def vgg16(num_classes: int = 1000, width: float = 1.0, **kwargs) -> VGG:
    return VGG(cfg=VGG16_CFG, num_classes=num_classes, width=width, batch_norm=False, **kwargs)


def vgg16_bn(num_classes: int = 1000, width: float = 1.0, **kwargs) -> VGG:
    return VGG(cfg=VGG16_CFG, num_classes=num_classes, width=width, batch_norm=True, **kwargs)


def init(model: VGG, input_shape=(1, 224, 224, 3), seed: int = 0):
    """Seeded variables (He-normal kernels, small random biases, BatchNorm as if trained; see ``common``).

    Returns ``(model, variables)``; ``model.apply(variables, x)`` is inference (``train=False``).
    """
    return model, init_linen(model, input_shape, seed=seed, dtype=model.dtype, train=False)
