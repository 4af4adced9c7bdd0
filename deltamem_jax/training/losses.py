"""Losses shared by training, evaluation and the parity checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def causal_lm_loss(logits, labels, ignore_index: int = IGNORE_INDEX):
    """Hugging Face's causal-LM loss: logits[:, t] predict labels[:, t + 1].

    Returns ``(mean loss over counted targets, number of counted targets)``;
    targets equal to ``ignore_index`` are skipped. Computed in float32.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    counted = targets != ignore_index
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(counted, targets, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.where(counted, logz - picked, 0.0)
    count = jnp.sum(counted)
    return jnp.sum(nll) / jnp.maximum(count, 1), count
