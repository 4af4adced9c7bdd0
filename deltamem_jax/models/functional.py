"""Jitted, functional calls of a :class:`DecoderLM`: split once, merge inside ``jax.jit``.

Calling an NNX module eagerly compiles op by op; ``nnx.jit`` re-walks the object
graph on every call. Splitting the model once into (graphdef, state) and passing
the state through one cached ``jax.jit`` function is the fast path for loops
(generation, evaluation, parity checks).
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from deltamem_jax.models.cache import KVCache
from deltamem_jax.models.decoder import DecoderLM, DecoderOutput, zero_memory_state


@functools.partial(jax.jit, static_argnames=("graphdef", "write", "use_memory", "compute_logits"))
def apply(graphdef, state, input_ids, attention_mask=None, memory_state=None,
          cache: KVCache | None = None, message_ids=None, sentence_ids=None, positions=None,
          *, write: bool = True, use_memory: bool = True,
          compute_logits: bool = True) -> DecoderOutput:
    """``DecoderLM.__call__`` as a pure jitted function of (graphdef, state)."""
    model = nnx.merge(graphdef, state)
    return model(input_ids, attention_mask=attention_mask, memory_state=memory_state,
                 cache=cache, write=write, use_memory=use_memory, message_ids=message_ids,
                 sentence_ids=sentence_ids, positions=positions, compute_logits=compute_logits)


class Runner:
    """A model split once; calling it runs :func:`apply` (same arguments as the model)."""

    def __init__(self, model: DecoderLM):
        self.graphdef, self.state = nnx.split(model)
        self.config = model.config
        self.memory_config = model.memory_config
        self.memory_layers = model.memory_layers

    def model(self) -> DecoderLM:
        return nnx.merge(self.graphdef, self.state)

    def init_memory_state(self, batch_size: int) -> jax.Array:
        """A fresh (zero) δ-mem state ``[L_mem, B, H, r, r]`` (the model's own constructor)."""
        c = self.memory_config
        if c is None:
            raise ValueError("no δ-mem attached to this model")
        return zero_memory_state(len(self.memory_layers), batch_size, c)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty KV cache with room for ``max_length`` tokens per row."""
        return KVCache.init(self.config, batch_size, max_length, dtype)

    def __call__(self, input_ids, *, attention_mask=None, memory_state=None, cache=None,
                 write: bool = True, use_memory: bool = True, message_ids=None,
                 sentence_ids=None, positions=None, compute_logits: bool = True) -> DecoderOutput:
        return apply(self.graphdef, self.state, input_ids, attention_mask, memory_state, cache,
                     message_ids, sentence_ids, positions, write=write, use_memory=use_memory,
                     compute_logits=compute_logits)
