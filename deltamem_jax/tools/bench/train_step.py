"""Train-step cost of δ-mem on a frozen checkpoint: the compute levers, timed side by side.

``python -m deltamem_jax.tools.bench train --model DIR`` compiles train.py's step
(:func:`deltamem_jax.training.loop.compile_step`) for the demo's δ-mem config and for
variants of it (δ-mem on a third of the layers only, one scanned layer body, bfloat16
weights, a larger batch, a longer write segment), then times them round-robin so that
machine drift hits all alike. It also splits the base step into its parts: the
writing pass forward, the read pass forward, and the rest (both backward passes and the
optimiser update). Tokens per second count every real token of a step (write + read).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from deltamem_jax.tools.bench.common import emit_outputs, machine_info, machine_line


def _thirds(n: int) -> dict[str, tuple[int, ...]]:
    a, b = n // 3, 2 * n // 3
    return {f"layers {lo}-{hi - 1}": tuple(range(lo, hi)) for lo, hi in ((0, a), (a, b), (b, n))}


def variants(num_layers: int) -> dict[str, dict]:
    """name -> overrides ``{"config": {dotted field: value}, "batch": int, "write": int}``."""
    out: dict[str, dict] = {"base (all layers)": {}}
    for name, layers in _thirds(num_layers).items():
        out[name] = {"config": {"memory.target_layers": layers}}
    out["scan_layers (all layers)"] = {"config": {"model.scan_layers": True}}
    out["bf16 weights"] = {"config": {"model.param_dtype": "bfloat16"}}
    out["bf16 weights + compute"] = {"config": {"model.param_dtype": "bfloat16",
                                                "model.dtype": "bfloat16"}}
    out["batch ×2"] = {"batch": 2}
    out["write ×2"] = {"write": 2}
    return out


def _config(model_dir: str, overrides: dict, batch: int):
    from deltamem_jax.training.defaults import smollm2_demo_config
    c = smollm2_demo_config()
    c.model.hf_dir = model_dir
    c.memory.target_layers = ()
    c.train.batch_size = batch
    for key, value in overrides.items():
        section, field = key.split(".")
        c[section][field] = value
    return c


def _batch(rng, vocab: int, batch: int, write: int, read: int, answer: int = 8) -> dict:
    """Host rows ``[batch, length]`` of random tokens; the last ``answer`` read tokens labelled."""
    ids = lambda n: rng.integers(3, vocab, (batch, n))
    labels = np.where(np.arange(read) >= read - answer, ids(read), -100)
    return {"write_ids": ids(write), "write_mask": np.ones((batch, write)),
            "write_message_ids": -np.ones((batch, write)),
            "write_sentence_ids": -np.ones((batch, write)),
            "read_ids": ids(read), "read_mask": np.ones((batch, read)), "labels": labels}


class _Step:
    """One compiled variant: ``run()`` does one train step on a fixed random batch.

    ``frozen_cache`` shares the loaded backbone between variants with the same layout.
    """

    def __init__(self, model_dir: str, spec: dict, batch: int, write: int, read: int,
                 frozen_cache: dict | None = None):
        from deltamem_jax.training import loop
        from deltamem_jax.training.settings import resolve
        from deltamem_jax.training.state import init_params, init_train_state, load_frozen
        from deltamem_jax.utils.sharding import logical_rules
        self.batch = batch * spec.get("batch", 1)
        self.write = write * spec.get("write", 1)
        self.read = read
        c = _config(model_dir, spec.get("config", {}), self.batch)
        self.setup = s = loop.setup(resolve(c, need_data=False), need_data=False)
        self.ctx = lambda: (jax.set_mesh(s.mesh), logical_rules(s.rules))
        mesh_ctx, rules_ctx = self.ctx()
        with mesh_ctx, rules_ctx:
            key = (c.model.param_dtype, bool(c.model.scan_layers))
            cache = {} if frozen_cache is None else frozen_cache
            if key not in cache:
                cache[key] = load_frozen(s.plan, model_dir, 0)
            self.frozen = cache[key]
            params = init_params(s.plan, self.frozen, 0)
            self.state = init_train_state(s.plan, params, s.tx, 0, s.shardings)
            self.data = loop.global_batch(s, _batch(np.random.default_rng(0),
                                                    s.plan.decoder.vocab_size, self.batch,
                                                    self.write, read))
            self.fn = loop.compile_step(s)
            t = time.perf_counter()
            self.run()
            self.compile_s = time.perf_counter() - t
        self.tokens = self.batch * (self.write + read)

    def run(self) -> float:
        mesh_ctx, rules_ctx = self.ctx()
        with mesh_ctx, rules_ctx:
            t = time.perf_counter()
            self.state, metrics = self.fn(self.state, self.frozen, self.data)
            jax.block_until_ready(metrics)
            return time.perf_counter() - t

    def parts(self) -> dict[str, Callable[[], float]]:
        """Forward-only timers of the write pass and the read pass of this step."""
        from flax import nnx
        s, data = self.setup, {k: v[0] for k, v in self.data.items()}

        @jax.jit
        def write_fwd(params, frozen):
            model = nnx.merge(s.plan.graphdef, params, frozen)
            return model(data["write_ids"], attention_mask=data["write_mask"], write=True,
                         compute_logits=False).memory_state

        @jax.jit
        def read_fwd(params, frozen, state):
            model = nnx.merge(s.plan.graphdef, params, frozen)
            return model(data["read_ids"], attention_mask=data["read_mask"], memory_state=state,
                         write=False).logits

        # a copy: the train step donates (and so deletes) the state it is given
        params = jax.tree.map(jnp.copy, self.state.params)
        mem = write_fwd(params, self.frozen)
        jax.block_until_ready(read_fwd(params, self.frozen, mem))

        def timed(fn, *args):
            def run():
                t = time.perf_counter()
                jax.block_until_ready(fn(*args))
                return time.perf_counter() - t
            return run
        return {"write forward": timed(write_fwd, params, self.frozen),
                "read forward": timed(read_fwd, params, self.frozen, mem)}


def run_train_bench(model_dir: str, names: list[str] | None, batch: int, write: int, read: int,
                    repeats: int, log=print) -> dict:
    from deltamem_jax.models.config import DecoderConfig
    layers = DecoderConfig.from_pretrained(model_dir).num_hidden_layers
    table = variants(layers)
    names = names or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {list(table)}")
    steps, frozen = {}, {}
    for n in names:
        steps[n] = _Step(model_dir, table[n], batch, write, read, frozen)
        log(f"compiled {n!r}: {steps[n].compile_s:.1f} s (compile + first step)")
    base = steps[names[0]]
    parts = base.parts()
    times: dict[str, list[float]] = {n: [] for n in list(names) + list(parts)}
    for r in range(repeats):         # round-robin: every variant sees the same drift
        for n in names:
            times[n].append(steps[n].run())
        for p, fn in parts.items():
            times[p].append(fn())
        log(f"round {r + 1}/{repeats}: " + ", ".join(
            f"{n} {times[n][-1]:.2f}s" for n in times))
    rows = []
    for n in names:
        ratios = [t / b for t, b in zip(times[n], times[names[0]])]
        rows.append({"variant": n, "batch": steps[n].batch, "write": steps[n].write,
                     "read": read, "compile_s": steps[n].compile_s,
                     "step_s": statistics.median(times[n]),
                     "tokens_per_s": steps[n].tokens / statistics.median(times[n]),
                     "time_vs_base": statistics.median(ratios),
                     "per_token_vs_base": statistics.median(ratios) * base.tokens
                     / steps[n].tokens})
    step = statistics.median(times[names[0]])
    split = {p: statistics.median(times[p]) for p in parts}
    split["backward passes + update"] = step - sum(split.values())
    return {"model": model_dir, "layers": layers, "rows": rows, "base_split_s": split,
            "base_step_s": step}


def format_markdown(res: dict, machine: dict) -> str:
    lines = [machine_line(machine), "",
             (f"Train step of δ-mem (rank 8, q,o) on the frozen `{res['model']}` "
              f"({res['layers']} layers); median of round-robin repeats."), "",
             ("| variant | batch × (write + read) | compile + 1st step s | step s | tokens/s | "
              "time vs base | per token vs base |"), "|---|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['variant']} | {r['batch']} × ({r['write']} + {r['read']}) | "
                     f"{r['compile_s']:.0f} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['time_vs_base']:.2f}× | {r['per_token_vs_base']:.2f}× |")
    lines += ["", f"Where the base step's {res['base_step_s']:.2f} s go:", "",
              "| part | seconds | share |", "|---|---:|---:|"]
    for p, t in res["base_split_s"].items():
        lines.append(f"| {p} | {t:.2f} | {100 * t / res['base_step_s']:.0f} % |")
    return "\n".join(lines) + "\n"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a model directory (e.g. the demo's backbone)")
    p.add_argument("--variants", nargs="+", default=None,
                   help="variant names (default: all; the first is the reference)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--write", type=int, default=128, help="write-segment tokens per row")
    p.add_argument("--read", type=int, default=48, help="read-segment tokens per row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--markdown")


def cmd(args: argparse.Namespace) -> int:
    machine = machine_info()
    print(machine_line(machine), flush=True)
    res = run_train_bench(args.model, args.variants, args.batch, args.write, args.read,
                          args.repeats, log=lambda s: print(s, flush=True))
    machine["load_avg_1min_end"] = machine_info()["load_avg_1min"]
    emit_outputs(format_markdown(res, machine), {"machine": machine, **res}, args)
    return 0
