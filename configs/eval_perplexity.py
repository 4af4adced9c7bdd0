"""Held-out reply loss with and without memory (every field: evaluation/defaults.py)."""

from deltamem_jax.evaluation.defaults import eval_config


def get_config():
    c = eval_config()
    c.task = "perplexity"
    c.protocol = "memory_only"
    c.settings = ("delta_mem", "no_memory", "full_context")
    return c
