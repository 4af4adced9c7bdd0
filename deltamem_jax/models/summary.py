"""Parameter counts of a (possibly abstract) model: backbone, δ-mem, and the share."""

from __future__ import annotations

import math

import jax
from flax import nnx

from deltamem_jax.memory.config import DeltaMemConfig
from deltamem_jax.memory.layer import MemoryParam
from deltamem_jax.models.config import DecoderConfig
from deltamem_jax.models.decoder import DecoderLM


def _size(state) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def parameter_counts(model: DecoderLM) -> dict:
    """``{"backbone", "memory", "memory_share"}`` (share = memory / backbone)."""
    memory = _size(nnx.state(model, MemoryParam))
    backbone = _size(nnx.state(model, nnx.All(nnx.Param, nnx.Not(MemoryParam))))
    return {"backbone": backbone, "memory": memory, "memory_share": memory / backbone}


def abstract_model(config: DecoderConfig, memory: DeltaMemConfig | None = None) -> DecoderLM:
    """The model with shapes only (``nnx.eval_shape``): nothing is allocated."""
    return nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0), memory=memory))


def format_counts(counts: dict) -> str:
    return (f"backbone parameters: {counts['backbone']:,}\n"
            f"δ-mem parameters:    {counts['memory']:,} "
            f"({100 * counts['memory_share']:.2f} % of the backbone)")
