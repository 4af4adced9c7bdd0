"""The authors' recipe on Qwen3-4B-Instruct-2507, for a TPU v5e-8 slice.

rank 8, alpha 16, Δ heads q and o, rank-wise coupled gates, base_slice_fixed init
(width 8, gain 0.05), AdamW lr 2e-4 cosine with 10 % warm-up, no weight decay,
read segment 512 tokens, write segment 8192, the last message visible, context
dropout "state only" with p = 0.2, write sparsity 0.01 toward β = 0.05, bf16.

    python train.py --config=configs/qwen3_4b.py --workdir=gs://bucket/run \\
        --config.model.hf_dir=/path/to/Qwen3-4B-Instruct-2507 --config.data.train=train.jsonl
    python train.py --config=configs/qwen3_4b.py --dry_run   # shapes only, no weights

Scaling up: the mesh is (data, fsdp, tensor). On one v5e-8 host, fsdp=8 shards the
frozen backbone over the 8 chips (it is never updated, so ZeRO-style sharding costs
one all-gather per layer) and the batch over all of them. On a pod slice (many
hosts) keep fsdp within a host's chips and let data fill the rest, e.g.
--config.mesh.shape="(-1, 8, 1)", set --config.distributed.initialize=True, and
raise --config.train.batch_size to a multiple of the data-parallel size.
"""

from deltamem_jax.training.defaults import base_config


def get_config():
    c = base_config()
    c.model.preset = "qwen3_4b"          # architecture for --dry_run without weights
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = True
    c.model.scan_layers = True            # compile one layer body, not 36
    c.model.attention_chunk_size = 1024   # 8192-token write passes in 1024-query blocks
    c.memory.output_init = "base_slice_fixed"
    c.memory.scan_method = "auto"        # chunked WY on TPU/GPU
    c.memory.chunk_size = 128
    c.data.max_length = 512
    c.data.max_write_length = 8192
    c.data.recent_messages = 1
    c.data.p_state_only = 0.2
    c.optim.learning_rate = 2e-4
    c.optim.warmup_ratio = 0.1
    c.optim.weight_decay = 0.0
    c.train.batch_size = 32               # the authors: 8 GPUs × 1 × 4 accumulation
    c.train.grad_accum = 4
    c.train.steps = 70
    c.train.sparsity_weight = 0.01
    c.train.sparsity_target = 0.05
    c.mesh.shape = (1, 8, 1)              # v5e-8: fsdp over the 8 chips
    c.checkpoint.every = 20
    return c
