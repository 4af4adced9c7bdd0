"""Benchmarks on a checkpoint directory (what ``--model DIR`` runs on SmolLM2), at a tiny size."""

import math

import pytest
from flax import nnx

from deltamem_jax.checkpoints.hf import save_hf_model
from deltamem_jax.models.config import DecoderConfig
from deltamem_jax.models.decoder import DecoderLM
from deltamem_jax.tools.bench import common as bench_common


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_ckpt")
    config = DecoderConfig(model_type="llama", vocab_size=96, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, max_position_embeddings=512)
    save_hf_model(DecoderLM(config, rngs=nnx.Rngs(0)), str(path))
    return str(path)


def test_throughput_on_a_checkpoint_dir(tiny_dir):
    from deltamem_jax.tools.bench import throughput as bt
    res = bt.run_throughput([tiny_dir], prefill_T=[16], histories=[32], window=8,
                            decode_tokens=2, repeats=1, log=lambda s: None)
    label = bt.model_label(tiny_dir)
    assert {r["model"] for r in res["prefill"] + res["decode"] + res["history"]} == {label}
    for r in res["prefill"] + res["decode"]:
        assert r["base_tok_s"] > 0 and r["mem_tok_s"] > 0 and math.isfinite(r["overhead"])
    assert f"| {label} | 16 |" in bt.format_markdown(res, bench_common.machine_info())


def test_throughput_cli_takes_model_and_adapter():
    from deltamem_jax.tools.bench.__main__ import build_parser
    args = build_parser().parse_args(["throughput", "--model", "a", "--model", "b",
                                      "--adapter", "ad"])
    assert args.model == ["a", "b"] and args.adapter == "ad"


def test_train_step_levers_tiny(tiny_dir):
    from deltamem_jax.tools.bench import train_step as bts
    names = ["base (all layers)", "layers 2-2", "batch ×2"]
    assert set(names) <= set(bts.variants(3))
    res = bts.run_train_bench(tiny_dir, names, batch=8, write=16, read=8, repeats=2,
                              log=lambda s: None)
    rows = {r["variant"]: r for r in res["rows"]}
    assert rows["base (all layers)"]["time_vs_base"] == 1.0
    assert rows["batch ×2"]["batch"] == 16
    for r in rows.values():
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["compile_s"] > 0
    split = res["base_split_s"]
    assert set(split) == {"write forward", "read forward", "backward passes + update"}
    assert all(v > 0 for k, v in split.items() if k != "backward passes + update")
    table = bts.format_markdown(res, bench_common.machine_info())
    assert "| layers 2-2 |" in table and "Where the base step" in table
    with pytest.raises(ValueError, match="unknown variant"):
        bts.run_train_bench(tiny_dir, ["fast"], batch=8, write=16, read=8, repeats=1)
