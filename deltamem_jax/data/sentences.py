"""Sentence chunks and sentence ids (for ``sentence_mean`` writes, SPEC §2).

A boundary is either a run of ≥2 newlines, or whitespace after one of
``. ! ? ; :`` (optionally followed by closing quotes/brackets). Chunks are cut
where the boundary's whitespace starts, so it leads the next chunk. Sentence
ids count up globally across the messages of one segment; template tokens and
system messages get −1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from deltamem_jax.data.tokenizer import ChatTokens, Tokenizer

__all__ = ["split_sentences", "content_sentence_ids", "chat_sentence_ids"]

_BOUNDARY = re.compile(r"[.!?;:][\"'\)\]\u201d\u2019]*(?P<ws>\s+)|(?P<nl>\n{2,})")


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentence chunks whose concatenation is ``text``."""
    cuts = []
    for m in _BOUNDARY.finditer(text):
        cut = m.start("ws") if m.group("ws") is not None else m.start("nl")
        if 0 < cut < len(text) and (not cuts or cut > cuts[-1]):
            cuts.append(cut)
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def content_sentence_ids(tokenizer: Tokenizer, content: str,
                         first_id: int) -> tuple[np.ndarray, int]:
    """Sentence ids of ``tokenizer.encode(content)`` and the next free id.

    If tokenizing the chunks one by one does not reproduce the whole content's
    tokens, the whole content is one sentence.
    """
    whole = tokenizer.encode(content)
    if not whole:
        return np.zeros((0,), np.int32), first_id
    pieces = [tokenizer.encode(c) for c in split_sentences(content)]
    pieces = [p for p in pieces if p]
    if [t for p in pieces for t in p] != whole:
        return np.full((len(whole),), first_id, np.int32), first_id + 1
    ids = np.concatenate([np.full((len(p),), first_id + j, np.int32) for j, p in enumerate(pieces)])
    return ids, first_id + len(pieces)


def chat_sentence_ids(
    tokenizer: Tokenizer, chat: ChatTokens, messages: Sequence[dict], first_id: int = 0
) -> np.ndarray:
    """Per-token sentence ids of a rendered chat (−1 off content and on system messages)."""
    out = np.full((len(chat),), -1, np.int32)
    next_id = first_id
    for m, span in zip(messages, chat.content_spans):
        if m["role"] == "system" or span is None:
            continue
        ids, after = content_sentence_ids(tokenizer, m["content"], next_id)
        lo, hi = span
        if hi - lo != len(ids):  # content span and content tokens disagree: leave −1
            continue
        out[lo:hi] = ids
        next_id = after
    return out
