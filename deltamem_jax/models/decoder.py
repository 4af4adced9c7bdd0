"""The decoder LM (Llama / Qwen3 / SmolLM3) with optional δ-mem: one call for every pass.

``model(input_ids, attention_mask=..., memory_state=..., cache=..., write=...,
message_ids=..., sentence_ids=...)`` runs a writing pass, a read-only pass, a
span-write pass or a decoding step, and returns logits, the new memory state and
the new cache. Nothing is mutated behind the caller's back.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from deltamem_jax.memory import DeltaMemory
from deltamem_jax.memory_config import DeltaMemConfig
from deltamem_jax.models.cache import KVCache
from deltamem_jax.models.config import DecoderConfig
from deltamem_jax.models.layers import DecoderLayer, RMSNorm, weight
from deltamem_jax.models.rope import inverse_frequencies
from deltamem_jax.sharding import constrain


class DecoderOutput(NamedTuple):
    logits: Optional[jax.Array]      # [B, T, vocab] float32 (None if not computed)
    memory_state: Optional[jax.Array]  # [L_mem, B, H, r, r] float32 (None without δ-mem)
    cache: Optional[KVCache]
    beta_means: Optional[jax.Array]  # [L_mem]: mean write strength per δ-mem layer


class DecoderLM(nnx.Module):
    """A causal decoder LM. Attach δ-mem with ``memory=`` or :meth:`attach_memory`."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs,
                 memory: Optional[DeltaMemConfig] = None):
        self.config = config
        dt = config.weight_dtype
        self.embed_tokens = weight(rngs, (config.vocab_size, config.hidden_size),
                                   ("vocab", "embed"), dt)
        self.layers = nnx.List([DecoderLayer(config, i, rngs)
                                for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt)
        if not config.tie_word_embeddings:
            self.lm_head = weight(rngs, (config.hidden_size, config.vocab_size),
                                  ("embed", "vocab"), dt)
        self.memory_config: Optional[DeltaMemConfig] = None
        if memory is not None:
            self.attach_memory(memory, rngs=rngs)

    # δ-mem ---------------------------------------------------------------
    def attach_memory(self, memory: DeltaMemConfig, *, rngs: nnx.Rngs) -> "DecoderLM":
        """Give every targeted attention layer a fresh :class:`DeltaMemory` (in place)."""
        bad = [i for i in memory.target_layers if not 0 <= i < self.config.num_hidden_layers]
        if bad:
            raise ValueError(f"target_layers {bad} out of range for a "
                             f"{self.config.num_hidden_layers}-layer model")
        base_slice = memory.output_init in ("base_slice", "base_slice_fixed")
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            if not memory.wraps_layer(i):
                attn.memory = None
                continue
            attn.memory = DeltaMemory(
                memory, self.config.hidden_size, attn.out_features(), rngs=rngs,
                base_weights=attn.torch_layout_weights() if base_slice else None)
        self.memory_config = memory
        return self

    @property
    def memory_layers(self) -> tuple[int, ...]:
        """Indices of the layers that carry δ-mem."""
        return tuple(i for i, layer in enumerate(self.layers)
                     if layer.self_attn.memory is not None)

    def init_memory_state(self, batch_size: int) -> jax.Array:
        """A fresh (zero) state for every δ-mem layer: ``[L_mem, B, H, r, r]``."""
        c = self.memory_config
        if c is None:
            raise ValueError("no δ-mem attached to this model")
        return jnp.zeros((len(self.memory_layers), batch_size, c.num_state_heads, c.rank, c.rank),
                         jnp.float32)

    # forward -------------------------------------------------------------
    def __call__(self, input_ids, *, attention_mask=None, memory_state=None,
                 cache: Optional[KVCache] = None, write: bool = True, use_memory: bool = True,
                 message_ids=None, sentence_ids=None, positions=None,
                 compute_logits: bool = True) -> DecoderOutput:
        """One pass over ``input_ids`` ``[B, T]``.

        Args:
          attention_mask: ``[B, T]``, 1 = real token (None = all real).
          memory_state: carried δ-mem state ``[L_mem, B, H, r, r]``; None = fresh zeros.
          cache: a :class:`KVCache` to append to (decoding); None = no cache.
          write: whether this pass writes into memory (Python bool).
          use_memory: False runs the bare backbone even with δ-mem attached.
          message_ids, sentence_ids: ``[B, T]`` span ids for span-mean write modes.
          positions: RoPE positions ``[B, T]``; default = each row's running count
            of real tokens (continuing from the cache).
          compute_logits: False skips the LM head and every layer after the last
            δ-mem layer (a write pass whose logits are unused, e.g. in training).
        """
        c = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
        B, T = input_ids.shape
        valid = (jnp.ones((B, T), bool) if attention_mask is None
                 else jnp.asarray(attention_mask) != 0)
        if valid.shape != (B, T):
            raise ValueError(f"attention_mask must be [B, T] = {(B, T)}, got {valid.shape}")

        mem_layers = self.memory_layers if use_memory else ()
        if mem_layers:
            if memory_state is None:
                memory_state = self.init_memory_state(B)
            want = (len(mem_layers), B) + tuple(self.init_memory_state(1).shape[2:])
            if tuple(memory_state.shape) != want:
                raise ValueError(f"memory_state must be [L_mem, B, H, r, r] = {want}, "
                                 f"got {tuple(memory_state.shape)}")
        offset = jnp.zeros((B,), jnp.int32) if cache is None else cache.positions
        if positions is None:
            positions = offset[:, None] + jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        positions = jnp.asarray(positions, jnp.int32)

        if cache is None:
            slots = jnp.arange(T)
            kv_static = (valid, slots, slots, 0)
        else:
            if cache.batch_size != B:
                raise ValueError(f"cache holds batch {cache.batch_size}, input has batch {B}")
            index = cache.index
            key_mask = jax.lax.dynamic_update_slice(cache.mask, valid, (0, index))
            kv_static = (key_mask, index + jnp.arange(T), jnp.arange(cache.max_length), index)

        inv_freq = inverse_frequencies(c)
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(c.compute_dtype)
        x = constrain(x, ("batch", "seq", "embed"))
        new_states, beta_means, new_keys, new_values = [], [], [], []
        last_needed = (mem_layers[-1] if mem_layers else -1) if not compute_logits else None
        for i, layer in enumerate(self.layers):
            slot = mem_layers.index(i) if i in mem_layers else None
            kv = ((None, None) if cache is None else (cache.keys[i], cache.values[i])) + kv_static
            kwargs = dict(positions=positions, inv_freq=inv_freq, kv=kv, write=write, valid=valid,
                          memory_state=None if slot is None else memory_state[slot],
                          message_ids=message_ids, sentence_ids=sentence_ids)
            if last_needed is not None and i == last_needed:
                out = layer.self_attn.memory(layer.input_layernorm(x), mask=valid,
                                             state=memory_state[slot], write=write,
                                             message_ids=message_ids, sentence_ids=sentence_ids)
                new_states.append(out.state)
                beta_means.append(out.beta_mean)
                break
            x, new_kv, mem = _run_layer(layer, x, kwargs, c.remat)
            if mem is not None:
                new_states.append(mem.state)
                beta_means.append(mem.beta_mean)
            if new_kv is not None:
                new_keys.append(new_kv[0])
                new_values.append(new_kv[1])

        logits = None
        if compute_logits:
            x = self.norm(x)
            head = (self.embed_tokens[...].T if c.tie_word_embeddings else self.lm_head[...])
            logits = (x @ head.astype(x.dtype)).astype(jnp.float32)
        new_cache = None
        if cache is not None and compute_logits:
            new_cache = KVCache(tuple(new_keys), tuple(new_values), kv_static[0],
                                cache.positions + jnp.sum(valid, axis=1, dtype=jnp.int32),
                                cache.index + T)
        state = jnp.stack(new_states) if new_states else None
        betas = jnp.stack(beta_means) if beta_means else None
        return DecoderOutput(logits, state, new_cache, betas)


def _run_layer(layer, x, kwargs, remat: bool):
    if not remat:
        return layer(x, **kwargs)
    static = {k: kwargs[k] for k in ("write",)}
    dynamic = {k: v for k, v in kwargs.items() if k not in static}

    @nnx.remat
    def f(layer, x, dynamic):
        return layer(x, **dynamic, **static)
    return f(layer, x, dynamic)
