"""One way to get a ready model: a backbone checkpoint plus, optionally, a δ-mem adapter.

:func:`load_pretrained` is what every entry point (training, evaluation, chat,
the demo, the server) calls, so that dtype, layer layout, sharding and the
adapter are applied the same way everywhere.
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from deltamem_jax.checkpoints.adapters import load_adapter
from deltamem_jax.checkpoints.hf import load_hf_model
from deltamem_jax.memory.config import DeltaMemConfig
from deltamem_jax.models.decoder import DecoderLM
from deltamem_jax.utils.sharding import Rules

__all__ = ["load_pretrained"]


def load_pretrained(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None = None, *,
                    dtype: str | None = None, param_dtype: str | None = None,
                    scan_layers: bool | None = None, mesh: jax.sharding.Mesh | None = None,
                    rules: Rules | None = None, memory: DeltaMemConfig | None = None,
                    rngs: nnx.Rngs | None = None, **config_overrides) -> DecoderLM:
    """A :class:`DecoderLM` from a local checkpoint, with its δ-mem adapter when given.

    Args:
      model_dir: a Hugging Face model directory (``config.json`` + safetensors) or
        anything else :func:`~deltamem_jax.checkpoints.hf.load_hf_model` reads.
      adapter_dir: an authors'-format δ-mem adapter directory; None = no adapter.
      dtype: activation dtype (``"float32"``, ``"bfloat16"``); ``param_dtype``
        defaults to the same (weights are converted while they are read).
      scan_layers: the scanned (stacked) layer layout; None = the checkpoint default.
      mesh, rules: place every weight directly in its sharding.
      memory: attach a *fresh* δ-mem with this config (training from scratch);
        mutually exclusive with ``adapter_dir``.
      config_overrides: other run-time :class:`DecoderConfig` fields (``remat``, …).
    """
    if adapter_dir is not None and memory is not None:
        raise ValueError("load_pretrained: give either adapter_dir (a trained δ-mem) or memory "
                         "(a fresh one), not both")
    overrides = dict(config_overrides)
    if dtype is not None:
        overrides["dtype"] = dtype
        overrides.setdefault("param_dtype", dtype)
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    if scan_layers is not None:
        overrides["scan_layers"] = bool(scan_layers)
    model = load_hf_model(os.fspath(model_dir), memory=memory, mesh=mesh, rules=rules, rngs=rngs,
                          **overrides)
    if adapter_dir is not None:
        load_adapter(model, os.fspath(adapter_dir))
    return model
