"""A chat session over a frozen backbone + δ-mem adapter (batch size 1).

A :class:`Session` keeps the conversation (messages), the δ-mem state, a KV
cache and the token ids processed so far. Every turn is rendered with the chat
template, and only the new suffix goes through the model, written into memory
(token writes). Replies are generated with the carried cache and state, and the
generated tokens are written too (as in the authors' chat session; ``write=False``
gives a read-only probe).

**Window.** ``window=None`` keeps every token in the KV cache (the authors'
behaviour). With ``window=N`` the cache holds at most N recent tokens after
every public call (during a reply it may hold up to N + ``max_new_tokens``
more). When a feed would overflow, the cache is *rebuilt* from its most recent
tokens by a **read-only** pass (``write=False``): nothing is written twice, and
the memory keeps integrating every token regardless of the window — that is the
point of δ-mem. Consequences: RoPE positions restart at 0 for the rebuilt
window, and keys/values are recomputed with the current memory state (this
matters only with Δk/Δv heads), i.e. the rebuilt window is exactly the
"read-only pass over recent turns" regime of training (SPEC §3). A rebuild
keeps ``window - n`` tokens (n = the tokens about to be fed), so with a full
window every chunk fed rebuilds it; ``keep=K`` keeps at most K instead (the
cache then holds between K and N tokens, and a rebuild happens once per
N - K tokens: what a server wants).

**Fixed shapes.** The cache has a fixed capacity (``window`` + room for a
reply and one padded chunk; with ``window=None`` it doubles when full), and
fed suffixes are right-padded to a few bucket lengths (powers of two up to
``chunk``) with attention mask 0. Padded tokens are neither written to memory
nor attendable; they do occupy cache slots in the pass, so the session rewinds
``cache.index`` to the real token count afterwards and the next feed overwrites
them. Every cache slot below ``index`` holds a real token, so jit compiles once
per (bucket, write) pair and once per generation prompt length.

**Divergence.** After a reply, the conversation is re-rendered with the decoded
reply; if that does not extend the processed ids (decode → encode is not
prefix-stable, or the model produced special tokens), the session reverts to
its state from before the reply (memory, cache: both immutable arrays) and
feeds the re-rendered reply instead. If a render rewrites tokens older than
that, the whole conversation is re-ingested from a fresh state (``rebuilds``).

Only token writes are supported (span-mean write modes read the pre-pass state,
so incremental feeding would change what they compute).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Generator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deltamem_jax.data.collate import MIN_BUCKET, power_of_two_bucket
from deltamem_jax.inference.generation import SamplingConfig, generate
from deltamem_jax.inference.snapshot import (
    SNAPSHOT_FORMAT,
    SNAPSHOT_VERSION,
    SessionState,
    SnapshotError,
    read_snapshot,
    write_snapshot,
)
from deltamem_jax.models.cache import KVCache
from deltamem_jax.models.decoder import DecoderLM
from deltamem_jax.models.functional import Runner

__all__ = ["SNAPSHOT_FORMAT", "SNAPSHOT_VERSION", "Pass", "PassResult", "PendingReply",
           "Session", "SnapshotError"]

_ROUND = 64


@dataclasses.dataclass
class _Checkpoint:
    """Everything needed to undo feeds (all arrays are immutable, so this is cheap)."""

    n_ids: int
    memory_state: Any
    cache: KVCache
    cache_len: int
    cache_start: int
    logits: Any
    beta_means: Any
    tokens_written: int
    replay: tuple[tuple[int, ...], ...] = ()   # fed one by one after restoring (a merged turn)


@dataclasses.dataclass(frozen=True)
class PendingReply:
    """A reply whose generation prompt has been fed (:meth:`Session.begin_reply`): what an
    external decoder needs to produce it, and what :meth:`Session.end_reply` needs to undo
    its tokens if they do not re-encode."""

    memory_state: Any          # [L_mem, 1, H, r, r] after the prompt (None without δ-mem)
    cache: KVCache             # the session's cache after the prompt
    logits: Any                # [V] next-token logits after the prompt
    cache_len: int             # real tokens in ``cache``
    n_ids: int                 # tokens processed, the prompt included
    max_new_tokens: int        # the cache has room for this many more
    write: bool
    checkpoint: _Checkpoint


@dataclasses.dataclass(frozen=True)
class Pass:
    """One model pass a session needs: ``ids``/``mask`` ``[1, T]`` (T a bucket length) over
    its ``memory_state`` and ``cache``, writing or not; ``last`` = the last real position.
    The :meth:`Session.add_message_passes` family yields these so that an executor can run
    many sessions' passes in one batched call."""

    ids: np.ndarray
    mask: np.ndarray
    memory_state: Any
    cache: KVCache
    write: bool
    last: int


class PassResult(NamedTuple):
    """What a :class:`Pass` gives back: the ``[V]`` logits at ``last``, the new state and
    cache (index = old index + T), and the β means of a writing pass."""

    logits: Any
    memory_state: Any
    cache: KVCache
    beta_means: Any


def _round_up(n: int, m: int = _ROUND) -> int:
    return -(-n // m) * m


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    a, b = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(a != b)
    return int(diff[0]) if diff.size else n


class Session:
    """A single-conversation chat session with δ-mem (see the module docstring).

    Args:
      model: a :class:`DecoderLM` or a :class:`Runner` (split once; share a Runner
        between sessions to share compiled code).
      tokenizer: a :class:`deltamem_jax.data.tokenizer.Tokenizer`.
      window: max tokens kept in the KV cache (None = all).
      max_new_tokens: default reply length (sizes the cache).
      sampling: default :class:`SamplingConfig` (greedy, ``max_new_tokens``).
      chunk: the longest single model pass when feeding (a power of two).
      system: an optional system prompt, (re)added on construction and reset.
      seed: seed of the session's sampling key.
      capacity: initial KV-cache length (default: what the window and a reply
        need; with ``window=None`` it doubles when full). A fixed capacity shared
        by sessions means shared compiled code.
      keep: with a window, how many recent tokens a rebuild keeps at most (None =
        as many as fit: ``window`` minus what is being fed).
    """

    def __init__(self, model, tokenizer, *, window: int | None = None,
                 max_new_tokens: int = 256, sampling: SamplingConfig | None = None,
                 chunk: int = 256, system: str | None = None, seed: int = 0,
                 capacity: int | None = None, keep: int | None = None):
        if not isinstance(model, (Runner, DecoderLM)):
            raise TypeError(f"Session needs a DecoderLM or a Runner, got {type(model).__name__}")
        self.runner = model if isinstance(model, Runner) else Runner(model)
        self._device = _model_device(self.runner)
        mc = self.runner.memory_config
        if mc is not None and mc.span_writes:
            raise ValueError(
                f"Session supports token writes only; memory_write_granularity="
                f"{mc.memory_write_granularity!r} reads the pre-pass state, so feeding a "
                f"conversation incrementally would change what it computes")
        if chunk < 1 or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a power of two ≥ 1, got {chunk}")
        if window is not None and window < 1:
            raise ValueError(f"window must be ≥ 1 or None, got {window}")
        if keep is not None and (window is None or not 0 <= keep < window):
            raise ValueError(f"keep must be in [0, window) and needs a window, got keep={keep} "
                             f"window={window}")
        self.keep = keep
        self.tokenizer = tokenizer
        self.window = window
        self.chunk = chunk
        self.sampling = sampling or SamplingConfig(max_new_tokens=max_new_tokens)
        self.system = system
        self.seed = seed
        self._rng = jax.random.key(seed)
        need = self.required_capacity(window, self.sampling.max_new_tokens, chunk)
        if capacity is not None and window is not None and capacity < need:
            raise ValueError(f"capacity {capacity} is too small for window {window} plus a "
                             f"reply and a padded chunk ({need})")
        self._capacity = need if capacity is None else int(capacity)
        self.reset()

    @staticmethod
    def required_capacity(window: int | None, max_new_tokens: int, chunk: int) -> int:
        """The cache length a session needs for ``window`` tokens plus a reply of
        ``max_new_tokens`` and one padded chunk (with ``window=None``: a first size)."""
        reserve = max(max_new_tokens + MIN_BUCKET, chunk)
        return _round_up((window if window is not None else 4 * chunk) + reserve)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything: zero memory, empty cache, no messages (the system prompt stays)."""
        self.messages: list[dict[str, str]] = []
        self._clear()
        self.rebuilds = 0
        self.reverts = 0
        self.compactions = 0
        if self.system:
            self.add_message("system", self.system)

    def _clear(self) -> None:
        self._ids: list[int] = []
        self._memory = (None if self.runner.memory_config is None
                        else self._put(self.runner.init_memory_state(1)))
        self._cache = self._fresh_cache()
        self._cache_len = 0        # real tokens in the cache == cache.index
        self._cache_start = 0      # ids[_cache_start:] are the cached tokens
        self._logits = None        # [V] logits after the last fed token (None if unknown)
        self._beta_means = None    # [L_mem] β means of the last writing pass
        self.tokens_written = 0

    @property
    def memory_state(self) -> jax.Array | None:
        """``[L_mem, 1, H, r, r]`` float32 (None without δ-mem)."""
        return self._memory

    @property
    def cache(self) -> KVCache:
        return self._cache

    @property
    def ids(self) -> list[int]:
        """Every token processed so far (the rendered conversation, plus any generation)."""
        return list(self._ids)

    @property
    def cache_ids(self) -> list[int]:
        """The tokens currently in the KV cache (the most recent ones)."""
        return self._ids[self._cache_start:]

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def tokens_seen(self) -> int:
        """How many tokens the session has processed (``len(ids)``, without the copy)."""
        return len(self._ids)

    def next_token_logits(self) -> np.ndarray | None:
        """float32 ``[V]`` logits for the token after the last fed one (None if unknown)."""
        return None if self._logits is None else np.asarray(self._logits)

    def counts(self) -> dict[str, Any]:
        """The session's counters (host bookkeeping only: no device work, no waiting)."""
        return {"messages": len(self.messages), "tokens_seen": len(self._ids),
                "tokens_written": self.tokens_written, "cache_tokens": self._cache_len,
                "cache_capacity": self._capacity, "window": self.window,
                "compactions": self.compactions, "reverts": self.reverts,
                "rebuilds": self.rebuilds}

    def stats(self) -> dict[str, Any]:
        """Per δ-mem layer state Frobenius norm and β mean of the last writing pass, and
        :meth:`counts` (the norms are computed on the device and waited for)."""
        layers = list(self.runner.memory_layers) if self._memory is not None else []
        norms = ([float(x) for x in jnp.sqrt(jnp.sum(jnp.square(self._memory), axis=(1, 2, 3, 4)))]
                 if self._memory is not None else [])
        betas = None if self._beta_means is None else [float(b) for b in self._beta_means]
        return {"layers": layers, "state_norms": norms, "beta_means": betas, **self.counts()}

    # ------------------------------------------------------------------ turns
    def add_message(self, role: str, content: str, *, write: bool = True) -> None:
        """Append a message and feed its new tokens (written into memory unless ``write=False``)."""
        self._drive(self.add_message_passes(role, content, write=write))

    def add_user(self, content: str, *, write: bool = True) -> None:
        self.add_message("user", content, write=write)

    def reply(self, sampling: SamplingConfig | None = None, rng=None, *,
              write: bool = True) -> str:
        """Generate the assistant's reply, append it, and return its text.

        The generation prompt and the generated tokens are fed with ``write``
        (False = a read-only probe: the reply joins the conversation and the
        cache, but nothing of this turn is written into memory). Stop tokens
        (``tokenizer.stop_ids``) end the reply and are never fed; the template's
        closing tokens are fed afterwards.
        """
        sampling = sampling or self.sampling
        if rng is None:
            rng = self.next_rng()
        checkpoint, prompt = self._drive(self._prepare_reply(sampling.max_new_tokens))
        gen = generate(self.runner, np.asarray([prompt], np.int32),
                       memory_state=self._memory, cache=self._cache, write=write,
                       sampling=sampling, rng=rng, eos_ids=tuple(self.tokenizer.stop_ids),
                       pad_id=self.tokenizer.pad_id)
        n = int(gen.lengths[0])
        new = [int(t) for t in np.asarray(gen.tokens[0, :n])]
        self._accept(prompt + new, gen.memory_state, gen.cache, write=write)
        return self._drive(self._finish_reply(checkpoint, self.tokenizer.decode(new),
                                              write=write))

    def next_rng(self) -> jax.Array:
        """A fresh sampling key from the session's own (which advances; it is saved in
        snapshots, so a restored session draws the same keys)."""
        self._rng, rng = jax.random.split(self._rng)
        return rng

    def begin_reply(self, max_new_tokens: int, *, write: bool = True) -> PendingReply:
        """Feed the generation prompt and return what an external decoder needs.

        For decoders that batch many sessions (``deltamem_jax.inference.batching``):
        the session's memory state, cache and next-token logits after the prompt,
        with room in the cache for ``max_new_tokens``. Feed the decoded tokens with
        the same ``write`` into that state, then call :meth:`end_reply`. Nothing
        else may touch the session in between.
        """
        return self._drive(self.begin_reply_passes(max_new_tokens, write=write))

    def end_reply(self, pending: PendingReply, tokens: Sequence[int], memory_state,
                  cache: KVCache, *, text: str | None = None) -> str:
        """Take back a reply decoded from :meth:`begin_reply`'s ``pending``.

        ``tokens``: the generated ids that were fed (stop tokens excluded);
        ``memory_state``, ``cache``: the arrays after feeding them. ``text``: the
        reply's text if it is not ``decode(tokens)`` (e.g. cut at a stop string);
        the conversation is then re-rendered with it and, where the fed tokens
        disagree, the session reverts to before the reply and feeds the rendered
        one (so memory holds exactly what the conversation says).
        """
        return self._drive(self.end_reply_passes(pending, tokens, memory_state, cache,
                                                 text=text))

    # The same three steps as generators of the model passes they need: ``next``/``send``
    # them a :class:`PassResult` per :class:`Pass` (``run_pass`` computes one); their
    # return value is the method's. An executor may run many sessions' passes together.
    # A session whose generator was abandoned half-way must be discarded.

    def add_message_passes(self, role: str, content: str, *,
                           write: bool = True) -> Generator[Pass, PassResult, None]:
        self.messages.append({"role": role, "content": content})
        try:
            yield from self._sync(write=write)
        except Exception:
            self.messages.pop()
            raise

    def begin_turn_passes(self, messages: Sequence[dict[str, str]], max_new_tokens: int, *,
                          write: bool = True
                          ) -> Generator[Pass, PassResult, PendingReply]:
        """:meth:`add_message_passes` for each of ``messages``, then :meth:`begin_reply_passes`
        — the same state, in fewer, fuller passes: the messages' tokens and the generation
        prompt are fed as one stretch whenever that rebuilds the window at the same points,
        keeping the same tokens, as the step-by-step path would (token writes do not care
        where passes begin). Otherwise — and for templates that rewrite history or render
        the prompt inconsistently — it takes the step-by-step path. If the reply then does
        not re-encode, the session reverts to before these messages, feeds them again one by
        one, then the rendered reply: exactly what the step-by-step path ends with."""
        n = len(self.messages)
        self.messages.extend({"role": m["role"], "content": m["content"]} for m in messages)
        try:
            merged = self._merged_feed(n)
            if merged is None:
                del self.messages[n:]
                for m in messages:
                    yield from self.add_message_passes(m["role"], m["content"], write=write)
                return (yield from self.begin_reply_passes(max_new_tokens, write=write))
            target, stretches = merged
            checkpoint = dataclasses.replace(self._checkpoint(), replay=stretches)
            yield from self._feed(target[len(self._ids):], write=write)
        except Exception:
            del self.messages[n:]
            raise
        self._ensure_capacity(self._cache_len + max_new_tokens)
        return PendingReply(self._memory, self._cache, self._logits, self._cache_len,
                            len(self._ids), max_new_tokens, write, checkpoint)

    def _merged_feed(self, first: int) -> tuple[list[int], tuple[tuple[int, ...], ...]] | None:
        """The rendered conversation with its generation prompt, and the messages' own
        stretches of it, if feeding messages ``first:`` and the prompt in one stretch is
        equivalent to feeding them one by one (see :meth:`begin_turn_passes`), else None."""
        render = lambda k, prompt=False: self.tokenizer.render_chat(
            self.messages[:k], add_generation_prompt=prompt).ids.tolist()
        target = render(len(self.messages), True)
        ends = [len(self._ids)]
        for k in range(first + 1, len(self.messages) + 1):
            ids = render(k)
            if _common_prefix(ids, target) < len(ids) or len(ids) <= ends[-1]:
                return None
            ends.append(len(ids))
        if _common_prefix(self._ids, target) < len(self._ids) or len(target) <= ends[-1]:
            return None
        ends.append(len(target))
        steps = [b - a for a, b in zip(ends, ends[1:])]
        limit = self.chunk if self.window is None else min(self.chunk, self.window)
        if steps[-1] > limit or self._rebuilds_at(steps) != self._rebuilds_at([sum(steps)]):
            return None
        return target, tuple(tuple(target[a:b]) for a, b in zip(ends[:-2], ends[1:-1]))

    def _rebuilds_at(self, feeds: Sequence[int]) -> list[tuple[int, int]]:
        """Where :meth:`_feed` would rebuild the window — (tokens fed before, tokens kept) —
        feeding stretches of these lengths one after another."""
        if self.window is None:
            return []
        limit = min(self.chunk, self.window)
        cached, fed, plan = self._cache_len, 0, []
        for length in feeds:
            for start in range(0, length, limit):
                n = min(limit, length - start)
                if cached + n > self.window:
                    cached = self.window - n if self.keep is None else min(self.keep,
                                                                           self.window - n)
                    plan.append((fed, cached))
                cached += n
                fed += n
        return plan

    def begin_turn(self, messages: Sequence[dict[str, str]], max_new_tokens: int, *,
                   write: bool = True) -> PendingReply:
        """:meth:`begin_turn_passes` run to its end (see :meth:`begin_reply`)."""
        return self._drive(self.begin_turn_passes(messages, max_new_tokens, write=write))

    def begin_reply_passes(self, max_new_tokens: int, *,
                           write: bool = True) -> Generator[Pass, PassResult, PendingReply]:
        checkpoint, prompt = yield from self._prepare_reply(max_new_tokens)
        yield from self._feed(prompt, write=write)
        return PendingReply(self._memory, self._cache, self._logits, self._cache_len,
                            len(self._ids), max_new_tokens, write, checkpoint)

    def end_reply_passes(self, pending: PendingReply, tokens: Sequence[int], memory_state,
                         cache: KVCache, *,
                         text: str | None = None) -> Generator[Pass, PassResult, str]:
        tokens = [int(t) for t in tokens]
        if len(tokens) > pending.max_new_tokens:
            raise ValueError(f"{len(tokens)} tokens decoded, at most {pending.max_new_tokens} "
                             f"were prepared for")
        if len(self._ids) != pending.n_ids or self._cache is not pending.cache:
            raise ValueError("the session changed between begin_reply and end_reply")
        self._accept(tokens, memory_state, cache, write=pending.write)
        if text is None:
            text = self.tokenizer.decode(tokens)
        return (yield from self._finish_reply(pending.checkpoint, text, write=pending.write))

    def run_pass(self, p: Pass) -> PassResult:
        """Compute one :class:`Pass` (the session's own executor: batch 1, jit-compiled)."""
        out = self.runner(p.ids, attention_mask=p.mask, memory_state=p.memory_state,
                          cache=p.cache, write=p.write)
        return PassResult(_row(out.logits, jnp.asarray(p.last, jnp.int32)), out.memory_state,
                          out.cache, out.beta_means)

    def _drive(self, gen: Generator):
        """Run a pass generator to its end with :meth:`run_pass`; returns its value."""
        try:
            p = next(gen)
            while True:
                p = gen.send(self.run_pass(p))
        except StopIteration as stop:
            return stop.value

    def _prepare_reply(self, max_new_tokens: int):
        """The generation prompt still to feed, with room made for it and a reply."""
        target = self.tokenizer.render_chat(self.messages, add_generation_prompt=True).ids.tolist()
        if _common_prefix(self._ids, target) < len(self._ids):   # the template rewrote history
            yield from self._rebuild(self.tokenizer.render_chat(self.messages).ids.tolist())
            if _common_prefix(self._ids, target) < len(self._ids):
                raise ValueError("the chat template renders the conversation differently with "
                                 "and without the generation prompt; cannot reply incrementally")
        prompt = target[len(self._ids):]
        if not prompt:
            raise ValueError("the chat template adds no generation prompt; cannot reply")
        checkpoint = self._checkpoint()
        yield from self._make_room(len(prompt))
        self._ensure_capacity(self._cache_len + len(prompt) + max_new_tokens)
        return checkpoint, prompt

    def _accept(self, fed: list[int], memory_state, cache: KVCache, *, write: bool) -> None:
        """Record tokens fed outside :meth:`_run` (a generation) and the arrays after them."""
        if self._memory is not None:
            self._memory = memory_state
        self._cache_len += len(fed)
        self._cache = cache._replace(index=self._put(jnp.asarray(self._cache_len, jnp.int32)))
        self._ids.extend(fed)
        self._logits = None
        if write:
            self.tokens_written += len(fed)

    def _finish_reply(self, checkpoint: _Checkpoint, text: str, *, write: bool):
        self.messages.append({"role": "assistant", "content": text})
        yield from self._sync(write=write, checkpoint=checkpoint)
        return text

    # ------------------------------------------------------------------ feeding
    def _sync(self, *, write: bool, checkpoint: _Checkpoint | None = None):
        """Bring the processed ids in line with the rendered conversation."""
        target = self.tokenizer.render_chat(self.messages, add_generation_prompt=False).ids.tolist()
        p = _common_prefix(self._ids, target)
        if p == len(self._ids):
            yield from self._feed(target[p:], write=write)
        elif checkpoint is not None and p >= checkpoint.n_ids + sum(map(len, checkpoint.replay)):
            self._restore_checkpoint(checkpoint)
            self.reverts += 1
            counted = self.compactions
            for stretch in checkpoint.replay:     # a merged turn's messages, as fed one by one
                yield from self._feed(list(stretch), write=write)
            self.compactions = counted            # those rebuilds were counted when merged
            yield from self._feed(target[len(self._ids):], write=write)
        else:
            yield from self._rebuild(target)

    def _rebuild(self, target: list[int]):
        """Re-ingest ``target`` from a fresh state (the template changed earlier tokens)."""
        self._clear()
        self.rebuilds += 1
        yield from self._feed(target, write=True)

    def _checkpoint(self) -> _Checkpoint:
        return _Checkpoint(len(self._ids), self._memory, self._cache, self._cache_len,
                           self._cache_start, self._logits, self._beta_means, self.tokens_written)

    def _restore_checkpoint(self, c: _Checkpoint) -> None:
        del self._ids[c.n_ids:]
        self._memory, self._cache, self._cache_len = c.memory_state, c.cache, c.cache_len
        self._cache_start, self._logits, self._beta_means = c.cache_start, c.logits, c.beta_means
        self.tokens_written = c.tokens_written

    def _feed(self, ids: Sequence[int], *, write: bool):
        """Feed ``ids`` in pieces of ≤ chunk (and ≤ window), compacting the cache as needed."""
        pos = 0
        limit = self.chunk if self.window is None else min(self.chunk, self.window)
        while pos < len(ids):
            n = min(limit, len(ids) - pos)
            yield from self._make_room(n)
            yield from self._run(ids[pos:pos + n], write=write)
            pos += n

    def _make_room(self, n: int):
        """With a window: drop the oldest cached tokens so that ``n`` more fit in it."""
        if self.window is None or self._cache_len + n <= self.window:
            return
        if n > self.window:
            raise ValueError(f"{n} tokens do not fit in a window of {self.window}")
        keep = self.window - n if self.keep is None else min(self.keep, self.window - n)
        kept = self._ids[len(self._ids) - keep:] if keep else []
        self._cache = self._fresh_cache()
        self._cache_len = 0
        self._cache_start = len(self._ids) - len(kept)
        self.compactions += 1
        for pos in range(0, len(kept), self.chunk):      # read-only: nothing written twice
            yield from self._run(kept[pos:pos + self.chunk], write=False, record=False)

    def _ensure_capacity(self, need: int) -> None:
        """Grow the cache (padding with empty slots; exact) when ``need`` slots do not fit."""
        if need <= self._capacity:
            return
        new = _round_up(max(need, 2 * self._capacity))
        extra = new - self._capacity

        def pad(x, axis):
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, extra)
            return jnp.pad(x, widths)

        c = self._cache
        # keys/values: per layer [B, S, kv, hd] or stacked [L, B, S, kv, hd]: S is axis -3
        self._cache = self._put(c._replace(keys=jax.tree.map(lambda x: pad(x, -3), c.keys),
                                           values=jax.tree.map(lambda x: pad(x, -3), c.values),
                                           mask=pad(c.mask, 1)))
        self._capacity = new

    def _put(self, tree):
        """Commit fresh arrays to the model's device, like every jit output, so that jit
        sees one kind of input (committed) and compiles each shape once, not twice."""
        return tree if self._device is None else jax.device_put(tree, self._device)

    def _fresh_cache(self) -> KVCache:
        return self._put(self.runner.init_cache(1, self._capacity))

    def _bucket(self, n: int) -> int:
        return power_of_two_bucket(n, cap=max(self.chunk, n))

    def _run(self, ids: Sequence[int], *, write: bool, record: bool = True):
        """One model pass over ``ids`` (≤ chunk), right-padded to a bucket length."""
        n = len(ids)
        if n == 0:
            return
        b = self._bucket(n)
        self._ensure_capacity(self._cache_len + b)
        padded = np.full((1, b), self.tokenizer.pad_id, np.int32)
        padded[0, :n] = ids
        mask = np.zeros((1, b), bool)
        mask[0, :n] = True
        out = yield Pass(padded, mask, self._memory, self._cache, write, n - 1)
        self._cache_len += n
        self._cache = out.cache._replace(index=self._put(jnp.asarray(self._cache_len, jnp.int32)))
        if self._memory is not None:
            self._memory = out.memory_state
        if record:
            self._ids.extend(int(i) for i in ids)
            self._logits = out.logits
            if write:
                self.tokens_written += n
                self._beta_means = out.beta_means

    # ------------------------------------------------------------------ snapshots
    def to_state(self) -> SessionState:
        """The session's complete state (cheap: arrays are shared, lists copied)."""
        return SessionState(
            messages=[dict(m) for m in self.messages], ids=list(self._ids), memory=self._memory,
            cache=self._cache, cache_len=self._cache_len, cache_start=self._cache_start,
            logits=self._logits, beta_means=self._beta_means, rng=self._rng,
            settings={"window": self.window, "keep": self.keep, "chunk": self.chunk,
                      "system": self.system,
                      "seed": self.seed, "capacity": self._capacity,
                      "sampling": dataclasses.asdict(self.sampling)},
            counters={"tokens_written": self.tokens_written, "rebuilds": self.rebuilds,
                      "reverts": self.reverts, "compactions": self.compactions})

    @classmethod
    def from_state(cls, state: SessionState, model, tokenizer) -> Session:
        """A session continuing exactly from ``state`` (see :meth:`to_state`)."""
        s = state.settings
        try:
            sampling = SamplingConfig(**s["sampling"])
            self = cls(model, tokenizer, window=s["window"], chunk=s["chunk"], system=None,
                       sampling=sampling, seed=s["seed"], capacity=s["capacity"],
                       keep=s.get("keep"))
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotError(f"session settings {s!r} are not usable: {e}") from e
        if self._capacity != state.cache.max_length:
            raise SnapshotError(f"session capacity {self._capacity} does not match its cache "
                                f"({state.cache.max_length})")
        self.system = s["system"]
        self.messages = [dict(m) for m in state.messages]
        self._ids = list(state.ids)
        self._memory = None if state.memory is None else self._put(state.memory)
        self._cache = self._put(state.cache)
        self._cache_len, self._cache_start = state.cache_len, state.cache_start
        self._logits = None if state.logits is None else self._put(state.logits)
        self._beta_means = None if state.beta_means is None else self._put(state.beta_means)
        self._rng = state.rng
        c = state.counters
        self.tokens_written, self.rebuilds = c["tokens_written"], c["rebuilds"]
        self.compactions, self.reverts = c["compactions"], c["reverts"]
        return self

    def snapshot(self, path: str | os.PathLike) -> None:
        """Save memory state, cached window, ids, messages and settings to directory ``path``
        (atomically; :mod:`deltamem_jax.inference.snapshot` describes the format)."""
        write_snapshot(path, self.to_state(), self.runner)

    @classmethod
    def restore(cls, path: str | os.PathLike, model, tokenizer, *,
                check_model: bool = True) -> Session:
        """A session exactly as :meth:`snapshot` saved it (bit-identical next-token logits).

        ``check_model``: refuse a snapshot taken with a different architecture,
        δ-mem config or δ-mem weights (its state would be meaningless).
        """
        runner = model if isinstance(model, Runner) else Runner(model)
        return cls.from_state(read_snapshot(path, runner, check_model=check_model), runner,
                              tokenizer)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike,
                        adapter_dir: str | os.PathLike | None = None, *,
                        tokenizer=None, dtype: str | None = None,
                        scan_layers: bool | None = None, **kwargs) -> Session:
        """Load a local HF backbone (+ an authors'-format adapter) and its tokenizer."""
        from deltamem_jax.checkpoints.pretrained import load_pretrained
        from deltamem_jax.data.tokenizer import load_tokenizer

        model = load_pretrained(model_dir, adapter_dir, dtype=dtype, scan_layers=scan_layers)
        tok = load_tokenizer(tokenizer if tokenizer is not None else model_dir)
        return cls(model, tok, **kwargs)


# ---------------------------------------------------------------------- helpers


@jax.jit
def _row(logits, i):
    """``logits[0, i]`` with ``i`` traced: one program per bucket, not one per length."""
    return jax.lax.dynamic_index_in_dim(logits[0], i, 0, keepdims=False)


def _model_device(runner: Runner):
    """The device holding the model if every weight sits on that one device (else None:
    placement is left to jit)."""
    devices = set()
    for leaf in jax.tree.leaves(runner.state):
        sharding = getattr(leaf, "sharding", None)
        if not isinstance(sharding, jax.sharding.SingleDeviceSharding):
            return None
        devices |= sharding.device_set
        if len(devices) > 1:
            return None
    return next(iter(devices)) if devices else None
