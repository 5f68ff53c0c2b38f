"""CNN gallery: a ResNet-18 (or VGG-16-BN) from ``examples/models``, explained by all five preset composites.

The models in ``examples/models`` are written the way their communities write them (here Flax's ImageNet-example
ResNet, with BatchNorm and residual adds); jaxlrp explains them without any change. The network is trained for a
few seconds on scikit-learn's 8x8 digits upsampled to 32x32 (no downloads), then one test digit per class is
explained with each preset. Run from the repository root (after ``pip install -e ".[examples]"``)::

    python examples/cnn_gallery.py                    # writes out/cnn_gallery.png
    python examples/cnn_gallery.py --out my.png        # somewhere else
    python examples/cnn_gallery.py --model vgg16_bn    # VGG-16-BN instead of ResNet-18
    python examples/cnn_gallery.py --readme            # also writes a small docs/images/cnn_gallery.png

Rows: inputs; columns: input | EpsilonPlus | EpsilonPlusFlat | EpsilonGammaBox | EpsilonAlpha2Beta1 |
EpsilonAlpha2Beta1Flat. Red is positive relevance, blue negative, white zero (each heatmap scaled by its own
largest magnitude). Takes well under a minute on a laptop CPU.
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for examples.models

import jaxlrp  # noqa: E402
from examples.models import resnet, vgg  # noqa: E402
from jaxlrp import image  # noqa: E402

README_IMAGE = Path("docs/images/cnn_gallery.png")
SIZE = 32

# EpsilonGammaBox's bounds are the input range: the digits are scaled to [0, 1].
PRESETS = {
    "EpsilonPlus": jaxlrp.EpsilonPlus(),
    "EpsilonPlusFlat": jaxlrp.EpsilonPlusFlat(),
    "EpsilonGammaBox": jaxlrp.EpsilonGammaBox(low=0.0, high=1.0),
    "EpsilonAlpha2Beta1": jaxlrp.EpsilonAlpha2Beta1(),
    "EpsilonAlpha2Beta1Flat": jaxlrp.EpsilonAlpha2Beta1Flat(),
}


def build_model(name):
    """The model as its authors wrote it, at a width that trains in seconds on a CPU, and seeded variables."""
    shape = (1, SIZE, SIZE, 1)
    if name == "resnet18":  # CIFAR-style stem (3x3, no max pool) for 32x32 inputs
        return resnet.init(resnet.ResNet18(num_classes=10, num_filters=8, small_inputs=True), shape, seed=0)
    if name == "vgg16_bn":
        return vgg.init(vgg.vgg16_bn(num_classes=10, width=0.125, hidden=512, dropout_rate=0.0), shape, seed=0)
    raise ValueError(f"unknown model {name!r}")


def load_data(seed):
    """scikit-learn's digits (8x8, 0..16) as [N, 32, 32, 1] images in [0, 1], bilinearly upsampled."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    x = np.asarray(jax.image.resize(x, (len(x), SIZE, SIZE, 1), "bilinear")).clip(0.0, 1.0)
    return train_test_split(x, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)


def train(model, variables, x_train, y_train, *, seed, epochs, batch_size=64):
    """Adam on the cross-entropy; BatchNorm in training mode (batch statistics, running averages updated) and
    dropout on (VGG)."""
    params, batch_stats = variables["params"], variables["batch_stats"]
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, batch_stats, opt_state, x, y, key):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"],
                rngs={"dropout": key},
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    n_batches = len(x_train) // batch_size  # drop the ragged last batch: one compiled shape
    for _ in range(epochs):
        order = rng.permutation(len(x_train))
        for i in range(n_batches):
            idx = order[i * batch_size : (i + 1) * batch_size]
            key, sub = jax.random.split(key)
            params, batch_stats, opt_state, _ = step(params, batch_stats, opt_state, x_train[idx], y_train[idx], sub)
    return {"params": params, "batch_stats": batch_stats}


def label_row(labels, tile, pad, font_size):
    """A white strip with one centred label per column (Pillow's default font); a label may have two lines."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)
    lines = max(len(label.split("\n")) for label in labels)
    height = lines * (font_size + 3) + 4
    width = len(labels) * tile + (len(labels) - 1) * pad
    strip = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(strip)
    for i, label in enumerate(labels):
        draw.multiline_text((i * (tile + pad) + tile / 2, height / 2), label, fill="black", font=font, anchor="mm",
                            align="center", spacing=3)
    return np.asarray(strip, np.float32) / 255.0


def render(x, heatmaps, scale, pad=2):
    """Rows: inputs; columns: input | one heatmap per preset; a label strip on top."""
    digits = 1.0 - x  # dark ink on white, like the heatmaps' zero
    tiles = [t for i in range(len(x)) for t in (digits[i], *(h[i] for h in heatmaps.values()))]
    ncols = 1 + len(heatmaps)
    body = image.grid(tiles, ncols, pad=pad, pad_value=0.7, scale=scale)
    labels = ["input"] + [name.replace("Epsilon", "Epsilon\n", 1) for name in heatmaps]
    header = label_row(labels, SIZE * scale, pad, font_size=4 * scale)
    return np.concatenate([header, body], axis=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/cnn_gallery.png"), help="where to write the PNG")
    parser.add_argument("--readme", action="store_true", help=f"also write a small copy to {README_IMAGE}")
    parser.add_argument("--model", choices=["resnet18", "vgg16_bn"], default="resnet18")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--inputs", type=int, default=5, help="number of test digits (rows), one per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    x_train, x_test, y_train, y_test = load_data(args.seed)
    model, variables = build_model(args.model)
    variables = train(model, variables, x_train, y_train, seed=args.seed, epochs=args.epochs)
    f = lambda v, x: model.apply(v, x, train=False)  # noqa: E731  (inference: BatchNorm's running statistics)
    accuracy = float((jnp.argmax(jax.jit(f)(variables, x_test), -1) == y_test).mean())
    print(f"{args.model}: trained in {time.perf_counter() - start:.1f} s; test accuracy {accuracy:.1%}")

    # The first test digit of each of the classes 0, 1, 2, ...: explain the predicted class.
    idx = [int(np.flatnonzero(y_test == c)[0]) for c in range(min(args.inputs, 10))]
    x = x_test[idx]
    pred = jnp.argmax(f(variables, x), -1)
    heatmaps = {}
    for name, composite in PRESETS.items():
        t0 = time.perf_counter()
        res = jaxlrp.attribute(f, x, composite, target=pred, params=variables)
        relevance = np.asarray(res.relevance)  # [N, 32, 32, 1], like x
        score = np.asarray(res.output)[np.arange(len(x)), np.asarray(res.target)]
        ratio = relevance.sum(axis=(1, 2, 3)) / score  # below 1: biases (folded BatchNorm shifts) absorb some
        positive = (relevance > 0).sum() / max((relevance != 0).sum(), 1)
        print(
            f"{name:23s} relevance sum / score: {ratio.min():5.2f} .. {ratio.max():5.2f}; "
            f"positive share {positive:.0%} ({time.perf_counter() - t0:.1f} s)"
        )
        heatmaps[name] = image.heatmap(relevance)

    print(f"rows: digits {[int(y_test[i]) for i in idx]}, predicted {np.asarray(pred).tolist()}")
    path = image.save_png(render(x, heatmaps, scale=4), args.out)
    print(f"wrote {path}")
    if args.readme:
        small = image.save_png(render(x, heatmaps, scale=3, pad=1), README_IMAGE)
        print(f"wrote {small}")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
