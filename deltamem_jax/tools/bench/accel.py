"""``bench accel``: one command that measures a GPU or TPU (≤ 5 minutes by default).

``python -m deltamem_jax.tools.bench accel`` prints, for the default device:

1. the recurrence, every method (sequential; chunked at C = 16 / 64 / 128;
   associative; pallas), forward and forward+backward, T = 1K … 64K,
   batch×heads 8 and 256, r = 8, with the compiled program's peak memory;
2. a Qwen3-4B-shaped stack of a few layers (bf16 weights, δ-mem rank 8 on q,o):
   the write pass at T = 2K / 8K for each attention implementation, and decoding
   (ms per token) with 2K / 8K tokens of history in the KV cache;
3. what ``auto`` picks (scan method, attention) next to what was fastest.

Nothing here needs more than the installed package. A row that cannot run says
why instead of stopping the run: accelerator-only on this backend, over the
memory budget, predicted to exceed the per-row time budget (from the previous
T, times grow linearly), out of the total time budget, or failed (the error).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltamem_jax.memory import osam
from deltamem_jax.memory.config import DeltaMemConfig
from deltamem_jax.models import attention as attn
from deltamem_jax.models.cache import KVCache
from deltamem_jax.models.config import DecoderConfig
from deltamem_jax.models.decoder import DecoderLM
from deltamem_jax.models.functional import apply
from deltamem_jax.tools.bench.common import emit_outputs, machine_info, machine_line, time_call
from deltamem_jax.tools.bench.hlo_stats import compiled_stats
from deltamem_jax.tools.bench.scan import scan_functions, scan_inputs

SCAN_CASES = (("sequential", None), ("chunked", 16), ("chunked", 64), ("chunked", 128),
              ("associative", None), ("pallas", None))
DEFAULT_T = (1024, 4096, 16384, 65536)
BATCH_HEADS = (8, 256)
MODEL_T = (2048, 8192)
# Qwen3-4B's layer shape (config.json of Qwen/Qwen3-4B); the stack keeps only a few layers.
QWEN3_4B = {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}
ATTENTION = ("auto", "xla", "blocked", "cudnn", "splash")
_MB = 2 ** 20


@dataclasses.dataclass
class Budget:
    """Wall-clock budget: the whole run and each row (one case, all its repeats)."""

    total_s: float
    row_s: float
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.total_s - (time.perf_counter() - self.start)

    def refuse(self, predicted_s: float | None) -> str | None:
        """Why a row should not start (None: go ahead)."""
        if self.left() <= 0:
            return "not run: total time budget spent"
        if predicted_s is not None and predicted_s > min(self.row_s, self.left()):
            return f"skipped: predicted {predicted_s:.0f} s > row budget"
        return None


def backend_kind() -> str:
    b = jax.default_backend()
    return "gpu" if b in ("gpu", "cuda", "rocm") else b


def accelerator_only(name: str, backend: str) -> str | None:
    """Why ``name`` (scan method or attention implementation) cannot run on ``backend``."""
    if name == "pallas" and backend not in ("gpu", "tpu"):
        return "accelerator only (Pallas runs in interpret mode on CPU)"
    if name == "cudnn" and backend != "gpu":
        return "GPU only"
    if name == "splash" and backend != "tpu":
        return "TPU only"
    return None


def device_memory_budget() -> float:
    """80 % of the device's memory (or half the free host memory on CPU)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - some backends do not report
        stats = {}
    if stats.get("bytes_limit"):
        return 0.8 * stats["bytes_limit"]
    avail = machine_info().get("mem_available_bytes")
    return 0.5 * avail if avail else 8 * 2 ** 30


def measure(fn: Callable, args, repeats: int, budget: Budget, mem_budget: float,
            predicted_s: float | None = None) -> dict:
    """Compile, check memory, time ``fn(*args)``; or a dict saying why not."""
    reason = budget.refuse(predicted_s)
    if reason:
        return {"ms": None, "na": reason}
    try:
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a failed row is a table entry
        return {"ms": None, "na": f"failed to compile: {type(e).__name__}: {_short(e)}"}
    out = compiled_stats(compiled)
    out["compile_s"] = compile_s
    if out["peak_bytes"] > mem_budget:
        out.update(ms=None, na=f"needs {out['peak_bytes'] / 2**30:.1f} GiB > "
                               f"{mem_budget / 2**30:.1f} GiB budget")
        return out
    try:
        out.update(time_call(compiled, args, repeats, max_seconds=min(budget.row_s,
                                                                      max(budget.left(), 1))))
    except Exception as e:  # noqa: BLE001 - e.g. RESOURCE_EXHAUSTED at run time
        out.update(ms=None, na=f"failed to run: {type(e).__name__}: {_short(e)}")
    del compiled
    gc.collect()
    return out


def _short(e: Exception, n: int = 120) -> str:
    text = " ".join(str(e).split())
    return text[:n] + ("…" if len(text) > n else "")


# ---------------------------------------------------------------------------
# 1. the recurrence


def run_scan_table(T_list, batch_heads, rank: int, repeats: int, budget: Budget,
                   mem_budget: float, log=print, cases=SCAN_CASES) -> list:
    backend = backend_kind()
    rows = []
    for bh in batch_heads:
        for method, chunk in cases:
            last = {}                                     # kind -> (T, seconds per call)
            for T in T_list:
                row = {"T": T, "batch_heads": bh, "method": method, "chunk_size": chunk}
                reason = accelerator_only(method, backend)
                fwd, fb = scan_functions(method, chunk)
                args = None if reason else scan_inputs(T, bh, rank)
                for kind, fn in (("fwd", fwd), ("fwd_bwd", fb)):
                    if reason:
                        row[kind] = {"ms": None, "na": reason}
                        continue
                    pred = None
                    if kind in last:
                        t_prev, s_prev = last[kind]
                        pred = s_prev * T / t_prev * (repeats + 2)
                    row[kind] = measure(fn, args, repeats, budget, mem_budget, pred)
                    if row[kind].get("ms") is not None:
                        last[kind] = (T, row[kind]["ms"] / 1e3)
                rows.append(row)
                log(f"scan T={T:>6} bh={bh:>4} {_label(row):<16} fwd {_ms(row['fwd'])}, "
                    f"fwd+bwd {_ms(row['fwd_bwd'])}  ({budget.left():.0f} s left)")
    return rows


def _label(row: dict) -> str:
    return f"chunked C={row['chunk_size']}" if row["method"] == "chunked" else row["method"]


def _ms(m: dict) -> str:
    if m.get("ms") is None:
        return f"n/a ({m.get('na', 'not run')})"
    return f"{m['ms']:,.2f}" if m["ms"] < 10 else f"{m['ms']:,.1f}"


# ---------------------------------------------------------------------------
# 2. the model


def model_config(layers: int, shape: dict, impl: str, max_len: int) -> DecoderConfig:
    return DecoderConfig(model_type="qwen3", qk_norm=True, num_hidden_layers=layers,
                         rope_theta=1e6, max_position_embeddings=max_len, dtype="bfloat16",
                         param_dtype="bfloat16", attention_impl=impl, **shape)


def build_stack(layers: int, shape: dict, max_len: int, seed: int = 0):
    """(state, {impl: graphdef}) of one random model; the graphdefs differ only in attention."""
    memory = DeltaMemConfig(rank=8, delta_heads=("q", "o"), output_init="random")

    def make(impl):
        model = DecoderLM(model_config(layers, shape, impl, max_len), rngs=nnx.Rngs(seed))
        model.attach_memory(memory, rngs=nnx.Rngs(seed + 1))
        return model
    graphdefs = {impl: nnx.split(nnx.eval_shape(lambda i=impl: make(i)))[0] for impl in ATTENTION}
    state = nnx.split(make("auto"))[1]
    return state, graphdefs


def run_model_table(layers: int, shape: dict, T_list, decode_tokens: int, repeats: int,
                    budget: Budget, mem_budget: float, log=print) -> list:
    backend = backend_kind()
    rows = []
    if budget.left() <= 0:
        return [{"pass": "model", "na": "not run: total time budget spent"}]
    try:
        state, graphdefs = build_stack(layers, shape, max(T_list) + decode_tokens + 1)
    except Exception as e:  # noqa: BLE001
        return [{"pass": "model", "na": f"failed to build: {type(e).__name__}: {_short(e)}"}]
    vocab = shape["vocab_size"]
    for T in T_list:
        ids = jnp.asarray(np.random.default_rng(T).integers(3, vocab, (1, T)), jnp.int32)
        for impl in ATTENTION:
            row = {"pass": "write", "T": T, "attention": impl,
                   "resolved": attn.resolve_impl(impl, dtype=jnp.bfloat16,
                                                 head_dim=shape["head_dim"], prefill=True)}
            reason = accelerator_only(impl, backend)
            gd = graphdefs[impl]
            fn = lambda s, i, gd=gd: apply(gd, s, i, write=True,
                                           compute_logits=False).memory_state
            row["m"] = ({"ms": None, "na": reason} if reason
                        else measure(fn, (state, ids), repeats, budget, mem_budget))
            rows.append(row)
            log(f"model write T={T:>6} attention={impl:<8} {_ms(row['m'])}")
    for T in T_list:
        for impl in ("auto", "xla", "blocked"):
            row = {"pass": "decode", "T": T, "attention": impl,
                   "resolved": attn.resolve_impl(impl, dtype=jnp.bfloat16,
                                                 head_dim=shape["head_dim"], prefill=False)}
            config = model_config(layers, shape, impl, T + decode_tokens + 1)
            row["m"] = _decode(graphdefs[impl], state, config, T, decode_tokens, repeats,
                               budget, mem_budget)
            rows.append(row)
            log(f"model decode history={T:>6} attention={impl:<8} {_ms(row['m'])} per token")
    return rows


def _decode(graphdef, state, config, history: int, tokens: int, repeats: int, budget: Budget,
            mem_budget: float) -> dict:
    """ms per token of a jitted decode loop (``tokens`` steps) after ``history`` cached."""
    cache = KVCache.init(config, 1, history + tokens + 1)
    cache = cache._replace(
        keys=jax.tree.map(lambda x: x + jnp.asarray(0.1, x.dtype), cache.keys),
        values=jax.tree.map(lambda x: x + jnp.asarray(0.1, x.dtype), cache.values),
        mask=cache.mask.at[:, :history].set(True),
        positions=jnp.full((1,), history, jnp.int32), index=jnp.asarray(history, jnp.int32))
    mem = jnp.zeros((config.num_hidden_layers, 1, 1, 8, 8), jnp.float32)

    def loop(state, cache, mem):
        def step(carry, _):
            cache, mem, tok = carry
            out = apply(graphdef, state, tok, memory_state=mem, cache=cache, write=True)
            nxt = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
            return (out.cache, out.memory_state, nxt), None
        (cache, mem, tok), _ = jax.lax.scan(step, (cache, mem, jnp.full((1, 1), 7, jnp.int32)),
                                            None, length=tokens)
        return tok, mem
    m = measure(loop, (state, cache, mem), repeats, budget, mem_budget)
    if m.get("ms") is not None:
        m["ms"] /= tokens
    return m


# ---------------------------------------------------------------------------
# 3. report


def auto_summary(scan_rows: list, model_rows: list, head_dim: int) -> list[str]:
    lines = [f"- `osam_scan(method=\"auto\")` here → `{osam.resolve_method('auto')}`"]
    for bh in sorted({r["batch_heads"] for r in scan_rows}):
        for T in sorted({r["T"] for r in scan_rows}):
            done = [r for r in scan_rows if r["T"] == T and r["batch_heads"] == bh
                    and r["fwd_bwd"].get("ms")]
            if done:
                best = min(done, key=lambda r: r["fwd_bwd"]["ms"])
                lines.append(f"  - T={T:,}, batch×heads {bh}: fastest fwd+bwd "
                             f"{_label(best)} ({best['fwd_bwd']['ms']:,.2f} ms)")
    for prefill in (True, False):
        pick = attn.resolve_impl("auto", dtype=jnp.bfloat16, head_dim=head_dim, prefill=prefill)
        lines.append(f"- attention `auto` here, bf16, {'prefill' if prefill else 'decode'} → "
                     f"`{pick}`")
    for T in sorted({r["T"] for r in model_rows if r.get("pass") == "write"}):
        done = [r for r in model_rows if r.get("pass") == "write" and r["T"] == T
                and r["m"].get("ms") and r["attention"] != "auto"]
        if done:
            best = min(done, key=lambda r: r["m"]["ms"])
            lines.append(f"  - write pass T={T:,}: fastest attention `{best['attention']}` "
                         f"({best['m']['ms']:,.1f} ms)")
    return lines


def format_markdown(record: dict) -> str:
    lines = ["### bench accel", "", machine_line(record["machine"]),
             f"Device: {record['device']}", "",
             f"#### osam_scan, r = {record['rank']} (median of {record['repeats']})", "",
             "| T | batch×heads | method | fwd ms | fwd+bwd ms | peak MB (fwd+bwd) |",
             "|---|---|---|---|---|---|"]
    for r in record["scan"]:
        peak = r["fwd_bwd"].get("peak_bytes")
        lines.append(f"| {r['T']:,} | {r['batch_heads']} | {_label(r)} | {_ms(r['fwd'])} | "
                     f"{_ms(r['fwd_bwd'])} | {f'{peak / _MB:,.0f}' if peak else 'n/a'} |")
    s = record["model_shape"]
    title = (f"#### {record['layers']}-layer Qwen3-4B-shaped stack (hidden {s['hidden_size']}, "
             f"{s['num_attention_heads']}/{s['num_key_value_heads']} heads × {s['head_dim']}, "
             f"vocab {s['vocab_size']:,}), bf16, δ-mem rank 8 (q,o), batch 1")
    lines += ["", title, "", "| pass | T (history) | attention | ms | tokens/s | peak MB |",
              "|---|---|---|---|---|---|"]
    for r in record["model"]:
        if "m" not in r:
            lines.append(f"| {r['pass']} | | | n/a ({r['na']}) | | |")
            continue
        m = r["m"]
        label = (r["attention"] if r["resolved"] == r["attention"]
                 else f"{r['attention']} → {r['resolved']}")
        per = "ms/token" if r["pass"] == "decode" else "ms"
        tps = (f"{(r['T'] if r['pass'] == 'write' else 1) / m['ms'] * 1e3:,.0f}"
               if m.get("ms") else "")
        peak = m.get("peak_bytes")
        lines.append(f"| {r['pass']} | {r['T']:,} | {label} | {_ms(m)} {per if m.get('ms') else ''}"
                     f" | {tps} | {f'{peak / _MB:,.0f}' if peak else 'n/a'} |")
    lines += ["", "What `auto` picks here, and what was fastest:", ""]
    lines += auto_summary(record["scan"], record["model"], s["head_dim"])
    if record.get("device_peak_bytes"):
        peak = record["device_peak_bytes"] / 2**30
        lines += ["", f"Device memory peak over the run: {peak:.2f} GiB (allocator statistics)."]
    lines += ["", ("peak MB: the compiled program's `memory_analysis()` "
                  "(arguments + outputs + temporaries).")]
    return "\n".join(lines) + "\n"


def run_accel(T_list=DEFAULT_T, batch_heads=BATCH_HEADS, rank: int = 8, layers: int = 4,
              model_shape: dict | None = None, model_T=MODEL_T, decode_tokens: int = 16,
              repeats: int = 5, total_s: float = 270.0, row_s: float = 20.0,
              scan_share: float = 0.5, log=print, scan_cases=SCAN_CASES) -> dict:
    """Everything ``bench accel`` measures, as a record (see :func:`format_markdown`)."""
    machine = machine_info()
    mem_budget = device_memory_budget()
    shape = dict(QWEN3_4B, **(model_shape or {}))
    log(machine_line(machine))
    scan_budget = Budget(total_s * scan_share, row_s)
    scan_rows = run_scan_table(T_list, batch_heads, rank, repeats, scan_budget, mem_budget, log,
                               scan_cases)
    model_budget = Budget(total_s - (time.perf_counter() - scan_budget.start), row_s)
    model_rows = run_model_table(layers, shape, model_T, decode_tokens, repeats, model_budget,
                                 mem_budget, log)
    try:
        peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001 - not every backend keeps allocator statistics
        peak = None
    try:
        machine["load_avg_1min_end"] = os.getloadavg()[0]
    except OSError:
        pass
    return {"machine": machine, "device": str(jax.devices()[0].device_kind), "rank": rank,
            "repeats": repeats, "layers": layers, "model_shape": shape, "scan": scan_rows,
            "model": model_rows, "device_peak_bytes": peak,
            "seconds": time.perf_counter() - scan_budget.start}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--T", type=int, nargs="+", default=list(DEFAULT_T), help="scan lengths")
    p.add_argument("--batch-heads", type=int, nargs="+", default=list(BATCH_HEADS))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layers", type=int, default=4, help="layers of the Qwen3-4B-shaped stack")
    p.add_argument("--model-T", type=int, nargs="+", default=list(MODEL_T),
                   help="write-pass lengths and decode histories")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=270.0, help="whole run (default 270 s)")
    p.add_argument("--row-budget-s", type=float, default=20.0, help="one row, all its runs")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)


def cmd(args) -> int:
    record = run_accel(args.T, args.batch_heads, args.rank, args.layers, None, args.model_T,
                       args.decode_tokens, args.repeats, args.budget_s, args.row_budget_s)
    emit_outputs(format_markdown(record), record, args)
    return 0
