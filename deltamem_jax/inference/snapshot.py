"""Session snapshots on disk: everything a chat session needs to continue bit-exactly.

A snapshot is a directory with two files:

* ``session.json`` — format/version, messages, every processed token id, the
  cache window's bookkeeping (length, first cached id, next RoPE position,
  dtype), the session settings, counters, and a signature of the model it was
  taken with (architecture, δ-mem config, SHA-256 of the δ-mem weights);
* ``arrays.npz`` — the δ-mem state, the cached window's keys and values per
  layer (``key_{i}`` / ``value_{i}``, ``[1, n, kv_heads, head_dim]``; bfloat16 is
  stored as its uint16 bits), the cache mask, the next-token logits, the β
  means and the sampling key.

The layout is the same for scanned and unscanned models (a scanned cache is
stored layer by layer), so a snapshot fits either layout of the same model.
:func:`write_snapshot` writes the directory atomically
(:func:`deltamem_jax.utils.atomic.atomic_directory`); :func:`read_snapshot`
fails with :class:`SnapshotError` naming the file and what is wrong with it.
This module knows nothing of :class:`~deltamem_jax.inference.session.Session`:
it moves a :class:`SessionState` between memory and disk.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import weakref
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltamem_jax.memory.layer import MemoryParam
from deltamem_jax.models.cache import KVCache
from deltamem_jax.models.functional import Runner
from deltamem_jax.utils.atomic import atomic_directory

__all__ = [
    "ARRAYS_FILE",
    "META_FILE",
    "SNAPSHOT_FORMAT",
    "SNAPSHOT_VERSION",
    "SessionState",
    "SnapshotError",
    "SnapshotParts",
    "cache_layers",
    "compute_model_signature",
    "model_signature",
    "parts_digests",
    "read_parts",
    "read_snapshot",
    "snapshot_parts",
    "state_digest",
    "state_digests",
    "state_from_parts",
    "write_parts",
    "write_snapshot",
    "write_snapshot_files",
]

SNAPSHOT_FORMAT = "deltamem-session"
SNAPSHOT_VERSION = 1
META_FILE = "session.json"
ARRAYS_FILE = "arrays.npz"


class SnapshotError(ValueError):
    """A session snapshot is missing, malformed, or does not fit the model."""


@dataclasses.dataclass
class SessionState:
    """A session's complete state (device arrays are immutable, so this is a cheap view).

    ``cache`` has room for ``settings["capacity"]`` tokens; its first ``cache_len``
    slots hold ``ids[cache_start:]``. ``memory`` is ``[L_mem, 1, H, r, r]`` (None
    without δ-mem), ``logits`` the ``[V]`` next-token logits (None if unknown),
    ``rng`` the session's sampling key.
    """

    messages: list[dict[str, str]]
    ids: list[int]
    memory: Any
    cache: KVCache
    cache_len: int
    cache_start: int
    logits: Any
    beta_means: Any
    rng: Any
    settings: dict[str, Any]
    counters: dict[str, int]


@dataclasses.dataclass(frozen=True)
class SnapshotParts:
    """A snapshot as it lies on disk, held in host memory: the ``session.json`` object and
    the ``arrays.npz`` arrays (window-sized, not capacity-sized). Writing, reading back,
    digesting and caching all go through this one form, so a session rebuilt from parts
    kept in memory is bit for bit the session rebuilt from the files."""

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays plus the token ids (what holding the parts costs, roughly)."""
        return sum(a.nbytes for a in self.arrays.values()) + 8 * len(self.meta.get("ids", ()))

    def frozen(self) -> SnapshotParts:
        """The parts exactly as :func:`read_parts` would find them on disk — the metadata
        through a JSON round trip (lists, not tuples), the arrays as compact read-only
        copies — and safe to share: for keeping in memory instead of reading back."""
        arrays = {}
        for k, a in self.arrays.items():
            a = np.array(a, copy=True, order="C")
            a.setflags(write=False)
            arrays[k] = a
        return SnapshotParts(json.loads(json.dumps(self.meta)), arrays)


def cache_layers(arrays) -> list:
    """Per-layer arrays of a cache's keys or values (a tuple, or one stacked ``[L, ...]`` array)."""
    if isinstance(arrays, (tuple, list)):
        return list(arrays)
    return [arrays[i] for i in range(arrays.shape[0])]


_SIGNATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_signature(runner: Runner) -> dict[str, Any]:
    """:func:`compute_model_signature`, remembered per runner (until its state changes)."""
    hit = _SIGNATURES.get(runner)
    if hit is not None and hit[0] is runner.state:
        return hit[1]
    sig = compute_model_signature(runner)
    _SIGNATURES[runner] = (runner.state, sig)
    return sig


def compute_model_signature(runner: Runner) -> dict[str, Any]:
    """What a snapshot must match: architecture, δ-mem config and a hash of δ-mem weights.

    The hash is computed layer by layer in the unscanned layout's terms, so the two
    layouts of one model (and snapshots written before scanned layers were
    supported) agree.
    """
    c = runner.config
    arch = {k: getattr(c, k) for k in ("model_type", "vocab_size", "hidden_size",
                                        "num_hidden_layers", "num_attention_heads",
                                        "num_key_value_heads", "head_dim")}
    mc = runner.memory_config
    h = hashlib.sha256()
    entries = []
    for path, var in nnx.to_flat_state(runner.state):
        if not isinstance(var, MemoryParam):
            continue
        arr = np.asarray(jax.device_get(var.get_value()))
        if c.scan_layers:        # ('layers', 'self_attn', 'memory', name), leading layer axis
            entries.extend(((path[0], i) + tuple(path[1:]), arr[i]) for i in range(arr.shape[0]))
        else:                    # ('layers', i, 'self_attn', 'memory', name)
            entries.append((tuple(path), arr))
    for path, arr in sorted(entries, key=lambda e: str(e[0])):
        h.update(str(path).encode())
        h.update(str(arr.dtype).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return {"architecture": arch,
            "memory_config": None if mc is None else json.loads(json.dumps(mc.to_authors_dict())),
            "memory_layers": list(runner.memory_layers),
            "memory_weights_sha256": h.hexdigest() if mc is not None else None}


def _to_storable(x) -> np.ndarray:
    a = np.ascontiguousarray(jax.device_get(x))
    if a.dtype.kind == "V" or str(a.dtype) == "bfloat16":
        return a.view(np.uint16)
    return a


def _arrays(state: SessionState) -> tuple[dict[str, np.ndarray], str]:
    """The snapshot's arrays on the host (sliced there: no device program per length)."""
    n = state.cache_len
    host = jax.device_get((state.cache.keys, state.cache.values, state.cache.mask))
    keys, values = cache_layers(host[0]), cache_layers(host[1])
    arrays: dict[str, np.ndarray] = {
        "cache_mask": np.asarray(host[2])[:, :n],
        "rng": np.asarray(jax.random.key_data(state.rng)),
    }
    for i, (k, v) in enumerate(zip(keys, values)):
        arrays[f"key_{i}"] = _to_storable(np.asarray(k)[:, :n])
        arrays[f"value_{i}"] = _to_storable(np.asarray(v)[:, :n])
    if state.memory is not None:
        arrays["memory_state"] = np.asarray(state.memory)
    if state.logits is not None:
        arrays["logits"] = np.asarray(state.logits)
    if state.beta_means is not None:
        arrays["beta_means"] = np.asarray(state.beta_means)
    return arrays, (str(keys[0].dtype) if keys else "float32")


def snapshot_parts(state: SessionState, runner: Runner) -> SnapshotParts:
    """The files of ``state``'s snapshot, in memory (device arrays are read once)."""
    arrays, cache_dtype = _arrays(state)
    meta = {
        "format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION,
        "messages": state.messages, "ids": state.ids,
        "cache_len": state.cache_len, "cache_start": state.cache_start,
        "cache_positions": int(state.cache.positions[0]), "cache_dtype": cache_dtype,
        "settings": state.settings, "counters": state.counters,
        "model": model_signature(runner),
    }
    return SnapshotParts(meta, arrays)


def write_parts(directory: str | os.PathLike, parts: SnapshotParts) -> None:
    """Write ``parts`` as the snapshot files into the existing ``directory`` (not atomic:
    for callers that build a directory inside :func:`atomic_directory` themselves)."""
    directory = os.fspath(directory)
    np.savez(os.path.join(directory, ARRAYS_FILE), **parts.arrays)
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(parts.meta, f)


def write_snapshot_files(directory: str | os.PathLike, state: SessionState,
                         runner: Runner) -> None:
    """Write the snapshot files of ``state`` into the existing ``directory`` (not atomic)."""
    write_parts(directory, snapshot_parts(state, runner))


def write_snapshot(path: str | os.PathLike, state: SessionState, runner: Runner, *,
                   fsync: bool = True) -> None:
    """Write ``state`` as a snapshot directory at ``path``, atomically replacing it."""
    with atomic_directory(path, fsync=fsync) as tmp:
        write_snapshot_files(tmp, state, runner)


def _field(meta: dict, dotted: str, kind, where: str):
    """``meta[a][b]`` for ``"a.b"``, checked to be of ``kind``."""
    value: Any = meta
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise SnapshotError(f"{where}: missing field {dotted!r}")
        value = value[part]
    if kind is not None and not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise SnapshotError(f"{where}: field {dotted!r} has the wrong type "
                            f"({type(value).__name__})")
    return value


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``session.json`` of snapshot ``path`` (format and version checked)."""
    path = os.fspath(path)
    meta_file, arrays_file = os.path.join(path, META_FILE), os.path.join(path, ARRAYS_FILE)
    if not os.path.isdir(path):
        raise SnapshotError(f"no session snapshot at {path!r}: not a directory")
    if not (os.path.isfile(meta_file) and os.path.isfile(arrays_file)):
        raise SnapshotError(f"{path!r} is not a session snapshot (needs {META_FILE} and "
                            f"{ARRAYS_FILE})")
    try:
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SnapshotError(f"{meta_file}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise SnapshotError(f"{meta_file}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != SNAPSHOT_FORMAT or meta.get("version") != SNAPSHOT_VERSION:
        raise SnapshotError(f"{meta_file}: unsupported snapshot format "
                            f"{meta.get('format')!r} version {meta.get('version')!r}")
    return meta


def _load_arrays(arrays_file: str) -> dict[str, np.ndarray]:
    try:
        with np.load(arrays_file, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise SnapshotError(f"{arrays_file}: not a readable .npz archive ({e})") from e


def _array(arrays: dict, name: str, shape: tuple, where: str) -> np.ndarray:
    if name not in arrays:
        raise SnapshotError(f"{where}: missing array {name!r}")
    a = arrays[name]
    if tuple(a.shape) != tuple(shape):
        raise SnapshotError(f"{where}: array {name!r} has shape {tuple(a.shape)}, expected "
                            f"{tuple(shape)} for this model")
    return a


def read_parts(path: str | os.PathLike) -> SnapshotParts:
    """The files of snapshot ``path`` as :class:`SnapshotParts` (format checked, nothing
    else: :func:`state_from_parts` validates them against a model)."""
    meta = read_meta(path)
    return SnapshotParts(meta, _load_arrays(os.path.join(os.fspath(path), ARRAYS_FILE)))


def read_snapshot(path: str | os.PathLike, runner: Runner, *,
                  check_model: bool = True) -> SessionState:
    """The :class:`SessionState` saved at ``path``, its arrays placed like fresh ones.

    ``check_model``: refuse a snapshot taken with a different architecture, δ-mem
    config or δ-mem weights (its state would be meaningless for this model).
    """
    return state_from_parts(read_parts(path), runner, path, check_model=check_model)


def state_from_parts(parts: SnapshotParts, runner: Runner, path: str | os.PathLike, *,
                     check_model: bool = True) -> SessionState:
    """The :class:`SessionState` of ``parts`` (the snapshot at ``path``, which error messages
    name), validated against ``runner``'s model; its arrays are fresh device arrays (the
    parts are only read)."""
    path = os.fspath(path)
    meta, arrays = parts.meta, parts.arrays
    meta_file, arrays_file = os.path.join(path, META_FILE), os.path.join(path, ARRAYS_FILE)
    if check_model:
        want, got = model_signature(runner), _field(meta, "model", dict, meta_file)
        for key in want:
            if want[key] != got.get(key):
                raise SnapshotError(f"snapshot {path!r} was taken with a different model "
                                    f"({key} differs); pass check_model=False to force")
    settings = _field(meta, "settings", dict, meta_file)
    capacity = _field(meta, "settings.capacity", int, meta_file)
    counters = _field(meta, "counters", dict, meta_file)
    for name in ("tokens_written", "rebuilds", "reverts", "compactions"):
        _field(meta, f"counters.{name}", int, meta_file)
    messages = _field(meta, "messages", list, meta_file)
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str)
               and isinstance(m.get("content"), str) for m in messages):
        raise SnapshotError(f"{meta_file}: field 'messages' must be a list of "
                            f"{{'role': str, 'content': str}}")
    ids = _field(meta, "ids", list, meta_file)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise SnapshotError(f"{meta_file}: field 'ids' must be a list of integers")
    n = _field(meta, "cache_len", int, meta_file)
    start = _field(meta, "cache_start", int, meta_file)
    positions = _field(meta, "cache_positions", int, meta_file)
    cache_dtype = _field(meta, "cache_dtype", str, meta_file)
    if not (0 <= n <= capacity and 0 <= start and start + n == len(ids)):
        raise SnapshotError(f"{meta_file}: inconsistent cache window (cache_len {n}, "
                            f"cache_start {start}, {len(ids)} ids, capacity {capacity})")

    cfg = runner.config
    init = jax.eval_shape(lambda: runner.init_cache(1, capacity))   # layout and dtype only
    stacked = not isinstance(init.keys, (tuple, list))
    n_layers = init.keys.shape[0] if stacked else len(init.keys)
    dtype = np.dtype((init.keys if stacked else init.keys[0]).dtype if n_layers else np.float32)
    kv_shape = (1, n, cfg.num_key_value_heads, cfg.head_dim)
    full = (1, capacity, cfg.num_key_value_heads, cfg.head_dim)

    def filled(name: str) -> np.ndarray:          # assembled on the host: no per-length compile
        a = _array(arrays, name, kv_shape, arrays_file)
        if cache_dtype == "bfloat16":
            a = a.view(jnp.bfloat16)
        out = np.zeros(full, dtype)
        try:
            out[:, :n] = a
        except (TypeError, ValueError) as e:
            raise SnapshotError(f"{arrays_file}: array {name!r} of dtype {cache_dtype!r} does "
                                f"not fit the model's cache ({dtype}): {e}") from e
        return out

    keys = [filled(f"key_{i}") for i in range(n_layers)]
    values = [filled(f"value_{i}") for i in range(n_layers)]
    if not stacked:
        new_keys, new_values = tuple(map(jnp.asarray, keys)), tuple(map(jnp.asarray, values))
    else:
        new_keys, new_values = jnp.asarray(np.stack(keys)), jnp.asarray(np.stack(values))
    mask = np.zeros((1, capacity), bool)
    mask[:, :n] = _array(arrays, "cache_mask", (1, n), arrays_file)
    cache = KVCache(new_keys, new_values, jnp.asarray(mask), jnp.asarray([positions], jnp.int32),
                    jnp.asarray(n, jnp.int32))

    memory = None
    if runner.memory_config is not None:
        want = tuple(runner.init_memory_state(1).shape)
        memory = jnp.asarray(_array(arrays, "memory_state", want, arrays_file))
    logits = None
    if "logits" in arrays:
        logits = jnp.asarray(_array(arrays, "logits", (cfg.vocab_size,), arrays_file))
    beta_means = None
    if "beta_means" in arrays:
        beta_means = jnp.asarray(_array(arrays, "beta_means", (len(runner.memory_layers),),
                                        arrays_file))
    rng_data = _array(arrays, "rng", np.asarray(jax.random.key_data(jax.random.key(0))).shape,
                      arrays_file)
    return SessionState(
        messages=[{"role": m["role"], "content": m["content"]} for m in messages],
        ids=[int(i) for i in ids], memory=memory, cache=cache, cache_len=n, cache_start=start,
        logits=logits, beta_means=beta_means,
        rng=jax.random.wrap_key_data(jnp.asarray(rng_data)),
        settings=copy.deepcopy(settings), counters={k: int(v) for k, v in counters.items()})


def state_digests(state: SessionState) -> tuple[str, str]:
    """``(state_sha256, content_sha256)``: SHA-256 over everything that decides a session's
    future — token ids, messages, δ-mem state, the cached window (keys, values, mask,
    position), next-token logits — without (content) and with (state) the sampling key.
    Two sessions with the same state digest continue identically, bit for bit."""
    arrays, _ = _arrays(state)
    return _digests(state.ids, state.messages, state.cache_len, state.cache_start,
                    int(state.cache.positions[0]), arrays)


def parts_digests(parts: SnapshotParts) -> tuple[str, str]:
    """:func:`state_digests` of the state ``parts`` hold (the same two digests)."""
    m = parts.meta
    return _digests(m["ids"], m["messages"], m["cache_len"], m["cache_start"],
                    m["cache_positions"], parts.arrays)


def _digests(ids, messages, cache_len, cache_start, positions,
             arrays: dict[str, np.ndarray]) -> tuple[str, str]:
    h = hashlib.sha256()
    h.update(json.dumps([ids, messages, cache_len, cache_start, positions]).encode())
    for name in sorted(arrays):
        if name == "rng":
            continue
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    content = h.hexdigest()
    rng = np.ascontiguousarray(arrays["rng"])
    full = hashlib.sha256(content.encode() + rng.tobytes()).hexdigest()
    return full, content


def state_digest(state: SessionState, *, include_rng: bool = True) -> str:
    """One of :func:`state_digests`: with the sampling key (default) or without."""
    return state_digests(state)[0 if include_rng else 1]
