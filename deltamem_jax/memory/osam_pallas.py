"""The OSAM recurrence as one Pallas kernel per direction (``osam_scan(method="pallas")``).

Pure JAX + Pallas, no Flax. The forward kernel holds each sequence's r×r state in
registers / VMEM and runs the token loop inside the kernel; the backward kernel
walks the chunks in reverse, recomputes the states of one chunk from the state
saved at its start (every :data:`CHUNK` tokens, like the ``custom_vjp`` of the
sequential method) and runs the adjoint recurrence (see ``osam._sequential_bwd``).

Layout inside the kernels: the flat batch (batch × state heads) is the minor
(lane) axis, tiled by the grid, and the state is stored transposed, ``ST[j, i, n]
= S[n, i, j]`` (key index first), so that the reads ``S q`` and projections
``S k`` are sums over the leading axis: plain vector adds.

One variant per target, chosen when lowering (``lax.platform_dependent``):

* TPU (Mosaic): grid (lane tiles of 128, time blocks of :data:`TPU_TIME_BLOCK`);
  time is the sequential grid axis, the state is carried in a VMEM scratch.
* GPU (Triton): grid (lane tiles of :data:`GPU_LANES`,); each program loops over
  all T tokens, loading one token's [r, lanes] tile at a time.
* anywhere else (CPU): the GPU variant in Pallas interpret mode (slow; for tests).

Exact in float32: the same products and sums as the sequential method, token by
token, with r (rows) and lanes padded to what the targets need (padded lanes and
rows are identity maps / zero states that stay zero).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

CHUNK = 8               # tokens unrolled per inner step; backward recompute interval
GPU_LANES = 16          # sequences per Triton program (a power of two)
TPU_LANES = 128         # sequences per Mosaic grid step (one vreg of lanes)
TPU_TIME_BLOCK = 128    # tokens per Mosaic grid step (VMEM: 13 arrays × 2 buffers × 512 KiB)
_FILLS = (0.0, 0.0, 0.0, 1.0, 0.0, 0.0)   # padding tokens (q, k, v, keep, erase, write)


# ---------------------------------------------------------------------------
# Public core: same signature and layout as osam's cores.


def pallas_scan(q, k, v, keep, erase, write, s0, chunk_size: int = CHUNK,
                variant: str | None = None):
    """reads [T, N, r], final state [N, r, r] from token arrays [T, N, r] and s0 [N, r, r].

    ``variant``: None = per platform when lowering; "tpu" / "gpu" force one
    kernel (with ``"…-interpret"`` for Pallas interpret mode, as tests do).
    ``chunk_size`` is the number of tokens unrolled per loop step and the
    interval of the states saved for the backward pass.
    """
    return _scan(q, k, v, keep, erase, write, s0, chunk_size, variant)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _scan(q, k, v, keep, erase, write, s0, chunk, variant):
    reads, s_final, _ = _forward(q, k, v, keep, erase, write, s0, chunk, variant, save=False)
    return reads, s_final


def _scan_fwd(q, k, v, keep, erase, write, s0, chunk, variant):
    reads, s_final, starts = _forward(q, k, v, keep, erase, write, s0, chunk, variant, save=True)
    return (reads, s_final), (q, k, v, keep, erase, write, starts)


def _scan_bwd(chunk, variant, res, cotangents):
    *tokens, starts = res
    g_reads, g_final = cotangents
    return _backward(tuple(tokens), starts, g_reads, g_final, chunk, variant)


_scan.defvjp(_scan_fwd, _scan_bwd)


# ---------------------------------------------------------------------------
# Layout: [T, N, r] ↔ kernel [T, r_p, N_p]; state [N, r, r] ↔ [r_p(j), r_p(i), N_p]


class _Plan:
    """Padded sizes and tiles for one variant."""

    def __init__(self, T: int, N: int, r: int, chunk: int, variant: str):
        self.variant, self.T, self.N, self.r = variant, T, N, r
        gpu = variant.startswith("gpu")
        self.rp = 1 << max(0, (r - 1).bit_length()) if gpu else r    # Triton: powers of two
        if gpu:
            self.lanes = min(GPU_LANES, 1 << max(0, (N - 1).bit_length()))
        else:
            self.lanes = min(TPU_LANES, N)
        self.Np = -(-N // self.lanes) * self.lanes
        self.chunk = chunk
        if gpu:
            self.Tp = -(-T // chunk) * chunk
            self.time_block = self.Tp
        else:
            self.time_block = -(-min(TPU_TIME_BLOCK, T) // chunk) * chunk
            self.Tp = -(-T // self.time_block) * self.time_block
        self.grid = (self.Np // self.lanes,) if gpu else (
            self.Np // self.lanes, self.Tp // self.time_block)
        self.interpret = variant.endswith("interpret")

    def tokens_in(self, xs, fills=_FILLS):
        """Token arrays [T, N, r] → [T_pad, r_pad, N_pad], padding with identity tokens."""
        pad = ((0, self.Tp - self.T), (0, self.rp - self.r), (0, self.Np - self.N))
        return [jnp.pad(jnp.swapaxes(x, 1, 2), pad, constant_values=fill)
                for x, fill in zip(xs, fills)]

    def tokens_out(self, x):
        return jnp.swapaxes(x[:self.T, :self.r, :self.N], 1, 2)

    def state_in(self, s):
        s = jnp.transpose(s, (2, 1, 0))                                     # [j, i, N]
        pad = ((0, self.rp - self.r), (0, self.rp - self.r), (0, self.Np - self.N))
        return jnp.pad(s, pad)

    def state_out(self, s):
        return jnp.transpose(s[:self.r, :self.r, :self.N], (2, 1, 0))

    # BlockSpecs -------------------------------------------------------------
    def _time_index(self, reverse: bool):
        nt = self.grid[-1] if len(self.grid) == 2 else 1
        if len(self.grid) == 1:
            return lambda n: (0, 0, n)
        if reverse:
            return lambda n, t: (nt - 1 - t, 0, n)
        return lambda n, t: (t, 0, n)

    def token_spec(self, reverse=False):
        return pl.BlockSpec((self.time_block, self.rp, self.lanes), self._time_index(reverse))

    def starts_spec(self, reverse=False):
        idx = self._time_index(reverse)                    # (time block, 0, lane tile)

        def index(*g):
            t, _, n = idx(*g)
            return t, 0, 0, n
        return pl.BlockSpec((self.time_block // self.chunk, self.rp, self.rp, self.lanes), index)

    def state_spec(self):
        if len(self.grid) == 1:
            return pl.BlockSpec((self.rp, self.rp, self.lanes), lambda n: (0, 0, n))
        return pl.BlockSpec((self.rp, self.rp, self.lanes), lambda n, t: (0, 0, n))

    def call(self, kernel, out_shape, in_specs, out_specs, scratch):
        kwargs = {}
        if self.interpret:
            kwargs["interpret"] = True
        elif self.variant == "gpu":
            from jax.experimental.pallas import triton as pltriton
            kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=4, num_stages=1)
        else:
            from jax.experimental.pallas import tpu as pltpu
            kwargs["compiler_params"] = pltpu.CompilerParams(
                dimension_semantics=("parallel", "arbitrary"))
        if scratch:
            from jax.experimental.pallas import tpu as pltpu
            kwargs["scratch_shapes"] = [pltpu.VMEM(s, jnp.float32) for s in scratch]
        return pl.pallas_call(kernel, grid=self.grid, in_specs=in_specs, out_specs=out_specs,
                              out_shape=out_shape, **kwargs)


def _per_platform(build, *args):
    """``build(variant)(*args)`` for the platform being lowered for."""
    return jax.lax.platform_dependent(
        *args, tpu=build("tpu"), cuda=build("gpu"), default=build("gpu-interpret"))


# ---------------------------------------------------------------------------
# One token (state layout ST[j, i, lanes]; token tiles [r, lanes])


def _step(s, k, v, keep, erase, write):
    proj = jnp.sum(s * k[:, None, :], axis=0)                          # (S k)[i]
    u = write * v - erase * proj
    return keep[None] * s + k[:, None, :] * u[None], proj, u


# ---------------------------------------------------------------------------
# Forward


def _forward(q, k, v, keep, erase, write, s0, chunk, variant, save: bool):
    T, N, r = q.shape

    def build(var):
        def run(q, k, v, keep, erase, write, s0):
            plan = _Plan(T, N, r, chunk, var)
            toks = plan.tokens_in((q, k, v, keep, erase, write))
            st = plan.state_in(s0)
            f32 = jnp.float32
            out_shape = [jax.ShapeDtypeStruct((plan.Tp, plan.rp, plan.Np), f32),
                         jax.ShapeDtypeStruct((plan.rp, plan.rp, plan.Np), f32)]
            out_specs = [plan.token_spec(), plan.state_spec()]
            if save:
                out_shape.append(jax.ShapeDtypeStruct(
                    (plan.Tp // chunk, plan.rp, plan.rp, plan.Np), f32))
                out_specs.append(plan.starts_spec())
            carried = len(plan.grid) == 2
            scratch = [(plan.rp, plan.rp, plan.lanes)] if carried else []
            kernel = functools.partial(_forward_kernel, chunk=chunk, save=save, carried=carried,
                                       n_time=plan.grid[-1] if carried else 1)
            outs = plan.call(kernel, tuple(out_shape), [plan.token_spec()] * 6
                             + [plan.state_spec()], tuple(out_specs), scratch)(*toks, st)
            reads, s_final = plan.tokens_out(outs[0]), plan.state_out(outs[1])
            if not save:
                return reads, s_final, jnp.zeros((0,), f32)
            starts = outs[2]
            return reads, s_final, _starts_to_canonical(starts, plan)
        return run

    variant = variant or None
    args = (q, k, v, keep, erase, write, s0)
    if variant is not None:
        return build(variant)(*args)
    return _per_platform(build, *args)


def _starts_to_canonical(starts, plan: _Plan):
    """Saved chunk-start states as [ceil(T / chunk), N, r, r] (the same for every variant)."""
    s = starts[:-(-plan.T // plan.chunk), :plan.r, :plan.r, :plan.N]
    return jnp.transpose(s, (0, 3, 2, 1))


def _starts_to_kernel(starts, plan: _Plan):
    s = jnp.transpose(starts, (0, 3, 2, 1))                                # [c, j, i, N]
    pad = ((0, plan.Tp // plan.chunk - s.shape[0]), (0, plan.rp - plan.r),
           (0, plan.rp - plan.r), (0, plan.Np - plan.N))
    return jnp.pad(s, pad)


def _forward_kernel(q_ref, k_ref, v_ref, keep_ref, erase_ref, write_ref, s0_ref, reads_ref,
                    sfin_ref, *rest, chunk: int, save: bool, carried: bool, n_time: int):
    starts_ref = rest[0] if save else None
    s_scr = rest[-1] if carried else None
    if carried:
        t_blk = pl.program_id(1)

        @pl.when(t_blk == 0)
        def _():
            s_scr[...] = s0_ref[...]
        s = s_scr[...]
    else:
        s = s0_ref[...]

    def one_chunk(c, s):
        if save:
            starts_ref[c] = s
        for u in range(chunk):
            t = c * chunk + u
            qt = q_ref[t]
            reads_ref[t] = jnp.sum(s * qt[:, None, :], axis=0)
            s, _, _ = _step(s, k_ref[t], v_ref[t], keep_ref[t], erase_ref[t], write_ref[t])
        return s

    s = jax.lax.fori_loop(0, q_ref.shape[0] // chunk, one_chunk, s)
    if carried:
        s_scr[...] = s

        @pl.when(t_blk == n_time - 1)
        def _():
            sfin_ref[...] = s
    else:
        sfin_ref[...] = s


# ---------------------------------------------------------------------------
# Backward


def _backward(tokens, starts, g_reads, g_final, chunk, variant):
    T, N, r = tokens[0].shape

    def build(var):
        def run(q, k, v, keep, erase, write, starts, g_reads, g_final):
            plan = _Plan(T, N, r, chunk, var)
            toks = plan.tokens_in((q, k, v, keep, erase, write))
            rho = plan.tokens_in((g_reads,), (0.0,))[0]
            st = _starts_to_kernel(starts, plan)
            gf = plan.state_in(g_final)
            f32 = jnp.float32
            tok_shape = jax.ShapeDtypeStruct((plan.Tp, plan.rp, plan.Np), f32)
            out_shape = (tok_shape,) * 6 + (jax.ShapeDtypeStruct((plan.rp,) * 2 + (plan.Np,),
                                                                 f32),)
            rev = plan.token_spec(reverse=True)
            carried = len(plan.grid) == 2
            scratch = [(plan.rp, plan.rp, plan.lanes)] if carried else []
            kernel = functools.partial(_backward_kernel, chunk=chunk, carried=carried,
                                       n_time=plan.grid[-1] if carried else 1)
            outs = plan.call(kernel, out_shape,
                             [rev] * 6 + [plan.starts_spec(reverse=True), rev, plan.state_spec()],
                             (rev,) * 6 + (plan.state_spec(),), scratch)(*toks, st, rho, gf)
            grads = tuple(plan.tokens_out(g) for g in outs[:6])
            return grads + (plan.state_out(outs[6]),)
        return run

    args = tokens + (starts, g_reads, g_final)
    if variant is not None:
        return build(variant)(*args)
    return _per_platform(build, *args)


def _backward_kernel(q_ref, k_ref, v_ref, keep_ref, erase_ref, write_ref, starts_ref, rho_ref,
                     gfin_ref, dq_ref, dk_ref, dv_ref, dkeep_ref, derase_ref, dwrite_ref, g0_ref,
                     *rest, chunk: int, carried: bool, n_time: int):
    g_scr = rest[0] if carried else None
    if carried:
        t_blk = pl.program_id(1)

        @pl.when(t_blk == 0)
        def _():
            g_scr[...] = gfin_ref[...]
        g = g_scr[...]
    else:
        g = gfin_ref[...]
    n_chunks = q_ref.shape[0] // chunk

    def one_chunk(cc, g):
        c = n_chunks - 1 - cc
        s = starts_ref[c]
        prev = []
        for u in range(chunk):                 # the chunk's states S_{t-1}, recomputed
            t = c * chunk + u
            prev.append(s)
            s, _, _ = _step(s, k_ref[t], v_ref[t], keep_ref[t], erase_ref[t], write_ref[t])
        for u in reversed(range(chunk)):       # adjoints G_t, newest first
            t = c * chunk + u
            sp = prev[u]
            qt, kt, vt = q_ref[t], k_ref[t], v_ref[t]
            keep, erase, write, rho = keep_ref[t], erase_ref[t], write_ref[t], rho_ref[t]
            delta = jnp.sum(g * kt[:, None, :], axis=0)                 # (G k)[i]
            proj = jnp.sum(sp * kt[:, None, :], axis=0)
            uu = write * vt - erase * proj
            ed = erase * delta
            dkeep_ref[t] = jnp.sum(g * sp, axis=0)
            dk_ref[t] = jnp.sum(uu[None] * g - ed[None] * sp, axis=1)
            dq_ref[t] = jnp.sum(rho[None] * sp, axis=1)
            dv_ref[t] = delta * write
            derase_ref[t] = -delta * proj
            dwrite_ref[t] = delta * vt
            g = keep[None] * g - kt[:, None, :] * ed[None] + qt[:, None, :] * rho[None]
        return g

    g = jax.lax.fori_loop(0, n_chunks, one_chunk, g)
    if carried:
        g_scr[...] = g

        @pl.when(t_blk == n_time - 1)
        def _():
            g0_ref[...] = g
    else:
        g0_ref[...] = g
