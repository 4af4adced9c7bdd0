"""The recurrence: every method against an independent float64 reference, gradients included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import recurrence

from deltamem_jax.memory import osam
from deltamem_jax.tools.bench.hlo_stats import compiled_stats

METHODS = ("sequential", "associative", "chunked", "pallas")  # pallas: interpret mode
MODES = osam.UPDATE_MODES


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(seed, lead, T, r=8, gate_width=None, uncoupled=True, extreme=False,
                padding=True, s0=True):
    rng = np.random.default_rng(seed)
    g = gate_width or r
    logits = rng.normal(size=lead + (T, g)) * (12.0 if extreme else 2.0)
    x = dict(
        q=_unit(rng.normal(size=lead + (T, r))),
        k=_unit(rng.normal(size=lead + (T, r))),
        v=rng.normal(size=lead + (T, r)),
        beta=1 / (1 + np.exp(-logits)),
        lam=(1 / (1 + np.exp(-rng.normal(size=lead + (T, g)) * (12.0 if extreme else 2.0)))
             if uncoupled else None),
        mask=(rng.random(lead[:1] + (T,)) > 0.25) if padding else None,
        s0=rng.normal(size=lead + (r, r)) if s0 else None,
    )
    if padding and lead[0] > 1:
        x["mask"][1] = False                      # a row that is all padding
    return x


def run(x, method, mode, chunk_size=16):
    mask = x["mask"]
    if mask is not None and len(x["q"].shape) == 4:
        mask = mask[:, None, :]                   # one mask per batch row, shared by heads
    f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)  # noqa: E731
    return osam.osam_scan(f32(x["q"]), f32(x["k"]), f32(x["v"]), f32(x["beta"]), f32(x["lam"]),
                          mask=mask, initial_state=f32(x["s0"]), update_mode=mode,
                          method=method, chunk_size=chunk_size)


def reference(x, mode):
    q = x["q"]
    lead, (T, r) = q.shape[:-2], q.shape[-2:]
    n = int(np.prod(lead))
    flat = lambda a: None if a is None else a.reshape((n,) + a.shape[len(lead):])  # noqa: E731
    mask = x["mask"]
    if mask is not None:
        mask = np.broadcast_to(mask.reshape(mask.shape[:1] + (1,) * (len(lead) - 1) + (T,)),
                               lead + (T,)).reshape(n, T)
    reads, s = recurrence(flat(q), flat(x["k"]), flat(x["v"]), flat(x["beta"]), flat(x["lam"]),
                          mask, flat(x["s0"]), mode)
    return reads.reshape(lead + (T, r)), s.reshape(lead + (r, r))


def assert_close(ours, ref, rtol=1e-5, atol=1e-5):
    ours = np.asarray(ours, np.float64)
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=atol * scale)


SCENARIOS = {
    "T1": dict(lead=(3,), T=1),
    "ragged_padding": dict(lead=(3,), T=37),                 # T not divisible by chunk 16
    "extreme_gates": dict(lead=(2,), T=40, extreme=True),
    "heads_scalar_gates": dict(lead=(2, 3), T=21, gate_width=1),
    "coupled_fresh": dict(lead=(2,), T=33, uncoupled=False, padding=False, s0=False),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_methods_match_float64_reference(method, mode, scenario):
    x = make_inputs(hash(scenario) % 1000, **SCENARIOS[scenario])
    reads, state = run(x, method, mode)
    ref_reads, ref_state = reference(x, mode)
    assert reads.dtype == jnp.float32 and state.dtype == jnp.float32
    assert_close(reads, ref_reads)
    assert_close(state, ref_state)


@pytest.mark.parametrize("chunk_size", [1, 5, 64, 100])
def test_chunked_any_chunk_size(chunk_size):
    x = make_inputs(7, lead=(2,), T=70)
    ref_reads, ref_state = reference(x, "standard")
    reads, state = run(x, "chunked", "standard", chunk_size)
    assert_close(reads, ref_reads)
    assert_close(state, ref_state)


def test_padding_reads_zero_and_keeps_state():
    x = make_inputs(3, lead=(3,), T=12)
    reads, state = run(x, "sequential", "standard")
    assert np.all(np.asarray(reads)[~x["mask"]] == 0.0)
    np.testing.assert_array_equal(np.asarray(state)[1], np.float32(x["s0"][1]))  # all padding


def _loss_weights(shape_reads, shape_state, seed=11):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape_reads), rng.normal(size=shape_state)


def _grads(x, method, mode, w_reads, w_state, chunk_size=16):
    names = ["q", "k", "v", "beta", "lam", "s0"]

    def loss(*args):
        y = dict(x, **dict(zip(names, args)))
        reads, state = run(y, method, mode, chunk_size)
        return jnp.sum(reads * w_reads) + jnp.sum(jnp.sin(state) * w_state)
    args = [jnp.asarray(x[n], jnp.float32) for n in names]
    return dict(zip(names, jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args)))


def test_gradients_agree_across_methods():
    # The cores are mode-agnostic (modes only map β, λ to gates before them), so
    # one mode with all three gates distinct covers them.
    mode = "lambda_outside"
    x = make_inputs(5, lead=(2,), T=45)
    w_r, w_s = _loss_weights((2, 45, 8), (2, 8, 8))
    ref = _grads(x, "sequential", mode, w_r, w_s)
    # the custom VJP against plain autodiff through the token scan

    def autodiff_loss(q, k, v, beta, lam, s0):
        keep, erase, write = osam.update_gates(beta, lam, mode)
        vm = jnp.asarray(x["mask"])[..., None]
        keep, erase, write = (jnp.where(vm, keep, 1.0), jnp.where(vm, erase, 0.0),
                              jnp.where(vm, write, 0.0))
        tm = lambda a: jnp.moveaxis(a, 1, 0)  # noqa: E731
        reads, state = osam._sequential_autodiff(*map(tm, (q, k, v, keep, erase, write)), s0)
        reads = jnp.where(vm, jnp.moveaxis(reads, 0, 1), 0.0)
        return jnp.sum(reads * w_r) + jnp.sum(jnp.sin(state) * w_s)
    auto = jax.jit(jax.grad(autodiff_loss, argnums=tuple(range(6))))(
        *(jnp.float32(x[n]) for n in ("q", "k", "v", "beta", "lam", "s0")))
    for name, g in zip(("q", "k", "v", "beta", "lam", "s0"), auto):
        assert_close(ref[name], np.asarray(g, np.float64), rtol=1e-4, atol=1e-5)
    for method in ("associative", "chunked", "pallas"):
        other = _grads(x, method, mode, w_r, w_s)
        for name in ref:
            assert_close(other[name], np.asarray(ref[name], np.float64), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_match_float64_finite_differences(method):
    x = make_inputs(9, lead=(2,), T=6, r=3)
    w_r, w_s = _loss_weights((2, 6, 3), (2, 3, 3), seed=2)
    ours = _grads(x, method, "lambda_outside", w_r, w_s, chunk_size=4)

    def ref_loss(y):
        reads, state = reference(y, "lambda_outside")
        return np.sum(reads * w_r) + np.sum(np.sin(state) * w_s)
    eps = 1e-6
    for name in ("q", "k", "v", "beta", "lam", "s0"):
        num = np.zeros_like(x[name])
        for idx in np.ndindex(x[name].shape):
            up, down = ({**x, name: x[name].copy()} for _ in range(2))
            up[name][idx] += eps
            down[name][idx] -= eps
            num[idx] = (ref_loss(up) - ref_loss(down)) / (2 * eps)
        np.testing.assert_allclose(np.asarray(ours[name], np.float64), num, rtol=1e-3,
                                   atol=2e-4 * max(1.0, np.abs(num).max()), err_msg=name)


def test_composes_with_jit_and_vmap():
    x = make_inputs(4, lead=(4,), T=19, padding=False)
    direct, _ = run(x, "sequential", "standard")
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731

    @jax.jit
    def one(q, k, v, b, lam, s0):
        return osam.osam_scan(q, k, v, b, lam, initial_state=s0, method="chunked", chunk_size=8)[0]
    batched = jax.vmap(one)(*(f32(x[n]) for n in ("q", "k", "v", "beta", "lam", "s0")))
    assert_close(batched, np.asarray(direct, np.float64))


@pytest.mark.parametrize("method", ["auto", "pallas"])
def test_bfloat16_inputs_run_in_float32(method):
    x = make_inputs(8, lead=(2,), T=16, padding=False)
    bf = {n: (None if x[n] is None else jnp.asarray(x[n], jnp.bfloat16)) for n in x}
    reads, state = osam.osam_scan(bf["q"], bf["k"], bf["v"], bf["beta"], bf["lam"],
                                  initial_state=bf["s0"], method=method)
    assert reads.dtype == jnp.float32 and state.dtype == jnp.float32
    rounded = {n: (None if v is None else np.asarray(v.astype(jnp.float32))) for n, v in bf.items()}
    ref_reads, ref_state = reference(dict(rounded, mask=None), "standard")
    assert_close(reads, ref_reads)
    assert_close(state, ref_state)


def test_auto_picks_sequential_on_cpu():
    assert jax.default_backend() == "cpu"
    assert osam.resolve_method("auto") == "sequential"


def test_sequential_backward_memory_is_bounded():
    """The recomputing VJP keeps one state per chunk; autodiff through scan keeps all."""
    N, T, r = 8, 8192, 8
    args = [jax.ShapeDtypeStruct((T, N, r), jnp.float32)] * 6 + [
        jax.ShapeDtypeStruct((N, r, r), jnp.float32)]

    def loss(core):
        def f(*a):
            reads, s = core(*a)
            return jnp.sum(reads) + jnp.sum(s)
        return jax.jit(jax.grad(f, argnums=tuple(range(7)))).lower(*args).compile()
    ours = compiled_stats(loss(lambda *a: osam._sequential(*a, 64)))["temp_bytes"]
    plain = compiled_stats(loss(osam._sequential_autodiff))["temp_bytes"]
    assert ours < plain / 3, (ours, plain)


@pytest.mark.parametrize("bad, message", [
    (dict(k=np.zeros((2, 5, 7))), "k has shape"),
    (dict(beta=np.zeros((2, 5, 3))), "beta has shape"),
    (dict(mask=np.ones((2, 4))), "mask has shape"),
    (dict(s0=np.zeros((2, 8, 7))), "initial_state has shape"),
    (dict(k=np.zeros((3, 5, 8))), "do not broadcast"),
])
def test_bad_shapes_raise(bad, message):
    x = dict(q=np.zeros((2, 5, 8)), k=np.zeros((2, 5, 8)), v=np.zeros((2, 5, 8)),
             beta=np.zeros((2, 5, 8)), mask=None, s0=None)
    x.update(bad)
    x = {n: (None if a is None else jnp.asarray(a, jnp.float32)) for n, a in x.items()}
    with pytest.raises(ValueError, match=message):
        osam.osam_scan(x["q"], x["k"], x["v"], x["beta"], mask=x["mask"], initial_state=x["s0"])


def test_bad_options_raise():
    z = jnp.zeros((1, 3, 4))
    with pytest.raises(ValueError, match="unknown OSAM method"):
        osam.osam_scan(z, z, z, z, method="parallel")
    with pytest.raises(ValueError, match="state_update_mode"):
        osam.osam_scan(z, z, z, z, update_mode="fancy")
    with pytest.raises(ValueError, match="chunk_size"):
        osam.osam_scan(z, z, z, z, chunk_size=0)
    with pytest.raises(TypeError, match="floating point"):
        osam.osam_scan(z.astype(jnp.int32), z, z, z)
