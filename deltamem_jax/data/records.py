"""Chat records: loading, validation and normalisation to messages.

Two record forms are accepted, as in the authors' trainer (``normalize_example``):

* ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``;
* ``{"prompt": str, "response": str}``: one user turn and the assistant's reply, read as
  ``[user: prompt, assistant: response]`` (no system message; other keys are ignored).
  ``messages`` wins when a record has both (a ``None`` or absent ``messages``, as in
  parquet files that mix both forms, counts as absent).

Every valid record is normalised to ``{"messages": [...]}`` (role and content only), so
everything downstream sees one form. Bad records are counted per reason and skipped, with
one warning per load; they never crash a run.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

from deltamem_jax.utils.files import FileFormatError, file_errors

__all__ = ["ROLES", "record_problem", "record_messages", "normalise_record", "clean_records",
           "load_records", "warn_skipped"]

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


def _raw_messages(record: dict) -> Any:
    """The record's messages as given: its ``messages``, or those of a prompt/response pair."""
    messages = record.get("messages")
    if messages is None and "prompt" in record and "response" in record:
        return [{"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["response"]}]
    return messages


def record_problem(record: Any) -> str | None:
    """Why ``record`` is unusable (a short reason), or None if it is fine."""
    if not isinstance(record, dict):
        return "not_a_mapping"
    messages = _raw_messages(record)
    if not isinstance(messages, (list, tuple)):
        return "missing_messages"
    if not messages:
        return "empty_conversation"
    for m in messages:
        if not isinstance(m, dict):
            return "message_not_a_mapping"
        role = m.get("role")
        if role is None:
            return "missing_role"
        if role not in ROLES:
            return "unknown_role"
        if not isinstance(m.get("content"), str):
            return "non_string_content"
    if not any(m["role"] == "assistant" for m in messages):
        return "no_assistant_message"
    return None


def record_messages(record: dict) -> list[dict]:
    """The messages (role and content only) of a record that :func:`record_problem` accepts."""
    return [{"role": m["role"], "content": m["content"]} for m in _raw_messages(record)]


def normalise_record(record: dict) -> dict:
    """``{"messages": [...]}`` of a record that :func:`record_problem` accepts."""
    return {"messages": record_messages(record)}


def warn_skipped(counts: collections.Counter, total: int, what: str) -> None:
    """Log ONE warning naming the skip counts (nothing if none were skipped)."""
    if counts:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        log.warning("%s: skipped %d item(s) out of %d records: %s", what, sum(counts.values()),
                    total, detail)


def clean_records(
    records: Iterable[Any], what: str = "records", warn: bool = True
) -> tuple[list[dict], collections.Counter]:
    """Keep valid records, normalised to role/content only; count the rest per reason."""
    kept: list[dict] = []
    counts: collections.Counter = collections.Counter()
    total = 0
    for r in records:
        total += 1
        problem = record_problem(r)
        if problem is not None:
            counts[problem] += 1
            continue
        kept.append(normalise_record(r))
    if warn:
        warn_skipped(counts, total, what)
    return kept, counts


def _read_json_file(path: str, counts: collections.Counter) -> list[Any]:
    # stdlib, not `datasets`: Arrow schema inference rejects mixed types, which
    # is exactly what a bad record looks like, and we must skip it, not crash.
    with file_errors(path, "chat records (UTF-8 JSON / JSON lines)"):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    stripped = text.lstrip()
    if path.endswith(".json") and stripped.startswith("["):
        try:
            return list(json.loads(text))
        except json.JSONDecodeError as e:
            raise FileFormatError(f"{path}: not valid JSON: {e}") from e
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            counts["invalid_json"] += 1
    return rows


def load_records(source: str | os.PathLike, split: str = "train") -> list[dict]:
    """Load and validate chat records.

    ``source``: a local ``.json`` (a list, or one object per line), ``.jsonl``
    or ``.parquet`` file, or a Hugging Face hub dataset name (needs a network;
    ``split`` picks the split). Returns only valid, normalised records.
    """
    src = os.fspath(source)
    pre: collections.Counter = collections.Counter()
    if os.path.isfile(src):
        if src.endswith((".json", ".jsonl")):
            rows = _read_json_file(src, pre)
        elif src.endswith(".parquet"):
            import datasets

            rows = list(datasets.load_dataset("parquet", data_files=src, split="train"))
        else:
            raise ValueError(f"load_records: unsupported file type {src!r} "
                             "(use .json, .jsonl or .parquet)")
    elif os.path.exists(src):
        raise ValueError(f"load_records: {src!r} is not a file")
    else:
        import datasets

        try:
            rows = list(datasets.load_dataset(src, split=split))
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise ValueError(f"load_records: {src!r} is not a local file and could not be "
                             f"loaded from the hub: {e}") from e
    kept, counts = clean_records(rows, warn=False)
    counts.update(pre)
    warn_skipped(counts, len(rows) + sum(pre.values()), f"load_records({src!r})")
    return kept
