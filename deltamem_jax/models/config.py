"""Decoder settings, read from (and written back to) a Hugging Face ``config.json``.

One dataclass covers the Llama family, Qwen3 (per-head q/k RMSNorm) and SmolLM3
(NoPE layers). Values we do not implement raise ``ValueError`` naming the field,
rather than silently computing something else.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "qwen3", "smollm3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "smollm3": "SmolLM3ForCausalLM"}
# models/attention.py's implementations (named here so configs validate without tracing)
ATTENTION_IMPLS = ("auto", "xla", "blocked", "cudnn", "splash")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a decoder-only LM, plus how to run it (dtypes, remat)."""

    model_type: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: tuple = ()               # extra rope parameters as (key, value) pairs
    rope_layers: tuple[bool, ...] = ()     # per layer: uses RoPE (empty = all)
    qk_norm: bool = False                  # Qwen3: RMSNorm on each q/k head
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: Any = None
    initializer_range: float = 0.02        # std of a from-scratch init
    # How to run, not what:
    dtype: str = "float32"                 # activations / matmul inputs
    param_dtype: str = "float32"
    remat: bool = False                    # rematerialise each layer in the backward pass
    attention_chunk_size: int = 0          # >0: process queries in blocks (bounded memory)
    attention_impl: str = "auto"           # models/attention.py: auto|xla|blocked|cudnn|splash
    scan_layers: bool = False              # one scanned layer body (fast compiles, big models)

    def __post_init__(self):
        _require(self.model_type in SUPPORTED_MODEL_TYPES, "model_type",
                 f"{self.model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        _require(self.rope_type in SUPPORTED_ROPE_TYPES, "rope_scaling.rope_type",
                 f"{self.rope_type!r} is not implemented (implemented: {SUPPORTED_ROPE_TYPES})")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                 "num_attention_heads must be a multiple of num_key_value_heads")
        _require(not self.rope_layers or len(self.rope_layers) == self.num_hidden_layers,
                 "no_rope_layers", f"needs one entry per layer ({self.num_hidden_layers})")
        _require(self.attention_impl in ATTENTION_IMPLS, "attention_impl",
                 f"{self.attention_impl!r} not in {ATTENTION_IMPLS}")
        _require(self.dtype in _DTYPES, "dtype", f"{self.dtype!r} not in {tuple(_DTYPES)}")
        _require(self.param_dtype in _DTYPES, "param_dtype",
                 f"{self.param_dtype!r} not in {tuple(_DTYPES)}")

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]

    def uses_rope(self, layer: int) -> bool:
        return not self.rope_layers or bool(self.rope_layers[layer])

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else tuple(e) if isinstance(e, (list, tuple)) else (int(e),)

    def replace(self, **changes) -> DecoderConfig:
        return dataclasses.replace(self, **changes)

    # HF config.json ------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], **overrides) -> DecoderConfig:
        """Read a transformers ``config.json`` dict (4.x or 5.x layout)."""
        mt = hf.get("model_type")
        _require(mt in SUPPORTED_MODEL_TYPES, "model_type",
                 f"{mt!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        act = hf.get("hidden_act", "silu")
        _require(act == "silu", "hidden_act", f"{act!r} is not implemented (only 'silu')")
        if hf.get("use_sliding_window") and hf.get("sliding_window"):
            raise ValueError("config.json field 'use_sliding_window': sliding-window attention "
                             "is not implemented")
        for lt in hf.get("layer_types") or ():
            _require(lt == "full_attention", "layer_types",
                     f"{lt!r} layers are not implemented (only 'full_attention')")
        for field in ("partial_rotary_factor",):
            _require(hf.get(field, 1.0) == 1.0, field, "only 1.0 is implemented")
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        rope = {**scaling, **rope}
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default")) or "default"
        rope.pop("partial_rotary_factor", None)
        _require(rope_type in SUPPORTED_ROPE_TYPES, "rope_scaling.rope_type",
                 f"{rope_type!r} is not implemented (implemented: {SUPPORTED_ROPE_TYPES})")
        n_layers = int(hf["num_hidden_layers"])
        rope_layers: tuple = ()
        if mt == "smollm3":
            nrl = hf.get("no_rope_layers")
            if nrl is None:
                interval = int(hf.get("no_rope_layer_interval", 4))
                nrl = [int((i + 1) % interval != 0) for i in range(n_layers)]
            rope_layers = tuple(bool(x) for x in nrl[:n_layers])
        n_heads = int(hf["num_attention_heads"])
        values = dict(
            model_type=mt,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // n_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_scaling=tuple(sorted((k, v) for k, v in rope.items() if v is not None)),
            rope_layers=rope_layers,
            qk_norm=(mt == "qwen3"),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            pad_token_id=hf.get("pad_token_id"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            initializer_range=float(hf.get("initializer_range", 0.02)),
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> DecoderConfig:
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json in model directory {path!r}")
        from deltamem_jax.utils.files import file_errors, read_json
        data = read_json(file, "the model config")
        with file_errors(file, "the model config"):
            if not isinstance(data, dict):
                raise TypeError("config.json must hold a JSON object")
            return cls.from_hf_dict(data, **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-5 ``config.json`` dict for this architecture."""
        rope = {"rope_theta": self.rope_theta, "rope_type": self.rope_type,
                **dict(self.rope_scaling)}
        out = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "initializer_range": self.initializer_range,
            "dtype": self.param_dtype,
        }
        if self.model_type != "qwen3":
            out["mlp_bias"] = self.mlp_bias
        if self.model_type == "smollm3":
            out["no_rope_layers"] = [int(self.uses_rope(i)) for i in range(self.num_hidden_layers)]
            out["use_sliding_window"] = False
        return out


def _require(cond: bool, field: str, message: str):
    if not cond:
        raise ValueError(f"config field {field!r}: {message}")
