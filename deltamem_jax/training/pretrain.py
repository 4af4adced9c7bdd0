"""Train a small backbone from scratch on chat records, everything in context.

The CPU demo's stage 1 (and a quick way to get a backbone for tests): next-token
loss over whole rendered conversations, with the final assistant reply weighted
up so that the model learns to answer from its context. No δ-mem here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deltamem_jax.data.tokenizer import Tokenizer
from deltamem_jax.models.config import DecoderConfig
from deltamem_jax.models.decoder import DecoderLM

log = logging.getLogger("deltamem_jax.pretrain")


def encode_conversations(tokenizer: Tokenizer, records: Sequence[dict], length: int,
                         reply_weight: float):
    """Token ids ``[N, length]`` (right-padded) and per-target loss weights.

    Weights (aligned with the shifted targets) are 1 on every real token and
    ``reply_weight`` on the final assistant message; conversations longer than
    ``length`` are skipped (counted in the returned number).
    """
    ids = np.full((len(records), length), tokenizer.pad_id, np.int32)
    weights = np.zeros((len(records), length), np.float32)
    kept = 0
    for rec in records:
        messages = rec["messages"]
        chat = tokenizer.render_chat(messages)
        if len(chat) > length:
            continue
        n = len(chat)
        ids[kept, :n] = chat.ids
        w = np.ones(n, np.float32)
        w[chat.message_index == len(messages) - 1] = reply_weight
        weights[kept, :n] = w
        kept += 1
    return ids[:kept], weights[:kept], len(records) - kept


def copy_sequences(rng: np.random.Generator, n: int, length: int, tokenizer: Tokenizer):
    """Random byte strings, each repeated to fill ``length`` (loss on the repeats).

    A dense copying signal: small models learn to look a pattern up in their context
    (induction) far sooner from these than from the few copied tokens of a chat.
    """
    ids = np.full((n, length), tokenizer.pad_id, np.int32)
    weights = np.zeros((n, length), np.float32)
    printable = np.asarray(tokenizer.encode("abcdefghijklmnopqrstuvwxyz0123456789 ABCDEFGHIJ"))
    for i in range(n):
        span = int(rng.integers(6, 24))
        piece = rng.choice(printable, size=span)
        reps = np.tile(piece, length // span + 1)[:length]
        ids[i] = reps
        weights[i, span:] = 1.0
    return ids, weights


def pretrain(config: DecoderConfig, tokenizer: Tokenizer, records: Sequence[dict], *,
             steps: int, batch_size: int, length: int, learning_rate: float = 3e-3,
             reply_weight: float = 4.0, copy_fraction: float = 0.0, copy_steps: int = 0,
             copy_length: int = 64, seed: int = 0, log_every: int = 50,
             on_log: Callable[[int, float, float], None] | None = None) -> DecoderLM:
    """A freshly initialised :class:`DecoderLM` trained for ``steps`` AdamW steps.

    The first ``copy_steps`` steps train on short :func:`copy_sequences` only (an
    induction warm-up: cheap, and a dense copying signal); afterwards
    ``copy_fraction`` of each batch are still copy sequences.
    """
    ids, weights, skipped = encode_conversations(tokenizer, records, length, reply_weight)
    if len(ids) < batch_size:
        raise ValueError(f"only {len(ids)} conversations fit in {length} tokens "
                         f"({skipped} longer ones skipped); need ≥ batch_size={batch_size}")
    if skipped:
        log.warning("pretrain: skipped %d conversations longer than %d tokens", skipped, length)
    model = DecoderLM(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 20), steps,
                                                  learning_rate * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = tx.init(params)

    def loss_fn(params, batch_ids, batch_w):
        logits = nnx.merge(graphdef, params)(batch_ids).logits
        logz = jax.nn.logsumexp(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(logits[:, :-1], batch_ids[:, 1:, None], -1)[..., 0]
        w = batch_w[:, 1:]
        return jnp.sum((logz - picked) * w) / jnp.sum(w)

    @jax.jit
    def step(params, opt_state, batch_ids, batch_w):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch_ids, batch_w)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    n_copy = int(round(copy_fraction * batch_size))
    start, last = time.perf_counter(), time.perf_counter()
    for i in range(1, steps + 1):
        if i <= copy_steps:
            c_ids, c_w = copy_sequences(rng, batch_size, copy_length, tokenizer)
            params, opt_state, loss = step(params, opt_state, c_ids, c_w)
            if i % log_every == 0:
                log.info("pretrain step %d/%d (copy warm-up) | loss %.4f", i, steps, float(loss))
            continue
        rows = rng.integers(0, len(ids), size=batch_size - n_copy)
        batch_ids, batch_w = ids[rows], weights[rows]
        if n_copy:
            c_ids, c_w = copy_sequences(rng, n_copy, length, tokenizer)
            batch_ids = np.concatenate([batch_ids, c_ids])
            batch_w = np.concatenate([batch_w, c_w * reply_weight / 4])
        params, opt_state, loss = step(params, opt_state, batch_ids, batch_w)
        if i % log_every == 0 or i == steps:
            loss = float(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"pretrain: non-finite loss at step {i}")
            now = time.perf_counter()
            rate = log_every * batch_size * length / max(now - last, 1e-9)
            last = now
            log.info("pretrain step %d/%d | loss %.4f | %.0f tok/s | %.0f s", i, steps, loss, rate,
                     now - start)
            if on_log is not None:
                on_log(i, loss, now - start)
    return nnx.merge(graphdef, params)
