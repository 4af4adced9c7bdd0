"""Throughput: the backbone alone vs the backbone + δ-mem (same weights), and decode
latency as the conversation grows (history in the KV cache vs history in memory).

``python -m deltamem_jax.tools.bench throughput`` prints markdown tables and writes a
plot. Everything is jit-compiled and warmed up; times are medians of repeats.
``--model DIR`` (a model directory or ``.gguf`` file, repeatable) benchmarks real
checkpoints instead of the random shapes: the backbone as loaded, and the same weights
with δ-mem (rank 8, q,o; ``--adapter DIR`` for trained parameters, else random ones
with non-zero gates so that every write does work).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltamem_jax.inference.generation import SamplingConfig, generate
from deltamem_jax.memory.config import DeltaMemConfig
from deltamem_jax.models.cache import KVCache
from deltamem_jax.models.config import DecoderConfig
from deltamem_jax.models.decoder import DecoderLM
from deltamem_jax.models.functional import Runner, apply
from deltamem_jax.tools.bench.common import (
    emit_outputs,
    machine_info,
    machine_line,
    time_call,
    time_pair,
)

MODELS = {
    # the demo's backbone shape, and a GPT-2-small-sized one
    "demo": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, head_dim=16, vocab_size=264),
    "d768x12": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, num_key_value_heads=12, head_dim=64,
                    vocab_size=32000),
}


def build(name: str, memory: bool, seed: int = 0, adapter: str | None = None) -> DecoderLM:
    """A random model (``name`` in :data:`MODELS`) or a checkpoint (``name`` a model directory
    or ``.gguf`` file); with ``memory`` the same backbone weights plus active δ-mem."""
    if name not in MODELS:
        from deltamem_jax.checkpoints.adapters import load_adapter
        from deltamem_jax.checkpoints.hf import load_hf_model
        model = load_hf_model(name)
        if memory and adapter:
            load_adapter(model, adapter)
            return model
        if not memory:
            return model
    else:
        config = DecoderConfig(model_type="llama", max_position_embeddings=65536,
                               **MODELS[name])
        model = DecoderLM(config, rngs=nnx.Rngs(seed))
    if memory:
        model.attach_memory(DeltaMemConfig(output_init="random"), rngs=nnx.Rngs(seed + 1))
        for i in model.memory_layers:       # non-zero gates, so every write does work
            m = model.layers[i].self_attn.memory
            m.beta_proj.set_value(0.02 * jax.random.normal(jax.random.key(i), m.beta_proj.shape))
    return model


def prefill_call(model: DecoderLM, T: int, memory: bool) -> tuple:
    """(fn, args) of one jit-compiled prefill of ``T`` random tokens."""
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, model.config.vocab_size, (1, T)),
                      jnp.int32)
    fn = lambda s, i: apply(graphdef, s, i, write=True, use_memory=memory).logits  # noqa: E731
    return fn, (state, ids)


def decode_call(model: DecoderLM, history: int, memory: bool, tokens: int) -> tuple:
    """(fn, args) generating ``tokens`` + 1 tokens after a cache holding ``history``."""
    runner = Runner(model)
    c = model.config
    cache = KVCache.init(c, 1, history + tokens + 1)
    rng = np.random.default_rng(1)
    fill = lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1, x.dtype)  # noqa: E731
    cache = cache._replace(keys=jax.tree.map(fill, cache.keys),
                           values=jax.tree.map(fill, cache.values),
                           mask=cache.mask.at[:, :history].set(True),
                           positions=jnp.full((1,), history, jnp.int32),
                           index=jnp.asarray(history, jnp.int32))
    state_mem = model.init_memory_state(1) if memory else None
    prompt = jnp.full((1, 1), 7, jnp.int32)
    sampling = SamplingConfig(max_new_tokens=tokens)

    def run(cache, mem):
        return generate(runner, prompt, memory_state=mem, cache=cache, sampling=sampling,
                        rng=jax.random.key(0), eos_ids=(), pad_id=0, write=True,
                        use_memory=memory).tokens
    return run, (cache, state_mem)


def decode_time(model: DecoderLM, history: int, memory: bool, tokens: int,
                repeats: int) -> float:
    """ms per generated token after a cache already holding ``history`` tokens."""
    fn, args = decode_call(model, history, memory, tokens)
    return time_call(fn, args, repeats)["ms"] / (tokens + 1)


def model_label(name: str) -> str:
    """A table label: the preset name, or a checkpoint's file / directory name."""
    import os
    return name if name in MODELS else os.path.basename(os.path.normpath(name))


def run_throughput(models: Sequence[str], prefill_T: Sequence[int], histories: Sequence[int],
                   window: int, decode_tokens: int, repeats: int, log=print,
                   adapter: str | None = None) -> dict:
    out = {"prefill": [], "decode": [], "history": []}
    for name in models:
        base, mem = build(name, False), build(name, True, adapter=adapter)
        label = model_label(name)
        # backbone and backbone + δ-mem timed alternately (time_pair): ratios, not two runs
        for T in prefill_T:
            t = time_pair(*prefill_call(base, T, False), *prefill_call(mem, T, True), repeats)
            out["prefill"].append({"model": label, "T": T, "base_tok_s": T / t["a_ms"] * 1e3,
                                   "mem_tok_s": T / t["b_ms"] * 1e3, "overhead": t["ratio"]})
            log(f"prefill {label} T={T}: {out['prefill'][-1]}")
        t = time_pair(*decode_call(base, window, False, decode_tokens),
                      *decode_call(mem, window, True, decode_tokens), repeats)
        per = decode_tokens + 1
        out["decode"].append({"model": label, "context": window,
                              "base_tok_s": 1e3 * per / t["a_ms"],
                              "mem_tok_s": 1e3 * per / t["b_ms"], "overhead": t["ratio"]})
        log(f"decode {label}: {out['decode'][-1]}")
    name = models[-1]
    if len(models) > 1:     # the last model's pair is still loaded when there is only one
        base, mem = build(name, False), build(name, True, adapter=adapter)
    for h in histories:
        # Full context: all h history tokens sit in the KV cache. δ-mem: the history lives
        # in the r×r states (the same size whatever h is) and the cache keeps `window`
        # tokens; timed afresh for every h so that flatness is measured, not assumed.
        full = decode_time(base, h, False, decode_tokens, repeats)
        flat = decode_time(mem, window, True, decode_tokens, repeats)
        out["history"].append({"model": model_label(name), "history": h, "full_context_ms": full,
                               "memory_ms": flat})
        log(f"history {h}: full {full:.2f} ms/token, δ-mem window {window}: {flat:.2f}")
    return out


def format_markdown(res: dict, machine: dict) -> str:
    lines = [machine_line(machine), "",
             "| model | prefill tokens | backbone tok/s | + δ-mem tok/s | overhead |",
             "|---|---|---|---|---|"]
    for r in res["prefill"]:
        lines.append(f"| {r['model']} | {r['T']:,} | {r['base_tok_s']:,.0f} | "
                     f"{r['mem_tok_s']:,.0f} | {r['overhead']:.3f}× |")
    lines += ["", "| model | decode (cache of) | backbone tok/s | + δ-mem tok/s | overhead |",
              "|---|---|---|---|---|"]
    for r in res["decode"]:
        lines.append(f"| {r['model']} | {r['context']:,} | {r['base_tok_s']:,.1f} | "
                     f"{r['mem_tok_s']:,.1f} | {r['overhead']:.3f}× |")
    lines += ["", "| history tokens | full context: ms/token | δ-mem, short window: ms/token |",
              "|---|---|---|"]
    for r in res["history"]:
        lines.append(f"| {r['history']:,} | {r['full_context_ms']:.2f} | {r['memory_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h = [r["history"] for r in res["history"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(h, [r["full_context_ms"] for r in res["history"]], "o-",
            label="history in the KV cache (full context)")
    ax.plot(h, [r["memory_ms"] for r in res["history"]], "s-",
            label="history in δ-mem (short window)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("conversation history (tokens)")
    ax.set_ylabel("decode latency (ms / token)")
    ax.set_title(f"Decode latency vs history ({res['history'][0]['model']})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted(MODELS))
    p.add_argument("--model", action="append", default=[], metavar="DIR",
                   help="a model directory or .gguf file to benchmark instead of --models "
                        "(repeatable)")
    p.add_argument("--adapter", default=None,
                   help="a δ-mem adapter for the --model checkpoint (default: random δ-mem)")
    p.add_argument("--prefill", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--histories", type=int, nargs="+",
                   default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--window", type=int, default=256, help="KV window kept with δ-mem")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    p.add_argument("--markdown")
    p.add_argument("--plot", default="throughput_history.png")


def cmd(args: argparse.Namespace) -> int:
    machine = machine_info()
    print(machine_line(machine), flush=True)
    models = args.model or args.models
    res = run_throughput(models, args.prefill, args.histories, args.window,
                         args.decode_tokens, args.repeats, log=lambda s: print(s, flush=True),
                         adapter=args.adapter)
    emit_outputs(format_markdown(res, machine), {"machine": machine, **res}, args)
    if args.plot and res["history"]:
        plot(res, args.plot)
        print(f"plot -> {args.plot}")
    return 0


