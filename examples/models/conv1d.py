"""A dilated 1D convolutional network for sequences, e.g. one-hot DNA ``[B, L, 4]`` (Basset / Basenji style).

A wide first convolution (motif detectors) with BatchNorm and ReLU, then a tower of dilated convolutions (dilation
doubling per layer, BatchNorm, ReLU) with residual connections, global max or mean pooling over the sequence and
a dense head with one output per task (e.g. binding of a transcription factor).

    model, variables = conv1d.init(conv1d.SeqCNN(num_tasks=2, features=16), (2, 100, 4), seed=0)
    scores = model.apply(variables, one_hot_dna)      # [B, num_tasks]
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from .common import init_linen


class DilatedBlock(nn.Module):
    features: int
    dilation: int
    train: bool = False

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(self.features, (3,), kernel_dilation=(self.dilation,), padding="SAME", use_bias=False)(x)
        y = nn.BatchNorm(use_running_average=not self.train)(y)
        y = nn.relu(y)
        return x + y


class SeqCNN(nn.Module):
    num_tasks: int = 1
    features: int = 64
    motif_width: int = 15
    num_dilated: int = 3
    pool: str = "max"  # "max" (jnp.max over the sequence) or "mean"
    hidden: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):  # x: [B, L, 4]
        x = nn.Conv(self.features, (self.motif_width,), padding="SAME", use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (2,), strides=(2,))
        for i in range(self.num_dilated):
            x = DilatedBlock(self.features, dilation=2 ** (i + 1), train=train)(x)
        if self.pool == "max":
            x = jnp.max(x, axis=1)
        elif self.pool == "mean":
            x = jnp.mean(x, axis=1)
        else:
            raise ValueError(f"pool must be 'max' or 'mean', got {self.pool!r}")
        x = nn.Dense(self.hidden)(x)
        x = nn.relu(x)
        return nn.Dense(self.num_tasks)(x)


def random_dna(seed, batch: int, length: int) -> np.ndarray:
    """Uniformly random one-hot DNA ``[batch, length, 4]`` (float32; channels A, C, G, T)."""
    rng = np.random.default_rng(seed)
    return np.eye(4, dtype=np.float32)[rng.integers(0, 4, (batch, length))]


def init(model: SeqCNN, input_shape=(1, 200, 4), seed: int = 0):
    """Seeded variables (He-normal kernels, BatchNorm as if trained; see ``common``). Returns ``(model, variables)``;
    ``model.apply(variables, x)`` is inference (``train=False``)."""
    return model, init_linen(model, input_shape, seed=seed, dtype=model.dtype, train=False)
