"""LoCoMo, the authors' protocol by default (every field: deltamem_jax/evaluation/defaults.py).

--config.protocol=memory_only for the history-only-in-memory test."""

import os

from deltamem_jax.evaluation.defaults import eval_config


def get_config():
    c = eval_config()
    c.task = "locomo"
    c.protocol = "authors"
    c.data.path = os.environ.get("DELTAMEM_LOCOMO", os.path.join(
        os.path.dirname(__file__), "..", "..", "shared", "data", "locomo10.json"))
    c.batch_size = 8
    return c
