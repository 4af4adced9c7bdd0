"""Architectures of public checkpoints (config values only, nothing downloaded).

Used for dry runs, parameter counts and sharding plans before any weight exists.
Values are those of the checkpoints' ``config.json`` on the Hugging Face hub.
"""

from __future__ import annotations

from deltamem_jax.models.config import DecoderConfig

QWEN3_4B_INSTRUCT_2507 = dict(
    model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
    num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    rms_norm_eps=1e-6, rope_theta=5000000.0, max_position_embeddings=262144,
    tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
    qk_norm=True)

QWEN3_8B = dict(
    model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
    num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
    tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
    qk_norm=True)

SMOLLM3_3B = dict(
    model_type="smollm3", vocab_size=128256, hidden_size=2048, intermediate_size=11008,
    num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
    rms_norm_eps=1e-6, rope_theta=5000000.0, max_position_embeddings=65536,
    tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128012, pad_token_id=128004,
    rope_layers=tuple((i + 1) % 4 != 0 for i in range(36)))

PRESETS = {"qwen3_4b": QWEN3_4B_INSTRUCT_2507, "qwen3_8b": QWEN3_8B, "smollm3_3b": SMOLLM3_3B}


def preset(name: str, **overrides) -> DecoderConfig:
    """A :class:`DecoderConfig` for a known architecture (``overrides``: dtype, remat, …)."""
    if name not in PRESETS:
        raise ValueError(f"unknown architecture preset {name!r}; known: {sorted(PRESETS)}")
    return DecoderConfig(**{**PRESETS[name], **overrides})
