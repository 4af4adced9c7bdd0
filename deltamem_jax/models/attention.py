"""Every attention implementation behind one function, :func:`attention`.

All of them compute the same thing: softmax attention with GQA, scores and softmax
in float32, where a query at slot i may attend to keys at slots j ≤ i whose
``key_mask`` is set (slots order a KV cache left to right, so left- and
right-padded rows both work). They differ in how:

* ``"xla"`` — the plain path: the whole [T, S] score matrix at once (or query
  blocks of ``attention_chunk_size``, each rematerialised in the backward pass).
  Always available; the reference the others are tested against.
* ``"blocked"`` — block-causal flash attention in plain JAX: queries and keys in
  blocks, blocks that the causal mask hides entirely are never computed, an
  online softmax with float32 accumulators, and a hand-written backward pass
  that recomputes the scores block by block (no [T, S] array in either
  direction). The CPU path, and a fallback anywhere.
* ``"cudnn"`` — ``jax.nn.dot_product_attention(implementation="cudnn")`` (NVIDIA
  GPUs, bf16/fp16, head_dim ≤ 128 and a multiple of 8) for causal prefill.
* ``"splash"`` — the Pallas splash-attention kernel shipped with JAX (TPUs) for
  causal prefill, padding as segment ids.

``"auto"`` (see :func:`resolve_impl`) takes ``blocked`` on CPU, ``cudnn`` on GPU
and ``splash`` on TPU where they apply, and ``xla`` otherwise (e.g. decoding
from a KV cache on GPU/TPU, or float32 on GPU; the fused kernels named
explicitly also hand cache steps to ``xla``). Queries that may attend to no
key at all (padding) get an arbitrary finite output in every implementation.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from deltamem_jax.models.config import ATTENTION_IMPLS as IMPLEMENTATIONS
from deltamem_jax.utils.sharding import current_rules, logical_spec

# Block sizes of "blocked" (measured on a 2-core CPU, T = 2K-8K: 256 × 256 beat 128 and 512;
# score arrays of many MiB fall off a cliff in XLA:CPU dots).
BLOCK_Q = 256
BLOCK_K = 256
SPLASH_BLOCK = 512             # splash block size (sequences are padded to a multiple of 128)
_NEG_INF = -1e30               # "xla": masked scores (a fully masked row averages all values)


def attention(q, k, v, key_mask, query_slots, key_slots, groups: int, *, impl: str = "xla",
              chunk: int = 0, prefill: bool = False):
    """Softmax attention with GQA; scores and softmax in float32.

    q ``[B, T, nh, hd]``; k, v ``[B, S, nkv, hd]`` (``nh = groups · nkv``);
    key_mask ``[B, S]``; query_slots ``[T]``, key_slots ``[S]`` (non-decreasing).
    ``impl``: one of :data:`IMPLEMENTATIONS`. ``chunk`` > 0 processes queries in
    blocks of that size (``xla``; ``blocked``: query and key blocks). ``prefill``: the keys
    are these queries' own (no cache: S = T, slots 0..T-1), which the fused kernels need.
    """
    impl = resolve_impl(impl, dtype=q.dtype, head_dim=q.shape[-1], prefill=prefill)
    if impl == "xla":
        return xla_attention(q, k, v, key_mask, query_slots, key_slots, groups, chunk)
    if impl == "blocked":
        return blocked_attention(q, k, v, key_mask, query_slots, key_slots, groups,
                                 block_q=chunk or BLOCK_Q, block_k=chunk or BLOCK_K)
    if impl == "cudnn":
        fused = functools.partial(cudnn_attention, groups=groups, fallback_chunk=chunk)
    else:
        fused = functools.partial(splash_attention, groups=groups)
    return per_shard(fused, q, k, v, key_mask)


def per_shard(fn, q, k, v, key_mask):
    """``fn(q, k, v, key_mask)`` once per device shard under a mesh with logical rules.

    The fused kernels are custom calls that XLA cannot partition; ``shard_map``
    runs them on each device's rows (batch axes) and heads (when query and KV
    heads are split alike). Without a mesh or rules this is just ``fn(...)``.
    """
    rules, mesh = current_rules(), jax.sharding.get_abstract_mesh()
    if rules is None or mesh is None or mesh.empty:
        return fn(q, k, v, key_mask)
    batch = logical_spec(("batch",), rules)[0]
    heads = logical_spec(("heads",), rules)[0]
    if heads != logical_spec(("kv_heads",), rules)[0] or k.shape[2] % _size(mesh, heads):
        heads = None
    qs = jax.sharding.PartitionSpec(batch, None, heads, None)
    ms = jax.sharding.PartitionSpec(batch, None)
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        q, k, v, key_mask = (jax.reshard(x, p) for x, p in zip((q, k, v, key_mask),
                                                                (qs, qs, qs, ms)))
    return jax.shard_map(fn, mesh=mesh, in_specs=(qs, qs, qs, ms), out_specs=qs,
                         check_vma=False)(q, k, v, key_mask)


def _size(mesh, axes) -> int:
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[n] for n in names)


def resolve_impl(impl: str, *, dtype, head_dim: int, prefill: bool,
                 backend: str | None = None) -> str:
    """The implementation ``impl`` stands for on ``backend`` (default: JAX's default).

    The fused kernels (``cudnn``, ``splash``) run causal prefill only; steps that
    attend to a KV cache take ``xla`` instead, whether chosen by ``auto`` or by name.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention_impl {impl!r}; expected one of {IMPLEMENTATIONS}")
    if impl in ("cudnn", "splash") and not prefill:
        return "xla"
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return "blocked"
    if backend in ("gpu", "cuda", "rocm"):
        return "cudnn" if prefill and cudnn_applies(dtype, head_dim) else "xla"
    if backend == "tpu":
        return "splash" if prefill else "xla"
    return "xla"


def cudnn_applies(dtype, head_dim: int) -> bool:
    """cuDNN flash attention's own limits: half-precision inputs, head_dim ≤ 128, % 8."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) \
        and head_dim <= 128 and head_dim % 8 == 0


# ---------------------------------------------------------------------------
# "xla": the whole score matrix


def xla_attention(q, k, v, key_mask, query_slots, key_slots, groups: int, chunk: int = 0):
    """The plain path. With ``chunk`` > 0 queries go in blocks of ``chunk`` (each
    rematerialised in the backward pass), so the score matrix held at once is
    [chunk, S] instead of [T, S].
    """
    T = q.shape[1]
    if not chunk or T <= chunk:
        return _xla_block(q, k, v, key_mask, query_slots, key_slots, groups)
    B, _, nh, hd = q.shape
    pad = (-T) % chunk
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    slots = jnp.pad(query_slots, (0, pad), mode="edge")
    blocks = (jnp.moveaxis(q.reshape(B, -1, chunk, nh, hd), 1, 0), slots.reshape(-1, chunk))

    @jax.checkpoint
    def one(block):
        return _xla_block(block[0], k, v, key_mask, block[1], key_slots, groups)
    out = jax.lax.map(one, blocks)
    return jnp.moveaxis(out, 0, 1).reshape(B, -1, nh, hd)[:, :T]


def _xla_block(q, k, v, key_mask, query_slots, key_slots, groups: int):
    B, T, nh, hd = q.shape
    nkv = k.shape[2]
    qg = q.reshape(B, T, nkv, groups, hd)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (hd ** -0.5)
    allowed = (key_slots[None, :] <= query_slots[:, None])[None] & key_mask[:, None, :]  # [B,T,S]
    scores = jnp.where(allowed[:, None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(B, T, nh, hd)


# ---------------------------------------------------------------------------
# "blocked": block-causal flash attention in plain JAX


def blocked_attention(q, k, v, key_mask, query_slots, key_slots, groups: int,
                      block_q: int = BLOCK_Q, block_k: int = BLOCK_K):
    """Flash attention over (query block, key block) pairs, skipping hidden blocks.

    Query block i visits key blocks 0 … n_i − 1, where n_i counts the blocks whose
    first slot is ≤ the block's last query slot (key slots are non-decreasing), so
    a causal prefill computes about half the pairs and a decoding step only the
    cache blocks filled so far. The trip counts are data (they follow the cache
    index), hence ``while`` loops and a hand-written VJP: the backward pass
    recomputes each pair's probabilities from the saved log-sum-exp.
    """
    bq, bk = min(block_q, q.shape[1]), min(block_k, k.shape[1])
    return _blocked(q, k, v, key_mask, query_slots, key_slots, groups, bq, bk)


def key_block_counts(query_slots, key_slots, bq: int, bk: int):
    """Per query block, how many key blocks it visits (the rest are hidden by causality).

    Key block j is visited iff its first slot ≤ the block's last query slot; with
    non-decreasing key slots those are blocks 0 … n_i − 1.
    """
    nq = -(-query_slots.shape[0] // bq)
    last = jnp.pad(query_slots, (0, nq * bq - query_slots.shape[0]), mode="edge")
    last = last.reshape(nq, bq).max(axis=1)
    first = key_slots[np.arange(-(-key_slots.shape[0] // bk)) * bk]
    return jnp.sum(first[None, :] <= last[:, None], axis=1)


def _layout(q, query_slots, groups: int, bq: int):
    """q [B, T, nh, hd] → blocks [nq, B, nkv, g·bq, hd]; slots → [nq, bq] (edge-padded)."""
    B, T, nh, hd = q.shape
    nkv = nh // groups
    nq = -(-T // bq)
    pad = nq * bq - T
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q = q.reshape(B, nq, bq, nkv, groups, hd).transpose(1, 0, 3, 4, 2, 5)
    slots = jnp.pad(query_slots, (0, pad), mode="edge").reshape(nq, bq)
    return q.reshape(nq, B, nkv, groups * bq, hd), slots


def _unlayout(x, B: int, T: int, groups: int, bq: int):
    nq, _, nkv, _, hd = x.shape
    x = x.reshape(nq, B, nkv, groups, bq, hd).transpose(1, 0, 4, 2, 3, 5)
    return x.reshape(B, nq * bq, nkv * groups, hd)[:, :T]


class _Keys:
    """Key/value block j of [B, S, nkv, hd] arrays without copying the whole cache.

    The last block's start is clamped so that it stays in bounds; keys it shares
    with the block before are masked out (``pos ≥ j·bk``).
    """

    def __init__(self, k, v, key_mask, key_slots, bk: int):
        self.k, self.v, self.key_mask, self.key_slots, self.bk = k, v, key_mask, key_slots, bk
        S = k.shape[1]
        self.S = S
        self.n = -(-S // bk)
        ends = (np.arange(self.n) + 1) * bk
        self.first_slot = key_slots[np.arange(self.n) * bk]                  # [nk]
        self.last_slot = key_slots[np.minimum(ends, S) - 1]
        self.whole = jnp.asarray(ends <= S)                                  # not clamped

    def interior(self, first_query_slot):
        """How many leading key blocks every query of a block (first slot given) sees
        entirely by causality: they need the padding mask only."""
        return jnp.sum(self.whole & (self.last_slot <= first_query_slot))

    def start(self, j):
        return jnp.minimum(j * self.bk, self.S - self.bk)

    def block(self, j):
        """(k, v) as [B, nkv, bk, hd]; mask info: slots [bk], usable [B, bk]."""
        start = self.start(j)
        kb = jax.lax.dynamic_slice_in_dim(self.k, start, self.bk, axis=1).transpose(0, 2, 1, 3)
        vb = jax.lax.dynamic_slice_in_dim(self.v, start, self.bk, axis=1).transpose(0, 2, 1, 3)
        slots = jax.lax.dynamic_slice_in_dim(self.key_slots, start, self.bk)
        usable = jax.lax.dynamic_slice_in_dim(self.key_mask, start, self.bk, axis=1)
        usable = usable & (start + jnp.arange(self.bk) >= j * self.bk)[None]
        return kb, vb, slots, usable


def _pair_scores(qb, q_slots, kb, k_slots, usable, groups: int, causal: bool):
    """Scores of one block pair from pre-scaled queries, [B, nkv, g·bq, bk] float32,
    −inf where hidden. ``causal=False``: a block every query sees (padding mask only,
    an additive bias instead of a [bq, bk] comparison)."""
    B, nkv, m, _ = qb.shape
    bq, bk = m // groups, kb.shape[2]
    s = jnp.einsum("bkmh,bksh->bkms", qb, kb, preferred_element_type=jnp.float32)
    if not causal:
        return s + jnp.where(usable, 0.0, -jnp.inf)[:, None, None, :]
    allowed = (k_slots[None, :] <= q_slots[:, None])[None] & usable[:, None, :]    # [B, bq, bk]
    s = jnp.where(allowed[:, None, None], s.reshape(B, nkv, groups, bq, bk), -jnp.inf)
    return s.reshape(B, nkv, m, bk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _blocked(q, k, v, key_mask, query_slots, key_slots, groups, bq, bk):
    return _blocked_fwd(q, k, v, key_mask, query_slots, key_slots, groups, bq, bk)[0]


def _blocked_fwd(q, k, v, key_mask, query_slots, key_slots, groups, bq, bk):
    B, T, _, hd = q.shape
    qb, q_slots = _layout(q * jnp.asarray(hd ** -0.5, q.dtype), query_slots, groups, bq)
    keys = _Keys(k, v, key_mask, key_slots, bk)
    counts = key_block_counts(query_slots, key_slots, bq, bk)

    def one_query_block(x):
        qi, slots_i, n_i = x

        def visit(causal):
            def body(j, carry):
                m, denom, acc = carry
                kb, vb, k_slots, usable = keys.block(j)
                s = _pair_scores(qi, slots_i, kb, k_slots, usable, groups, causal)
                m_new = jnp.maximum(m, s.max(axis=-1))
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                p = jnp.exp(s - m_use[..., None])
                alpha = jnp.exp(m - m_use)
                pv = jnp.einsum("bkms,bksh->bkmh", p.astype(vb.dtype), vb,
                                preferred_element_type=jnp.float32)
                return m_new, denom * alpha + p.sum(axis=-1), acc * alpha[..., None] + pv
            return body

        shape = qi.shape[:-1]
        init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(qi.shape, jnp.float32))
        inner = jnp.minimum(keys.interior(slots_i[0]), n_i)
        carry = jax.lax.fori_loop(0, inner, visit(False), init)
        m, denom, acc = jax.lax.fori_loop(inner, n_i, visit(True), carry)
        seen = denom > 0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, denom, 1.0)[..., None], 0.0)
        lse = jnp.where(seen,
                        jnp.where(m == -jnp.inf, 0.0, m) + jnp.log(jnp.where(seen, denom, 1.0)),
                        jnp.inf)
        return out, lse

    out_b, lse = jax.lax.map(one_query_block, (qb, q_slots, counts))
    out = _unlayout(out_b, B, T, groups, bq).astype(q.dtype)
    return out, (q, k, v, key_mask, query_slots, key_slots, out, lse)


def _blocked_bwd(groups, bq, bk, res, g_out):
    q, k, v, key_mask, query_slots, key_slots, out, lse = res
    B, T, _, hd = q.shape
    scale = hd ** -0.5
    qb, q_slots = _layout(q * jnp.asarray(scale, q.dtype), query_slots, groups, bq)
    dob, _ = _layout(g_out.astype(jnp.float32), query_slots, groups, bq)
    ob, _ = _layout(out.astype(jnp.float32), query_slots, groups, bq)
    delta = jnp.sum(dob * ob, axis=-1)                               # [nq, B, nkv, m]
    keys = _Keys(k, v, key_mask, key_slots, bk)
    nq = qb.shape[0]
    # key block j is seen by query blocks first_i(j) … nq − 1 (query slots increase), and
    # entirely (no causal mask) from inner_i(j) on
    first_i = jnp.sum(q_slots.max(axis=1)[None, :] < keys.first_slot[:, None], axis=1)
    inner_i = jnp.where(keys.whole, jnp.sum(q_slots[:, 0][None, :] < keys.last_slot[:, None],
                                            axis=1), nq)
    inner_i = jnp.maximum(inner_i, first_i)
    cdt = q.dtype

    def one_key_block(carry, j):
        dq, dk, dv = carry
        kb, vb, k_slots, usable = keys.block(j)

        def visit(causal):
            def body(i, inner):
                dq, dk_j, dv_j = inner
                qi, doi = qb[i], dob[i]
                s = _pair_scores(qi, q_slots[i], kb, k_slots, usable, groups, causal)
                p = jnp.exp(s - lse[i][..., None])
                dv_j = dv_j + jnp.einsum("bkms,bkmh->bksh", p.astype(cdt), doi.astype(cdt),
                                         preferred_element_type=jnp.float32)
                dp = jnp.einsum("bkmh,bksh->bkms", doi.astype(cdt), vb,
                                preferred_element_type=jnp.float32)
                ds = (p * (dp - delta[i][..., None])).astype(cdt)
                dq_i = jnp.einsum("bkms,bksh->bkmh", ds, kb, preferred_element_type=jnp.float32)
                dq = dq.at[i].add(dq_i * scale)
                dk_j = dk_j + jnp.einsum("bkms,bkmh->bksh", ds, qi,
                                         preferred_element_type=jnp.float32)
                return dq, dk_j, dv_j
            return body

        zeros = jnp.zeros(kb.shape, jnp.float32)
        inner = jax.lax.fori_loop(first_i[j], inner_i[j], visit(True), (dq, zeros, zeros))
        dq, dk_j, dv_j = jax.lax.fori_loop(inner_i[j], nq, visit(False), inner)
        start = keys.start(j)
        add = lambda buf, blk: jax.lax.dynamic_update_slice_in_dim(
            buf, jax.lax.dynamic_slice_in_dim(buf, start, bk, axis=1)
            + blk.transpose(0, 2, 1, 3), start, axis=1)
        return (dq, add(dk, dk_j), add(dv, dv_j)), None

    init = (jnp.zeros(qb.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
            jnp.zeros(v.shape, jnp.float32))
    (dq, dk, dv), _ = jax.lax.scan(one_key_block, init, jnp.arange(keys.n))
    dq = _unlayout(dq, B, T, groups, bq).astype(q.dtype)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# ---------------------------------------------------------------------------
# "cudnn": NVIDIA's fused kernel


def cudnn_attention(q, k, v, key_mask, *, groups: int, fallback_chunk: int = 0):
    """Causal prefill through cuDNN flash attention (GQA native, no [T, S] array).

    cuDNN takes padding as per-row lengths, i.e. right padding. Rows padded on the
    left (generation prompts) go through the ``xla`` path instead; the choice is a
    ``lax.cond`` on the mask, so both are compiled and the data picks.
    """
    T = q.shape[1]
    lengths = jnp.sum(key_mask, axis=1, dtype=jnp.int32)
    right_padded = jnp.all(key_mask == (jnp.arange(T)[None, :] < lengths[:, None]))

    def fused(q, k, v):
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, query_seq_lengths=lengths,
            key_value_seq_lengths=lengths, implementation="cudnn")

    def plain(q, k, v):
        slots = jnp.arange(T)
        return xla_attention(q, k, v, key_mask, slots, slots, groups, fallback_chunk)
    return jax.lax.cond(right_padded, fused, plain, q, k, v)


# ---------------------------------------------------------------------------
# "splash": the Pallas TPU kernel


def splash_attention(q, k, v, key_mask, *, groups: int, interpret: bool = False,
                     block: int = SPLASH_BLOCK):
    """Causal prefill through JAX's Pallas splash-attention kernel (TPU).

    Padding becomes segment ids (real tokens 1, padding 0, the tail added to reach
    a multiple of 128 → 2), so a real query sees only earlier real keys. GQA runs
    the multi-query kernel once per KV head (``vmap``), batch rows by ``vmap`` too.
    ``interpret=True`` runs the kernel in Pallas interpret mode (any backend).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    B, T, nh, hd = q.shape
    nkv = k.shape[2]
    Tp = -(-T // 128) * 128
    blk = math.gcd(min(block, Tp), Tp)
    pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
    seg = jnp.pad(key_mask.astype(jnp.int32), ((0, 0), (0, Tp - T)), constant_values=2)
    qh = jnp.pad(q * jnp.asarray(hd ** -0.5, q.dtype), pad)
    qh = qh.reshape(B, Tp, nkv, groups, hd).transpose(0, 2, 3, 1, 4)   # [B, nkv, g, Tp, hd]
    kh = jnp.pad(k, pad).transpose(0, 2, 1, 3)                           # [B, nkv, Tp, hd]
    vh = jnp.pad(v, pad).transpose(0, 2, 1, 3)
    mask = sm.MultiHeadMask([sm.CausalMask((Tp, Tp)) for _ in range(groups)])
    sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                          block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                          block_kv_dq=blk)
    kernel = sk.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)

    def one_row(qr, kr, vr, sr):
        ids = sk.SegmentIds(q=sr, kv=sr)
        return jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=ids))(qr, kr, vr)
    out = jax.vmap(one_row)(qh, kh, vh, seg)                             # [B, nkv, g, Tp, hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Tp, nh, hd)[:, :T].astype(q.dtype)
