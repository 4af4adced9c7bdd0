"""Evaluation: locomo (every field: deltamem_jax/evaluation/defaults.py)."""

import os

from deltamem_jax.evaluation.defaults import eval_config


def get_config():
    c = eval_config()
    c.task = "locomo"
    c.data.path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                               "locomo10.json")
    c.max_new_tokens = 50
    return c
