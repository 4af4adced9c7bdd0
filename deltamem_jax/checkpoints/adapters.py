"""δ-mem adapters in the authors' format ↔ the memory parameters of a :class:`DecoderLM`.

An adapter directory holds ``delta_mem_config.json`` (the authors' full config
dump) and ``delta_mem_adapter.safetensors`` or ``delta_mem_adapter.pt`` (a torch
state dict; reading it needs torch). Tensor names are
``<prefix>layers.<i>.self_attn.<param>`` with torch layout ``[out, in]``; all four
``delta_*_proj`` heads are stored whatever ``delta_heads`` says, and only the
active ones are used.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from deltamem_jax.memory.config import DELTA_HEADS, DeltaMemConfig
from deltamem_jax.memory.layer import DeltaMemory, MemoryParam
from deltamem_jax.models.decoder import DecoderLM
from deltamem_jax.utils.atomic import atomic_directory
from deltamem_jax.utils.files import FileFormatError, file_errors, read_json, read_safetensors

CONFIG_FILE = "delta_mem_config.json"
SAFETENSORS_FILE = "delta_mem_adapter.safetensors"
TORCH_FILE = "delta_mem_adapter.pt"
_NAME = re.compile(r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.self_attn\.(?P<param>\w+)$")
# Parameters stored as matrices (transposed between torch [out, in] and ours [in, out]).
_MATRICES = {"memory_q_proj", "memory_k_proj", "memory_v_proj", "beta_proj", "lambda_proj",
             "delta_q_proj", "delta_k_proj", "delta_v_proj", "delta_o_proj"}


def read_adapter_config(path: str, **overrides) -> DeltaMemConfig:
    """The :class:`DeltaMemConfig` of an adapter directory (run-time ``overrides`` allowed)."""
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {CONFIG_FILE} in adapter directory {path!r}")
    data = read_json(file, "the δ-mem adapter config")
    if not isinstance(data, dict):
        raise FileFormatError(f"{file}: the δ-mem adapter config must be a JSON object")
    with file_errors(file, "the δ-mem adapter config"):
        return DeltaMemConfig.from_authors_dict(data, **overrides)


def read_adapter_tensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of an adapter as float32 numpy arrays (safetensors preferred)."""
    st = os.path.join(path, SAFETENSORS_FILE)
    if os.path.isfile(st):
        return {k: np.asarray(v, np.float32) for k, v in read_safetensors(st).items()}
    pt = os.path.join(path, TORCH_FILE)
    if os.path.isfile(pt):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"{pt} is a torch file; install torch (pip install "
                              f"'deltamem-jax[torch]') or provide {SAFETENSORS_FILE}") from e
        with file_errors(pt, "the torch adapter state dict"):
            state = torch.load(pt, map_location="cpu", weights_only=True)
        return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}
    raise FileNotFoundError(f"adapter directory {path!r} has neither {SAFETENSORS_FILE} "
                            f"nor {TORCH_FILE}")


def load_adapter(model: DecoderLM, path: str, *, rngs: nnx.Rngs | None = None,
                 **config_overrides) -> DeltaMemConfig:
    """Attach δ-mem as configured by the adapter at ``path`` and load its weights.

    Every tensor is checked against the backbone: a wrong hidden size, layer
    count or head width fails naming the tensor and both shapes. Missing tensors
    of active parameters and unknown tensors are errors too.
    """
    config = read_adapter_config(path, **config_overrides)
    tensors = read_adapter_tensors(path)
    model.attach_memory(config, rngs=rngs or nnx.Rngs(0))
    set_memory_tensors(model, tensors, source=path)
    return config


def set_memory_tensors(model: DecoderLM, tensors: dict[str, np.ndarray], source: str = "adapter"):
    """Copy authors'-format tensors into the model's attached memories (in place)."""
    mem_layers = model.memory_layers
    seen: set[tuple[int, str]] = set()
    for name, value in tensors.items():
        m = _NAME.match(name)
        if m is None:
            raise ValueError(f"{source}: tensor {name!r} is not a δ-mem layer tensor "
                             "(expected '...layers.<i>.self_attn.<param>')")
        layer, param = int(m["layer"]), m["param"]
        if layer not in mem_layers:
            raise ValueError(f"{source}: tensor {name!r} is for layer {layer}, but δ-mem is "
                             f"attached to layers {list(mem_layers)} of a "
                             f"{model.config.num_hidden_layers}-layer backbone")
        memory, row = model.layer_memory(layer)
        want = _expected_torch_shape(memory, param)
        if want is None:
            raise ValueError(f"{source}: tensor {name!r} names unknown parameter {param!r}")
        if tuple(value.shape) != want:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(value.shape)}, but this "
                             f"backbone and config need {want}")
        seen.add((layer, param))
        if not hasattr(memory, param):
            continue   # an inactive head (or unused optional tensor): stored, never applied
        var = getattr(memory, param)
        arr = (value.T if param in _MATRICES else value).astype(var.get_value().dtype)
        if row is None:
            var.set_value(jax.device_put(arr, _sharding_of(var)))
        else:                                   # scanned layers: one row of the stack
            var.set_value(var.get_value().at[row].set(arr))
    missing = [f"layers.{i}.self_attn.{p}" for i in mem_layers
               for p in _own_params(model.layer_memory(i)[0]) if (i, p) not in seen]
    if missing:
        raise ValueError(f"{source}: missing tensors for active δ-mem parameters: {missing[:6]}"
                         + (" …" if len(missing) > 6 else ""))


def _sharding_of(var):
    value = var.get_value()
    return getattr(value, "sharding", None)


def _own_params(memory: DeltaMemory) -> list[str]:
    """Names of the memory parameters this layer actually has."""
    return sorted(str(path[0]) for path, _ in nnx.to_flat_state(nnx.state(memory, MemoryParam)))


def _expected_torch_shape(memory: DeltaMemory, param: str) -> tuple | None:
    c = memory.config
    d, R, g = memory.hidden_size, c.state_width, c.gate_width
    outs = memory.out_features
    shapes = {"memory_q_proj": (R, d), "memory_k_proj": (R, d), "memory_v_proj": (R, d),
              "beta_proj": (g, d), "beta_bias": (g,), "lambda_proj": (g, d), "lambda_bias": (g,),
              "delta_scale_raw": (1 if c.delta_scale_granularity == "layer" else 4,)}
    for h in DELTA_HEADS:
        if h in outs:
            shapes[f"delta_{h}_proj"] = (outs[h], R)
    if "o" in outs:
        shapes["delta_o_rmsnorm_weight"] = (outs["o"],)
    return shapes.get(param)


# ---------------------------------------------------------------------------
# Writing


def adapter_tensors(model: DecoderLM, prefix: str = "model.") -> dict[str, np.ndarray]:
    """The model's memory parameters as authors'-format tensors (all four heads)."""
    c = model.memory_config
    if c is None:
        raise ValueError("no δ-mem attached to this model")
    out = {}
    for i in model.memory_layers:
        memory, row = model.layer_memory(i)
        base = f"{prefix}layers.{i}.self_attn."
        for param in _own_params(memory):
            value = np.asarray(jax.device_get(getattr(memory, param).get_value()), np.float32)
            if row is not None:
                value = value[row]
            out[base + param] = np.ascontiguousarray(value.T if param in _MATRICES else value)
        for h in DELTA_HEADS:               # inactive heads: zeros, as in trained adapters
            if base + f"delta_{h}_proj" not in out and h in memory.out_features:
                out[base + f"delta_{h}_proj"] = np.zeros(
                    (memory.out_features[h], c.state_width), np.float32)
        if c.delta_o_rmsnorm and base + "delta_o_rmsnorm_weight" not in out:
            out[base + "delta_o_rmsnorm_weight"] = np.ones((memory.out_features["o"],), np.float32)
    return out


def save_adapter(model: DecoderLM, path: str, *, torch_format: bool | None = None) -> None:
    """Write the adapter in the authors' format, atomically (the directory is swapped in whole).

    Always writes safetensors; also ``delta_mem_adapter.pt`` when torch is
    importable (``torch_format=None``) or when asked (``True``).
    """
    tensors = adapter_tensors(model)
    with atomic_directory(path) as tmp:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(model.memory_config.to_authors_dict(), f, indent=2)
        save_file(tensors, os.path.join(tmp, SAFETENSORS_FILE))
        if torch_format is not False:
            try:
                import torch
            except ImportError:
                if torch_format:
                    raise
            else:
                torch.save({k: torch.from_numpy(v.copy()) for k, v in tensors.items()},
                           os.path.join(tmp, TORCH_FILE))
