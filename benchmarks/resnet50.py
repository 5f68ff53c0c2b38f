"""ResNet-50: jaxlrp's cost over ``jax.grad``, next to Zennit 1.0's cost over torch's gradient (issue "Real CNNs").

The model is ``models.resnet50()``: Bottleneck v1.5 ResNet-50 in Flax linen in the style of Flax's ImageNet
example, BatchNorm in inference mode with random running statistics, random weights. The JAX side is timed with
``overhead.py``'s machinery: every method is a jitted function of ``(variables, x)`` (the parameters are ``jit``
arguments), lowered and compiled first (trace and compile times reported apart), called once, then timed in
interleaved rounds (medians); memory is ``compiled.memory_analysis()`` (temp + argument + output bytes) and the
optimized HLO's op counts are recorded. Methods: ``forward``, ``grad`` (``jax.grad`` of ``out[:, target].sum()``
with respect to the input, the baseline), and jaxlrp's ``Epsilon`` (everywhere), ``EpsilonPlusFlat()``,
``EpsilonGammaBox(-3., 3.)`` and ``EpsilonAlpha2Beta1()``.

Then, in a subprocess (so that the two frameworks never compete for the cores at the same time; the parent waits),
the same network in plain torch (``torch_models.TorchResNet50``, loaded with the *same* variables, eval mode,
parameters without ``requires_grad``) on the same input, with ``torch.set_num_threads(2)`` and, by default,
``OMP_WAIT_POLICY=PASSIVE`` (``--omp-wait-policy``): torch's forward (``no_grad``), torch's gradient
(``torch.autograd.grad`` of the same scalar) and Zennit's presets of the same names and parameters, with a
``SequentialMergeBatchNorm`` canonizer (every conv/BatchNorm pair, projection shortcuts included: the count is
checked) and the residual adds as ``zennit.layer.Sum`` modules (Zennit gives them ``Norm``, as jaxlrp gives a
residual add). Each Zennit preset has its own model copy; its composite is registered (canonizers applied, hooks
attached) right before each of its calls and removed right after, outside the timed region, so the rounds interleave
like the JAX side's and Zennit's hooks do not keep four sets of activations alive. Zennit's output relevance is
seeded with ``one_hot(target) * output``, which is what jaxlrp computes, so the relevances are compared too
(recorded, not asserted), and so are the two forwards (the same function up to float32 rounding). The torch side's
memory is the peak process RSS increase during each method's first call (approximate).

Reported, for both libraries: medians (min, max) of wall-clock time, their ratio to the library's own gradient, the
ratio of process CPU time (all threads; steadier when other jobs load the machine), and the load average before and
after each phase. Goals (jaxlrp, DESIGN.md section 2): Epsilon <= 1.1x grad, EpsilonPlusFlat <= 1.5x,
EpsilonGammaBox and EpsilonAlpha2Beta1 <= 2.0x; memory <= 1.3x grad's.

Usage::

    python benchmarks/resnet50.py             # batch 8, 224x224, 7 rounds each side -> benchmarks/results/resnet50.json
    python benchmarks/resnet50.py --quick     # batch 1, 64x64, 3 rounds -> benchmarks/results/resnet50_quick.json
    python benchmarks/resnet50.py --no-zennit # the JAX side only
    python benchmarks/resnet50.py --dump-hlo benchmarks/results/hlo_resnet50   # each method's optimized HLO
    python benchmarks/resnet50.py --no-zennit --profile   # + ms per HLO op category (conv forward / rule forward /
                                                          #   transpose, elementwise, weight-sized) per method

No assertion is made on the timings; the table marks ratios above their goals.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script: make `benchmarks`, `tests` and the local `jaxlrp` importable
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402

from benchmarks import timing  # noqa: E402  (no JAX, no torch: the torch worker imports this module too)

# The methods of overhead.py (checked in run_jax; repeated here so that the torch worker need not import JAX).
LRP_METHODS = ("Epsilon", "EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1")
ALL_METHODS = ("forward", "grad") + LRP_METHODS
BOX_LOW, BOX_HIGH = -3.0, 3.0
RESULTS = _ROOT / "benchmarks" / "results"


def flatten_variables(variables, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts of arrays -> ``{"params/conv_init/kernel": array}`` (for ``np.savez``)."""
    out: dict[str, np.ndarray] = {}
    for key, value in variables.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten_variables(value, name))
        else:
            out[name] = np.asarray(value)
    return out


def unflatten_variables(flat) -> dict:
    """Inverse of ``flatten_variables``."""
    out: dict = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.asarray(value)
    return out


# ----------------------------------------------------------------------------------------------------------------
# JAX / jaxlrp side (this process)
# ----------------------------------------------------------------------------------------------------------------

def run_jax(args) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compile, sanity-check and time the JAX methods. Returns (report part, arrays for the torch side)."""
    import jax

    from benchmarks import models, overhead

    assert overhead.LRP_METHODS == LRP_METHODS, "benchmarks/overhead.py and resnet50.py disagree on the methods"
    log = timing.log_fn(args)
    methods = tuple(args.methods)
    overhead.check_lrp_available(methods)

    t0 = time.perf_counter()
    model = models.resnet50(num_classes=args.num_classes)
    variables, x = models.init(model, args.seed, batch=args.batch, size=args.size)
    jax.block_until_ready((variables, x))
    init_s = time.perf_counter() - t0
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables["params"]))
    target = args.target % args.num_classes
    log(f"[jax] ResNet-50: {n_params / 1e6:.1f} M parameters; input {tuple(x.shape)} (NHWC); target class {target}; "
        f"variables drawn and BatchNorm calibrated in {init_s:.1f} s")

    fns = overhead.build_functions(model, target, methods)
    compiled, results = overhead.compile_methods(fns, (variables, x), log, args.dump_hlo)

    forward = compiled["forward"] if "forward" in compiled else jax.jit(model.apply)
    logits = np.asarray(forward(variables, x))
    relevances = overhead.lrp_relevances(compiled, (variables, x))
    for name, sanity in overhead.relevance_sanity(relevances, logits[:, target]).items():
        results[name]["sanity"] = sanity

    log(f"[jax] {args.repeats} interleaved rounds (ms):")
    times, cpu_times, load_before, load_after = overhead.time_methods(compiled, (variables, x), args.repeats, log)
    overhead.finish_results(results, times, cpu_times, methods)
    profile = {}
    if args.profile:
        log("[jax] profiled calls (per-op trace events, HLO op categories)")
        profile = overhead.profile_categories(compiled, (variables, x), args.batch, rounds=2, log=log)
    del compiled

    part = {
        "machine": overhead.machine_info(),
        "parameters": n_params,
        "init_s": init_s,
        "input_shape": list(x.shape),
        "dtype": str(x.dtype),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "limits": {"time": overhead.TIME_LIMITS, "memory": overhead.MEMORY_LIMIT},
        "results": results,
    }
    if profile:
        part["profile"] = profile
    arrays = {
        "variables": jax.tree_util.tree_map(np.asarray, variables),
        "x_nhwc": np.asarray(x),
        "logits": logits,
        "relevances": relevances,
        "target": target,
    }
    return part, arrays


# ----------------------------------------------------------------------------------------------------------------
# torch / Zennit side (a subprocess)
# ----------------------------------------------------------------------------------------------------------------

def run_zennit_subprocess(args, arrays: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Write the variables and the input for the worker, run it, read back its report and arrays."""
    log = timing.log_fn(args)
    np.savez(workdir / "variables.npz", **flatten_variables(arrays["variables"]))
    np.save(workdir / "x_nchw.npy", np.ascontiguousarray(arrays["x_nhwc"].transpose(0, 3, 1, 2)))
    config = {
        "workdir": str(workdir),
        "num_classes": args.num_classes,
        "target": arrays["target"],
        "repeats": args.repeats,
        "threads": args.torch_threads,
        "methods": [m for m in args.methods],
        "quiet": args.quiet,
        "twin": getattr(args, "twin", None) or {"model": "resnet50"},  # torch_models.build_twin (run.py: VGG too)
    }
    (workdir / "config.json").write_text(json.dumps(config))
    env = dict(os.environ)
    if args.omp_wait_policy != "unset":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    log(f"[torch] worker subprocess (torch.set_num_threads({args.torch_threads}), OMP_WAIT_POLICY "
        f"{env.get('OMP_WAIT_POLICY', '(unset)')}); JAX is idle meanwhile")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--torch-worker", str(workdir / "config.json")],
                          cwd=str(_ROOT), env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"the torch/Zennit worker failed (exit status {proc.returncode}); see its output above, "
                         f"or run with --no-zennit")
    part = json.loads((workdir / "torch_report.json").read_text())
    part["wall_s"] = wall
    with np.load(workdir / "torch_arrays.npz") as f:
        torch_arrays = {k: f[k] for k in f.files}

    # The same function? (float32, different conv algorithms: differences of order 1e-6 x max|logit| expected.)
    logits_t = torch_arrays.pop("logits")
    scale = float(np.max(np.abs(arrays["logits"])))
    crosscheck: dict[str, Any] = {
        "forward_max_abs_diff": float(np.max(np.abs(logits_t - arrays["logits"]))),
        "forward_max_abs": scale,
        "relevance_max_rel_diff": {},
        "relevance_sum_zennit": {},
    }
    for name, rel_jax in arrays["relevances"].items():
        key = f"rel_{name}"
        if key not in torch_arrays:
            continue
        ref = torch_arrays[key].astype(np.float64)
        got = rel_jax.transpose(0, 3, 1, 2).astype(np.float64)
        crosscheck["relevance_max_rel_diff"][name] = float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))
        crosscheck["relevance_sum_zennit"][name] = ref.reshape(ref.shape[0], -1).sum(axis=1).tolist()
    part["crosscheck"] = crosscheck
    return part


def _zennit_composite(zen, name: str, input_shape):
    import torch
    import zennit.canonizers

    canonizers = [zennit.canonizers.SequentialMergeBatchNorm()]
    c = zen.composites
    if name == "Epsilon":
        return c.LayerMapComposite(layer_map=c.layer_map_base() + [(zen.types.Linear, zen.rules.Epsilon(epsilon=1e-6))],
                                   canonizers=canonizers)
    if name == "EpsilonPlusFlat":
        return c.EpsilonPlusFlat(canonizers=canonizers)
    if name == "EpsilonGammaBox":
        return c.EpsilonGammaBox(low=torch.full(input_shape, BOX_LOW), high=torch.full(input_shape, BOX_HIGH),
                                 canonizers=canonizers)
    if name == "EpsilonAlpha2Beta1":
        return c.EpsilonAlpha2Beta1(canonizers=canonizers)
    raise ValueError(name)


def torch_worker(config_path: str) -> None:
    """The torch side: build the models, register the Zennit composites, time interleaved rounds, write results."""
    import contextlib
    import resource

    import torch

    from benchmarks import torch_models
    from tests.crosscheck import zennit_twins

    cfg = json.loads(Path(config_path).read_text())
    log = print if not cfg["quiet"] else (lambda *a, **k: None)
    workdir = Path(cfg["workdir"])
    torch.set_num_threads(cfg["threads"])
    zen = zennit_twins.import_zennit()
    import zennit
    import zennit.canonizers

    with np.load(workdir / "variables.npz") as f:
        variables = unflatten_variables({k: f[k] for k in f.files})
    x = torch.from_numpy(np.load(workdir / "x_nchw.npy"))
    target = int(cfg["target"])
    methods = cfg["methods"]

    def build():
        model = torch_models.build_twin(cfg.get("twin", {"model": "resnet50"}), variables, cfg["num_classes"],
                                        sum_module=zen.layer.Sum)
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    t0 = time.perf_counter()
    base = build()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in base.modules())
    build_s = time.perf_counter() - t0

    def seed(out):  # output relevance = the score of the target class (what jaxlrp computes)
        return torch.nn.functional.one_hot(torch.full((out.shape[0],), target), out.shape[1]).to(out.dtype) * out

    def forward():
        with torch.no_grad():
            return base(x)

    def gradient():
        xg = x.detach().requires_grad_(True)
        out = base(xg)
        (g,) = torch.autograd.grad(out[:, target].sum(), xg)
        return g

    calls: dict[str, Callable[[], Any]] = {}
    around: dict[str, Callable[[], Any]] = {}
    results: dict[str, dict[str, Any]] = {}
    arrays: dict[str, np.ndarray] = {}
    for name in methods:
        t0 = time.perf_counter()
        res: dict[str, Any] = {}
        if name == "forward":
            calls[name] = forward
        elif name == "grad":
            calls[name] = gradient
        else:
            # One model copy and one composite per preset. The composite is registered only around each call
            # (outside the timed region): Zennit's hooks keep tensors of the last call alive while registered, and
            # four registered at once held ~17 GB at batch 8 / 224 x 224, which slowed everything down.
            model = build()
            composite = _zennit_composite(zen, name, tuple(x.shape))
            attributor = zen.attribution.Gradient(model=model, composite=composite)
            around[name] = _registered(attributor)
            calls[name] = lambda a=attributor: a(x, seed)[1]
            with around[name]():
                merged = sum(isinstance(h, zennit.canonizers.MergeBatchNorm) for h in composite.handles)
            if merged != n_bn:
                raise SystemExit(f"{name}: SequentialMergeBatchNorm merged {merged} of {n_bn} BatchNorms")
            res["batchnorms_merged"] = merged
        t1 = time.perf_counter()
        rss_before = timing.rss_mib()
        timing.reset_peak_rss()
        with (around[name]() if name in around else contextlib.nullcontext()):
            t2 = time.perf_counter()
            out = calls[name]()  # first call (warm-up; Zennit: the relevance compared with jaxlrp's)
            t3 = time.perf_counter()
        res["peak_rss_increase_mib"] = timing.peak_rss_mib() - rss_before
        if name in LRP_METHODS:
            arrays[f"rel_{name}"] = out.detach().numpy()
            res["finite"] = bool(np.isfinite(arrays[f"rel_{name}"]).all())
        if name == "forward":
            arrays["logits"] = out.numpy()
        del out
        res["setup_s"] = t1 - t0
        res["first_call_s"] = t3 - t2
        results[name] = res
        log(f"  {name:<20} setup {t1 - t0:6.2f} s  first call {t3 - t2:6.2f} s  "
            f"peak RSS +{res['peak_rss_increase_mib']:.0f} MiB")
    if "logits" not in arrays:
        arrays["logits"] = forward().numpy()

    log(f"[torch] {cfg['repeats']} interleaved rounds (ms):")
    load_before = timing.loadavg()
    times, cpu_times = timing.time_interleaved(calls, cfg["repeats"], log, around=around)
    load_after = timing.loadavg()
    stats = timing.summarise_times(times, cpu_times, baseline="grad")
    for name in methods:
        results[name].update(stats[name])

    mkldnn = getattr(torch.backends, "mkldnn", None)
    report = {
        "machine": {
            **timing.host_info(),
            "torch": torch.__version__,
            "zennit": getattr(zennit, "__version__", None) or timing.dist_version("zennit"),
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
            "mkldnn": bool(mkldnn and mkldnn.is_available()),
            "torchvision": "stand-in" if zennit_twins.install_torchvision_standin() else "real",
        },
        "model": f"{type(base).__name__} (benchmarks/torch_models.py), eval mode, the JAX side's variables, "
                 "parameters without requires_grad; residual adds via zennit.layer.Sum",
        "canonizer": "zennit.canonizers.SequentialMergeBatchNorm",
        "seed": "one_hot(target) * output",
        "build_s": build_s,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_note": "peak_rss_increase_mib: peak process RSS during the first call minus RSS before it "
                         "(Linux VmHWM after a reset; includes what the allocator keeps; approximate)",
        "results": results,
    }
    (workdir / "torch_report.json").write_text(json.dumps(report, indent=2))
    np.savez(workdir / "torch_arrays.npz", **arrays)


def _registered(attributor):
    """A factory of context managers that register ``attributor``'s composite (canonizers and hooks) and remove it."""
    import contextlib

    @contextlib.contextmanager
    def registered():
        with attributor:
            yield attributor

    return registered


def markdown_table(report: dict[str, Any]) -> str:
    c = report["config"]
    jx = report["jax"]
    m = jx["machine"]
    tr = report.get("zennit")
    lines = [
        f"ResNet-50 (Bottleneck v1.5, inference BatchNorm), batch {c['batch']}, {c['size']}x{c['size']}, float32, "
        f"{c['repeats']} interleaved rounds per library, target class {c['target']}  ",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu_model'] or m['processor']}), {m['memory_gib']} GiB, {m['platform']}; "
        f"python {m['python']}; jax {m['jax']}, flax {m['flax']}; jaxlrp {m['git_commit']}",
    ]
    load = (f"Load average (1 min): JAX phase {jx['load_average_before'][0]:.2f} -> "
            f"{jx['load_average_after'][0]:.2f}")
    if tr:
        tm_ = tr["machine"]
        lines[-1] += (f"; torch {tm_['torch']} ({tm_['torch_threads']} threads, OMP_WAIT_POLICY "
                      f"{tm_.get('omp_wait_policy')}), zennit {tm_['zennit']}  ")
        load += f"; torch phase {tr['load_average_before'][0]:.2f} -> {tr['load_average_after'][0]:.2f}"
    else:
        lines[-1] += "  "
    lines += [load + f"; whole run {report['wall_s'] / 60:.1f} min", ""]

    head = ("| method | jaxlrp ms median (min-max) | / jax.grad | goal | CPU / grad | memory / grad | convs (HLO) "
            "| compile s |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if tr:
        head += " Zennit ms median (min-max) | / torch grad | CPU / grad | Zennit / jaxlrp | max rel. diff R |"
        rule += "---:|---:|---:|---:|---:|"
    lines += [head, rule]
    for name, r in jx["results"].items():
        limit = r.get("time_limit")
        mark = "" if limit is None else (" ok" if r["within_time_limit"] else " **over**")
        mem = f"{r['memory_ratio']:.2f}x"
        if r.get("memory_limit") is not None:
            mem += " ok" if r["within_memory_limit"] else " **over**"
        label = {"forward": "forward", "grad": "gradient"}.get(name, name)
        row = (f"| {label} | {timing.ms_cell(r)} | {r['ratio']:.2f}x{mark} | {'' if limit is None else f'<= {limit:.1f}'} | "
               f"{r['cpu_ratio']:.2f}x | {mem} | {r['hlo']['convolution']} | {r['compile_s']:.1f} |")
        if tr:
            t = tr["results"].get(name)
            if t:
                diff = tr["crosscheck"]["relevance_max_rel_diff"].get(name)
                row += (f" {timing.ms_cell(t)} | {t['ratio']:.2f}x | {t['cpu_ratio']:.2f}x | "
                        f"{t['median_s'] / r['median_s']:.1f}x | {'' if diff is None else f'{diff:.1e}'} |")
            else:
                row += " | | | | |"
        lines.append(row)
    lines += [
        "",
        "Ratios are of medians, each library to its own gradient (jax.grad / torch.autograd.grad of the target "
        "logit w.r.t. the input; the LRP rows include the forward pass, as the gradients do). CPU: process CPU "
        "seconds per call, all threads. Memory: XLA buffer assignment (temp + argument + output). convs: "
        "convolutions in the optimized HLO (grad = 2 per conv layer). Compile: XLA compile time, not in the "
        "timings. Zennit / jaxlrp: Zennit's median over jaxlrp's. max rel. diff R: max|R_jaxlrp - R_Zennit| / "
        "max|R_Zennit| on the same weights and input.",
    ]
    if tr:
        cc = tr["crosscheck"]
        lines.append(f"Forward of the torch twin vs the linen model: max |diff| {cc['forward_max_abs_diff']:.1e} "
                     f"(max |logit| {cc['forward_max_abs']:.1f}).")
    if jx.get("profile"):
        from benchmarks import overhead

        lines += ["", "Where jaxlrp's time goes (--profile: mean of two profiled calls per method after the timed rounds; "
                  "XLA runs independent ops concurrently, so the rows can add up to more than the wall time):", "",
                  overhead.profile_table(jx["profile"])]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224, help="input height and width (multiple of 32)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved timing rounds per library (default 7, or 3 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: batch 1, 64x64, 3 rounds (overrides --batch/--size; default JSON resnet50_quick.json)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--target", type=int, default=0, help="explained class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", type=lambda s: tuple(m.strip() for m in s.split(",") if m.strip()),
                   default=ALL_METHODS, help=f"comma-separated subset of {','.join(ALL_METHODS)} (grad is required)")
    p.add_argument("--no-zennit", action="store_true", help="skip the torch/Zennit side")
    p.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads for the Zennit side")
    p.add_argument("--omp-wait-policy", choices=("passive", "active", "unset"), default="passive",
                   help="OMP_WAIT_POLICY of the torch worker (default passive: OpenMP threads sleep instead of "
                        "spinning at barriers; with spinning, Zennit's many small parallel regions ran up to 30x "
                        "slower whenever other jobs loaded the 2 cores); 'unset' leaves the environment as it is")
    p.add_argument("--json", default=None, help="where to write the JSON report ('' to skip; default "
                   "benchmarks/results/resnet50.json, or resnet50_quick.json with --quick)")
    p.add_argument("--dump-hlo", default="", help="folder to write each JAX method's optimized HLO into")
    p.add_argument("--profile", action="store_true",
                   help="after the timed rounds, profile each JAX method and report ms per HLO op category "
                        f"(sets XLA_FLAGS {'--xla_cpu_enable_xprof_traceme=true'} for this process)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.torch_worker:
        return args
    if args.quick:
        args.batch, args.size = 1, 64
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.json is None:
        args.json = str(RESULTS / ("resnet50_quick.json" if args.quick else "resnet50.json"))
    unknown = [m for m in args.methods if m not in ALL_METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
    if "grad" not in args.methods:
        p.error("--methods must include 'grad' (the baseline of every ratio)")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.repeats < 5 and not args.quick:
        print(f"warning: {args.repeats} rounds; medians are only meaningful with >= 5", file=sys.stderr)
    return args


def main(argv=None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.torch_worker:
        torch_worker(args.torch_worker)
        return None
    t_start = time.perf_counter()
    if args.profile:  # before JAX starts its backend (run_jax imports it)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
    jax_part, arrays = run_jax(args)
    zennit_part = None
    if not args.no_zennit:
        with tempfile.TemporaryDirectory(prefix="jaxlrp-resnet50-") as tmp:
            zennit_part = run_zennit_subprocess(args, arrays, Path(tmp))
    report = {
        "benchmark": "resnet50",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(__file__, _ROOT)] + list(sys.argv[1:] if argv is None else argv)),
        "config": {
            "model": "models.resnet50 (linen, Flax ImageNet example style, Bottleneck v1.5, inference BatchNorm)",
            "batch": args.batch,
            "size": args.size,
            "num_classes": args.num_classes,
            "target": arrays["target"],
            "repeats": args.repeats,
            "seed": args.seed,
            "methods": list(args.methods),
            "box": [BOX_LOW, BOX_HIGH],
            "params_as_jit_arguments": True,
            "memory": "compiled.memory_analysis(): temp + argument + output bytes",
        },
        "jax": jax_part,
        "zennit": zennit_part,
    }
    report["wall_s"] = time.perf_counter() - t_start
    print()
    print(markdown_table(report))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        report["markdown"] = markdown_table(report)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {path} (whole run {report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
