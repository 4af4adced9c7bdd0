"""The causal-LM loss, written once, for training, evaluation and the parity checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deltamem_jax.data.episodes import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "causal_lm_sums", "causal_lm_loss"]


def causal_lm_sums(logits, labels, ignore_index: int = IGNORE_INDEX):
    """Hugging Face's shift: ``logits[:, t]`` predict ``labels[:, t + 1]``; in float32.

    Returns ``(summed NLL, number of counted targets, number predicted right by
    argmax)`` over every target not equal to ``ignore_index``.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    counted = targets != ignore_index
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(counted, targets, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.sum(jnp.where(counted, logz - picked, 0.0))
    correct = jnp.sum(counted & (jnp.argmax(logits, axis=-1) == targets))
    return nll, jnp.sum(counted), correct


def causal_lm_loss(logits, labels, ignore_index: int = IGNORE_INDEX):
    """``(mean NLL over counted targets, their count)`` (see :func:`causal_lm_sums`)."""
    nll, count, _ = causal_lm_sums(logits, labels, ignore_index)
    return nll / jnp.maximum(count, 1), count
