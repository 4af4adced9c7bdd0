"""Answering a batch of rendered prompts the authors' way: memory fresh per prompt, writes
on during prefill *and* generation; optionally a shared token prefix prefilled once.

Three write paths, as in their release:

* memory off (the backbone alone);
* token writes (TSW / MSW, and SSW wherever no span ids are set): every prompt token and
  every fed-back generated token reads the state, then writes;
* message-mean span writes (SSW on single-prompt tasks): the whole user message is one
  span (id 0, template tokens included; the generation prompt −1), so the prefill reads
  the empty state and ends with one write of the message mean; each generated token is
  then its own one-token span, which equals a token write.

With ``share_prefix`` the longest common token prefix of the batch (token paths only) is
fed once from a fresh state and its cache and state are copied to every row: for token
writes this equals feeding each prompt whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from deltamem_jax.evaluation.decoding import Decoding, broadcast_rows, decode, prefill, row_keys
from deltamem_jax.evaluation.loading import EvalModel
from deltamem_jax.evaluation.prompts import bucket, pad_rows
from deltamem_jax.models.cache import KVCache

__all__ = ["MIN_SHARED_PREFIX", "Prompt", "answer_prompts", "common_prefix_length"]

#: shorter common prefixes are not worth a separate prefill
MIN_SHARED_PREFIX = 64


@dataclass(frozen=True, eq=False)
class Prompt:
    """Token ids of one chat-templated prompt; ``message_ids`` for the span-write path."""

    ids: np.ndarray
    message_ids: np.ndarray | None = None


def common_prefix_length(rows: Sequence[np.ndarray]) -> int:
    """Longest common prefix, kept shorter than the shortest row (every row keeps a suffix)."""
    n = min(len(r) for r in rows) - 1
    if n <= 0:
        return 0
    stack = np.stack([np.asarray(r[:n]) for r in rows])
    same = np.all(stack == stack[0], axis=0)
    return int(n if same.all() else np.argmin(same))


def _fill(rows: list, size: int) -> list:
    return rows + [rows[0]] * (size - len(rows))


def answer_prompts(em: EvalModel, prompts: Sequence[Prompt], seeds: Sequence[int], *,
                   memory: bool, decoding: Decoding, batch_size: int, span: bool = False,
                   share_prefix: bool = False, pass_length: int = 0,
                   initial_state=None, prefix: tuple[int, int] | None = None,
                   memo: dict | None = None) -> list[str]:
    """Decoded, stripped answers of ``prompts`` (at most ``batch_size``; filled to it).

    ``memory``: δ-mem on (fresh state per prompt, or ``initial_state`` ``[L, 1, H, r, r]``
    for every row); ``span``: the message-mean path (prompts carry ``message_ids``).
    ``prefix``: (length, suffix bucket) fixed by the caller for a whole group of prompts
    (every prompt must start with the same ``length`` tokens); ``memo`` then keeps the
    last prefilled prefix across calls.
    """
    n = len(prompts)
    if not 1 <= n <= batch_size:
        raise ValueError(f"answer_prompts: {n} prompts for batch_size {batch_size}")
    if memory and not em.has_memory:
        raise ValueError("a δ-mem setting needs a model with an adapter")
    rows = _fill(list(prompts), batch_size)
    keys = row_keys(_fill(list(seeds), batch_size))
    tok = em.tokenizer
    runner = em.runner if span else em.token_runner
    use_memory = bool(memory)
    B, new = batch_size, decoding.max_new_tokens
    ids = [np.asarray(p.ids, np.int32) for p in rows]

    def fresh_state(b):
        if not use_memory:
            return None
        if initial_state is not None:
            return jnp.repeat(initial_state, b, axis=1)
        return runner.init_memory_state(b)

    if prefix is not None and share_prefix and not span:
        P, Sb = prefix
    else:
        P = common_prefix_length(ids) if share_prefix and not span and n > 1 else 0
        Sb = bucket(max(len(r) - P for r in ids)) if P else 0
    if P >= MIN_SHARED_PREFIX:
        Pb = bucket(P)
        key = (P, Sb, use_memory, id(initial_state), hash(ids[0][:P].tobytes()))
        if memo is not None and memo.get("key") == key:
            cache, state = memo["cache"], memo["state"]
        else:
            cache = KVCache.init(em.config, 1, Pb + Sb + new)
            pre, pre_mask = pad_rows([ids[0][:P]], Pb, tok.pad_id, "right")
            _, cache, state = prefill(runner, pre, pre_mask, memory_state=fresh_state(1),
                                      cache=cache, write=True, use_memory=use_memory,
                                      pass_length=pass_length, need_logits=False)
            if memo is not None:
                memo.clear()
                memo.update(key=key, cache=cache, state=state)
        cache, state = broadcast_rows(cache, state, B, em.config.scan_layers)
        suf, suf_mask = pad_rows([r[P:] for r in ids], Sb, tok.pad_id, "left")
        logits, cache, state = prefill(runner, suf, suf_mask, memory_state=state, cache=cache,
                                       write=True, use_memory=use_memory)
    else:
        T = bucket(max(len(r) for r in ids))
        x, mask = pad_rows(ids, T, tok.pad_id, "left")
        msg = None
        if span:
            msg, _ = pad_rows([np.asarray(p.message_ids, np.int32) for p in rows], T, -1, "left")
        cache = KVCache.init(em.config, B, T + new)
        logits, cache, state = prefill(runner, x, mask, memory_state=fresh_state(B), cache=cache,
                                       write=True, use_memory=use_memory, message_ids=msg,
                                       pass_length=0 if span else pass_length)
    tokens, lengths = decode(em.token_runner, logits, cache, state, keys, decoding=decoding,
                             eos_ids=em.stop_ids, pad_id=tok.pad_id, write=True,
                             use_memory=use_memory)
    return [tok.decode(tokens[j, : lengths[j]].tolist()).strip() for j in range(n)]
