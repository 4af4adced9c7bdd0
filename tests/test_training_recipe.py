"""The authors' training-recipe options: write-sparsity on the read pass's β, and the
per-family chat-template keywords (thinking off) shared by training and evaluation."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from deltamem_jax.data.tokenizer import family_template_kwargs
from deltamem_jax.training.settings import (
    ConfigError,
    DataSettings,
    LoopSettings,
    ModelSettings,
    ScratchModel,
    TrainSettings,
)
from deltamem_jax.training.step import LossConfig, episode_terms

from helpers import random_model


def _loss(source: str) -> LossConfig:
    s = TrainSettings(memory=random_model(3).memory_config,
                      train=LoopSettings(sparsity_weight=0.01, sparsity_target=0.05,
                                         sparsity_source=source))
    return LossConfig.of(s)


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
    base, authors = _loss("write"), _loss("authors_read")
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
    with pytest.raises(ConfigError, match="sparsity_source"):
        _loss("read")


def test_family_template_kwargs_and_training_config(tmp_path):
    assert family_template_kwargs("qwen3") == {"enable_thinking": False}
    assert family_template_kwargs("smollm3") == {"enable_thinking": False}
    assert family_template_kwargs("llama") == {}
    s = TrainSettings(model=ModelSettings(scratch=ScratchModel(model_type="qwen3")),
                      data=DataSettings(tokenizer=str(tmp_path)))
    assert s.template_kwargs() == {"enable_thinking": False}
    s = dataclasses.replace(s, data=DataSettings(tokenizer=str(tmp_path),
                                                 chat_template_kwargs='{"enable_thinking": true}'))
    assert s.template_kwargs() == {"enable_thinking": True}
    s = dataclasses.replace(s, data=DataSettings(tokenizer="byte"))
    assert s.template_kwargs() is None
    with pytest.raises(ConfigError, match="chat_template_kwargs"):
        DataSettings(chat_template_kwargs="[1]")
