"""The δ-mem recurrence (OSAM): a row-gated delta rule over small r×r states.

Pure JAX, no Flax: anyone can lift this file out. For every batch entry the state
``S`` (r×r, row i = value index, column j = key index) evolves token by token,
*read before write*::

    read_t = m_t · S_{t-1} q_t
    S_t    = keep_t ⊙ S_{t-1} − erase_t ⊙ (S_{t-1} k_t) k_tᵀ + write_t ⊙ v_t k_tᵀ

where ``⊙`` scales row i by entry i of the gate vector and invalid tokens
(``m_t = 0``) read zero and leave ``S`` unchanged. The update mode maps (β, λ) to
(keep, erase, write); see :func:`update_gates`.

Three interchangeable methods give the same answers (to float32 rounding):

* ``"sequential"``: ``lax.scan`` over tokens. Its gradient is a hand-written
  reverse scan that stores only one state per ``chunk_size`` tokens and
  recomputes the rest, so memory stays O(T / chunk_size) states.
* ``"associative"``: ``lax.associative_scan`` over the per-row affine maps
  ``s ↦ s A_t + b_t``; O(log T) depth but O(T r³) memory.
* ``"chunked"``: ``lax.scan`` over chunks; inside a chunk the delta rule is solved
  in closed (WY) form with matmuls only, so the serial depth is T / chunk_size.
* ``"pallas"``: one fused Pallas kernel per direction (``osam_pallas.py``): the
  state stays in registers / VMEM and the token loop runs inside the kernel
  (Mosaic on TPU, Triton on GPU, interpret mode elsewhere: slow, for tests).

``"auto"`` picks ``sequential`` on CPU (measured fastest there by far) and
``chunked`` on TPU/GPU (short serial depth, matmul-shaped work; no accelerator
measurement yet: ``python -m deltamem_jax.tools.bench accel`` times every method
there). All arithmetic runs in float32 at full matmul precision whatever the
input dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from deltamem_jax.memory.config import METHODS, UPDATE_MODES
from deltamem_jax.memory.osam_pallas import pallas_scan

__all__ = [
    "METHODS",
    "UPDATE_MODES",
    "osam_read",
    "osam_scan",
    "resolve_method",
    "update_gates",
]


_HIGHEST = jax.lax.Precision.HIGHEST
_LOG_FLOOR = 1e-30  # keep-gates below this are treated as this in log space (chunked)
# Token-loop unroll of the sequential method. 1 is fastest on XLA:CPU: unrolling
# lets the fusion pass inline each step's state update into the next step's
# reductions, recomputing it (T = 8K, batch×heads 8, r = 8, forward CPU time:
# unroll 1 / 4 / 8 = 7.2 / 15.7 / 30.7 ms).
SEQUENTIAL_UNROLL = 1


def _einsum(spec, *operands):
    return jnp.einsum(spec, *operands, precision=_HIGHEST)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _fsum(x, axis):
    """``jnp.sum(x, axis)`` that XLA:CPU keeps in its own fused loops.

    XLA:CPU (jaxlib 0.10) hands plain add-reductions of ≥ 4K elements to YNNPACK,
    which is 3-5× slower than XLA's own code at these small shapes (the sequential
    backward at T = 8K: 95 ms with ``jnp.sum``, 36 ms with this). The reducer
    ``a - (-b)`` is the same IEEE addition but not pattern-matched, so the
    reduction stays in XLA.
    """
    return jax.lax.reduce(x, jnp.zeros((), x.dtype), lambda a, b: a - (-b),
                          (axis % x.ndim,))


@_fsum.defjvp
def _fsum_jvp(axis, primals, tangents):
    return _fsum(primals[0], axis), jnp.sum(tangents[0], axis=axis)


def _matmul(a, b):
    """Batched ``a @ b`` of small matrices, exact in float32 on every backend.

    On CPU, for inner dimensions up to 16, a broadcast product and a reduction:
    XLA:CPU runs batched dots of such small matrices as one tiny GEMM call per
    batch entry, which made them most of the chunked method's time. Elsewhere
    (and for larger blocks) a matmul, the matrix units' job.
    """
    if (jax.default_backend() == "cpu" and a.shape[-1] <= _ELEMENTWISE_MATMUL_MAX
            and a.shape[:-2] == b.shape[:-2]):
        return _ew_matmul(a, b)
    return jnp.matmul(a, b, precision=_HIGHEST)


_ELEMENTWISE_MATMUL_MAX = 16


@jax.custom_jvp
def _ew_matmul(a, b):
    return _fsum(a[..., :, :, None] * b[..., None, :, :], -2)


@_ew_matmul.defjvp
def _ew_matmul_jvp(primals, tangents):
    # Tangents as matmuls: linear, so reverse mode can transpose them. (A custom_vjp
    # with elementwise cotangent products halves the chunked backward on CPU again,
    # 1.0 s → 0.57 s at T = 8K, C = 16, but would lose forward-mode AD.)
    (a, b), (da, db) = primals, tangents
    return _ew_matmul(a, b), (jnp.matmul(da, b, precision=_HIGHEST)
                              + jnp.matmul(a, db, precision=_HIGHEST))


def _rowdot(m, x):
    """``m @ x`` for stacks of small matrices: Σ_j m[..., i, j] x[..., j]."""
    return _fsum(m * x[..., None, :], -1)


def resolve_method(method: str) -> str:
    """Map ``"auto"`` to the concrete method for the default backend."""
    if method not in METHODS:
        raise ValueError(f"unknown OSAM method {method!r}; expected one of {METHODS}")
    if method != "auto":
        return method
    return "sequential" if jax.default_backend() == "cpu" else "chunked"


def update_gates(beta, lam, update_mode: str = "standard"):
    """(keep, erase, write) gates from β and λ for one of :data:`UPDATE_MODES`.

    ``standard``: (λ, β, β); ``lambda_outside``: (λ, λ·β, β); ``no_lambda``: (1, β, β).
    ``lam=None`` means coupled gates, λ = 1 − β.
    """
    if update_mode not in UPDATE_MODES:
        raise ValueError(
            f"unknown state_update_mode {update_mode!r}; expected one of {UPDATE_MODES}")
    if lam is None:
        lam = 1.0 - beta
    if update_mode == "standard":
        return lam, beta, beta
    if update_mode == "lambda_outside":
        return lam, lam * beta, beta
    return jnp.ones_like(beta), beta, beta


# ---------------------------------------------------------------------------
# Public entry points


def osam_scan(q, k, v, beta, lam=None, *, mask=None, initial_state=None,
              update_mode: str = "standard", method: str = "auto",
              chunk_size: int = 64):
    """Run the δ-mem write recurrence over a sequence; return reads and final state.

    Args:
      q, k: ``[..., T, r]`` read queries and write keys (already normalised).
      v: ``[..., T, r]`` values, one entry per state row.
      beta: ``[..., T, r]`` row-wise write strengths, or ``[..., T, 1]`` (one scalar
        gate per state, broadcast to its rows).
      lam: like ``beta``; ``None`` couples λ = 1 − β. Ignored by ``no_lambda``.
      mask: validity, broadcastable to ``[..., T]`` (bool or 0/1). ``None`` = all valid.
      initial_state: ``[..., r, r]`` carried state ``S_0``; ``None`` = zeros.
      update_mode: one of :data:`UPDATE_MODES`.
      method: one of :data:`METHODS`.
      chunk_size: chunk length of ``chunked``, and the recomputation interval of
        ``sequential``'s backward pass. Any positive int; T need not divide.
        (``pallas`` uses its own interval, ``osam_pallas.CHUNK``.)

    Returns:
      ``(reads, final_state)``: ``[..., T, r]`` and ``[..., r, r]``, both float32.
      Leading dims are the broadcast of all inputs' leading dims (several state
      heads are just another leading dim).
    """
    method = resolve_method(method)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    keep, erase, write = update_gates(beta, lam, update_mode)
    batch, T, r = _check_shapes(q, k, v, beta, lam, mask, initial_state)

    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    tok = lambda x: jnp.broadcast_to(f32(x), batch + (T, r))  # noqa: E731
    q, k, v, keep, erase, write = map(tok, (q, k, v, keep, erase, write))
    if mask is None:
        valid = jnp.ones(batch + (T,), bool)
    else:
        valid = jnp.broadcast_to(jnp.asarray(mask) != 0, batch + (T,))
    if initial_state is None:
        s0 = jnp.zeros(batch + (r, r), jnp.float32)
    else:
        s0 = jnp.broadcast_to(f32(initial_state), batch + (r, r))

    # Invalid tokens become identity maps: keep 1, erase 0, write 0.
    vm = valid[..., None]
    keep = jnp.where(vm, keep, 1.0)
    erase = jnp.where(vm, erase, 0.0)
    write = jnp.where(vm, write, 0.0)

    # Canonical layout for the cores: time-major, one flat batch axis.
    n = math.prod(batch)
    to_core = lambda x: jnp.moveaxis(x.reshape((n, T, r)), 1, 0)  # noqa: E731
    args = tuple(map(to_core, (q, k, v, keep, erase, write)))
    s0 = s0.reshape((n, r, r))
    if T == 0:
        reads, s_final = jnp.zeros((0, n, r), jnp.float32), s0
    elif method == "sequential":
        reads, s_final = _jit_sequential(*args, s0, chunk_size)
    elif method == "associative":
        reads, s_final = _jit_associative(*args, s0)
    elif method == "pallas":
        reads, s_final = _jit_pallas(*args, s0)
    else:
        reads, s_final = _jit_chunked(*args, s0, chunk_size)

    reads = jnp.moveaxis(reads, 0, 1).reshape(batch + (T, r))
    reads = jnp.where(vm, reads, 0.0)
    return reads, s_final.reshape(batch + (r, r))


def osam_read(state, q, mask=None):
    """Read-only pass: every valid token reads the carried state, ``S q_t``.

    ``state``: ``[..., r, r]``; ``q``: ``[..., T, r]``; ``mask`` broadcastable to
    ``[..., T]``. Returns float32 reads ``[..., T, r]`` (zero where invalid).
    """
    state = jnp.asarray(state, jnp.float32)
    q = jnp.asarray(q, jnp.float32)
    if state.ndim < 2 or state.shape[-1] != state.shape[-2] or q.shape[-1] != state.shape[-1]:
        raise ValueError(
            f"osam_read: state must be [..., r, r] and q [..., T, r] with the same r; "
            f"got state {state.shape}, q {q.shape}")
    reads = _einsum("...ij,...tj->...ti", state, q)
    if mask is not None:
        reads = jnp.where((jnp.asarray(mask) != 0)[..., None], reads, 0.0)
    return reads


def _check_shapes(q, k, v, beta, lam, mask, initial_state):
    """Validate shapes; return (broadcast leading dims, T, r)."""
    shapes = {"q": jnp.shape(q), "k": jnp.shape(k), "v": jnp.shape(v),
              "beta": jnp.shape(beta)}
    if lam is not None:
        shapes["lam"] = jnp.shape(lam)
    for name, shape in shapes.items():
        if len(shape) < 2:
            raise ValueError(f"osam_scan: {name} must be [..., T, r], got shape {shape}")
    T, r = shapes["q"][-2:]
    for name in ("k", "v"):
        if shapes[name][-2:] != (T, r):
            raise ValueError(
                f"osam_scan: {name} has shape {shapes[name]}, expected [..., {T}, {r}] like q")
    for name in ("beta", "lam"):
        if name in shapes and (shapes[name][-2] != T or shapes[name][-1] not in (1, r)):
            raise ValueError(
                f"osam_scan: {name} has shape {shapes[name]}, expected [..., {T}, {r}] "
                f"(rank-wise gates) or [..., {T}, 1] (one scalar gate per state)")
    lead = [s[:-2] for s in shapes.values()]
    if mask is not None:
        ms = jnp.shape(mask)
        if len(ms) < 1 or ms[-1] != T:
            raise ValueError(f"osam_scan: mask has shape {ms}, expected [..., {T}]")
        lead.append(ms[:-1])
    if initial_state is not None:
        ss = jnp.shape(initial_state)
        if len(ss) < 2 or ss[-2:] != (r, r):
            raise ValueError(
                f"osam_scan: initial_state has shape {ss}, expected [..., {r}, {r}]")
        lead.append(ss[:-2])
    try:
        batch = jnp.broadcast_shapes(*lead)
    except ValueError as e:
        raise ValueError(
            "osam_scan: leading (batch) dims do not broadcast: "
            + ", ".join(f"{n}{s}" for n, s in shapes.items())) from e
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta), ("lam", lam)):
        if x is not None and not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise TypeError(f"osam_scan: {name} must be floating point, got {jnp.result_type(x)}")
    return tuple(batch), T, r


# ---------------------------------------------------------------------------
# Cores. Layout: token arrays [T, N, r] (gates per row i), state [N, r, r].


def _step(s, q, k, v, keep, erase, write):
    """One token: returns (read, S_t) from S_{t-1}.

    Elementwise products and one reduction (not per-token dots, which XLA:CPU runs
    as separate, slower kernels): the loop body is two fusions.
    """
    qk = jnp.stack([q, k], axis=-2)                                   # [N, 2, r]
    read_proj = _fsum(s[..., None, :, :] * qk[..., :, None, :], -1)   # [N, 2, r]
    read, proj = read_proj[..., 0, :], read_proj[..., 1, :]
    u = write * v - erase * proj
    s = keep[..., None] * s + u[..., None] * k[..., None, :]
    return read, s


def _scan_tokens(s0, xs, unroll=1):
    def body(s, x):
        read, s = _step(s, *x)
        return s, read
    s, reads = jax.lax.scan(body, s0, xs, unroll=unroll)
    return reads, s


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _sequential(q, k, v, keep, erase, write, s0, chunk_size):
    """Token-by-token scan (the readable reference)."""
    del chunk_size
    return _scan_tokens(s0, (q, k, v, keep, erase, write), unroll=SEQUENTIAL_UNROLL)


def _pad_time(xs, multiple):
    """Pad (q, k, v, keep, erase, write) [T, ...] to a multiple of ``multiple``.

    Padding tokens are identity maps (keep 1, everything else 0).
    """
    pad = (-xs[0].shape[0]) % multiple
    if pad == 0:
        return xs
    fills = (0.0, 0.0, 0.0, 1.0, 0.0, 0.0)
    return tuple(jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], f, x.dtype)])
                 for x, f in zip(xs, fills))


def _blocks(x, c):
    return x.reshape((x.shape[0] // c, c) + x.shape[1:])


def _sequential_fwd(q, k, v, keep, erase, write, s0, chunk_size):
    T = q.shape[0]
    c = min(chunk_size, T)
    xs = _pad_time((q, k, v, keep, erase, write), c)

    def block(s, x):
        reads, s_next = _scan_tokens(s, x, unroll=SEQUENTIAL_UNROLL)
        return s_next, (reads, s)

    s_final, (reads, starts) = jax.lax.scan(block, s0, tuple(_blocks(x, c) for x in xs))
    reads = reads.reshape((-1,) + reads.shape[2:])[:T]
    return (reads, s_final), (xs, starts)


def _sequential_bwd(chunk_size, res, cotangents):
    """Reverse scan of the adjoint, recomputing states one chunk at a time.

    With G_t = ∂L/∂S_t, δ = G_t k_t and p = S_{t-1} k_t (per row):
    G_{t-1} = keep⊙G_t − erase⊙δ k_tᵀ + ρ_t q_tᵀ (ρ_t = ∂L/∂read_t), and the
    local gradients follow from differentiating one step of the update. Per chunk
    two token loops do only what is serial (the chunk's states S_{t-1}, then the
    adjoints G_t); the local gradients are then computed for the whole chunk at
    once from those two [c, N, r, r] stacks.
    """
    xs, starts = res
    g_reads, g_final = cotangents
    T_pad = xs[0].shape[0]
    T = g_reads.shape[0]
    c = T_pad // starts.shape[0]
    g_reads = jnp.concatenate(
        [g_reads, jnp.zeros((T_pad - T,) + g_reads.shape[1:], g_reads.dtype)])

    def recompute(s, x):
        k, v, keep, erase, write = x
        u = write * v - erase * _rowdot(s, k)
        return keep[..., None] * s + u[..., None] * k[..., None, :], s

    def adjoint(g, x):
        q, k, keep, erase, rho = x
        delta = _rowdot(g, k)
        g_prev = (keep[..., None] * g - (erase * delta)[..., None] * k[..., None, :]
                  + rho[..., None] * q[..., None, :])
        return g_prev, g

    def block(g, inp):
        s_start, rho, (q, k, v, keep, erase, write) = inp
        _, s_prev = jax.lax.scan(recompute, s_start, (k, v, keep, erase, write),
                                 unroll=SEQUENTIAL_UNROLL)
        g, gs = jax.lax.scan(adjoint, g, (q, k, keep, erase, rho), reverse=True,
                             unroll=SEQUENTIAL_UNROLL)
        # Whole chunk at once: gs[t] = G_t, s_prev[t] = S_{t-1}.
        delta = _rowdot(gs, k)
        proj = _rowdot(s_prev, k)
        u = write * v - erase * proj
        d_keep = _fsum(gs * s_prev, -1)
        d_k = _fsum(u[..., None] * gs - (erase * delta)[..., None] * s_prev, -2)
        d_q = _fsum(rho[..., None] * s_prev, -2)
        return g, (d_q, d_k, delta * write, d_keep, -delta * proj, delta * v)

    g0, grads = jax.lax.scan(
        block, g_final, (starts, _blocks(g_reads, c), tuple(_blocks(x, c) for x in xs)),
        reverse=True)
    grads = tuple(gr.reshape((T_pad,) + gr.shape[2:])[:T] for gr in grads)
    return grads + (g0,)


_sequential.defvjp(_sequential_fwd, _sequential_bwd)


def _associative(q, k, v, keep, erase, write, s0):
    """Prefix composition of the per-row affine maps s ↦ s A_t + b_t."""
    r = q.shape[-1]
    eye = jnp.eye(r, dtype=jnp.float32)
    kk = k[..., :, None] * k[..., None, :]                            # [T, N, r, r]
    A = keep[..., None, None] * eye - erase[..., None, None] * kk[:, :, None]  # [T,N,r_i,r,r]
    b = (write * v)[..., None] * k[:, :, None, :]                     # [T, N, r_i, r]

    def compose(first, second):
        a1, b1 = first
        a2, b2 = second
        return _matmul(a1, a2), _matmul(b1[..., None, :], a2)[..., 0, :] + b2

    prefix_a, prefix_b = jax.lax.associative_scan(compose, (A, b), axis=0)
    states = _einsum("nia,tniab->tnib", s0, prefix_a) + prefix_b      # S_1 .. S_T
    s_prev = jnp.concatenate([s0[None], states[:-1]], axis=0)
    reads = _einsum("tnij,tnj->tni", s_prev, q)
    return reads, states[-1]


def _unit_lower_inverse(m):
    """Inverse of unit-lower-triangular matrices ``[..., C, C]`` by recursive blocks.

    Matmuls only (no triangular solves: two batched solves in one XLA:CPU program
    can deadlock). Uses [[A,0],[B,D]]⁻¹ = [[A⁻¹,0],[−D⁻¹BA⁻¹,D⁻¹]], doubling the
    block size log₂C times. C is padded to a power of two with identity.
    """
    c = m.shape[-1]
    p = 1 << max(0, (c - 1).bit_length())
    if p != c:
        eye = jnp.eye(p, dtype=m.dtype)
        m = eye.at[:c, :c].set(0.0) + jnp.pad(m, [(0, 0)] * (m.ndim - 2) + [(0, p - c)] * 2)
    lead = m.shape[:-2]
    inv = jnp.ones(lead + (p, 1, 1), m.dtype)                         # 1×1 diagonal blocks
    b = 1
    while b < p:
        nb = p // (2 * b)
        blocks = m.reshape(lead + (nb, 2 * b, nb, 2 * b))
        blocks = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [..,nb,2b,2b]
        lower_left = blocks[..., b:, :b]
        pairs = inv.reshape(lead + (nb, 2, b, b))
        inv_a, inv_d = pairs[..., 0, :, :], pairs[..., 1, :, :]
        new_b = -_matmul(_matmul(inv_d, lower_left), inv_a)
        top = jnp.concatenate([inv_a, jnp.zeros_like(inv_a)], axis=-1)
        bottom = jnp.concatenate([new_b, inv_d], axis=-1)
        inv = jnp.concatenate([top, bottom], axis=-2)
        b *= 2
    return inv.reshape(lead + (p, p))[..., :c, :c]


def _chunk_wy(s0, x):
    """One chunk in closed form. x: token arrays [C, N, r]; s0: [N, r, r].

    Per row i with u_t = write_t v_t − erase_t (s_{t-1}·k_t) the state is
    s_t = γ(0→t) s_0 + Σ_{j≤t} γ(j→t) u_j k_jᵀ, γ(j→t) = Π_{j<m≤t} keep_m, so the
    u's solve a unit-lower-triangular system; reads and the chunk's final state
    are then masked matmuls. Decay products are sums of log-keeps over exactly
    the covered tokens (no cancellation, no exp(g_t)·exp(−g_s) factorisation).
    """
    q, k, v, keep, erase, write = x
    c = q.shape[0]
    rows = lambda a: jnp.moveaxis(a, 0, -1)          # [C, N, r] -> [N, r, C]  # noqa: E731
    keys = lambda a: jnp.moveaxis(a, 0, 1)           # [C, N, r] -> [N, C, r]  # noqa: E731
    v, keep, erase, write = map(rows, (v, keep, erase, write))
    q, k = keys(q), keys(k)

    log_keep = jnp.log(jnp.maximum(keep, _LOG_FLOOR))               # [N, r, C]
    t_idx = jnp.arange(c)
    after = t_idx[:, None] > t_idx[None, :]                         # [t, j]: j < t
    # D[t, j] = Σ_{j<m≤t} log keep_m, summing only the covered terms. The prefix sums
    # are matmuls with a 0/1 lower-triangular matrix: exact same terms as a cumsum,
    # but XLA:CPU lowers cumsum to an O(C²) reduce-window that dominated the chunk.
    upto = (t_idx[None, :] <= t_idx[:, None]).astype(jnp.float32)  # [t, m]: m ≤ t
    decay_incl = _einsum("tm,nimj->nitj", upto,
                         jnp.where(after, log_keep[..., :, None], 0.0))
    decay_prev = jnp.concatenate(                                   # D[t−1, j]
        [jnp.zeros_like(decay_incl[..., :1, :]), decay_incl[..., :-1, :]], axis=-2)
    w_prev = jnp.where(after, jnp.exp(jnp.where(after, decay_prev, 0.0)), 0.0)
    g_incl = _einsum("tm,nim->nit", upto, log_keep)                 # Σ_{m≤t}
    g_excl = jnp.concatenate([jnp.zeros_like(g_incl[..., :1]), g_incl[..., :-1]], axis=-1)

    kk = _einsum("ntc,nsc->nts", k, k)                              # [N, C, C]
    qk = _einsum("ntc,nsc->nts", q, k)
    s0_k = _einsum("nic,ntc->nit", s0, k)                           # [N, r, C]
    s0_q = _einsum("nic,ntc->nit", s0, q)

    system = erase[..., :, None] * w_prev * kk[:, None]             # [N, r, C, C]
    system = system + jnp.eye(c, dtype=system.dtype)
    rhs = write * v - erase * jnp.exp(g_excl) * s0_k
    u = _einsum("nits,nis->nit", _unit_lower_inverse(system), rhs)

    reads = jnp.exp(g_excl) * s0_q + _einsum("nits,nts,nis->nit", w_prev, qk, u)
    w_end = jnp.exp(decay_incl[..., -1, :])                         # γ(j→C), [N, r, C]
    s_new = (jnp.exp(g_incl[..., -1])[..., None] * s0
             + _einsum("nij,njc->nic", w_end * u, k))
    return s_new, jnp.moveaxis(reads, -1, 0)


def _chunked(q, k, v, keep, erase, write, s0, chunk_size):
    T = q.shape[0]
    c = min(chunk_size, T)
    xs = _pad_time((q, k, v, keep, erase, write), c)
    body = jax.checkpoint(_chunk_wy)
    s_final, reads = jax.lax.scan(body, s0, tuple(_blocks(x, c) for x in xs))
    return reads.reshape((-1,) + reads.shape[2:])[:T], s_final


# Jitted cores: one compiled program per shape even when called eagerly (inlined
# when the caller is itself jitted).
_jit_sequential = jax.jit(_sequential, static_argnums=7)
_jit_associative = jax.jit(_associative)
_jit_chunked = jax.jit(_chunked, static_argnums=7)
_jit_pallas = jax.jit(pallas_scan)


def _sequential_autodiff(q, k, v, keep, erase, write, s0):
    """The plain scan without the custom VJP (for tests and benchmarks)."""
    return _scan_tokens(s0, (q, k, v, keep, erase, write))
