"""Hugging Face checkpoints ↔ :class:`DecoderLM` parameters.

Reads a local model directory (``config.json`` + one or several ``*.safetensors``,
with ``model.safetensors.index.json`` when sharded) straight into the target
dtype and, when a mesh is given, the target sharding: each tensor is read once
per host (memory-mapped) and every device receives only its own slice. Writes the
same layout back.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from deltamem_jax.checkpoints.gguf import GGUFCheckpoint, is_gguf_path
from deltamem_jax.memory.config import DeltaMemConfig
from deltamem_jax.models.config import DecoderConfig
from deltamem_jax.models.decoder import DecoderLM
from deltamem_jax.utils.atomic import atomic_file, atomic_write_json
from deltamem_jax.utils.files import FileFormatError, file_errors, open_safetensors, read_json
from deltamem_jax.utils.sharding import Rules, state_shardings

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class Tensor(NamedTuple):
    """How one backbone parameter maps to one HF tensor."""
    path: tuple                      # path in the NNX state
    name: str                        # HF tensor name
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _same(x):
    return x


def tensor_map(config: DecoderConfig) -> list[Tensor]:
    """Every backbone parameter of ``config`` with its HF name and layout transforms."""
    c = config
    d, nh, nkv, hd = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                      c.head_dim)
    out = [Tensor(("embed_tokens",), "model.embed_tokens.weight", _same, _same),
           Tensor(("norm", "weight"), "model.norm.weight", _same, _same)]
    if not c.tie_word_embeddings:
        out.append(Tensor(("lm_head",), "lm_head.weight", np.transpose, np.transpose))

    def in_out(shape):      # ours [d, n, hd]  <-  HF [n*hd, d]
        return (lambda w: w.T.reshape(shape), lambda w: w.reshape(shape[0], -1).T)

    def out_in(shape):      # ours [n, hd, d]  <-  HF [d, n*hd]
        return (lambda w: w.T.reshape(shape), lambda w: w.reshape(-1, shape[-1]).T)

    for i in range(c.num_hidden_layers):
        p, n = ("layers", i), f"model.layers.{i}."
        a = p + ("self_attn",)
        out += [
            Tensor(p + ("input_layernorm", "weight"), n + "input_layernorm.weight", _same, _same),
            Tensor(p + ("post_attention_layernorm", "weight"),
                   n + "post_attention_layernorm.weight", _same, _same),
            Tensor(a + ("q_proj",), n + "self_attn.q_proj.weight", *in_out((d, nh, hd))),
            Tensor(a + ("k_proj",), n + "self_attn.k_proj.weight", *in_out((d, nkv, hd))),
            Tensor(a + ("v_proj",), n + "self_attn.v_proj.weight", *in_out((d, nkv, hd))),
            Tensor(a + ("o_proj",), n + "self_attn.o_proj.weight", *out_in((nh, hd, d))),
            Tensor(p + ("mlp", "gate_proj"), n + "mlp.gate_proj.weight",
                   np.transpose, np.transpose),
            Tensor(p + ("mlp", "up_proj"), n + "mlp.up_proj.weight", np.transpose, np.transpose),
            Tensor(p + ("mlp", "down_proj"), n + "mlp.down_proj.weight",
                   np.transpose, np.transpose),
        ]
        if c.attention_bias:
            for x, heads in (("q", nh), ("k", nkv), ("v", nkv)):
                out.append(Tensor(a + (f"{x}_bias",), n + f"self_attn.{x}_proj.bias",
                                  (lambda h: lambda w: w.reshape(h, hd))(heads),
                                  lambda w: w.reshape(-1)))
            out.append(Tensor(a + ("o_bias",), n + "self_attn.o_proj.bias", _same, _same))
        if c.mlp_bias:
            for x in ("gate", "up", "down"):
                out.append(Tensor(p + ("mlp", f"{x}_bias"), n + f"mlp.{x}_proj.bias", _same, _same))
        if c.qk_norm:
            out += [Tensor(a + ("q_norm", "weight"), n + "self_attn.q_norm.weight", _same, _same),
                    Tensor(a + ("k_norm", "weight"), n + "self_attn.k_norm.weight", _same, _same)]
    return out


# ---------------------------------------------------------------------------
# Reading


class SafetensorsDir:
    """Lazy access to every tensor of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model directory {path!r} does not exist")
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            data = read_json(index, "the safetensors index")
            if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
                raise FileFormatError(f"{index}: a safetensors index needs a 'weight_map' object")
            weight_map = data["weight_map"]
        else:
            files = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {path!r}")
            weight_map = {}
            for file in files:
                with open_safetensors(os.path.join(path, file)) as f:
                    weight_map.update({k: file for k in f.keys()})
        self.path = path
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} not found in checkpoint {self.path!r}")
        file = self.weight_map[name]
        if file not in self._handles:
            full = os.path.join(self.path, file)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{INDEX_FILE} names {file!r}, which is missing")
            self._handles[file] = open_safetensors(full)
        with file_errors(os.path.join(self.path, file), f"tensor {name!r}"):
            return self._handles[file].get_tensor(name)


def read_backbone_state(path, config: DecoderConfig, abstract_state: nnx.State,
                        shardings=None) -> nnx.State:
    """Fill an abstract backbone state (``nnx.eval_shape`` + ``nnx.split``) from ``path``.

    ``path`` is a safetensors directory, a ``.gguf`` file or a tensor source with
    ``get(hf_name)`` and ``path`` (e.g. a
    :class:`~deltamem_jax.checkpoints.gguf.GGUFCheckpoint`).
    Each tensor is read once (memory-mapped), converted to the parameter's dtype
    and, with ``shardings`` (a matching tree of ``NamedSharding``), placed so
    that every device receives only its slice: works on many hosts, where each
    host fills only its addressable devices.
    """
    start = time.perf_counter()
    if isinstance(path, (str, os.PathLike)):
        source = GGUFCheckpoint(path) if is_gguf_path(path) else SafetensorsDir(path)
    else:
        source = path
    flat = dict(nnx.to_flat_state(abstract_state))
    sh_flat = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensor_map(config):
        groups.setdefault(state_path(t, config), []).append(t)
    unmapped = set(flat) - set(groups)
    if unmapped:
        raise RuntimeError(f"no HF mapping for parameters {sorted(unmapped)}")
    nbytes = 0
    for path, tensors in groups.items():
        var = flat[path]
        target = var.get_value()
        stacked = state_path(tensors[0], config) != tensors[0].path
        want = target.shape[1:] if stacked else target.shape
        parts = [_read(source, t, want, _np_dtype(target.dtype)) for t in tensors]
        arr = np.stack(parts) if stacked else parts[0]
        nbytes += arr.nbytes
        sharding = sh_flat.get(path)
        if isinstance(sharding, nnx.Variable):
            sharding = sharding.get_value()
        var.set_value(jax.make_array_from_callback(arr.shape, sharding, lambda i, a=arr: a[i])
                      if sharding is not None else jnp.asarray(arr))
        del parts, arr
    log.info("read %s: %.1f MB in %.2f s", source.path, nbytes / 1e6,
             time.perf_counter() - start)
    return nnx.from_flat_state(flat)


def state_path(t: Tensor, config: DecoderConfig) -> tuple:
    """Where ``t`` lives in the NNX state: per-layer paths lose their index when scanned."""
    if config.scan_layers and t.path[0] == "layers":
        return ("layers",) + t.path[2:]
    return t.path


def _read(source, t: Tensor, shape, dtype) -> np.ndarray:
    raw = source.get(t.name)
    try:
        arr = t.to_ours(raw)
    except ValueError as e:
        raise ValueError(f"checkpoint tensor {t.name!r} has shape {raw.shape}, which does not "
                         f"fit parameter {'.'.join(map(str, t.path))} {tuple(shape)}") from e
    if arr.shape != tuple(shape):
        raise ValueError(f"checkpoint tensor {t.name!r} has shape {raw.shape}; expected "
                         f"{tuple(shape)} (in our layout) for this config.json")
    return arr.astype(dtype)


def load_config(path: str | os.PathLike, **config_overrides) -> DecoderConfig:
    """The :class:`DecoderConfig` of a model directory (``config.json``) or a ``.gguf`` file."""
    if is_gguf_path(path):
        return GGUFCheckpoint(path).config(**config_overrides)
    return DecoderConfig.from_pretrained(path, **config_overrides)


def load_hf_model(path: str | os.PathLike, *, memory: DeltaMemConfig | None = None,
                  mesh: jax.sharding.Mesh | None = None, rules: Rules | None = None,
                  rngs: nnx.Rngs | None = None, **config_overrides) -> DecoderLM:
    """Load a local HF checkpoint as a :class:`DecoderLM` (optionally with fresh δ-mem).

    ``path`` is a model directory or a ``.gguf`` file (config from its metadata,
    weights dequantised; see :mod:`deltamem_jax.checkpoints.gguf`).
    ``config_overrides`` set run-time fields such as ``dtype="bfloat16"``,
    ``param_dtype="bfloat16"`` or ``remat=True``. With ``mesh`` (and logical
    ``rules``) every weight lands directly in its sharding.
    """
    if is_gguf_path(path):
        source = GGUFCheckpoint(path)
        config = source.config(**config_overrides)
    else:
        source = path
        config = DecoderConfig.from_pretrained(path, **config_overrides)
    abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules or ()) if mesh is not None else None
    model = nnx.merge(graphdef, read_backbone_state(source, config, abstract_state, shardings))
    if memory is not None:
        model.attach_memory(memory, rngs=rngs or nnx.Rngs(0))
    return model


def _np_dtype(dtype):
    return ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.dtype(dtype)


# ---------------------------------------------------------------------------
# Writing


def backbone_tensors(model: DecoderLM) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in HF layout) for every backbone parameter."""
    from deltamem_jax.memory.layer import MemoryParam
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(MemoryParam)))))
    for t in tensor_map(model.config):
        value = np.asarray(jax.device_get(state[state_path(t, model.config)].get_value()))
        if state_path(t, model.config) != t.path:
            value = value[t.path[1]]                      # this layer's row of the stack
        yield t.name, np.ascontiguousarray(t.to_hf(value))


def save_hf_model(model: DecoderLM, path: str, *, max_shard_bytes: int = 2 << 30) -> None:
    """Write ``config.json`` and safetensors (sharded with an index when large)."""
    os.makedirs(path, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in backbone_tensors(model):
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        _atomic_save(shards[0], os.path.join(path, SINGLE_FILE))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, os.path.join(path, file))
            weight_map.update({k: file for k in shard})
        total = sum(a.nbytes for s in shards for a in s.values())
        _atomic_json({"metadata": {"total_size": total}, "weight_map": weight_map},
                     os.path.join(path, INDEX_FILE))
    _atomic_json(model.config.to_hf_dict(), os.path.join(path, "config.json"))


def _atomic_save(tensors, file):
    with atomic_file(file) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})


def _atomic_json(obj, file):
    atomic_write_json(file, obj)
