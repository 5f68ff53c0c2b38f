"""K targets in one ``jaxlrp.attribute`` call against K separate calls (issue "Attribution toolkit", point 4).

Model: ``models.vgg16_small`` (VGG-16's 13 convolutions and 5 max pools, narrow layers, 10 classes) on 32x32x3
inputs, batch 16, random seeded weights; the parameters are ``jit`` arguments. For each method (an LRP composite or
a gradient attributor) two functions are compiled ahead of time (``jit(...).lower(...).compile()``):

- ``one call``: ``attribute(model.apply, x, method, target=t, params=p).relevance`` with ``t`` of shape ``[B, K]``
  (every class of every sample, K = 10): one forward pass, the backward pass vmapped over the K cotangents;
  relevance ``[B, K, 32, 32, 3]``;
- ``K calls``: the same with ``t`` of shape ``[B]``, called K times (``t = k``) by a Python loop, all K results
  awaited at the end (asynchronous dispatch queues the calls); the ratio is taken against this;
- ``K calls, each awaited``: the same loop, waiting for each result before the next call (a loop that reads each
  result, e.g. ``np.asarray``); reported as a second ratio;
- ``forward``: ``model.apply`` alone, for the shared-forward estimate ``(F + K (S - F)) / (K S)`` (``S`` one
  single-target call): the ratio if the one call saved exactly the K - 1 extra forward passes and its K backward
  passes cost what a single call's does. When the backward costs about as much as the forward (a compute-bound
  CPU) that is near ``(1 + K) / (2 K)`` = 0.55 for K = 10. The one call can beat it only by sharing work of the
  backward pass that does not depend on the cotangent (an LRP rule's modified forward ``W+ x``, a max pool's
  winner selection); it falls short of it where vmap batches such work K times.

Timing: interleaved rounds (``timing.time_interleaved``), medians of ``--repeats`` (>= 5) rounds; the ratio is
``median(one call) / median(K calls)``, goal <= 0.4. Before timing, the two are checked to agree: the largest
difference relative to ``max |R|`` is reported.

Usage::

    python benchmarks/targets.py            # batch 16, 32x32, K = 10, 7 rounds -> benchmarks/results/targets.json
    python benchmarks/targets.py --quick    # batch 4, 3 rounds (a smoke run; not a measurement)
    python benchmarks/targets.py --methods EpsilonPlusFlat --repeats 9

No assertion is made on the timings; the table marks ratios above the goal.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script: make `benchmarks` and the local `jaxlrp` importable
    sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import models, overhead, timing  # noqa: E402

GOAL = 0.4
METHODS = ("EpsilonPlusFlat", "EpsilonGammaBox", "VanillaGradient")


def make_method(name: str):
    import jaxlrp

    if name == "EpsilonPlusFlat":
        return jaxlrp.EpsilonPlusFlat()
    if name == "EpsilonGammaBox":
        return jaxlrp.EpsilonGammaBox(low=-3.0, high=3.0)
    if name == "VanillaGradient":
        return jaxlrp.VanillaGradient()
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


def build(model, method) -> Any:
    """The jitted ``(params, x, target) -> relevance`` of one method; ``target`` is ``[B]`` or ``[B, K]``."""
    import jaxlrp

    return jax.jit(lambda p, x, t: jaxlrp.attribute(model.apply, x, method, target=t, params=p).relevance)


def measure(name: str, model, params, x, num_classes: int, repeats: int, log=print) -> dict[str, Any]:
    batch = x.shape[0]
    fn = build(model, make_method(name))
    t_all = jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32), (batch, num_classes))
    t_each = [jnp.full((batch,), k, jnp.int32) for k in range(num_classes)]
    forward = jax.jit(model.apply).lower(params, x).compile()
    t0 = time.perf_counter()
    one = fn.lower(params, x, t_all).compile()
    t1 = time.perf_counter()
    each = fn.lower(params, x, t_each[0]).compile()
    t2 = time.perf_counter()
    log(f"{name}: compile one call {t1 - t0:.2f} s, single-target call {t2 - t1:.2f} s")

    # Agreement: relevance[:, k] of the one call against the k-th call.
    r_one = np.asarray(one(params, x, t_all))
    r_each = np.stack([np.asarray(each(params, x, t)) for t in t_each], axis=1)
    scale = float(np.abs(r_each).max())
    max_diff = float(np.abs(r_one - r_each).max()) / scale

    def k_calls():
        return jax.block_until_ready([each(params, x, t) for t in t_each])

    def k_calls_awaited():
        return [jax.block_until_ready(each(params, x, t)) for t in t_each]

    calls = {"one call": lambda: jax.block_until_ready(one(params, x, t_all)), f"{num_classes} calls": k_calls,
             f"{num_classes} calls, each awaited": k_calls_awaited,
             "forward": lambda: jax.block_until_ready(forward(params, x))}
    load_before = timing.loadavg()
    times, cpu_times = timing.time_interleaved(calls, repeats, log)
    load_after = timing.loadavg()
    stats = timing.summarise_times(times, cpu_times, baseline=f"{num_classes} calls")
    # What sharing the forward pass alone gives: one forward and K backward passes as costly as a single call's,
    # (F + K (S - F)) / (K S) with S = one single-target call (a K-th of the K calls).
    fwd, single = stats["forward"]["median_s"], stats[f"{num_classes} calls"]["median_s"] / num_classes
    return {
        "compile_s": {"one call": t1 - t0, "single-target call": t2 - t1},
        "max_abs_diff_over_max_abs_relevance": max_diff,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "timings": stats,
        "ratio": stats["one call"]["ratio"],
        "ratio_to_awaited_calls": (stats["one call"]["median_s"]
                                   / stats[f"{num_classes} calls, each awaited"]["median_s"]),
        "forward_s": fwd,
        "single_call_s": single,
        "shared_forward_estimate": (fwd + num_classes * (single - fwd)) / (num_classes * single),
        "cpu_ratio": stats["one call"]["cpu_ratio"],
        "within_goal": stats["one call"]["ratio"] <= GOAL,
    }


def markdown_table(report: dict[str, Any]) -> str:
    c, m = report["config"], report["machine"]
    k = c["num_classes"]
    lines = [
        f"K = {k} targets per sample: one attribute call ([B, K] target) vs {k} single-target calls; "
        f"{c['model']}, batch {c['batch']}, {c['size']}x{c['size']}x3, {c['repeats']} interleaved rounds  ",
        f"Machine: {m['cpu_count']} CPUs ({m['processor']}); jax {m['jax']}; jaxlrp {m['git_commit']}",
        "",
        f"| method | forward ms | one call ms (median) | {k} calls ms (median) | ratio | goal | CPU-time ratio | "
        f"{k} awaited calls ms | ratio to awaited | shared-forward estimate | max diff / max abs R | "
        f"load avg (1 min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["results"].items():
        one, ten = r["timings"]["one call"], r["timings"][f"{k} calls"]
        mark = "ok" if r["within_goal"] else "**over**"
        lines.append(f"| {name} | {r['forward_s'] * 1e3:.1f} | {one['median_s'] * 1e3:.1f} | "
                     f"{ten['median_s'] * 1e3:.1f} | {r['ratio']:.2f}x | <= {GOAL} {mark} | {r['cpu_ratio']:.2f}x | "
                     f"{r['timings'][f'{k} calls, each awaited']['median_s'] * 1e3:.1f} | "
                     f"{r['ratio_to_awaited_calls']:.2f}x | {r['shared_forward_estimate']:.2f}x | "
                     f"{r['max_abs_diff_over_max_abs_relevance']:.1e} | "
                     f"{r['load_average_before'][0]:.1f} -> {r['load_average_after'][0]:.1f} |")
    lines.append("")
    lines.append("Shared-forward estimate: (F + K (S - F)) / (K S), F the forward, S one single-target call: the ratio "
                 "if the K-target call saved exactly the K - 1 extra forward passes and its backward passes cost what "
                 "a single call's does.")
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=32, help="input height and width (multiple of 32)")
    ap.add_argument("--num-classes", type=int, default=10, help="C; K = C targets per sample")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7; >= 5)")
    ap.add_argument("--methods", type=lambda s: tuple(m.strip() for m in s.split(",") if m.strip()), default=METHODS,
                    help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--quick", action="store_true", help="batch 4, 3 rounds: a smoke run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default benchmarks/results/targets.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch = 4
    repeats = args.repeats or (3 if args.quick else 7)
    if repeats < 5 and not args.quick:
        print(f"warning: {repeats} rounds; medians are only meaningful with >= 5", file=sys.stderr)
    out = args.out or _ROOT / "benchmarks" / "results" / ("targets_quick.json" if args.quick else "targets.json")

    model = models.vgg16_small(num_classes=args.num_classes)
    params, x = models.init(model, args.seed, batch=args.batch, size=args.size)
    results = {name: measure(name, model, params, x, args.num_classes, repeats) for name in args.methods}
    report = {
        "benchmark": "targets",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {"model": "vgg16_small", "batch": args.batch, "size": args.size, "num_classes": args.num_classes,
                   "repeats": repeats, "seed": args.seed, "goal": GOAL, "params_as_jit_arguments": True,
                   "k_calls": "one compiled single-target executable called K times, awaited together"},
        "machine": overhead.machine_info(),
        "results": results,
    }
    print()
    print(markdown_table(report))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
