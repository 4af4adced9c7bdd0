"""Decoder building blocks (Flax NNX): RMSNorm, SwiGLU MLP, GQA attention with a δ-mem hook.

Weights are stored in einsum-friendly layouts with logical axis names:
q ``[embed, heads, head_dim]``, k/v ``[embed, kv_heads, head_dim]``,
o ``[heads, head_dim, embed]``, MLP ``[embed, mlp]`` / ``[mlp, embed]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deltamem_jax.memory.layer import DeltaMemory, MemoryOutput
from deltamem_jax.models.attention import attention
from deltamem_jax.models.config import DecoderConfig
from deltamem_jax.models.rope import apply_rope
from deltamem_jax.utils.sharding import LOGICAL_AXES, constrain


def weight(rngs: nnx.Rngs, shape, axes, dtype, std: float) -> nnx.Param:
    """A backbone weight: N(0, std²), tagged with logical axis names."""
    return nnx.Param((std * jax.random.normal(rngs.params(), shape)).astype(dtype),
                     **{LOGICAL_AXES: axes})


def filled(value: float, shape, axes, dtype) -> nnx.Param:
    return nnx.Param(jnp.full(shape, value, dtype), **{LOGICAL_AXES: axes})


class RMSNorm(nnx.Module):
    """x / rms(x) · w, computed in float32 (as transformers does)."""

    def __init__(self, size: int, eps: float, dtype, axis_name: str = "embed"):
        self.eps = eps
        self.weight = filled(1.0, (size,), (axis_name,), dtype)

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * x.astype(dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        d, f, dt = config.hidden_size, config.intermediate_size, config.weight_dtype
        self.gate_proj = weight(rngs, (d, f), ("embed", "mlp"), dt, config.initializer_range)
        self.up_proj = weight(rngs, (d, f), ("embed", "mlp"), dt, config.initializer_range)
        self.down_proj = weight(rngs, (f, d), ("mlp", "embed"), dt, config.initializer_range)
        if config.mlp_bias:
            self.gate_bias = filled(0.0, (f,), ("mlp",), dt)
            self.up_bias = filled(0.0, (f,), ("mlp",), dt)
            self.down_bias = filled(0.0, (d,), ("embed",), dt)
        self.bias = config.mlp_bias

    def __call__(self, x):
        dt = x.dtype
        gate = x @ self.gate_proj[...].astype(dt)
        up = x @ self.up_proj[...].astype(dt)
        if self.bias:
            gate, up = gate + self.gate_bias[...].astype(dt), up + self.up_bias[...].astype(dt)
        h = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
        out = h @ self.down_proj[...].astype(dt)
        return out + self.down_bias[...].astype(dt) if self.bias else out


class Attention(nnx.Module):
    """Grouped-query attention; optional per-head q/k RMSNorm (Qwen3); optional δ-mem.

    ``self.memory`` is a :class:`DeltaMemory` or None. Its Δq/Δk/Δv are added to
    the q/k/v projections before q/k-norm and RoPE, and its Δo to the output
    projection (SPEC §1). The KV cache therefore holds δ-mem-modified keys/values.
    """

    def __init__(self, config: DecoderConfig, layer_index: int, rngs: nnx.Rngs):
        c = config
        d, nh, nkv, hd, dt = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                              c.head_dim, c.weight_dtype)
        std = c.initializer_range
        self.q_proj = weight(rngs, (d, nh, hd), ("embed", "heads", "head_dim"), dt, std)
        self.k_proj = weight(rngs, (d, nkv, hd), ("embed", "kv_heads", "head_dim"), dt, std)
        self.v_proj = weight(rngs, (d, nkv, hd), ("embed", "kv_heads", "head_dim"), dt, std)
        self.o_proj = weight(rngs, (nh, hd, d), ("heads", "head_dim", "embed"), dt, std)
        self.bias = c.attention_bias
        if c.attention_bias:
            self.q_bias = filled(0.0, (nh, hd), ("heads", "head_dim"), dt)
            self.k_bias = filled(0.0, (nkv, hd), ("kv_heads", "head_dim"), dt)
            self.v_bias = filled(0.0, (nkv, hd), ("kv_heads", "head_dim"), dt)
            self.o_bias = filled(0.0, (d,), ("embed",), dt)
        self.qk_norm = c.qk_norm
        if c.qk_norm:
            self.q_norm = RMSNorm(hd, c.rms_norm_eps, dt, "head_dim")
            self.k_norm = RMSNorm(hd, c.rms_norm_eps, dt, "head_dim")
        self.use_rope = c.uses_rope(layer_index)
        self.groups = nh // nkv
        self.chunk = c.attention_chunk_size
        self.attention_impl = c.attention_impl
        self.memory: DeltaMemory | None = nnx.data(None)

    def out_features(self) -> dict[str, int]:
        nh, hd, d = self.o_proj.shape[-3:]
        nkv = self.k_proj.shape[-2]
        return {"q": nh * hd, "k": nkv * hd, "v": nkv * hd, "o": d}

    def torch_layout_weights(self) -> dict[str, jax.Array]:
        """q/k/v/o weights as transformers stores them (``[out, in]``), for base_slice init.

        On a stacked (scanned) attention every array has a leading layer axis.
        """
        q, k, v, o = (p[...] for p in (self.q_proj, self.k_proj, self.v_proj, self.o_proj))
        if q.ndim == 4:
            return jax.vmap(torch_layout)(q, k, v, o)
        return torch_layout(q, k, v, o)

    def __call__(self, h, *, positions, inv_freq, kv, memory_state=None, write=True,
                 valid=None, message_ids=None, sentence_ids=None, rope=None):
        """h: normalised input [B, T, d]. kv: (keys, values, key_mask, query_slots, key_slots,
        cache_index) from the decoder (keys/values None without a cache). ``rope``: a traced
        bool overriding ``self.use_rope`` (scanned layers, where NoPE is per-layer data).

        Returns (output [B, T, d], (new_keys, new_values) or None, MemoryOutput or None).
        """
        dt = h.dtype
        B, T, _ = h.shape
        mem: MemoryOutput | None = None
        deltas = {}
        if self.memory is not None and memory_state is not None:
            mem = self.memory(h, mask=valid, state=memory_state, write=write,
                              message_ids=message_ids, sentence_ids=sentence_ids)
            deltas = mem.deltas
        q = jnp.einsum("btd,dnh->btnh", h, self.q_proj[...].astype(dt))
        k = jnp.einsum("btd,dnh->btnh", h, self.k_proj[...].astype(dt))
        v = jnp.einsum("btd,dnh->btnh", h, self.v_proj[...].astype(dt))
        if self.bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if "q" in deltas:
            q = q + deltas["q"].reshape(q.shape)
        if "k" in deltas:
            k = k + deltas["k"].reshape(k.shape)
        if "v" in deltas:
            v = v + deltas["v"].reshape(v.shape)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = jnp.where(rope, apply_rope(q, positions, inv_freq), q)
            k = jnp.where(rope, apply_rope(k, positions, inv_freq), k)
        elif self.use_rope:
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        q = constrain(q, ("batch", "seq", "heads", "head_dim"))

        cache_k, cache_v, key_mask, query_slots, key_slots, index = kv
        new_kv = None
        if cache_k is not None:
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype),
                                                   (0, index, 0, 0))
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype),
                                                   (0, index, 0, 0))
            new_kv = (cache_k, cache_v)
            k, v = cache_k.astype(dt), cache_v.astype(dt)
        out = attention(q, k, v, key_mask, query_slots, key_slots, self.groups,
                        impl=self.attention_impl, chunk=self.chunk, prefill=new_kv is None)
        out = jnp.einsum("btnh,nhd->btd", out, self.o_proj[...].astype(dt))
        if self.bias:
            out = out + self.o_bias[...].astype(dt)
        if "o" in deltas:
            out = out + deltas["o"]
        return out, new_kv, mem


def torch_layout(q, k, v, o) -> dict[str, jax.Array]:
    """Our q/k/v [d, n, hd] and o [n, hd, d] as HF Linear weights [out, in]."""
    d = q.shape[0]
    return {"q": q.reshape(d, -1).T, "k": k.reshape(d, -1).T, "v": v.reshape(d, -1).T,
            "o": o.reshape(-1, d).T}


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: DecoderConfig, layer_index: int, rngs: nnx.Rngs):
        dt = config.weight_dtype
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt)
        self.self_attn = Attention(config, layer_index, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, **kwargs):
        h = self.input_layernorm(x)
        a, new_kv, mem = self.self_attn(h, **kwargs)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "seq", "embed")), new_kv, mem
