"""The training config that every file in configs/ edits: built from the typed schema.

The schema and its defaults live in :mod:`deltamem_jax.training.settings`; this
module only turns them into an ``ml_collections.ConfigDict`` (every field can be
overridden on the command line, e.g. ``--config.train.steps=50``) and holds the
CPU demo's δ-mem stage.
"""

from __future__ import annotations

import ml_collections

from deltamem_jax.training.settings import TrainSettings
from deltamem_jax.utils.configs import to_config


def base_config() -> ml_collections.ConfigDict:
    """Every training field at its default (see :class:`TrainSettings`)."""
    return to_config(TrainSettings())


def demo_config() -> ml_collections.ConfigDict:
    """The CPU demo's δ-mem stage: a tiny frozen byte-level backbone, minutes on 2 cores."""
    c = base_config()
    c.data.tokenizer = "byte"
    c.data.max_length = 64
    c.data.max_write_length = 256
    c.data.num_buckets = 2
    c.data.p_state_only = 0.0
    c.memory.output_init = "zero"
    c.optim.learning_rate = 1e-2
    c.optim.warmup_ratio = 0.05
    c.train.steps = 1200
    c.train.batch_size = 32
    c.train.sparsity_weight = 0.0
    c.train.log_every = 50
    c.checkpoint.every = 200
    c.logging.tensorboard = True
    return c


def smollm2_demo_config() -> ml_collections.ConfigDict:
    """The real-backbone demo's δ-mem stage: frozen SmolLM2-135M-Instruct on 2 CPU cores.

    Sized for the demo's time budget, not tuned to reach recall (docs/demo.md: at this
    training length δ-mem stays at chance); δ-mem on the top third of SmolLM2's 30 layers,
    as the demo runs it. The demo sets model.hf_dir and data.train.
    """
    c = base_config()
    c.memory.target_layers = tuple(range(20, 30))
    c.data.max_length = 64
    c.data.max_write_length = 512
    c.data.num_buckets = 3
    c.data.p_state_only = 0.0
    c.memory.output_init = "base_slice_fixed"
    c.optim.learning_rate = 3e-3
    c.optim.warmup_ratio = 0.05
    c.train.steps = 150
    c.train.batch_size = 8
    c.train.sparsity_weight = 0.0
    c.train.log_every = 10
    c.checkpoint.every = 150
    c.checkpoint.keep = 1
    return c
