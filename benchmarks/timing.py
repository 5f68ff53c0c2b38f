"""Framework-neutral benchmark machinery: interleaved timing rounds, summary statistics, host description.

Shared by the JAX benchmarks (``overhead.py``, ``resnet50.py``) and the PyTorch/Zennit side of ``resnet50.py``,
which runs in a subprocess that must not import JAX. Nothing here imports JAX or torch.

Timing protocol (``time_interleaved``): every round calls every method once, with the order rotated from round to
round, so that drift in machine load hits all methods alike. Each call must block until its result is ready (the
callables do their own synchronisation). Wall-clock time (``perf_counter``) and process CPU time (``process_time``,
all threads) are recorded per call.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any, Callable

_ROOT = Path(__file__).resolve().parent.parent


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (NaN where the platform has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return [float("nan")] * 3


def time_interleaved(calls: dict[str, Callable[[], Any]], repeats: int,
                     log: Callable[..., None] = print,
                     around: dict[str, Callable[[], Any]] | None = None,
                     ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time every callable ``repeats`` times in interleaved, rotated rounds; return (wall times, CPU times) in s.

    Each callable must return only once its work is done (``block_until_ready`` for JAX; torch on CPU is
    synchronous). Results are dropped right after each call. ``around[name]``, if given, makes a context manager
    that is entered before and exited after each call of ``name``, outside the timed region (e.g. registering
    a Zennit composite only while its call runs).
    """
    import contextlib
    import time

    around = around or {}

    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = calls[name]
            with (around[name]() if name in around else contextlib.nullcontext()):
                c0, t0 = time.process_time(), time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)
                del out
        log(f"  round {r + 1}/{repeats}: " + "  ".join(f"{n} {times[n][-1] * 1e3:.0f}" for n in names) + " ms")
    return times, cpu_times


def summarise_times(times: dict[str, list[float]], cpu_times: dict[str, list[float]],
                    baseline: str) -> dict[str, dict[str, Any]]:
    """Per method: the samples, median/min/max, and ratios of median (and min, and CPU-time median) to ``baseline``."""
    base_median = statistics.median(times[baseline])
    base_min = min(times[baseline])
    base_cpu = statistics.median(cpu_times[baseline])
    out: dict[str, dict[str, Any]] = {}
    for name, t in times.items():
        cpu = cpu_times[name]
        res: dict[str, Any] = {
            "times_s": t,
            "median_s": statistics.median(t),
            "min_s": min(t),
            "max_s": max(t),
            "cpu_times_s": cpu,
            "cpu_median_s": statistics.median(cpu),
        }
        res["ratio"] = res["median_s"] / base_median
        res["ratio_min"] = res["min_s"] / base_min
        res["cpu_ratio"] = res["cpu_median_s"] / base_cpu
        out[name] = res
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def git_commit() -> str | None:
    """Short commit of the repository, with ``+dirty`` when the working tree has changes."""
    try:
        out = subprocess.run(["git", "-C", str(_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(_ROOT), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10)
        if out.returncode:
            return None
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def host_info() -> dict[str, Any]:
    """The machine and Python, without any framework."""
    import numpy as np

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round((total_memory_bytes() or 0) / 2**30, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "git_commit": git_commit(),
    }


# ----------------------------------------------------------------------------------------------------------------
# Process memory and package versions (the torch workers' side; Linux /proc, NaN elsewhere)
# ----------------------------------------------------------------------------------------------------------------

def status_kib(field: str) -> float:
    """A ``/proc/self/status`` field in KiB (e.g. ``VmRSS``), NaN where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def rss_mib() -> float:
    return status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    return status_kib("VmHWM") / 1024


def reset_peak_rss() -> None:
    try:  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def dist_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def ms_cell(r: dict | None) -> str:
    """A table cell ``median (min-max)`` in ms from a ``summarise_times`` entry ('' when there is none)."""
    if not r or "median_s" not in r:
        return ""
    f = ".1f" if r["median_s"] < 0.01 else ".0f"  # a few ms: one decimal
    return f"{r['median_s'] * 1e3:{f}} ({r['min_s'] * 1e3:{f}}-{r['max_s'] * 1e3:{f}})"


def log_fn(args):
    """``print``, or a no-op when ``args.quiet``."""
    return print if not args.quiet else (lambda *a, **k: None)
