"""deltamem-jax: δ-mem (arXiv 2605.12357) in JAX / Flax NNX.

A frozen decoder LM gets a tiny online associative memory: each wrapped
attention layer keeps an r×r state written by a gated delta rule, whose
read-out adds low-rank corrections to q/k/v/o. Only the memory trains.

The public names below are imported lazily, so ``import deltamem_jax.data``
does not pull in JAX.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "osam_scan": "deltamem_jax.memory.osam", "osam_read": "deltamem_jax.memory.osam",
    "update_gates": "deltamem_jax.memory.osam",
    "DeltaMemConfig": "deltamem_jax.memory.config",
    "DeltaMemory": "deltamem_jax.memory.layer", "MemoryOutput": "deltamem_jax.memory.layer",
    "MemoryParam": "deltamem_jax.memory.layer",
    "DecoderConfig": "deltamem_jax.models.config",
    "DecoderLM": "deltamem_jax.models.decoder", "DecoderOutput": "deltamem_jax.models.decoder",
    "KVCache": "deltamem_jax.models.cache",
    "Runner": "deltamem_jax.models.functional",
    "load_hf_model": "deltamem_jax.checkpoints.hf", "save_hf_model": "deltamem_jax.checkpoints.hf",
    "load_config": "deltamem_jax.checkpoints.hf",
    "load_pretrained": "deltamem_jax.checkpoints.pretrained",
    "smollm2_gguf_path": "deltamem_jax.checkpoints.gguf",
    "convert_gguf": "deltamem_jax.checkpoints.gguf_export",
    "load_adapter": "deltamem_jax.checkpoints.adapters",
    "save_adapter": "deltamem_jax.checkpoints.adapters",
    "read_adapter_config": "deltamem_jax.checkpoints.adapters",
    "SamplingConfig": "deltamem_jax.inference.generation",
    "generate": "deltamem_jax.inference.generation",
    "Session": "deltamem_jax.inference.session",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'deltamem_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
