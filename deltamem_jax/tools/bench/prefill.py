"""Prefill against the authors' release: the whole-model write pass, same model, same CPU.

``python -m deltamem_jax.tools.bench prefill --authors-repo PATH`` builds one seeded
random Qwen3 (hidden 512, 8 layers, 8/4 heads, vocab 32,000, float32) with δ-mem
(rank 8, heads q,o) through the authors' code in a subprocess
(:mod:`~deltamem_jax.tools.bench.authors_worker`, their ``sdpa`` attention, torch
threads = 2), loads the very same weights here, checks that both give the same
logits, then times one write pass over T random tokens (fresh memory, batch 1)
at each T, with full logits and without (ours: ``compute_logits=False``; theirs:
``logits_to_keep=1``), alternating ours / theirs, and prints medians and the
median of the per-pair ratios. Without ``--authors-repo`` only our side runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltamem_jax.memory.config import DeltaMemConfig
from deltamem_jax.models.config import ATTENTION_IMPLS, DecoderConfig
from deltamem_jax.models.decoder import DecoderLM
from deltamem_jax.models.functional import Runner
from deltamem_jax.tools.bench.common import emit_outputs, machine_info, machine_line

SHAPE = {"vocab": 32000, "hidden": 512, "intermediate": 1536, "layers": 8, "heads": 8,
         "kv_heads": 4, "head_dim": 64}


class Authors:
    """The authors' model in a worker process (see ``authors_worker``)."""

    def __init__(self, repo: str, workdir: str, shape: dict, threads: int, seed: int):
        if not os.path.isdir(os.path.join(repo, "deltamem", "core")):
            raise FileNotFoundError(f"--authors-repo {repo!r}: no deltamem/core inside (expected "
                                    "a checkout of github.com/declare-lab/delta-Mem)")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [os.path.abspath(repo)] + [p for p in sys.path if p]), OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, "-m", "deltamem_jax.tools.bench.authors_worker",
               "--workdir", workdir, "--threads", str(threads), "--seed", str(seed)]
        for key, value in shape.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.info = self._reply()
        if not self.info.get("ready"):
            raise RuntimeError(f"authors' worker failed to start: {self.info}")

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"authors' worker exited (code {self.proc.poll()}); see its stderr")
        return json.loads(line)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def seconds(self, T: int, logits: bool) -> float:
        return self.ask(cmd="run", T=T, logits=logits)["seconds"]

    def close(self):
        if self.proc.poll() is None:
            try:
                self.ask(cmd="quit")
            except (RuntimeError, BrokenPipeError, json.JSONDecodeError):
                pass
            self.proc.wait(timeout=60)


def build_ours(shape: dict, attention_impl: str, backbone: str | None = None,
               adapter: str | None = None, seed: int = 0) -> DecoderLM:
    """Our model: the authors' saved weights when given, else a random one of ``shape``."""
    from deltamem_jax.checkpoints.adapters import load_adapter
    from deltamem_jax.checkpoints.hf import load_hf_model
    if backbone is not None:
        model = load_hf_model(backbone, attention_impl=attention_impl)
        load_adapter(model, adapter)
        return model
    config = DecoderConfig(
        model_type="qwen3", qk_norm=True, vocab_size=shape["vocab"], hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"], rope_theta=1e6, max_position_embeddings=32768,
        attention_impl=attention_impl)
    model = DecoderLM(config, rngs=nnx.Rngs(seed))
    model.attach_memory(DeltaMemConfig(output_init="random", delta_heads=("q", "o")),
                        rngs=nnx.Rngs(seed + 1))
    return model


def ours_call(runner: Runner, T: int, logits: bool, vocab: int):
    ids = jnp.asarray(np.random.default_rng(T).integers(3, vocab, (1, T)), jnp.int32)

    def run():
        out = runner(ids, write=True, compute_logits=logits)
        jax.block_until_ready((out.logits, out.memory_state))
    return run


def parity(runner: Runner, authors: Authors, workdir: str, vocab: int, T: int = 128) -> dict:
    """Max |Δ| of logits and final states, ours vs theirs, on one write pass."""
    ids = np.random.default_rng(1).integers(3, vocab, (1, T)).astype(np.int32)
    ids_file, out_file = os.path.join(workdir, "ids.npy"), os.path.join(workdir, "theirs.npz")
    np.save(ids_file, ids)
    authors.ask(cmd="logits", ids=ids_file, out=out_file)
    theirs = np.load(out_file)
    out = runner(jnp.asarray(ids), write=True)
    ours_states = np.asarray(out.memory_state)[:, :, 0]          # one state head
    return {"T": T,
            "logits_max_abs": float(np.abs(np.asarray(out.logits) - theirs["logits"]).max()),
            "states_max_abs": float(np.abs(ours_states - theirs["states"]).max()),
            "logits_max": float(np.abs(theirs["logits"]).max())}


def time_case(ours, authors: Authors | None, T: int, logits: bool, repeats: int) -> dict:
    """Alternate ours / theirs ``repeats`` times after one warm-up call each."""
    t0 = time.perf_counter()
    ours()                                           # compile + first run
    compile_s = time.perf_counter() - t0
    ours()
    if authors is not None:
        authors.seconds(T, logits)
    a_times, b_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours()
        a_times.append(time.perf_counter() - t0)
        if authors is not None:
            b_times.append(authors.seconds(T, logits))
    row = {"T": T, "logits": logits, "ours_s": statistics.median(a_times), "ours_all": a_times,
           "compile_s": compile_s, "runs": repeats}
    if b_times:
        row.update(theirs_s=statistics.median(b_times), theirs_all=b_times,
                   speedup=statistics.median(b / a for a, b in zip(a_times, b_times)))
    return row


def run_prefill(lengths, repeats: int, attention_impl: str = "auto", authors_repo=None,
                shape=None, threads: int = 2, seed: int = 0, progress=print) -> dict:
    shape = dict(SHAPE, **(shape or {}))
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-prefill-") as workdir:
        authors = None
        try:
            if authors_repo:
                progress(f"building the authors' model ({authors_repo}) …")
                authors = Authors(authors_repo, workdir, shape, threads, seed)
                model = build_ours(shape, attention_impl, authors.info["backbone"],
                                   authors.info["adapter"])
            else:
                model = build_ours(shape, attention_impl, seed=seed)
            runner = Runner(model)
            check = parity(runner, authors, workdir, shape["vocab"]) if authors else None
            if check:
                progress(f"parity at T={check['T']}: logits max |Δ| {check['logits_max_abs']:.2e}"
                         f", states {check['states_max_abs']:.2e}")
            rows = []
            for T in lengths:
                for logits in (True, False):
                    row = time_case(ours_call(runner, T, logits, shape["vocab"]), authors, T,
                                    logits, repeats)
                    rows.append(row)
                    progress(f"T={T:>6} logits={'full' if logits else 'none'}: ours "
                             f"{row['ours_s']:.2f} s" + (f", theirs {row['theirs_s']:.2f} s, "
                                                          f"×{row['speedup']:.2f}"
                                                          if "theirs_s" in row else ""))
        finally:
            if authors is not None:
                authors.close()
    try:
        machine["load_avg_1min_end"] = os.getloadavg()[0]
    except OSError:
        pass
    return {"machine": machine, "shape": shape, "attention_impl": attention_impl,
            "threads": threads, "repeats": repeats, "parity": check, "rows": rows,
            "authors": None if authors is None else authors.info}


def _growth(rows, key, logits, a, b):
    by = {r["T"]: r for r in rows if r["logits"] == logits and key in r}
    return by[b][key] / by[a][key] if a in by and b in by else None


def format_markdown(record: dict) -> str:
    rows, theirs = record["rows"], any("theirs_s" in r for r in record["rows"])
    s = record["shape"]
    lines = [machine_line(record["machine"]), "",
             f"Qwen3, hidden {s['hidden']}, MLP {s['intermediate']}, {s['layers']} layers, "
             f"{s['heads']}/{s['kv_heads']} heads × {s['head_dim']}, vocab {s['vocab']:,}; "
             f"float32, batch 1, δ-mem rank 8 (q,o), every token written; ours: attention "
             f"`{record['attention_impl']}`"
             + (f"; theirs: `{record['authors']['attention']}`, torch "
                f"{record['authors']['torch']}, {record['authors']['threads']} threads"
                if record.get("authors") else "")
             + f"; median of {record['repeats']} alternated runs.", ""]
    if record.get("parity"):
        p = record["parity"]
        lines += [(f"Same weights in both: at T = {p['T']} logits differ by ≤ "
                  f"{p['logits_max_abs']:.1e} (|logits| ≤ {p['logits_max']:.1f}), final states by "
                  f"≤ {p['states_max_abs']:.1e}."), ""]
    head = "| T | logits | ours s |" + (" authors s | speed-up |" if theirs else "")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [f"{r['T']:,}", "full" if r["logits"] else "last only", f"{r['ours_s']:.2f}"]
        if theirs:
            cells += [f"{r['theirs_s']:.2f}", f"{r['speedup']:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    Ts = sorted({r["T"] for r in rows})
    if len(Ts) >= 2:
        a, b = Ts[-2], Ts[-1]
        lines.append("")
        for logits in (True, False):
            g = [f"ours {_growth(rows, 'ours_s', logits, a, b):.2f}×"]
            if theirs:
                g.append(f"theirs {_growth(rows, 'theirs_s', logits, a, b):.2f}×")
            lines.append(f"- growth T = {a:,} → {b:,} ({'full logits' if logits else 'no logits'}"
                         f"): " + ", ".join(g))
    return "\n".join(lines)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--authors-repo", default=None,
                   help="checkout of github.com/declare-lab/delta-Mem (omit: ours only)")
    p.add_argument("--T", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--attention-impl", default="auto", choices=ATTENTION_IMPLS)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the authors' side")
    for key, value in SHAPE.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)


def cmd(args) -> int:
    shape = {k: getattr(args, k) for k in SHAPE}
    record = run_prefill(args.T, args.repeats, args.attention_impl, args.authors_repo, shape,
                         args.threads)
    emit_outputs(format_markdown(record), record, args)
    return 0
