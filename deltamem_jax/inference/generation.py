"""Batched text generation: one jitted ``lax.while_loop`` over the KV cache and the δ-mem state.

Greedy, temperature, top-k and top-p sampling. With δ-mem and ``write=True``
every fed token is written into memory (token writes), as in the authors' chat
session; the end-of-sequence token is produced but never fed back.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deltamem_jax.models.cache import KVCache
from deltamem_jax.models.functional import Runner


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token. ``temperature == 0`` is greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0          # 0 = off
    top_p: float = 1.0      # 1 = off

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be ≥ 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Generation(NamedTuple):
    tokens: jax.Array          # [B, max_new_tokens] int32 (pad_id after a row stops)
    lengths: jax.Array         # [B] int32: tokens produced before (and excluding) EOS
    memory_state: jax.Array | None
    cache: KVCache


def sample_logits(logits, rng, sampling: SamplingConfig):
    """Next tokens ``[B]`` from last-position logits ``[B, V]``."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs          # mass strictly before each token
        sorted_logits = jnp.where(before < sampling.top_p, sorted_logits, -jnp.inf)
        logits = jnp.full_like(logits, -jnp.inf).at[
            jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def sample_rows(logits, keys, temperature, top_p):
    """Next tokens ``[B]`` from logits ``[B, V]`` with per-row settings (jit-friendly).

    ``keys``: ``[B]`` PRNG keys; ``temperature``: ``[B]`` (0 = greedy); ``top_p``:
    ``[B]`` in (0, 1] (1 = off). Row b draws exactly what :func:`sample_logits` draws
    for that row alone with key ``keys[b]`` (so a row's tokens do not depend on the
    rows batched with it).
    """
    logits = logits.astype(jnp.float32)
    B = logits.shape[0]
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]

    def nucleus(x):
        order = jnp.argsort(-x, axis=-1)
        sorted_logits = jnp.take_along_axis(x, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs          # mass strictly before each token
        keep = (before < top_p[:, None]) | (top_p[:, None] >= 1.0)
        sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
        return jnp.full_like(x, -jnp.inf).at[jnp.arange(B)[:, None], order].set(sorted_logits)

    scaled = jax.lax.cond(jnp.any(top_p < 1.0), nucleus, lambda x: x, scaled)
    sampled = jax.vmap(lambda k, x: jax.random.categorical(k, x[None], axis=-1)[0])(keys, scaled)
    return jnp.where(temperature > 0, sampled.astype(jnp.int32), greedy)


def generate(model, prompt_ids, *, prompt_mask=None, memory_state=None, cache=None,
             write: bool = True, use_memory: bool = True,
             sampling: SamplingConfig = SamplingConfig(), rng=None,
             eos_ids: Sequence[int] | None = None, pad_id: int = 0,
             cache_length: int | None = None) -> Generation:
    """Continue ``prompt_ids`` ``[B, T]`` (left or right padded via ``prompt_mask``).

    ``model`` is a :class:`DecoderLM` or a :class:`Runner`. ``cache``: continue an
    existing cache (a session); otherwise a fresh cache of ``cache_length``
    (default T + max_new_tokens) is made. Returns the new tokens, their lengths,
    the memory state and the cache after the last fed token.
    """
    run = model if isinstance(model, Runner) else Runner(model)
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    B, T = prompt_ids.shape
    if prompt_mask is None:
        prompt_mask = jnp.ones((B, T), bool)
    if cache is None:
        cache = run.init_cache(B, cache_length or T + sampling.max_new_tokens)
    if cache.max_length < int(cache.index) + T + sampling.max_new_tokens:
        raise ValueError(f"KV cache of length {cache.max_length} has no room for "
                         f"{T} prompt + {sampling.max_new_tokens} new tokens")
    eos = tuple(run.config.eos_ids if eos_ids is None else eos_ids)
    rng = jax.random.key(0) if rng is None else rng
    return _generate(run.graphdef, run.state, prompt_ids, jnp.asarray(prompt_mask, bool),
                     memory_state, cache, rng, sampling=sampling, eos=eos, pad_id=pad_id,
                     write=write, use_memory=use_memory)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "eos", "pad_id", "write",
                                             "use_memory"))
def _generate(graphdef, state, prompt_ids, prompt_mask, memory_state, cache, rng, *,
              sampling, eos, pad_id, write, use_memory):
    model = nnx.merge(graphdef, state)
    B = prompt_ids.shape[0]
    out = model(prompt_ids, attention_mask=prompt_mask, memory_state=memory_state, cache=cache,
                write=write, use_memory=use_memory)
    last = jnp.maximum(jnp.sum(prompt_mask, axis=1) - 1, 0)
    # last real token per row (right padding) or the last slot (left padding)
    last = jnp.where(prompt_mask[:, -1], prompt_mask.shape[1] - 1, last)
    logits = out.logits[jnp.arange(B), last]

    def pick(logits, step, rng):
        rng, key = jax.random.split(rng)
        return sample_logits(logits, key, sampling), rng

    tokens, lengths, mem, cache = decode_loop(
        model, logits, out.memory_state, out.cache, rng, pick, n=sampling.max_new_tokens,
        eos=eos, pad_id=pad_id, write=write, use_memory=use_memory)
    return Generation(tokens, lengths, mem, cache)


def decode_loop(model, logits, memory_state, cache, rng, pick, *, n: int, eos: Sequence[int],
                pad_id: int, write: bool, use_memory: bool):
    """Up to ``n`` tokens per row from the next-token ``logits`` ``[B, V]``, in one
    ``lax.while_loop`` (call it inside ``jit``): ``pick(logits, step, rng) -> (tokens [B],
    rng)`` chooses each token; every live token is fed back (read, and written when
    ``write``); a row stops at a token in ``eos``, the loop when every row has stopped.
    Returns ``(tokens [B, n] padded with pad_id, lengths [B] without EOS, memory_state,
    cache)``."""
    B = logits.shape[0]
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)

    def cond(carry):
        step, _, done, *_ = carry
        return (step < n) & ~jnp.all(done)

    def body(carry):
        step, tokens, done, lengths, logits, mem, cache, rng = carry
        token, rng = pick(logits, step, rng)
        is_eos = jnp.isin(token, eos_arr)
        live = ~done & ~is_eos
        tokens = tokens.at[:, step].set(jnp.where(done, pad_id, token))
        lengths = lengths + live
        done = done | is_eos
        fed = model(jnp.where(live, token, pad_id)[:, None], attention_mask=live[:, None],
                    memory_state=mem, cache=cache, write=write, use_memory=use_memory)
        return step + 1, tokens, done, lengths, fed.logits[:, -1], fed.memory_state, fed.cache, rng

    carry = (jnp.zeros((), jnp.int32), jnp.full((B, n), pad_id, jnp.int32),
             jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32), logits, memory_state, cache, rng)
    _, tokens, _, lengths, _, mem, cache, _ = jax.lax.while_loop(cond, body, carry)
    return tokens, lengths, mem, cache
