"""Builders shared by the tests: tiny models (scanned and unscanned layers), tiny checkpoints
on disk, tiny chat datasets. Import as ``from helpers import ...`` (tests/ is on sys.path)."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltamem_jax.checkpoints.adapters import save_adapter
from deltamem_jax.checkpoints.hf import save_hf_model
from deltamem_jax.data.synthetic import SyntheticConfig, generate_split
from deltamem_jax.data.tokenizer import save_byte_tokenizer_marker
from deltamem_jax.memory.config import DeltaMemConfig
from deltamem_jax.models.config import DecoderConfig
from deltamem_jax.models.decoder import DecoderLM

#: A 2-layer Qwen3-style model over the byte tokenizer's 264 ids (GQA, q/k norms).
TINY = DecoderConfig(model_type="qwen3", vocab_size=264, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=16, qk_norm=True, max_position_embeddings=4096)


def tiny_config(*, scan_layers: bool = False, **overrides) -> DecoderConfig:
    """:data:`TINY`, with the scanned (stacked) or the list-of-layers layout."""
    return TINY.replace(scan_layers=scan_layers, **overrides)


def random_model(seed: int = 0, *, scan_layers: bool = False,
                 memory: DeltaMemConfig | None = DeltaMemConfig(output_init="random"),
                 config: DecoderConfig | None = None) -> DecoderLM:
    """A model with every weight random (δ-mem U heads and β projections non-zero, so every
    token writes and memory changes the logits), built without compiling anything."""
    config = config or tiny_config(scan_layers=scan_layers)
    abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0), memory=memory))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        shape = var.get_value().shape
        if path[-1] == "weight":                       # norms
            value = 1 + 0.1 * rng.standard_normal(shape)
        elif path[-1] == "beta_bias":
            value = np.full(shape, -1.5)
        else:
            fan_in = shape[-2] if len(shape) >= 2 else shape[0]
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        var.set_value(jnp.asarray(value.astype(np.float32)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_pretrained(model: DecoderLM,
                    root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path | None]:
    """Write ``model`` as a backbone dir (HF layout + byte-tokenizer marker) and, if it has
    δ-mem, an adapter dir; returns (model_dir, adapter_dir or None)."""
    root = pathlib.Path(root)
    save_hf_model(model, str(root / "model"))
    save_byte_tokenizer_marker(str(root / "model"))
    adapter = None
    if model.memory_config is not None:
        adapter = root / "adapter"
        save_adapter(model, str(adapter))
    return root / "model", adapter


def tiny_chats(n: int = 8, split: str = "train", seed: int = 0, **config) -> list[dict]:
    """``n`` synthetic multi-session chat records ``{"messages": [...]}`` (short)."""
    return generate_split(n, split, SyntheticConfig(seed=seed, **config))


def run_eval(config, workdir):
    """``eval.py``'s path: resolve an eval ConfigDict once, then evaluate."""
    from deltamem_jax.evaluation.run import evaluate
    from deltamem_jax.evaluation.settings import resolve
    return evaluate(resolve(config), str(workdir))
