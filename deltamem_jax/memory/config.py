"""δ-mem settings: one frozen dataclass whose field names match the authors' config.

No JAX here: the names of methods and modes are plain data, so configs and
tools can validate settings without importing the numerical code.

Field names follow the authors' ``delta_mem_config.json`` so that their adapters
map one to one; fields of theirs that we do not model are listed in
:data:`ARCHIVED_FIELDS` (they must keep their defaults, as in the authors'
mainline, or loading fails with a clear error).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# The recurrence's update modes (SPEC §1) and how it may be computed (memory/osam.py).
UPDATE_MODES = ("standard", "lambda_outside", "no_lambda")
METHODS = ("auto", "sequential", "associative", "chunked", "pallas")
DELTA_HEADS = ("q", "k", "v", "o")
WRITE_GRANULARITIES = ("token", "message_mean", "sentence_mean")
OUTPUT_INITS = ("zero", "random", "base_slice", "base_slice_fixed")
DELTA_SCALE_GRANULARITIES = ("layer", "head")

# Fields of the authors' config that are archived in their mainline: any value but
# the default is rejected there, so it is rejected here too. (name -> default)
ARCHIVED_FIELDS: dict[str, Any] = {
    "num_memory_partitions": 1,
    "num_global_memory_partitions": 0,
    "memory_partition_routing": "soft",
    "memory_partition_basis": "shared",
    "tie_memory_partition_read_write": False,
    "memory_partition_read_mode": "softmax",
    "slot_read_top_k": 0,
    "global_memory_mode": "shared_rw",
    "global_memory_read_top_k": 0,
    "global_memory_merge_mode": "gated_residual",
    "memory_reader_layers": [],
    "memory_readout_mode": "delta",
    "memory_write_source": "learned_hidden",
    "memory_write_proposals_per_message": 2,
    "synthetic_memory_slots": 1,
    "latent_memory_layers": [],
}
# Fields the authors accept but never use in the forward pass (name -> their default).
IGNORED_FIELDS: dict[str, Any] = {
    "memory_partition_sigmoid_gate_bias_init": -2.0,
    "global_memory_gate_bias_init": -2.0,
    "global_memory_read_logit_bias": 0.0,
    "memory_reader_hidden_size": 1024,
    "memory_reader_residual_scale": 0.1,
    "memory_reader_read_only": True,
    "latent_memory_hidden_size": 1024,
    "latent_memory_residual_scale": 0.1,
    "latent_memory_slots": 4,
    "latent_memory_init_std": 0.002,
    "latent_gate_init": 0.01,
    "delta_scale_parameterization": "alpha_over_rank",
}
# Field order of the authors' JSON dump.
_AUTHORS_ORDER = (
    "rank",
    "alpha",
    "beta_bias_init",
    "normalize_qk",
    "couple_lambda",
    "state_update_mode",
    "rankwise_gates",
    "output_init",
    "base_slice_ref_width",
    "online_gain",
    "num_state_heads",
    "num_memory_partitions",
    "num_global_memory_partitions",
    "memory_partition_routing",
    "memory_partition_basis",
    "tie_memory_partition_read_write",
    "memory_partition_read_mode",
    "memory_partition_sigmoid_gate_bias_init",
    "slot_read_top_k",
    "global_memory_mode",
    "global_memory_read_top_k",
    "global_memory_merge_mode",
    "global_memory_gate_bias_init",
    "global_memory_read_logit_bias",
    "memory_reader_layers",
    "memory_reader_hidden_size",
    "memory_reader_residual_scale",
    "memory_reader_read_only",
    "memory_readout_mode",
    "memory_write_source",
    "memory_write_granularity",
    "memory_write_proposals_per_message",
    "synthetic_memory_slots",
    "latent_memory_layers",
    "latent_memory_hidden_size",
    "latent_memory_residual_scale",
    "latent_memory_slots",
    "latent_memory_init_std",
    "latent_gate_init",
    "target_modules",
    "target_layers",
    "delta_heads",
    "delta_o_rmsnorm",
    "delta_o_rmsnorm_eps",
    "trainable_delta_scale",
    "delta_scale_init",
    "delta_scale_max",
    "delta_scale_granularity",
    "delta_scale_parameterization",
)


@dataclasses.dataclass(frozen=True)
class DeltaMemConfig:
    """Every δ-mem setting (SPEC §1–§2).

    Defaults are the authors' config-class defaults (what their adapters assume
    for a missing field), except ``delta_heads`` = q,o (the paper's; their class
    default is q,k,v,o, which :meth:`from_authors_dict` restores for missing
    fields). Their *training recipe* differs in ``output_init="base_slice_fixed"``:
    ``deltamem_jax.training.settings.AUTHORS_TRAINING_MEMORY``.

    The implementation-only fields at the end (``scan_method``, ``chunk_size``,
    ``max_spans``) choose how the recurrence is computed, never what it computes.
    """

    rank: int = 8
    alpha: float = 16.0
    num_state_heads: int = 1
    rankwise_gates: bool = True
    couple_lambda: bool = True
    normalize_qk: bool = True
    state_update_mode: str = "standard"
    beta_bias_init: float = -1.5
    delta_heads: tuple[str, ...] = ("q", "o")
    memory_write_granularity: str = "token"
    output_init: str = "zero"
    base_slice_ref_width: int = 8
    online_gain: float = 0.05
    delta_o_rmsnorm: bool = False
    delta_o_rmsnorm_eps: float = 1e-6
    trainable_delta_scale: bool = False
    delta_scale_init: float = 1.0
    delta_scale_max: float = 2.0
    delta_scale_granularity: str = "layer"
    target_modules: tuple[str, ...] = ("self_attn",)
    target_layers: tuple[int, ...] = ()
    # How, not what:
    scan_method: str = "auto"
    chunk_size: int = 64
    max_spans: int | None = None

    def __post_init__(self):
        heads = self.delta_heads
        if isinstance(heads, str):
            heads = () if heads.strip().lower() in ("", "none") else heads.split(",")
        heads = tuple(dict.fromkeys(h.strip().lower() for h in heads))
        object.__setattr__(self, "delta_heads", heads)
        object.__setattr__(self, "target_layers", tuple(int(i) for i in self.target_layers))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        _check(all(h in DELTA_HEADS for h in heads),
               f"delta_heads {heads} may only contain {DELTA_HEADS}")
        _check(_is_int(self.rank) and self.rank >= 1,
               f"rank must be a positive int, got {self.rank!r}")
        _check(_is_int(self.num_state_heads) and self.num_state_heads >= 1,
               f"num_state_heads must be a positive int, got {self.num_state_heads!r}")
        _check(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}")
        _check(self.state_update_mode in UPDATE_MODES,
               f"state_update_mode {self.state_update_mode!r} is not one of {UPDATE_MODES}")
        _check(self.memory_write_granularity in WRITE_GRANULARITIES,
               f"memory_write_granularity {self.memory_write_granularity!r} is not one of "
               f"{WRITE_GRANULARITIES}")
        _check(self.output_init in OUTPUT_INITS,
               f"output_init {self.output_init!r} is not one of {OUTPUT_INITS}")
        _check(_is_int(self.base_slice_ref_width) and self.base_slice_ref_width >= 1,
               f"base_slice_ref_width must be a positive int, got {self.base_slice_ref_width!r}")
        _check(self.delta_o_rmsnorm_eps > 0, "delta_o_rmsnorm_eps must be > 0")
        _check(self.delta_scale_max > 0 and 0 < self.delta_scale_init < self.delta_scale_max,
               f"need 0 < delta_scale_init < delta_scale_max, got {self.delta_scale_init} "
               f"and {self.delta_scale_max}")
        _check(self.delta_scale_granularity in DELTA_SCALE_GRANULARITIES,
               f"delta_scale_granularity {self.delta_scale_granularity!r} is not one of "
               f"{DELTA_SCALE_GRANULARITIES}")
        _check(self.target_modules == ("self_attn",),
               f"target_modules {self.target_modules} is not supported; only ('self_attn',)")
        _check(self.scan_method in METHODS,
               f"scan_method {self.scan_method!r} is not one of {METHODS}")
        _check(_is_int(self.chunk_size) and self.chunk_size >= 1,
               f"chunk_size must be a positive int, got {self.chunk_size!r}")
        _check(self.max_spans is None or (_is_int(self.max_spans) and self.max_spans >= 1),
               f"max_spans must be None or a positive int, got {self.max_spans!r}")

    # Derived sizes -------------------------------------------------------
    @property
    def state_width(self) -> int:
        """R = H·r: width of the concatenated reads."""
        return self.num_state_heads * self.rank

    @property
    def gate_width(self) -> int:
        """g: one gate per state row (rank-wise) or one per state head."""
        return self.state_width if self.rankwise_gates else self.num_state_heads

    @property
    def scale(self) -> float:
        """c = alpha / rank (per-head rank, not H·rank)."""
        return self.alpha / self.rank

    @property
    def span_writes(self) -> bool:
        return self.memory_write_granularity != "token"

    def wraps_layer(self, index: int) -> bool:
        return not self.target_layers or index in self.target_layers

    # Authors' JSON -------------------------------------------------------
    @classmethod
    def from_authors_dict(cls, data: Mapping[str, Any], **overrides) -> DeltaMemConfig:
        """Build from the authors' ``delta_mem_config.json`` contents.

        Missing fields take the authors' defaults (note: their default
        ``delta_heads`` is q,k,v,o). Archived fields with non-default values and
        unknown fields raise ``ValueError``.
        """
        data = dict(data)
        for name, default in ARCHIVED_FIELDS.items():
            if name in data and _normalise(data.pop(name)) != _normalise(default):
                raise ValueError(
                    f"δ-mem config field {name!r} is archived in the authors' mainline and "
                    f"must keep its default {default!r}")
        for name in IGNORED_FIELDS:
            data.pop(name, None)
        own = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - own)
        if unknown:
            raise ValueError(f"unknown δ-mem config fields: {unknown}")
        data.setdefault("delta_heads", DELTA_HEADS)
        data.update(overrides)
        return cls(**data)

    def to_authors_dict(self) -> dict[str, Any]:
        """The authors' full config dump, in their field order (unused fields at defaults)."""
        values = {**ARCHIVED_FIELDS, **IGNORED_FIELDS,
                  **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}
        for key in ("delta_heads", "target_layers", "target_modules"):
            values[key] = list(values[key])
        return {key: values[key] for key in _AUTHORS_ORDER}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(cond: bool, message: str):
    if not cond:
        raise ValueError(f"DeltaMemConfig: {message}")


def _normalise(x):
    return list(x) if isinstance(x, (list, tuple)) else x
