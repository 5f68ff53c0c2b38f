"""Evaluating explanations: faithfulness, sanity checks and rule tuning with jaxlrp.metrics and jaxlrp.tune.

Trains a small CNN on scikit-learn's 8x8 digits and an MLP on the breast-cancer data (30 standardised features), then
compares LRP presets, single-rule composites, gradient-based attributors and a random baseline on held-out data:

- pixel flipping (Bach et al. 2015): the predicted logit as pixels / features are set to the baseline, most relevant
  first (MoRF) and least relevant first (LeRF); AOPC (Samek et al. 2017) and selectivity (area under the MoRF curve);
- faithfulness correlation (Bhatt et al. 2020), complexity (Gini index of |R|);
- randomisation sanity checks: cascading model parameter randomisation (MPRT, Adebayo et al. 2018) and the random
  logit test (Sixt et al. 2020);
- `jaxlrp.tune` picks EpsilonGammaBox's gamma (digits) and the Epsilon rule's epsilon (breast cancer) by AOPC(MoRF)
  on a tuning split; the evaluation split then compares the tuned value with the default.

Every number is a mean over samples with its standard error; ordering claims are paired differences (same images,
two methods) with their standard errors. Run from the repository root (after ``pip install -e ".[examples]"``)::

    python examples/evaluate.py            # writes out/evaluate_curves.png and out/evaluate.md
    python examples/evaluate.py --readme   # writes docs/images/evaluate_curves.png, benchmarks/results/evaluate.md
    python examples/evaluate.py --quick    # shorter training, fewer images and methods (the tests use it)

Perturbation setup: pixels (digits) / features (breast cancer) one at a time, 16 evenly spaced steps until all 64
pixels are removed (all 30 features, one per step, for breast cancer), the logit of the predicted class. Removed digit
pixels are set to the image's mean (Quantus' "mean" baseline); removed features to 0, the standardised features'
training mean. The digits' AOPC(MoRF) is also reported for the zeros, blur and uniform-noise baselines, because the
ranking of the methods depends on it: a zero baseline equals the digits' background, so it only tests removing
ink, where gradient x input (= LRP-epsilon here) is the first-order estimate of the effect by construction, while
LRP's Flat / ZBox first-layer rules and the gradient put 20-40% of their |R| on background pixels, which a zero
baseline leaves unchanged; a baseline above 0 adds ink there, which the sign of the gradient ranks the wrong way
round (a large positive gradient at a background pixel says that ink there would *raise* the score: setting each
image's top-gradient background pixel to the image mean raises the logit in every one of the 300 images).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split

import jaxlrp
from jaxlrp import metrics

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for examples.quickstart
from examples.quickstart import CNN  # noqa: E402  (the quickstart's digits CNN)

README_PLOT = Path("docs/images/evaluate_curves.png")
README_TABLE = Path("benchmarks/results/evaluate.md")
GAMMAS = [0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0]
EPSILONS = [1e-6, 1e-3, 0.01, 0.1, 0.25, 1.0]
RANDOM = "random"
DIGITS_BASELINES = ("mean", "zeros", "blur", "uniform")  # the first one is the main setup


# ---- models and data -----------------------------------------------------------------------------------------------

class MLP(nn.Module):
  """Two hidden ReLU layers of 32 units on the 30 standardised features; two logits."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(2)(x)


def train(model, x, y, *, seed, epochs, batch_size=64, lr=3e-3):
  """Adam on the cross-entropy, shuffled mini-batches (the ragged last batch dropped: one compiled shape)."""
  # The "rbg" generator: XLA on a CPU compiles the default threefry draws of the initialisers several times slower.
  params = jax.jit(model.init)(jax.random.key(seed, impl="rbg"), x[:1])
  optimizer = optax.adam(lr)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb).mean()  # noqa: E731
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  batch_size = min(batch_size, len(x))
  for _ in range(epochs):
    order = rng.permutation(len(x))
    for i in range(len(x) // batch_size):
      idx = order[i * batch_size:(i + 1) * batch_size]
      params, opt_state = step(params, opt_state, x[idx], y[idx])
  return params


@dataclasses.dataclass
class Task:
  """A trained model with its tuning and evaluation splits and the methods to compare."""

  name: str
  apply: Callable
  params: dict
  accuracy: float
  x_tune: np.ndarray
  x_eval: np.ndarray
  methods: dict          # name -> Composite | attributor | RANDOM
  mprt_methods: list     # names
  curve: dict            # perturbation_curve options
  num_classes: int
  tune_candidates: Callable
  tune_grid: dict
  tune_default: dict
  tune_label: str
  other_baselines: tuple = ()  # AOPC(MoRF) also under these perturbation baselines
  extras: bool = True  # faithfulness correlation and the random logit test (more compiled programs)
  lrp: tuple = ("EpsilonPlusFlat", "EpsilonGammaBox")  # the LRP methods whose AOPC is compared with the gradient's


def digits_task(seed, quick) -> Task:
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]  # NHWC in [0, 1]; 0 is the background
  x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=seed,
                                                      stratify=digits.target)
  n_tune = 150  # the 450 test digits: 150 for tuning, 300 for the evaluation
  model = CNN()
  params = train(model, x_train, y_train, seed=seed, epochs=10 if quick else 30)
  accuracy = float((np.asarray(model.apply(params, x_test)).argmax(-1) == y_test).mean())
  methods = {
      "EpsilonPlusFlat": jaxlrp.EpsilonPlusFlat(),
      "EpsilonGammaBox": jaxlrp.EpsilonGammaBox(low=0.0, high=1.0),
      "EpsilonAlpha2Beta1": jaxlrp.EpsilonAlpha2Beta1(),
      "Epsilon (all layers)": jaxlrp.Composite(("linear", jaxlrp.Epsilon())),
      "ZPlus (all layers)": jaxlrp.Composite(("linear", jaxlrp.ZPlus())),
      "Gamma (all layers)": jaxlrp.Composite(("linear", jaxlrp.Gamma(0.25))),
      "Gradient": jaxlrp.VanillaGradient(),
      "Gradient x Input": jaxlrp.GradientXInput(),
      "SmoothGrad": jaxlrp.SmoothGrad(noise_level=0.1, samples=16 if quick else 32, key=0),
      "IntegratedGradients": jaxlrp.IntegratedGradients(baseline=0.0, steps=16 if quick else 32),
      RANDOM: RANDOM,
  }
  if quick:  # compiling dominates the quick run: fewer methods and sanity checks
    methods = {k: methods[k] for k in ("EpsilonPlusFlat", "EpsilonGammaBox", "Gradient", RANDOM)}
  return Task(
      name="digits", apply=model.apply, params=params, accuracy=accuracy,
      x_tune=x_test[:n_tune], x_eval=x_test[n_tune:] if not quick else x_test[n_tune:n_tune + 200],
      methods=methods, curve=dict(patch=1, steps=16, baseline=DIGITS_BASELINES[0]), num_classes=10,
      mprt_methods=["EpsilonGammaBox"] if quick else
      ["EpsilonPlusFlat", "EpsilonGammaBox", "Gradient", "Gradient x Input"],
      other_baselines=() if quick else DIGITS_BASELINES[1:], extras=not quick,
      tune_candidates=lambda gamma: jaxlrp.EpsilonGammaBox(low=0.0, high=1.0, gamma=gamma),
      tune_grid={"gamma": GAMMAS}, tune_default={"gamma": 0.25}, tune_label="EpsilonGammaBox")


def breast_cancer_task(seed, quick) -> Task:
  data = load_breast_cancer()
  x_train, x_test, y_train, y_test = train_test_split(data.data, data.target, test_size=0.25, random_state=seed,
                                                      stratify=data.target)
  x_train, x_tune, y_train, _ = train_test_split(x_train, y_train, test_size=0.2, random_state=seed,
                                                 stratify=y_train)  # the tuning split is not trained on
  mean, std = x_train.mean(0), x_train.std(0)
  x_train, x_tune, x_test = [((v - mean) / std).astype(np.float32) for v in (x_train, x_tune, x_test)]
  model = MLP()
  params = train(model, x_train, y_train, seed=seed, epochs=30 if quick else 60, batch_size=32, lr=1e-3)
  accuracy = float((np.asarray(model.apply(params, x_test)).argmax(-1) == y_test).mean())
  # No convolutions: EpsilonGammaBox and EpsilonAlpha2Beta1 reduce to Epsilon on every layer (listed once), and
  # EpsilonPlusFlat's Flat rule on the first dense layer, the one that reads the features, gives every feature the same
  # relevance (Flat ignores weights and inputs): none of the presets applies.
  methods = {
      "Epsilon (all layers)": jaxlrp.Composite(("linear", jaxlrp.Epsilon())),
      "ZPlus (all layers)": jaxlrp.Composite(("linear", jaxlrp.ZPlus())),
      "Gamma (all layers)": jaxlrp.Composite(("linear", jaxlrp.Gamma(0.25))),
      "Gradient": jaxlrp.VanillaGradient(),
      "Gradient x Input": jaxlrp.GradientXInput(),
      "SmoothGrad": jaxlrp.SmoothGrad(noise_level=0.1, samples=32, key=0),
      "IntegratedGradients": jaxlrp.IntegratedGradients(baseline=0.0, steps=32),
      RANDOM: RANDOM,
  }
  if quick:
    methods = {k: methods[k] for k in ("Epsilon (all layers)", "Gradient", RANDOM)}
  return Task(
      name="breast cancer", apply=model.apply, params=params, accuracy=accuracy, x_tune=x_tune, x_eval=x_test,
      methods=methods, mprt_methods=[] if quick else ["Epsilon (all layers)", "Gradient", "Gradient x Input"],
      curve=dict(patch=1, baseline="zeros"), num_classes=2, extras=not quick, lrp=("Epsilon (all layers)",),
      tune_candidates=lambda epsilon: jaxlrp.Composite(("linear", jaxlrp.Epsilon(epsilon))),
      tune_grid={"epsilon": EPSILONS}, tune_default={"epsilon": 1e-6}, tune_label="Epsilon (all layers)")


# ---- explanations and metrics --------------------------------------------------------------------------------------

def random_relevance(x, key):
  """Relevance drawn from N(0, 1), independent of the model (drawn flat: fast to compile on a CPU)."""
  return jax.random.normal(key, (x.size,), x.dtype).reshape(x.shape)


def explainer(task: Task, method) -> Callable:
  """`explain(params, x, target) -> relevance` for the sanity checks."""
  return lambda p, x, t: jaxlrp.attribute(task.apply, x, method, target=t, params=p).relevance


def mean_se(values) -> tuple[float, float]:
  """Mean and standard error of the mean over the samples (NaNs dropped)."""
  v = np.asarray(values, np.float64).ravel()
  v = v[~np.isnan(v)]
  if len(v) < 2:
    return (float(v[0]) if len(v) else float("nan")), float("nan")
  return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v)))


def evaluate_task(task: Task, key, log) -> dict:
  """All metrics for every method on the evaluation split: per-sample arrays, and the mean MoRF/LeRF curves."""
  x = jnp.asarray(task.x_eval)
  target = jnp.asarray(np.asarray(task.apply(task.params, x)).argmax(-1))
  k_random, k_faith, k_mprt, k_logit, k_noise = jax.random.split(key, 5)
  curve = lambda r, **kw: metrics.perturbation_curve(task.apply, x, r, target, params=task.params,  # noqa: E731
                                                     **{**task.curve, **kw})
  rows, curves, layers = {}, {}, None
  for name, method in task.methods.items():
    start = time.perf_counter()
    if method is RANDOM:
      relevance = random_relevance(x, k_random)
    else:
      relevance = jaxlrp.attribute(task.apply, x, method, target=target, params=task.params).relevance
    morf, lerf = curve(relevance, order="morf"), curve(relevance, order="lerf")
    row = {
        "AOPC MoRF": metrics.aopc_from_curve(morf),
        "AOPC LeRF": metrics.aopc_from_curve(lerf),
        "selectivity": metrics.auc_from_curve(morf),
        "Gini": metrics.gini(relevance),
    }
    if task.extras:
      row["faithfulness"] = metrics.faithfulness_correlation(task.apply, x, relevance, target, params=task.params,
                                                             key=k_faith, num_subsets=64,
                                                             baseline=task.curve["baseline"])
    for baseline in task.other_baselines:  # the same images and relevance, another perturbation baseline
      row[f"AOPC MoRF ({baseline})"] = metrics.aopc_from_curve(curve(relevance, order="morf", baseline=baseline,
                                                                     key=k_noise))
    if method is not RANDOM and task.extras:
      row["random logit"] = metrics.random_logit(explainer(task, method), x, target, params=task.params,
                                                 num_classes=task.num_classes, key=k_logit)
    if name in task.mprt_methods:
      res = metrics.mprt(explainer(task, method), task.params, x, target, key=k_mprt)
      row["MPRT"], layers = res.similarity, list(res.layers)  # [B, L], top layer first
    rows[name] = {k: np.asarray(v) for k, v in row.items()}
    curves[name] = (np.asarray(morf).mean(0), np.asarray(lerf).mean(0))
    log(f"  {task.name:13s} {name:22s} AOPC MoRF {rows[name]['AOPC MoRF'].mean():7.3f}  "
        f"({time.perf_counter() - start:.1f} s)")
  return {"rows": rows, "curves": curves, "layers": layers, "n": int(x.shape[0])}


def tune_task(task: Task) -> dict:
  """`jaxlrp.tune` on the tuning split (all candidates in one vmapped call); then the same candidates on the
  evaluation split, one `attribute` + `aopc` call each (these reuse the evaluation's compiled programs)."""
  curve = task.curve

  def aopc_morf(model, x, relevance, target):
    return metrics.aopc(model, x, relevance, target, **curve)

  target = np.asarray(task.apply(task.params, task.x_tune)).argmax(-1)
  result = jaxlrp.tune(task.apply, task.x_tune, task.tune_candidates, grid=task.tune_grid, target=target,
                       params=task.params, metric=aopc_morf)
  x = jnp.asarray(task.x_eval)
  target = jnp.asarray(np.asarray(task.apply(task.params, x)).argmax(-1))
  eval_scores = np.stack([
      np.asarray(metrics.aopc(task.apply, x, jaxlrp.attribute(task.apply, x, c, target=target, params=task.params)
                              .relevance, target, params=task.params, **curve)) for c in result.candidates])
  (name,) = task.tune_grid
  values = result.values[name]
  chosen, default = result.best_index, values.index(task.tune_default[name])
  diff = eval_scores[chosen] - eval_scores[default]  # paired: the same images
  return {"param": name, "label": task.tune_label, "values": values, "chosen": values[chosen],
          "default": values[default], "chosen_index": chosen, "default_index": default, "result": result,
          "tune_scores": result.scores, "eval_scores": eval_scores, "eval_diff": mean_se(diff)}


# ---- reporting -----------------------------------------------------------------------------------------------------

COLUMNS = [("AOPC MoRF", "higher"), ("AOPC LeRF", "lower"), ("selectivity", "lower"), ("faithfulness", "higher"),
           ("Gini", "higher: sparser"), ("random logit", "lower")]


def fmt(values, digits=3) -> str:
  m, se = mean_se(values)
  return f"{m:.{digits}f} ± {se:.{digits}f}"


def paired(rows, a, b, metric) -> tuple[float, float]:
  return mean_se(rows[a][metric] - rows[b][metric])


def ordering_checks(task: Task, rows: dict, metric: str = "AOPC MoRF") -> list[tuple[str, float, float]]:
  """Paired differences of `metric`: each LRP composite of `task.lrp` minus Gradient, and Gradient minus random."""
  checks = [(f"{n} - Gradient", *paired(rows, n, "Gradient", metric)) for n in task.lrp]
  checks.append(("Gradient - random", *paired(rows, "Gradient", RANDOM, metric)))
  return checks


def markdown(tasks, evals, tunes, seconds, command) -> str:
  out = [f"# Explanation quality on digits and breast cancer\n",
         f"Made by `{command}` in {seconds:.0f} s (CPU). Mean ± standard error over the evaluation samples, "
         f"explaining the predicted class's logit. Pixel flipping: one pixel (feature) at a time set to the baseline, "
         f"in 16 steps (digits) / 30 steps (breast cancer), MoRF or LeRF order; AOPC = mean drop of the logit over "
         f"the steps (Samek et al. 2017); selectivity = area under the MoRF curve; faithfulness = Pearson correlation "
         f"of subset relevance and logit drop over 64 random subsets of 10% of the pixels (Bhatt et al. 2020); Gini "
         f"of |R| (Chalasani et al. 2020); random logit = Spearman similarity to the explanation of a random other "
         f"class (Sixt et al. 2020); MPRT = Spearman similarity to the original explanation as layers are "
         f"randomised from the top (Adebayo et al. 2018). Baselines: digits, each image's mean pixel value; breast "
         f"cancer, 0 (the standardised features' training mean).\n"]
  for task, ev, tn in zip(tasks, evals, tunes):
    rows = ev["rows"]
    out.append(f"## {task.name}: {ev['n']} evaluation samples (test accuracy {task.accuracy:.1%})\n")
    out.append("| method | " + " | ".join(f"{c} ({d})" for c, d in COLUMNS) + " |")
    out.append("|---|" + "---:|" * len(COLUMNS))
    for name, row in rows.items():
      cells = [fmt(row[c]) if c in row else "-" for c, _ in COLUMNS]
      out.append(f"| {name} | " + " | ".join(cells) + " |")
    baselines = (task.curve["baseline"], *task.other_baselines)
    metric_of = lambda b: "AOPC MoRF" if b == task.curve["baseline"] else f"AOPC MoRF ({b})"  # noqa: E731
    if task.other_baselines:
      out.append(f"\nAOPC(MoRF) by perturbation baseline (the same images and relevance maps):\n")
      out.append("| method | " + " | ".join(baselines) + " |")
      out.append("|---|" + "---:|" * len(baselines))
      for name, row in rows.items():
        out.append(f"| {name} | " + " | ".join(fmt(row[metric_of(b)], 2) for b in baselines) + " |")
    out.append("\nAOPC(MoRF) ordering, paired differences over the same samples (mean ± std. error, z = mean / "
               "std. error):\n")
    labels = [label for label, *_ in ordering_checks(task, rows)]
    out.append("| baseline | " + " | ".join(labels) + " | all > 0 with z > 2 |")
    out.append("|---|" + "---:|" * len(labels) + "---|")
    for b in baselines:
      checks = ordering_checks(task, rows, metric_of(b))
      cells = [f"{m:+.2f} ± {se:.2f} (z {m / se:+.1f})" for _, m, se in checks]
      holds = all(m > 2 * se for _, m, se in checks)
      out.append(f"| {b} | " + " | ".join(cells) + f" | {'yes' if holds else 'no'} |")
    layers = ev["layers"]
    if layers:
      out.append("\nMPRT (cascading): Spearman similarity to the original explanation after randomising the layers "
                 "from the top down to and including ...\n")
      out.append("| method | " + " | ".join(layers) + " |")
      out.append("|---|" + "---:|" * len(layers))
      for name, row in rows.items():
        if "MPRT" in row:
          out.append(f"| {name} | " + " | ".join(fmt(row["MPRT"][:, i], 2) for i in range(len(layers))) + " |")
    p = tn["param"]
    out.append(f"\n`jaxlrp.tune` over {p} of {tn['label']} (AOPC MoRF; tuning split {tn['tune_scores'].shape[1]} "
               f"samples, evaluation split {tn['eval_scores'].shape[1]}):\n")
    out.append(f"| {p} | tuning split | evaluation split |")
    out.append("|---:|---:|---:|")
    for i, v in enumerate(tn["values"]):
      mark = {(True, True): " (tuned = default)", (True, False): " (tuned)", (False, True): " (default)"}.get(
          (i == tn["chosen_index"], i == tn["default_index"]), "")
      out.append(f"| {v:g}{mark} | {fmt(tn['tune_scores'][i])} | {fmt(tn['eval_scores'][i])} |")
    m, se = tn["eval_diff"]
    out.append(f"\nTuned {p} = {tn['chosen']:g} vs the default {tn['default']:g} on the evaluation split: AOPC(MoRF) "
               f"difference {m:+.3f} ± {se:.3f} (paired).\n")
  return "\n".join(out)


STYLES = {"EpsilonPlusFlat": ("C3", "-", 2.2), "EpsilonGammaBox": ("C1", "-", 2.2),
          "EpsilonAlpha2Beta1": ("C5", "-", 1.4), "Epsilon (all layers)": ("C6", "-.", 1.4),
          "ZPlus (all layers)": ("C8", "-.", 1.4), "Gamma (all layers)": ("C9", "-.", 1.4),
          "Gradient": ("C0", "--", 2.2), "Gradient x Input": ("C2", "--", 1.4), "SmoothGrad": ("C4", "--", 1.4),
          "IntegratedGradients": ("C7", "--", 1.4), RANDOM: ("0.45", ":", 2.2)}


def plot(tasks, evals, tunes, path: Path) -> Path:
  """Per task: the mean MoRF and LeRF curves of every method, and the tuning curve (AOPC vs the parameter)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(len(tasks), 3, figsize=(15, 4.3 * len(tasks)), squeeze=False,
                           gridspec_kw=dict(width_ratios=(1, 1, 0.8)))
  for row, (task, ev, tn) in enumerate(zip(tasks, evals, tunes)):
    unit = "pixels" if task.name == "digits" else "features"
    for col, order in enumerate(("MoRF", "LeRF")):
      ax = axes[row, col]
      for name, curves in ev["curves"].items():
        color, ls, lw = STYLES.get(name, ("k", "-", 1.0))
        ax.plot(np.linspace(0, 1, len(curves[col])), curves[col], color=color, ls=ls, lw=lw, label=name)
      ax.set_title(f"{task.name}: {'most' if order == 'MoRF' else 'least'} relevant {unit} first ({order})")
      ax.set_xlabel(f"fraction of {unit} set to the baseline ({task.curve['baseline']})")
      ax.set_ylabel("mean logit of the predicted class")
      ax.grid(alpha=0.3)
    axes[row, 0].legend(fontsize=7.5, loc="upper right")
    ax = axes[row, 2]
    values = np.asarray(tn["values"], float)
    xs = np.arange(len(values))
    for scores, split, color in (("tune_scores", "tuning", "C1"), ("eval_scores", "evaluation", "C3")):
      stats = np.array([mean_se(row) for row in tn[scores]])
      ax.errorbar(xs, stats[:, 0], yerr=stats[:, 1], color=color, marker="o", capsize=3, label=f"{split} split")
    ax.axvline(tn["default_index"], color="0.5", ls=":", label=f"default {tn['default']:g}")
    ax.axvline(tn["chosen_index"], color="C1", ls="--", label=f"tuned {tn['chosen']:g}")
    ax.set_xticks(xs, [f"{v:g}" for v in values])
    ax.set_title(f"{task.name}: jaxlrp.tune, {tn['label']}")
    ax.set_xlabel(tn["param"])
    ax.set_ylabel("AOPC (MoRF)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--readme", action="store_true", help=f"write {README_PLOT} and {README_TABLE}")
  parser.add_argument("--out-dir", type=Path, default=Path("out"), help="where to write without --readme")
  parser.add_argument("--quick", action="store_true", help="shorter training, fewer images and methods")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  log = lambda s: print(s, flush=True)  # noqa: E731

  tasks = [digits_task(args.seed, args.quick), breast_cancer_task(args.seed, args.quick)]
  for t in tasks:
    log(f"{t.name}: test accuracy {t.accuracy:.1%}; tuning {len(t.x_tune)}, evaluation {len(t.x_eval)} samples "
        f"({time.perf_counter() - start:.1f} s)")
  key = jax.random.key(args.seed)
  evals = [evaluate_task(t, k, log) for t, k in zip(tasks, jax.random.split(key, len(tasks)))]
  tunes = []
  for t in tasks:
    tn = tune_task(t)
    tunes.append(tn)
    m, se = tn["eval_diff"]
    log(f"  {t.name:13s} tune: {tn['param']} = {tn['chosen']:g} (default {tn['default']:g}); evaluation AOPC(MoRF) "
        f"difference {m:+.3f} ± {se:.3f}  ({time.perf_counter() - start:.1f} s)")
  seconds = time.perf_counter() - start

  plot_path = README_PLOT if args.readme else args.out_dir / "evaluate_curves.png"
  table_path = README_TABLE if args.readme else args.out_dir / "evaluate.md"
  command = "python examples/evaluate.py" + (" --readme" if args.readme else "") + (" --quick" if args.quick else "")
  table = markdown(tasks, evals, tunes, seconds, command)
  table_path.parent.mkdir(parents=True, exist_ok=True)
  table_path.write_text(table)
  plot(tasks, evals, tunes, plot_path)
  log(table)
  log(f"wrote {plot_path} and {table_path}; total {time.perf_counter() - start:.1f} s")

  digits = evals[0]["rows"]
  return {
      "seconds": seconds, "plot": plot_path, "table": table_path,
      "aopc_morf": {t.name: {n: mean_se(r["AOPC MoRF"]) for n, r in ev["rows"].items()} for t, ev in zip(tasks, evals)},
      "ordering": {t.name: ordering_checks(t, ev["rows"]) for t, ev in zip(tasks, evals)},
      "mprt": {n: np.asarray(r["MPRT"]).mean(0) for n, r in digits.items() if "MPRT" in r},
      "tune": {t.name: tn for t, tn in zip(tasks, tunes)},
      "n_eval": {t.name: ev["n"] for t, ev in zip(tasks, evals)},
  }


if __name__ == "__main__":
  main(sys.argv[1:])
