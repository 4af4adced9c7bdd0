"""Continuous batching: many sessions decode together over a fixed set of slots.

A :class:`SlotDecoder` holds, on the device, a fixed number of slots; each slot
is one session's δ-mem state ``[L_mem, 1, H, r, r]``, its KV cache (batch 1,
``capacity`` tokens), its next-token logits and its sampling key, all stacked
on a leading slot axis. :meth:`SlotDecoder.step` samples one token for every
slot and feeds it (written into memory) in **one** jitted call: the model runs
``vmap``-ed over slots, so each slot keeps its own cache index and RoPE
positions, and no slot sees another's tokens or state. A request joins by
:meth:`~SlotDecoder.insert` (its session's arrays after its prompt was fed,
see :meth:`deltamem_jax.inference.session.Session.begin_reply`) and leaves by
:meth:`~SlotDecoder.extract`; the other slots go on decoding.

Shapes never change, so the step compiles once; insert and extract take the
slot index as data and compile once each. A slot's token depends only on its
own arrays and key (:func:`~deltamem_jax.inference.generation.sample_rows`), so
a turn decodes the same tokens whatever shares the batch with it.

Slots that are not live (free, or finished) are fed nothing: their state and
cache index stay as they are (their step computes on a masked token and is
discarded).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltamem_jax.inference.generation import sample_rows
from deltamem_jax.inference.session import Pass, PassResult
from deltamem_jax.models.cache import KVCache
from deltamem_jax.models.functional import Runner

__all__ = ["SlotDecoder", "run_passes"]


@functools.partial(jax.jit, static_argnames=("graphdef", "eos", "pad_id"),
                   donate_argnames=("memory", "cache", "logits", "keys"))
def _step(graphdef, state, memory, cache, logits, keys, live, stops, writes, temperature,
          top_p, *, eos: tuple[int, ...], pad_id: int):
    model = nnx.merge(graphdef, state)
    split = jax.vmap(lambda k: jax.random.split(jax.random.wrap_key_data(k)))(keys)
    keys, sub = jax.random.key_data(split[:, 0]), split[:, 1]
    token = sample_rows(logits, sub, temperature, top_p)
    is_eos = jnp.isin(token, jnp.asarray(eos if eos else (-1,), jnp.int32)) & stops
    feed = live & ~is_eos

    def one(tok, fed, wr, mem, c):
        out = model(jnp.where(fed, tok, pad_id)[None, None], attention_mask=fed[None, None],
                    memory_state=mem, cache=c, write=True)
        new = out.cache._replace(index=jnp.where(fed, out.cache.index, c.index))
        # a read-only slot keeps its state: each token reads it and writes nothing, exactly
        # a write=False pass (a token's read precedes its write)
        mem = None if mem is None else jnp.where(wr, out.memory_state, mem)
        return out.logits[0, -1], mem, new

    new_logits, memory, cache = jax.vmap(one)(token, feed, writes, memory, cache)
    return token, is_eos, new_logits, memory, cache, keys


@functools.partial(jax.jit, static_argnames=("graphdef", "write"))
def _passes(graphdef, state, ids, mask, memory, cache, last, *, write: bool):
    """Rows of batch-1 passes stacked and run together (vmap: each row keeps its own
    cache index and positions), then split again."""
    model = nnx.merge(graphdef, state)
    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)

    def one(i, m, mem, c, k):
        out = model(i, attention_mask=m, memory_state=mem, cache=c, write=write)
        return (jax.lax.dynamic_index_in_dim(out.logits[0], k, 0, keepdims=False),
                out.memory_state, out.cache, out.beta_means)

    res = jax.vmap(one)(stack(ids), stack(mask), stack(memory), stack(cache), jnp.stack(last))
    return [jax.tree.map(lambda a, j=j: a[j], res) for j in range(len(ids))]


def run_passes(runner: Runner, passes: Sequence[Pass], *, rows: int | None = None
               ) -> list[PassResult]:
    """Run many sessions' :class:`~deltamem_jax.inference.session.Pass` es of one shape and
    write flag in one jitted call; ``rows`` pads the batch to that many rows (repeating the
    first pass, whose extra results are dropped) so that batch sizes, and with them the
    compiled programs, stay few. Row b's result equals ``Session.run_pass`` of pass b."""
    if not passes:
        return []
    p0 = passes[0]
    if any(p.ids.shape != p0.ids.shape or p.write != p0.write for p in passes):
        raise ValueError("run_passes: every pass must have the same length and write flag")
    padded = list(passes) + [p0] * max(0, (rows or len(passes)) - len(passes))
    out = _passes(runner.graphdef, runner.state, tuple(p.ids for p in padded),
                  tuple(p.mask for p in padded), tuple(p.memory_state for p in padded),
                  tuple(p.cache for p in padded),
                  tuple(jnp.asarray(p.last, jnp.int32) for p in padded), write=p0.write)
    return [PassResult(*r) for r in out[:len(passes)]]


@functools.partial(jax.jit, donate_argnames=("big",))
def _insert(big, small, slot):
    return jax.tree.map(lambda b, s: jax.lax.dynamic_update_index_in_dim(b, s, slot, 0),
                        big, small)


@jax.jit
def _extract(big, slot):
    return jax.tree.map(lambda b: jax.lax.dynamic_index_in_dim(b, slot, 0, keepdims=False), big)


class SlotDecoder:
    """A fixed set of decoding slots over one model (see the module docstring).

    Args:
      runner: the model, split once.
      slots: how many sessions decode at once.
      capacity: every session's KV-cache length (all sessions share it).
      eos_ids: tokens that end a reply (sampled, never fed).
      pad_id: the id fed (masked) to slots that are not live.
    """

    def __init__(self, runner: Runner, *, slots: int, capacity: int,
                 eos_ids: Sequence[int], pad_id: int = 0):
        if slots < 1:
            raise ValueError(f"slots must be ≥ 1, got {slots}")
        self.runner = runner
        self.slots = int(slots)
        self.capacity = int(capacity)
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.pad_id = int(pad_id)
        stack = lambda x: jnp.broadcast_to(x, (self.slots,) + x.shape)
        memory = (None if runner.memory_config is None else runner.init_memory_state(1))
        self._memory = None if memory is None else jnp.array(stack(memory))
        self._cache = jax.tree.map(lambda x: jnp.array(stack(x)),
                                   runner.init_cache(1, self.capacity))
        self._logits = jnp.zeros((self.slots, runner.config.vocab_size), jnp.float32)
        kd = jax.random.key_data(jax.random.key(0))
        self._keys = jnp.zeros((self.slots,) + kd.shape, kd.dtype)
        self.live = np.zeros(self.slots, bool)
        self._temperature = np.zeros(self.slots, np.float32)
        self._top_p = np.ones(self.slots, np.float32)
        self._stops = np.ones(self.slots, bool)
        self._writes = np.ones(self.slots, bool)

    # ------------------------------------------------------------------ slots
    def free_slots(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.live)]

    def insert(self, slot: int, memory_state, cache: KVCache, logits, *, rng,
               temperature: float = 0.0, top_p: float = 1.0, ignore_eos: bool = False,
               write: bool = True) -> None:
        """Put a session into free ``slot``: its state and cache after its prompt, the
        prompt's last logits ``[V]``, its sampling key and settings; the slot goes live.
        ``ignore_eos``: end tokens are fed like any other (fixed-length replies, for
        benchmarks). ``write=False``: the reply reads the memory and writes nothing."""
        if self.live[slot]:
            raise ValueError(f"slot {slot} is in use")
        if cache.batch_size != 1 or cache.max_length != self.capacity:
            raise ValueError(f"a slot holds a batch-1 cache of {self.capacity} tokens, got "
                             f"batch {cache.batch_size} × {cache.max_length}")
        if logits is None:
            raise ValueError("insert needs the next-token logits after the prompt")
        arrays = (self._memory, self._cache, self._logits, self._keys)
        small = (memory_state, cache, jnp.asarray(logits, jnp.float32),
                 jax.random.key_data(rng))
        if self._memory is None:
            arrays, small = arrays[1:], small[1:]
        out = _insert(arrays, small, jnp.asarray(slot, jnp.int32))
        if self._memory is None:
            self._cache, self._logits, self._keys = out
        else:
            self._memory, self._cache, self._logits, self._keys = out
        self._temperature[slot] = float(temperature)
        self._top_p[slot] = float(top_p)
        self._stops[slot] = not ignore_eos
        self._writes[slot] = bool(write)
        self.live[slot] = True

    def extract(self, slot: int) -> tuple[jax.Array | None, KVCache]:
        """The state and cache of ``slot`` (batch 1) after the tokens it was fed; the slot
        becomes free."""
        memory, cache = _extract((self._memory, self._cache), jnp.asarray(slot, jnp.int32))
        self.live[slot] = False
        return memory, cache

    def release(self, slot: int) -> None:
        """Free ``slot`` without reading it (its request was cancelled)."""
        self.live[slot] = False

    # ------------------------------------------------------------------ decoding
    def step(self) -> tuple[np.ndarray, np.ndarray]:
        """Sample a token for every slot and feed it to the live ones that did not stop.

        Returns host arrays ``tokens`` ``[slots]`` int32 and ``is_eos`` ``[slots]``
        bool (meaningful for live slots only). A live slot whose token is an end
        token is not fed; the caller decides which slots to extract or release.
        """
        r = self.runner
        token, is_eos, self._logits, self._memory, self._cache, self._keys = _step(
            r.graphdef, r.state, self._memory, self._cache, self._logits, self._keys,
            jnp.asarray(self.live), jnp.asarray(self._stops), jnp.asarray(self._writes),
            jnp.asarray(self._temperature), jnp.asarray(self._top_p),
            eos=self.eos_ids, pad_id=self.pad_id)
        return np.asarray(token), np.asarray(is_eos)
