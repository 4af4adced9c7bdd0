"""Recall through the server: facts told turn by turn, asked later, long out of the window.

    python -m deltamem_jax.tools.serve.recall --model DIR --adapter DIR --data test.jsonl
        [--n 200] [--window 40] [--keep 0]

Starts ``deltamem-serve`` on 127.0.0.1, and for each chat record (the format of
``deltamem_jax.data``: the last assistant message is the answer) sends every
earlier user message as its own turn of one session (the server generates the
replies, everything is written into memory), then asks the final question as a
read-only turn (``write_memory: false``) and, as a control, statelessly (no
memory). Prints exact match for both, and the session's counts showing how
little of the conversation was still in the KV window.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence

from deltamem_jax.tools.serve.process import ServerProcess


def _ask(server: ServerProcess, text: str, sid: str | None, write: bool, max_tokens: int) -> str:
    headers = {} if sid is None else {"X-Session-Id": sid, "X-Session-Mode": "append"}
    status, body = server.request("POST", "/v1/chat/completions", {
        "model": server.model_name, "messages": [{"role": "user", "content": text}],
        "temperature": 0, "max_tokens": max_tokens, "write_memory": write}, headers)
    if status != 200:
        raise RuntimeError(f"request failed ({status}): {body}")
    return body["choices"][0]["message"]["content"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deltamem_jax.tools.serve.recall",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--data", required=True, help="a .jsonl of chat records")
    p.add_argument("--n", type=int, default=200, help="records to replay")
    p.add_argument("--window", type=int, default=40)
    p.add_argument("--keep", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--show", type=int, default=3, help="conversations to print")
    args = p.parse_args(argv)
    with open(args.data, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()][:args.n]
    with tempfile.TemporaryDirectory(prefix="deltamem_recall_") as work:
        server = ServerProcess(args.model, args.adapter, f"{work}/state", args=[
            "--window", str(args.window), "--keep", str(args.keep), "--chunk", "32",
            "--max-tokens", str(args.max_tokens), "--log-level", "warning"]).start()
        try:
            hits = control = 0
            window, written = [], []
            for i, rec in enumerate(records):
                msgs, sid = rec["messages"], f"conv-{i}"
                answer, question = msgs[-1]["content"].strip(), msgs[-2]["content"]
                lines = []
                for m in msgs[:-2]:
                    if m["role"] == "user":
                        reply = _ask(server, m["content"], sid, True, args.max_tokens)
                        lines.append(f"  user: {m['content']}\n  assistant: {reply}")
                got = _ask(server, question, sid, False, args.max_tokens).strip()
                alone = _ask(server, question, None, True, args.max_tokens).strip()
                hits += got == answer
                control += alone == answer
                info = server.session(sid)
                window.append(info["window_tokens"])
                written.append(info["tokens_written"])
                if i < args.show:
                    print("\n".join(lines + [f"  user: {question}  (read-only)",
                                             (f"  assistant: {got}   [expected: {answer}; "
                                             f"without memory: {alone}]"),
                                             (f"  session: {info['tokens_written']} tokens "
                                             f"written, {info['window_tokens']} in the window")]))
                    print()
        finally:
            server.stop()
    n = len(records)
    print(f"exact match over {n} conversations: with the session's memory {hits}/{n} "
          f"({hits / n:.1%}), stateless (no memory) {control}/{n} ({control / n:.1%}); "
          f"mean {sum(written) / n:.0f} tokens written per session, "
          f"{sum(window) / n:.1f} left in the KV window (window {args.window}, keep "
          f"{args.keep})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
