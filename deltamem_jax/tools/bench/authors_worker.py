"""The authors' side of ``bench prefill``: their δ-mem release, driven over a pipe.

Run as a subprocess with the authors' repository on ``PYTHONPATH`` (it is read
from a local checkout, never vendored). It builds a seeded random Qwen3 with
transformers, attaches their δ-mem, fills its parameters with seeded random
values, saves backbone and adapter in the HF / authors' formats (so the JAX
side loads the very same weights), then answers one JSON request per line on
stdin with one JSON line on stdout:

* ``{"cmd": "run", "T": 512, "logits": true}`` — one write pass over ``T``
  random tokens (fresh state, ``torch.no_grad``); replies ``{"seconds": ...}``.
  ``logits: false`` asks for the last position's logits only
  (``logits_to_keep=1``, the transformers way to skip the full LM head).
* ``{"cmd": "logits", "ids": "file.npy", "out": "file.npz"}`` — full logits
  and final δ-mem states of one write pass, for the parity check.
* ``{"cmd": "quit"}``.

A separate process keeps torch's OpenMP threads and JAX's thread pool from
competing: while one side runs, the other waits on the pipe.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _fill_memory_params(model, seed: int, hidden: int, rank_total: int) -> None:
    """Seeded random δ-mem parameters (their init zeroes Δ heads and β: a no-op memory)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    scale = {"memory_q_proj": 1.5 / hidden ** 0.5, "memory_k_proj": 1.5 / hidden ** 0.5,
             "memory_v_proj": 1.0 / hidden ** 0.5, "beta_proj": 1.0 / hidden ** 0.5,
             "lambda_proj": 1.0 / hidden ** 0.5}
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in scale:
                p.copy_(torch.randn(p.shape, generator=gen) * scale[leaf])
            elif leaf.startswith("delta_") and leaf.endswith("_proj"):
                p.copy_(torch.randn(p.shape, generator=gen) * (0.1 / rank_total ** 0.5))
            elif leaf == "beta_bias":
                p.copy_(-1.0 + 0.5 * torch.randn(p.shape, generator=gen))
            elif leaf == "lambda_bias":
                p.copy_(1.5 + 0.5 * torch.randn(p.shape, generator=gen))


def build(args) -> dict:
    """Build, save and keep the authors' model; return a description."""
    import torch
    import transformers
    from deltamem.core.delta import HFDeltaMemConfig, attach_delta_mem
    from deltamem.core.delta_impl import save_delta_mem_adapter
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        max_position_embeddings=args.max_positions, tie_word_embeddings=False,
        initializer_range=0.02, rope_theta=1e6)
    config._attn_implementation = args.attention
    model = Qwen3ForCausalLM(config).to(torch.float32).eval()
    backbone = os.path.join(args.workdir, "backbone")
    model.save_pretrained(backbone)
    mem = HFDeltaMemConfig(rank=args.rank, delta_heads=tuple(args.delta_heads))
    attach_delta_mem(model, mem)
    _fill_memory_params(model, args.seed + 1, args.hidden, args.rank)
    adapter = os.path.join(args.workdir, "adapter")
    save_delta_mem_adapter(model, adapter, mem)
    model.eval()
    global _MODEL
    _MODEL = model
    return {"ready": True, "backbone": backbone, "adapter": adapter,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "attention": config._attn_implementation,
            "scan_impl": os.environ.get("DELTA_MEM_SCAN_IMPL", "auto")}


_MODEL = None


def _forward(ids, full_logits: bool):
    import torch
    from deltamem.core.delta_impl import reset_delta_mem_states
    reset_delta_mem_states(_MODEL)
    with torch.no_grad():
        kwargs = {} if full_logits else {"logits_to_keep": 1}
        return _MODEL(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits


def _states():
    from deltamem.core.delta_impl import iter_delta_mem_modules
    return [m.delta_state.detach().numpy() for _, m in iter_delta_mem_modules(_MODEL)]


def serve(args) -> None:
    import numpy as np
    import torch
    out, sys.stdout = sys.stdout, sys.stderr      # stray prints must not break the protocol
    out.write(json.dumps(build(args)) + "\n")
    out.flush()
    rng = np.random.default_rng(args.seed)
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "quit":
            break
        if req["cmd"] == "run":
            ids = torch.from_numpy(rng.integers(3, args.vocab, (1, int(req["T"]))))
            t0 = time.perf_counter()
            logits = _forward(ids, bool(req["logits"]))
            reply = {"seconds": time.perf_counter() - t0, "logits_shape": list(logits.shape)}
        elif req["cmd"] == "logits":
            ids = torch.from_numpy(np.load(req["ids"]).astype(np.int64))
            logits = _forward(ids, True).numpy()
            np.savez(req["out"], logits=logits, states=np.stack(_states()))
            reply = {"ok": True}
        else:
            reply = {"error": f"unknown command {req['cmd']!r}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attention", default="sdpa")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--max-positions", type=int, default=32768)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--delta-heads", nargs="+", default=["q", "o"])
    serve(p.parse_args(argv))


if __name__ == "__main__":
    main()
