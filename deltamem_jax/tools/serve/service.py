"""What the HTTP routes do: keys → namespaces, sessions, turns, durable commits.

A turn on a named session holds that session's lock from loading to commit,
so turns of one session are served one after another (a second request waits),
while turns of different sessions share the decode batch. The turn is driven
by a server-side task, not by the HTTP response: the task commits the session
(:class:`~deltamem_jax.inference.store.SessionStore`) before the response's
last byte, and a client that goes away mid-stream cancels the turn, which is
then never committed (the session stays at its last acknowledged turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jax
from starlette.concurrency import run_in_threadpool

from deltamem_jax.inference.generation import SamplingConfig
from deltamem_jax.inference.host_cache import HostCache
from deltamem_jax.inference.scheduler import (
    Scheduler,
    Turn,
    TurnCancelled,
    TurnEvent,
    key_from_seed,
)
from deltamem_jax.inference.session import Session
from deltamem_jax.inference.snapshot import SnapshotError
from deltamem_jax.inference.store import SessionStore, valid_name
from deltamem_jax.models.functional import Runner
from deltamem_jax.tools.serve.protocol import (
    APIError,
    ChatRequest,
    new_messages,
    normalise_messages,
    stop_strings,
)
from deltamem_jax.utils.atomic import atomic_directory

__all__ = ["ServeConfig", "Service", "TurnJob"]

log = logging.getLogger("deltamem.serve")
ANONYMOUS = "public"


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Server settings (the command line's, minus where to listen)."""

    state_dir: Path
    model_name: str
    api_keys: tuple[str, ...] = ()
    slots: int = 8
    prefill_rows: int | None = None  # sessions per batched prefill call (None: up to 4 on
                                     # CPU, up to 8 on accelerators)
    window: int = 1024
    keep: int | None = None          # tokens a window rebuild keeps (None: window // 2)
    chunk: int = 256
    max_tokens: int = 512            # the most a request may ask for (sizes every cache)
    max_prompt_tokens: int = 32768   # the most tokens one request may add to a session
    max_body_bytes: int = 4 << 20
    max_queue: int = 256             # turns waiting for a slot before requests get a 429
    fsync: bool = True
    cache_sessions: int = 256        # recently used sessions kept in host memory (0: none)
    cache_bytes: int = 1 << 30       # ... holding at most this many bytes

    def __post_init__(self):
        for name in ("slots", "window", "chunk", "max_tokens", "max_prompt_tokens",
                     "max_body_bytes", "max_queue", "prefill_rows"):
            if getattr(self, name) is None:
                continue
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("cache_sessions", "cache_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if self.chunk & (self.chunk - 1):
            raise ValueError(f"chunk must be a power of two, got {self.chunk}")
        if self.keep is not None and not 0 <= self.keep < self.window:
            raise ValueError(f"keep must be in [0, window), got {self.keep}")

    @property
    def kept(self) -> int:
        return self.window // 2 if self.keep is None else self.keep


class _Locks:
    """One asyncio lock per session, dropped when nobody holds or awaits it."""

    def __init__(self):
        self._entries: dict[tuple[str, str], list] = {}     # key → [lock, users]

    async def acquire(self, key: tuple[str, str]) -> None:
        entry = self._entries.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            await entry[0].acquire()
        except BaseException:
            self._leave(key)
            raise

    def release(self, key: tuple[str, str]) -> None:
        self._entries[key][0].release()
        self._leave(key)

    def _leave(self, key: tuple[str, str]) -> None:
        entry = self._entries[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._entries[key]

    @contextlib.asynccontextmanager
    async def hold(self, key: tuple[str, str]):
        await self.acquire(key)
        try:
            yield
        finally:
            self.release(key)

    def __len__(self) -> int:
        return len(self._entries)


@dataclasses.dataclass
class TurnJob:
    """A turn in flight: its events (``delta`` texts, then ``done`` or ``error``) as the
    HTTP response should see them, after the commit."""

    turn: Turn
    events: asyncio.Queue
    task: asyncio.Task | None = None


class Service:
    """Sessions of one model behind the HTTP routes (see the module docstring)."""

    def __init__(self, runner: Runner, tokenizer, config: ServeConfig):
        self.runner, self.tokenizer, self.config = runner, tokenizer, config
        self.capacity = Session.required_capacity(config.window, config.max_tokens,
                                                  config.chunk)
        self.store = SessionStore(Path(config.state_dir) / "sessions", runner, tokenizer,
                                  fsync=config.fsync,
                                  cache=HostCache(config.cache_sessions, config.cache_bytes))
        self.snapshots = Path(config.state_dir) / "snapshots"
        self.recovered = self.store.recover()
        rows = config.prefill_rows
        if rows is None:
            rows = min(config.slots, 4 if jax.default_backend() == "cpu" else 8)
        self.scheduler = Scheduler(runner, tokenizer, slots=config.slots, capacity=self.capacity,
                                   prefill_rows=rows).start()
        self._namespaces = {hashlib.sha256(k.encode()).hexdigest()[:32]: k
                            for k in config.api_keys}
        self._locks = _Locks()
        self._in_flight = 0
        self.started = time.time()

    def close(self) -> None:
        self.scheduler.close()

    @property
    def busy_sessions(self) -> int:
        """Sessions with a request holding or awaiting their lock."""
        return len(self._locks)

    # ------------------------------------------------------------------ identity
    def namespace(self, authorization: str | None) -> str:
        """The caller's namespace: one per API key (``public`` when the server has none)."""
        if not self.config.api_keys:
            return ANONYMOUS
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() == "bearer" and key:
            for ns, known in self._namespaces.items():
                if hmac.compare_digest(key.encode(), known.encode()):
                    return ns
        raise APIError(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                       code="invalid_api_key")

    @staticmethod
    def check_session_id(sid: str) -> str:
        if not valid_name(sid):
            raise APIError(400, "invalid session id: use 1-128 characters of [A-Za-z0-9._-], "
                                "not starting with '.'", param="X-Session-Id",
                           code="invalid_session_id")
        return sid

    def new_session(self) -> Session:
        c = self.config
        return Session(self.runner, self.tokenizer, window=c.window, keep=c.kept, chunk=c.chunk,
                       capacity=self.capacity, seed=int.from_bytes(os.urandom(4), "little"),
                       sampling=SamplingConfig(max_new_tokens=c.max_tokens))

    # ------------------------------------------------------------------ sessions
    async def _load(self, ns: str, sid: str):
        try:
            return await run_in_threadpool(self.store.load, ns, sid)
        except SnapshotError as e:
            log.error("session %s/%s is unreadable: %s", ns, sid, e)
            raise APIError(500, f"session {sid!r} could not be read from disk", type="server_error",
                           code="session_unreadable") from None

    async def session_info(self, ns: str, sid: str) -> dict[str, Any]:
        self.check_session_id(sid)
        info = await run_in_threadpool(self.store.info, ns, sid)
        if info is None:
            raise APIError(404, f"no session {sid!r}", param="session_id",
                           code="session_not_found")
        snaps = self.snapshots / ns / sid
        return dict(info, object="session",
                    snapshots=sorted(p.name for p in snaps.iterdir()
                                     if valid_name(p.name)) if snaps.is_dir() else [])

    async def sessions(self, ns: str) -> list[str]:
        return await run_in_threadpool(self.store.sessions, ns)

    async def delete(self, ns: str, sid: str) -> dict[str, Any]:
        self.check_session_id(sid)
        async with self._locks.hold((ns, sid)):
            gone = await run_in_threadpool(self.store.delete, ns, sid)
        if not gone:
            raise APIError(404, f"no session {sid!r}", param="session_id",
                           code="session_not_found")
        shutil.rmtree(self.snapshots / ns / sid, ignore_errors=True)
        return {"id": sid, "object": "session", "deleted": True}

    async def snapshot(self, ns: str, sid: str, name: str | None) -> dict[str, Any]:
        """Copy the committed version to the named snapshot ``name`` (atomically)."""
        self.check_session_id(sid)
        name = name or time.strftime("%Y%m%d-%H%M%S")
        if not valid_name(name):
            raise APIError(400, "invalid snapshot name: use 1-128 characters of "
                                "[A-Za-z0-9._-], not starting with '.'", param="name")
        async with self._locks.hold((ns, sid)):
            def copy():
                with self.store.lock(ns, sid):
                    src = self.store.version_dir(ns, sid)
                    if src is None:
                        return None
                    with atomic_directory(self.snapshots / ns / sid / name,
                                          fsync=self.config.fsync) as tmp:
                        for f in src.iterdir():
                            shutil.copy2(f, os.path.join(tmp, f.name))
                    return src
            if await run_in_threadpool(copy) is None:
                raise APIError(404, f"no session {sid!r}", param="session_id",
                               code="session_not_found")
        return {"id": sid, "object": "session.snapshot", "snapshot": name}

    async def restore(self, ns: str, sid: str, name: str, source: str | None) -> dict[str, Any]:
        """Make snapshot ``name`` of session ``source`` (default: ``sid``) the state of
        ``sid`` (a new session if it does not exist: a fork)."""
        self.check_session_id(sid)
        source = self.check_session_id(source or sid)
        if not valid_name(name):
            raise APIError(400, "invalid snapshot name", param="snapshot")
        path = self.snapshots / ns / source / name
        if not path.is_dir():
            raise APIError(404, f"session {source!r} has no snapshot {name!r}", param="snapshot",
                           code="snapshot_not_found")
        async with self._locks.hold((ns, sid)):
            try:
                state, snap_info = await run_in_threadpool(self.store.read_version, path)
            except SnapshotError as e:
                raise APIError(409, f"snapshot {name!r} cannot be restored: "
                                    f"{str(e).replace(str(self.snapshots), '<snapshots>')}",
                               param="snapshot", code="snapshot_unusable") from None
            want = self.new_session().to_state().settings
            for key in ("window", "keep", "chunk", "capacity"):
                if state.settings.get(key) != want[key]:
                    raise APIError(409, f"snapshot {name!r} was taken with {key}="
                                        f"{state.settings.get(key)}, this server uses "
                                        f"{want[key]}", param="snapshot",
                                   code="snapshot_unusable")
            old = await run_in_threadpool(self.store.info, ns, sid)
            now = time.time()
            session = Session.from_state(state, self.runner, self.tokenizer)
            info = self._info(sid, session, created=(old or snap_info).get("created", now),
                              turns=snap_info.get("turns", _turns(session)), updated=now)
            info = await run_in_threadpool(self.store.commit, ns, sid, session.to_state(), info)
        return dict(info, object="session")

    def _info(self, sid: str, session: Session, *, created: float, turns: int,
              updated: float) -> dict[str, Any]:
        st = session.counts()             # not stats(): no device work on the event loop
        return {"id": sid, "created": created, "updated": updated, "turns": turns,
                "messages": st["messages"], "tokens_seen": st["tokens_seen"],
                "tokens_written": st["tokens_written"], "window_tokens": st["cache_tokens"],
                "window": st["window"], "compactions": st["compactions"]}

    # ------------------------------------------------------------------ turns
    async def start_turn(self, ns: str, sid: str | None, req: ChatRequest,
                         mode: str) -> TurnJob:
        """Validate and submit a turn; errors that are the client's come out as APIError
        before anything is generated (so a stream can still answer with a 4xx)."""
        c = self.config
        max_tokens = req.max_completion_tokens or req.max_tokens or c.max_tokens
        if max_tokens > c.max_tokens:
            raise APIError(400, f"max_tokens {max_tokens} exceeds this server's limit of "
                                f"{c.max_tokens}", param="max_tokens")
        if self._in_flight >= c.max_queue:
            raise APIError(429, "too many requests in flight; retry later",
                           type="rate_limit_error", code="server_busy")
        sent = normalise_messages(req.messages)
        lock = None
        if sid is not None:
            self.check_session_id(sid)
            lock = (ns, sid)
            await self._locks.acquire(lock)
        try:
            stored = await self._load(ns, sid) if sid is not None else None
            session = stored.session if stored is not None else self.new_session()
            info = stored.info if stored is not None else {"created": time.time(), "turns": 0}
            new = new_messages(session.messages, sent, mode)
            try:
                added = await run_in_threadpool(_count_new_tokens, session, new)
            except ValueError as e:              # the tokenizer or its template refuses them
                raise APIError(400, f"the messages cannot be rendered: {e}",
                               param="messages") from None
            if added > c.max_prompt_tokens:
                raise APIError(400, f"the new messages are {added} tokens; this server takes "
                                    f"at most {c.max_prompt_tokens} per request",
                               param="messages", code="context_length_exceeded")
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            turn = Turn(session=session, messages=new, max_tokens=max_tokens,
                        temperature=1.0 if req.temperature is None else req.temperature,
                        top_p=1.0 if req.top_p is None else req.top_p,
                        rng=None if req.seed is None else key_from_seed(req.seed),
                        stop=stop_strings(req), ignore_eos=bool(req.ignore_eos),
                        write=req.write_memory is not False,
                        on_event=lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
            job = TurnJob(turn, asyncio.Queue())
            self._in_flight += 1
            try:
                self.scheduler.submit(turn)
            except Exception:
                self._in_flight -= 1
                raise
            job.task = asyncio.create_task(self._drive(job, events, ns, sid, info, lock))
            lock = None                              # the task releases it
            return job
        finally:
            if lock is not None:
                self._locks.release(lock)

    async def _drive(self, job: TurnJob, events: asyncio.Queue, ns: str, sid: str | None,
                     info: dict[str, Any], lock: tuple[str, str] | None) -> None:
        try:
            while True:
                ev: TurnEvent = await events.get()
                if ev.kind == "delta":
                    job.events.put_nowait(ev)
                elif ev.kind == "error":
                    job.events.put_nowait(ev)
                    return
                elif ev.kind == "done":
                    break
            session = job.turn.session
            meta: dict[str, Any] | None = None
            if sid is not None:
                now = time.time()
                meta = self._info(sid, session, created=info.get("created", now),
                                  turns=int(info.get("turns", 0)) + 1, updated=now)
                try:
                    meta = await run_in_threadpool(self.store.commit, ns, sid,
                                                   session.to_state(), meta)
                except Exception as e:
                    log.exception("commit of session %s/%s failed", ns, sid)
                    job.events.put_nowait(TurnEvent("error", error=APIError(
                        500, f"the turn could not be saved: {e}", type="server_error",
                        code="commit_failed")))
                    return
            job.events.put_nowait((ev, meta))
        except asyncio.CancelledError:
            job.turn.cancelled.set()
            raise
        finally:
            self._in_flight -= 1
            if lock is not None:
                self._locks.release(lock)

    async def run_turn(self, job: TurnJob) -> tuple[TurnEvent, dict | None]:
        """Wait for the turn's end: (done event, committed session info or None)."""
        while True:
            item = await job.events.get()
            if isinstance(item, tuple):
                return item
            if item.kind == "error":
                raise _as_api_error(item.error)

    async def stream_turn(self, job: TurnJob) -> AsyncIterator[TurnEvent | tuple]:
        """The turn's deltas, then (done event, info); cancels the turn if the consumer
        stops early (a client that went away)."""
        finished = False
        try:
            while True:
                item = await job.events.get()
                if isinstance(item, tuple):
                    finished = True
                    yield item
                    return
                if item.kind == "error":
                    finished = True
                    raise _as_api_error(item.error)
                yield item
        finally:
            if not finished:
                job.turn.cancelled.set()


def _turns(session: Session) -> int:
    return sum(m["role"] == "assistant" for m in session.messages)


def _count_new_tokens(session: Session, new: list[dict[str, str]]) -> int:
    """Tokens the session would ingest for ``new`` plus the generation prompt."""
    ids = session.tokenizer.render_chat(session.messages + new,
                                        add_generation_prompt=True).ids
    return max(0, len(ids) - len(session.ids))


def _as_api_error(error: BaseException | None) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, TurnCancelled):
        return APIError(503, str(error), type="server_error", code="cancelled")
    if isinstance(error, ValueError):            # e.g. a chat template that refuses the roles
        return APIError(400, str(error), param="messages")
    log.error("turn failed: %r", error)
    return APIError(500, "the turn failed on the server", type="server_error")
