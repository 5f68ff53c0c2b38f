"""A ResNet basic block and a tiny classifier in Equinox.

Written as Equinox users write it: channel-first unbatched modules (``eqx.nn.Conv2d`` on ``[C, H, W]``), the
stateful ``eqx.nn.BatchNorm`` whose running statistics live in an ``eqx.nn.State`` (built with
``eqx.nn.make_with_state``), ``jax.vmap`` over the batch with ``axis_name="batch"``, and
``eqx.nn.inference_mode`` for evaluation::

    model, state = eqx_resnet.tiny_resnet(3, num_classes=10, width=8, seed=0)   # already in inference mode
    params, static = eqx.partition(model, eqx.is_array)
    def f(params, state, x):                                              # x: [B, C, H, W]
        model = eqx.combine(params, static)
        logits, _ = jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(x, state)
        return logits
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .common import BIAS_STD, BN_STD, he_normal


class BasicBlock(eqx.Module):
    conv1: eqx.nn.Conv2d
    bn1: eqx.nn.BatchNorm
    conv2: eqx.nn.Conv2d
    bn2: eqx.nn.BatchNorm
    shortcut: eqx.nn.Sequential | None

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, use_bias=False, key=k1)
        self.bn1 = eqx.nn.BatchNorm(out_channels, axis_name="batch", mode="batch")
        self.conv2 = eqx.nn.Conv2d(out_channels, out_channels, 3, padding=1, use_bias=False, key=k2)
        self.bn2 = eqx.nn.BatchNorm(out_channels, axis_name="batch", mode="batch")
        if stride != 1 or in_channels != out_channels:
            self.shortcut = eqx.nn.Sequential(
                [
                    eqx.nn.Conv2d(in_channels, out_channels, 1, stride=stride, use_bias=False, key=k3),
                    eqx.nn.BatchNorm(out_channels, axis_name="batch", mode="batch"),
                ]
            )
        else:
            self.shortcut = None

    def __call__(self, x, state):
        if self.shortcut is None:
            identity = x
        else:
            identity, state = self.shortcut(x, state)
        y = self.conv1(x)
        y, state = self.bn1(y, state)
        y = jax.nn.relu(y)
        y = self.conv2(y)
        y, state = self.bn2(y, state)
        return jax.nn.relu(y + identity), state


class TinyResNet(eqx.Module):
    stem: eqx.nn.Conv2d
    bn: eqx.nn.BatchNorm
    layer1: BasicBlock
    layer2: BasicBlock
    fc: eqx.nn.Linear

    def __init__(self, in_channels: int = 3, *, num_classes: int = 10, width: int = 16, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.stem = eqx.nn.Conv2d(in_channels, width, 3, padding=1, use_bias=False, key=k1)
        self.bn = eqx.nn.BatchNorm(width, axis_name="batch", mode="batch")
        self.layer1 = BasicBlock(width, width, key=k2)
        self.layer2 = BasicBlock(width, 2 * width, stride=2, key=k3)
        self.fc = eqx.nn.Linear(2 * width, num_classes, key=k4)

    def __call__(self, x, state):  # x: [C, H, W]
        x = self.stem(x)
        x, state = self.bn(x, state)
        x = jax.nn.relu(x)
        x, state = self.layer1(x, state)
        x, state = self.layer2(x, state)
        x = jnp.mean(x, axis=(1, 2))
        return self.fc(x), state


def init(model: eqx.Module, state: eqx.nn.State, seed: int = 0, bias_std: float = BIAS_STD, bn_std: float = BN_STD):
    """Seeded weights drawn with NumPy (see ``common``: He-normal kernels, BatchNorm as if trained) and inference
    mode (``eqx.nn.inference_mode``). Works on a model and state built under ``eqx.filter_eval_shape`` too: every
    array is replaced. Returns ``(model, state)``."""
    rng = np.random.default_rng(seed)
    is_layer = lambda m: isinstance(m, (eqx.nn.Conv, eqx.nn.Linear, eqx.nn.BatchNorm))  # noqa: E731

    def draw(m):
        if isinstance(m, (eqx.nn.Conv, eqx.nn.Linear)):
            shape = m.weight.shape  # (out, in, *window) / (out, in)
            new = [jnp.asarray(he_normal(rng, shape, int(np.prod(shape[1:]))))]
            if m.bias is not None:
                new.append(jnp.asarray(rng.normal(0.0, bias_std, m.bias.shape), jnp.float32))
            return eqx.tree_at(lambda l: (l.weight, l.bias) if l.bias is not None else (l.weight,), m, tuple(new))
        if isinstance(m, eqx.nn.BatchNorm):
            n = m.input_size
            weight = jnp.asarray(1.0 + rng.normal(0.0, bn_std, n), jnp.float32)
            bias = jnp.asarray(rng.normal(0.0, bn_std, n), jnp.float32)
            return eqx.tree_at(lambda l: (l.weight, l.bias), m, (weight, bias))
        return m

    model = jax.tree.map(draw, model, is_leaf=is_layer)
    for bn in (m for m in jax.tree.leaves(model, is_leaf=is_layer) if isinstance(m, eqx.nn.BatchNorm)):
        n = bn.input_size
        mean = jnp.asarray(rng.normal(0.0, bn_std, n), jnp.float32)
        var = jnp.asarray(np.exp(rng.normal(0.0, bn_std, n)), jnp.float32)
        # mode="batch" keeps (hidden mean, hidden variance) and a batch counter; with the counter at 0 (never
        # trained here) inference uses the hidden statistics as they are.
        state = state.set(bn.batch_state_index, (mean, var))
        state = state.set(bn.batch_counter, jnp.array(0))
    return eqx.nn.inference_mode(model), state


def tiny_resnet(in_channels: int = 3, num_classes: int = 10, width: int = 16, seed: int = 0):
    """A seeded ``TinyResNet`` in inference mode and its BatchNorm state: ``(model, state)`` (built under
    ``eqx.filter_eval_shape``: no initialisers are run)."""
    model, state = eqx.filter_eval_shape(
        eqx.nn.make_with_state(TinyResNet), in_channels, num_classes=num_classes, width=width, key=jax.random.key(0)
    )
    return init(model, state, seed=seed)


def apply(model: TinyResNet, state: eqx.nn.State, x):
    """Batched logits for ``x: [B, C, H, W]`` (the state is not updated in inference mode)."""
    logits, _ = jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(x, state)
    return logits
