"""What every benchmark shares: the machine line, alternated timing, and output files."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence

import jax

from deltamem_jax.utils.atomic import atomic_write_text

# ---------------------------------------------------------------------------
# Machine description


def _proc_field(path: str, key: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """CPU model, cores, memory, load, JAX version and backend, date (UTC)."""
    mem_total = _proc_field("/proc/meminfo", "MemTotal")
    mem_avail = _proc_field("/proc/meminfo", "MemAvailable")
    kib = lambda s: int(s.split()[0]) * 1024 if s else None  # noqa: E731
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or "unknown CPU",
        "cores": os.cpu_count(),
        "mem_total_bytes": kib(mem_total),
        "mem_available_bytes": kib(mem_avail),
        "load_avg_1min": load,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(m: dict) -> str:
    mem = (f", {m['mem_total_bytes'] / 2**30:.0f} GiB RAM" if m.get("mem_total_bytes") else "")
    load = (f", load avg {m['load_avg_1min']:.1f} at start"
            if m.get("load_avg_1min") is not None else "")
    if m.get("load_avg_1min_end") is not None:
        load += f", {m['load_avg_1min_end']:.1f} at end"
    return (f"Machine: {m['cpu']}, {m['cores']} cores{mem}; jax {m['jax']} "
            f"({m['backend']}); {m['date']}{load}")


# ---------------------------------------------------------------------------
# Timing


def time_call(fn: Callable, args: Sequence, repeats: int, max_seconds: float = 60.0) -> dict:
    """Median wall time of ``fn(*args)`` (blocking) after two warm-up calls.

    Runs ``repeats`` times, fewer (but at least 3, or 1 if ``repeats`` is 1) when
    one call is so slow that ``repeats`` of them would exceed ``max_seconds``.
    """
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    warm = time.perf_counter() - t0
    n = repeats
    if warm * repeats > max_seconds:
        n = max(min(3, repeats), int(max_seconds / max(warm, 1e-9)))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"ms": 1e3 * statistics.median(times), "runs": n,
            "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times)}


def time_pair(fn_a: Callable, args_a: Sequence, fn_b: Callable, args_b: Sequence,
              repeats: int, max_seconds: float = 120.0) -> dict:
    """Median times of two calls measured alternately, and the median of their ratios.

    Alternating a, b, a, b, … exposes both to the same machine drift, so the
    ratio ``b / a`` (an overhead) is far steadier than two separate medians.
    """
    for fn, args in ((fn_a, args_a), (fn_b, args_b)):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn_a(*args_a))
    jax.block_until_ready(fn_b(*args_b))
    warm = time.perf_counter() - t0
    n = repeats
    if warm * repeats > max_seconds:
        n = max(min(3, repeats), int(max_seconds / max(warm, 1e-9)))
    a_times, b_times = [], []
    for _ in range(n):
        for fn, args, times in ((fn_a, args_a, a_times), (fn_b, args_b, b_times)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
    return {"a_ms": 1e3 * statistics.median(a_times), "b_ms": 1e3 * statistics.median(b_times),
            "ratio": statistics.median(b / a for a, b in zip(a_times, b_times)), "runs": n}



def emit_outputs(table: str, record: dict, args) -> None:
    """Print the markdown table; write it to ``--markdown`` and ``record`` to ``--json``."""
    print()
    print(table)
    if args.markdown:
        atomic_write_text(args.markdown, table)
    if args.json:
        atomic_write_text(args.json, json.dumps(record, indent=1, default=str))
