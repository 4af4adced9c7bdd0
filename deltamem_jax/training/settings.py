"""From an ml_collections config to typed settings, with every value checked up front.

A bad value fails here, naming the field, before any data is read or weight
allocated.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from deltamem_jax.data.episodes import EpisodeConfig
from deltamem_jax.memory.config import DeltaMemConfig
from deltamem_jax.models.config import DecoderConfig
from deltamem_jax.models.presets import PRESETS, preset

SCHEDULES = ("cosine", "linear", "constant")
AXIS_TYPES = ("auto",)


class ConfigError(ValueError):
    """A config value that cannot work, named by its dotted field."""


def _fail(field: str, message: str):
    raise ConfigError(f"config.{field}: {message}")


def _plain(value):
    if isinstance(value, ml_collections.ConfigDict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def memory_config(config: ml_collections.ConfigDict) -> DeltaMemConfig:
    values = _plain(config.memory)
    known = {f.name for f in dataclasses.fields(DeltaMemConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        _fail(f"memory.{unknown[0]}", f"unknown δ-mem field (known: {sorted(known)})")
    try:
        return DeltaMemConfig(**values)
    except (TypeError, ValueError) as e:
        _fail("memory", str(e))


def model_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
    m = config.model
    return dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=bool(m.remat),
                scan_layers=bool(m.scan_layers), attention_chunk_size=int(m.attention_chunk_size))


def decoder_config(config: ml_collections.ConfigDict) -> DecoderConfig:
    """The backbone's architecture: from hf_dir's config.json, a preset, or scratch."""
    m = config.model
    try:
        if m.hf_dir:
            if not os.path.isdir(m.hf_dir):
                _fail("model.hf_dir", f"{m.hf_dir!r} is not a directory")
            return DecoderConfig.from_pretrained(m.hf_dir, **model_overrides(config))
        if m.preset:
            if m.preset not in PRESETS:
                _fail("model.preset", f"{m.preset!r} is not one of {sorted(PRESETS)}")
            return preset(m.preset, **model_overrides(config))
        scratch = {k: v for k, v in _plain(m.scratch).items() if k != "seed"}
        return DecoderConfig(**scratch, **model_overrides(config),
                             qk_norm=scratch.get("model_type") == "qwen3")
    except ConfigError:
        raise
    except (TypeError, ValueError, FileNotFoundError) as e:
        _fail("model", str(e))


def episode_config(config: ml_collections.ConfigDict) -> EpisodeConfig:
    d = config.data
    try:
        return EpisodeConfig(max_length=d.max_length, max_write_length=d.max_write_length,
                             recent_messages=d.recent_messages, targets=d.targets,
                             sentence_ids=config.memory.memory_write_granularity == "sentence_mean")
    except (TypeError, ValueError) as e:
        _fail("data", str(e))


def validate(config: ml_collections.ConfigDict, *, need_data: bool = True) -> None:
    """Check every section; raise :class:`ConfigError` naming the first bad field."""
    memory_config(config)
    decoder_config(config)
    episode_config(config)
    d, o, t, mesh, ck = config.data, config.optim, config.train, config.mesh, config.checkpoint
    if need_data:
        if not d.train:
            _fail("data.train", "no training data given (a json/jsonl/parquet file)")
        if not config.model.hf_dir and config.model.preset:
            _fail("model.hf_dir", f"training needs weights; preset {config.model.preset!r} only "
                                  "has shapes (use it with --dry_run)")
        tok = d.tokenizer or config.model.hf_dir
        if not tok:
            _fail("data.tokenizer", "a from-scratch backbone needs data.tokenizer='byte' "
                                    "(or a tokenizer directory)")
    if d.num_buckets < 1:
        _fail("data.num_buckets", f"must be ≥ 1, got {d.num_buckets}")
    for name in ("p_state_only", "p_no_memory"):
        if not 0.0 <= d[name] <= 1.0:
            _fail(f"data.{name}", f"must be a probability, got {d[name]}")
    if d.p_state_only + d.p_no_memory > 1.0:
        _fail("data.p_state_only", "p_state_only + p_no_memory must be ≤ 1")
    if o.schedule not in SCHEDULES:
        _fail("optim.schedule", f"{o.schedule!r} is not one of {SCHEDULES}")
    if o.learning_rate <= 0:
        _fail("optim.learning_rate", f"must be > 0, got {o.learning_rate}")
    if not 0.0 <= o.warmup_ratio < 1.0:
        _fail("optim.warmup_ratio", f"must be in [0, 1), got {o.warmup_ratio}")
    if o.grad_clip < 0:
        _fail("optim.grad_clip", f"must be ≥ 0 (0 = off), got {o.grad_clip}")
    if t.steps < 1:
        _fail("train.steps", f"must be ≥ 1, got {t.steps}")
    if t.batch_size < 1 or t.grad_accum < 1 or t.batch_size % t.grad_accum:
        _fail("train.batch_size", f"must be a positive multiple of train.grad_accum "
                                  f"({t.grad_accum}), got {t.batch_size}")
    if t.log_every < 1:
        _fail("train.log_every", f"must be ≥ 1, got {t.log_every}")
    if t.sparsity_weight < 0:
        _fail("train.sparsity_weight", f"must be ≥ 0, got {t.sparsity_weight}")
    if len(mesh.axes) != len(mesh.shape):
        _fail("mesh.shape", f"{tuple(mesh.shape)} does not match mesh.axes {tuple(mesh.axes)}")
    if sum(1 for s in mesh.shape if s == -1) > 1 or any(s == 0 or s < -1 for s in mesh.shape):
        _fail("mesh.shape", f"sizes must be positive with at most one -1, got {tuple(mesh.shape)}")
    if mesh.axis_types not in AXIS_TYPES:
        _fail("mesh.axis_types", f"{mesh.axis_types!r} is not supported (supported: "
                                 f"{AXIS_TYPES}; explicit-sharding mode would need out_sharding "
                                 "on every ambiguous matmul)")
    for rule in mesh.rules:
        targets = (rule[1],) if isinstance(rule[1], str) else tuple(rule[1] or ())
        for axis in targets:
            if axis not in mesh.axes:
                _fail("mesh.rules", f"rule {tuple(rule)} names mesh axis {axis!r}, not in "
                                    f"{tuple(mesh.axes)}")
    if ck.every < 1 or ck.keep < 1:
        _fail("checkpoint.every", "checkpoint.every and checkpoint.keep must be ≥ 1")
