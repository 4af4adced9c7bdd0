"""Backbones against transformers: tiny random Qwen3 / Llama (llama3 RoPE) / SmolLM3 (NoPE).

Build with transformers + torch, save, load here, compare logits (≥ 256 tokens, with and
without padding), greedy-generate 20 tokens with the KV cache, export back and reload.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from deltamem_jax import DeltaMemConfig, load_hf_model, save_hf_model
from deltamem_jax.inference.generation import SamplingConfig, generate
from deltamem_jax.models.config import DecoderConfig

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
              max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default",
                                                               "rope_theta": 10000.0})),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64})),
    "smollm3": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM,
                dict(tie_word_embeddings=True, no_rope_layers=[1, 0, 1],
                     rope_parameters={"rope_type": "default", "rope_theta": 5000.0})),
}
T = 260


def build_hf(family, seed=0):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**COMMON, **extra, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    hf = build_hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path, load_hf_model(str(path))


def hf_logits(hf, ids, mask=None):
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                 attention_mask=None if mask is None else torch.tensor(np.asarray(mask)))
    return out.logits.float().numpy()


def test_config_is_read(family):
    name, hf, path, model = family
    c = model.config
    assert c.model_type == name and c.num_hidden_layers == 3 and c.head_dim == 16
    assert c.tie_word_embeddings == hf.config.tie_word_embeddings
    if name == "smollm3":
        assert [c.uses_rope(i) for i in range(3)] == [True, False, True]
    if name == "llama":
        assert c.rope_type == "llama3" and c.attention_bias and c.mlp_bias


def test_logits_match_transformers(family):
    name, hf, path, model = family
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 300, size=(2, T)).astype(np.int32)
    ours = model(jnp.asarray(ids), use_memory=False).logits
    np.testing.assert_allclose(ours, hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    mask = np.ones((2, T), np.int32)
    mask[1, 200:] = 0                                          # right padding
    ids[1, 200:] = 0
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    ref = hf_logits(hf, ids, mask)
    np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers(family):
    name, hf, path, model = family
    rng = np.random.default_rng(2)
    ids = rng.integers(3, 300, size=(2, 24)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :5] = 0                                             # left padding
    ids[0, :5] = 0
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask), max_new_tokens=20, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[:, 24:].numpy()
    out = generate(model, ids, prompt_mask=mask, eos_ids=(),
                   sampling=SamplingConfig(max_new_tokens=20))
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_export_round_trip(family, tmp_path):
    name, hf, path, model = family
    save_hf_model(model, str(tmp_path), max_shard_bytes=60_000)    # force several shards
    assert (tmp_path / "model.safetensors.index.json").is_file()
    back = type(hf).from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = np.random.default_rng(3).integers(3, 300, size=(1, 40))
    np.testing.assert_allclose(hf_logits(back, ids), hf_logits(hf, ids), atol=1e-6)
    again = load_hf_model(str(tmp_path))
    np.testing.assert_allclose(again(jnp.asarray(ids)).logits, model(jnp.asarray(ids)).logits,
                               atol=1e-6)


def test_memory_off_is_exactly_the_backbone(family):
    name, hf, path, model = family
    ids = jnp.asarray(np.random.default_rng(4).integers(3, 300, size=(1, 16)))
    base = model(ids).logits
    withmem = load_hf_model(str(path), memory=DeltaMemConfig(output_init="base_slice_fixed"))
    np.testing.assert_array_equal(withmem(ids, use_memory=False).logits, base)
    out = withmem(ids)
    assert out.memory_state.shape == (3, 1, 1, 8, 8)
    assert not np.allclose(out.logits, base)    # base_slice init: memory acts from step 1


def test_unsupported_config_values_are_named(tmp_path):
    good = build_hf("qwen3").config.to_dict()
    for field, value, message in [
        ("model_type", "gpt2", "model_type"),
        ("hidden_act", "gelu", "hidden_act"),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "rope_type"),
        ("use_sliding_window", True, "use_sliding_window"),
    ]:
        bad = dict(good, **{field: value})
        if field == "use_sliding_window":
            bad["sliding_window"] = 128
        with pytest.raises(ValueError, match=message):
            DecoderConfig.from_hf_dict(bad)
    (tmp_path / "config.json").write_text(json.dumps(good))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf_model(str(tmp_path))
