"""``train(settings, workdir)`` and ``dry_run(settings)``: what train.py calls.

Both take the typed :class:`~deltamem_jax.training.settings.TrainSettings`
(``settings.resolve(config)`` at the entry point), never a ConfigDict.

The loop: plan the model abstractly, load the frozen backbone into its
shardings, restore or initialise the δ-mem train state, then step through the
deterministic data stream, checkpointing every N steps and at the end, and
finally export the adapter in the authors' format.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from deltamem_jax.checkpoints.adapters import save_adapter
from deltamem_jax.data import EpisodeLoader, EpisodeSet, geometric_buckets, load_records
from deltamem_jax.data.tokenizer import load_tokenizer
from deltamem_jax.models.summary import format_counts, parameter_counts
from deltamem_jax.training.checkpointing import Checkpointer
from deltamem_jax.training.mesh import (
    batch_axes_size,
    batch_sharding,
    build_mesh,
    initialize_distributed,
    replicated,
)
from deltamem_jax.training.metrics import MetricsLogger
from deltamem_jax.training.settings import ConfigError, TrainSettings, resolve
from deltamem_jax.training.state import (
    TrainState,
    abstract_train_state,
    host_params,
    init_params,
    init_train_state,
    load_frozen,
    make_optimizer,
    plan_model,
    state_shardings_of,
    with_shardings,
)
from deltamem_jax.training.step import MODEL_KEYS, LossConfig, make_eval_step, make_train_step
from deltamem_jax.utils.atomic import atomic_write_json
from deltamem_jax.utils.sharding import logical_rules

log = logging.getLogger("deltamem_jax.train")


@dataclasses.dataclass
class Setup:
    """Everything a run needs, planned before any weight is allocated."""
    settings: TrainSettings
    mesh: jax.sharding.Mesh
    rules: tuple
    plan: object
    tx: object
    lr: object
    shardings: TrainState
    loss_cfg: LossConfig


def setup(settings: TrainSettings, *, need_data: bool = True, devices=None) -> Setup:
    """Check ``settings`` (again: cheap) and plan mesh, model, optimiser and shardings."""
    if not isinstance(settings, TrainSettings):
        raise TypeError(f"training takes TrainSettings, got {type(settings).__name__}; resolve "
                        "a config first: deltamem_jax.training.settings.resolve(config)")
    s = resolve(settings, need_data=need_data)
    mesh = build_mesh(s.mesh, devices)
    rules = s.mesh.rules
    dp = batch_axes_size(mesh, rules)
    if s.train.micro_batch % dp:
        raise ConfigError(
            f"config.train.batch_size: the micro-batch ({s.train.micro_batch} = batch_size / "
            f"grad_accum) must be divisible by the data-parallel size {dp} of mesh "
            f"{dict(mesh.shape)}")
    plan = plan_model(s.decoder(), s.memory, mesh, rules)
    tx, lr = make_optimizer(s.optim, s.train.steps)
    return Setup(s, mesh, rules, plan, tx, lr, state_shardings_of(plan, tx, mesh),
                 LossConfig.of(s))


def compile_step(s: Setup):
    batch_sh = {k: batch_sharding(s.mesh, s.rules, 3, leading=1) for k in MODEL_KEYS}
    step = make_train_step(s.plan.graphdef, s.tx, s.lr, s.loss_cfg)
    return jax.jit(step, in_shardings=(s.shardings, s.plan.frozen_shardings, batch_sh),
                   out_shardings=(s.shardings, replicated(s.mesh)), donate_argnums=0)


def global_batch(s: Setup, local: dict) -> dict:
    """Host-local rows ``[b, ...]`` → global ``[grad_accum, B / grad_accum, ...]`` arrays."""
    accum = s.settings.train.grad_accum
    out = {}
    for k in MODEL_KEYS:
        x = np.asarray(local[k], np.int32)
        x = x.reshape((accum, x.shape[0] // accum) + x.shape[1:])
        out[k] = jax.make_array_from_process_local_data(
            batch_sharding(s.mesh, s.rules, x.ndim, leading=1), x)
    return out


def make_loader(s: Setup, path: str, tokenizer, *, shuffle: bool = True, epochs=None):
    """The deterministic, resumable episode stream of ``path`` for this run."""
    c = s.settings
    episodes = EpisodeSet(tokenizer, load_records(path), c.episodes(), views=c.data.views)
    return EpisodeLoader(
        episodes, c.train.batch_size, seed=c.train.seed,
        write_buckets=geometric_buckets(c.data.max_write_length, c.data.num_buckets),
        read_buckets=geometric_buckets(c.data.max_length, c.data.num_buckets),
        p_state_only=c.data.p_state_only, p_no_memory=c.data.p_no_memory,
        process_index=jax.process_index(), process_count=jax.process_count(),
        shuffle=shuffle, epochs=epochs)


def run_tokenizer(settings: TrainSettings):
    """The run's tokenizer, with the backbone family's chat-template keywords."""
    kwargs = settings.template_kwargs()
    return load_tokenizer(settings.tokenizer_spec,
                          **({"template_kwargs": kwargs} if kwargs is not None else {}))


def train(settings: TrainSettings, workdir: str, *, devices=None) -> dict:
    """Train δ-mem on a frozen backbone; returns the final summary (also saved as JSON)."""
    if isinstance(settings, TrainSettings):
        initialize_distributed(settings.distributed)
    s = setup(settings, devices=devices)
    c = s.settings
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=c.checkpoint.every,
                        keep=c.checkpoint.keep)
    metrics_log = MetricsLogger(workdir, total_steps=c.train.steps, every=c.train.log_every,
                                tensorboard=c.logging.tensorboard)
    tokenizer = run_tokenizer(c)
    if tokenizer.vocab_size > s.plan.decoder.vocab_size:
        raise ConfigError(
            f"config.data.tokenizer: its vocabulary ({tokenizer.vocab_size}) is larger than the "
            f"model's ({s.plan.decoder.vocab_size})")
    with jax.set_mesh(s.mesh), logical_rules(s.rules):
        loader = make_loader(s, c.data.train, tokenizer)
        frozen = load_frozen(s.plan, c.model.hf_dir, c.model.scratch.seed)
        restored = None
        if c.checkpoint.resume:
            restored = ckpt.restore_latest(
                abstract_train_state(s.plan, s.tx, c.train.seed, s.shardings))
        if restored is not None:
            state, data_state, _ = restored
            loader.restore(data_state)
            log.info("resumed from step %d (%s)", int(state.step), ckpt.directory)
        else:
            params = init_params(s.plan, frozen, c.train.seed)
            state = init_train_state(s.plan, params, s.tx, c.train.seed, s.shardings)
        step_fn = compile_step(s)
        step = int(state.step)
        meta = {"config": c.to_dict()}
        if jax.process_index() == 0:
            counts = parameter_counts(s.plan.merge(s.plan.abstract_params, s.plan.abstract_frozen))
            log.info("%s", format_counts(counts))
        start = time.perf_counter()
        while step < c.train.steps:
            rows = loader.global_rows()
            local = next(loader)
            tokens = int(np.sum(local["write_mask"]) + np.sum(local["read_mask"])) * \
                jax.process_count()
            state, metrics = step_fn(state, frozen, global_batch(s, local))
            if not bool(metrics["finite"]):
                latest = ckpt.latest_step()
                ckpt.close()
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {step + 1}; the update was skipped and "
                    f"the run stopped. Last good checkpoint: "
                    f"{'none' if latest is None else f'step {latest}'} in {ckpt.directory}")
            step += 1
            metrics_log.log(step, metrics, tokens, {"batch_digest": batch_digest(rows)})
            ckpt.save(step, state, loader.state(), {"step": step, **meta})
            if c.train.stop_after and step >= c.train.stop_after and step < c.train.steps:
                log.info("stopping after step %d (train.stop_after)", step)
                ckpt.close()
                metrics_log.close()
                return {"stopped_at": step}
        ckpt.save(step, state, loader.state(), {"step": step, **meta}, force=True)
        ckpt.close()
        summary = {"steps": step, "seconds": time.perf_counter() - start,
                   "final": metrics_log.last}
        if c.data.validation:
            summary["validation"] = evaluate_loss(s, state.params, frozen, c.data.validation,
                                                  tokenizer)
        model = s.plan.merge(state.params, frozen)
        counts = parameter_counts(model)
        summary.update(backbone_params=counts["backbone"], memory_params=counts["memory"])
        if c.checkpoint.export_adapter:
            export_adapter(s, state.params, frozen, os.path.join(workdir, "adapter"))
    metrics_log.close()
    if jax.process_index() == 0:
        atomic_write_json(os.path.join(workdir, "summary.json"), summary, default=float)
        log.info("done: %s", json.dumps({k: v for k, v in summary.items() if k != "final"},
                                         default=float))
    return summary


def batch_digest(rows) -> int:
    """A short fingerprint of a global batch's example order (for logs and resume checks)."""
    rows = np.asarray(rows, np.int64)
    return int(np.sum((rows + 1) * (np.arange(rows.size) + 7919)) % 1_000_003)


def export_adapter(s: Setup, params, frozen, path: str) -> None:
    """Write the authors'-format adapter (process 0; parameters gathered to the host)."""
    host = host_params(params)
    if jax.process_index() != 0:
        return
    model = s.plan.merge(host, frozen)
    save_adapter(model, path)
    log.info("adapter -> %s", path)


def evaluate_loss(s: Setup, params, frozen, path: str, tokenizer) -> dict:
    """Mean reply cross-entropy and token accuracy on a held-out chat file (memory view)."""
    c = s.settings
    loader = make_loader(s, path, tokenizer, shuffle=False, epochs=1)
    evaluate = jax.jit(make_eval_step(s.plan.graphdef, s.loss_cfg))
    ce = tokens = correct = 0.0
    for local in loader:
        batch = global_batch(s, local)
        for i in range(c.train.grad_accum):
            out = evaluate(params, frozen, {k: v[i] for k, v in batch.items()})
            ce += float(out["ce_sum"])
            tokens += float(out["tokens"])
            correct += float(out["correct"])
    tokens = max(tokens, 1.0)
    return {"ce": ce / tokens, "accuracy": correct / tokens, "tokens": tokens}


def dry_run(settings: TrainSettings, *, devices=None) -> dict:
    """Lower and compile the train step for the configured mesh, with no real weights.

    Returns (and logs) backbone and δ-mem parameter counts and the per-device
    memory of the compiled step.
    """
    s = setup(settings, need_data=False, devices=devices)
    c = s.settings
    counts = parameter_counts(s.plan.merge(s.plan.abstract_params, s.plan.abstract_frozen))
    with jax.set_mesh(s.mesh), logical_rules(s.rules):
        state = abstract_train_state(s.plan, s.tx, c.train.seed, s.shardings)
        frozen = with_shardings(s.plan.abstract_frozen, s.plan.frozen_shardings)
        accum, micro = c.train.grad_accum, c.train.batch_size // c.train.grad_accum
        lengths = {"write": c.data.max_write_length, "read": c.data.max_length, "labels":
                   c.data.max_length}
        batch = {k: jax.ShapeDtypeStruct(
            (accum, micro, lengths[k.split("_")[0]] if k != "labels" else lengths["labels"]),
            jnp.int32, sharding=batch_sharding(s.mesh, s.rules, 3, leading=1)) for k in MODEL_KEYS}
        start = time.perf_counter()
        compiled = compile_step(s).lower(state, frozen, batch).compile()
        seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    gib = 1 << 30
    per_device = {
        "arguments_gib": mem.argument_size_in_bytes / gib,
        "outputs_gib": mem.output_size_in_bytes / gib,
        "temp_gib": mem.temp_size_in_bytes / gib,
        "total_gib": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                      + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / gib,
    }
    out = {**counts, "mesh": dict(s.mesh.shape), "devices": s.mesh.size,
           "per_device_memory": per_device, "compile_seconds": seconds}
    return out


def format_dry_run(result: dict) -> str:
    m = result["per_device_memory"]
    return "\n".join([
        format_counts(result),
        f"mesh: {result['mesh']} ({result['devices']} devices); compiled in "
        f"{result['compile_seconds']:.1f} s",
        f"per-device memory of the train step: {m['total_gib']:.2f} GiB "
        f"(arguments {m['arguments_gib']:.2f}, outputs {m['outputs_gib']:.2f}, "
        f"scratch {m['temp_gib']:.2f})",
    ])


