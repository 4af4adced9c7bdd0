"""``python -m deltamem_jax.tools.serve`` (or ``deltamem-serve``): start the server.

    deltamem-serve --model DIR [--adapter DIR] --state-dir DIR [--host 127.0.0.1]
        [--port 8000] [--api-key KEY ...] [--api-key-file FILE] [--allow-remote]
        [--slots 8] [--window 1024] [--max-tokens 512] ...

Without API keys the server binds only to loopback addresses unless
``--allow-remote`` is given. ``--port 0`` picks a free port; ``--port-file``
receives ``{"host": ..., "port": ...}`` once the model is loaded, compiled and
listening (what scripts wait for).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

log = logging.getLogger("deltamem.serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltamem-serve", description=(
        "OpenAI-compatible chat server whose sessions keep their δ-mem state."))
    p.add_argument("--model", required=True, help="backbone directory (HF layout)")
    p.add_argument("--adapter", help="δ-mem adapter directory (authors' format)")
    p.add_argument("--tokenizer", help="tokenizer directory or 'byte' (default: --model)")
    p.add_argument("--dtype", help="activation/weight dtype, e.g. bfloat16 (default: checkpoint)")
    p.add_argument("--model-name", help="the name clients send as 'model' (default: the "
                                        "model directory's name)")
    p.add_argument("--state-dir", required=True, help="where sessions are kept")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument("--port-file", help="write {host, port} here once ready")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept this bearer key (repeatable); sessions are per key")
    p.add_argument("--api-key-file", help="a file with one API key per line")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host without API keys")
    p.add_argument("--slots", type=int, default=8, help="sessions decoded in one batch")
    p.add_argument("--prefill-rows", type=int,
                   help="sessions prefilled in one batched call; every call is padded to this "
                        "many rows (default: min(slots, 4) on CPU, min(slots, 8) on "
                        "accelerators)")
    p.add_argument("--window", type=int, default=1024, help="KV-cache window per session")
    p.add_argument("--keep", type=int, help="tokens a full window keeps when it is rebuilt "
                                            "(default: half the window)")
    p.add_argument("--chunk", type=int, default=256, help="longest prefill pass (power of 2)")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="the most tokens one reply may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=32768,
                   help="the most tokens one request may add to a session")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20)
    p.add_argument("--max-queue", type=int, default=256,
                   help="turns in flight before requests get a 429")
    p.add_argument("--session-cache", type=int, default=256, metavar="N",
                   help="keep the committed state of up to N recently used sessions in host "
                        "memory, so their next turn skips reading it back (0: off)")
    p.add_argument("--session-cache-mb", type=float, default=1024, metavar="MB",
                   help="... holding at most this many MiB")
    p.add_argument("--no-fsync", action="store_true",
                   help="skip fsync on commits (survives a killed process, not a power cut)")
    p.add_argument("--no-warmup", action="store_true", help="do not compile before listening")
    p.add_argument("--log-level", default="info")
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _keys(args, parser) -> tuple[str, ...]:
    keys = list(args.api_key)
    if args.api_key_file:
        try:
            text = Path(args.api_key_file).read_text()
        except OSError as e:
            parser.error(f"--api-key-file {args.api_key_file}: {e}")
        keys += [line.strip() for line in text.splitlines()
                 if line.strip() and not line.startswith("#")]
    if any(len(k) < 8 or any(c.isspace() for c in k) for k in keys):
        parser.error("API keys must be at least 8 characters without spaces")
    return tuple(dict.fromkeys(keys))


def _warm_up(service) -> None:
    """Compile what the first requests need: two stateless turns through the scheduler, the
    first longer than the window (full-chunk prefill, compaction, decoding)."""
    from deltamem_jax.inference.scheduler import Turn

    c = service.config
    text = "Hello! "
    while len(service.tokenizer.encode(text)) < c.window + c.chunk:
        text += text
    session = service.new_session()
    for content in (text, "Thanks."):
        done = threading.Event()
        errors: list = []

        def on_event(e, done=done, errors=errors):
            if e.kind == "error":
                errors.append(e.error)
            if e.kind in ("done", "error"):
                done.set()

        service.scheduler.submit(Turn(session=session, on_event=on_event, max_tokens=2,
                                      messages=[{"role": "user", "content": content}]))
        done.wait()
        if errors:
            raise RuntimeError(f"warm-up turn failed: {errors[0]!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = _keys(args, parser)
    if not keys and not _is_loopback(args.host) and not args.allow_remote:
        parser.error(f"refusing to serve {args.host!r} without API keys: pass --api-key, "
                     f"bind a loopback address, or --allow-remote")
    import uvicorn

    from deltamem_jax.checkpoints.pretrained import load_pretrained
    from deltamem_jax.data.tokenizer import load_tokenizer
    from deltamem_jax.models.functional import Runner
    from deltamem_jax.tools.serve.app import create_app
    from deltamem_jax.tools.serve.service import ServeConfig, Service
    from deltamem_jax.utils.atomic import atomic_write_json

    try:
        config = ServeConfig(
            state_dir=Path(args.state_dir), api_keys=keys, slots=args.slots,
            prefill_rows=args.prefill_rows,
            model_name=args.model_name or Path(os.path.abspath(args.model)).name,
            window=args.window, keep=args.keep, chunk=args.chunk, max_tokens=args.max_tokens,
            max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes,
            max_queue=args.max_queue, fsync=not args.no_fsync,
            cache_sessions=args.session_cache, cache_bytes=int(args.session_cache_mb * 2**20))
    except ValueError as e:
        parser.error(str(e))
    t0 = time.perf_counter()
    model = load_pretrained(args.model, args.adapter, dtype=args.dtype)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    service = Service(Runner(model), tokenizer, config)
    log.info("model %s loaded in %.1f s; %d slots × %d-token caches, prefill rows %d; "
             "recovered %s", config.model_name, time.perf_counter() - t0, config.slots,
             service.capacity, service.scheduler.prefill_rows, service.recovered)
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(128)
        sock.set_inheritable(True)
    except OSError as e:
        service.close()
        parser.error(f"cannot listen on {args.host}:{args.port}: {e}")
    try:
        if not args.no_warmup:
            t1 = time.perf_counter()
            _warm_up(service)
            log.info("compiled in %.1f s", time.perf_counter() - t1)
        host, port = sock.getsockname()[:2]
        server = uvicorn.Server(uvicorn.Config(create_app(service), log_level=args.log_level,
                                               timeout_keep_alive=5, access_log=False))
        if args.port_file:
            atomic_write_json(args.port_file, {"host": host, "port": port, "pid": os.getpid()})
        log.info("serving %s on http://%s:%d (keys: %d)", config.model_name, host, port,
                 len(keys))
        server.run(sockets=[sock])
    finally:
        service.close()
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
