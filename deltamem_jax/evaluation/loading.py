"""The model, tokenizer, stop ids and context window an evaluation needs, loaded once.

:class:`EvalModel` holds two runners over the same weights: ``runner`` (the adapter's own
write granularity) and ``token_runner`` (token writes), because the authors' release falls
back to token writes wherever no span ids are set (LoCoMo, multi-question MemoryAgentBench
rows), even for message-mean (SSW) adapters.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import jax
from flax import nnx

from deltamem_jax.checkpoints.pretrained import load_pretrained
from deltamem_jax.data.tokenizer import Tokenizer, family_template_kwargs, load_tokenizer
from deltamem_jax.evaluation.settings import EvalSettings
from deltamem_jax.models.config import DecoderConfig
from deltamem_jax.models.decoder import DecoderLM
from deltamem_jax.models.functional import Runner
from deltamem_jax.utils.sharding import Rules, state_shardings

__all__ = ["EvalModel", "context_window", "load_eval_model", "stop_ids", "token_write_runner"]


@dataclass
class EvalModel:
    runner: Runner
    token_runner: Runner
    tokenizer: Tokenizer
    config: DecoderConfig
    stop_ids: tuple[int, ...]
    context_window: int
    template_kwargs: dict

    @property
    def has_memory(self) -> bool:
        return self.runner.memory_config is not None and len(self.runner.memory_layers) > 0

    @property
    def span_granularity(self) -> str | None:
        if not self.has_memory:
            return None
        g = self.runner.memory_config.memory_write_granularity
        return None if g == "token" else g


def stop_ids(model_dir: str, config: DecoderConfig, tokenizer: Tokenizer) -> tuple[int, ...]:
    """EOS ids of ``generation_config.json`` (else ``config.json``) ∪ the tokenizer's stop ids,
    as the authors' manual decode loop stops."""
    ids: set[int] = {int(i) for i in tokenizer.stop_ids}
    gen = os.path.join(model_dir, "generation_config.json")
    eos = None
    if os.path.isfile(gen):
        with open(gen) as f:
            eos = json.load(f).get("eos_token_id")
    if eos is None:
        eos = config.eos_token_id
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    return tuple(sorted(ids))


def context_window(config: DecoderConfig, tokenizer: Tokenizer, override: int = 0) -> int:
    """The authors' ``infer_model_context_window``: max_position_embeddings, else the
    tokenizer's model_max_length, else 32768 (``override`` > 0 wins)."""
    if override > 0:
        return override
    v = config.max_position_embeddings
    if isinstance(v, int) and 0 < v < 10**7:
        return v
    hf = getattr(tokenizer, "hf_tokenizer", None)
    v = getattr(hf, "model_max_length", None)
    if isinstance(v, int) and 0 < v < 10**7:
        return v
    return 32768


def token_write_runner(model: DecoderLM) -> Runner:
    """A Runner over ``model``'s weights that writes every token (the model is left as is)."""
    cfg = model.memory_config
    if cfg is None or cfg.memory_write_granularity == "token":
        return Runner(model)
    token_cfg = dataclasses.replace(cfg, memory_write_granularity="token")
    mods = [m for _, m in nnx.iter_graph(model)
            if type(m).__name__ == "DeltaMemory" and getattr(m, "config", None) == cfg]
    try:
        for m in mods:
            m.config = token_cfg
        model.memory_config = token_cfg
        return Runner(model)
    finally:
        for m in mods:
            m.config = cfg
        model.memory_config = cfg


def load_eval_model(s: EvalSettings, mesh: jax.sharding.Mesh | None = None,
                    rules: Rules | None = None) -> EvalModel:
    m = s.model
    kwargs = {"attention_impl": m.attention_impl}
    if m.attention_chunk_size:
        kwargs["attention_chunk_size"] = m.attention_chunk_size
    model = load_pretrained(m.hf_dir, m.adapter or None, dtype=m.dtype, param_dtype=m.param_dtype,
                            scan_layers=m.scan_layers, mesh=mesh, rules=rules, **kwargs)
    if mesh is not None:       # the adapter's weights too (load_adapter places them on one device)
        graphdef, state = nnx.split(model)
        state = jax.device_put(state, state_shardings(state, mesh, rules or ()))
        model = nnx.merge(graphdef, state)
    spec = s.data.tokenizer or m.hf_dir
    template = s.data.chat_template_kwargs
    if template is None:
        template = family_template_kwargs(model.config.model_type)
    is_byte = spec == "byte" or os.path.isfile(os.path.join(spec, "deltamem_tokenizer.json"))
    tokenizer = load_tokenizer(spec) if is_byte else load_tokenizer(spec, template_kwargs=template)
    window = context_window(model.config, tokenizer,
                            s.locomo.context_window if s.task == "locomo"
                            else s.memory_agent_bench.context_window)
    return EvalModel(Runner(model), token_write_runner(model), tokenizer, model.config,
                     stop_ids(m.hf_dir, model.config, tokenizer), window,
                     {} if is_byte else dict(template))
