"""Recall of the final reply, history only in memory (every field: evaluation/defaults.py)."""

from deltamem_jax.evaluation.defaults import eval_config


def get_config():
    c = eval_config()
    c.task = "recall"
    c.protocol = "memory_only"
    return c
