"""Evaluation: perplexity (every field: deltamem_jax/evaluation/defaults.py)."""

from deltamem_jax.evaluation.defaults import eval_config


def get_config():
    c = eval_config()
    c.task = "perplexity"
    c.settings = ("with_memory", "without_memory", "full_context")
    return c
