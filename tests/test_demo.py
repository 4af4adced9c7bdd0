"""The CPU demo pipeline at a tiny size, end to end, then eval.py on what it produced.

The full demo is the README's main command; here every stage runs at toy sizes
(seconds) so that the wiring (data -> backbone -> δ-mem -> evaluation -> report
files, and eval.py's recall / perplexity tasks on the same directories) is tested.
"""

import json
import os
import subprocess
import sys

import pytest

from deltamem_jax.evaluation.defaults import eval_config
from deltamem_jax.tools import demo

from helpers import run_eval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("demo"))
    results = demo.run(workdir, cfg=demo.DemoConfig.quick(), progress=False)
    return workdir, results


def test_demo_quick_end_to_end(demo_run):
    workdir, results = demo_run
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    settings = ("no_memory", "full_context", "delta_mem", "delta_mem_full_context")
    for key in settings + ("chance",):
        assert 0.0 <= saved[key] <= 1.0, key
        # the top-level number of a setting is its primary metric, answer recall
        assert saved[key] == saved["metrics"][key]["answer_recall"], key
        assert set(saved["metrics"][key]) >= {"answer_recall", "exact_match", "token_f1"}
        assert saved["metrics"][key]["exact_match"] <= saved["metrics"][key]["answer_recall"]
    assert saved["primary_metric"] == "answer_recall"
    assert saved["backbone"].startswith("tiny byte-level")
    assert saved["memory_params"] > 0 and saved["backbone_params"] > saved["memory_params"]
    assert saved["n"] == demo.DemoConfig.quick().n_test
    assert set(saved["stage_seconds"]) == {"data", "backbone", "train", "evaluate"}
    assert set(saved["goals"]) == {"delta_mem >= 0.80 * full_context", "delta_mem >= 0.50",
                                   "no_memory <= chance + 0.05"}
    ex = saved["examples"][0]
    assert set(ex["predictions"]) == set(settings) and ex["reference"]
    for name in ("demo_table.md", "demo_table.json", "demo_table.png",
                 "backbone/config.json", "memory/adapter/delta_mem_config.json"):
        assert os.path.isfile(os.path.join(workdir, name)), name
    table = demo.format_table(results)
    assert "δ-mem (history only in memory)" in table and f"{saved['memory_params']:,}" in table
    assert "answer recall" in table and "authors' protocol" in table
    for split in ("train", "validation", "test"):       # chat-format jsonl, usable by train.py
        with open(os.path.join(workdir, "data", f"{split}.jsonl")) as f:
            rec = json.loads(f.readline())
        assert rec["messages"][-1]["role"] == "assistant"


def test_demo_training_config_is_valid_for_train_py(tmp_path):
    """The config the demo hands to train.py's loop passes its validation as is."""
    from deltamem_jax.training import settings
    cfg = demo.DemoConfig()
    backbone = tmp_path / "backbone"
    backbone.mkdir()
    (backbone / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}))
    c = demo.demo_training_config(cfg, str(backbone), str(tmp_path))
    s = settings.resolve(c, need_data=False)
    assert s.memory.rank == 8 and c.memory.rank == 8 and tuple(c.memory.delta_heads) == ("q", "o")
    assert c.train.steps == cfg.memory_steps and c.data.p_state_only == 0.0


def test_demo_rejects_incomplete_data_dir(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="validation.jsonl"):
        demo.run(str(tmp_path / "w"), data=str(tmp_path), cfg=demo.DemoConfig.quick())


def _eval_cfg(workdir, task):
    c = eval_config()
    c.task = task
    c.model.hf_dir = os.path.join(workdir, "backbone")
    c.model.adapter = os.path.join(workdir, "memory", "adapter")
    c.data.path = os.path.join(workdir, "data", "test.jsonl")
    c.data.limit = 4
    c.batch_size = 4
    c.protocol = "memory_only"
    c.decoding.max_new_tokens = 4
    c.data.max_write_length = 256
    c.data.max_length = 64
    return c


def test_eval_recall_and_perplexity_on_demo_outputs(demo_run, tmp_path):
    workdir, _ = demo_run
    out = run_eval(_eval_cfg(workdir, "recall"), str(tmp_path / "recall"))
    assert set(out["rows"]) == {"no_memory", "delta_mem", "full_context"}
    for row in out["rows"].values():
        assert 0.0 <= row["exact_match"] <= 1.0
    for f in out["files"].values():
        assert os.path.isfile(f)
    out = run_eval(_eval_cfg(workdir, "perplexity"), str(tmp_path / "ppl"))
    assert out["rows"] and all(os.path.isfile(f) for f in out["files"].values())


def test_eval_config_errors(demo_run, tmp_path):
    workdir, _ = demo_run
    c = _eval_cfg(workdir, "recall")
    c.task = "translate"
    with pytest.raises(ValueError, match="config.task"):
        run_eval(c, str(tmp_path))
    c = _eval_cfg(workdir, "recall")
    c.data.path = str(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="config.data.path"):
        run_eval(c, str(tmp_path))


def test_eval_cli_rejects_unknown_field():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"),
                           f"--config={REPO}/configs/eval_recall.py", "--workdir=/tmp/x",
                           "--config.no_such_field=1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no_such_field" in proc.stderr


def test_capacity_study_tiny(demo_run, tmp_path):
    from deltamem_jax.tools import capacity
    workdir, _ = demo_run
    res = capacity.run(os.path.join(workdir, "backbone"), str(tmp_path), ranks=(4,),
                       writes=("message",), facts=(1, 3), steps=2, batch_size=8, n_train=32,
                       n_test=4, max_write_length=256)
    assert set(res["rows"]) == {"full context", "rank 4, message writes"}
    for row in res["rows"].values():
        assert set(row) == {"1", "3"} and all(0.0 <= v <= 1.0 for v in row.values())
    md = (tmp_path / "capacity.md").read_text()
    assert "| rank 4, message writes |" in md and "3 facts" in md
    assert (tmp_path / "capacity.png").stat().st_size > 1000
    with open(tmp_path / "r4_message" / "adapter" / "delta_mem_config.json") as f:
        cfg = json.load(f)
    assert cfg["rank"] == 4 and cfg["memory_write_granularity"] == "message_mean"


def test_capacity_rejects_unknown_write_mode_before_work(tmp_path):
    from deltamem_jax.tools import capacity
    with pytest.raises(ValueError, match="'sentence' is not one of"):
        capacity.run(str(tmp_path / "no_backbone"), str(tmp_path / "out"), writes=("sentence",))
    assert not (tmp_path / "out").exists()
