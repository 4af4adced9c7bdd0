"""GGUF file → Hugging Face model directory, so everything that takes a model dir takes it.

Writes ``config.json``, ``model.safetensors`` (float32 or bfloat16),
``generation_config.json`` and the tokenizer (``tokenizer.json``,
``tokenizer_config.json`` holding the chat template, and transformers'
``chat_template.jinja``). The directory is built aside and swapped in whole
(:func:`deltamem_jax.utils.atomic.atomic_directory`). No JAX: tensors go from
the GGUF (dequantised, q/k un-permuted) straight to safetensors.
"""

from __future__ import annotations

import json
import os
import sys
import time

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from deltamem_jax.checkpoints.gguf import GGUFCheckpoint
from deltamem_jax.checkpoints.hf import SINGLE_FILE, tensor_map
from deltamem_jax.utils.atomic import atomic_directory

__all__ = ["EXPORT_DTYPES", "convert_gguf"]

EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 dtype: str = "float32", overwrite: bool = False,
                 progress: bool = True) -> str:
    """Write the HF directory for ``gguf_path`` to ``out_dir``; returns ``out_dir``.

    An existing non-empty ``out_dir`` is an error unless ``overwrite`` (then it
    is replaced as a whole, never left half-written).
    """
    from transformers import AutoTokenizer

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"convert_gguf: dtype {dtype!r} not in {sorted(EXPORT_DTYPES)}")
    out_dir = os.fspath(out_dir)
    exists = os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir))
    if exists and not overwrite:
        raise FileExistsError(f"convert_gguf: {out_dir!r} exists and is not empty "
                                  f"(pass overwrite=True / --force to replace it)")
    start = time.perf_counter()
    _say(progress, f"[1/3] reading {gguf_path}")
    src = GGUFCheckpoint(gguf_path)
    config = src.config(param_dtype=dtype)
    names = [t.name for t in tensor_map(config)]
    np_dtype = EXPORT_DTYPES[dtype]
    tensors = {}
    for name in tqdm(names, desc="[2/3] dequantising", unit="tensor", disable=not progress,
                     file=sys.stderr):
        tensors[name] = np.ascontiguousarray(src.get(name).astype(np_dtype))
    _say(progress, "[3/3] converting the tokenizer and chat template")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_path)),
                                        gguf_file=os.path.basename(gguf_path),
                                        local_files_only=True)
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, os.path.join(tmp, SINGLE_FILE), metadata={"format": "pt"})
        del tensors
        _write_json(os.path.join(tmp, "config.json"), config.to_hf_dict())
        _write_json(os.path.join(tmp, "generation_config.json"), src.generation_config())
        tok.save_pretrained(tmp)
        cfg_file = os.path.join(tmp, "tokenizer_config.json")
        with open(cfg_file) as f:
            tok_cfg = json.load(f)
        for key in ("is_local", "local_files_only"):      # facts about this load, not the model
            tok_cfg.pop(key, None)
        if tok.chat_template:
            tok_cfg["chat_template"] = tok.chat_template  # where older readers look for it
        _write_json(cfg_file, tok_cfg)
        _share(tmp)
    _say(progress, f"wrote {out_dir} ({dtype}) in {time.perf_counter() - start:.1f} s")
    return out_dir


def _share(path: str) -> None:
    """Give the directory and its files the usual modes (the temporary dir is private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for name in os.listdir(path):
        os.chmod(os.path.join(path, name), 0o666 & ~umask)


def _write_json(file: str, obj) -> None:
    # Inside atomic_directory's temporary directory: the swap makes the whole dir atomic.
    with open(file, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
