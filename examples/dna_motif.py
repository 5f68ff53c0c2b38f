"""DNA motif: a convolution + LSTM net learns to detect an implanted 8-mer, and LRP finds where it was implanted.

Random DNA sequences of length 150 (one-hot A/C/G/T); positives carry the motif TGACGTCA at a random position, with one
base substituted in a quarter of them. The net is a linen 1D convolution (32 filters of width 9) with ReLU and
max-pooling by 10, an LSTM (``nn.RNN`` over ``nn.LSTMCell``, a ``lax.scan``) over the 15 pooled positions, and a
dense head on its last output with two logits. The one-hot sequence is the explained input; the relevance of a
position is the sum over its four channels.

On held-out positives the net classifies correctly, we count how often the position with the largest relevance lies
inside the implanted motif, for LRP and for gradient x input. Run from the repository root (after
``pip install -e ".[examples]"``)::

    python examples/dna_motif.py                 # writes docs/images/dna_motif.png
    python examples/dna_motif.py --out my.png    # somewhere else
    python examples/dna_motif.py --quick         # a shorter training run (the tests use it)

Composite: ``EpsilonPlus`` (ZPlus on the convolution, Epsilon on the LSTM's and the head's dense layers, the LSTM's
gates as constants, max-pooling winner-take-all). ZPlus keeps the positive evidence of the motif filters, which is
what "where is the motif" asks for. ``EpsilonGammaBox(low=0, high=1)`` (ZBox on the convolution, the input's range) is
printed too. The *Flat presets would put Flat on the convolution, spreading relevance evenly over each window.
"""

import argparse
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlrp

BASES = "ACGT"
MOTIF = "TGACGTCA"
LENGTH = 150
COMPOSITES = {"EpsilonPlus": jaxlrp.EpsilonPlus(), "EpsilonGammaBox": jaxlrp.EpsilonGammaBox(low=0.0, high=1.0)}


def make_data(n, rng, mutation_rate=0.25):
  """One-hot sequences [n, LENGTH, 4], labels [n] and the motif's start (-1 for negatives)."""
  seq = rng.integers(0, 4, (n, LENGTH))
  labels = rng.integers(0, 2, n)
  start = np.where(labels == 1, rng.integers(0, LENGTH - len(MOTIF) + 1, n), -1)
  motif = np.array([BASES.index(b) for b in MOTIF])
  for i in np.flatnonzero(labels):
    m = motif.copy()
    if rng.random() < mutation_rate:  # one substitution
      k = rng.integers(len(m))
      m[k] = (m[k] + rng.integers(1, 4)) % 4
    seq[i, start[i]:start[i] + len(m)] = m
  return np.eye(4, dtype=np.float32)[seq], labels, start


class MotifNet(nn.Module):
  """Conv(filters, width) + ReLU + max-pool -> LSTM(hidden) -> the last output -> two logits."""

  filters: int = 32
  width: int = 9
  pool: int = 10
  hidden: int = 32

  @nn.compact
  def __call__(self, x):  # x: [B, L, 4] one-hot
    x = nn.relu(nn.Conv(self.filters, (self.width,))(x))
    x = nn.max_pool(x, (self.pool,), strides=(self.pool,))
    y = nn.RNN(nn.LSTMCell(self.hidden))(x)
    return nn.Dense(2)(y[:, -1])


def train(model, x, y, *, seed, steps, batch_size=64, lr=1e-2):
  params = model.init(jax.random.key(seed), x[:1])
  # Clipping keeps the LSTM's early steps from stalling training on some seeds.
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.1)))
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    def loss_fn(params):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, xb), yb).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(x), batch_size)
    params, opt_state, _ = step(params, opt_state, x[idx], y[idx])
  return params


def explain(model, params, x, target):
  """Per-position relevance [N, L] of class `target` for each composite and for gradient x input."""
  maps = {}
  for name, composite in COMPOSITES.items():
    res = jaxlrp.attribute(model.apply, x, composite, target=target, params=params)
    maps[name] = np.asarray(res.relevance.sum(-1))

  @jax.jit
  def grad_x_input(x, target):
    return jax.grad(lambda x: jnp.take_along_axis(model.apply(params, x), target[:, None], 1).sum())(x) * x

  maps["gradient x input"] = np.asarray(grad_x_input(x, target).sum(-1))
  return maps


def hit_rate(relevance, start):
  """Fraction of sequences whose highest-relevance position lies inside the implanted motif."""
  top = np.argmax(relevance, axis=1)
  return float(((top >= start) & (top < start + len(MOTIF))).mean())


def plot(path, start, maps, n_rows=6):
  """Per-position relevance strips (red positive, blue negative, each row scaled to its max), the motif boxed."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Rectangle

  fig, axes = plt.subplots(len(maps), 1, figsize=(12, 0.32 * n_rows * len(maps) + 1.0))
  for ax, (name, rel) in zip(np.atleast_1d(axes), maps.items()):
    rel = rel[:n_rows]
    ax.imshow(rel / (np.abs(rel).max(1, keepdims=True) + 1e-12), cmap="bwr", vmin=-1, vmax=1, aspect="auto",
              interpolation="nearest")
    for i in range(len(rel)):
      ax.add_patch(Rectangle((start[i] - 0.5, i - 0.5), len(MOTIF), 1, fill=False, lw=1.2, ec="black"))
    ax.set_title(f"{name}: relevance per position (motif {MOTIF} boxed)", fontsize=9)
    ax.set_yticks([])
    ax.tick_params(labelsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=Path("docs/images/dna_motif.png"), help="where to write the PNG")
  parser.add_argument("--quick", action="store_true", help="a shorter training run (still >= 200 explained sequences)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  start_time = time.perf_counter()
  rng = np.random.default_rng(args.seed)
  n_train, steps, n_test = (8000, 400, 600) if args.quick else (16000, 1000, 1000)
  x, y, _ = make_data(n_train, rng)
  x_test, y_test, start = make_data(n_test, rng)
  model = MotifNet()
  params = train(model, x, y, seed=args.seed, steps=steps)
  print(f"trained in {time.perf_counter() - start_time:.1f} s ({steps} steps)")

  pred = np.asarray(jnp.argmax(jax.jit(model.apply)(params, x_test), -1))
  accuracy = float((pred == y_test).mean())
  chosen = (y_test == 1) & (pred == 1)
  maps = explain(model, params, x_test[chosen], jnp.ones(int(chosen.sum()), jnp.int32))
  results = {"accuracy": accuracy, "explained": int(chosen.sum())}
  results.update({name: hit_rate(rel, start[chosen]) for name, rel in maps.items()})
  print(f"test accuracy {accuracy:.1%} on {n_test} sequences")
  print(f"top-relevance position inside the motif, {results['explained']} correctly classified positives: "
        + ", ".join(f"{name} {results[name]:.1%}" for name in maps))

  path = plot(args.out, start[chosen], maps)
  print(f"wrote {path}")
  print(f"total {time.perf_counter() - start_time:.1f} s")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
