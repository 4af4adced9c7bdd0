"""The δ-mem layer (Flax NNX): projections, gates, the recurrence and read-outs.

:class:`DeltaMemory` holds one attention layer's memory parameters and knows
nothing of any particular backbone: given the layer's attention input ``h``
(after its pre-norm), a validity mask and the carried state, it returns the
low-rank corrections Δq/Δk/Δv/Δo (only the heads in ``delta_heads``) and the
new state. The caller adds Δq/Δk/Δv to its q/k/v projections before q/k-norm and
RoPE, and Δo to its o-projection output (SPEC §1).

Parameter names match the authors' adapter tensors one to one
(``memory_q_proj``, ``beta_bias``, ``delta_o_proj``, …); matrices are stored in
Flax layout ``[in, out]``, i.e. transposed relative to the authors' torch
``[out, in]`` weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deltamem_jax.memory.config import DELTA_HEADS, DeltaMemConfig
from deltamem_jax.memory.osam import osam_read, osam_scan
from deltamem_jax.utils.sharding import LOGICAL_AXES

__all__ = ["DeltaMemory", "MemoryOutput", "MemoryParam", "span_means", "base_slice_matrix"]

_NORM_EPS = 1e-6
# Logical axes of memory parameters have their own names, so that rules can keep the
# (tiny) memory replicated while the backbone is sharded.
_OUT_AXES = {"q": "memory_out", "k": "memory_out", "v": "memory_out", "o": "memory_out"}


class MemoryParam(nnx.Param):
    """A δ-mem parameter: the only variables training updates and checkpoints hold."""


class MemoryOutput(NamedTuple):
    """What one δ-mem layer hands back to its attention block."""

    deltas: dict          # head name -> correction [B, T, out_features], hidden dtype
    state: jax.Array      # [B, H, r, r] float32, the state after this pass
    beta_mean: jax.Array  # scalar: mean write strength β over this pass's writes


def _param(value, *axes):
    return MemoryParam(value, **{LOGICAL_AXES: axes})


def _kaiming_uniform(key, shape, fan_in, dtype):
    # torch's kaiming_uniform_(a=√5): bound = sqrt(6 / ((1 + a²) fan_in)) = 1/√fan_in
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def base_slice_matrix(base_weight, width: int, state_width: int, gain: float):
    """The authors' "base_slice" init of one correction head, in Flax layout.

    ``base_weight`` is the backbone projection in torch layout ``[out, in]``; its
    first ``width`` input columns, each L2-normalised, times ``gain`` fill the first
    ``width`` read columns of U (``[out, R]`` in torch layout); the rest is zero.
    Returns ``[R, out]``.
    """
    base_weight = jnp.asarray(base_weight, jnp.float32)
    width = min(width, base_weight.shape[1])
    cols = base_weight[:, :width]
    cols = cols / jnp.maximum(jnp.linalg.norm(cols, axis=0, keepdims=True), _NORM_EPS)
    u = jnp.zeros((base_weight.shape[0], state_width), jnp.float32)
    return u.at[:, :width].set(gain * cols).T


class DeltaMemory(nnx.Module):
    """One attention layer's δ-mem: an r×r state per head written by a gated delta rule.

    Args:
      config: the δ-mem settings.
      hidden_size: d, the width of the attention input.
      out_features: output width of each backbone projection that a correction is
        added to, e.g. ``{"q": n_heads*head_dim, "k": n_kv*head_dim, "v": ..., "o": d}``
        (at least the active heads).
      base_weights: backbone projection weights in torch layout ``[out, in]`` per
        head; required only for ``output_init="base_slice"``/``"base_slice_fixed"``.
      rngs: random streams (``params``).
      param_dtype: dtype of the parameters (float32 by default).
    """

    def __init__(self, config: DeltaMemConfig, hidden_size: int,
                 out_features: Mapping[str, int], *, rngs: nnx.Rngs,
                 base_weights: Mapping[str, jax.Array] | None = None,
                 param_dtype=jnp.float32):
        missing = [h for h in config.delta_heads if h not in out_features]
        if missing:
            raise ValueError(f"DeltaMemory: out_features lacks active heads {missing}")
        self.config = config
        self.hidden_size = hidden_size
        # A tuple (not a dict) so the module's graphdef stays hashable for jax.jit.
        self._out_features = tuple((h, int(out_features[h])) for h in DELTA_HEADS
                                   if h in out_features)
        d, R, g = hidden_size, config.state_width, config.gate_width
        key = rngs.params

        in_axes = ("memory_embed", "memory")
        self.memory_q_proj = _param(_kaiming_uniform(key(), (d, R), d, param_dtype), *in_axes)
        self.memory_k_proj = _param(_kaiming_uniform(key(), (d, R), d, param_dtype), *in_axes)
        self.memory_v_proj = _param(_kaiming_uniform(key(), (d, R), d, param_dtype), *in_axes)
        self.beta_proj = _param(jnp.zeros((d, g), param_dtype), "memory_embed", "memory_gates")
        self.beta_bias = _param(jnp.full((g,), config.beta_bias_init, param_dtype), "memory_gates")
        if not config.couple_lambda:
            self.lambda_proj = _param(jnp.zeros((d, g), param_dtype), "memory_embed",
                                      "memory_gates")
            self.lambda_bias = _param(jnp.full((g,), -config.beta_bias_init, param_dtype),
                                      "memory_gates")
        for head in config.delta_heads:
            init = self._head_init(head, key(), base_weights, param_dtype)
            setattr(self, f"delta_{head}_proj", _param(init, "memory", _OUT_AXES[head]))
        if config.delta_o_rmsnorm and "o" in config.delta_heads:
            self.delta_o_rmsnorm_weight = _param(
                jnp.ones((self.out_features["o"],), param_dtype), _OUT_AXES["o"])
        if config.trainable_delta_scale:
            n = 1 if config.delta_scale_granularity == "layer" else len(DELTA_HEADS)
            p = min(max(config.delta_scale_init / config.delta_scale_max, 1e-4), 1 - 1e-4)
            self.delta_scale_raw = _param(jnp.full((n,), math.log(p / (1 - p)), param_dtype), None)

    def _head_init(self, head, key, base_weights, dtype):
        cfg, R, out = self.config, self.config.state_width, self.out_features[head]
        if cfg.output_init == "zero":
            return jnp.zeros((R, out), dtype)
        if cfg.output_init == "random":
            return (cfg.online_gain * _kaiming_uniform(key, (R, out), R, jnp.float32)).astype(dtype)
        if base_weights is None or head not in base_weights:
            raise ValueError(
                f"DeltaMemory: output_init={cfg.output_init!r} initialises delta_{head}_proj from "
                f"the backbone's {head}_proj weight; pass it in base_weights")
        width = cfg.rank if cfg.output_init == "base_slice" else min(cfg.base_slice_ref_width,
                                                                     cfg.rank)
        w = jnp.asarray(base_weights[head])
        if w.shape[0] != out:
            raise ValueError(f"DeltaMemory: base weight for {head} has shape {w.shape}, "
                             f"expected [{out}, in]")
        return base_slice_matrix(w, width, R, cfg.online_gain).astype(dtype)

    @property
    def out_features(self) -> dict[str, int]:
        """Output width of each backbone projection a correction can be added to."""
        return dict(self._out_features)

    # ------------------------------------------------------------------
    def init_state(self, batch_size: int) -> jax.Array:
        """A fresh (zero) state ``[B, H, r, r]``."""
        c = self.config
        return jnp.zeros((batch_size, c.num_state_heads, c.rank, c.rank), jnp.float32)

    def __call__(self, hidden: jax.Array, *, mask: jax.Array | None = None,
                 state: jax.Array | None = None, write: bool = True,
                 message_ids: jax.Array | None = None,
                 sentence_ids: jax.Array | None = None) -> MemoryOutput:
        """One pass over ``hidden`` ``[B, T, d]``.

        ``mask`` ``[B, T]``: 1 = valid token (padding reads 0, writes nothing).
        ``state``: carried ``[B, H, r, r]`` (None = fresh zeros). ``write``: whether
        this pass writes (a Python bool). Span modes (``message_mean`` /
        ``sentence_mean``) need ``message_ids`` (and ``sentence_ids``) ``[B, T]``
        int arrays, −1 = no span; all tokens of a span pass read the pre-pass state.
        """
        cfg = self.config
        B, T, d = self._check_inputs(hidden, mask, state)
        valid = jnp.ones((B, T), bool) if mask is None else (jnp.asarray(mask) != 0)
        state = self.init_state(B) if state is None else jnp.asarray(state, jnp.float32)
        h = hidden.astype(jnp.float32)

        if write and not cfg.span_writes:
            q, k, v, beta, lam = self._project(h, with_writes=True)
            reads, new_state = osam_scan(
                _heads_first(q), _heads_first(k), _heads_first(v), _heads_first(beta),
                None if lam is None else _heads_first(lam), mask=valid[:, None, :],
                initial_state=state, update_mode=cfg.state_update_mode,
                method=cfg.scan_method, chunk_size=cfg.chunk_size)
            reads = jnp.swapaxes(reads, 1, 2)
            beta_mean = _masked_mean(beta, valid)
        else:
            q, beta = self._project(h, with_writes=False)
            reads = jnp.swapaxes(osam_read(state, _heads_first(q), valid[:, None, :]), 1, 2)
            new_state, beta_mean = state, _masked_mean(beta, valid)
            if write:
                new_state, beta_mean = self._span_write(h, valid, state, message_ids, sentence_ids)
        deltas = self._corrections(reads.reshape(B, T, cfg.state_width), hidden.dtype)
        return MemoryOutput(deltas, new_state, beta_mean)

    # ------------------------------------------------------------------
    def _check_inputs(self, hidden, mask, state):
        c = self.config
        if hidden.ndim != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"DeltaMemory: hidden must be [B, T, {self.hidden_size}], "
                             f"got {hidden.shape}")
        B, T, d = hidden.shape
        if mask is not None and tuple(jnp.shape(mask)) != (B, T):
            raise ValueError(f"DeltaMemory: mask must be [B, T] = {(B, T)}, got {jnp.shape(mask)}")
        want = (B, c.num_state_heads, c.rank, c.rank)
        if state is not None and tuple(jnp.shape(state)) != want:
            raise ValueError(f"DeltaMemory: state must be [B, H, r, r] = {want}, "
                             f"got {jnp.shape(state)}")
        return B, T, d

    def _project(self, x, with_writes: bool):
        """q (and k, v, β, λ) for rows ``x`` ``[B, S, d]`` (float32), split per state head."""
        c = self.config
        H = c.num_state_heads
        mats = [self.memory_q_proj, self.beta_proj]
        if with_writes:
            mats += [self.memory_k_proj, self.memory_v_proj]
            if not c.couple_lambda:
                mats.append(self.lambda_proj)
        w = jnp.concatenate([m[...].astype(jnp.float32) for m in mats], axis=1)
        y = jnp.einsum("bsd,df->bsf", x, w, precision=jax.lax.Precision.HIGHEST)
        sizes = [m.shape[1] for m in mats]
        parts = jnp.split(y, list(_cumsum(sizes[:-1])), axis=-1)
        split = lambda a: a.reshape(a.shape[:-1] + (H, a.shape[-1] // H))  # noqa: E731
        q = self._qk(split(parts[0]))
        beta = jax.nn.sigmoid(split(parts[1] + self.beta_bias[...].astype(jnp.float32)))
        if not with_writes:
            return q, beta
        k, v = self._qk(split(parts[2])), split(parts[3])
        lam = None
        if not c.couple_lambda:
            lam = jax.nn.sigmoid(split(parts[4] + self.lambda_bias[...].astype(jnp.float32)))
        return q, k, v, beta, lam

    def _qk(self, x):
        if not self.config.normalize_qk:
            return x
        x = jnp.tanh(x)
        # x / max(|x|, eps), written so the gradient stays finite at x = 0 (empty span
        # slots project to exactly 0; jnp.linalg.norm's gradient there is NaN).
        sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS * _NORM_EPS))

    def _span_write(self, h, valid, state, message_ids, sentence_ids):
        cfg = self.config
        ids, participate = span_ids(cfg.memory_write_granularity, message_ids, sentence_ids,
                                    valid)
        num_slots = cfg.max_spans or h.shape[1]
        means, slot_valid = span_means(h, ids, participate, num_slots)
        _, k, v, beta, lam = self._project(means, with_writes=True)
        _, new_state = osam_scan(
            _heads_first(k), _heads_first(k), _heads_first(v), _heads_first(beta),
            None if lam is None else _heads_first(lam), mask=slot_valid[:, None, :],
            initial_state=state, update_mode=cfg.state_update_mode,
            method=cfg.scan_method, chunk_size=cfg.chunk_size)
        return new_state, _masked_mean(beta, slot_valid)

    def _corrections(self, reads, dtype):
        cfg = self.config
        scale = cfg.scale
        deltas = {}
        for i, head in enumerate(DELTA_HEADS):
            if head not in cfg.delta_heads:
                continue
            m = 1.0
            if cfg.trainable_delta_scale:
                raw = self.delta_scale_raw[...].astype(jnp.float32)
                m = jax.nn.sigmoid(raw[0 if raw.shape[0] == 1 else i]) * cfg.delta_scale_max
            u = getattr(self, f"delta_{head}_proj")[...].astype(jnp.float32)
            delta = (scale * m) * jnp.einsum("btr,ro->bto", reads, u,
                                             precision=jax.lax.Precision.HIGHEST)
            if head == "o" and cfg.delta_o_rmsnorm:
                ms = jnp.mean(jnp.square(delta), axis=-1, keepdims=True)
                delta = delta * jax.lax.rsqrt(ms + cfg.delta_o_rmsnorm_eps)
                delta = delta * self.delta_o_rmsnorm_weight[...].astype(jnp.float32)
            deltas[head] = delta.astype(dtype)
        return deltas


# ---------------------------------------------------------------------------
# Span-mean writes


def span_ids(granularity, message_ids, sentence_ids, valid):
    """(span id, takes part) per token for a span write mode; clear errors otherwise."""
    B, T = valid.shape
    if message_ids is None:
        raise ValueError(
            f"memory_write_granularity={granularity!r} writes need message_ids [B, T] "
            "(−1 = no span); got none. (The authors silently fall back to token writes.)")
    arrays = {"message_ids": message_ids}
    if granularity == "sentence_mean":
        if sentence_ids is None:
            raise ValueError("memory_write_granularity='sentence_mean' writes need both "
                             "message_ids and sentence_ids [B, T]; sentence_ids is missing")
        arrays["sentence_ids"] = sentence_ids
    for name, a in arrays.items():
        if tuple(jnp.shape(a)) != (B, T):
            raise ValueError(f"{name} must be [B, T] = {(B, T)}, got {jnp.shape(a)}")
        if not jnp.issubdtype(jnp.result_type(a), jnp.integer):
            raise TypeError(f"{name} must be an integer array, got {jnp.result_type(a)}")
    msg = jnp.asarray(message_ids)
    participate = valid & (msg >= 0)
    ids = msg
    if granularity == "sentence_mean":
        sent = jnp.asarray(sentence_ids)
        participate = participate & (sent >= 0)
        ids = sent
    if not isinstance(participate, jax.core.Tracer) and not bool(jnp.any(participate)):
        raise ValueError(f"{granularity} write pass has no token with a usable span id "
                         "(valid and id ≥ 0) in the whole batch")
    return ids, participate


def span_means(h, ids, participate, num_slots: int):
    """Mean of ``h`` over each span, spans ordered by increasing id per row.

    Ids are replaced by their dense rank within the row (absent ids are simply
    skipped), so any id values work with a static number of slots. Returns means
    ``[B, num_slots, d]`` and which slots hold a span ``[B, num_slots]``.
    """
    B, T = ids.shape
    big = jnp.iinfo(jnp.int32).max
    x = jnp.where(participate, ids.astype(jnp.int32), big)
    order = jnp.argsort(x, axis=-1, stable=True)
    xs = jnp.take_along_axis(x, order, axis=-1)
    new = jnp.concatenate([jnp.ones((B, 1), bool), xs[:, 1:] != xs[:, :-1]], axis=-1)
    rank_sorted = jnp.cumsum(new, axis=-1) - 1
    rank = jnp.zeros((B, T), jnp.int32).at[jnp.arange(B)[:, None], order].set(rank_sorted)
    slot = jnp.where(participate & (rank < num_slots), rank, num_slots)
    seg = jax.vmap(lambda a, s: jax.ops.segment_sum(a, s, num_segments=num_slots + 1))
    sums = seg(h, slot)[:, :num_slots]
    counts = seg(participate.astype(h.dtype), slot)[:, :num_slots]
    means = sums / jnp.maximum(counts, 1.0)[..., None]
    return means, counts > 0


# ---------------------------------------------------------------------------


def _heads_first(x):
    """[B, S, H, r] -> [B, H, S, r]."""
    return jnp.swapaxes(x, 1, 2)


def _masked_mean(x, valid):
    """Mean of ``x`` ``[B, S, H, g]`` over valid positions and all gates."""
    w = valid.astype(x.dtype)[:, :, None, None]
    count = jnp.sum(w) * x.shape[-1] * x.shape[-2]
    return jnp.sum(x * w) / jnp.maximum(count, 1.0)


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total
