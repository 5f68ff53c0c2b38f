"""Memory of LRP on a ``jax.checkpoint``-ed 24-layer stack, relative to ``jax.grad`` of the same function.

The stack is 24 residual MLP blocks ``x + relu(relu(x W1) W2)`` (width ``--width``, hidden ``4 x width``), each
wrapped in ``jax.checkpoint`` with a policy (``nothing_saveable`` by default). jaxlrp keeps every checkpointed body
checkpointed (re-wrapped with the same policy around the interpreted body), so its rule ops' residuals are
recomputed in the backward pass like the model's own. Memory is XLA's static buffer assignment
(``compiled.memory_analysis()``: temp + argument + output bytes) of the jitted relevance function, as a ratio to
that of ``jax.grad`` of the same scalar; the same stack without ``jax.checkpoint`` is measured too, so the table
shows what checkpointing saves on the backend at hand. Times (medians of interleaved rounds) are reported as well.

Usage::

        python benchmarks/remat.py            # batch 64, width 512, 24 blocks -> benchmarks/results/remat.json
        python benchmarks/remat.py --quick    # batch 8, width 64, 5 rounds

No assertion is made; the table marks memory ratios above the goal (1.2x).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import overhead, timing  # noqa: E402

MEMORY_GOAL = 1.2
POLICIES = {
        "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
        "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def composites():
    import jaxlrp

    return {
            "Epsilon": jaxlrp.Composite(("dense", jaxlrp.Epsilon())),
            "ZPlus": jaxlrp.Composite(("dense", jaxlrp.ZPlus())),
            "Gamma": jaxlrp.Composite(("dense", jaxlrp.Gamma())),
            "AlphaBeta": jaxlrp.Composite(("dense", jaxlrp.AlphaBeta())),
    }


def stack(policy):
    """The 24-block function ``(params, x) -> y``; ``policy=None`` leaves the blocks unchecked."""

    def block(w, x):
        return x + jax.nn.relu(jax.nn.relu(x @ w[0]) @ w[1])

    wrapped = block if policy is None else jax.checkpoint(block, policy=policy)

    def f(params, x):
        for w in params:
            x = wrapped(w, x)
        return x

    return f


def build(policy, depth: int) -> dict:
    import jaxlrp

    f = stack(policy)
    fns = {"grad": jax.jit(jax.grad(lambda p, x: f(p, x)[:, 0].sum(), argnums=1))}
    for name, comp in composites().items():
        g = jaxlrp.lrp(f, comp, argnums=1)
        fns[name] = jax.jit(jax.grad(lambda p, x, g=g: g(p, x)[:, 0].sum(), argnums=1))
    return fns


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--policy", choices=sorted(POLICIES), default="nothing_saveable")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    batch = args.batch or (8 if args.quick else 64)
    width = args.width or (64 if args.quick else 512)
    repeats = args.repeats or (3 if args.quick else 5)
    out = args.out or _ROOT / "benchmarks" / "results" / ("remat_quick.json" if args.quick else "remat.json")

    rng = np.random.default_rng(0)
    params = [(jnp.asarray(rng.standard_normal((width, 4 * width)) / np.sqrt(width), jnp.float32),
                          jnp.asarray(rng.standard_normal((4 * width, width)) / np.sqrt(4 * width) * 0.3, jnp.float32))
                        for _ in range(args.depth)]
    x = jnp.asarray(rng.standard_normal((batch, width)), jnp.float32)
    results: dict = {}
    for label, policy in (("checkpointed", POLICIES[args.policy]), ("plain", None)):
        fns = build(policy, args.depth)
        compiled = {name: fn.lower(params, x).compile() for name, fn in fns.items()}
        memory = {name: overhead.memory_summary(c)["total"] for name, c in compiled.items()}
        for c in compiled.values():
            jax.block_until_ready(c(params, x))
        times, cpu = timing.time_interleaved({n: (lambda c=c: jax.block_until_ready(c(params, x)))
                                                                                    for n, c in compiled.items()}, repeats, log=lambda *a: None)
        summary = timing.summarise_times(times, cpu, "grad")
        results[label] = {n: {"memory_bytes": memory[n], "memory_ratio": memory[n] / memory["grad"],
                                                    "median_s": summary[n]["median_s"], "ratio": summary[n]["ratio"]} for n in fns}
    report = {
            "benchmark": "remat",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": {"batch": batch, "width": width, "hidden": 4 * width, "depth": args.depth,
                                  "policy": args.policy, "repeats": repeats, "memory_goal": MEMORY_GOAL},
            "machine": overhead.machine_info(),
            "load_average": timing.loadavg(),
            "results": results,
    }
    print(markdown_table(report))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


def markdown_table(report: dict) -> str:
    cfg = report["config"]
    lines = [f"{cfg['depth']} residual MLP blocks, batch {cfg['batch']}, width {cfg['width']}, "
                      f"jax.checkpoint(policy={cfg['policy']}); memory = compiled temp + argument + output bytes",
                      "", "| method | checkpointed MiB | x grad | plain MiB | x grad | checkpointed time x grad |",
                      "|---|---:|---:|---:|---:|---:|"]
    ck, pl = report["results"]["checkpointed"], report["results"]["plain"]
    for name in ck:
        flag = " (over goal)" if ck[name]["memory_ratio"] > cfg["memory_goal"] else ""
        lines.append(f"| {name} | {ck[name]['memory_bytes'] / 2**20:.1f} | {ck[name]['memory_ratio']:.2f}{flag} | "
                                  f"{pl[name]['memory_bytes'] / 2**20:.1f} | {pl[name]['memory_ratio']:.2f} | "
                                  f"{ck[name]['ratio']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
