"""Benchmark models in Flax linen with random (seeded) weights: VGG-16 and ResNet-50.

VGG-16 (Simonyan & Zisserman 2015, configuration "D"): 13 3x3 convolutions with ReLU in five blocks, each block
closed by a 2x2 max pool, then a classifier of dense layers 4096-4096-1000 (ReLU between them). Inputs are NHWC.
The classifier's first layer takes the flattened last feature map, so its width follows the input size
(7x7x512 at 224x224, 2x2x512 at 64x64).

``vgg16()`` builds the real architecture; ``vgg16_small()`` the same shape of network with narrower layers, for
smoke tests. The weights are random (drawn with NumPy, see ``init``): He-normal kernels (the scale VGG was
trained with) and small random biases, so the activations neither vanish nor explode and the biases are not all
zero (LRP rules treat biases specially).

ResNet-50 (He et al. 2016; Bottleneck "v1.5": the stride sits on the 3x3 convolution, as in torchvision) follows
Flax's ImageNet example (``flax/examples/imagenet/models.py``: ``BottleneckResNetBlock`` with ``conv_proj`` /
``norm_proj`` shortcuts, ``act(residual + y)``, ``jnp.mean`` pooling, bias-free convolutions each followed by
``nn.BatchNorm``), inference only (running statistics). Two deliberate differences from the example, so that a
plain torch twin (``benchmarks/torch_models.py``) is the same function: the stride-2 3x3 convolutions and the
stem's 3x3 max pool pad symmetrically by 1 (torch's ``padding=1``; ``'SAME'`` would pad (0, 1)). ``init`` gives
the BatchNorms random running statistics and affine parameters (about a quarter of the scales negative).

``LSTMClassifier`` is a one-layer LSTM over a sequence of feature vectors ``[batch, time, features]`` (linen
``nn.RNN`` over ``nn.OptimizedLSTMCell``, i.e. a ``lax.scan`` over time), then a dense head on the last hidden state;
``init_sequence`` draws its parameters and a random input with NumPy.

    >>> import jax
    >>> model = vgg16_small()
    >>> params, x = init(model, 0, batch=2, size=32)
    >>> model.apply(params, x).shape
    (2, 10)
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

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


# ---- ResNet-50 (Flax ImageNet example style, inference) -------------------------------------------------------

RESNET50_STAGES = (3, 4, 6, 3)
BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default; the Flax ImageNet example uses the same
BN_MOMENTUM = 0.9

ModuleDef = Any


class BottleneckResNetBlock(nn.Module):
    """Bottleneck v1.5: 1x1 -> 3x3 (strided) -> 1x1 (x4 channels), BatchNorm after each, projection shortcut."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (1, 1))(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3), self.strides, padding=((1, 1), (1, 1)))(y)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters * 4, (1, 1))(y)
        y = self.norm()(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class ResNet(nn.Module):
    """ResNet (v1.5 bottlenecks) for NHWC inputs. ``train=False`` (the default, and all the benchmarks use):
    BatchNorm uses its running statistics; ``train=True`` only serves ``init``'s calibration pass."""

    stage_sizes: Sequence[int] = RESNET50_STAGES
    block_cls: ModuleDef = BottleneckResNetBlock
    num_classes: int = 1000
    num_filters: int = 64
    dtype: Any = jnp.float32
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = partial(nn.Conv, use_bias=False, padding="VALID", dtype=self.dtype,
                       kernel_init=_kernel_init)
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                       dtype=self.dtype)
        x = conv(self.num_filters, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="conv_init")(x)
        x = norm(name="bn_init")(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=self.act)(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_kernel_init, bias_init=_bias_init)(x)
        return jnp.asarray(x, self.dtype)


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50: stem conv7x7/2 + BN + ReLU + maxpool3x3/2, 3-4-6-3 bottlenecks (width 64), mean pool, dense."""
    return ResNet(stage_sizes=RESNET50_STAGES, num_filters=64, num_classes=num_classes)


def resnet50_small(num_classes: int = 10, num_filters: int = 8) -> ResNet:
    """ResNet-50's depth and block structure with base width ``num_filters`` (for smoke tests)."""
    return ResNet(stage_sizes=RESNET50_STAGES, num_filters=num_filters, num_classes=num_classes)


def init(model: nn.Module, key: jax.Array | int, *, batch: int, size: int, dtype=jnp.float32):
    """Random parameters and a random input batch ``[batch, size, size, 3]`` (NHWC) for ``model``.

    The variables follow the shapes of ``model.init`` but are drawn with NumPy from ``key`` (an int seed or a JAX
    key): kernels He-normal (std ``sqrt(2 / fan_in)``), biases normal with std 0.01. Compiling ``model.init``
    itself takes 10-20 s on a small CPU (the threefry and truncated-normal ops of every layer), which a
    benchmark or a smoke test need not pay. ``size`` must be divisible by 32 (five 2x2 pools or stride-2 stages).

    BatchNorm variables (ResNet): ``scale`` is ``+-U(0.5, 1.5)`` with about a quarter of the channels negative,
    ``bias`` ``N(0, 0.1)``. The running statistics are random but of the right size: those of one train-mode pass
    over a random calibration batch (``calibrate_batchnorm``), then perturbed (mean ``+ 0.1 N(0, var)``, var
    ``x U(0.5, 2)``), so the activations stay of order one through 50 layers instead of growing block by block.
    """
    if size % 32:
        raise ValueError(f"size must be a multiple of 32 (five 2x2 pools or stride-2 stages), got {size}")
    seed = key if isinstance(key, int) else int(jax.random.randint(key, (), 0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, size, size, 3)), dtype)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), dtype))

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        is_bn = _is_norm_path(path)
        if "kernel" in name:
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)
        elif is_bn and "scale" in name:
            sign = np.where(rng.random(leaf.shape) < 0.25, -1.0, 1.0)
            value = sign * rng.uniform(0.5, 1.5, leaf.shape)
        elif is_bn and "mean" in name:
            value = rng.standard_normal(leaf.shape) * 0.1
        elif is_bn and "var" in name:
            value = rng.uniform(0.5, 2.0, leaf.shape)
        elif is_bn and "bias" in name:
            value = rng.standard_normal(leaf.shape) * 0.1
        else:
            value = rng.standard_normal(leaf.shape) * 0.01
        return jnp.asarray(value, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    if "batch_stats" in params:
        params = calibrate_batchnorm(model, params, rng, size=min(size, 64), dtype=dtype)
    return params, x


def calibrate_batchnorm(model: nn.Module, variables, rng: np.random.Generator, *, batch: int = 4, size: int = 64,
                        dtype=jnp.float32):
    """Running statistics from one train-mode pass over a random batch, then randomly perturbed (see ``init``).

    The model must take ``train=True`` and use BatchNorm with momentum ``BN_MOMENTUM``.
    """
    x = jnp.asarray(rng.standard_normal((batch, size, size, 3)), dtype)
    _, updated = jax.jit(partial(model.apply, train=True, mutable=["batch_stats"]))(variables, x)
    old = variables["batch_stats"]

    def batch_value(new, previous):  # undo the moving average: new = m * previous + (1 - m) * batch
        return (np.asarray(new, np.float64) - BN_MOMENTUM * np.asarray(previous, np.float64)) / (1 - BN_MOMENTUM)

    stats = jax.tree_util.tree_map(batch_value, updated["batch_stats"], old)

    def perturb(path, value):
        if "mean" in jax.tree_util.keystr(path[-1:]):
            var = np.maximum(_get(stats, path[:-1])["var"], 0.0)
            out = value + 0.1 * rng.standard_normal(value.shape) * np.sqrt(var)
        else:
            out = np.maximum(value, 1e-3) * rng.uniform(0.5, 2.0, value.shape)
        return jnp.asarray(out, dtype)

    return {**variables, "batch_stats": jax.tree_util.tree_map_with_path(perturb, stats)}


def _get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def _is_norm_path(path) -> bool:
    """Whether a parameter path belongs to a BatchNorm module (linen names: ``BatchNorm_*``, ``bn_*``, ``norm_*``)."""
    parent = jax.tree_util.keystr(path[-2:-1])
    return any(tag in parent for tag in ("BatchNorm", "bn_", "norm_"))


# ---- LSTM classifier (a lax.scan over time) -------------------------------------------------------------------

class LSTMClassifier(nn.Module):
    """``nn.RNN(nn.OptimizedLSTMCell(hidden))`` over ``[batch, time, features]``, a dense head on the last output."""

    hidden: int = 256
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.RNN(nn.OptimizedLSTMCell(self.hidden, name="cell"), name="lstm")(x)
        return nn.Dense(self.num_classes, name="head")(y[:, -1])


def lstm(hidden: int = 256, num_classes: int = 10) -> LSTMClassifier:
    """The LSTM classifier of the benchmarks (hidden width 256, 10 classes by default)."""
    return LSTMClassifier(hidden=hidden, num_classes=num_classes)


def init_sequence(model: nn.Module, seed: int, *, batch: int, length: int, features: int, dtype=jnp.float32):
    """Random parameters and a random input ``[batch, length, features]`` (standard normal) for a sequence model.

    Drawn with NumPy from ``seed`` in the shapes of ``model.init`` (an eager ``nn.RNN`` init compiles its own scan):
    kernels normal with std ``sqrt(1 / fan_in)`` (tanh and sigmoid units, not ReLU), biases normal with std 0.1.
    """
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, length, features)), dtype)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, length, features), dtype))

    def draw(path, leaf):
        if "kernel" in jax.tree_util.keystr(path[-1:]):
            value = rng.standard_normal(leaf.shape) / np.sqrt(int(np.prod(leaf.shape[:-1])))
        else:
            value = rng.standard_normal(leaf.shape) * 0.1
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes), x
