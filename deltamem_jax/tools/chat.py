"""A small terminal chat with a δ-mem session.

    python -m deltamem_jax.tools.chat --model DIR [--adapter DIR] [--window N]
        [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]

Type a message to get a reply (both are written into the memory). Commands:
``/save DIR``, ``/load DIR``, ``/reset``, ``/stats``, ``/help``, ``/quit``.
:meth:`ChatApp.handle` takes one input line and returns the text to print, so
the loop can be driven without a terminal.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from deltamem_jax.inference.generation import SamplingConfig
from deltamem_jax.inference.session import Session, SnapshotError

HELP = """commands:
  /save DIR   snapshot the session (memory state, cache window, messages) to DIR
  /load DIR   restore a snapshot saved with /save
  /reset      clear memory, cache and messages
  /stats      δ-mem state norms and β means per layer, token counts
  /help       this text
  /quit       leave (also Ctrl-D)
anything else is sent as a user message."""


def format_stats(stats: dict) -> str:
    window = "all" if stats["window"] is None else stats["window"]
    lines = [f"messages {stats['messages']} | tokens seen {stats['tokens_seen']}, "
             f"written {stats['tokens_written']} | cache {stats['cache_tokens']} tokens "
             f"(window {window}, capacity {stats['cache_capacity']}) | "
             f"compactions {stats['compactions']}, reverts {stats['reverts']}, "
             f"rebuilds {stats['rebuilds']}"]
    if not stats["layers"]:
        lines.append("no δ-mem attached (bare backbone)")
        return "\n".join(lines)
    betas = stats["beta_means"] or [None] * len(stats["layers"])
    lines.append(f"{'layer':>5}  {'|S|_F':>10}  {'beta mean':>9}")
    for layer, norm, beta in zip(stats["layers"], stats["state_norms"], betas):
        b = "-" if beta is None else f"{beta:.4f}"
        lines.append(f"{layer:>5}  {norm:>10.4f}  {b:>9}")
    return "\n".join(lines)


class ChatApp:
    """The REPL's state and logic: ``handle(line) -> text``; ``done`` after /quit."""

    def __init__(self, session: Session, sampling: SamplingConfig | None = None):
        self.session = session
        self.sampling = sampling or session.sampling
        self.done = False

    def handle(self, line: str) -> str:
        line = line.strip()
        if not line:
            return ""
        try:
            return self._handle(line)
        except (SnapshotError, OSError, ValueError) as e:
            return f"error: {e}"

    def _handle(self, line: str) -> str:
        if not line.startswith("/"):
            self.session.add_user(line)
            return self.session.reply(self.sampling)
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit"):
            self.done = True
            return "bye"
        if cmd == "/help":
            return HELP
        if cmd == "/reset":
            self.session.reset()
            return "session reset (memory, cache and messages cleared)"
        if cmd == "/stats":
            return format_stats(self.session.stats())
        if cmd == "/save":
            if not arg:
                return "usage: /save DIR"
            self.session.snapshot(arg)
            return f"saved session ({len(self.session.messages)} messages) to {arg}"
        if cmd == "/load":
            if not arg:
                return "usage: /load DIR"
            self.session = Session.restore(arg, self.session.runner, self.session.tokenizer)
            return f"loaded session ({len(self.session.messages)} messages) from {arg}"
        return f"unknown command {cmd!r} (try /help)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deltamem_jax.tools.chat",
                                description="Chat with a frozen LM + δ-mem adapter.")
    p.add_argument("--model", required=True, help="local HF model directory (config + weights "
                   "+ tokenizer, or a deltamem_tokenizer.json marker)")
    p.add_argument("--adapter", help="δ-mem adapter directory (authors' format); "
                   "without it the bare backbone is used")
    p.add_argument("--tokenizer", help="tokenizer directory or 'byte' (default: --model)")
    p.add_argument("--window", type=int, default=None,
                   help="max tokens kept in the KV cache (default: all)")
    p.add_argument("--capacity", type=int, default=None,
                   help="initial KV-cache length (default: sized from --window)")
    p.add_argument("--chunk", type=int, default=256,
                   help="longest single model pass when feeding text (a power of two)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="activation and weight dtype (default: float32)")
    return p


def main(argv: Sequence[str] | None = None, stdin: TextIO = sys.stdin,
         stdout: TextIO = sys.stdout) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p)
        session = Session.from_pretrained(args.model, args.adapter, tokenizer=args.tokenizer,
                                          dtype=args.dtype, window=args.window,
                                          sampling=sampling, system=args.system, seed=args.seed,
                                          capacity=args.capacity, chunk=args.chunk)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    app = ChatApp(session, sampling)
    interactive = stdin.isatty()
    if interactive:
        print("δ-mem chat — /help for commands", file=stdout)
    while not app.done:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        out = app.handle(line)
        if out:
            print(out, file=stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
