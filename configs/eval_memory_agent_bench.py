"""memory_agent_bench under the authors' protocol
(every field: deltamem_jax/evaluation/defaults.py).

Point --config.data.path at the local copy (docs/evaluation.md: where it comes from)."""

from deltamem_jax.evaluation.defaults import eval_config


def get_config():
    c = eval_config()
    c.task = "memory_agent_bench"
    c.protocol = "authors"
    c.batch_size = 8
    return c
