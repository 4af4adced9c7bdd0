"""Checkpoint loading speed: seconds per GB to read a sharded HF checkpoint.

``python -m deltamem_jax.tools.bench load`` writes a random Llama-style checkpoint
(``model.safetensors.index.json`` plus several ``*.safetensors`` shards) to a
temporary directory, then times :func:`deltamem_jax.load_hf_model` into float32
and bfloat16 parameters, and onto a mesh of every local device when there are
several. The page cache is warm (the files were just written): this measures
our reading and placement, not the disk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
from flax import nnx

from deltamem_jax.checkpoints.hf import load_hf_model, save_hf_model
from deltamem_jax.models.config import DecoderConfig
from deltamem_jax.models.decoder import DecoderLM
from deltamem_jax.tools.bench.common import emit_outputs, machine_info, machine_line

_GB = 1e9


def write_checkpoint(path: str, hidden: int, layers: int, vocab: int, shard_mb: int) -> int:
    """A random checkpoint at ``path``; returns its size in bytes on disk."""
    config = DecoderConfig(model_type="llama", hidden_size=hidden, intermediate_size=4 * hidden,
                           num_hidden_layers=layers, num_attention_heads=hidden // 64,
                           num_key_value_heads=hidden // 64, head_dim=64, vocab_size=vocab,
                           tie_word_embeddings=False)
    save_hf_model(DecoderLM(config, rngs=nnx.Rngs(0)), path, max_shard_bytes=shard_mb << 20)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(".safetensors"))


def time_load(path: str, repeats: int, **kwargs) -> float:
    """Median seconds of ``load_hf_model`` until every parameter is on device."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model = load_hf_model(path, **kwargs)
        jax.block_until_ready(nnx.state(model))
        times.append(time.perf_counter() - t0)
        del model
    return statistics.median(times)


def run_load(hidden: int = 1024, layers: int = 8, vocab: int = 32000, shard_mb: int = 128,
             repeats: int = 3, log=print) -> dict:
    from deltamem_jax.training.mesh import build_mesh
    from deltamem_jax.training.settings import MeshSettings
    rows = []
    with tempfile.TemporaryDirectory(prefix="deltamem_load_") as d:
        size = write_checkpoint(d, hidden, layers, vocab, shard_mb)
        shards = sum(f.endswith(".safetensors") for f in os.listdir(d))
        log(f"checkpoint: {size / 2**20:.0f} MB in {shards} shards")
        cases = [("float32", {}), ("bfloat16", {"param_dtype": "bfloat16"})]
        if jax.device_count() > 1:
            mesh = MeshSettings(shape=(1, -1, 1))   # every device on fsdp: split, not copied
            cases.append((f"float32, fsdp over {jax.device_count()} devices",
                          {"mesh": build_mesh(mesh), "rules": mesh.rules}))
        for name, kwargs in cases:
            sec = time_load(d, repeats, **kwargs)
            rows.append({"target": name, "bytes": size, "shards": shards, "seconds": sec,
                         "seconds_per_gb": sec / (size / _GB)})
            log(f"{name}: {sec:.2f} s ({sec / (size / _GB):.2f} s/GB)")
    return {"rows": rows}


def format_markdown(res: dict, machine: dict) -> str:
    lines = [machine_line(machine), "",
             "| loaded into | checkpoint | shards | seconds | seconds per GB |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['target']} | {r['bytes'] / 2**20:,.0f} MB | {r['shards']} | "
                     f"{r['seconds']:.2f} | {r['seconds_per_gb']:.2f} |")
    return "\n".join(lines) + "\n"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (heads of 64)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-mb", type=int, default=128, help="max safetensors shard size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--markdown")


def cmd(args: argparse.Namespace) -> int:
    if args.hidden % 64 or args.hidden <= 0:
        raise SystemExit(f"--hidden must be a positive multiple of 64, got {args.hidden}")
    machine = machine_info()
    print(machine_line(machine), flush=True)
    res = run_load(args.hidden, args.layers, args.vocab, args.shard_mb, args.repeats,
                   log=lambda s: print(s, flush=True))
    emit_outputs(format_markdown(res, machine), {"machine": machine, **res}, args)
    return 0
