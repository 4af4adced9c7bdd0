"""From an evaluation ConfigDict to one frozen, typed :class:`EvalSettings`, checked up front.

The ConfigDict stops at the entry point: :func:`resolve` compares it with the schema in
:mod:`deltamem_jax.evaluation.defaults` (unknown fields and wrong types fail, naming the
field), checks every value, and returns dataclasses that the evaluators take.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from deltamem_jax.evaluation.defaults import eval_config

TASKS = ("locomo", "recall", "perplexity", "hotpotqa", "gpqa", "ifeval", "memory_agent_bench")
PROTOCOLS = ("authors", "memory_only")
#: history dropped / only in memory / only in the prompt / in the prompt and written (authors' δ)
SETTINGS = ("no_memory", "delta_mem", "full_context", "delta_mem_full_context")
OLD_SETTING_NAMES = {"with_memory": "delta_mem", "without_memory": "no_memory"}
DECODING_MODES = ("protocol", "greedy", "sample")
DTYPES = ("float32", "bfloat16", "float16")

#: settings each (task, protocol) supports; the first tuple of each is its default
SUPPORTED: dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]] = {
    ("locomo", "authors"): (("full_context", "delta_mem_full_context"), SETTINGS),
    ("locomo", "memory_only"): (("no_memory", "delta_mem", "full_context"),
                                ("no_memory", "delta_mem", "full_context")),
    ("recall", "memory_only"): (("no_memory", "delta_mem", "full_context"),
                                ("no_memory", "delta_mem", "full_context")),
    ("perplexity", "memory_only"): (("delta_mem", "no_memory", "full_context"),
                                    ("no_memory", "delta_mem", "full_context")),
}
for _t in ("hotpotqa", "gpqa", "ifeval", "memory_agent_bench"):
    SUPPORTED[(_t, "authors")] = (("full_context", "delta_mem_full_context"),
                                  ("full_context", "delta_mem_full_context"))


class ConfigError(ValueError):
    """A config value that cannot work, named by its dotted field."""


def _fail(field: str, message: str):
    raise ConfigError(f"config.{field}: {message}")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    hf_dir: str
    adapter: str
    dtype: str
    param_dtype: str
    scan_layers: bool
    attention_chunk_size: int
    attention_impl: str = "auto"


@dataclasses.dataclass(frozen=True)
class DataSettings:
    path: str
    tokenizer: str
    chat_template_kwargs: dict | None   # None = per model family
    limit: int
    max_length: int
    max_write_length: int
    recent_messages: int
    write_pass_length: int


@dataclasses.dataclass(frozen=True)
class DecodingSettings:
    mode: str
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int
    seed: int


@dataclasses.dataclass(frozen=True)
class LocomoSettings:
    categories: tuple[int, ...]
    max_questions: int
    answer_reserve_tokens: int
    context_window: int
    recent_window_tokens: int
    score_adversarial: bool


@dataclasses.dataclass(frozen=True)
class IFEvalSettings:
    language_detector: str
    nltk: str


@dataclasses.dataclass(frozen=True)
class MABSettings:
    splits: tuple[str, ...]
    max_context_chars: int
    default_max_new_tokens: int
    official_generation_lengths: bool
    context_window: int


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    initialize: bool
    coordinator_address: str
    num_processes: int
    process_id: int


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    task: str
    protocol: str
    settings: tuple[str, ...]
    model: ModelSettings
    data: DataSettings
    decoding: DecodingSettings
    batch_size: int
    write_during_read: bool
    print_prompt: str
    progress: bool
    resume: bool
    mesh_data: int
    distributed: DistributedSettings
    locomo: LocomoSettings
    ifeval: IFEvalSettings
    memory_agent_bench: MABSettings

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- schema check

def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (tuple, list)):
        return "sequence"
    if isinstance(value, (dict, ml_collections.ConfigDict)):
        return "section"
    return type(value).__name__


def check_schema(config: Any, schema: ml_collections.ConfigDict, prefix: str = "") -> None:
    """Every field of ``config`` exists in ``schema`` with a compatible type."""
    keys = list(config.keys())
    for key in keys:
        name = f"{prefix}{key}"
        if key not in schema:
            _fail(name, f"unknown field (known here: {sorted(schema.keys())})")
        want, got = schema[key], config[key]
        wk, gk = _kind(want), _kind(got)
        if wk == "section":
            if gk != "section":
                _fail(name, f"must be a section, got {type(got).__name__}")
            check_schema(got, want, name + ".")
        elif wk != gk and not (wk == "float" and gk == "int"):
            _fail(name, f"must be {wk}, got {type(got).__name__} {got!r}")


# --------------------------------------------------------------------------- resolve

def _positive(field: str, value: int, zero_ok: bool = False):
    if value < 0 or (value == 0 and not zero_ok):
        _fail(field, f"must be {'≥ 0' if zero_ok else '> 0'}, got {value}")


def _settings_of(task: str, protocol: str, raw) -> tuple[str, ...]:
    names = tuple(str(s) for s in raw)
    for s in names:
        if s in OLD_SETTING_NAMES:
            _fail("settings", f"{s!r} was renamed: use {OLD_SETTING_NAMES[s]!r} (one vocabulary "
                              f"for every task: {SETTINGS})")
        if s not in SETTINGS:
            _fail("settings", f"{s!r} is not one of {SETTINGS}")
    if len(set(names)) != len(names):
        _fail("settings", f"repeated setting in {names}")
    if (task, protocol) not in SUPPORTED:
        have = sorted(p for t, p in SUPPORTED if t == task)
        _fail("protocol", f"task {task!r} has no {protocol!r} protocol (it has: {have})")
    default, allowed = SUPPORTED[(task, protocol)]
    if not names:
        return default
    bad = [s for s in names if s not in allowed]
    if bad:
        _fail("settings", f"{bad} not available for task {task!r} under protocol {protocol!r} "
                          f"(available: {allowed})")
    return names


def _template_kwargs(raw: str) -> dict | None:
    if raw == "auto":
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        _fail("data.chat_template_kwargs", f"must be 'auto' or a JSON object, got {raw!r} ({e})")
    if not isinstance(value, dict):
        _fail("data.chat_template_kwargs", f"must be a JSON object, got {raw!r}")
    return value


def resolve(config: ml_collections.ConfigDict, *, need_model: bool = True,
            need_data: bool | None = None) -> EvalSettings:
    """Check ``config`` against the schema and every value; return typed settings.

    ``need_model`` / ``need_data`` (default: as ``need_model``) False skip the checks that
    the model and data paths exist (validating a config file on its own).
    """
    need_data = need_model if need_data is None else need_data
    check_schema(config, eval_config())
    c = eval_config()
    c.update(config)                          # absent fields take their defaults
    if c.task not in TASKS:
        _fail("task", f"{c.task!r} is not one of {TASKS}")
    if c.protocol not in PROTOCOLS:
        _fail("protocol", f"{c.protocol!r} is not one of {PROTOCOLS}")
    settings = _settings_of(c.task, c.protocol, c.settings)
    m, d, dec = c.model, c.data, c.decoding
    if need_model:
        if not m.hf_dir:
            _fail("model.hf_dir", "a backbone directory is required")
        if not os.path.isdir(m.hf_dir):
            _fail("model.hf_dir", f"{m.hf_dir!r} is not a directory")
        if m.adapter and not os.path.isdir(m.adapter):
            _fail("model.adapter", f"{m.adapter!r} is not a directory")
        wants_memory = any(s.startswith("delta_mem") for s in settings)
        if wants_memory and not m.adapter:
            _fail("model.adapter", f"settings {settings} need a δ-mem adapter directory")
    for field, value in (("model.dtype", m.dtype), ("model.param_dtype", m.param_dtype or m.dtype)):
        if value not in DTYPES:
            _fail(field, f"{value!r} is not one of {DTYPES}")
    if need_data and not d.path:
        _fail("data.path", "no evaluation data given (the benchmark's local file)")
    if need_data and not os.path.exists(d.path):
        _fail("data.path", f"{d.path!r} does not exist")
    _positive("model.attention_chunk_size", m.attention_chunk_size, zero_ok=True)
    from deltamem_jax.models.config import ATTENTION_IMPLS
    if m.attention_impl not in ATTENTION_IMPLS:
        _fail("model.attention_impl", f"{m.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    _positive("data.limit", d.limit, zero_ok=True)
    _positive("data.max_length", d.max_length)
    _positive("data.max_write_length", d.max_write_length)
    _positive("data.recent_messages", d.recent_messages, zero_ok=True)
    _positive("data.write_pass_length", d.write_pass_length, zero_ok=True)
    if dec.mode not in DECODING_MODES:
        _fail("decoding.mode", f"{dec.mode!r} is not one of {DECODING_MODES}")
    if dec.temperature < 0:
        _fail("decoding.temperature", f"must be ≥ 0, got {dec.temperature}")
    _positive("decoding.top_k", dec.top_k, zero_ok=True)
    if not 0 < dec.top_p <= 1:
        _fail("decoding.top_p", f"must be in (0, 1], got {dec.top_p}")
    _positive("decoding.max_new_tokens", dec.max_new_tokens, zero_ok=True)
    _positive("batch_size", c.batch_size)
    if c.mesh.data == 0 or c.mesh.data < -1:
        _fail("mesh.data", f"must be -1 (all local devices) or a positive count, got {c.mesh.data}")
    lc = c.locomo
    cats = tuple(int(x) for x in lc.categories)
    if not cats or any(x not in (1, 2, 3, 4, 5) for x in cats):
        _fail("locomo.categories", f"must be a non-empty subset of 1..5, got {cats}")
    _positive("locomo.max_questions", lc.max_questions, zero_ok=True)
    _positive("locomo.answer_reserve_tokens", lc.answer_reserve_tokens, zero_ok=True)
    _positive("locomo.context_window", lc.context_window, zero_ok=True)
    _positive("locomo.recent_window_tokens", lc.recent_window_tokens, zero_ok=True)
    if c.ifeval.language_detector not in ("authors", "langdetect"):
        _fail("ifeval.language_detector", f"{c.ifeval.language_detector!r} is not 'authors' or "
                                          "'langdetect'")
    if c.ifeval.nltk not in ("nltk", "shim"):
        _fail("ifeval.nltk", f"{c.ifeval.nltk!r} is not 'nltk' or 'shim'")
    mab = c.memory_agent_bench
    from deltamem_jax.evaluation.mab import SPLITS
    bad = [s for s in mab.splits if s not in SPLITS]
    if bad or not mab.splits:
        _fail("memory_agent_bench.splits", f"{bad or '()'} not in {SPLITS}")
    _positive("memory_agent_bench.max_context_chars", mab.max_context_chars, zero_ok=True)
    _positive("memory_agent_bench.default_max_new_tokens", mab.default_max_new_tokens)
    _positive("memory_agent_bench.context_window", mab.context_window, zero_ok=True)
    dist = c.distributed
    if (dist.initialize and dist.coordinator_address
            and not 0 <= dist.process_id < dist.num_processes):
        _fail("distributed.process_id", f"{dist.process_id} not in [0, {dist.num_processes})")
    if c.print_prompt and c.task == "locomo" and ":" not in c.print_prompt:
        _fail("print_prompt", f"LoCoMo items are CONV:QA (sample id or conversation index, and "
                              f"question index), got {c.print_prompt!r}")
    return EvalSettings(
        task=c.task, protocol=c.protocol, settings=settings,
        model=ModelSettings(m.hf_dir, m.adapter, m.dtype, m.param_dtype or m.dtype,
                            bool(m.scan_layers), int(m.attention_chunk_size),
                            m.attention_impl),
        data=DataSettings(d.path, d.tokenizer, _template_kwargs(d.chat_template_kwargs),
                          int(d.limit), int(d.max_length), int(d.max_write_length),
                          int(d.recent_messages), int(d.write_pass_length)),
        decoding=DecodingSettings(dec.mode, float(dec.temperature), int(dec.top_k),
                                  float(dec.top_p), int(dec.max_new_tokens), int(dec.seed)),
        batch_size=int(c.batch_size), write_during_read=bool(c.write_during_read),
        print_prompt=str(c.print_prompt), progress=bool(c.progress), resume=bool(c.resume),
        mesh_data=int(c.mesh.data),
        distributed=DistributedSettings(bool(dist.initialize), dist.coordinator_address,
                                        int(dist.num_processes), int(dist.process_id)),
        locomo=LocomoSettings(cats, int(lc.max_questions), int(lc.answer_reserve_tokens),
                              int(lc.context_window), int(lc.recent_window_tokens),
                              bool(lc.score_adversarial)),
        ifeval=IFEvalSettings(c.ifeval.language_detector, c.ifeval.nltk),
        memory_agent_bench=MABSettings(tuple(mab.splits), int(mab.max_context_chars),
                                       int(mab.default_max_new_tokens),
                                       bool(mab.official_generation_lengths),
                                       int(mab.context_window)),
    )
