"""Throughput of LRP on a data-parallel mesh against the number of devices (the scale-out figure).

For each device count n (1, 2, 4, 8 by default) a fresh worker process builds a 1-D mesh ``("data",)`` of n devices
(``AxisType.Auto``), replicates a small ResNet's variables on it and shards a batch of ``n * --batch-per-device``
images over it (``NamedSharding(mesh, P("data"))``: weak scaling, the work per device stays fixed). It times three
jitted functions of ``(variables, x)`` in interleaved rounds (``timing.time_interleaved``: medians over ``--repeats``
rounds after compilation and one warm-up call): ``forward`` (``model.apply``), ``grad`` (``jax.grad`` of the
explained score with respect to the input) and ``lrp`` (the same gradient through the unchanged
``jaxlrp.lrp(f, composite)``, EpsilonPlusFlat by default). Throughput is the global batch over the median time.

The model is ResNet-18's layout from ``examples/models/resnet.py`` (basic blocks [2, 2, 2, 2], inference BatchNorm,
CIFAR-style 3x3 stem) at width ``--width`` (8) on ``--size`` x ``--size`` (32) inputs, 10 classes.

On the CPU, the devices are simulated (``XLA_FLAGS=--xla_force_host_platform_device_count=n``, set before the
worker imports JAX; the count is fixed at start-up, hence one process per count). **Simulated devices share the
host's cores**: on a 2-core machine, 8 simulated devices run on the same 2 cores as one device does, so the figure
shows that the sharded program runs and what partitioning costs (throughput flat or falling with n), not a speedup.
The right panel, LRP time over gradient time per device count, is the number that should stay put under sharding.
On a GPU (JAX's default backend when one is present) the worker uses the first n real devices and skips counts
larger than the host has; the JSON and the figure name the device.

Outputs: ``benchmarks/results/scaling.json`` (all timings, the host, the device) and ``scaling.png``
(``--out`` sets the stem). The default run takes 1-2 minutes on 2 CPU cores (compilation is a large part of it);
``--quick`` (1 and 8 devices, 3 rounds, width 4, 16 x 16 inputs) is a smoke run of under a minute. The committed
results were measured on a shared 2-core machine under load (``loadavg_before_after`` in the JSON): read the medians
as indicative only.

Usage::

    python benchmarks/scaling.py
    python benchmarks/scaling.py --devices 1,2,4,8,16 --batch-per-device 16 --repeats 9
    python benchmarks/scaling.py --quick --out /tmp/scaling

No assertion is made on the timings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script: make `benchmarks`, `examples` and the local `jaxlrp` importable
  sys.path.insert(0, str(_ROOT))

from benchmarks import timing  # noqa: E402  (imports neither JAX nor torch: safe before XLA_FLAGS is set)

DEFAULT_OUT = _ROOT / "benchmarks" / "results" / "scaling"
METHODS = ("forward", "grad", "lrp")


# ----------------------------------------------------------------------------------------------------------------
# Worker: one device count, in a process of its own
# ----------------------------------------------------------------------------------------------------------------


def worker(n_devices: int, args: argparse.Namespace) -> dict:
  """Times forward / grad / lrp on a mesh of `n_devices`; JAX must not have been imported with other flags."""
  import time

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import jaxlrp
  from examples.models import resnet

  devices = jax.devices()
  if len(devices) < n_devices:
    return {"devices": n_devices, "skipped": f"only {len(devices)} {devices[0].platform} devices"}
  mesh = jax.make_mesh((n_devices,), ("data",), axis_types=(AxisType.Auto,), devices=devices[:n_devices])
  model = resnet.ResNet18(num_classes=10, num_filters=args.width, small_inputs=True)
  batch = n_devices * args.batch_per_device
  model, variables = resnet.init(model, (batch, args.size, args.size, 3), seed=0)
  x = np.random.default_rng(1).normal(0.0, 1.0, (batch, args.size, args.size, 3)).clip(-3, 3).astype(np.float32)
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  x = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data")))

  f = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
  composite = getattr(jaxlrp, args.composite)(*((-3.0, 3.0) if args.composite == "EpsilonGammaBox" else ()))
  g = jaxlrp.lrp(f, composite, argnums=1)
  target = 3
  fns = {
      "forward": jax.jit(f),
      "grad": jax.jit(jax.grad(lambda v, x: f(v, x)[:, target].sum(), argnums=1)),
      "lrp": jax.jit(jax.grad(lambda v, x: g(v, x)[:, target].sum(), argnums=1)),
  }
  compile_s, compiled = {}, {}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    compiled[name] = fn.lower(variables, x).compile()
    compile_s[name] = time.perf_counter() - t0
  out_specs = {}
  for name, fn in compiled.items():  # warm-up; record where the result lives
    out = jax.block_until_ready(fn(variables, x))
    out_specs[name] = str(out.sharding.spec) if isinstance(out.sharding, NamedSharding) else str(out.sharding)
  calls = {name: (lambda fn=fn: jax.block_until_ready(fn(variables, x))) for name, fn in compiled.items()}
  times, cpu_times = timing.time_interleaved(calls, args.repeats, log=lambda *a: None)
  summary = timing.summarise_times(times, cpu_times, baseline="grad")
  return {
      "devices": n_devices,
      "global_batch": batch,
      "platform": devices[0].platform,
      "device_kind": devices[0].device_kind,
      "compile_s": compile_s,
      "out_sharding": out_specs,
      "methods": {name: {"median_s": r["median_s"], "min_s": r["min_s"], "max_s": r["max_s"],
                         "times_s": r["times_s"], "ratio_to_grad": r["ratio"],
                         "samples_per_s": batch / r["median_s"]} for name, r in summary.items()},
  }


def run_worker(n_devices: int, argv: list[str]) -> dict:
  """Starts a worker process for `n_devices` (simulated CPU devices unless JAX_PLATFORMS names another backend)."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n_devices}"])
  proc = subprocess.run([sys.executable, __file__, "--worker", str(n_devices), *argv], env=env, cwd=_ROOT,
                        capture_output=True, text=True)
  if proc.returncode:
    return {"devices": n_devices, "error": proc.stderr[-2000:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
  lines = ["| devices | global batch | " + " | ".join(f"{m} samples/s" for m in METHODS) + " | lrp / grad | "
           "lrp compile s |", "|" + "---|" * (len(METHODS) + 4)]
  for r in rows:
    if "methods" not in r:
      lines.append(f"| {r['devices']} | " + (r.get("skipped") or "error") + " |")
      continue
    m = r["methods"]
    lines.append(f"| {r['devices']} | {r['global_batch']} | "
                 + " | ".join(f"{m[k]['samples_per_s']:.1f}" for k in METHODS)
                 + f" | {m['lrp']['ratio_to_grad']:.2f} | {r['compile_s']['lrp']:.1f} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ok = [r for r in rows if "methods" in r]
  n = [r["devices"] for r in ok]
  fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(10, 4))
  for method, marker in zip(METHODS, "osD"):
    tp = [r["methods"][method]["samples_per_s"] for r in ok]
    lo = [r["global_batch"] / r["methods"][method]["max_s"] for r in ok]
    hi = [r["global_batch"] / r["methods"][method]["min_s"] for r in ok]
    ax.plot(n, tp, marker=marker, label=method)
    ax.fill_between(n, lo, hi, alpha=0.15)
  ax.set_xscale("log", base=2)
  ax.set_xticks(n, [str(k) for k in n])
  ax.set_xlabel("devices (batch sharded over 'data')")
  ax.set_ylabel("samples / s (median; band: min-max)")
  ax.set_ylim(bottom=0)
  ax.legend()
  ax.grid(alpha=0.3)
  ax_ratio.plot(n, [r["methods"]["lrp"]["ratio_to_grad"] for r in ok], marker="D", color="C2")
  ax_ratio.set_xscale("log", base=2)
  ax_ratio.set_xticks(n, [str(k) for k in n])
  ax_ratio.set_xlabel("devices")
  ax_ratio.set_ylabel("lrp time / grad time")
  ax_ratio.set_ylim(bottom=0)
  ax_ratio.grid(alpha=0.3)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
  parser.add_argument("--batch-per-device", type=int, default=16)
  parser.add_argument("--size", type=int, default=32, help="input height and width")
  parser.add_argument("--width", type=int, default=8, help="ResNet-18 base width (64 in the paper)")
  parser.add_argument("--composite", default="EpsilonPlusFlat", help="a jaxlrp preset name")
  parser.add_argument("--repeats", type=int, default=9, help="timed rounds per device count")
  parser.add_argument("--quick", action="store_true", help="1 and 8 devices, 3 rounds, width 4, 16x16 inputs")
  parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output stem (.json and .png are added)")
  parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.devices, args.repeats, args.width, args.size = "1,8", 3, 4, 16
  return args


def worker_argv(args: argparse.Namespace) -> list[str]:
  return ["--batch-per-device", str(args.batch_per_device), "--size", str(args.size), "--width", str(args.width),
          "--composite", args.composite, "--repeats", str(args.repeats)]


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  if args.worker is not None:
    print(json.dumps(worker(args.worker, args)))
    return []
  rows, load_before = [], timing.loadavg()
  for n in (int(k) for k in args.devices.split(",")):
    print(f"{n} device(s) ...", flush=True)
    rows.append(run_worker(n, worker_argv(args)))
    if "error" in rows[-1]:
      print(rows[-1]["error"], file=sys.stderr)
  first = next((r for r in rows if "methods" in r), {})
  kind, platform = first.get("device_kind", "?"), first.get("platform", "?")
  device = platform if kind == platform else f"{platform} ({kind})"
  host = timing.host_info()
  simulated = first.get("platform") == "cpu"
  title = (f"ResNet-18 layout, width {args.width}, {args.size}x{args.size}, {args.batch_per_device} images per device, "
           f"{args.composite}; {device}{', simulated devices' if simulated else ''}; "
           f"{host['cpu_count']} CPU cores: {host['cpu_model']}")
  result = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "config": {k: v for k, v in vars(args).items() if k not in ("out", "worker")},
      "device": device,
      "simulated_devices": simulated,
      "host": host,
      "loadavg_before_after": [load_before, timing.loadavg()],
      "rows": rows,
      "note": ("Simulated CPU devices share the host's cores: the figure shows the sharded program running and its "
               "partitioning overhead, not a speedup." if simulated else ""),
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
  print(table(rows))
  if any("methods" in r for r in rows):
    plot(rows, args.out.with_suffix(".png"), title)
  print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
  return rows


if __name__ == "__main__":
  main()
