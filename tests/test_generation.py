"""Generation with the KV cache and the carried δ-mem state equals recomputing everything.

Each step of the jitted decode loop feeds one token through the cache and writes it
into memory; one fresh forward pass over prompt + generated tokens must give the
same next tokens (greedy) and the same final memory state.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltamem_jax import DeltaMemConfig
from deltamem_jax.inference.generation import SamplingConfig, generate
from deltamem_jax.models.config import DecoderConfig
from deltamem_jax.models.decoder import DecoderLM

N_NEW = 8


def tiny_model_with_memory():
    config = DecoderConfig(model_type="qwen3", vocab_size=64, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = DecoderLM(config, rngs=nnx.Rngs(0))
    model.attach_memory(DeltaMemConfig(output_init="random", delta_heads=("q", "k", "v", "o")),
                        rngs=nnx.Rngs(1))
    for i in model.memory_layers:          # non-zero gates: every token really writes
        m = model.layers[i].self_attn.memory
        m.beta_proj.set_value(0.5 * jax.random.normal(jax.random.key(i), m.beta_proj.shape))
    return model


def test_cached_generation_equals_full_recomputation():
    model = tiny_model_with_memory()
    prompt = jnp.asarray(np.random.default_rng(0).integers(3, 64, (2, 12)), jnp.int32)
    s0 = model.init_memory_state(2)
    gen = generate(model, prompt, memory_state=s0, write=True, eos_ids=(),
                   sampling=SamplingConfig(max_new_tokens=N_NEW))
    tokens = np.asarray(gen.tokens)
    assert tokens.shape == (2, N_NEW) and (np.asarray(gen.lengths) == N_NEW).all()

    # every generated token is fed back (and written), the last one included
    full = jnp.concatenate([prompt, jnp.asarray(tokens)], axis=1)
    out = model(full, memory_state=s0, write=True)              # one pass over everything
    T = prompt.shape[1]
    logits = np.asarray(out.logits)[:, T - 1:-1]
    np.testing.assert_array_equal(logits.argmax(-1), tokens)
    # the decision margins are far above float32 noise, so the tokens are not a fluke
    top2 = np.sort(logits, axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-4
    np.testing.assert_allclose(np.asarray(gen.memory_state), np.asarray(out.memory_state),
                               rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(out.memory_state).max()) > 1e-3        # memory was written


def test_memory_changes_what_is_generated():
    model = tiny_model_with_memory()
    prompt = jnp.asarray(np.random.default_rng(0).integers(3, 64, (2, 12)), jnp.int32)
    history = jnp.asarray(np.random.default_rng(1).integers(3, 64, (2, 40)), jnp.int32)
    written = model(history, memory_state=model.init_memory_state(2), write=True).memory_state
    sampling = SamplingConfig(max_new_tokens=N_NEW)
    with_mem = generate(model, prompt, memory_state=written, eos_ids=(), sampling=sampling)
    without = generate(model, prompt, use_memory=False, eos_ids=(), sampling=sampling)
    assert not np.array_equal(np.asarray(with_mem.tokens), np.asarray(without.tokens))


def test_write_pass_without_logits_keeps_the_whole_cache():
    """compute_logits=False skips the LM head only: with a cache, every layer still runs
    (also those after the last δ-mem layer), so the cache equals the one with logits."""
    from deltamem_jax.models.functional import Runner

    from helpers import random_model

    for scan in (False, True):
        mem = DeltaMemConfig(output_init="random", target_layers=() if scan else (0,))
        run = Runner(random_model(3, scan_layers=scan, memory=mem))
        ids = jnp.asarray(np.random.default_rng(0).integers(3, 200, (2, 10)), jnp.int32)
        cache = run.init_cache(2, 16)
        s0 = run.init_memory_state(2)
        with_logits = run(ids, memory_state=s0, cache=cache)
        without = run(ids, memory_state=s0, cache=cache, compute_logits=False)
        assert without.logits is None and without.cache is not None
        for a, b in zip(jax.tree.leaves(with_logits.cache), jax.tree.leaves(without.cache)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(with_logits.memory_state),
                                      np.asarray(without.memory_state))
