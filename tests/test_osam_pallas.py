"""The Pallas recurrence kernels: both variants in interpret mode, and lowering for TPU / CUDA.

tests/test_osam.py runs ``method="pallas"`` (the CPU default: the GPU variant in
interpret mode) through every scenario of the other methods. Here: what those
small shapes do not reach (several time blocks with the state carried in scratch,
several lane tiles, padded rows), and ``jax.export`` for the accelerators.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltamem_jax.memory import osam, osam_pallas


def _core_inputs(seed, T, N, r):
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    arrays = (unit(rng.normal(size=(T, N, r))), unit(rng.normal(size=(T, N, r))),
              rng.normal(size=(T, N, r)), rng.uniform(0.0, 1.0, (T, N, r)),
              rng.uniform(0.0, 1.0, (T, N, r)), rng.uniform(0.0, 1.0, (T, N, r)),
              rng.normal(size=(N, r, r)))
    return [jnp.asarray(a, jnp.float32) for a in arrays]


def _check_against_sequential(variant, T, N, r, seed=0):
    args = _core_inputs(seed, T, N, r)
    rng = np.random.default_rng(seed + 1)
    w_reads = jnp.asarray(rng.normal(size=(T, N, r)), jnp.float32)
    w_state = jnp.asarray(rng.normal(size=(N, r, r)), jnp.float32)

    def loss(core):
        def f(*a):
            reads, state = core(*a)
            return jnp.sum(reads * w_reads) + jnp.sum(jnp.sin(state) * w_state), (reads, state)
        return jax.jit(jax.value_and_grad(f, argnums=tuple(range(7)), has_aux=True))

    (_, ref_out), ref_grads = loss(lambda *a: osam._sequential(*a, 16))(*args)
    (_, out), grads = loss(lambda *a: osam_pallas.pallas_scan(*a, variant=variant))(*args)
    for ours, ref in zip(out + grads, ref_out + ref_grads):
        scale = max(1.0, float(jnp.abs(ref).max()))
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5 * scale)


def test_tpu_variant_carries_state_across_time_blocks():
    # 300 tokens = 3 time blocks of 128 (the last one padded): state and adjoint in scratch
    _check_against_sequential("tpu-interpret", T=300, N=3, r=8)


def test_gpu_variant_several_lane_tiles_and_padded_rank():
    # 20 sequences = 2 programs of 16 lanes; r = 5 padded to 8 (Triton wants powers of two)
    _check_against_sequential("gpu-interpret", T=19, N=20, r=5, seed=3)


def test_tpu_variant_full_lane_tiles():
    _check_against_sequential("tpu-interpret", T=9, N=130, r=8, seed=5)   # 2 tiles of 128


def _export(direction, platform):
    T, B, H, r = 300, 2, 2, 8
    spec = jax.ShapeDtypeStruct((B, H, T, r), jnp.float32)

    def fwd(q, k, v, beta):
        return osam.osam_scan(q, k, v, beta, method="pallas")

    def bwd(q, k, v, beta):
        def loss(*a):
            reads, state = fwd(*a)
            return jnp.sum(reads) + jnp.sum(state ** 2)
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, beta)
    # Triton kernels are a custom call without a compatibility guarantee across jaxlib
    # versions: export needs that check off (the serialized module is for this jaxlib).
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = jax.export.export(jax.jit(fwd if direction == "fwd" else bwd),
                                 platforms=[platform], disabled_checks=checks)(*[spec] * 4)
    return exported.mlir_module()


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("platform, marker", [("tpu", "tpu_custom_call"),
                                              ("cuda", "__gpu$xla.gpu.triton")])
def test_lowers_for_accelerators(direction, platform, marker):
    module = _export(direction, platform)
    assert marker in module
    # one kernel per direction: the forward has one pallas call; the backward re-runs the
    # forward (saving chunk states) and then the backward kernel
    assert module.count(marker) == (1 if direction == "fwd" else 2)
