"""A functional KV cache: arrays go in and come out of every model call.

Slots are filled left to right; ``mask`` marks slots that hold a real token
(padding in a batch leaves holes), and causality follows slot order, so left- or
right-padded prompts both work. ``positions`` is each row's next RoPE position
(its count of real tokens so far).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from deltamem_jax.models.config import DecoderConfig


class KVCache(NamedTuple):
    """Keys and values: a tuple of per-layer ``[B, S, n_kv, head_dim]`` arrays, or with
    ``config.scan_layers`` one stacked ``[L, B, S, n_kv, head_dim]`` array (the sequence
    axis is ``-3`` either way)."""

    keys: tuple[jax.Array, ...] | jax.Array
    values: tuple[jax.Array, ...] | jax.Array
    mask: jax.Array      # [B, S] bool: slot holds a real token
    positions: jax.Array  # [B] int32: next position id per row
    index: jax.Array     # int32 scalar: number of slots filled

    @classmethod
    def init(cls, config: DecoderConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty cache with room for ``max_length`` tokens per row."""
        dtype = dtype or config.compute_dtype
        shape = (batch_size, max_length, config.num_key_value_heads, config.head_dim)
        n = config.num_hidden_layers
        if config.scan_layers:
            keys, values = jnp.zeros((n,) + shape, dtype), jnp.zeros((n,) + shape, dtype)
        else:
            keys = tuple(jnp.zeros(shape, dtype) for _ in range(n))
            values = tuple(jnp.zeros(shape, dtype) for _ in range(n))
        return cls(
            keys=keys,
            values=values,
            mask=jnp.zeros((batch_size, max_length), bool),
            positions=jnp.zeros((batch_size,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.mask.shape[1]

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]
