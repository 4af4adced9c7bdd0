"""The evaluation config schema with defaults (``python eval.py --config=configs/eval_*.py``)."""

import ml_collections


def eval_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "recall"                # recall | locomo | perplexity
    c.model = ml_collections.ConfigDict(dict(
        hf_dir="",                   # backbone (Hugging Face layout)
        adapter="",                  # δ-mem adapter dir (authors' format); "" = none
        tokenizer="",                # "" = the model directory's; "byte" = built-in
        dtype="float32",
        scan_layers=False,
    ))
    c.data = ml_collections.ConfigDict(dict(
        path="",                     # chat jsonl (recall, perplexity) or LoCoMo json
        limit=0,                     # 0 = every record / conversation
    ))
    c.settings = ("no_memory", "delta_mem", "full_context")
    c.batch_size = 8
    c.max_new_tokens = 32
    c.max_write_length = 8192
    c.max_length = 512
    c.recent_messages = 1
    c.write_during_read = False
    c.locomo = ml_collections.ConfigDict(dict(
        max_questions=0,             # per conversation; 0 = all
        categories=(1, 2, 3, 4),
        recent_window_tokens=0,
        max_context_tokens=0,        # 0 = the model's max_position_embeddings
    ))
    return c
