"""The authors' training-recipe options: write-sparsity on the read pass's β, and the
per-family chat-template keywords (thinking off) shared by training and evaluation."""

import pathlib
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from deltamem_jax.data.tokenizer import family_template_kwargs
from deltamem_jax.training.loop import chat_template_kwargs
from deltamem_jax.training.step import LossConfig, episode_terms

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from helpers import random_model


def _batch():
    rng = np.random.default_rng(0)
    w = rng.integers(8, 200, (2, 24)).astype(np.int32)
    r = rng.integers(8, 200, (2, 16)).astype(np.int32)
    wm = np.ones((2, 24), np.int32)
    wm[1, 20:] = 0
    rm = np.ones((2, 16), np.int32)
    rm[0, 12:] = 0
    labels = np.where(rm > 0, r, -100)
    return {"write_ids": jnp.asarray(w), "write_mask": jnp.asarray(wm),
            "write_message_ids": jnp.full((2, 24), -1), "write_sentence_ids": jnp.full((2, 24), -1),
            "read_ids": jnp.asarray(r), "read_mask": jnp.asarray(rm), "labels": jnp.asarray(labels)}


def test_authors_read_sparsity_uses_the_read_pass_beta():
    model = random_model(3)
    b = _batch()
    base = LossConfig.of(model.memory_config, 0.01, 0.05)
    authors = LossConfig.of(model.memory_config, 0.01, 0.05, "authors_read")
    _, _, sp_write, _ = episode_terms(model, b, base)
    _, _, sp_read, _ = episode_terms(model, b, authors)
    write = model(b["write_ids"], attention_mask=b["write_mask"], write=True, compute_logits=False)
    read = model(b["read_ids"], attention_mask=b["read_mask"], memory_state=write.memory_state,
                 write=False)
    # by hand: per layer the mean of sigmoid(W_β h + b_β) over valid read tokens and gates
    want_read = float(jnp.mean(jnp.square(read.beta_means - 0.05)))
    want_write = float(jnp.mean(jnp.square(write.beta_means - 0.05)))
    np.testing.assert_allclose(float(sp_read), want_read, rtol=1e-6)
    np.testing.assert_allclose(float(sp_write), want_write, rtol=1e-6)
    assert abs(want_read - want_write) > 1e-6
    with pytest.raises(ValueError, match="sparsity_source"):
        LossConfig.of(model.memory_config, 0.01, 0.05, "read")


def test_family_template_kwargs_and_training_config(tmp_path):
    assert family_template_kwargs("qwen3") == {"enable_thinking": False}
    assert family_template_kwargs("smollm3") == {"enable_thinking": False}
    assert family_template_kwargs("llama") == {}
    c = ml_collections.ConfigDict({"data": {"tokenizer": "", "chat_template_kwargs": "auto"},
                                   "model": {"hf_dir": "", "scratch": {"model_type": "qwen3"}}})
    assert chat_template_kwargs(c, str(tmp_path)) == {"enable_thinking": False}
    c.data.chat_template_kwargs = '{"enable_thinking": true}'
    assert chat_template_kwargs(c, str(tmp_path)) == {"enable_thinking": True}
    assert chat_template_kwargs(c, "byte") is None
