"""deltamem-jax: δ-mem (arXiv 2605.12357) in JAX / Flax NNX.

A frozen decoder LM gets a tiny online associative memory: each wrapped
attention layer keeps an r×r state written by a gated delta rule, whose
read-out adds low-rank corrections to q/k/v/o. Only the memory trains.
"""

from deltamem_jax.checkpoints.adapters import (load_adapter, read_adapter_config,
                                               save_adapter)
from deltamem_jax.checkpoints.hf import load_hf_model, save_hf_model
from deltamem_jax.memory import DeltaMemory, MemoryOutput, MemoryParam
from deltamem_jax.memory_config import DeltaMemConfig
from deltamem_jax.models.cache import KVCache
from deltamem_jax.models.config import DecoderConfig
from deltamem_jax.models.decoder import DecoderLM, DecoderOutput
from deltamem_jax.models.functional import Runner
from deltamem_jax.osam import osam_read, osam_scan, update_gates

__version__ = "0.1.0"

__all__ = [
    "DecoderConfig", "DecoderLM", "DecoderOutput", "DeltaMemConfig", "DeltaMemory", "KVCache",
    "MemoryOutput", "MemoryParam", "Runner", "load_adapter", "load_hf_model", "osam_read",
    "osam_scan", "read_adapter_config", "save_adapter", "save_hf_model", "update_gates",
]
