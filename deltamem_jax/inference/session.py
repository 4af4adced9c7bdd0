"""A chat session over a frozen backbone + δ-mem adapter (batch size 1).

A :class:`Session` keeps the conversation (messages), the δ-mem state, a KV
cache and the token ids processed so far. Every turn is rendered with the chat
template, and only the new suffix goes through the model, written into memory
(token writes). Replies are generated with the carried cache and state, and the
generated tokens are written too (as in the authors' chat session; ``write=False``
gives a read-only probe).

**Window.** ``window=None`` keeps every token in the KV cache (the authors'
behaviour). With ``window=N`` the cache holds at most N recent tokens after
every public call (during a reply it may hold up to N + ``max_new_tokens``
more). When a feed would overflow, the cache is *rebuilt* from its most recent
tokens by a **read-only** pass (``write=False``): nothing is written twice, and
the memory keeps integrating every token regardless of the window — that is the
point of δ-mem. Consequences: RoPE positions restart at 0 for the rebuilt
window, and keys/values are recomputed with the current memory state (this
matters only with Δk/Δv heads), i.e. the rebuilt window is exactly the
"read-only pass over recent turns" regime of training (SPEC §3).

**Fixed shapes.** The cache has a fixed capacity (``window`` + room for a
reply and one padded chunk; with ``window=None`` it doubles when full), and
fed suffixes are right-padded to a few bucket lengths (powers of two up to
``chunk``) with attention mask 0. Padded tokens are neither written to memory
nor attendable; they do occupy cache slots in the pass, so the session rewinds
``cache.index`` to the real token count afterwards and the next feed overwrites
them. Every cache slot below ``index`` holds a real token, so jit compiles once
per (bucket, write) pair and once per generation prompt length.

**Divergence.** After a reply, the conversation is re-rendered with the decoded
reply; if that does not extend the processed ids (decode → encode is not
prefix-stable, or the model produced special tokens), the session reverts to
its state from before the reply (memory, cache: both immutable arrays) and
feeds the re-rendered reply instead. If a render rewrites tokens older than
that, the whole conversation is re-ingested from a fresh state (``rebuilds``).

Only token writes are supported (span-mean write modes read the pre-pass state,
so incremental feeding would change what they compute).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltamem_jax.inference.generation import SamplingConfig, generate
from deltamem_jax.memory.layer import MemoryParam
from deltamem_jax.models.cache import KVCache
from deltamem_jax.models.decoder import DecoderLM
from deltamem_jax.models.functional import Runner

__all__ = ["Session", "SnapshotError", "SNAPSHOT_FORMAT", "SNAPSHOT_VERSION"]

SNAPSHOT_FORMAT = "deltamem-session"
SNAPSHOT_VERSION = 1
_META_FILE = "session.json"
_ARRAYS_FILE = "arrays.npz"
_MIN_BUCKET = 16
_ROUND = 64


class SnapshotError(ValueError):
    """A session snapshot is missing, malformed, or does not fit the model."""


@dataclasses.dataclass
class _Checkpoint:
    """Everything needed to undo feeds (all arrays are immutable, so this is cheap)."""

    n_ids: int
    memory_state: Any
    cache: KVCache
    cache_len: int
    cache_start: int
    logits: Any
    beta_means: Any
    tokens_written: int


def _round_up(n: int, m: int = _ROUND) -> int:
    return -(-n // m) * m


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    a, b = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(a != b)
    return int(diff[0]) if diff.size else n


class Session:
    """A single-conversation chat session with δ-mem (see the module docstring).

    Args:
      model: a :class:`DecoderLM` or a :class:`Runner` (split once; share a Runner
        between sessions to share compiled code).
      tokenizer: a :class:`deltamem_jax.data.tokenizer.Tokenizer`.
      window: max tokens kept in the KV cache (None = all).
      max_new_tokens: default reply length (sizes the cache).
      sampling: default :class:`SamplingConfig` (greedy, ``max_new_tokens``).
      chunk: the longest single model pass when feeding (a power of two).
      system: an optional system prompt, (re)added on construction and reset.
      seed: seed of the session's sampling key.
      capacity: initial KV-cache length (default: what the window and a reply
        need; with ``window=None`` it doubles when full). A fixed capacity shared
        by sessions means shared compiled code.
    """

    def __init__(self, model, tokenizer, *, window: Optional[int] = None,
                 max_new_tokens: int = 256, sampling: Optional[SamplingConfig] = None,
                 chunk: int = 256, system: Optional[str] = None, seed: int = 0,
                 capacity: Optional[int] = None):
        if not isinstance(model, (Runner, DecoderLM)):
            raise TypeError(f"Session needs a DecoderLM or a Runner, got {type(model).__name__}")
        self.runner = model if isinstance(model, Runner) else Runner(model)
        self._device = _single_device(self.runner)
        mc = self.runner.memory_config
        if mc is not None and mc.span_writes:
            raise ValueError(
                f"Session supports token writes only; memory_write_granularity="
                f"{mc.memory_write_granularity!r} reads the pre-pass state, so feeding a "
                f"conversation incrementally would change what it computes")
        if chunk < 1 or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a power of two ≥ 1, got {chunk}")
        if window is not None and window < 1:
            raise ValueError(f"window must be ≥ 1 or None, got {window}")
        self.tokenizer = tokenizer
        self.window = window
        self.chunk = chunk
        self.sampling = sampling or SamplingConfig(max_new_tokens=max_new_tokens)
        self.system = system
        self.seed = seed
        self._rng = jax.random.key(seed)
        reserve = max(self.sampling.max_new_tokens + _MIN_BUCKET, chunk)
        need = _round_up((window if window is not None else 4 * chunk) + reserve)
        if capacity is not None and window is not None and capacity < need:
            raise ValueError(f"capacity {capacity} is too small for window {window} plus a "
                             f"reply and a padded chunk ({need})")
        self._capacity = need if capacity is None else int(capacity)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything: zero memory, empty cache, no messages (the system prompt stays)."""
        self.messages: list[dict[str, str]] = []
        self._clear()
        self.rebuilds = 0
        self.reverts = 0
        self.compactions = 0
        if self.system:
            self.add_message("system", self.system)

    def _clear(self) -> None:
        self._ids: list[int] = []
        mc = self.runner.memory_config
        shape = (len(self.runner.memory_layers), 1, mc.num_state_heads, mc.rank, mc.rank) if mc else ()
        self._memory = None if mc is None else self._put(jnp.zeros(shape, jnp.float32))
        self._cache = self._fresh_cache()
        self._cache_len = 0        # real tokens in the cache == cache.index
        self._cache_start = 0      # ids[_cache_start:] are the cached tokens
        self._logits = None        # [V] logits after the last fed token (None if unknown)
        self._beta_means = None    # [L_mem] β means of the last writing pass
        self.tokens_written = 0

    @property
    def memory_state(self) -> Optional[jax.Array]:
        """``[L_mem, 1, H, r, r]`` float32 (None without δ-mem)."""
        return self._memory

    @property
    def cache(self) -> KVCache:
        return self._cache

    @property
    def ids(self) -> list[int]:
        """Every token processed so far (the rendered conversation, plus any generation)."""
        return list(self._ids)

    @property
    def cache_ids(self) -> list[int]:
        """The tokens currently in the KV cache (the most recent ones)."""
        return self._ids[self._cache_start:]

    @property
    def capacity(self) -> int:
        return self._capacity

    def next_token_logits(self) -> Optional[np.ndarray]:
        """float32 ``[V]`` logits for the token after the last fed one (None if unknown)."""
        return None if self._logits is None else np.asarray(self._logits)

    def stats(self) -> dict[str, Any]:
        """Per δ-mem layer state Frobenius norm and β mean of the last writing pass, and counts."""
        layers = list(self.runner.memory_layers) if self._memory is not None else []
        norms = ([float(x) for x in jnp.sqrt(jnp.sum(jnp.square(self._memory), axis=(1, 2, 3, 4)))]
                 if self._memory is not None else [])
        betas = None if self._beta_means is None else [float(b) for b in self._beta_means]
        return {"layers": layers, "state_norms": norms, "beta_means": betas,
                "messages": len(self.messages), "tokens_seen": len(self._ids),
                "tokens_written": self.tokens_written, "cache_tokens": self._cache_len,
                "cache_capacity": self._capacity, "window": self.window,
                "compactions": self.compactions, "reverts": self.reverts,
                "rebuilds": self.rebuilds}

    # ------------------------------------------------------------------ turns
    def add_message(self, role: str, content: str, *, write: bool = True) -> None:
        """Append a message and feed its new tokens (written into memory unless ``write=False``)."""
        self.messages.append({"role": role, "content": content})
        try:
            self._sync(write=write)
        except Exception:
            self.messages.pop()
            raise

    def add_user(self, content: str, *, write: bool = True) -> None:
        self.add_message("user", content, write=write)

    def reply(self, sampling: Optional[SamplingConfig] = None, rng=None, *,
              write: bool = True) -> str:
        """Generate the assistant's reply, append it, and return its text.

        The generation prompt and the generated tokens are fed with ``write``
        (False = a read-only probe: the reply joins the conversation and the
        cache, but nothing of this turn is written into memory). Stop tokens
        (``tokenizer.stop_ids``) end the reply and are never fed; the template's
        closing tokens are fed afterwards.
        """
        sampling = sampling or self.sampling
        if rng is None:
            self._rng, rng = jax.random.split(self._rng)
        target = self.tokenizer.render_chat(self.messages, add_generation_prompt=True).ids.tolist()
        if _common_prefix(self._ids, target) < len(self._ids):   # the template rewrote history
            self._rebuild(self.tokenizer.render_chat(self.messages).ids.tolist())
            if _common_prefix(self._ids, target) < len(self._ids):
                raise ValueError("the chat template renders the conversation differently with "
                                 "and without the generation prompt; cannot reply incrementally")
        prompt = target[len(self._ids):]
        if not prompt:
            raise ValueError("the chat template adds no generation prompt; cannot reply")
        checkpoint = self._checkpoint()
        T = len(prompt)
        self._make_room(T)
        self._ensure_capacity(self._cache_len + T + sampling.max_new_tokens)
        gen = generate(self.runner, np.asarray([prompt], np.int32),
                       memory_state=self._memory, cache=self._cache, write=write,
                       sampling=sampling, rng=rng, eos_ids=tuple(self.tokenizer.stop_ids),
                       pad_id=self.tokenizer.pad_id)
        n = int(gen.lengths[0])
        new = [int(t) for t in np.asarray(gen.tokens[0, :n])]
        self._memory = gen.memory_state
        self._cache_len += T + n
        self._cache = gen.cache._replace(index=self._put(jnp.asarray(self._cache_len, jnp.int32)))
        self._ids.extend(prompt + new)
        self._logits = None
        if write:
            self.tokens_written += T + n
        text = self.tokenizer.decode(new)
        self.messages.append({"role": "assistant", "content": text})
        self._sync(write=write, checkpoint=checkpoint)
        return text

    # ------------------------------------------------------------------ feeding
    def _sync(self, *, write: bool, checkpoint: Optional[_Checkpoint] = None) -> None:
        """Bring the processed ids in line with the rendered conversation."""
        target = self.tokenizer.render_chat(self.messages, add_generation_prompt=False).ids.tolist()
        p = _common_prefix(self._ids, target)
        if p == len(self._ids):
            self._feed(target[p:], write=write)
        elif checkpoint is not None and p >= checkpoint.n_ids:
            self._restore_checkpoint(checkpoint)
            self.reverts += 1
            self._feed(target[checkpoint.n_ids:], write=write)
        else:
            self._rebuild(target)

    def _rebuild(self, target: list[int]) -> None:
        """Re-ingest ``target`` from a fresh state (the template changed earlier tokens)."""
        self._clear()
        self.rebuilds += 1
        self._feed(target, write=True)

    def _checkpoint(self) -> _Checkpoint:
        return _Checkpoint(len(self._ids), self._memory, self._cache, self._cache_len,
                           self._cache_start, self._logits, self._beta_means, self.tokens_written)

    def _restore_checkpoint(self, c: _Checkpoint) -> None:
        del self._ids[c.n_ids:]
        self._memory, self._cache, self._cache_len = c.memory_state, c.cache, c.cache_len
        self._cache_start, self._logits, self._beta_means = c.cache_start, c.logits, c.beta_means
        self.tokens_written = c.tokens_written

    def _feed(self, ids: Sequence[int], *, write: bool) -> None:
        """Feed ``ids`` in pieces of ≤ chunk (and ≤ window), compacting the cache as needed."""
        pos = 0
        limit = self.chunk if self.window is None else min(self.chunk, self.window)
        while pos < len(ids):
            n = min(limit, len(ids) - pos)
            self._make_room(n)
            self._run(ids[pos:pos + n], write=write)
            pos += n

    def _make_room(self, n: int) -> None:
        """With a window: drop the oldest cached tokens so that ``n`` more fit in it."""
        if self.window is None or self._cache_len + n <= self.window:
            return
        if n > self.window:
            raise ValueError(f"{n} tokens do not fit in a window of {self.window}")
        keep = self.window - n
        kept = self._ids[len(self._ids) - keep:] if keep else []
        self._cache = self._fresh_cache()
        self._cache_len = 0
        self._cache_start = len(self._ids) - len(kept)
        self.compactions += 1
        for pos in range(0, len(kept), self.chunk):      # read-only: nothing written twice
            self._run(kept[pos:pos + self.chunk], write=False, record=False)

    def _ensure_capacity(self, need: int) -> None:
        """Grow the cache (padding with empty slots; exact) when ``need`` slots do not fit."""
        if need <= self._capacity:
            return
        new = _round_up(max(need, 2 * self._capacity))
        extra = new - self._capacity
        pad = lambda x: jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
        c = self._cache
        self._cache = self._put(KVCache(tuple(pad(k) for k in c.keys),
                                        tuple(pad(v) for v in c.values),
                                        pad(c.mask), c.positions, c.index))
        self._capacity = new

    def _put(self, tree):
        """Commit fresh arrays to the model's device, like every jit output, so that jit
        sees one kind of input (committed) and compiles each shape once, not twice."""
        return tree if self._device is None else jax.device_put(tree, self._device)

    def _fresh_cache(self) -> KVCache:
        return self._put(KVCache.init(self.runner.config, 1, self._capacity))

    def _bucket(self, n: int) -> int:
        b = _MIN_BUCKET
        while b < n:
            b *= 2
        return min(b, max(self.chunk, n))

    def _run(self, ids: Sequence[int], *, write: bool, record: bool = True) -> None:
        """One model pass over ``ids`` (≤ chunk), right-padded to a bucket length."""
        n = len(ids)
        if n == 0:
            return
        b = self._bucket(n)
        self._ensure_capacity(self._cache_len + b)
        padded = np.full((1, b), self.tokenizer.pad_id, np.int32)
        padded[0, :n] = ids
        mask = np.zeros((1, b), bool)
        mask[0, :n] = True
        out = self.runner(padded, attention_mask=mask, memory_state=self._memory,
                          cache=self._cache, write=write)
        self._cache_len += n
        self._cache = out.cache._replace(index=self._put(jnp.asarray(self._cache_len, jnp.int32)))
        if self._memory is not None:
            self._memory = out.memory_state
        if record:
            self._ids.extend(int(i) for i in ids)
            self._logits = out.logits[0, n - 1]
            if write:
                self.tokens_written += n
                self._beta_means = out.beta_means

    # ------------------------------------------------------------------ snapshots
    def snapshot(self, path: str | os.PathLike) -> None:
        """Save memory state, cached window, ids, messages and settings to directory ``path``.

        Written atomically: a temp dir next to ``path``, then renamed over it.
        """
        path = os.path.abspath(os.fspath(path))
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        n = self._cache_len
        arrays: dict[str, np.ndarray] = {
            "cache_mask": np.asarray(self._cache.mask[:, :n]),
            "rng": np.asarray(jax.random.key_data(self._rng)),
        }
        cache_dtype = str(self._cache.keys[0].dtype) if self._cache.keys else "float32"
        for i, (k, v) in enumerate(zip(self._cache.keys, self._cache.values)):
            arrays[f"key_{i}"] = _to_storable(k[:, :n])
            arrays[f"value_{i}"] = _to_storable(v[:, :n])
        if self._memory is not None:
            arrays["memory_state"] = np.asarray(self._memory)
        if self._logits is not None:
            arrays["logits"] = np.asarray(self._logits)
        if self._beta_means is not None:
            arrays["beta_means"] = np.asarray(self._beta_means)
        meta = {
            "format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION,
            "messages": self.messages, "ids": self._ids,
            "cache_len": n, "cache_start": self._cache_start,
            "cache_positions": int(self._cache.positions[0]), "cache_dtype": cache_dtype,
            "settings": {"window": self.window, "chunk": self.chunk, "system": self.system,
                         "seed": self.seed, "capacity": self._capacity,
                         "sampling": dataclasses.asdict(self.sampling)},
            "counters": {"tokens_written": self.tokens_written, "rebuilds": self.rebuilds,
                         "reverts": self.reverts, "compactions": self.compactions},
            "model": _model_signature(self.runner),
        }
        tmp = tempfile.mkdtemp(prefix=".session-", dir=parent)
        try:
            np.savez(os.path.join(tmp, _ARRAYS_FILE), **arrays)
            with open(os.path.join(tmp, _META_FILE), "w") as f:
                json.dump(meta, f)
            if os.path.isdir(path):
                old = tempfile.mkdtemp(prefix=".session-old-", dir=parent)
                os.rmdir(old)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def restore(cls, path: str | os.PathLike, model, tokenizer, *,
                check_model: bool = True) -> "Session":
        """A session exactly as :meth:`snapshot` saved it (bit-identical next-token logits).

        ``check_model``: refuse a snapshot taken with a different architecture,
        δ-mem config or δ-mem weights (its state would be meaningless).
        """
        path = os.fspath(path)
        meta_file, arrays_file = os.path.join(path, _META_FILE), os.path.join(path, _ARRAYS_FILE)
        if not os.path.isdir(path):
            raise SnapshotError(f"no session snapshot at {path!r}: not a directory")
        if not (os.path.isfile(meta_file) and os.path.isfile(arrays_file)):
            raise SnapshotError(f"{path!r} is not a session snapshot (needs {_META_FILE} and "
                                f"{_ARRAYS_FILE})")
        with open(meta_file) as f:
            meta = json.load(f)
        if meta.get("format") != SNAPSHOT_FORMAT or meta.get("version") != SNAPSHOT_VERSION:
            raise SnapshotError(f"{meta_file}: unsupported snapshot format "
                                f"{meta.get('format')!r} version {meta.get('version')!r}")
        runner = model if isinstance(model, Runner) else Runner(model)
        if check_model:
            want, got = _model_signature(runner), meta["model"]
            for key in want:
                if want[key] != got.get(key):
                    raise SnapshotError(f"snapshot {path!r} was taken with a different model "
                                        f"({key} differs); pass check_model=False to force")
        s = meta["settings"]
        self = cls(runner, tokenizer, window=s["window"], chunk=s["chunk"], system=None,
                   sampling=SamplingConfig(**s["sampling"]), seed=s["seed"])
        self.system = s["system"]
        self._capacity = int(s["capacity"])        # the same shapes → the same compiled code
        with np.load(arrays_file) as z:
            arrays = {k: z[k] for k in z.files}
        n = int(meta["cache_len"])
        cfg = runner.config
        init = KVCache.init(cfg, 1, self._capacity)
        dtype = init.keys[0].dtype if init.keys else jnp.float32
        try:
            keys = tuple(k.at[:, :n].set(_from_stored(arrays[f"key_{i}"], meta["cache_dtype"],
                                                      dtype))
                         for i, k in enumerate(init.keys))
            values = tuple(v.at[:, :n].set(_from_stored(arrays[f"value_{i}"],
                                                        meta["cache_dtype"], dtype))
                           for i, v in enumerate(init.values))
            mask = init.mask.at[:, :n].set(jnp.asarray(arrays["cache_mask"]))
        except (KeyError, ValueError, TypeError) as e:
            raise SnapshotError(f"snapshot {path!r}: cache arrays do not fit the model: {e}") from e
        self._cache = self._put(KVCache(keys, values, mask,
                                        jnp.asarray([meta["cache_positions"]], jnp.int32),
                                        jnp.asarray(n, jnp.int32)))
        if self._memory is not None:
            if "memory_state" not in arrays or arrays["memory_state"].shape != self._memory.shape:
                raise SnapshotError(f"snapshot {path!r}: memory state missing or of the wrong "
                                    f"shape for this model")
            self._memory = self._put(jnp.asarray(arrays["memory_state"]))
        self.messages = [dict(m) for m in meta["messages"]]
        self._ids = [int(i) for i in meta["ids"]]
        self._cache_len, self._cache_start = n, int(meta["cache_start"])
        self._logits = self._put(jnp.asarray(arrays["logits"])) if "logits" in arrays else None
        self._beta_means = (self._put(jnp.asarray(arrays["beta_means"]))
                            if "beta_means" in arrays else None)
        self._rng = jax.random.wrap_key_data(jnp.asarray(arrays["rng"]))
        c = meta["counters"]
        self.tokens_written, self.rebuilds = c["tokens_written"], c["rebuilds"]
        self.compactions, self.reverts = c["compactions"], c["reverts"]
        return self

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_dir: str, adapter_dir: Optional[str] = None, *,
                        tokenizer=None, dtype: Optional[str] = None, **kwargs) -> "Session":
        """Load a local HF backbone (+ an authors'-format adapter) and its tokenizer."""
        from deltamem_jax.checkpoints.adapters import load_adapter
        from deltamem_jax.checkpoints.hf import load_hf_model
        from deltamem_jax.data.tokenizer import load_tokenizer

        overrides = {} if dtype is None else {"dtype": dtype, "param_dtype": dtype}
        model = load_hf_model(model_dir, **overrides)
        if adapter_dir is not None:
            load_adapter(model, adapter_dir)
        tok = load_tokenizer(tokenizer if tokenizer is not None else model_dir)
        return cls(model, tok, **kwargs)


# ---------------------------------------------------------------------- helpers


def _single_device(runner: Runner):
    """The device holding the model if it sits on exactly one (else None: placement is jit's)."""
    for _, var in nnx.to_flat_state(runner.state):
        value = var.get_value()
        sharding = getattr(value, "sharding", None)
        if isinstance(sharding, jax.sharding.SingleDeviceSharding):
            return next(iter(sharding.device_set))
        return None
    return None


def _model_signature(runner: Runner) -> dict[str, Any]:
    """What a snapshot must match: architecture, δ-mem config and a hash of δ-mem weights."""
    c = runner.config
    arch = {k: getattr(c, k) for k in ("model_type", "vocab_size", "hidden_size",
                                        "num_hidden_layers", "num_attention_heads",
                                        "num_key_value_heads", "head_dim")}
    mc = runner.memory_config
    h = hashlib.sha256()
    for path, var in sorted(nnx.to_flat_state(runner.state), key=lambda x: str(x[0])):
        if isinstance(var, MemoryParam):
            arr = np.asarray(jax.device_get(var.get_value()))
            h.update(str(path).encode())
            h.update(str(arr.dtype).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    return {"architecture": arch,
            "memory_config": None if mc is None else json.loads(json.dumps(mc.to_authors_dict())),
            "memory_layers": list(runner.memory_layers),
            "memory_weights_sha256": h.hexdigest() if mc is not None else None}


def _to_storable(x) -> np.ndarray:
    a = np.asarray(jax.device_get(x))
    if a.dtype.kind == "V" or str(a.dtype) == "bfloat16":
        return a.view(np.uint16)
    return a


def _from_stored(a: np.ndarray, stored_dtype: str, dtype) -> jax.Array:
    if stored_dtype == "bfloat16":
        a = a.view(jnp.bfloat16)
    return jnp.asarray(a).astype(dtype)

