"""Shared helpers of the evaluators: shape buckets, padding, memory writes, batched generation.

Few distinct shapes reach the compiler: sequence lengths are padded to powers of
two (at least :data:`MIN_BUCKET`, optionally capped), and every batch is filled
up to ``batch_size`` rows by repeating its first row (the extra rows are
dropped from the outputs). Prompts for generation are left-padded, so the last
prompt token sits in the last slot; write and scoring passes are right-padded.

Memory states have the model's layout ``[L_mem, B, H, r, r]`` (batch on axis 1).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltamem_jax.data.collate import MIN_BUCKET, power_of_two_bucket
from deltamem_jax.data.sentences import chat_sentence_ids
from deltamem_jax.data.tokenizer import Tokenizer
from deltamem_jax.inference.generation import SamplingConfig, generate
from deltamem_jax.models.cache import KVCache
from deltamem_jax.models.functional import Runner
from deltamem_jax.training.losses import causal_lm_loss

__all__ = [
    "SETTINGS",
    "MIN_BUCKET",
    "bucket",
    "fill_batch",
    "batches",
    "progress_bar",
    "pad_rows",
    "render_prompt",
    "WriteSegment",
    "write_segment",
    "chunk_segment",
    "has_memory",
    "span_granularity",
    "take_rows",
    "write_memory",
    "generate_texts",
    "nll_sums",
    "usable_examples",
]

#: The evaluation settings: history dropped / history written into δ-mem / history in the prompt.
SETTINGS = ("no_memory", "delta_mem", "full_context")


# --------------------------------------------------------------------------- shapes

#: The padded length of a row of ``n`` tokens (the one bucket rule: data/collate.py).
bucket = power_of_two_bucket


def fill_batch(rows: Sequence, batch_size: int) -> list:
    """``rows`` padded to ``batch_size`` items by repeating the first one."""
    if not rows:
        raise ValueError("fill_batch: no rows")
    if len(rows) > batch_size:
        raise ValueError(f"fill_batch: {len(rows)} rows exceed batch_size {batch_size}")
    return list(rows) + [rows[0]] * (batch_size - len(rows))


def batches(n: int, batch_size: int) -> Iterator[range]:
    """Consecutive index ranges of at most ``batch_size`` covering ``range(n)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    for s in range(0, n, batch_size):
        yield range(s, min(n, s + batch_size))


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar (a no-op one when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


def pad_rows(rows: Sequence[np.ndarray], length: int, pad_value: int,
             side: str) -> tuple[np.ndarray, np.ndarray]:
    """Pad 1-D int rows to ``[len(rows), length]``; returns (values, mask)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    out = np.full((len(rows), length), pad_value, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        n = len(r)
        if n > length:
            raise ValueError(f"row {i} has {n} tokens, more than {length}")
        if n == 0:
            continue
        sl = slice(length - n, length) if side == "left" else slice(0, n)
        out[i, sl] = r
        mask[i, sl] = True
    return out, mask


def render_prompt(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]],
                  max_length: int | None = None) -> np.ndarray:
    """Token ids of ``messages`` + the generation prompt, keeping the last ``max_length``."""
    ids = np.asarray(tokenizer.render_chat(list(messages), add_generation_prompt=True).ids,
                     np.int32)
    if max_length is not None and len(ids) > max_length:
        ids = ids[len(ids) - max_length:]
    if len(ids) == 0:
        raise ValueError("empty prompt")
    return ids


# --------------------------------------------------------------------------- records

def usable_examples(records, build: Callable[[int, dict], dict], what: str
                    ) -> tuple[list[dict], collections.Counter]:
    """``build(index, record)`` for every usable chat record (normalised to ``{"messages"}``:
    prompt/response records too); the rest counted per reason
    (bad record, episode that cannot be built, template not prefix-stable) with one warning."""
    import collections
    import logging

    from deltamem_jax.data.episodes import EpisodeError
    from deltamem_jax.data.records import normalise_record, record_problem
    from deltamem_jax.data.tokenizer import TemplateError

    skipped: collections.Counter = collections.Counter()
    out: list[dict] = []
    for index, rec in enumerate(records):
        problem = record_problem(rec)
        if problem is not None:
            skipped[problem] += 1
            continue
        try:
            out.append(build(index, normalise_record(rec)))
        except EpisodeError as e:
            skipped[e.reason] += 1
        except TemplateError:
            skipped["template_not_prefix_stable"] += 1
    if skipped:
        logging.getLogger(__name__).warning("%s: skipped %d record(s): %s", what,
                                            sum(skipped.values()), dict(skipped))
    return out, skipped


# --------------------------------------------------------------------------- writes

@dataclass(frozen=True, eq=False)
class WriteSegment:
    """Tokens to write into memory and their span ids (−1 = none)."""

    ids: np.ndarray
    message_ids: np.ndarray
    sentence_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def empty(cls) -> WriteSegment:
        e = np.zeros((0,), np.int32)
        return cls(e, e, e)


def write_segment(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]],
                  sentence_ids: bool = False) -> WriteSegment:
    """A whole conversation rendered for writing (no truncation), with message ids
    numbering the non-system messages 0, 1, … (as the episode write segment does)."""
    msgs = list(messages)
    if not msgs:
        return WriteSegment.empty()
    chat = tokenizer.render_chat(msgs)
    of_msg = np.full((len(msgs),), -1, np.int32)
    nonsys = [j for j, m in enumerate(msgs) if m["role"] != "system"]
    of_msg[nonsys] = np.arange(len(nonsys), dtype=np.int32)
    owner = chat.message_index
    message_ids = np.where(owner >= 0, of_msg[np.maximum(owner, 0)], -1).astype(np.int32)
    sent = (chat_sentence_ids(tokenizer, chat, msgs) if sentence_ids
            else np.full((len(chat),), -1, np.int32))
    return WriteSegment(np.asarray(chat.ids, np.int32), message_ids, sent.astype(np.int32))


def chunk_segment(segment: WriteSegment, max_chunk: int) -> list[WriteSegment]:
    """Split a segment into passes of at most ``max_chunk`` tokens.

    A run of equal message id (a message) that does not fit in the current
    pass but fits in an empty one starts a new pass; a longer run fills the
    current pass and continues in the next ones. A segment that fits is one chunk.
    """
    n = len(segment)
    if n == 0:
        return []
    if max_chunk < 1:
        raise ValueError(f"max_chunk must be ≥ 1, got {max_chunk}")
    if n <= max_chunk:
        return [segment]
    m = segment.message_ids
    starts = [0] + [i for i in range(1, n) if m[i] != m[i - 1]]
    cuts, lo = [], 0
    for s, e in zip(starts, starts[1:] + [n]):
        if e - lo <= max_chunk:
            continue
        if e - s <= max_chunk and s > lo:
            cuts.append((lo, s))
            lo = s
            continue
        while e - lo > max_chunk:
            cuts.append((lo, lo + max_chunk))
            lo += max_chunk
    cuts.append((lo, n))
    return [WriteSegment(segment.ids[a:b], segment.message_ids[a:b], segment.sentence_ids[a:b])
            for a, b in cuts if b > a]


def has_memory(runner: Runner) -> bool:
    return runner.memory_config is not None and len(runner.memory_layers) > 0


def span_granularity(runner: Runner) -> str | None:
    """``"message_mean"`` / ``"sentence_mean"`` if the model writes spans, else None."""
    if not has_memory(runner):
        return None
    g = runner.memory_config.memory_write_granularity
    return None if g == "token" else g


def take_rows(state: jax.Array | None, rows: Sequence[int]) -> jax.Array | None:
    """Rows (batch axis 1) of a memory state."""
    if state is None:
        return None
    return jnp.take(state, jnp.asarray(list(rows), jnp.int32), axis=1)


def write_memory(runner: Runner, segments: Sequence[WriteSegment], *, max_write_length: int,
                 batch_size: int = 1, carry_cache: bool = True, min_bucket: int = MIN_BUCKET,
                 on_batch: Callable[[int], None] | None = None) -> jax.Array:
    """The memory state after writing each segment from a fresh state: ``[L_mem, N, H, r, r]``.

    Segments longer than ``max_write_length`` are written in several passes (see
    :func:`chunk_segment`), the state carried between them. With ``carry_cache``
    the KV cache is carried too, so each pass attends to all earlier tokens: for
    token writes the result then equals one pass over the whole segment. Without
    it every pass is a fresh context (positions from 0; memory O(max_write_length)).
    Span ids are passed when the model writes spans. Empty segments leave the
    state at zero.
    """
    if not has_memory(runner):
        raise ValueError("write_memory: the model has no δ-mem attached")
    span = span_granularity(runner)
    out = []
    for idx in batches(len(segments), batch_size):
        rows = [chunk_segment(segments[i], max_write_length) for i in idx]
        n_real = len(rows)
        rows = fill_batch(rows, batch_size)
        mem = runner.init_memory_state(batch_size)
        steps = max(len(r) for r in rows)
        lengths = [bucket(max(len(r[k]) if k < len(r) else 0 for r in rows), cap=max_write_length,
                          minimum=min_bucket)
                   for k in range(steps)]
        cache = None
        if carry_cache and steps > 1:
            total = sum(lengths)
            cache = KVCache.init(runner.config, batch_size,
                                 -(-total // max_write_length) * max_write_length)
        for k in range(steps):
            chunk = [r[k] if k < len(r) else WriteSegment.empty() for r in rows]
            ids, mask = pad_rows([c.ids for c in chunk], lengths[k], 0, "right")
            msg = sent = None
            if span is not None:
                msg, _ = pad_rows([c.message_ids for c in chunk], lengths[k], -1, "right")
                if span == "sentence_mean":
                    sent, _ = pad_rows([c.sentence_ids for c in chunk], lengths[k], -1, "right")
            if cache is not None or mask.any():
                # with a cache every layer runs (the cache stays complete); logits never do
                fed = runner(jnp.asarray(ids), attention_mask=jnp.asarray(mask), memory_state=mem,
                             cache=cache, write=True, use_memory=True, compute_logits=False,
                             message_ids=None if msg is None else jnp.asarray(msg),
                             sentence_ids=None if sent is None else jnp.asarray(sent))
                mem, cache = fed.memory_state, fed.cache
        out.append(mem[:, :n_real])
        if on_batch is not None:
            on_batch(n_real)
    if not out:
        return runner.init_memory_state(0)
    return jnp.concatenate(out, axis=1)


# --------------------------------------------------------------------------- generation

def generate_texts(runner: Runner, tokenizer: Tokenizer, prompts: Sequence[np.ndarray], *,
                   batch_size: int, max_new_tokens: int, memory_state: jax.Array | None = None,
                   use_memory: bool = False, write: bool = False, length_cap: int | None = None,
                   min_bucket: int = MIN_BUCKET,
                   on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (1-D id arrays), decoded up to the stop ids, stripped.

    ``memory_state`` ``[L_mem, len(prompts), H, r, r]`` (or None = fresh zeros when
    ``use_memory``). Prompts are left-padded to :func:`bucket` lengths (at least
    ``min_bucket``) and batches filled to ``batch_size``, so the compiled shapes are few.
    """
    if memory_state is not None and memory_state.shape[1] != len(prompts):
        raise ValueError(f"memory_state holds {memory_state.shape[1]} rows "
                         f"for {len(prompts)} prompts")
    use_memory = bool(use_memory and has_memory(runner))
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    stops = tuple(int(s) for s in tokenizer.stop_ids)
    texts: list[str] = []
    for idx in batches(len(prompts), batch_size):
        rows = fill_batch([prompts[i] for i in idx], batch_size)
        length = bucket(max(len(r) for r in rows), cap=length_cap, minimum=min_bucket)
        ids, mask = pad_rows(rows, length, tokenizer.pad_id, "left")
        mem = None
        if use_memory:
            mem = (runner.init_memory_state(batch_size) if memory_state is None
                   else take_rows(memory_state, fill_batch(list(idx), batch_size)))
        gen = generate(runner, jnp.asarray(ids), prompt_mask=jnp.asarray(mask), memory_state=mem,
                       write=write, use_memory=use_memory, sampling=sampling, eos_ids=stops,
                       pad_id=tokenizer.pad_id)
        tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
        for j in range(len(idx)):
            texts.append(tokenizer.decode(tokens[j, : lengths[j]].tolist()).strip())
        if on_batch is not None:
            on_batch(len(idx))
    return texts


# --------------------------------------------------------------------------- scoring passes

@functools.partial(jax.jit, static_argnames=("graphdef", "use_memory"))
def _nll_sums(graphdef, state, ids, mask, labels, memory_state, *, use_memory):
    model = nnx.merge(graphdef, state)
    out = model(ids, attention_mask=mask, memory_state=memory_state, write=False,
                use_memory=use_memory)
    rows = [causal_lm_loss(out.logits[i:i + 1], labels[i:i + 1]) for i in range(ids.shape[0])]
    return (jnp.stack([m * c for m, c in rows]), jnp.stack([c for _, c in rows]))


def nll_sums(runner: Runner, ids: np.ndarray, mask: np.ndarray, labels: np.ndarray, *,
             memory_state: jax.Array | None = None, use_memory: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (summed next-token NLL over labelled targets, their count), from a
    read-only pass (HF shift, −100 ignored); logits never leave the device."""
    use_memory = bool(use_memory and has_memory(runner))
    if use_memory and memory_state is None:
        memory_state = runner.init_memory_state(ids.shape[0])
    s, c = _nll_sums(runner.graphdef, runner.state, jnp.asarray(ids), jnp.asarray(mask),
                     jnp.asarray(labels), memory_state if use_memory else None,
                     use_memory=use_memory)
    return np.asarray(s, np.float64), np.asarray(c, np.int64)
