"""The evaluation config schema with its defaults (``python eval.py --config=configs/eval_*.py``).

Every field is typed by its default here; :func:`deltamem_jax.evaluation.settings.resolve`
turns a config into frozen typed settings and rejects unknown or ill-typed fields before any
work. Field names shared with training mean the same thing (``model.hf_dir``,
``model.dtype``, ``data.tokenizer``, ``data.max_length``, ...).
"""

from __future__ import annotations

import ml_collections


def eval_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # locomo | recall | perplexity | hotpotqa | gpqa | ifeval | memory_agent_bench
    c.task = "locomo"
    # "authors": the δ-mem release's protocol; "memory_only": history only in memory
    c.protocol = "authors"
    # () = the protocol's default settings; otherwise a subset of
    # no_memory | delta_mem | full_context | delta_mem_full_context
    c.settings = ()
    c.model = ml_collections.ConfigDict(dict(
        hf_dir="",                   # backbone (Hugging Face layout)
        adapter="",                  # δ-mem adapter dir (authors' format); "" = none
        dtype="float32",             # activations
        param_dtype="",              # backbone weights; "" = dtype
        scan_layers=False,
        attention_chunk_size=0,      # >0: attention block size (bounded memory)
        attention_impl="auto",       # auto | xla | blocked | cudnn | splash (models/attention)
    ))
    c.data = ml_collections.ConfigDict(dict(
        path="",                     # the benchmark's local file (or directory for MAB)
        tokenizer="",                # "" = the model directory's; "byte" = built-in
        chat_template_kwargs="auto",  # "auto" = per model family; or a JSON object
        limit=0,                     # 0 = all items (conversations / records / rows)
        max_length=512,              # memory_only: read segment (recent turns + reply)
        max_write_length=8192,       # memory_only: written history, oldest dropped
        recent_messages=1,           # memory_only: non-system messages visible
        write_pass_length=0,         # >0: long prefills/writes in passes of this many tokens
    ))
    c.decoding = ml_collections.ConfigDict(dict(
        mode="protocol",             # protocol (the task's own) | greedy | sample
        temperature=0.4,             # for mode="sample"
        top_k=10,
        top_p=0.9,
        max_new_tokens=0,            # 0 = the task's default
        seed=42,
    ))
    c.batch_size = 8
    c.write_during_read = False      # memory_only delta_mem: also write the read prompt
    c.print_prompt = ""              # "CONV:QA" (LoCoMo) or "ITEM": print the model input, exit
    c.progress = True
    c.resume = True                  # skip items already in WORKDIR/records/*.jsonl
    c.mesh = ml_collections.ConfigDict(dict(data=-1))  # devices on the data axis (-1 = all local)
    c.distributed = ml_collections.ConfigDict(dict(
        initialize=False, coordinator_address="", num_processes=1, process_id=0,
    ))
    c.locomo = ml_collections.ConfigDict(dict(
        categories=(1, 2, 3, 4),
        max_questions=0,             # per conversation; 0 = all
        answer_reserve_tokens=50,    # authors: budget = context window − this
        context_window=0,            # 0 = the model's max_position_embeddings
        recent_window_tokens=0,      # memory_only delta_mem: recent tail of the chat visible
        score_adversarial=False,
    ))
    c.ifeval = ml_collections.ConfigDict(dict(
        language_detector="authors",  # authors (their heuristic) | langdetect
        nltk="nltk",                 # nltk (needs punkt_tab data) | shim (authors' fallback)
    ))
    c.memory_agent_bench = ml_collections.ConfigDict(dict(
        splits=("Accurate_Retrieval", "Test_Time_Learning", "Long_Range_Understanding",
                "Conflict_Resolution"),
        max_context_chars=120000,
        default_max_new_tokens=4096,
        official_generation_lengths=True,
        context_window=0,            # 0 = the model's max_position_embeddings
    ))
    return c
