"""The decoder LM (Llama / Qwen3 / SmolLM3) with optional δ-mem: one call for every pass.

``model(input_ids, attention_mask=..., memory_state=..., cache=..., write=...,
message_ids=..., sentence_ids=...)`` runs a writing pass, a read-only pass, a
span-write pass or a decoding step, and returns logits, the new memory state and
the new cache. Nothing is mutated behind the caller's back.

Two layer layouts: a list of layers (default), or with ``config.scan_layers`` one
stacked layer whose parameters carry a leading ``layers`` axis, run by
``lax.scan`` so that a 36-layer model compiles one layer body (MaxText's
``scan_layers``). NoPE layers become per-layer data in the scanned layout.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltamem_jax.memory.config import DeltaMemConfig
from deltamem_jax.memory.layer import DeltaMemory
from deltamem_jax.models.cache import KVCache
from deltamem_jax.models.config import DecoderConfig
from deltamem_jax.models.layers import DecoderLayer, RMSNorm, weight
from deltamem_jax.models.rope import inverse_frequencies
from deltamem_jax.utils.sharding import LOGICAL_AXES, constrain


class DecoderOutput(NamedTuple):
    logits: jax.Array | None      # [B, T, vocab] float32 (None if not computed)
    memory_state: jax.Array | None  # [L_mem, B, H, r, r] float32 (None without δ-mem)
    cache: KVCache | None
    beta_means: jax.Array | None  # [L_mem]: mean write strength per δ-mem layer


def zero_memory_state(num_layers: int, batch_size: int, config: DeltaMemConfig) -> jax.Array:
    """The fresh δ-mem state of ``num_layers`` layers: zeros ``[L_mem, B, H, r, r]`` float32."""
    return jnp.zeros((num_layers, batch_size, config.num_state_heads, config.rank, config.rank),
                     jnp.float32)


def _stacked(build, n: int, rngs: nnx.Rngs, *args):
    """``n`` modules from ``build(rngs, *args)`` stacked on a leading ``layers`` axis."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,) + (0,) * len(args), out_axes=0)
    def make(rngs, *args):
        return build(rngs, *args)
    module = make(rngs, *args)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable) and var.get_metadata(LOGICAL_AXES, None) is not None:
            var.set_metadata(LOGICAL_AXES, ("layers",) + tuple(var.get_metadata(LOGICAL_AXES)))
    return module


class DecoderLM(nnx.Module):
    """A causal decoder LM. Attach δ-mem with ``memory=`` or :meth:`attach_memory`."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs,
                 memory: DeltaMemConfig | None = None):
        self.config = config
        dt = config.weight_dtype
        self.embed_tokens = weight(rngs, (config.vocab_size, config.hidden_size),
                                   ("vocab", "embed"), dt, config.initializer_range)
        if config.scan_layers:
            self.layers = _stacked(lambda r: DecoderLayer(config, 0, r),
                                   config.num_hidden_layers, rngs)
        else:
            self.layers = nnx.List([DecoderLayer(config, i, rngs)
                                    for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt)
        if not config.tie_word_embeddings:
            self.lm_head = weight(rngs, (config.hidden_size, config.vocab_size),
                                  ("embed", "vocab"), dt, config.initializer_range)
        self.memory_config: DeltaMemConfig | None = None
        if memory is not None:
            self.attach_memory(memory, rngs=rngs)

    # δ-mem ---------------------------------------------------------------
    def attach_memory(self, memory: DeltaMemConfig, *, rngs: nnx.Rngs) -> DecoderLM:
        """Give every targeted attention layer a fresh :class:`DeltaMemory` (in place)."""
        n = self.config.num_hidden_layers
        bad = [i for i in memory.target_layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"target_layers {bad} out of range for a {n}-layer model")
        base_slice = memory.output_init in ("base_slice", "base_slice_fixed")
        d = self.config.hidden_size
        if self.config.scan_layers:
            if memory.target_layers and sorted(set(memory.target_layers)) != list(range(n)):
                raise ValueError("target_layers must cover every layer with scan_layers=True "
                                 "(a scanned stack has one layer body); set scan_layers=False")
            attn = self.layers.self_attn
            base = attn.torch_layout_weights() if base_slice else None
            outs = attn.out_features()
            attn.memory = _stacked(
                lambda r, b: DeltaMemory(memory, d, outs, rngs=r, base_weights=b), n, rngs, base)
        else:
            for i, layer in enumerate(self.layers):
                attn = layer.self_attn
                attn.memory = None if not memory.wraps_layer(i) else DeltaMemory(
                    memory, d, attn.out_features(), rngs=rngs,
                    base_weights=attn.torch_layout_weights() if base_slice else None)
        self.memory_config = memory
        return self

    @property
    def memory_layers(self) -> tuple[int, ...]:
        """Indices of the layers that carry δ-mem."""
        if self.config.scan_layers:
            return tuple(range(self.config.num_hidden_layers)) \
                if self.layers.self_attn.memory is not None else ()
        return tuple(i for i, layer in enumerate(self.layers)
                     if layer.self_attn.memory is not None)

    def layer_memory(self, index: int) -> tuple[DeltaMemory, int | None]:
        """The memory module of layer ``index`` and, for scanned layers, its row in the stack."""
        if self.config.scan_layers:
            return self.layers.self_attn.memory, index
        return self.layers[index].self_attn.memory, None

    def init_memory_state(self, batch_size: int) -> jax.Array:
        """A fresh (zero) state for every δ-mem layer: ``[L_mem, B, H, r, r]``."""
        c = self.memory_config
        if c is None:
            raise ValueError("no δ-mem attached to this model")
        return zero_memory_state(len(self.memory_layers), batch_size, c)

    # forward -------------------------------------------------------------
    def __call__(self, input_ids, *, attention_mask=None, memory_state=None,
                 cache: KVCache | None = None, write: bool = True, use_memory: bool = True,
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
          compute_logits: False skips the LM head: a write pass whose logits are unused.
            Without a cache, a list of layers also stops after the last δ-mem layer
            (nothing after it can change the memory); with a cache every layer runs,
            so the returned cache is complete.
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
        else:
            memory_state = None
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
            key_mask = jax.lax.dynamic_update_slice(cache.mask, valid, (0, cache.index))
            kv_static = (key_mask, cache.index + jnp.arange(T), jnp.arange(cache.max_length),
                         cache.index)

        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(c.compute_dtype)
        x = constrain(x, ("batch", "seq", "embed"))
        common = dict(positions=positions, inv_freq=inverse_frequencies(c), write=write,
                      valid=valid, message_ids=message_ids, sentence_ids=sentence_ids)
        run = self._scanned if c.scan_layers else self._unrolled
        x, states, betas, keys, values = run(x, common, kv_static, memory_state, cache,
                                             mem_layers, compute_logits)

        logits = None
        if compute_logits:
            x = self.norm(x)
            head = (self.embed_tokens[...].T if c.tie_word_embeddings else self.lm_head[...])
            logits = (x @ head.astype(x.dtype)).astype(jnp.float32)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(keys, values, kv_static[0],
                                cache.positions + jnp.sum(valid, axis=1, dtype=jnp.int32),
                                cache.index + T)
        return DecoderOutput(logits, states, new_cache, betas)

    def _unrolled(self, x, common, kv_static, memory_state, cache, mem_layers, compute_logits):
        states, betas, keys, values = [], [], [], []
        last_needed = None
        if not compute_logits and cache is None:      # later layers cannot change the memory
            last_needed = mem_layers[-1] if mem_layers else -1
        for i, layer in enumerate(self.layers):
            slot = mem_layers.index(i) if i in mem_layers else None
            kv = ((None, None) if cache is None else (cache.keys[i], cache.values[i])) + kv_static
            kwargs = dict(common, kv=kv,
                          memory_state=None if slot is None else memory_state[slot])
            if last_needed is not None and i == last_needed:
                # only this layer's memory write is still needed
                out = layer.self_attn.memory(
                    layer.input_layernorm(x), mask=common["valid"], state=kwargs["memory_state"],
                    write=common["write"], message_ids=common["message_ids"],
                    sentence_ids=common["sentence_ids"])
                states.append(out.state)
                betas.append(out.beta_mean)
                break
            x, new_kv, mem = _run_layer(layer, x, kwargs, self.config.remat)
            if mem is not None:
                states.append(mem.state)
                betas.append(mem.beta_mean)
            if new_kv is not None:
                keys.append(new_kv[0])
                values.append(new_kv[1])
        stack = (lambda xs: jnp.stack(xs) if xs else None)  # noqa: E731
        return x, stack(states), stack(betas), tuple(keys), tuple(values)

    def _scanned(self, x, common, kv_static, memory_state, cache, mem_layers, compute_logits):
        c = self.config
        graphdef, stacked = nnx.split(self.layers)
        write = common.pop("write")
        rope = jnp.asarray(np.array([c.uses_rope(i) for i in range(c.num_hidden_layers)]))
        xs = (stacked, rope, memory_state,
              None if cache is None else (cache.keys, cache.values))

        def body(x, layer_xs):
            state, rope_flag, mem_state, kv_l = layer_xs
            layer = nnx.merge(graphdef, state)
            kv = ((None, None) if kv_l is None else kv_l) + kv_static
            x, new_kv, mem = layer(x, **common, write=write, kv=kv, memory_state=mem_state,
                                   rope=rope_flag)
            return x, (None if mem is None else (mem.state, mem.beta_mean), new_kv)

        if c.remat:
            body = jax.checkpoint(body)
        x, (mem_out, kv_out) = jax.lax.scan(body, x, xs)
        states, betas = (None, None) if mem_out is None else mem_out
        keys, values = (None, None) if kv_out is None else kv_out
        return x, states, betas, keys, values


def _run_layer(layer, x, kwargs, remat: bool):
    """Run one decoder layer; with ``remat``, recompute its activations in the backward pass."""
    if not remat:
        return layer(x, **kwargs)
    write = kwargs.pop("write")
    graphdef, state = nnx.split(layer)

    @jax.checkpoint
    def run(state, x, kwargs):
        return nnx.merge(graphdef, state)(x, write=write, **kwargs)
    return run(state, x, kwargs)
