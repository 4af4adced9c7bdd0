"""The CPU demo's δ-mem stage: a tiny frozen backbone, trained memory (minutes on 2 cores).

``python -m deltamem_jax.demo`` runs the whole story (data, backbone pre-training,
this stage, evaluation); this file alone trains δ-mem on an existing tiny backbone:

    python train.py --config=configs/demo_cpu.py --workdir=runs/demo \\
        --config.model.hf_dir=runs/demo/backbone --config.data.train=runs/demo/data/train.jsonl
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from base import get_base_config  # noqa: E402


def get_config():
    c = get_base_config()
    c.data.tokenizer = "byte"
    c.data.max_length = 96
    c.data.max_write_length = 512
    c.data.num_buckets = 2
    c.data.p_state_only = 0.0
    c.memory.output_init = "zero"
    c.memory.beta_bias_init = -1.0
    c.optim.learning_rate = 3e-3
    c.optim.warmup_ratio = 0.05
    c.train.steps = 600
    c.train.batch_size = 16
    c.train.sparsity_weight = 0.0
    c.train.log_every = 25
    c.checkpoint.every = 200
    return c
