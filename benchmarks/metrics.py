"""Compiled pixel flipping (``jaxlrp.metrics.perturbation_curve``) against the per-step Python loop (issue 7, point 3).

Data: scikit-learn's digits (the first ``--batch`` images, default 128). Models (random seeded weights, parameters
passed as arguments): the quickstart CNN (two 3x3 convolutions with ReLU, 2x2 average pool, dense 64, dense 10) and
an MLP (64-64-10, ReLU). Relevance: ``jaxlrp.EpsilonPlusFlat`` for the predicted class, computed once before
timing. Most relevant pixels first, baseline 0:

- ``digits8``:  CNN on 8x8x1 images, 64 pixels, 64 steps of 1 pixel (the whole curve);
- ``digits32``: CNN on the images upsampled 4x (nearest neighbour) to 32x32x1, 1024 pixels, 64 steps of 16 pixels;
- ``digits-mlp``: the MLP on the 64 pixels as tabular features ``[B, 64]``, 64 steps of 1 feature;
- ``digits32-mlp``: the MLP on the 1024 pixels of the upsampled images as features ``[B, 1024]``, 1024 steps of 1
  feature (where the incremental first layer pays: ``perturbation_curve(..., incremental=None)``).

Methods, each returning the ``[B, steps + 1]`` curve as a NumPy array:

- ``compiled``: one ``metrics.perturbation_curve`` call as a user makes it (the model's trace made or reused, the
  cached executable looked up, the steps + 1 perturbed copies of the batch evaluated in one program: on a CPU by default
  in ``lax.map`` chunks of about 2^17 elements of the model's largest value per model call);
- ``compiled, in jax.jit``: the same call wrapped once in ``jax.jit`` (as for repeated calls): no per-call tracing;
- ``compiled, all at once``: the public call with ``chunk_size=steps + 1``: all copies in one vmapped model call
  (the accelerator default; on the incremental MLP path, all steps in one scan block);
- ``compiled, not incremental`` (MLPs only): the public call with ``incremental=False``: every copy through the
  whole model (for the MLPs the default evaluates the first dense layer incrementally where that pays);
- ``python loop``: what a user writes without it, and what Quantus' ``PixelFlipping`` does: sort the relevance on
  the host, then per step overwrite the next pixels in a NumPy copy of the batch and call the jitted model on it
  (``jax.jit(model.apply)``, compiled once before timing), reading the target scores back. The speedup is
  ``median(python loop) / median(compiled)``; goal >= 10x.
- ``torch loop``: the ``python loop`` with the PyTorch twin of the model (below) as the forward pass
  (``torch.no_grad``): separates the framework's share of Quantus' time from Quantus' own per-step work;
- ``model passes only``: not a method but the loop's compute: the ``steps + 1`` copies the loop evaluates, made on
  the host beforehand, through the jitted model in one program (``lax.map``, chunked as the library chunks them),
  target scores read back. ``loop / model passes`` is the most that any method running every copy through the whole
  model can gain over the loop on this machine; the FLOPs of those passes (XLA's cost analysis) at the machine's
  float32 matrix-product rate (``matmul_peak_gflops``, a 2048 x 2048 product in jit) bound it for an ideal model
  implementation (``compute_bound`` in the JSON, the second Markdown table);
- ``quantus``: Quantus 0.6 ``PixelFlipping`` (``features_in_step`` = pixels per step, ``perturb_baseline=0.0``,
  logits) on a PyTorch twin of the model with the same weights (CPU torch): the tool used for this today. Skipped
  when torch or quantus is missing. Its curve is checked against jaxlrp's too.

Both loops do the same steps + 1 forward passes of the batch as the compiled call, which does them in one program:
on a CPU, where a forward pass of a convolutional net over the batch takes milliseconds, that compute dominates and
the per-step overhead that compilation removes is small (``loop / model passes`` near 1); for a small model the
overhead dominates. Only skipping work gains more than ``loop / model passes``: the incremental first dense layer
(the MLP rows) does.

Timing: interleaved rounds (``timing.time_interleaved``), medians of ``--repeats`` rounds, after one warm-up call of
each method (compilation is reported separately); the JAX methods' rounds first, then the torch ones' (torch's
OpenMP threads spin for a while after each call and would slow a JAX call right after it). Before timing, the
compiled curve is checked against the loop's.

Usage::

    python benchmarks/metrics.py            # both configurations, 7 rounds -> benchmarks/results/metrics.json
    python benchmarks/metrics.py --quick    # batch 16, 3 rounds (a smoke run; not a measurement)

No assertion is made on the timings.
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

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import overhead, timing  # noqa: E402
from examples.quickstart import CNN  # noqa: E402  (the quickstart's digits CNN)

GOAL = 10.0
CONFIGS = {"digits8": {"upsample": 1, "steps": 64, "model": "cnn"},
           "digits32": {"upsample": 4, "steps": 64, "model": "cnn"},
           "digits-mlp": {"upsample": 1, "steps": 64, "model": "mlp"},
           "digits32-mlp": {"upsample": 4, "steps": 1024, "model": "mlp"}}


class MLP(nn.Module):
    """A digits MLP on flattened pixels."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


def torch_twin(params, cnn: bool):
    """The same function in PyTorch (channels-first input, as Quantus passes it)."""
    import torch

    p = jax.tree.map(lambda a: torch.from_numpy(np.array(a)), params["params"])

    def dense(x, name):
        return x @ p[name]["kernel"] + p[name]["bias"]

    class Twin(torch.nn.Module):
        def forward(self, x):
            x = x.float()
            if cnn:  # [B, 1, H, W]; flax convolutions: kernel HWIO, SAME padding
                for name in ("Conv_0", "Conv_1"):
                    w = p[name]["kernel"].permute(3, 2, 0, 1)
                    x = torch.relu(torch.nn.functional.conv2d(x, w, p[name]["bias"], padding=1))
                x = torch.nn.functional.avg_pool2d(x, 2)
                x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # flatten channels-last, like the flax model
                x = torch.relu(dense(x, "Dense_0"))
                return dense(x, "Dense_1")
            x = x.reshape(x.shape[0], -1)
            return dense(torch.relu(dense(x, "Dense_0")), "Dense_1")

    return Twin().eval()


def quantus_available() -> bool:
    try:
        import torch  # noqa: F401
        sys.path.insert(0, str(_ROOT / "tests"))
        from crosscheck import zennit_twins

        zennit_twins.install_torchvision_standin()  # quantus imports zennit, which imports torchvision
        import quantus  # noqa: F401
        return True
    except Exception as e:  # noqa: BLE001
        print(f"quantus baseline skipped: {type(e).__name__}: {e}", file=sys.stderr)
        return False


def load_digits_batch(batch: int, upsample: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    images = (load_digits().images[:batch] / 16.0).astype(np.float32)
    images = np.kron(images, np.ones((1, upsample, upsample), np.float32))
    return images[..., None]  # NHWC


def python_loop_curve(forward, params, x: np.ndarray, relevance: np.ndarray, target: np.ndarray, steps: int,
                      per_step: int) -> np.ndarray:
    """Pixel flipping as a per-step loop: host-side perturbation, one jitted model call per step."""
    batch = x.shape[0]
    rows = np.arange(batch)
    order = np.argsort(-relevance.reshape(batch, -1), axis=1, kind="stable")  # one channel: pixels
    flat = x.reshape(batch, -1).copy()
    scores = [np.asarray(forward(params, flat.reshape(x.shape)))[rows, target]]
    for k in range(steps):
        flat[rows[:, None], order[:, k * per_step:(k + 1) * per_step]] = 0.0
        scores.append(np.asarray(forward(params, flat.reshape(x.shape)))[rows, target])
    return np.stack(scores, axis=1)


def perturbed_copies(x: np.ndarray, relevance: np.ndarray, steps: int, per_step: int) -> np.ndarray:
    """The ``steps + 1`` copies of the batch that the loop evaluates, ``[steps + 1, *x.shape]`` (host)."""
    batch = x.shape[0]
    order = np.argsort(-relevance.reshape(batch, -1), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(order.shape[1])[None], axis=1)
    flat = x.reshape(batch, -1)
    copies = [np.where(rank < k * per_step, 0.0, flat).astype(x.dtype) for k in range(steps + 1)]
    return np.stack(copies).reshape((steps + 1,) + x.shape)


def forward_flops(apply, params, x) -> float:
    """Floating-point operations of one forward pass of the batch, as XLA's cost analysis counts them (a
    convolution's taps on the zero padding are not counted)."""
    analysis = jax.jit(apply).lower(params, x).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jaxlibs: one dict per computation
        analysis = analysis[0]
    return float(analysis["flops"])


def matmul_peak_gflops(size: int = 2048, repeats: int = 7) -> float:
    """This machine's float32 matrix-product rate in jit (``size`` x ``size`` operands, median of ``repeats``): the
    rate a compute-bound program could reach at best."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), jnp.float32)
    product = jax.jit(lambda a: a @ a)
    product(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        product(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * size ** 3 / float(np.median(times)) / 1e9


def measure(name: str, cfg: dict, batch: int, repeats: int, seed: int, with_quantus: bool, peak_gflops: float,
            log=print) -> dict[str, Any]:
    import jaxlrp
    from jaxlrp import metrics

    cnn = cfg["model"] == "cnn"
    steps = cfg["steps"]
    x_np = load_digits_batch(batch, cfg["upsample"])
    if not cnn:
        x_np = x_np.reshape(batch, -1)
    pixels = int(np.prod(x_np.shape[1:]))
    per_step = pixels // steps
    model = CNN() if cnn else MLP()
    params = model.init(jax.random.key(seed), x_np[:1])
    x = jnp.asarray(x_np)
    target = np.asarray(jnp.argmax(model.apply(params, x), axis=-1))
    relevance = jaxlrp.attribute(model.apply, x, jaxlrp.EpsilonPlusFlat(), target=target, params=params).relevance
    relevance_np = np.asarray(relevance)
    forward = jax.jit(model.apply)

    def compiled(chunk_size=None):
        return np.asarray(metrics.perturbation_curve(model.apply, x, relevance, target, params=params, steps=steps,
                                                     per_step=per_step, chunk_size=chunk_size))

    def loop():
        return python_loop_curve(forward, params, x_np, relevance_np, target, steps, per_step)

    in_jit = jax.jit(lambda p, xx, rr, tt: metrics.perturbation_curve(model.apply, xx, rr, tt, params=p, steps=steps,
                                                                      per_step=per_step))
    target_j = jnp.asarray(target)
    # the model's own forward passes over the loop's copies, made beforehand, in one program (chunked as the
    # library chunks them): what any method that runs every copy through the whole model costs at least
    largest = metrics._largest_value(jax.make_jaxpr(model.apply)(params, x), x)
    copies = jnp.asarray(perturbed_copies(x_np, relevance_np, steps, per_step))
    passes = jax.jit(lambda p, c, tt: jax.lax.map(
        lambda xx: jnp.take_along_axis(model.apply(p, xx), tt[:, None], axis=1)[:, 0], c,
        batch_size=metrics._auto_chunk(None, largest)).T)
    calls = {"compiled": compiled, "compiled, in jax.jit": lambda: np.asarray(in_jit(params, x, relevance, target_j)),
             "compiled, all at once": lambda: compiled(steps + 1), "python loop": loop,
             "model passes only": lambda: np.asarray(passes(params, copies, target_j))}
    if not cnn:
        calls["compiled, not incremental"] = lambda: np.asarray(metrics.perturbation_curve(
            model.apply, x, relevance, target, params=params, steps=steps, per_step=per_step, incremental=False))
    if with_quantus:
        import quantus
        import torch

        twin = torch_twin(params, cnn)
        x_cf = x_np.transpose(0, 3, 1, 2).copy() if cnn else x_np
        a_cf = relevance_np.transpose(0, 3, 1, 2).copy() if cnn else relevance_np
        pixel_flipping = quantus.PixelFlipping(features_in_step=per_step, perturb_baseline=0.0, normalise=False,
                                               disable_warnings=True)
        def torch_forward(_, xx):
            with torch.no_grad():
                out = twin(torch.from_numpy(xx.transpose(0, 3, 1, 2).copy() if cnn else xx))
            return out.numpy()

        calls["torch loop"] = lambda: python_loop_curve(torch_forward, None, x_np, relevance_np, target, steps,
                                                        per_step)
        calls["quantus"] = lambda: np.asarray(pixel_flipping(model=twin, x_batch=x_cf, y_batch=target, a_batch=a_cf,
                                                             channel_first=True, softmax=False, batch_size=batch))
    compile_s = {}
    for method, fn in calls.items():  # warm-up: compiles each once
        t0 = time.perf_counter()
        fn()
        compile_s[method] = time.perf_counter() - t0
    log(f"{name}: first calls (compilation included) " + ", ".join(f"{k} {v:.2f} s" for k, v in compile_s.items()))

    reference = loop()
    scale = float(np.abs(reference).max())
    max_diff = {m: float(np.abs(calls[m]() - reference).max()) / scale
                for m in calls if m.startswith("compiled") or m == "model passes only"}
    if with_quantus:  # Quantus' curve starts after the first step
        max_diff["quantus"] = float(np.abs(calls["quantus"]() - reference[:, 1:]).max()) / scale
        max_diff["torch loop"] = float(np.abs(calls["torch loop"]() - reference).max()) / scale

    load_before = timing.loadavg()
    # two phases, JAX then torch: torch's OpenMP threads keep spinning for a while after each torch call and took
    # the cores from a JAX call right after it (bimodal medians); PASSIVE waiting instead slowed torch itself 2-6x
    torch_side = ("torch loop", "quantus")
    times, cpu_times = timing.time_interleaved({k: v for k, v in calls.items() if k not in torch_side}, repeats, log)
    if with_quantus:
        more = timing.time_interleaved({k: calls[k] for k in torch_side}, repeats, log)
        times, cpu_times = times | more[0], cpu_times | more[1]
    load_after = timing.loadavg()
    stats = timing.summarise_times(times, cpu_times, baseline="compiled")
    speedup = stats["python loop"]["median_s"] / stats["compiled"]["median_s"]
    flops = forward_flops(model.apply, params, x)
    loop_s = stats["python loop"]["median_s"]
    return {
        "input": list(x_np.shape),
        "pixels": pixels,
        "steps": steps,
        "per_step": per_step,
        "model": "quickstart CNN" if cnn else "MLP 64-64-10",
        "dispatches_per_curve": {"compiled": 1, "python loop": steps + 1, "quantus": steps + 1},
        "default_chunk_size_steps": metrics._auto_chunk(None, largest),  # of the plain path, not the incremental's
        "forward_gflop": flops / 1e9,  # one forward pass of the batch (XLA's count)
        "compute_bound": {
            # the loop's time over that of its own forward passes run back to back in one program: the most any
            # method that runs every copy through the whole model can gain over the loop
            "loop_over_model_passes": loop_s / stats["model passes only"]["median_s"],
            "model_passes_gflops": (steps + 1) * flops / stats["model passes only"]["median_s"] / 1e9,
            # the same at this machine's matrix-product rate (an ideal model implementation)
            "loop_over_flops_at_matmul_peak": loop_s / ((steps + 1) * flops / (peak_gflops * 1e9)),
        },
        "first_call_s": compile_s,
        "max_abs_diff_over_max_abs_score": max_diff,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "timings": stats,
        "speedup": speedup,
        "speedup_min": stats["python loop"]["min_s"] / stats["compiled"]["min_s"],
        "speedup_in_jit": stats["python loop"]["median_s"] / stats["compiled, in jax.jit"]["median_s"],
        "speedup_all_at_once": stats["python loop"]["median_s"] / stats["compiled, all at once"]["median_s"],
        "cpu_speedup": stats["python loop"]["cpu_median_s"] / stats["compiled"]["cpu_median_s"],
        "speedup_vs_quantus": (stats["quantus"]["median_s"] / stats["compiled"]["median_s"]) if with_quantus else None,
        "within_goal": speedup >= GOAL,
    }


def markdown_table(report: dict[str, Any]) -> str:
    c, m = report["config"], report["machine"]
    lines = [
        f"Pixel flipping, compiled vs per-step Python loops: digits, batch {c['batch']}, most relevant first, "
        f"baseline 0, {c['repeats']} interleaved rounds  ",
        f"Machine: {m['cpu_count']} CPUs ({m['processor']}); jax {m['jax']}; jaxlrp {m['git_commit']}",
        "",
        "| model, input | steps x pixels | compiled ms | in jax.jit ms | all at once ms | not incremental ms | "
        "python loop ms | speedup | goal | CPU-time speedup | torch loop ms | Quantus ms | speedup vs Quantus | "
        "max diff / max score | load avg (1 min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["results"].items():
        t = r["timings"]
        mark = "ok" if r["within_goal"] else "**under**"
        vs_quantus = f"{r['speedup_vs_quantus']:.1f}x" if r["speedup_vs_quantus"] else ""
        lines.append(
            f"| {r['model']}, {name} {'x'.join(map(str, r['input'][1:]))} | {r['steps']} x {r['per_step']} | "
            f"{timing.ms_cell(t['compiled'])} | {timing.ms_cell(t['compiled, in jax.jit'])} | "
            f"{timing.ms_cell(t['compiled, all at once'])} | {timing.ms_cell(t.get('compiled, not incremental'))} | "
            f"{timing.ms_cell(t['python loop'])} | {r['speedup']:.1f}x | >= {GOAL:g}x {mark} | "
            f"{r['cpu_speedup']:.1f}x | "
            f"{timing.ms_cell(t.get('torch loop'))} | {timing.ms_cell(t.get('quantus'))} | {vs_quantus} | "
            f"{max(r['max_abs_diff_over_max_abs_score'].values()):.1e} | "
            f"{r['load_average_before'][0]:.1f} -> {r['load_average_after'][0]:.1f} |")
    lines += [
        "",
        f"Where the loop's time goes: its forward passes alone (the loop's copies, made beforehand, through the jitted "
        f"model in one program) and their FLOPs at this machine's float32 matrix-product rate "
        f"({c['matmul_peak_gflops']:.0f} GFLOP/s in jit). A method that runs every copy through the whole model gains "
        f"at most `loop / model passes` over the loop; only skipping work (the incremental first dense layer) "
        f"goes beyond.",
        "",
        "| model, input | GFLOP per forward | model passes only ms | their GFLOP/s | loop / model passes | "
        "loop / FLOPs at matmul peak | compiled speedup |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["results"].items():
        b = r["compute_bound"]
        lines.append(
            f"| {r['model']}, {name} | {r['forward_gflop']:.3f} | {timing.ms_cell(r['timings']['model passes only'])} "
            f"| {b['model_passes_gflops']:.0f} | {b['loop_over_model_passes']:.1f}x | "
            f"{b['loop_over_flops_at_matmul_peak']:.1f}x | {r['speedup']:.1f}x |")
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7; >= 5)")
    ap.add_argument("--configs", type=lambda s: tuple(v.strip() for v in s.split(",") if v.strip()),
                    default=tuple(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--quick", action="store_true", help="batch 16, 3 rounds: a smoke run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-quantus", action="store_true", help="skip the Quantus baseline")
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default benchmarks/results/metrics.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch = 16
    repeats = args.repeats or (3 if args.quick else 7)
    out = args.out or _ROOT / "benchmarks" / "results" / ("metrics_quick.json" if args.quick else "metrics.json")
    with_quantus = not args.no_quantus and quantus_available()
    peak = matmul_peak_gflops()
    print(f"float32 matrix product in jit: {peak:.0f} GFLOP/s")
    results = {name: measure(name, CONFIGS[name], args.batch, repeats, args.seed, with_quantus, peak)
               for name in args.configs}
    report = {
        "benchmark": "metrics",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {"models": "quickstart CNN / MLP 64-64-10 (random weights)", "data": "sklearn digits",
                   "batch": args.batch, "quantus": timing.dist_version("quantus") if with_quantus else None,
                   "torch": timing.dist_version("torch") if with_quantus else None,
                   "repeats": repeats, "seed": args.seed, "goal": GOAL, "order": "morf", "baseline": "zeros",
                   "relevance": "EpsilonPlusFlat, predicted class", "params_as_jit_arguments": True,
                   "matmul_peak_gflops": peak},
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
