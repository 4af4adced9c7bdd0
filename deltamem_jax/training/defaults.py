"""The training config schema with its defaults; each file in configs/ edits a copy.

Every field can be overridden on the command line, e.g.
``python train.py --config=configs/demo_cpu.py --config.train.steps=50``.
"""

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # The frozen backbone: a local Hugging Face checkpoint directory (hf_dir), or an
    # architecture preset (shapes only: dry runs), or a from-scratch tiny model.
    c.model = ml_collections.ConfigDict(dict(
        hf_dir="",
        preset="",                 # qwen3_4b | qwen3_8b | smollm3_3b (with dry runs)
        scratch=ml_collections.ConfigDict(dict(   # used when hf_dir and preset are empty
            model_type="llama", vocab_size=264, hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            max_position_embeddings=4096, seed=0)),
        dtype="float32",           # activations; "bfloat16" on TPU/GPU
        param_dtype="float32",     # backbone weights
        remat=False,               # rematerialise each layer in the backward pass
        scan_layers=False,         # one scanned layer body: fast compiles for deep models
        attention_chunk_size=0,    # >0: attention over query blocks (bounded memory)
    ))

    # δ-mem (SPEC §1–§2); field names follow the authors' adapter config.
    c.memory = ml_collections.ConfigDict(dict(
        rank=8, alpha=16.0, num_state_heads=1, rankwise_gates=True, couple_lambda=True,
        normalize_qk=True, state_update_mode="standard", beta_bias_init=-1.5,
        delta_heads=("q", "o"), memory_write_granularity="token",
        output_init="base_slice_fixed", base_slice_ref_width=8, online_gain=0.05,
        delta_o_rmsnorm=False, delta_o_rmsnorm_eps=1e-6, trainable_delta_scale=False,
        delta_scale_init=1.0, delta_scale_max=2.0, delta_scale_granularity="layer",
        target_layers=(), scan_method="auto", chunk_size=64,
        max_spans=config_dict.placeholder(int),
    ))

    # Conversations in chat form ({"messages": [...]}) from local json/jsonl/parquet.
    c.data = ml_collections.ConfigDict(dict(
        train="",                  # file path (or a hub dataset name, with a network)
        validation="",
        tokenizer="",              # "" = the model directory's; "byte" = built-in byte level
        max_length=512,            # read segment: recent turns + reply
        max_write_length=8192,     # write segment: earlier history, oldest dropped
        recent_messages=1,         # non-system messages visible in the read segment
        targets="final",           # supervise the final assistant reply, or "all"
        num_buckets=4,             # padded lengths per segment (few static shapes)
        p_state_only=0.2,          # context dropout: views drawn per example
        p_no_memory=0.0,
    ))

    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=2e-4, schedule="cosine", warmup_ratio=0.1, end_lr_ratio=0.0,
        weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=100,
        batch_size=8,              # episodes per optimiser step, over all hosts
        grad_accum=1,              # micro-batches per step
        seed=42,
        sparsity_weight=0.01,      # write sparsity: w · mean_layers (mean β − target)²
        sparsity_target=0.05,
        log_every=10,
        stop_after=0,              # >0: stop after this many steps (tests a preempted run)
    ))

    # Mesh: axis names and sizes (one -1 = fill the remaining devices); axis types are
    # always passed explicitly ("auto": the compiler propagates shardings).
    c.mesh = ml_collections.ConfigDict(dict(
        axes=("data", "fsdp", "tensor"),
        shape=(-1, 1, 1),
        axis_types="auto",
        # logical axis -> mesh axes; δ-mem parameters stay replicated (memory_*: none)
        rules=(
            ("batch", ("data", "fsdp")),
            ("embed", "fsdp"),
            ("vocab", "tensor"),
            ("heads", "tensor"),
            ("kv_heads", "tensor"),
            ("mlp", "tensor"),
        ),
    ))

    c.checkpoint = ml_collections.ConfigDict(dict(
        every=100, keep=3, resume=True, export_adapter=True,
    ))

    c.logging = ml_collections.ConfigDict(dict(tensorboard=True))

    # Multi-host: set these (or rely on the TPU/SLURM auto-detection of
    # jax.distributed.initialize with initialize=True).
    c.distributed = ml_collections.ConfigDict(dict(
        initialize=False, coordinator_address="", num_processes=1, process_id=0,
        local_device_ids=config_dict.placeholder(tuple),
    ))
    return c


def demo_config() -> ml_collections.ConfigDict:
    """The CPU demo's δ-mem stage: a tiny frozen byte-level backbone, minutes on 2 cores."""
    c = base_config()
    c.data.tokenizer = "byte"
    c.data.max_length = 64
    c.data.max_write_length = 256
    c.data.num_buckets = 2
    c.data.p_state_only = 0.0
    c.memory.output_init = "zero"
    c.optim.learning_rate = 1e-2
    c.optim.warmup_ratio = 0.05
    c.train.steps = 1200
    c.train.batch_size = 32
    c.train.sparsity_weight = 0.0
    c.train.log_every = 50
    c.checkpoint.every = 200
    c.logging.tensorboard = True
    return c


def smollm2_demo_config() -> ml_collections.ConfigDict:
    """The real-backbone demo's δ-mem stage: frozen SmolLM2-135M-Instruct on 2 CPU cores.

    Chosen on the ``personal`` chat set's validation split (docs/demo.md); the demo
    sets model.hf_dir and data.train.
    """
    c = base_config()
    c.data.max_length = 64
    c.data.max_write_length = 512
    c.data.num_buckets = 3
    c.data.p_state_only = 0.0
    c.memory.output_init = "base_slice_fixed"
    c.optim.learning_rate = 3e-3
    c.optim.warmup_ratio = 0.05
    c.train.steps = 150
    c.train.batch_size = 8
    c.train.sparsity_weight = 0.0
    c.train.log_every = 10
    c.checkpoint.every = 150
    c.checkpoint.keep = 1
    return c
