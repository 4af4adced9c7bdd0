"""SmolLM3-3B (NoPE every fourth layer): the same recipe as qwen3_4b, composed.

The authors' SmolLM3 script differs only by the sparsity weight (0) and paths.
"""

from configs.qwen3_4b import get_config as qwen3_4b_config


def get_config():
    c = qwen3_4b_config()
    c.model.preset = "smollm3_3b"
    c.train.sparsity_weight = 0.0
    return c
