"""Benchmarks: ``python -m deltamem_jax.tools.bench <subcommand> [options]``.

Each subcommand lives in its own module with ``add_args(parser)`` and
``cmd(args) -> int``; they share :mod:`deltamem_jax.tools.bench.common` (machine
line, alternated timing, output files). Register a new one in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

# name -> (module, help)
SUBCOMMANDS = {
    "scan": ("deltamem_jax.tools.bench.scan",
             "OSAM recurrence: time, memory, FLOPs, depth by method"),
    "throughput": ("deltamem_jax.tools.bench.throughput",
                   "prefill/decode: backbone vs + δ-mem; decode latency vs history length"),
    "load": ("deltamem_jax.tools.bench.load", "seconds per GB to load a sharded HF checkpoint"),
    "serve": ("deltamem_jax.tools.bench.serve_load",
              "the server under 1/4/16 concurrent sessions vs one request at a time"),
    "accel": ("deltamem_jax.tools.bench.accel",
              "one GPU/TPU in ≤ 5 min: scan methods, model write/decode per attention, auto"),
    "prefill": ("deltamem_jax.tools.bench.prefill",
                "whole-model write pass against the authors' release (same model, same CPU)"),
    "train": ("deltamem_jax.tools.bench.train_step",
              "δ-mem train step on a checkpoint: compute levers timed side by side"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deltamem_jax.tools.bench",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        importlib.import_module(module).add_args(
            sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(SUBCOMMANDS[args.command][0]).cmd(args)


if __name__ == "__main__":
    raise SystemExit(main())
