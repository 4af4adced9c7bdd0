"""Serving under load: 1, 4, 16, … concurrent sessions × several turns against a real
``deltamem-serve`` on 127.0.0.1, against the same requests served one at a time.

``python -m deltamem_jax.tools.bench serve [--model DIR --adapter DIR]`` starts the
server (``--slots`` = the largest concurrency), runs each load — every session a
client thread taking its turns one after another — then starts a second server with
one slot and sends the largest load's requests sequentially: the baseline of serving
one request at a time. Without ``--model`` a random tiny model is written to a
temporary directory. Replies are greedy with a fixed ``max_tokens``, so each load's
requests produce the same tokens in both modes (batching is exact). Reported: requests/s,
completion tokens/s, p50/p95 latency, the speed-up over sequential, and what an idle
session costs (its directory on disk; the server's resident memory per session).
Loopback only, bounded in requests (``--turns``) and time (``--time-limit``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time

from deltamem_jax.tools.bench.common import emit_outputs, machine_info, machine_line
from deltamem_jax.tools.serve.process import ServerProcess

FILLER = ("We walked along the river past the old mill, counted the herons, and talked "
          "about the garden, the weather and the books we meant to read this winter. ")


def _tiny_model(root: str) -> tuple[str, str]:
    """A random tiny Qwen3-style model with δ-mem over the byte tokenizer."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from deltamem_jax.checkpoints.adapters import save_adapter
    from deltamem_jax.checkpoints.hf import save_hf_model
    from deltamem_jax.data.tokenizer import save_byte_tokenizer_marker
    from deltamem_jax.memory.config import DeltaMemConfig
    from deltamem_jax.models.config import DecoderConfig
    from deltamem_jax.models.decoder import DecoderLM

    config = DecoderConfig(model_type="qwen3", vocab_size=264, hidden_size=64,
                           intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, qk_norm=True,
                           max_position_embeddings=8192)
    model = DecoderLM(config, rngs=nnx.Rngs(0), memory=DeltaMemConfig(output_init="random"))
    rng = np.random.default_rng(0)
    for i in model.memory_layers:                 # non-zero gates: every token writes
        m = model.layers[i].self_attn.memory
        m.beta_proj.set_value(jnp.asarray(0.02 * rng.standard_normal(m.beta_proj.shape),
                                          m.beta_proj.get_value().dtype))
    save_hf_model(model, os.path.join(root, "model"))
    save_byte_tokenizer_marker(os.path.join(root, "model"))
    save_adapter(model, os.path.join(root, "adapter"))
    return os.path.join(root, "model"), os.path.join(root, "adapter")


def _random_adapter(model_dir: str, out: str, *, rank: int = 8) -> str:
    """A freshly initialised δ-mem adapter for ``model_dir`` (rank ``rank``, heads q and o,
    random read-out and gate weights so that every token writes and every read changes the
    attention): it costs what a trained one costs, and knows nothing — for throughput only."""
    import jax.numpy as jnp
    import numpy as np

    from deltamem_jax.checkpoints.adapters import save_adapter
    from deltamem_jax.checkpoints.pretrained import load_pretrained
    from deltamem_jax.memory.config import DeltaMemConfig

    model = load_pretrained(model_dir, memory=DeltaMemConfig(rank=rank, output_init="random"))
    rng = np.random.default_rng(0)
    for i in model.memory_layers:
        m = model.layers[i].self_attn.memory
        m.beta_proj.set_value(jnp.asarray(0.02 * rng.standard_normal(m.beta_proj.shape),
                                          m.beta_proj.get_value().dtype))
    save_adapter(model, out, torch_format=False)
    return out


def _message(session: int, turn: int, chars: int) -> str:
    text = f"Session {session}, turn {turn}. "
    while len(text) < chars:
        text += FILLER
    return text[:chars]


def _turn(server: ServerProcess, sid: str, text: str, max_tokens: int) -> tuple[float, int]:
    body = {"model": server.model_name, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    status, answer = server.request("POST", "/v1/chat/completions", body,
                                    {"X-Session-Id": sid, "X-Session-Mode": "append"})
    latency = time.perf_counter() - t0
    if status != 200:
        raise RuntimeError(f"request failed ({status}): {answer}")
    return latency, int(answer["usage"]["completion_tokens"])


def run_load(server: ServerProcess, tag: str, sessions: int, turns: int, chars: int,
             max_tokens: int, concurrent: bool, deadline: float) -> dict:
    """``sessions`` × ``turns`` turns: one client thread per session (``concurrent``), or
    every request one after another, round-robin over the sessions."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def one(s: int, t: int) -> None:
        if time.monotonic() > deadline:
            return
        lat, n = _turn(server, f"{tag}-{s}", _message(s, t, chars), max_tokens)
        with lock:
            latencies.append(lat)
            tokens[0] += n

    def session_client(s: int) -> None:
        try:
            for t in range(turns):
                one(s, t)
        except BaseException as e:  # noqa: BLE001 — re-raised after the run
            errors.append(e)

    cpu0, sched0 = server.cpu_seconds(), server.health()["scheduler"]
    t0 = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=session_client, args=(s,)) for s in range(sessions)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    else:
        for t in range(turns):
            for s in range(sessions):
                one(s, t)
    wall = time.perf_counter() - t0
    cpu1, sched1 = server.cpu_seconds(), server.health()["scheduler"]
    if errors:
        raise errors[0]
    n = len(latencies)
    delta = {k: sched1[k] - sched0[k] for k in ("busy_s", "pass_s", "step_s", "passes",
                                                "pass_calls", "steps")}
    q = statistics.quantiles(latencies, n=20) if n >= 2 else latencies * 19
    return {"mode": "batched" if concurrent else "sequential", "sessions": sessions,
            "requests": n, "complete": n == sessions * turns, "tokens": tokens[0],
            "wall_s": wall, "req_per_s": n / wall, "tok_per_s": tokens[0] / wall,
            "p50_s": statistics.median(latencies) if latencies else float("nan"),
            "p95_s": q[18] if latencies else float("nan"),
            "cpu_s_per_req": (cpu1 - cpu0) / max(n, 1) if cpu0 is not None else float("nan"),
            "busy_frac": delta["busy_s"] / wall, "pass_frac": delta["pass_s"] / wall,
            "passes_per_req": delta["passes"] / max(n, 1),
            "rows_per_call": delta["passes"] / max(delta["pass_calls"], 1),
            "steps": delta["steps"], "load": _load()}


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _idle_cost(server: ServerProcess, work: str, chars: int, max_tokens: int, count: int,
               deadline: float) -> dict:
    """What ``count`` more sessions cost once they are idle: their directories on disk, and
    the server's resident-memory growth (measured after every shape was compiled)."""
    run_load(server, "idle-warm", 2, 1, chars, max_tokens, True, deadline)
    before, cache0 = server.rss_bytes(), server.health()["session_cache"]
    run_load(server, "idle", count, 1, chars, max_tokens, True, deadline)
    after, cache1 = server.rss_bytes(), server.health()["session_cache"]
    root = os.path.join(server.state_dir, "sessions", "public")
    ids = [d for d in os.listdir(root) if d.startswith("idle-") and not d.startswith("idle-w")]
    return {"sessions": len(ids),
            "disk_bytes_per_session": statistics.mean(_dir_bytes(os.path.join(root, d))
                                                      for d in ids),
            "rss_growth_bytes_per_session": (None if before is None or after is None
                                             else (after - before) / max(len(ids), 1)),
            "host_cache": cache1,
            "host_cache_bytes_per_session": ((cache1["bytes"] - cache0["bytes"])
                                             / max(cache1["sessions"] - cache0["sessions"], 1))}


def run_bench(model_dir: str | None, adapter_dir: str | None, *, levels: list[int], turns: int,
              chars: int, max_tokens: int, window: int, chunk: int, dtype: str | None,
              time_limit: float, work: str, fsync: bool = True, repeats: int = 2,
              idle_sessions: int = 32, prefill_rows: int | None = None,
              extra_args: tuple[str, ...] = (), log=print) -> dict:
    """Both servers up at once, loads alternated (batched levels, then sequential, per
    repeat) so machine drift hits both; medians over repeats."""
    random_adapter = False
    if model_dir is None:
        model_dir, adapter_dir = _tiny_model(os.path.join(work, "tiny"))
    elif adapter_dir is None:
        log(f"writing a freshly initialised rank-8 δ-mem adapter for {model_dir} …")
        adapter_dir = _random_adapter(model_dir, os.path.join(work, "random-adapter"))
        random_adapter = True
    slots = max(levels)
    common = ["--window", str(window), "--chunk", str(chunk), "--max-tokens", str(max_tokens),
              "--log-level", "warning"] + (["--no-fsync"] if not fsync else [])
    if dtype:
        common += ["--dtype", dtype]
    deadline = time.monotonic() + time_limit
    rows_arg = [] if prefill_rows is None else ["--prefill-rows", str(prefill_rows)]
    batched = ServerProcess(model_dir, adapter_dir, os.path.join(work, "state-batched"),
                            args=common + ["--slots", str(slots)] + rows_arg + list(extra_args))
    single = ServerProcess(model_dir, adapter_dir, os.path.join(work, "state-single"),
                           args=common + ["--slots", "1"] + list(extra_args))
    runs: dict[tuple[str, int], list[dict]] = {}
    try:
        log(f"starting a {slots}-slot and a 1-slot server …")
        batched.start()
        single.start()
        prefill = batched.health()["scheduler"]["prefill_rows"]
        run_load(batched, "warm", 2, 1, chars, max_tokens, True, deadline)
        run_load(single, "warm", 1, 1, chars, max_tokens, False, deadline)
        for rep in range(repeats):
            for n in levels:
                r = run_load(batched, f"b{rep}-{n}", n, turns, chars, max_tokens, True,
                             deadline)
                runs.setdefault(("batched", n), []).append(r)
                log(f"  [{rep + 1}/{repeats}] batched, {n} sessions × {turns} turns: "
                    f"{r['tok_per_s']:.1f} tokens/s")
            r = run_load(single, f"s{rep}", slots, turns, chars, max_tokens, False, deadline)
            runs.setdefault(("sequential", slots), []).append(r)
            log(f"  [{rep + 1}/{repeats}] sequential, {slots} sessions × {turns} turns: "
                f"{r['tok_per_s']:.1f} tokens/s")
        idle = _idle_cost(batched, work, chars, max_tokens, idle_sessions, deadline)
    finally:
        batched.stop()
        single.stop()
    seq = runs[("sequential", slots)]
    rows = []
    for (mode, n), rs in runs.items():
        row = {k: statistics.median(r[k] for r in rs) for k in
               ("requests", "tokens", "wall_s", "req_per_s", "tok_per_s", "p50_s", "p95_s",
                "cpu_s_per_req", "busy_frac", "pass_frac", "passes_per_req", "rows_per_call",
                "load")}
        row.update(mode=mode, sessions=n, complete=all(r["complete"] for r in rs),
                   repeats=len(rs), tok_per_s_runs=[r["tok_per_s"] for r in rs],
                   speedup=statistics.median(r["tok_per_s"] / q["tok_per_s"]
                                             for r, q in zip(rs, seq)))
        rows.append(row)
    return {"rows": rows, "idle": idle, "settings": {
        "model": model_dir, "adapter": adapter_dir, "random_adapter": random_adapter,
        "turns": turns, "chars": chars,
        "max_tokens": max_tokens, "window": window, "chunk": chunk, "slots": slots,
        "dtype": dtype, "fsync": fsync, "repeats": repeats, "prefill_rows": prefill,
        "extra_args": list(extra_args)}}


def format_table(result: dict, machine: dict) -> str:
    s = result["settings"]
    what = ("tiny random model" if "tiny" in str(s["model"]) else
            os.path.basename(os.path.normpath(str(s["model"]))))
    if s.get("random_adapter"):
        what += " + a freshly initialised rank-8 δ-mem (q, o; throughput only)"
    lines = [(f"Serving load ({what}"
             f"; {s['turns']} turns per session, {s['chars']}-character messages, greedy "
             f"replies of {s['max_tokens']} tokens, window {s['window']}"
             f"{'' if s['fsync'] else ', no fsync'}; "
             f"batched: one {s['slots']}-slot server, {s['prefill_rows']} prefill rows; "
             f"sequential: a 1-slot server, one "
             f"request at a time; medians of {s['repeats']} alternated repeats, speed-up = "
             f"median of per-repeat ratios)"), "",
             ("| mode | sessions | requests | tokens | req/s | tokens/s | p50 s | p95 s "
              "| vs sequential | server CPU s/req | decode thread busy (prefill) "
              "| passes/req (rows/call) | load avg |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    nan = float("nan")
    for r in result["rows"]:
        done = "" if r["complete"] else " (time limit)"
        lines.append(f"| {r['mode']} | {r['sessions']} | {r['requests']:.0f}{done} "
                     f"| {r['tokens']:.0f} "
                     f"| {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | {r['p50_s']:.2f} "
                     f"| {r['p95_s']:.2f} | {r['speedup']:.2f}× "
                     f"| {r.get('cpu_s_per_req', nan):.2f} "
                     f"| {100 * r.get('busy_frac', nan):.0f} % "
                     f"({100 * r.get('pass_frac', nan):.0f} %) "
                     f"| {r.get('passes_per_req', nan):.1f} ({r.get('rows_per_call', nan):.1f}) "
                     f"| {r.get('load', nan):.1f} |")
    idle = result["idle"]
    rss = idle["rss_growth_bytes_per_session"]
    cache = idle.get("host_cache") or {}
    per = idle.get("host_cache_bytes_per_session")
    lines += ["", (f"Idle session: {idle['disk_bytes_per_session'] / 1024:.1f} KiB on disk "
                  f"(δ-mem state + KV window + ids), mean of {idle['sessions']} sessions; "
                  f"server resident memory grew "
                  f"{'n/a' if rss is None else f'{rss / 1024:.1f} KiB'} per session"
                  + (f", of which {per / 1024:.1f} KiB is its host copy in the session cache "
                     f"({cache['sessions']} sessions, {cache['bytes'] / 2**20:.1f} MiB of "
                     f"{cache['max_bytes'] / 2**20:.0f} MiB; nothing on the device)"
                     if per is not None and cache.get("max_bytes") else "") + "."),
              "", machine_line(machine)]
    return "\n".join(lines)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="backbone dir (default: a random tiny model)")
    p.add_argument("--adapter", help="δ-mem adapter dir")
    p.add_argument("--dtype", help="e.g. bfloat16")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16],
                   help="concurrency levels (the largest sets the slots)")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--chars", type=int, default=300, help="characters per user message")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--no-fsync", action="store_true", help="serve with --no-fsync")
    p.add_argument("--repeats", type=int, default=2, help="alternated repeats of every load")
    p.add_argument("--prefill-rows", type=int,
                   help="the batched server's --prefill-rows (default: its slots)")
    p.add_argument("--idle-sessions", type=int, default=32,
                   help="sessions created to measure the cost of an idle one")
    p.add_argument("--time-limit", type=float, default=900.0,
                   help="stop issuing requests after this many seconds")
    p.add_argument("--markdown", help="write the table here")
    p.add_argument("--json", help="write the numbers here")


def cmd(args) -> int:
    machine = machine_info()
    work = tempfile.mkdtemp(prefix="deltamem_serve_bench_")
    try:
        result = run_bench(args.model, args.adapter, levels=sorted(set(args.sessions)),
                           turns=args.turns, chars=args.chars, max_tokens=args.max_tokens,
                           window=args.window, chunk=args.chunk, dtype=args.dtype,
                           time_limit=args.time_limit, work=work, fsync=not args.no_fsync,
                           repeats=args.repeats, idle_sessions=args.idle_sessions,
                           prefill_rows=args.prefill_rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    try:
        machine["load_avg_1min_end"] = os.getloadavg()[0]
    except OSError:
        pass
    emit_outputs(format_table(result, machine), dict(result, machine=machine), args)
    return 0
