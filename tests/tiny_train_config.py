"""A tiny from-scratch training config for the test suite (seconds per step on a CPU)."""

from deltamem_jax.training.defaults import base_config


def get_config():
    c = base_config()
    c.model.scratch.update(model_type="qwen3", vocab_size=264, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                           initializer_range=0.3)
    c.model.scan_layers = True            # the scanned layout, as big configs use
    c.data.tokenizer = "byte"
    c.data.max_length = 48
    c.data.max_write_length = 160
    c.data.num_buckets = 1
    c.data.p_state_only = 0.0
    c.memory.output_init = "random"
    c.optim.learning_rate = 3e-3
    c.optim.warmup_ratio = 0.0
    c.train.steps = 4
    c.train.batch_size = 8
    c.train.log_every = 1
    c.checkpoint.every = 1
    c.checkpoint.keep = 10
    c.logging.tensorboard = False
    return c
