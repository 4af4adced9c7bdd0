"""Serving many chat turns at once: a decode thread over a :class:`SlotDecoder`.

Callers :meth:`Scheduler.submit` a :class:`Turn` — a session, the messages to
append, sampling settings, stop strings and an event callback. The decode
thread admits turns into free slots and then loops: one **round of prefill
passes** — every admitted turn's next model pass (its new messages, compaction
passes, its generation prompt; see :meth:`Session.begin_turn_passes`), passes
of the same length and write flag run together by :func:`run_passes` in groups
of ``prefill_rows`` rows — then one batched :meth:`SlotDecoder.step` for every
decoding slot. A turn whose prompt is in joins the decode batch; it ends on an
end token, a stop string or ``max_tokens``, its slot is read back and freed,
and its closing passes (:meth:`Session.end_reply_passes`) join the next rounds.
So long prompts never stall decoding for more than one pass, and compiled
shapes stay few (pass lengths are the sessions' buckets; rows are fixed).

Rows are always padded to ``prefill_rows`` and the decode step always covers
every slot: a turn computes bit for bit the same whatever shares the batch.

Events (:class:`TurnEvent`) are delivered on the decode thread; ``start`` once
the prompt is ingested, ``delta`` for streamed text (never a partial UTF-8
character, never text that may turn out to begin a stop string), then exactly
one ``done`` or ``error``. A cancelled turn (``turn.cancelled.set()``) ends with
an ``error`` whose error is :class:`TurnCancelled`; its session is left
mid-turn and must be discarded (the caller reloads it from its last commit).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

import jax

from deltamem_jax.inference.batching import SlotDecoder, run_passes
from deltamem_jax.inference.session import Pass, PendingReply, Session
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
    write: bool = True               # False: messages and reply read memory, write nothing
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass(eq=False)
class _Work:
    """A turn running pass generators: its prompt (``slot`` reserved) or its closing."""

    turn: Turn
    gen: Generator
    request: Pass | None = None
    slot: int | None = None          # reserved decode slot (prompt work)
    finish: tuple | None = None      # closing: (finish reason, its _Active, prompt tokens)
    before: int = 0


@dataclasses.dataclass(eq=False)
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
    ``max_tokens``; stateless and stateful turns mix freely. ``prefill_rows``: rows of
    one batched prefill call (1 = each session's passes alone).
    """

    def __init__(self, runner: Runner, tokenizer, *, slots: int, capacity: int,
                 prefill_rows: int = 1):
        if prefill_rows < 1:
            raise ValueError(f"prefill_rows must be ≥ 1, got {prefill_rows}")
        self.runner = runner
        self.tokenizer = tokenizer
        self.capacity = int(capacity)
        self.prefill_rows = int(prefill_rows)
        self.decoder = SlotDecoder(runner, slots=slots, capacity=capacity,
                                   eos_ids=tuple(tokenizer.stop_ids), pad_id=tokenizer.pad_id)
        self._queue: queue.SimpleQueue[Turn | None] = queue.SimpleQueue()
        self._active: dict[int, _Active] = {}
        self._work: list[_Work] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="deltamem-decode", daemon=True)
        self.stats = {"steps": 0, "tokens": 0, "turns": 0, "passes": 0, "pass_calls": 0,
                      "busy_s": 0.0, "pass_s": 0.0, "step_s": 0.0, "max_live": 0}

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
        """Turns being served (prompt, decoding or closing)."""
        return len(self._active) + len(self._work)

    # ------------------------------------------------------------------ thread
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit(block=not (self._active or self._work))
                t0 = time.perf_counter()
                if self._work:
                    self._passes()
                t1 = time.perf_counter()
                if self._active:
                    self._decode()
                t2 = time.perf_counter()
                self.stats["pass_s"] += t1 - t0
                self.stats["step_s"] += t2 - t1
                self.stats["busy_s"] += t2 - t0
            except Exception as e:                      # never let the thread die
                log.exception("scheduler step failed")
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

    def _free_slots(self) -> list[int]:
        reserved = {w.slot for w in self._work if w.slot is not None}
        return [i for i in self.decoder.free_slots() if i not in reserved]

    def _admit(self, *, block: bool) -> None:
        while True:
            free = self._free_slots()
            if not free:
                return
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
            work = _Work(turn, self._prompt_passes(turn), slot=free[0],
                         before=turn.session.tokens_seen)
            self._advance(work, None)

    @staticmethod
    def _prompt_passes(turn: Turn):
        return (yield from turn.session.begin_turn_passes(turn.messages, turn.max_tokens,
                                                          write=turn.write))

    def _advance(self, work: _Work, result) -> None:
        """Send ``result`` (None: start) into a turn's generator; keep it while it asks for
        passes, and act on its end."""
        try:
            work.request = next(work.gen) if result is None else work.gen.send(result)
        except StopIteration as stop:
            self._work = [w for w in self._work if w is not work]
            try:
                if work.finish is None:
                    self._start_decoding(work, stop.value)
                else:
                    self._done(work, stop.value)
            except Exception as e:  # noqa: BLE001 — handed to the turn's caller
                _emit(work.turn, TurnEvent("error", error=e))
            return
        except Exception as e:  # noqa: BLE001 — handed to the turn's caller
            self._work = [w for w in self._work if w is not work]
            _emit(work.turn, TurnEvent("error", error=e))
            return
        if work not in self._work:
            self._work.append(work)

    def _passes(self) -> None:
        """One round: every waiting turn's next pass, grouped by (length, write)."""
        for w in [w for w in self._work if w.turn.cancelled.is_set()]:
            self._work.remove(w)
            w.gen.close()
            _emit(w.turn, TurnEvent("error", error=TurnCancelled("cancelled")))
        groups: dict[tuple, list[_Work]] = {}
        for w in self._work:
            groups.setdefault((w.request.ids.shape, w.request.write), []).append(w)
        for members in groups.values():
            for i in range(0, len(members), self.prefill_rows):
                part = members[i:i + self.prefill_rows]
                results = run_passes(self.runner, [w.request for w in part],
                                     rows=self.prefill_rows)
                self.stats["passes"] += len(part)
                self.stats["pass_calls"] += 1
                for w, r in zip(part, results):
                    self._advance(w, r)

    def _start_decoding(self, work: _Work, pending: PendingReply) -> None:
        turn, s = work.turn, work.turn.session
        rng = turn.rng if turn.rng is not None else s.next_rng()
        self.decoder.insert(work.slot, pending.memory_state, pending.cache, pending.logits,
                            rng=rng, temperature=turn.temperature, top_p=turn.top_p,
                            ignore_eos=turn.ignore_eos, write=turn.write)
        act = _Active(turn, pending, s.tokens_seen - work.before)
        self._active[work.slot] = act
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
        """Free the slot; the session's closing passes run in the next rounds."""
        act = self._active.pop(slot)
        memory, cache = self.decoder.extract(slot)
        gen = act.turn.session.end_reply_passes(act.pending, act.tokens, memory, cache,
                                                text=text)
        work = _Work(act.turn, gen, finish=(reason, act, act.prompt_tokens))
        self._advance(work, None)

    def _done(self, work: _Work, final: str) -> None:
        reason, act, prompt_tokens = work.finish
        self.stats["turns"] += 1
        rest = final[act.sent:] if len(final) >= act.sent else ""
        if rest:
            _emit(work.turn, TurnEvent("delta", text=rest))
        _emit(work.turn, TurnEvent("done", text=final, finish_reason=reason,
                                   prompt_tokens=prompt_tokens,
                                   completion_tokens=len(act.tokens)))

    def _fail_all(self, error: BaseException) -> None:
        for slot, act in list(self._active.items()):
            self.decoder.release(slot)
            del self._active[slot]
            _emit(act.turn, TurnEvent("error", error=error))
        for w in self._work:
            w.gen.close()
            _emit(w.turn, TurnEvent("error", error=error))
        self._work = []


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
