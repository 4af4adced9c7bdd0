"""Training settings: one frozen, typed tree, resolved once from the config.

The dataclasses below *are* the schema: ``training/defaults.py`` builds the
ConfigDict that config files edit from them, and :func:`resolve` turns the
edited ConfigDict back into a :class:`TrainSettings`, checking every field
(unknown or ill-typed fields, impossible values, cross-field rules) before any
data is read or weight allocated. Below ``train.py`` only this object travels.

Which defaults are the authors' recipe: the ``memory`` section is
:data:`AUTHORS_TRAINING_MEMORY` (their training scripts: rank 8, α 16, q/o heads,
rank-wise coupled gates, ``base_slice_fixed`` init), the optimiser and data
sections follow their Qwen3-4B script (lr 2e-4 cosine, 10 % warm-up, no weight
decay, read 512 / write 8,192 tokens, one recent message, context dropout
p(state only) = 0.2, write sparsity 0.01 toward 0.05). ``train.steps`` and
``train.batch_size`` are small CPU-friendly values, not theirs (see
``configs/qwen3_4b.py`` for the full recipe).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from deltamem_jax.data.episodes import LONG_REPLIES, EpisodeConfig
from deltamem_jax.memory.config import DeltaMemConfig
from deltamem_jax.models.config import DecoderConfig
from deltamem_jax.models.presets import PRESETS, preset
from deltamem_jax.utils.configs import ConfigError, fail, from_config, plain

__all__ = ["ConfigError", "AUTHORS_TRAINING_MEMORY", "ScratchModel", "ModelSettings",
           "DataSettings", "OptimSettings", "LoopSettings", "MeshSettings",
           "CheckpointSettings", "LoggingSettings", "DistributedSettings", "TrainSettings",
           "resolve"]

SCHEDULES = ("cosine", "linear", "constant")
SPARSITY_SOURCES = ("write", "authors_read")
AXIS_TYPES = ("auto",)

#: The δ-mem settings of the authors' training scripts: their config-class defaults
#: (= :class:`DeltaMemConfig`'s) with the Δ heads initialised from the backbone.
AUTHORS_TRAINING_MEMORY = DeltaMemConfig(output_init="base_slice_fixed")


@dataclasses.dataclass(frozen=True)
class ScratchModel:
    """A from-scratch backbone (used when neither ``hf_dir`` nor ``preset`` is set)."""

    model_type: str = "llama"
    vocab_size: int = 264
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    seed: int = 0                      # seed of the random backbone weights


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """The frozen backbone and how to run it."""

    hf_dir: str = ""                   # a local HF checkpoint directory or a .gguf file
    preset: str = ""                   # an architecture preset (shapes only: dry runs)
    scratch: ScratchModel = ScratchModel()
    dtype: str = "float32"             # activations; "bfloat16" on TPU/GPU
    param_dtype: str = "float32"       # backbone weights
    remat: bool = False                # rematerialise each layer in the backward pass
    scan_layers: bool = False          # one scanned layer body: fast compiles for deep models
    attention_chunk_size: int = 0      # >0: attention block size (bounded memory)
    attention_impl: str = "auto"       # auto | xla | blocked | cudnn | splash (models/attention)

    def runtime(self) -> dict[str, Any]:
        """The run-time :class:`DecoderConfig` fields these settings fix."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat,
                    scan_layers=self.scan_layers, attention_chunk_size=self.attention_chunk_size,
                    attention_impl=self.attention_impl)

    def decoder(self) -> DecoderConfig:
        """The backbone's architecture: from ``hf_dir``, a preset, or the scratch section."""
        try:
            if self.hf_dir:
                if not os.path.exists(self.hf_dir):
                    fail("model.hf_dir", f"{self.hf_dir!r} does not exist")
                from deltamem_jax.checkpoints.hf import load_config
                return load_config(self.hf_dir, **self.runtime())
            if self.preset:
                if self.preset not in PRESETS:
                    fail("model.preset", f"{self.preset!r} is not one of {sorted(PRESETS)}")
                return preset(self.preset, **self.runtime())
            s = dataclasses.asdict(self.scratch)
            s.pop("seed")
            return DecoderConfig(**s, **self.runtime(), qk_norm=s["model_type"] == "qwen3")
        except ConfigError:
            raise
        except (TypeError, ValueError, FileNotFoundError) as e:
            fail("model", str(e))


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Conversations (``{"messages": [...]}`` or ``{"prompt", "response"}`` records) from
    local json/jsonl/parquet."""

    train: str = ""                    # file path (or a hub dataset name, with a network)
    validation: str = ""
    tokenizer: str = ""                # "" = the model directory's; "byte" = built-in byte level
    chat_template_kwargs: str = "auto"  # "auto" = per model family (thinking off); or JSON
    max_length: int = 512              # read segment: recent turns + reply, tail kept
    long_replies: str = "truncate_left"  # reply > max_length: keep its tail (authors) | "skip"
    max_write_length: int = 8192       # write segment: earlier history, oldest dropped
    recent_messages: int = 1           # non-system messages visible in the read segment
    targets: str = "final"             # supervise the final assistant reply, or "all"
    num_buckets: int = 4               # padded lengths per segment (few static shapes)
    p_state_only: float = 0.2          # context dropout: views drawn per example
    p_no_memory: float = 0.0

    def __post_init__(self):
        if self.num_buckets < 1:
            fail("data.num_buckets", f"must be ≥ 1, got {self.num_buckets}")
        if self.long_replies not in LONG_REPLIES:
            fail("data.long_replies", f"{self.long_replies!r} is not one of {LONG_REPLIES}")
        for name in ("p_state_only", "p_no_memory"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(f"data.{name}", f"must be a probability, got {getattr(self, name)}")
        if self.p_state_only + self.p_no_memory > 1.0:
            fail("data.p_state_only", "p_state_only + p_no_memory must be ≤ 1")
        if self.chat_template_kwargs != "auto":
            try:
                value = json.loads(self.chat_template_kwargs)
            except json.JSONDecodeError as e:
                fail("data.chat_template_kwargs", f"not 'auto' or JSON: {e}")
            if not isinstance(value, dict):
                fail("data.chat_template_kwargs", f"not a JSON object: "
                                                  f"{self.chat_template_kwargs!r}")

    @property
    def views(self) -> tuple[str, ...]:
        """The context-dropout views drawn in training."""
        return (("memory",) + (("state_only",) if self.p_state_only > 0 else ())
                + (("no_memory",) if self.p_no_memory > 0 else ()))


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """AdamW over δ-mem parameters, warm-up then a schedule, global-norm clipping."""

    learning_rate: float = 2e-4
    schedule: str = "cosine"           # cosine | linear | constant
    warmup_ratio: float = 0.1
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0             # 0 = off

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            fail("optim.schedule", f"{self.schedule!r} is not one of {SCHEDULES}")
        if self.learning_rate <= 0:
            fail("optim.learning_rate", f"must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            fail("optim.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.grad_clip < 0:
            fail("optim.grad_clip", f"must be ≥ 0 (0 = off), got {self.grad_clip}")


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """Steps, batch and the loss weights."""

    steps: int = 100
    batch_size: int = 8                # episodes per optimiser step, over all hosts
    grad_accum: int = 1                # micro-batches per step
    seed: int = 42
    sparsity_weight: float = 0.01      # write sparsity: w · mean_layers (mean β − target)²
    sparsity_target: float = 0.05
    sparsity_source: str = "write"     # "write" (ours) | "authors_read" (β of the read pass)
    log_every: int = 10
    stop_after: int = 0                # >0: stop after this many steps (tests a preempted run)

    def __post_init__(self):
        if self.steps < 1:
            fail("train.steps", f"must be ≥ 1, got {self.steps}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            fail("train.batch_size", f"must be a positive multiple of train.grad_accum "
                                     f"({self.grad_accum}), got {self.batch_size}")
        if self.log_every < 1:
            fail("train.log_every", f"must be ≥ 1, got {self.log_every}")
        if self.sparsity_weight < 0:
            fail("train.sparsity_weight", f"must be ≥ 0, got {self.sparsity_weight}")
        if self.sparsity_source not in SPARSITY_SOURCES:
            fail("train.sparsity_source", f"{self.sparsity_source!r} is not one of "
                                          f"{SPARSITY_SOURCES}")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """Mesh axes and sizes (one -1 fills the remaining devices) and logical-axis rules."""

    axes: tuple[str, ...] = ("data", "fsdp", "tensor")
    shape: tuple[int, ...] = (-1, 1, 1)
    axis_types: str = "auto"           # passed explicitly: the compiler propagates shardings
    # logical axis -> mesh axes; δ-mem parameters stay replicated (memory_*: no rule)
    rules: tuple[tuple[str, Any], ...] = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("vocab", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
    )

    def __post_init__(self):
        if len(self.axes) != len(self.shape):
            fail("mesh.shape", f"{self.shape} does not match mesh.axes {self.axes}")
        if sum(1 for s in self.shape if s == -1) > 1 or any(s == 0 or s < -1 for s in self.shape):
            fail("mesh.shape", f"sizes must be positive with at most one -1, got {self.shape}")
        if self.axis_types not in AXIS_TYPES:
            fail("mesh.axis_types", f"{self.axis_types!r} is not supported (supported: "
                                    f"{AXIS_TYPES}; explicit-sharding mode would need "
                                    "out_sharding on every ambiguous matmul)")
        rules = []
        for rule in self.rules:
            if len(rule) != 2 or not isinstance(rule[0], str):
                fail("mesh.rules", f"each rule is (logical name, mesh axes), got {rule!r}")
            target = rule[1]
            target = tuple(target) if isinstance(target, (list, tuple)) else target
            for axis in (target,) if isinstance(target, str) else tuple(target or ()):
                if axis not in self.axes:
                    fail("mesh.rules", f"rule {tuple(rule)} names mesh axis {axis!r}, not in "
                                       f"{self.axes}")
            rules.append((rule[0], target))
        object.__setattr__(self, "rules", tuple(rules))


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    every: int = 100
    keep: int = 3
    resume: bool = True
    export_adapter: bool = True

    def __post_init__(self):
        if self.every < 1 or self.keep < 1:
            fail("checkpoint.every", "checkpoint.every and checkpoint.keep must be ≥ 1")


@dataclasses.dataclass(frozen=True)
class LoggingSettings:
    tensorboard: bool = True


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """Multi-host start-up (or rely on TPU/SLURM auto-detection with ``initialize``)."""

    initialize: bool = False
    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Everything a training run is told, resolved and checked."""

    model: ModelSettings = ModelSettings()
    memory: DeltaMemConfig = AUTHORS_TRAINING_MEMORY
    data: DataSettings = DataSettings()
    optim: OptimSettings = OptimSettings()
    train: LoopSettings = LoopSettings()
    mesh: MeshSettings = MeshSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    logging: LoggingSettings = LoggingSettings()
    distributed: DistributedSettings = DistributedSettings()

    def decoder(self) -> DecoderConfig:
        return self.model.decoder()

    def episodes(self) -> EpisodeConfig:
        d = self.data
        try:
            return EpisodeConfig(max_length=d.max_length, max_write_length=d.max_write_length,
                                 recent_messages=d.recent_messages, targets=d.targets,
                                 long_replies=d.long_replies,
                                 sentence_ids=self.memory.memory_write_granularity
                                 == "sentence_mean")
        except (TypeError, ValueError) as e:
            fail("data", str(e))

    @property
    def tokenizer_spec(self) -> str:
        """What :func:`~deltamem_jax.data.tokenizer.load_tokenizer` is given."""
        return self.data.tokenizer or self.model.hf_dir

    def template_kwargs(self) -> dict[str, Any] | None:
        """Chat-template keywords for the tokenizer (None for the byte-level one): "auto" =
        the backbone family's, as in evaluation (thinking off for Qwen3 / SmolLM3)."""
        from deltamem_jax.data.tokenizer import BYTE_TOKENIZER_MARKER, family_template_kwargs
        spec = self.tokenizer_spec
        if spec == "byte" or os.path.isfile(os.path.join(spec, BYTE_TOKENIZER_MARKER)):
            return None
        if self.data.chat_template_kwargs != "auto":
            return json.loads(self.data.chat_template_kwargs)
        return family_template_kwargs(self.decoder().model_type)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (for run metadata)."""
        return plain(dataclasses.asdict(self))


def resolve(config: ml_collections.ConfigDict | TrainSettings, *,
            need_data: bool = True) -> TrainSettings:
    """The typed settings of ``config``; :class:`ConfigError` names the first bad field.

    ``need_data=False`` (dry runs) skips the checks that need data and weights.
    A :class:`TrainSettings` passes through (checked again).
    """
    if isinstance(config, TrainSettings):
        s = config
    else:
        s = from_config(TrainSettings, config)
    s.decoder()
    s.episodes()
    if need_data:
        if not s.data.train:
            fail("data.train", "no training data given (a json/jsonl/parquet file)")
        if not s.model.hf_dir and s.model.preset:
            fail("model.hf_dir", f"training needs weights; preset {s.model.preset!r} only has "
                                 "shapes (use it with --dry_run)")
        if not s.tokenizer_spec:
            fail("data.tokenizer", "a from-scratch backbone needs data.tokenizer='byte' "
                                   "(or a tokenizer directory)")
    return s
