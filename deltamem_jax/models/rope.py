"""Rotary position embeddings: default, linear and Llama-3 frequency scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from deltamem_jax.models.config import DecoderConfig


def inverse_frequencies(config: DecoderConfig) -> np.ndarray:
    """Per-pair inverse frequencies ``[head_dim // 2]`` (float32), as transformers computes them."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta
                 ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    params = dict(config.rope_scaling)
    if config.rope_type == "linear":
        return (inv / np.float32(params["factor"])).astype(np.float32)
    if config.rope_type == "llama3":
        try:
            factor = params["factor"]
            low, high = params["low_freq_factor"], params["high_freq_factor"]
            old_len = params["original_max_position_embeddings"]
        except KeyError as e:
            raise ValueError(f"config field 'rope_scaling': llama3 rope needs {e.args[0]!r}") from e
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def apply_rope(x, positions, inv_freq):
    """Rotate ``x`` ``[B, T, heads, head_dim]`` by ``positions`` ``[B, T]`` (half-split layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)   # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb).astype(x.dtype)[:, :, None, :]
    sin = jnp.sin(emb).astype(x.dtype)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
