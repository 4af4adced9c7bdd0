"""``evaluate(config, out_dir)``: what eval.py calls. Loads model + adapter, runs one task,
writes JSON + markdown + a bar chart, returns the results."""

from __future__ import annotations

import logging
import os

import ml_collections

from deltamem_jax.checkpoints.adapters import load_adapter
from deltamem_jax.checkpoints.hf import load_hf_model
from deltamem_jax.data import load_records
from deltamem_jax.data.tokenizer import load_tokenizer
from deltamem_jax.evaluation import locomo, locomo_eval, perplexity, recall
from deltamem_jax.evaluation.report import write_report
from deltamem_jax.models.functional import Runner

log = logging.getLogger("deltamem_jax.eval")
TASKS = ("recall", "locomo", "perplexity")
# the loss evaluator's names for the common settings
PPL_NAMES = {"no_memory": "without_memory", "delta_mem": "with_memory"}


def load(config: ml_collections.ConfigDict):
    """(Runner, tokenizer) for ``config.model``; clear errors for missing pieces."""
    m = config.model
    if not m.hf_dir:
        raise ValueError("config.model.hf_dir: a backbone directory is required")
    model = load_hf_model(m.hf_dir, dtype=m.dtype, scan_layers=bool(m.scan_layers))
    if m.adapter:
        load_adapter(model, m.adapter)
    return Runner(model), load_tokenizer(m.tokenizer or m.hf_dir)


def evaluate(config: ml_collections.ConfigDict, out_dir: str) -> dict:
    if config.task not in TASKS:
        raise ValueError(f"config.task: {config.task!r} is not one of {TASKS}")
    if not config.data.path:
        raise ValueError("config.data.path: no evaluation data given")
    if not os.path.exists(config.data.path):
        raise FileNotFoundError(f"config.data.path: {config.data.path!r} does not exist")
    runner, tokenizer = load(config)
    limit = config.data.limit or None
    common = dict(batch_size=config.batch_size, max_write_length=config.max_write_length)
    if config.task == "recall":
        records = load_records(config.data.path)[:limit]
        result = recall.evaluate_recall(
            runner, tokenizer, records, settings=config.settings,
            max_new_tokens=config.max_new_tokens, max_length=config.max_length,
            recent_messages=config.recent_messages,
            write_during_read=config.write_during_read, **common)
        rows, title = recall.to_report_rows(result), "Memory recall (exact match, token F1)"
    elif config.task == "locomo":
        convs = locomo.load_locomo(config.data.path, max_conversations=limit)
        lc = config.locomo
        result = locomo_eval.evaluate_locomo(
            runner, tokenizer, convs, settings=config.settings,
            max_new_tokens=config.max_new_tokens, max_questions=lc.max_questions or None,
            categories=tuple(lc.categories), recent_window_tokens=lc.recent_window_tokens,
            max_context_tokens=lc.max_context_tokens or None,
            write_during_read=config.write_during_read, **common)
        rows, title = locomo_eval.to_report_rows(result), "LoCoMo token F1 by category"
    else:
        records = load_records(config.data.path)[:limit]
        result = perplexity.evaluate_perplexity(
            runner, tokenizer, records, max_length=config.max_length,
            recent_messages=config.recent_messages,
            settings=tuple(PPL_NAMES.get(s, s) for s in config.settings), **common)
        rows, title = perplexity.to_report_rows(result), "Held-out reply loss"
    files = write_report(rows, out_dir, config.task, title=title,
                         meta={"config": config.to_dict()})
    log.info("%s -> %s", title, files["markdown"])
    return {"rows": rows, "result": result, "files": {k: str(v) for k, v in files.items()}}
