"""Planted signal: an LSTM learns that one token decides the label, and LRP points at that token.

Token sequences of length 20-30 over a vocabulary of 20 (token 0 pads on the left); the label is 1 iff token 7
appears (once, at a random position, among random distractor tokens). A linen LSTM (``nn.RNN`` over
``nn.OptimizedLSTMCell``, a ``lax.scan``) reads the token embeddings and a dense head gives two logits. The
embeddings are the explained input: the relevance of a position is the sum over its embedding dimensions.

On held-out positive sequences the LSTM classifies correctly, we count how often the position with the largest
relevance is the planted token, for LRP and for gradient x input. Run from the repository root (after
``pip install -e ".[examples]"``)::

    python examples/planted_signal.py                 # writes docs/images/planted_signal.png
    python examples/planted_signal.py --out my.png    # somewhere else
    python examples/planted_signal.py --quick         # a shorter training run (the tests use it)

Composite: Epsilon on the dense layers (``Composite(("dense", Epsilon()))``; EpsilonPlus is the same map here, as the
net has no convolutions), with the LSTM's gates as constants of the explanation (signal-take-all, jaxlrp's default,
after Arras et al. 2017). The *Flat presets would put Flat on the LSTM's input projection inside the scan body (the
first layer at every step), which spreads each step's relevance evenly over the embedding: not what "which token"
asks for.
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

VOCAB, PAD, SIGNAL = 20, 0, 7
MIN_LEN, MAX_LEN = 20, 30
COMPOSITE = jaxlrp.Composite(("dense", jaxlrp.Epsilon()))


def make_data(n, rng):
  """`n` left-padded sequences [n, MAX_LEN], labels [n], the planted position (-1 if none) and a real-token mask."""
  distractors = np.array([t for t in range(1, VOCAB) if t != SIGNAL])
  tokens = rng.choice(distractors, size=(n, MAX_LEN))
  lengths = rng.integers(MIN_LEN, MAX_LEN + 1, n)
  mask = np.arange(MAX_LEN)[None] >= (MAX_LEN - lengths)[:, None]
  tokens[~mask] = PAD
  labels = rng.integers(0, 2, n)
  planted = np.where(labels == 1, MAX_LEN - lengths + rng.integers(0, lengths), -1)
  pos = labels == 1
  tokens[pos, planted[pos]] = SIGNAL
  return tokens, labels, planted, mask


class Classifier(nn.Module):
  """Embeddings [B, L, E] -> LSTM -> the last output -> two logits."""

  hidden: int = 32

  @nn.compact
  def __call__(self, emb):
    y = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(emb)
    return nn.Dense(2)(y[:, -1])


def train(model, tokens, labels, *, seed, steps, embed_dim=16, batch_size=64, lr=1e-2):
  """Adam on cross-entropy; the embedding table is trained with the model. Returns (table, model params)."""
  key_e, key_m = jax.random.split(jax.random.key(seed))
  params = {"embed": jax.random.normal(key_e, (VOCAB, embed_dim)) * 0.5,
            "model": model.init(key_m, jnp.zeros((1, MAX_LEN, embed_dim)))}
  optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.1))
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, tok, lab):
    def loss_fn(params):
      logits = model.apply(params["model"], params["embed"][tok])
      return optax.softmax_cross_entropy_with_integer_labels(logits, lab).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(tokens), batch_size)
    params, opt_state, loss = step(params, opt_state, tokens[idx], labels[idx])
  return params["embed"], params["model"]


def explain(model, table, model_params, tokens):
  """Per-position relevance of the predicted class [N, L] for LRP and gradient x input, and the predictions."""
  emb = table[tokens]
  logits = jax.jit(model.apply)(model_params, emb)
  pred = jnp.argmax(logits, -1)
  res = jaxlrp.attribute(model.apply, emb, COMPOSITE, target=pred, params=model_params)

  @jax.jit
  def grad_x_input(emb, pred):
    score = lambda e: jnp.take_along_axis(model.apply(model_params, e), pred[:, None], 1).sum()  # noqa: E731
    return jax.grad(score)(emb) * emb

  lrp = np.asarray(res.relevance.sum(-1))
  gxi = np.asarray(grad_x_input(emb, pred).sum(-1))
  return lrp, gxi, np.asarray(pred), np.asarray(logits)


def hit_rate(relevance, mask, planted):
  """Fraction of sequences whose highest-relevance real position (pads excluded) is the planted token."""
  top = np.argmax(np.where(mask, relevance, -np.inf), axis=1)
  return float((top == planted).mean())


def plot(path, tokens, mask, planted, maps, n_rows=8):
  """A row of coloured token cells per sequence and method: red positive, blue negative, each row scaled to its max."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Rectangle

  names = list(maps)
  fig, axes = plt.subplots(len(names), 1, figsize=(MAX_LEN * 0.34 + 1.2, n_rows * 0.34 * len(names) + 1.0))
  for ax, name in zip(np.atleast_1d(axes), names):
    rel = maps[name][:n_rows]
    scale = np.abs(np.where(mask[:n_rows], rel, 0)).max(1, keepdims=True) + 1e-12
    shown = np.ma.masked_where(~mask[:n_rows], rel / scale)
    ax.imshow(shown, cmap="bwr", vmin=-1, vmax=1, aspect="equal")
    for i in range(len(rel)):
      for j in range(MAX_LEN):
        if mask[i, j]:
          ax.text(j, i, str(tokens[i, j]), ha="center", va="center", fontsize=6.5,
                  fontweight="bold" if tokens[i, j] == SIGNAL else "normal")
      ax.add_patch(Rectangle((planted[i] - 0.5, i - 0.5), 1, 1, fill=False, lw=1.4, ec="black"))
    ax.set_title(f"{name}: relevance per position (planted token {SIGNAL} boxed)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=Path("docs/images/planted_signal.png"), help="where to write the PNG")
  parser.add_argument("--quick", action="store_true", help="a shorter training run (still >= 200 explained sequences)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  start = time.perf_counter()
  rng = np.random.default_rng(args.seed)
  n_train, steps, n_test = (3000, 350, 600) if args.quick else (8000, 900, 1000)
  tokens, labels, _, _ = make_data(n_train, rng)
  test_tokens, test_labels, planted, mask = make_data(n_test, rng)
  model = Classifier()
  table, params = train(model, tokens, labels, seed=args.seed, steps=steps)
  print(f"trained in {time.perf_counter() - start:.1f} s ({steps} steps)")

  lrp, gxi, pred, _ = explain(model, table, params, test_tokens)
  accuracy = float((pred == test_labels).mean())
  chosen = (test_labels == 1) & (pred == 1)  # correctly classified positives: they contain the planted token
  results = {
    "accuracy": accuracy,
    "explained": int(chosen.sum()),
    "lrp": hit_rate(lrp[chosen], mask[chosen], planted[chosen]),
    "grad_x_input": hit_rate(gxi[chosen], mask[chosen], planted[chosen]),
  }
  print(f"test accuracy {accuracy:.1%} on {n_test} sequences")
  print(f"top-relevance position is the planted token in {results['explained']} correctly classified positives: "
        f"LRP {results['lrp']:.1%}, gradient x input {results['grad_x_input']:.1%}")

  idx = np.flatnonzero(chosen)[:8]
  path = plot(args.out, test_tokens[idx], mask[idx], planted[idx], {"LRP": lrp[idx], "gradient x input": gxi[idx]})
  print(f"wrote {path}")
  print(f"total {time.perf_counter() - start:.1f} s")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
