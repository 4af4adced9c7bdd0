"""Prefill and decode for evaluation: passes, shared prefixes, span-write prompts, and
sampling with one random key per row (so a row's tokens never depend on its batch).

* :func:`prefill` feeds ``[B, T]`` tokens (optionally in passes of ``pass_length`` with the
  KV cache and memory state carried), returning the last position's logits, the cache and
  the state.
* :func:`decode` continues from those logits: each step picks a token per row (greedy, or
  Hugging Face's order temperature → top-k → top-p, then a draw with that row's key),
  feeds it back (read, then write when ``write``), and stops at EOS or ``max_new_tokens``.
* :func:`broadcast_rows` copies a one-row prefix (cache + state) to ``B`` rows.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltamem_jax.inference.generation import SamplingConfig, decode_loop
from deltamem_jax.models.cache import KVCache
from deltamem_jax.models.functional import Runner

__all__ = ["Decoding", "broadcast_rows", "decode", "prefill", "row_keys", "warp_logits"]


@dataclasses.dataclass(frozen=True)
class Decoding(SamplingConfig):
    """How evaluation picks tokens: :class:`SamplingConfig`'s fields and checks (``temperature
    == 0`` is greedy; top-k / top-p then unused)."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def describe(self) -> dict:
        if self.greedy:
            return {"mode": "greedy", "max_new_tokens": self.max_new_tokens}
        return {"mode": "sample", **dataclasses.asdict(self)}


def warp_logits(logits: jax.Array, d: Decoding) -> jax.Array:
    """Hugging Face's sampling warpers in their order: temperature, top-k, top-p
    (``TopPLogitsWarper``: drop the ascending-sorted tokens whose cumulative probability is
    ≤ 1 − p, always keeping the most likely one)."""
    logits = logits.astype(jnp.float32) / d.temperature
    if d.top_k and d.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, d.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if d.top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)                       # ascending
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove = cum <= 1.0 - d.top_p
        remove = remove.at[..., -1].set(False)
        sorted_logits = jnp.where(remove, -jnp.inf, sorted_logits)
        rows = jnp.arange(logits.shape[0])[:, None]
        logits = jnp.full_like(logits, -jnp.inf).at[rows, order].set(sorted_logits)
    return logits


def _pick(logits, keys, step, d: Decoding):
    if d.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    warped = warp_logits(logits, d)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    sample = jax.vmap(lambda k, lg: jax.random.categorical(k, lg))
    return sample(step_keys, warped).astype(jnp.int32)


def row_keys(seeds: Sequence[int]) -> jax.Array:
    """One PRNG key per row from integer seeds."""
    return jax.vmap(jax.random.key)(jnp.asarray(list(seeds), jnp.uint32))


def prefill(runner: Runner, ids: np.ndarray, mask: np.ndarray, *, memory_state=None,
            cache: KVCache | None = None, write: bool = True, use_memory: bool = True,
            message_ids: np.ndarray | None = None, pass_length: int = 0,
            need_logits: bool = True):
    """Feed ``ids`` ``[B, T]``; returns (last-position logits ``[B, V]`` or None, cache, state).

    With ``pass_length > 0`` (token writes only) the tokens go in passes of that length,
    the cache and state carried: for token writes this equals one pass.
    """
    T = ids.shape[1]
    if message_ids is not None or pass_length <= 0 or T <= pass_length:
        cuts = [(0, T)]
    else:
        cuts = [(a, min(T, a + pass_length)) for a in range(0, T, pass_length)]
    logits = None
    for j, (a, b) in enumerate(cuts):
        last = j == len(cuts) - 1
        out = runner(jnp.asarray(ids[:, a:b]), attention_mask=jnp.asarray(mask[:, a:b]),
                     memory_state=memory_state, cache=cache, write=write, use_memory=use_memory,
                     message_ids=None if message_ids is None else jnp.asarray(message_ids),
                     compute_logits=need_logits and last)
        memory_state, cache = out.memory_state, out.cache
        if need_logits and last:
            logits = out.logits[:, -1]
    return logits, cache, memory_state


def broadcast_rows(cache: KVCache, state, batch: int, scanned: bool):
    """A one-row cache and memory state repeated to ``batch`` rows."""
    rep0 = lambda x: jnp.repeat(x, batch, axis=0)
    if scanned:
        keys = jnp.repeat(cache.keys, batch, axis=1)
        values = jnp.repeat(cache.values, batch, axis=1)
    else:
        keys = tuple(rep0(k) for k in cache.keys)
        values = tuple(rep0(v) for v in cache.values)
    cache = KVCache(keys, values, rep0(cache.mask), rep0(cache.positions), cache.index)
    if state is not None:
        state = jnp.repeat(state, batch, axis=1)
    return cache, state


def decode(runner: Runner, logits, cache: KVCache, memory_state, keys, *, decoding: Decoding,
           eos_ids: Sequence[int], pad_id: int, write: bool = True,
           use_memory: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(tokens ``[B, max_new_tokens]``, lengths ``[B]`` excluding EOS) continuing from
    ``logits`` ``[B, V]``. ``keys``: one PRNG key per row (ignored when greedy)."""
    if cache.max_length < int(cache.index) + decoding.max_new_tokens:
        raise ValueError(f"KV cache of length {cache.max_length} has no room for "
                         f"{decoding.max_new_tokens} more tokens after {int(cache.index)}")
    tokens, lengths = _decode(runner.graphdef, runner.state, logits, memory_state, cache, keys,
                              decoding=decoding, eos=tuple(int(e) for e in eos_ids),
                              pad_id=int(pad_id), write=write, use_memory=use_memory)
    return np.asarray(tokens), np.asarray(lengths)


@functools.partial(jax.jit, static_argnames=("graphdef", "decoding", "eos", "pad_id", "write",
                                             "use_memory"))
def _decode(graphdef, state, logits, memory_state, cache, keys, *, decoding, eos, pad_id, write,
            use_memory):
    model = nnx.merge(graphdef, state)

    def pick(logits, step, rng):
        return _pick(logits, keys, step, decoding), rng

    tokens, lengths, _, _ = decode_loop(
        model, logits, memory_state, cache, jnp.zeros((), jnp.uint32), pick,
        n=decoding.max_new_tokens, eos=eos, pad_id=pad_id, write=write, use_memory=use_memory)
    return tokens, lengths
