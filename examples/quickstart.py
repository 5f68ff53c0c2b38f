"""Quickstart: train a small CNN on scikit-learn's 8x8 digits, then explain it with two LRP composites.

Run from the repository root (after ``pip install -e ".[examples]"``)::

    python examples/quickstart.py                # writes out/quickstart.png
    python examples/quickstart.py --out my.png   # somewhere else
    python examples/quickstart.py --readme       # also refreshes docs/images/quickstart.png

Takes a few seconds on a laptop CPU. The picture has one row per test digit, two digits per line:
digit | EpsilonPlusFlat | EpsilonGammaBox, red for positive relevance, blue for negative, white for zero.
"""

import argparse
import shutil
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxlrp
from jaxlrp import image

README_IMAGE = Path("docs/images/quickstart.png")


class CNN(nn.Module):
    """Two 3x3 convolutions with ReLU, 2x2 average pooling, and a two-layer dense head."""

    @nn.compact
    def __call__(self, x):  # x: [B, 8, 8, 1] in [0, 1]
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


def load_data(seed):
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # NHWC, [0, 1]
    return train_test_split(x, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)


def train(model, x_train, y_train, *, seed, epochs=30, batch_size=64):
    params = model.init(jax.random.key(seed), x_train[:1])
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(params):
            logits = model.apply(params, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    n_batches = len(x_train) // batch_size  # drop the ragged last batch: one compiled shape
    for _ in range(epochs):
        order = rng.permutation(len(x_train))
        for i in range(n_batches):
            idx = order[i * batch_size : (i + 1) * batch_size]
            params, opt_state, _ = step(params, opt_state, x_train[idx], y_train[idx])
    return params


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/quickstart.png"), help="where to write the PNG")
    parser.add_argument("--readme", action="store_true", help=f"also copy the PNG to {README_IMAGE}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    x_train, x_test, y_train, y_test = load_data(args.seed)
    model = CNN()
    params = train(model, x_train, y_train, seed=args.seed)
    accuracy = float((jnp.argmax(model.apply(params, x_test), -1) == y_test).mean())
    print(f"trained in {time.perf_counter() - start:.1f} s; test accuracy {accuracy:.1%} ({len(x_test)} digits)")

    # Explain the predicted class of 16 test digits. EpsilonGammaBox's bounds are the input range [0, 1].
    x = x_test[:16]
    pred = jnp.argmax(model.apply(params, x), -1)
    composites = {
        "EpsilonPlusFlat": jaxlrp.EpsilonPlusFlat(),
        "EpsilonGammaBox": jaxlrp.EpsilonGammaBox(low=0.0, high=1.0),
    }
    heatmaps = {}
    for name, composite in composites.items():
        res = jaxlrp.attribute(model.apply, x, composite, target=pred, params=params)
        relevance = np.asarray(res.relevance)  # [16, 8, 8, 1], like x
        score = np.asarray(res.output)[np.arange(len(x)), np.asarray(res.target)]
        ratio = relevance.sum(axis=(1, 2, 3)) / score  # conservation: 1 up to what biases absorb
        print(
            f"{name:16s} relevance sum / score: mean {ratio.mean():.3f} (min {ratio.min():.3f}, max {ratio.max():.3f})"
            f"; positive share {(relevance > 0).sum() / (relevance != 0).sum():.0%}"
        )
        heatmaps[name] = image.heatmap(relevance)  # [16, 8, 8, 3], bwr centred at zero, scaled per digit

    # Tiles: the digit (dark ink on white, like the heatmaps' zero), then one heatmap per composite.
    digits = 1.0 - x
    tiles = [t for i in range(len(x)) for t in (digits[i], *(h[i] for h in heatmaps.values()))]
    ncols = 1 + len(heatmaps)
    half = len(x) // 2 * ncols  # two digits per line keeps the picture compact
    left = image.grid(tiles[:half], ncols, pad=2, pad_value=0.7, scale=10)
    right = image.grid(tiles[half:], ncols, pad=2, pad_value=0.7, scale=10)
    spacer = np.ones((left.shape[0], 12, 3), np.float32)
    canvas = np.concatenate([left, spacer, right], axis=1)

    path = image.save_png(canvas, args.out)
    print(f"columns: digit | {' | '.join(heatmaps)} (twice per line); predictions {np.asarray(pred).tolist()}")
    print(f"wrote {path}")
    if args.readme:
        README_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, README_IMAGE)
        print(f"wrote {README_IMAGE}")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
