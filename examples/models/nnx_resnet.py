"""A ResNet basic block and a tiny classifier in Flax nnx.

Written as nnx users write it: modules hold their layers as attributes, ``nnx.BatchNorm`` switches to the running
statistics with ``model.eval()``, and the model is split into a graph definition and a state for functional use::

    model = nnx_resnet.init(nnx_resnet.TinyResNet(3, num_classes=10, width=8, rngs=nnx.Rngs(0)), seed=0)
    graphdef, state = nnx.split(model)
    f = lambda state, x: nnx.merge(graphdef, state)(x)     # pass `state` to jaxlrp.lrp as an argument
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .common import BIAS_STD, BN_STD, he_normal


class BasicBlock(nnx.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut (a 1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, in_features: int, out_features: int, *, strides: int = 1, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_features, out_features, (3, 3), strides=strides, padding=1, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(out_features, rngs=rngs)
        self.conv2 = nnx.Conv(out_features, out_features, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(out_features, rngs=rngs)
        if strides != 1 or in_features != out_features:
            self.shortcut = nnx.Sequential(
                nnx.Conv(in_features, out_features, (1, 1), strides=strides, use_bias=False, rngs=rngs),
                nnx.BatchNorm(out_features, rngs=rngs),
            )
        else:
            self.shortcut = None

    def __call__(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return nnx.relu(y + identity)


class TinyResNet(nnx.Module):
    """Stem (conv-BN-ReLU), two basic blocks (the second downsamples), global average pooling, a linear head."""

    def __init__(self, in_features: int = 3, *, num_classes: int = 10, width: int = 16, rngs: nnx.Rngs):
        self.stem = nnx.Conv(in_features, width, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.layer1 = BasicBlock(width, width, rngs=rngs)
        self.layer2 = BasicBlock(width, 2 * width, strides=2, rngs=rngs)
        self.fc = nnx.Linear(2 * width, num_classes, rngs=rngs)

    def __call__(self, x):  # x: [B, H, W, C]
        x = nnx.relu(self.bn(self.stem(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.fc(x)


def init(model: nnx.Module, seed: int = 0, bias_std: float = BIAS_STD, bn_std: float = BN_STD) -> nnx.Module:
    """Seeded weights drawn with NumPy (see ``common``: He-normal kernels, BatchNorm as if trained), set in place,
    and inference mode (``model.eval()``). Works on a model built under ``nnx.eval_shape`` too. Returns the model."""
    rng = np.random.default_rng(seed)
    for _, module in nnx.iter_graph(model):
        if isinstance(module, (nnx.Conv, nnx.Linear)):
            shape = module.kernel.shape
            module.kernel.set_value(jnp.asarray(he_normal(rng, shape, int(np.prod(shape[:-1])))))
            if module.bias is not None:
                module.bias.set_value(jnp.asarray(rng.normal(0.0, bias_std, module.bias.shape), jnp.float32))
        elif isinstance(module, nnx.BatchNorm):
            shape = module.mean.shape
            module.mean.set_value(jnp.asarray(rng.normal(0.0, bn_std, shape), jnp.float32))
            module.var.set_value(jnp.asarray(np.exp(rng.normal(0.0, bn_std, shape)), jnp.float32))
            module.scale.set_value(jnp.asarray(1.0 + rng.normal(0.0, bn_std, shape), jnp.float32))
            module.bias.set_value(jnp.asarray(rng.normal(0.0, bn_std, shape), jnp.float32))
    model.eval()
    return model


def tiny_resnet(in_features: int = 3, num_classes: int = 10, width: int = 16, seed: int = 0) -> TinyResNet:
    """A seeded ``TinyResNet`` in inference mode (built under ``nnx.eval_shape``: no initialisers are run)."""
    model = nnx.eval_shape(lambda: TinyResNet(in_features, num_classes=num_classes, width=width, rngs=nnx.Rngs(0)))
    return init(model, seed=seed)
