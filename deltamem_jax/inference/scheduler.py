"""Serving many chat turns at once: a decode thread over a :class:`SlotDecoder`.

Callers :meth:`Scheduler.submit` a :class:`Turn` — a session, the messages to
append, sampling settings, stop strings and an event callback. The decode
thread admits turns into free slots (feeding each turn's new messages and its
generation prompt through the session: prefill in the session's few bucketed
shapes), then repeats one batched :meth:`SlotDecoder.step` for every live
slot, streams text deltas, and ends a turn on an end token, a stop string or
``max_tokens``: its slot is read back into the session
(:meth:`Session.end_reply`) and the turn's ``done`` event carries the reply.
Turns join and leave between steps; the others keep decoding.

Events (:class:`TurnEvent`) are delivered on the decode thread; ``start`` once
the prompt is ingested, ``delta`` for streamed text (never a partial UTF-8
character, never text that may turn out to begin a stop string), then exactly
one ``done`` or ``error``. A cancelled turn (``turn.cancelled.set()``) ends with
an ``error`` whose error is :class:`TurnCancelled`; its session is left
mid-reply and must be discarded (the caller reloads it from its last commit).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

from deltamem_jax.inference.batching import SlotDecoder
from deltamem_jax.inference.session import PendingReply, Session
from deltamem_jax.models.functional import Runner

__all__ = ["Scheduler", "Turn", "TurnCancelled", "TurnEvent", "key_from_seed"]

log = logging.getLogger(__name__)


class TurnCancelled(RuntimeError):
    """The turn was cancelled before it finished (e.g. its client went away)."""


@dataclasses.dataclass(frozen=True)
class TurnEvent:
    kind: str                        # "start" | "delta" | "done" | "error"
    text: str = ""                   # delta: new text; done: the whole reply
    finish_reason: str | None = None  # done: "stop" (end token or stop string) | "length"
    prompt_tokens: int = 0           # tokens this turn ingested before replying
    completion_tokens: int = 0
    error: BaseException | None = None


@dataclasses.dataclass
class Turn:
    """One chat turn: append ``messages`` to ``session`` and reply."""

    session: Session
    messages: list[dict[str, str]]
    max_tokens: int
    on_event: Callable[[TurnEvent], None]
    temperature: float = 0.0
    top_p: float = 1.0
    rng: Any = None                  # a PRNG key; None = split from the session's own key
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False         # feed end tokens too: replies of exactly max_tokens
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass
class _Active:
    turn: Turn
    pending: PendingReply
    prompt_tokens: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    sent: int = 0                    # characters of the reply already streamed


def _hold_back(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` may be streamed: not a trailing partial character (U+FFFD
    from an unfinished UTF-8 sequence) nor a tail that could begin a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text.endswith(s[:k], 0, end):
                hold = max(hold, k)
                break
    return end - hold


class Scheduler:
    """Continuous batching of chat turns over ``slots`` slots (see the module docstring).

    Sessions must share ``capacity`` (their cache length) and have room in it for
    ``max_tokens``; stateless and stateful turns mix freely.
    """

    def __init__(self, runner: Runner, tokenizer, *, slots: int, capacity: int):
        self.runner = runner
        self.tokenizer = tokenizer
        self.capacity = int(capacity)
        self.decoder = SlotDecoder(runner, slots=slots, capacity=capacity,
                                   eos_ids=tuple(tokenizer.stop_ids), pad_id=tokenizer.pad_id)
        self._queue: queue.SimpleQueue[Turn | None] = queue.SimpleQueue()
        self._active: dict[int, _Active] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="deltamem-decode", daemon=True)
        self.stats = {"steps": 0, "tokens": 0, "turns": 0, "busy_s": 0.0, "max_live": 0}

    # ------------------------------------------------------------------ control
    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the decode thread; unfinished turns end with :class:`TurnCancelled`."""
        self._stop.set()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, turn: Turn) -> None:
        if turn.max_tokens < 1:
            raise ValueError(f"max_tokens must be ≥ 1, got {turn.max_tokens}")
        if turn.session.capacity != self.capacity:
            raise ValueError(f"the session's cache holds {turn.session.capacity} tokens, the "
                             f"slots {self.capacity}")
        if self._stop.is_set():
            raise RuntimeError("the scheduler is closed")
        self._queue.put(turn)

    @property
    def live(self) -> int:
        return len(self._active)

    # ------------------------------------------------------------------ thread
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit(block=not self._active)
                if self._active:
                    t0 = time.perf_counter()
                    self._decode()
                    self.stats["busy_s"] += time.perf_counter() - t0
            except Exception as e:                      # never let the thread die
                log.exception("decode step failed")
                self._fail_all(e)
                self.decoder = SlotDecoder(self.runner, slots=self.decoder.slots,
                                           capacity=self.capacity,
                                           eos_ids=self.decoder.eos_ids,
                                           pad_id=self.decoder.pad_id)
        self._fail_all(TurnCancelled("the server is shutting down"))
        while True:
            try:
                turn = self._queue.get_nowait()
            except queue.Empty:
                break
            if turn is not None:
                _emit(turn, TurnEvent("error", error=TurnCancelled("the server is shutting down")))

    def _admit(self, *, block: bool) -> None:
        while len(self._active) < self.decoder.slots:
            try:
                turn = self._queue.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if turn is None:
                return
            if turn.cancelled.is_set():
                _emit(turn, TurnEvent("error", error=TurnCancelled("cancelled before it began")))
                continue
            slot = self.decoder.free_slots()[0]
            t0 = time.perf_counter()
            try:
                self._begin(turn, slot)
            except Exception as e:  # noqa: BLE001 — handed to the turn's caller
                _emit(turn, TurnEvent("error", error=e))
            self.stats["busy_s"] += time.perf_counter() - t0

    def _begin(self, turn: Turn, slot: int) -> None:
        s = turn.session
        before = len(s.ids)
        for m in turn.messages:
            s.add_message(m["role"], m["content"])
        pending = s.begin_reply(turn.max_tokens)
        rng = turn.rng if turn.rng is not None else s.next_rng()
        self.decoder.insert(slot, pending.memory_state, pending.cache, pending.logits, rng=rng,
                            temperature=turn.temperature, top_p=turn.top_p,
                            ignore_eos=turn.ignore_eos)
        act = _Active(turn, pending, len(s.ids) - before)
        self._active[slot] = act
        self.stats["max_live"] = max(self.stats["max_live"], len(self._active))
        _emit(turn, TurnEvent("start", prompt_tokens=act.prompt_tokens))

    def _decode(self) -> None:
        tokens, is_eos = self.decoder.step()
        self.stats["steps"] += 1
        for slot, act in list(self._active.items()):
            turn = act.turn
            if turn.cancelled.is_set():
                self.decoder.release(slot)
                del self._active[slot]
                _emit(turn, TurnEvent("error", error=TurnCancelled("cancelled")))
                continue
            if is_eos[slot]:
                self._finish(slot, "stop", None)
                continue
            act.tokens.append(int(tokens[slot]))
            self.stats["tokens"] += 1
            text = self.tokenizer.decode(act.tokens)
            cut = _first_stop(text, turn.stop, max(0, act.sent - max(map(len, turn.stop),
                                                                     default=0)))
            if cut is not None:
                self._finish(slot, "stop", text[:cut])
            elif len(act.tokens) >= turn.max_tokens:
                self._finish(slot, "length", None)
            else:
                safe = _hold_back(text, turn.stop)
                if safe > act.sent:
                    _emit(turn, TurnEvent("delta", text=text[act.sent:safe]))
                    act.sent = safe

    def _finish(self, slot: int, reason: str, text: str | None) -> None:
        act = self._active.pop(slot)
        memory, cache = self.decoder.extract(slot)
        try:
            final = act.turn.session.end_reply(act.pending, act.tokens, memory, cache, text=text)
        except Exception as e:  # noqa: BLE001 — handed to the turn's caller
            _emit(act.turn, TurnEvent("error", error=e))
            return
        self.stats["turns"] += 1
        rest = final[act.sent:] if len(final) >= act.sent else ""
        if rest:
            _emit(act.turn, TurnEvent("delta", text=rest))
        _emit(act.turn, TurnEvent("done", text=final, finish_reason=reason,
                                  prompt_tokens=act.prompt_tokens,
                                  completion_tokens=len(act.tokens)))

    def _fail_all(self, error: BaseException) -> None:
        for slot, act in list(self._active.items()):
            self.decoder.release(slot)
            del self._active[slot]
            _emit(act.turn, TurnEvent("error", error=error))


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Index of the earliest stop string in ``text`` at or after ``start`` (None: none)."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _emit(turn: Turn, event: TurnEvent) -> None:
    try:
        turn.on_event(event)
    except Exception:                                   # a broken callback ends only its turn
        log.exception("turn event callback failed")
        turn.cancelled.set()


def key_from_seed(seed: int) -> jax.Array:
    """The sampling key of an OpenAI ``seed`` (any 64-bit integer)."""
    low, high = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    return jax.random.fold_in(jax.random.key(low), high)
