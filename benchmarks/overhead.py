"""Overhead of LRP relative to ``jax.grad`` on VGG-16 (issue "Done when" point 6).

Every method is a jitted function of ``(params, x)``; the parameters are ``jit`` arguments, never closed over
(closed-over weights become XLA constants and compile 20-50x slower, DESIGN.md section 4). Compared:

- ``forward``: ``model.apply(params, x)``;
- ``grad``: ``jax.grad`` of ``out[:, target].sum()`` with respect to ``x`` (the baseline);
- one LRP method per composite: ``jax.grad`` of the same scalar through
  ``jaxlrp.lrp(lambda p, x: model.apply(p, x), composite, argnums=1)``.

Each function is lowered and compiled first (trace and compile times are reported separately), called once to
warm up, then timed in interleaved rounds: every round calls every method once (``block_until_ready``), with the
order rotated from round to round, so that drift in machine load hits all methods alike. Reported: median, min and
max per method, and the ratio of each median to grad's median next to the limit from DESIGN.md section 2.
Memory is XLA's static buffer assignment (``compiled.memory_analysis()``: temp + argument + output bytes), as a
ratio to grad's. The optimized HLO is summarised too (convolutions, reduce-windows, scatters, kernel reverses, fusions,
XLA's flop estimate), which is where to look first when a ratio misses its limit.

Usage::

    python benchmarks/overhead.py                 # VGG-16, batch 8, 224x224, 7 rounds (minutes on 2 CPU cores)
    python benchmarks/overhead.py --quick         # batch 2, 64x64, 5 rounds: a smoke run of about a minute
    python benchmarks/overhead.py --methods forward,grad,Epsilon --repeats 5
    python benchmarks/overhead.py --dump-hlo benchmarks/results/hlo   # write each optimized HLO module

No assertion is made on the timings; the table marks ratios above their limits.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script: make `benchmarks` and the local `jaxlrp` importable
    sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import models, timing  # noqa: E402

# Time limits (median / grad's median) from DESIGN.md section 2 "Cost"; memory goal for every LRP method.
TIME_LIMITS = {
    "Epsilon": 1.10,
    "EpsilonPlusFlat": 1.5,
    "EpsilonGammaBox": 2.0,
    "EpsilonAlpha2Beta1": 2.0,
}
MEMORY_LIMIT = 1.3
LRP_METHODS = tuple(TIME_LIMITS)
ALL_METHODS = ("forward", "grad") + LRP_METHODS


def make_composite(name: str):
    """The composite of one LRP method (imported lazily: the baseline runs without the core)."""
    import jaxlrp

    if name == "Epsilon":
        return jaxlrp.Composite(("linear", jaxlrp.Epsilon()))
    if name == "EpsilonPlusFlat":
        return jaxlrp.EpsilonPlusFlat()
    if name == "EpsilonGammaBox":
        return jaxlrp.EpsilonGammaBox(low=-3.0, high=3.0)
    if name == "EpsilonAlpha2Beta1":
        return jaxlrp.EpsilonAlpha2Beta1()
    raise ValueError(f"unknown LRP method {name!r}; choose from {', '.join(LRP_METHODS)}")


def build_functions(model, target: int, methods: tuple[str, ...]) -> dict[str, Callable]:
    """The jitted ``(params, x) -> array`` function of every requested method."""

    def apply(params, x):
        return model.apply(params, x)

    fns: dict[str, Callable] = {}
    for name in methods:
        if name == "forward":
            fns[name] = jax.jit(apply)
        elif name == "grad":
            fns[name] = jax.jit(jax.grad(lambda p, x: apply(p, x)[:, target].sum(), argnums=1))
        else:
            import jaxlrp

            explained = jaxlrp.lrp(apply, make_composite(name), argnums=1)
            # Bind `explained` now: a late-binding closure would make every method use the last composite.
            fns[name] = jax.jit(jax.grad(lambda p, x, g=explained: g(p, x)[:, target].sum(), argnums=1))
    return fns


_HLO_OPS = {
    "convolution": re.compile(r"=\s*\S+\s+convolution\("),
    "reduce_window": re.compile(r"=\s*\S+\s+reduce-window\("),
    "select_and_scatter": re.compile(r"=\s*\S+\s+select-and-scatter\("),
    "scatter": re.compile(r"=\s*\S+\s+scatter\("),  # max-pool backward on JAX 0.10 CPU
    "reverse": re.compile(r"=\s*\S+\s+reverse\("),  # kernel flips of conv transposes
    "transpose": re.compile(r"=\s*\S+\s+transpose\("),  # layout changes (kernel transposes of conv VJPs)
    "dot": re.compile(r"=\s*\S+\s+dot\("),
    "fusion": re.compile(r"=\s*\S+\s+fusion\("),
    "custom_call": re.compile(r"=\s*\S+\s+custom-call\("),
}


def hlo_summary(compiled) -> dict[str, Any]:
    """Op counts of the optimized HLO module and XLA's cost estimate."""
    text = compiled.as_text()
    counts = {op: len(pattern.findall(text)) for op, pattern in _HLO_OPS.items()}
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per computation
        cost = cost[0] if cost else {}
    cost = cost or {}
    counts["flops"] = float(cost.get("flops", float("nan")))
    counts["bytes_accessed"] = float(cost.get("bytes accessed", float("nan")))
    return counts


# ---- Where the time goes: entry ops of the optimized HLO by category, and a profiled call per method ----------

HLO_CATEGORIES = (
    "conv: model forward",
    "conv: rule forward (W+ x, ...)",
    "conv: transpose",
    "dot",
    "elementwise, activation-sized: forward",
    "elementwise, activation-sized: backward",
    "weight-sized (kernel layout copies, W+/W-, BN folding)",
    "pooling",
    "other",
)
XPROF_FLAG = "--xla_cpu_enable_xprof_traceme=true"  # per-op trace events on CPU (set before JAX starts)


def _hlo_computations(text: str) -> dict[str, str]:
    comps, cur, buf = {}, None, []
    for line in text.split("\n"):
        head = re.match(r"^(?:ENTRY )?%(\S+) ", line)
        if head and line.rstrip().endswith("{"):
            cur, buf = head.group(1), []
        elif line.startswith("}") and cur is not None:
            comps[cur] = "\n".join(buf)
            cur = None
        elif cur is not None:
            buf.append(line)
    return comps


def hlo_categories(text: str, batch: int) -> dict[str, str]:
    """The category (one of ``HLO_CATEGORIES``) of every instruction of the optimized HLO's entry computation.

    Convolutions (also inside fusions) are told apart by their JAX op name: no ``transpose(`` = the network's
    forward; ``.../transpose(jvp())/conv_general_dilated`` = a forward-type convolution computed inside an LRP
    rule's backward (a jaxlrp custom-VJP backward has an empty name stack), e.g. ``W+ x``; anything else under a
    transpose = a VJP transpose. Other ops are "activation-sized" when their output's leading dimension is the
    batch and their dimensions are not a permutation of a parameter's (a kernel), else "weight-sized". A heuristic
    for diagnostics: op names may change with JAX or jaxlrp.
    """
    comps = _hlo_computations(text)
    entry = text[text.index("\nENTRY"):] if "\nENTRY" in text else text
    param_dims = {tuple(sorted(int(d) for d in re.findall(r"\d+", m.group(1))))
                  for m in re.finditer(r"= \w+\[([\d,]*)\]\S* parameter\(", entry)}
    out: dict[str, str] = {}
    for line in entry.split("\n"):
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\w+\[[\d,]*\])?\S* ([\w-]+)\(", line)
        if not m:
            continue
        name, shape, op = m.group(1), m.group(2) or "", m.group(3)
        if op in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
            continue
        op_name = re.search(r'op_name="([^"]*)"', line)
        op_name = op_name.group(1) if op_name else ""
        called = re.search(r"calls=%([\w.-]+)", line)
        body = comps.get(called.group(1), "") if called else ""
        dims = [int(d) for d in re.findall(r"\d+", shape.split("[", 1)[1])] if "[" in shape else []
        n_transpose = op_name.count("transpose(")
        if op == "convolution" or " convolution(" in body:
            if n_transpose == 0:
                cat = "conv: model forward"
            elif op_name.endswith("transpose(jvp())/conv_general_dilated"):
                cat = "conv: rule forward (W+ x, ...)"
            else:
                cat = "conv: transpose"
        elif op == "dot" or " dot(" in body:
            cat = "dot"
        elif any(k in op for k in ("reduce-window", "scatter", "select-and-scatter")) or any(
                k in name for k in ("reduce-window", "scatter")):
            cat = "pooling"
        elif dims and dims[0] == batch and len(dims) > 1 and tuple(sorted(dims)) not in param_dims:
            cat = "elementwise, activation-sized: " + ("forward" if n_transpose == 0 else "backward")
        elif dims:
            cat = "weight-sized (kernel layout copies, W+/W-, BN folding)"
        else:
            cat = "other"
        out[name] = cat
    return out


def profile_categories(compiled: dict[str, Any], call_args: tuple, batch: int, rounds: int = 2,
                       log: Callable[..., None] = print) -> dict[str, dict[str, Any]]:
    """Per method: milliseconds per call spent in each HLO op category (``hlo_categories``), from a profiled run.

    Runs every executable ``rounds`` times under ``jax.profiler.trace`` and sums the durations of its per-op
    trace events. On CPU these events exist only when JAX was started with ``XLA_FLAGS`` containing
    ``XPROF_FLAG``; without it the result is empty. Ops of one call may run concurrently on the CPU's threads, so
    the per-category sums can add up to more than the call's wall time (``wall_ms``).
    """
    import gzip
    import tempfile

    if XPROF_FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        log(f"profile: XLA_FLAGS lacks {XPROF_FLAG}; no per-op events")
        return {}
    with tempfile.TemporaryDirectory(prefix="jaxlrp-profile-") as tmp:
        opts = jax.profiler.ProfileOptions()
        opts.host_tracer_level = 3
        opts.python_tracer_level = 0
        with jax.profiler.trace(tmp, create_perfetto_trace=True, profiler_options=opts):
            for _ in range(rounds):
                for name, exe in compiled.items():
                    with jax.profiler.TraceAnnotation(f"jaxlrp_method_{name}"):
                        _sync(exe(*call_args))
        traces = sorted(Path(tmp).glob("plugins/profile/*/perfetto_trace.json.gz"))
        if not traces:
            return {}
        with gzip.open(traces[-1]) as f:
            data = json.load(f)
    events = [e for e in (data["traceEvents"] if isinstance(data, dict) else data) if e.get("ph") == "X"]
    prefix = "jaxlrp_method_"  # (a ':' in an annotation's name is cut off by the trace converter)
    windows = [(e["name"][len(prefix):], e["ts"], e["ts"] + e["dur"]) for e in events
               if e["name"].startswith(prefix)]
    ops = sorted((e["ts"], e["dur"], e["name"]) for e in events if e.get("args", {}).get("hlo_op"))
    out: dict[str, dict[str, Any]] = {}
    for name, exe in compiled.items():
        cats = hlo_categories(exe.as_text(), batch)
        ms = {c: 0.0 for c in HLO_CATEGORIES}
        n_ops = {c: 0 for c in HLO_CATEGORIES}
        for c in cats.values():
            n_ops[c] += 1
        wall = 0.0
        mine = [w for w in windows if w[0] == name]
        for _, t0, t1 in mine:
            wall += t1 - t0
            for ts, dur, op in ops:
                if t0 <= ts <= t1:
                    ms[cats.get(op, "other")] += dur
        n = max(len(mine), 1)
        out[name] = {"wall_ms": wall / n / 1e3, "ms": {c: v / n / 1e3 for c, v in ms.items()}, "ops": n_ops}
    return out


def profile_table(profile: dict[str, dict[str, Any]]) -> str:
    """Markdown: ms per call (and number of HLO entry ops) per category, one column per method."""
    if not profile:
        return ""
    names = list(profile)
    lines = ["| HLO op category: ms per call (ops) | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names),
             "| wall time of the profiled call | " + " | ".join(f"{profile[n]['wall_ms']:.0f}" for n in names) + " |"]
    for c in HLO_CATEGORIES:
        if not any(profile[n]["ops"][c] for n in names):
            continue
        lines.append(f"| {c} | " + " | ".join(f"{profile[n]['ms'][c]:.0f} ({profile[n]['ops'][c]})" for n in names) + " |")
    return "\n".join(lines)


def memory_summary(compiled) -> dict[str, int]:
    """Static buffer sizes from XLA's buffer assignment; ``total`` = temp + argument + output bytes."""
    stats = compiled.memory_analysis()
    out = {
        "temp": int(stats.temp_size_in_bytes),
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
    }
    out["total"] = out["temp"] + out["argument"] + out["output"]
    peak = getattr(stats, "peak_memory_in_bytes", None)
    if peak is not None:
        out["peak_reported"] = int(peak)
    return out


def machine_info() -> dict[str, Any]:
    """The host (``timing.host_info``) plus the JAX / Flax versions, backend and XLA flags."""
    import flax

    device = jax.devices()[0]
    info: dict[str, Any] = timing.host_info()
    info.update({
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "flax": flax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    })
    return info


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return None


_loadavg = timing.loadavg


def _sync(tree) -> None:
    jax.block_until_ready(tree)


def compile_methods(fns: dict[str, Callable], call_args: tuple, log: Callable[..., None] = print,
                    dump_hlo: str = "") -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Lower, compile and call once every jitted method; return (executables, per-method results).

    The results hold the trace, compile and first-call times, XLA's static memory (``memory_summary``) and the
    optimized HLO's op counts (``hlo_summary``). ``dump_hlo``: a folder to write each optimized HLO module into.
    """
    results: dict[str, dict[str, Any]] = {}
    compiled: dict[str, Any] = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        lowered = fn.lower(*call_args)  # tracing (and, for LRP, the jaxpr analysis and interpretation)
        t1 = time.perf_counter()
        exe = lowered.compile()
        t2 = time.perf_counter()
        out = exe(*call_args)  # first call: allocation and warm-up, not timed with the rounds
        _sync(out)
        del out
        t3 = time.perf_counter()
        compiled[name] = exe
        results[name] = {
            "trace_s": t1 - t0,
            "compile_s": t2 - t1,
            "first_call_s": t3 - t2,
            "memory_bytes": memory_summary(exe),
            "hlo": hlo_summary(exe),
        }
        if dump_hlo:
            Path(dump_hlo).mkdir(parents=True, exist_ok=True)
            (Path(dump_hlo) / f"{name}.hlo.txt").write_text(exe.as_text())
        log(f"  {name:<20} trace {t1 - t0:6.2f} s  compile {t2 - t1:6.2f} s  first call {t3 - t2:6.2f} s")
    return compiled, results


def time_methods(compiled: dict[str, Any], call_args: tuple, repeats: int, log: Callable[..., None] = print):
    """Interleaved timing rounds of compiled executables (``timing.time_interleaved``); also the load average
    before and after. Returns (wall times, CPU times, load before, load after)."""
    calls = {name: (lambda exe=exe: _sync(exe(*call_args))) for name, exe in compiled.items()}
    load_before = timing.loadavg()
    times, cpu_times = timing.time_interleaved(calls, repeats, log)
    load_after = timing.loadavg()
    if max(load_before[0], load_after[0]) > (os.cpu_count() or 1) + 0.5:
        print(f"warning: load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} CPUs: other "
              f"processes competed for the CPU; wall-clock ratios are noisy (see the CPU-time ratios)", file=sys.stderr)
    return times, cpu_times, load_before, load_after


def finish_results(results: dict[str, dict[str, Any]], times: dict[str, list[float]],
                   cpu_times: dict[str, list[float]], methods: tuple[str, ...]) -> None:
    """Add timing statistics, ratios to grad (time, CPU time, memory, convolutions) and the limits, in place."""
    stats = timing.summarise_times(times, cpu_times, baseline="grad")
    grad_memory = results["grad"]["memory_bytes"]["total"]
    grad_convs = results["grad"]["hlo"]["convolution"]
    for name in methods:
        res = results[name]
        res.update(stats[name])
        res["memory_ratio"] = res["memory_bytes"]["total"] / grad_memory
        res["time_limit"] = TIME_LIMITS.get(name)
        res["memory_limit"] = MEMORY_LIMIT if name in LRP_METHODS else None
        res["within_time_limit"] = None if name not in TIME_LIMITS else res["ratio"] <= TIME_LIMITS[name]
        res["within_memory_limit"] = None if name not in LRP_METHODS else res["memory_ratio"] <= MEMORY_LIMIT
        res["convolution_ratio"] = res["hlo"]["convolution"] / grad_convs if grad_convs else None


def lrp_relevances(compiled: dict[str, Any], call_args: tuple) -> dict[str, np.ndarray]:
    """The relevance of every compiled LRP method (one more call each), as NumPy arrays."""
    return {name: np.asarray(exe(*call_args)) for name, exe in compiled.items() if name in LRP_METHODS}


def relevance_sanity(relevances: dict[str, np.ndarray], score: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per LRP method (recorded, not asserted): finite relevance, per-sample relevance sums and the scores."""
    out = {}
    for name, rel in relevances.items():
        rel = np.asarray(rel, dtype=np.float64)
        per_sample = rel.reshape(rel.shape[0], -1).sum(axis=1)
        out[name] = {
            "finite": bool(np.isfinite(rel).all()),
            "relevance_sum": per_sample.tolist(),
            "score": np.asarray(score, np.float64).tolist(),
        }
    return out


def check_lrp_available(methods) -> None:
    if any(m in LRP_METHODS for m in methods):
        import jaxlrp

        if not hasattr(jaxlrp, "lrp"):
            raise SystemExit("jaxlrp.lrp is not available (core not built yet?); "
                             "run the baseline only with --methods forward,grad")


def run(args: argparse.Namespace) -> dict[str, Any]:
    methods = tuple(args.methods)
    if "grad" not in methods:
        raise SystemExit("--methods must include 'grad' (the baseline of every ratio)")
    check_lrp_available(methods)

    model = models.vgg16(num_classes=args.num_classes) if args.model == "vgg16" else models.vgg16_small()
    params, x = models.init(model, args.seed, batch=args.batch, size=args.size)
    _sync((params, x))
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    target = args.target % model.num_classes
    log = print if not args.quiet else (lambda *a, **k: None)
    log(f"model {args.model}: {n_params / 1e6:.1f} M parameters; input {tuple(x.shape)}; target class {target}")

    fns = build_functions(model, target, methods)
    compiled, results = compile_methods(fns, (params, x), log, args.dump_hlo)

    # Sanity of the explanations (recorded, not asserted): finite relevance, and how much of the score it keeps.
    score = np.asarray(compiled["forward"](params, x) if "forward" in compiled else model.apply(params, x))[:, target]
    for name, sanity in relevance_sanity(lrp_relevances(compiled, (params, x)), score).items():
        results[name]["sanity"] = sanity

    times, cpu_times, load_before, load_after = time_methods(compiled, (params, x), args.repeats, log)
    finish_results(results, times, cpu_times, methods)

    return {
        "benchmark": "overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "model": args.model,
            "parameters": n_params,
            "batch": args.batch,
            "size": args.size,
            "input_shape": list(x.shape),
            "dtype": str(x.dtype),
            "target": target,
            "repeats": args.repeats,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "seed": args.seed,
            "params_as_jit_arguments": True,
            "memory": "compiled.memory_analysis(): temp + argument + output bytes",
        },
        "limits": {"time": TIME_LIMITS, "memory": MEMORY_LIMIT},
        "results": results,
    }


def markdown_table(report: dict[str, Any]) -> str:
    m, c = report["machine"], report["config"]
    lines = [
        f"VGG-16 overhead ({c['model']}, batch {c['batch']}, {c['size']}x{c['size']}, {c['dtype']}, "
        f"{c['repeats']} interleaved rounds, params as jit arguments)  ",
        f"Machine: {m['device_kind']} ({m['backend']}), {m['cpu_count']} CPUs ({m['processor']}), {m['platform']}; "
        f"jax {m['jax']}, flax {m['flax']}, python {m['python']}; jaxlrp {m['git_commit']}; "
        f"load average {c['load_average_before'][0]:.1f} -> {c['load_average_after'][0]:.1f}",
        "",
        "| method | trace s | compile s | median ms | min ms | max ms | time / grad | limit | CPU time / grad | "
        "memory MiB | mem / grad | convs (HLO) | GFLOP (XLA) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["results"].items():
        limit = r["time_limit"]
        mark = "" if limit is None else (" ok" if r["within_time_limit"] else " **over**")
        mem_mark = "" if r["memory_limit"] is None else (" ok" if r["within_memory_limit"] else " **over**")
        limit_s = "" if limit is None else f"<= {limit:.2f}"
        lines.append(
            f"| {name} | {r['trace_s']:.2f} | {r['compile_s']:.2f} | {r['median_s'] * 1e3:.0f} | "
            f"{r['min_s'] * 1e3:.0f} | {r['max_s'] * 1e3:.0f} | {r['ratio']:.2f}x{mark} | {limit_s} | {r['cpu_ratio']:.2f}x | "
            f"{r['memory_bytes']['total'] / 2**20:.0f} | {r['memory_ratio']:.2f}x{mem_mark} | "
            f"{r['hlo']['convolution']} | {r['hlo']['flops'] / 1e9:.1f} |"
        )
    lines.append("")
    lines.append(f"Limits: time / grad (medians of wall-clock time) as listed (DESIGN.md section 2); memory / grad "
                 f"<= {MEMORY_LIMIT} for LRP methods. Memory: XLA buffer assignment, temp + argument + output. "
                 f"CPU time: process CPU seconds per call (all threads), for runs on a busy machine.")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224, help="input height and width (multiple of 32)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved timing rounds (default 7, or 5 with --quick; >= 5 recommended)")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 2, 64x64 (overrides --batch/--size)")
    p.add_argument("--model", choices=("vgg16", "small"), default="vgg16",
                   help="'small' is VGG-16's structure with narrow layers (models.vgg16_small)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--target", type=int, default=0, help="explained class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", type=lambda s: tuple(m.strip() for m in s.split(",") if m.strip()),
                   default=ALL_METHODS, help=f"comma-separated subset of {','.join(ALL_METHODS)}")
    p.add_argument("--json", default=str(_ROOT / "benchmarks" / "results" / "overhead.json"),
                   help="where to write the JSON report ('' to skip)")
    p.add_argument("--dump-hlo", default="", help="folder to write each method's optimized HLO into")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.size = 2, 64
    if args.repeats is None:
        args.repeats = 5 if args.quick else 7
    unknown = [m for m in args.methods if m not in ALL_METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.repeats < 5:
        print(f"warning: {args.repeats} rounds; medians are only meaningful with >= 5", file=sys.stderr)
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    report = run(args)
    print()
    print(markdown_table(report))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {path}")
    return report


if __name__ == "__main__":
    main()
