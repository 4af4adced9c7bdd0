"""The δ-mem layer on its own: projections, token/span writes, padding, heads, init, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import recurrence

from deltamem_jax import DeltaMemConfig, DeltaMemory, MemoryParam
from deltamem_jax.memory.layer import base_slice_matrix

D = 16
OUT = {"q": 24, "k": 12, "v": 12, "o": 16}


def make_memory(seed=0, **overrides):
    cfg = DeltaMemConfig(**{"output_init": "random", "delta_heads": ("q", "k", "v", "o"),
                            **overrides})
    mem = DeltaMemory(cfg, D, OUT, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    # non-trivial gates (the authors' init zeroes beta_proj)
    mem.beta_proj.set_value(jnp.asarray(rng.normal(size=mem.beta_proj.shape) * 0.5, jnp.float32))
    if not cfg.couple_lambda:
        mem.lambda_proj.set_value(
            jnp.asarray(rng.normal(size=mem.lambda_proj.shape) * 0.5, jnp.float32))
    return mem


def projections(mem: DeltaMemory, h):
    """q, k, v, β, λ computed by hand from the module's parameters (float64)."""
    c = mem.config
    H = c.num_state_heads
    p = lambda name: np.asarray(getattr(mem, name)[...], np.float64)  # noqa: E731
    h = np.asarray(h, np.float64)
    split = lambda a: a.reshape(a.shape[:-1] + (H, a.shape[-1] // H))  # noqa: E731

    def qk(a):
        a = np.tanh(split(a))
        return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-6)
    sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    q, k = qk(h @ p("memory_q_proj")), qk(h @ p("memory_k_proj"))
    v = split(h @ p("memory_v_proj"))
    beta = sig(split(h @ p("beta_proj") + p("beta_bias")))
    lam = None if c.couple_lambda else sig(split(h @ p("lambda_proj") + p("lambda_bias")))
    return q, k, v, beta, lam


def heads_first(a, B, H):
    """[B, T, H, x] -> [B*H, T, x]."""
    if a is None:
        return None
    return np.swapaxes(a, 1, 2).reshape((B * H,) + a.shape[1:2] + a.shape[3:])


def expected_corrections(mem, reads):
    c = mem.config
    out = {}
    for head in c.delta_heads:
        proj = np.asarray(getattr(mem, f"delta_{head}_proj")[...], np.float64)
        out[head] = c.scale * reads @ proj
    return out


@pytest.mark.parametrize("overrides", [
    {},
    {"couple_lambda": False, "state_update_mode": "lambda_outside"},
    {"num_state_heads": 2, "rank": 4, "rankwise_gates": False},
])
def test_token_pass_equals_scan_on_own_projections(overrides):
    mem = make_memory(1, **overrides)
    c = mem.config
    B, T, H, r = 2, 11, c.num_state_heads, c.rank
    rng = np.random.default_rng(2)
    h = rng.normal(size=(B, T, D)).astype(np.float32)
    mask = np.ones((B, T), bool)
    mask[1, 8:] = False
    s0 = rng.normal(size=(B, H, r, r)).astype(np.float32)
    out = mem(jnp.asarray(h), mask=jnp.asarray(mask), state=jnp.asarray(s0))

    q, k, v, beta, lam = projections(mem, h)
    m = np.repeat(mask, H, axis=0)
    reads, state = recurrence(*(heads_first(a, B, H) for a in (q, k, v, beta, lam)), mask=m,
                              s0=s0.reshape(B * H, r, r), mode=c.state_update_mode)
    reads = np.swapaxes(reads.reshape(B, H, T, r), 1, 2).reshape(B, T, H * r)
    np.testing.assert_allclose(out.state, state.reshape(B, H, r, r), rtol=1e-5, atol=1e-5)
    for head, want in expected_corrections(mem, reads).items():
        np.testing.assert_allclose(out.deltas[head], want, rtol=1e-4, atol=1e-5)
    assert set(out.deltas) == set(c.delta_heads)
    b = np.broadcast_to(beta, (B, T, H, r))
    np.testing.assert_allclose(out.beta_mean, b[mask].mean(), rtol=1e-5)


def test_read_only_pass_reads_carried_state_and_keeps_it():
    mem = make_memory(3)
    rng = np.random.default_rng(0)
    h = rng.normal(size=(2, 7, D)).astype(np.float32)
    s0 = rng.normal(size=(2, 1, 8, 8)).astype(np.float32)
    out = mem(jnp.asarray(h), state=jnp.asarray(s0), write=False)
    q = projections(mem, h)[0][:, :, 0]                       # [B, T, r]
    reads = np.einsum("bij,btj->bti", s0[:, 0], q)
    np.testing.assert_allclose(out.deltas["o"], expected_corrections(mem, reads)["o"], rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_array_equal(out.state, s0)


def test_padding_is_inert():
    mem = make_memory(4)
    rng = np.random.default_rng(1)
    h = rng.normal(size=(1, 9, D)).astype(np.float32)
    padded = np.concatenate([h, rng.normal(size=(1, 5, D)).astype(np.float32)], axis=1)
    mask = np.arange(14)[None] < 9
    alone = mem(jnp.asarray(h))
    both = mem(jnp.asarray(padded), mask=jnp.asarray(mask))
    np.testing.assert_allclose(both.state, alone.state, rtol=1e-6, atol=1e-6)
    for head in alone.deltas:
        np.testing.assert_allclose(both.deltas[head][:, :9], alone.deltas[head], rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_array_equal(both.deltas[head][:, 9:], 0.0)


def test_inactive_heads_have_no_parameters_and_no_corrections():
    mem = DeltaMemory(DeltaMemConfig(output_init="random"), D, OUT, rngs=nnx.Rngs(0))
    out = mem(jnp.ones((1, 3, D)))
    assert set(out.deltas) == {"q", "o"}
    assert not hasattr(mem, "delta_k_proj") and not hasattr(mem, "delta_v_proj")
    assert out.deltas["q"].shape == (1, 3, OUT["q"]) and out.deltas["o"].shape == (1, 3, OUT["o"])


@pytest.mark.parametrize("granularity", ["message_mean", "sentence_mean"])
def test_span_pass_reads_pre_pass_state_and_writes_span_means(granularity):
    mem = make_memory(5, memory_write_granularity=granularity)
    rng = np.random.default_rng(4)
    B, T = 2, 12
    h = rng.normal(size=(B, T, D)).astype(np.float32)
    s0 = rng.normal(size=(B, 1, 8, 8)).astype(np.float32)
    msg = np.array([[-1, 3, 3, 3, 7, 7, 7, 7, -1, 9, 9, 9],
                    [5, 5, 5, 2, 2, 2, 2, 8, 8, 8, -1, -1]], np.int32)
    sent = np.array([[0, 4, 4, -1, 6, 6, 1, 1, 1, 9, 9, 9],
                     [2, 2, -1, 0, 0, 0, 0, 5, 5, 5, 5, 5]], np.int32)
    mask = np.ones((B, T), bool)
    mask[1, 9:] = False                                       # padding inside a span
    out = mem(jnp.asarray(h), mask=jnp.asarray(mask), state=jnp.asarray(s0), write=True,
              message_ids=jnp.asarray(msg), sentence_ids=jnp.asarray(sent))

    q, _, _, _, _ = projections(mem, h)
    reads = np.einsum("bij,btj->bti", s0[:, 0], q[:, :, 0]) * mask[..., None]
    np.testing.assert_allclose(out.deltas["o"], expected_corrections(mem, reads)["o"], rtol=1e-4,
                               atol=1e-5)
    # the state: one delta-rule step per span mean, spans in increasing id order
    for b in range(B):
        part = mask[b] & (msg[b] >= 0)
        ids = msg[b]
        if granularity == "sentence_mean":
            part &= sent[b] >= 0
            ids = sent[b]
        means = np.stack([h[b][part & (ids == i)].astype(np.float64).mean(0)
                          for i in sorted(set(ids[part]))])
        _, k, v, beta, _ = projections(mem, means[None])
        _, state = recurrence(k[:, :, 0], k[:, :, 0], v[:, :, 0], beta[:, :, 0],
                              s0=s0[b:b + 1, 0])
        np.testing.assert_allclose(out.state[b, 0], state[0], rtol=1e-5, atol=1e-5)


def test_span_write_gradients_are_finite_with_empty_slots():
    # Rows with fewer spans than slots leave slots whose mean is exactly 0; the
    # normalised q/k of a zero vector must not poison the gradient with NaN.
    mem = make_memory(7, memory_write_granularity="message_mean")
    rng = np.random.default_rng(7)
    h = jnp.asarray(rng.normal(size=(2, 6, D)), jnp.float32)
    msg = jnp.asarray([[0, 0, 1, 1, -1, -1], [4, 4, 4, 4, 4, 4]], jnp.int32)
    graphdef, params, rest = nnx.split(mem, MemoryParam, ...)

    def loss(params, h):
        m = nnx.merge(graphdef, params, rest)
        out = m(h, state=jnp.zeros((2, 1, 8, 8)), write=True, message_ids=msg)
        return jnp.sum(jnp.square(out.state))

    grads = jax.grad(loss, argnums=(0, 1))(params, h)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.abs(grads[1]).max()) > 0


def test_span_modes_need_usable_ids():
    mem = make_memory(6, memory_write_granularity="sentence_mean")
    h = jnp.ones((1, 4, D))
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="need message_ids"):
        mem(h)
    with pytest.raises(ValueError, match="sentence_ids is missing"):
        mem(h, message_ids=ids)
    with pytest.raises(TypeError, match="integer"):
        mem(h, message_ids=ids.astype(jnp.float32), sentence_ids=ids)
    with pytest.raises(ValueError, match=r"must be \[B, T\]"):
        mem(h, message_ids=ids[:, :3], sentence_ids=ids)
    with pytest.raises(ValueError, match="no token with a usable span id"):
        mem(h, message_ids=ids - 1, sentence_ids=ids)
    assert mem(h, write=False).state.shape == (1, 1, 8, 8)   # read-only passes need no ids


def test_bad_inputs_raise():
    mem = make_memory(7)
    with pytest.raises(ValueError, match="hidden must be"):
        mem(jnp.ones((1, 4, D + 1)))
    with pytest.raises(ValueError, match="mask must be"):
        mem(jnp.ones((1, 4, D)), mask=jnp.ones((1, 5)))
    with pytest.raises(ValueError, match="state must be"):
        mem(jnp.ones((1, 4, D)), state=jnp.zeros((1, 8, 8)))


def test_config_validation():
    with pytest.raises(ValueError, match="delta_heads"):
        DeltaMemConfig(delta_heads=("q", "x"))
    with pytest.raises(ValueError, match="state_update_mode"):
        DeltaMemConfig(state_update_mode="sideways")
    with pytest.raises(ValueError, match="scan_method"):
        DeltaMemConfig(scan_method="magic")
    with pytest.raises(ValueError, match="memory_write_granularity"):
        DeltaMemConfig(memory_write_granularity="message_proposals")
    assert DeltaMemConfig(delta_heads="Q,o").delta_heads == ("q", "o")
    with pytest.raises(ValueError, match="archived"):
        DeltaMemConfig.from_authors_dict({"num_memory_partitions": 2})
    with pytest.raises(ValueError, match="unknown δ-mem config fields"):
        DeltaMemConfig.from_authors_dict({"rank": 8, "warp_drive": True})
    full = DeltaMemConfig(rank=4, couple_lambda=False).to_authors_dict()
    assert DeltaMemConfig.from_authors_dict(full) == DeltaMemConfig(rank=4, couple_lambda=False)


def test_qwen3_4b_layer_parameter_count_without_allocating():
    def build():
        return DeltaMemory(DeltaMemConfig(), 2560, {"q": 4096, "k": 1024, "v": 1024, "o": 2560},
                           rngs=nnx.Rngs(0))
    abstract = nnx.eval_shape(build)
    leaves = jax.tree.leaves(nnx.state(abstract, MemoryParam))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(math.prod(x.shape) for x in leaves) == 135_176


def test_authors_initialisation():
    rng = np.random.default_rng(0)
    base = {h: rng.normal(size=(n, D)).astype(np.float32) for h, n in OUT.items()}
    cfg = DeltaMemConfig(output_init="base_slice_fixed", rank=8, base_slice_ref_width=4)
    mem = DeltaMemory(cfg, D, OUT, rngs=nnx.Rngs(0), base_weights=base)
    cols = base["q"][:, :4] / np.linalg.norm(base["q"][:, :4], axis=0)
    want = np.zeros((8, OUT["q"]))
    want[:4] = 0.05 * cols.T
    np.testing.assert_allclose(mem.delta_q_proj[...], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(base_slice_matrix(base["o"], 4, 8, 0.05), mem.delta_o_proj[...])
    np.testing.assert_array_equal(mem.beta_proj[...], 0.0)
    np.testing.assert_array_equal(mem.beta_bias[...], -1.5)
    bound = 1 / math.sqrt(D)
    assert np.abs(np.asarray(mem.memory_q_proj[...])).max() <= bound
    zero = DeltaMemory(DeltaMemConfig(couple_lambda=False), D, OUT, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(zero.delta_o_proj[...], 0.0)
    np.testing.assert_array_equal(zero.lambda_bias[...], 1.5)
    with pytest.raises(ValueError, match="base_weights"):
        DeltaMemory(cfg, D, OUT, rngs=nnx.Rngs(0))


def test_delta_o_rmsnorm_and_trainable_scale():
    mem = make_memory(8, delta_o_rmsnorm=True, trainable_delta_scale=True,
                      delta_scale_granularity="head", delta_scale_init=0.5, delta_scale_max=2.0)
    raw = np.asarray(mem.delta_scale_raw[...])
    np.testing.assert_allclose(1 / (1 + np.exp(-raw)) * 2.0, 0.5, rtol=1e-6)
    mem.delta_scale_raw.set_value(jnp.asarray([0.3, -0.2, 0.1, 0.7], jnp.float32))
    mem.delta_o_rmsnorm_weight.set_value(jnp.linspace(0.5, 1.5, OUT["o"]))
    rng = np.random.default_rng(2)
    h = rng.normal(size=(1, 5, D)).astype(np.float32)
    s0 = rng.normal(size=(1, 1, 8, 8)).astype(np.float32)
    out = mem(jnp.asarray(h), state=jnp.asarray(s0), write=False)
    q = projections(mem, h)[0][:, :, 0]
    reads = np.einsum("bij,btj->bti", s0[:, 0], q)
    mult = 2.0 / (1 + np.exp(-np.array([0.3, -0.2, 0.1, 0.7])))
    raw_o = 2.0 * mult[3] * reads @ np.asarray(mem.delta_o_proj[...], np.float64)
    want_o = raw_o / np.sqrt(np.mean(raw_o ** 2, -1, keepdims=True) + 1e-6) * np.linspace(0.5, 1.5,
                                                                                          OUT["o"])
    np.testing.assert_allclose(out.deltas["o"], want_o, rtol=1e-4, atol=1e-5)
    want_k = 2.0 * mult[1] * reads @ np.asarray(mem.delta_k_proj[...], np.float64)
    np.testing.assert_allclose(out.deltas["k"], want_k, rtol=1e-4, atol=1e-5)


def test_memory_params_are_filterable():
    mem = make_memory(9)
    trainable = nnx.state(mem, MemoryParam)
    names = {str(p[0]) for p, _ in nnx.to_flat_state(trainable)}
    assert {"memory_q_proj", "beta_bias", "delta_o_proj"} <= names
    axes = mem.memory_q_proj.get_metadata("logical_axes")
    assert axes == ("memory_embed", "memory")
