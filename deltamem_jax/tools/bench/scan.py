"""``bench scan``: the OSAM recurrence (:func:`deltamem_jax.memory.osam.osam_scan`) by method and
sequence length: forward and forward+backward wall time (jit-compiled, warmed up,
median of several runs), the ratio to ``sequential``, peak memory from the
compiled executable's memory analysis, FLOPs with loop bodies counted trip-count
times, and serial depth (loop trip count). A case whose compiled program needs
more memory than the budget is reported as ``n/a (reason)`` instead of run.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deltamem_jax.memory import osam
from deltamem_jax.tools.bench.common import emit_outputs, machine_info, machine_line, time_call
from deltamem_jax.tools.bench.hlo_stats import compiled_stats

SCAN_METHODS = ("auto", "sequential", "associative", "chunked")
DEFAULT_T = (1024, 4096, 16384, 65536)
DEFAULT_CHUNK_SIZES = (16, 64)
_MB = 2 ** 20


# ---------------------------------------------------------------------------
# scan


def scan_inputs(T: int, batch: int, rank: int, seed: int = 0) -> tuple:
    """(q, k, v, beta, lam, s0) for ``osam_scan``: ``[batch, T, rank]`` float32.

    Unit-norm q and k, normal v, uncoupled sigmoid gates, a non-zero initial state.
    """
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    shape = (batch, T, rank)
    arrays = (unit(rng.normal(size=shape)), unit(rng.normal(size=shape)),
              rng.normal(size=shape), sig(rng.normal(size=shape)),
              sig(rng.normal(size=shape)), 0.1 * rng.normal(size=(batch, rank, rank)))
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def scan_functions(method: str, chunk_size: int | None):
    """(forward, forward+backward) functions of (q, k, v, beta, lam, s0).

    ``chunk_size=None`` uses ``osam_scan``'s default, as a caller would.
    """
    kw = {} if chunk_size is None else {"chunk_size": chunk_size}

    def forward(q, k, v, beta, lam, s0):
        return osam.osam_scan(q, k, v, beta, lam, initial_state=s0, method=method, **kw)

    def loss(*a):
        reads, state = forward(*a)
        return jnp.sum(reads) + jnp.sum(state)

    return forward, jax.value_and_grad(loss, argnums=tuple(range(6)))


def _na(reason: str) -> dict:
    return {"ms": None, "na": reason}


def _measure(fn, args, repeats, mem_budget, max_seconds) -> dict:
    """Compile, read the cost figures, and time one function (or say why not)."""
    try:
        compiled = jax.jit(fn).lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - a failed compile is a table entry
        return _na(f"compile failed: {type(e).__name__}")
    out = compiled_stats(compiled)
    if out["peak_bytes"] > mem_budget:
        out.update(_na(f"needs {out['peak_bytes'] / 2**30:.1f} GiB > "
                       f"{mem_budget / 2**30:.1f} GiB budget"))
        return out
    try:
        out.update(time_call(compiled, args, repeats, max_seconds))
    except Exception as e:  # noqa: BLE001 - e.g. RESOURCE_EXHAUSTED at run time
        out.update(_na(f"run failed: {type(e).__name__}"))
    del compiled
    gc.collect()
    return out


def bench_scan_case(method: str, T: int, batch: int = 8, rank: int = 8,
                    chunk_size: int | None = None, repeats: int = 7,
                    mem_budget: float | None = None, max_seconds: float = 60.0) -> dict:
    """One table row: forward and forward+backward figures of one method at one T."""
    if mem_budget is None:
        mem_budget = default_mem_budget()
    args = scan_inputs(T, batch, rank)
    fwd, fb = scan_functions(method, chunk_size)
    row = {"T": T, "method": method, "resolved": osam.resolve_method(method),
           "chunk_size": chunk_size, "batch": batch, "rank": rank}
    row["fwd"] = _measure(fwd, args, repeats, mem_budget, max_seconds)
    row["fwd_bwd"] = _measure(fb, args, repeats, mem_budget, max_seconds)
    return row


def default_mem_budget() -> float:
    """Half the memory available now (other work shares the machine)."""
    avail = machine_info().get("mem_available_bytes")
    return 0.5 * avail if avail else 8 * 2 ** 30


def scan_cases(methods: Sequence[str], chunk_sizes: Sequence[int]):
    """(method, chunk_size) pairs: chunked once per chunk size, others at the default."""
    for m in methods:
        if m == "chunked":
            for c in chunk_sizes:
                yield m, c
        else:
            yield m, None


def run_scan(T_list: Sequence[int] = DEFAULT_T, batch: int = 8, rank: int = 8,
             methods: Sequence[str] = SCAN_METHODS,
             chunk_sizes: Sequence[int] = DEFAULT_CHUNK_SIZES, repeats: int = 7,
             mem_budget: float | None = None, max_seconds: float = 60.0,
             log: Callable[[str], None] | None = None) -> list:
    """All rows (T-major), each with its ratio to ``sequential`` at the same T."""
    if mem_budget is None:
        mem_budget = default_mem_budget()
    rows = []
    for T in T_list:
        block = []
        for method, c in scan_cases(methods, chunk_sizes):
            t0 = time.perf_counter()
            row = bench_scan_case(method, T, batch, rank, c, repeats, mem_budget, max_seconds)
            block.append(row)
            if log:
                log(f"  T={T} {_label(row)}: fwd {_ms(row['fwd'])}, "
                    f"fwd+bwd {_ms(row['fwd_bwd'])} ({time.perf_counter() - t0:.0f} s)")
        seq = next((r for r in block if r["method"] == "sequential"), None)
        for row in block:
            for kind in ("fwd", "fwd_bwd"):
                base = seq[kind]["ms"] if seq else None
                mine = row[kind]["ms"]
                row[kind]["ratio_to_sequential"] = (mine / base if base and mine else None)
        rows.extend(block)
    return rows


def _label(row: dict) -> str:
    if row["method"] == "auto":
        return f"auto → {row['resolved']}"
    if row["method"] == "chunked":
        return f"chunked (C={row['chunk_size']})"
    return row["method"]


def _ms(m: dict) -> str:
    if m.get("ms") is None:
        return f"n/a ({m.get('na', 'not run')})"
    return f"{m['ms']:,.1f}" if m["ms"] < 100 else f"{m['ms']:,.0f}"


def scan_checks(rows: list) -> list:
    """The goals read off one run: auto vs fastest, growth in T, depth of chunked."""
    lines = []
    Ts = sorted({r["T"] for r in rows})
    for T in Ts:
        block = [r for r in rows if r["T"] == T and r["fwd_bwd"]["ms"]]
        auto = next((r for r in block if r["method"] == "auto"), None)
        if auto and block:
            best = min(block, key=lambda r: r["fwd_bwd"]["ms"])
            lines.append(f"T={T}: auto/fastest fwd+bwd = "
                         f"{auto['fwd_bwd']['ms'] / best['fwd_bwd']['ms']:.2f} "
                         f"(fastest: {_label(best)})")
    if len(Ts) >= 2:
        a, b = Ts[-2], Ts[-1]
        parts = []
        for row in (r for r in rows if r["T"] == b):
            prev = next((r for r in rows if r["T"] == a and r["method"] == row["method"]
                         and r["chunk_size"] == row["chunk_size"]), None)
            for kind, note in (("fwd_bwd", ""), ("fwd", " (fwd)")):
                if prev and prev[kind]["ms"] and row[kind]["ms"]:
                    med = row[kind]["ms"] / prev[kind]["ms"]
                    low = row[kind]["min_ms"] / prev[kind]["min_ms"]
                    parts.append(f"{_label(row)} {med:.2f}× ({low:.2f}×){note}")
                    break
        if parts:
            lines.append(f"Growth T={a}→{b} (×{b // a} tokens), fwd+bwd median (min): "
                         + ", ".join(parts))
    return lines


def format_scan_markdown(rows: list, machine: dict, config: dict) -> str:
    """The scan table as markdown, with the machine line and notes."""
    head = ("| T | method | fwd ms | fwd+bwd ms | × sequential (fwd+bwd) | peak MB (fwd+bwd) "
            "| GFLOP fwd / fwd+bwd | serial depth fwd / fwd+bwd |")
    lines = [f"### osam_scan: batch×heads {config['batch']}, r = {config['rank']}, "
             f"median of {config['repeats']} runs after 2 warm-up calls (fewer, ≥ 3, "
             f"where {config['repeats']} would exceed {config.get('max_seconds', 60):g} s)",
             "", machine_line(machine), "", head,
             "|" + "---|" * 8]
    for r in rows:
        f, fb = r["fwd"], r["fwd_bwd"]
        ratio = fb.get("ratio_to_sequential")
        peak = fb.get("peak_bytes")
        gf = lambda m: f"{m['loop_flops'] / 1e9:.3g}" if "loop_flops" in m else "n/a"  # noqa: E731
        depth = lambda m: f"{m['serial_depth']:,}" if "serial_depth" in m else "n/a"  # noqa: E731
        lines.append(
            f"| {r['T']:,} | {_label(r)} | {_ms(f)} | {_ms(fb)} | "
            f"{f'{ratio:.2f}' if ratio else 'n/a'} | "
            f"{f'{peak / _MB:,.0f}' if peak is not None else 'n/a'} | "
            f"{gf(f)} / {gf(fb)} | {depth(f)} / {depth(fb)} |")
    lines += [
        "",
        "Peak MB: compiled `memory_analysis()` of the fwd+bwd program, temp + arguments + "
        "outputs. GFLOP: the compiled HLO recounted with every loop body × its trip count "
        "(XLA's `cost_analysis()` counts a loop body once, e.g. one token of the sequential "
        "scan). Serial depth: dependent loop iterations (trip counts, nested ones "
        "multiplied); `associative` has no loop (its depth is ~2·log₂T tree levels).",
    ]
    checks = scan_checks(rows)
    if checks:
        lines += [""] + [f"- {c}" for c in checks]
    return "\n".join(lines) + "\n"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--T", type=int, nargs="+", default=list(DEFAULT_T),
                   help="sequence lengths (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="batch×heads (default: 8)")
    p.add_argument("--rank", type=int, default=8, help="state size r (default: 8)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per case (median)")
    p.add_argument("--methods", nargs="+", default=list(SCAN_METHODS), choices=SCAN_METHODS)
    p.add_argument("--chunk-size", type=int, nargs="+", default=list(DEFAULT_CHUNK_SIZES),
                   help="chunk sizes of the chunked method, one row each "
                        "(other methods use osam_scan's default)")
    p.add_argument("--mem-budget-gb", type=float, default=None,
                   help="skip cases whose compiled peak exceeds this (default: half of "
                        "the memory available at start)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="per case and pass: fewer runs (≥ 3) if the repeats would take longer")
    p.add_argument("--json", help="write rows and machine info here")
    p.add_argument("--markdown", help="write the table here")


def cmd(args: argparse.Namespace) -> int:
    machine = machine_info()
    budget = (args.mem_budget_gb * 2 ** 30 if args.mem_budget_gb
              else default_mem_budget())
    config = {"T": args.T, "batch": args.batch, "rank": args.rank, "repeats": args.repeats,
              "methods": args.methods, "chunk_sizes": args.chunk_size,
              "mem_budget_bytes": budget, "max_seconds": args.max_seconds,
              "sequential_unroll": osam.SEQUENTIAL_UNROLL}
    print(machine_line(machine), flush=True)
    rows = run_scan(args.T, args.batch, args.rank, args.methods, args.chunk_size,
                    args.repeats, budget, args.max_seconds,
                    log=lambda s: print(s, flush=True))
    try:
        machine["load_avg_1min_end"] = os.getloadavg()[0]
    except OSError:
        pass
    emit_outputs(format_scan_markdown(rows, machine, config),
                 {"machine": machine, "config": config, "rows": rows}, args)
    return 0
