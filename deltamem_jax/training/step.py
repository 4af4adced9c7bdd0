"""The training episode (SPEC §3) as a loss, and one optimiser step over δ-mem only.

Fresh state → differentiable writing pass over the history → read-only pass over
the recent turns + reply → cross-entropy on the reply, plus the write-sparsity
penalty ``w · mean_layers (mean β − target)²``. Gradients reach the write pass
through the final state (the whole recurrence is differentiated). The
per-example view (context dropout) is in the batch: rows with no write segment
read a zero state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deltamem_jax.training.losses import IGNORE_INDEX, causal_lm_sums
from deltamem_jax.training.settings import TrainSettings
from deltamem_jax.training.state import TrainState

MODEL_KEYS = ("write_ids", "write_mask", "write_message_ids", "write_sentence_ids",
              "read_ids", "read_mask", "labels")



class LossConfig(NamedTuple):
    sparsity_weight: float
    sparsity_target: float
    span_writes: bool
    sentence_ids: bool
    # "write": β of the writing pass (the gates that actually write); "authors_read": the
    # authors' trainer, β computed by the read pass (which writes nothing), its mean over
    # the valid tokens and gates (= their plain mean: batch 1, no padding, no mask)
    sparsity_source: str = "write"

    @classmethod
    def of(cls, settings: TrainSettings) -> LossConfig:
        memory, t = settings.memory, settings.train
        return cls(float(t.sparsity_weight), float(t.sparsity_target), memory.span_writes,
                   memory.memory_write_granularity == "sentence_mean", t.sparsity_source)


def target_count(labels) -> jax.Array:
    """Supervised tokens of a batch (HF shift: labels[:, 1:])."""
    return jnp.sum(labels[..., 1:] != IGNORE_INDEX)


def episode_terms(model, batch, cfg: LossConfig):
    """Summed reply cross-entropy, its token count, and write statistics of one batch."""
    write = model(batch["write_ids"], attention_mask=batch["write_mask"], write=True,
                  message_ids=batch["write_message_ids"] if cfg.span_writes else None,
                  sentence_ids=batch["write_sentence_ids"] if cfg.sentence_ids else None,
                  compute_logits=False)
    read = model(batch["read_ids"], attention_mask=batch["read_mask"],
                 memory_state=write.memory_state, write=False)
    ce_sum, count, correct = causal_lm_sums(read.logits, batch["labels"])
    beta = read.beta_means if cfg.sparsity_source == "authors_read" else write.beta_means
    sparsity = jnp.mean(jnp.square(beta - cfg.sparsity_target))
    state_norm = jnp.mean(jnp.sqrt(jnp.sum(jnp.square(write.memory_state), axis=(-2, -1))))
    return ce_sum, count, sparsity, {"beta_mean": jnp.mean(beta),
                                                "state_norm": state_norm, "correct": correct}


def make_train_step(graphdef, tx, lr_schedule: Callable, cfg: LossConfig) -> Callable:
    """``step(state, frozen, batch) -> (state, metrics)``; batch leaves are
    ``[grad_accum, micro_batch, ...]``; the update is skipped if anything is non-finite."""

    def micro_loss(params, frozen, micro, total):
        model = nnx.merge(graphdef, params, frozen)
        ce_sum, n, sparsity, stats = episode_terms(model, micro, cfg)
        return ce_sum / total + cfg.sparsity_weight * sparsity, (ce_sum, n, sparsity, stats)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, frozen, batch):
        batch = {k: batch[k] for k in MODEL_KEYS}
        accum = batch["read_ids"].shape[0]
        total = jnp.maximum(target_count(batch["labels"]), 1).astype(jnp.float32)

        def body(carry, micro):
            grads, sums = carry
            (loss, (ce, n, sp, stats)), g = grad_fn(state.params, frozen, micro, total)
            grads = jax.tree.map(jnp.add, grads, g)
            sums = jax.tree.map(jnp.add, sums, {"loss": loss, "ce": ce, "tokens": n,
                                                "sparsity": sp / accum,
                                                **{k: v / accum if k != "correct" else v
                                                   for k, v in stats.items()}})
            return (grads, sums), None
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        sums0 = {k: jnp.zeros((), jnp.float32) for k in
                 ("loss", "ce", "sparsity", "beta_mean", "state_norm")}
        sums0.update(tokens=jnp.zeros((), jnp.int32), correct=jnp.zeros((), jnp.int32))
        (grads, sums), _ = jax.lax.scan(body, (zeros, sums0), batch)

        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
        new_state = TrainState(state.step + ok.astype(jnp.int32), keep(params, state.params),
                               keep(opt_state, state.opt_state), jax.random.fold_in(state.rng, 1))
        metrics = {
            "loss": sums["loss"],
            "ce": sums["ce"] / total,
            "sparsity": sums["sparsity"],
            "accuracy": sums["correct"] / total,
            "beta_mean": sums["beta_mean"],
            "state_norm": sums["state_norm"],
            "grad_norm": grad_norm,
            "learning_rate": lr_schedule(state.step),
            "finite": ok,
        }
        return new_state, metrics

    return step


def make_eval_step(graphdef, cfg: LossConfig) -> Callable:
    """``eval(params, frozen, batch) -> {"ce_sum", "tokens", "correct"}`` (one micro-batch)."""
    def evaluate(params, frozen, batch):
        model = nnx.merge(graphdef, params, frozen)
        ce_sum, n, _, stats = episode_terms(model, batch, cfg)
        return {"ce_sum": ce_sum, "tokens": n, "correct": stats["correct"]}
    return evaluate
