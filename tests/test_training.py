"""Training: sharded = single-device, multi-host = single-host, exact resume, learning, errors."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from deltamem_jax.data.synthetic import SyntheticConfig, write_synthetic_dataset
from deltamem_jax.data.tokenizer import load_tokenizer
from deltamem_jax.training import loop, settings
from deltamem_jax.training.state import (
    abstract_train_state,
    init_params,
    init_train_state,
    load_frozen,
)
from deltamem_jax.utils.sharding import logical_rules

from tiny_train_config import get_config

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(str(out), SyntheticConfig(n_train=96, n_validation=16, n_test=16,
                                                      facts=(1, 2), filler_turns=(0, 1), seed=3))
    return out


def tiny(data, **overrides):
    """The tiny config with ``overrides`` (dotted names), resolved into typed settings."""
    return settings.resolve(tiny_config(data, **overrides))


def tiny_config(data, **overrides):
    c = get_config()
    c.data.train = str(data / "train.jsonl")
    for dotted, value in overrides.items():
        node = c
        *path, last = dotted.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def one_step(config, devices):
    """(loss, params after one step, frozen before, frozen after) on ``devices``."""
    s = loop.setup(config, devices=devices)
    with jax.set_mesh(s.mesh), logical_rules(s.rules):
        loader = loop.make_loader(s, config.data.train, load_tokenizer(config.tokenizer_spec))
        frozen = load_frozen(s.plan, "", 0)
        before = jax.device_get(frozen)
        state = init_train_state(s.plan, init_params(s.plan, frozen, 1), s.tx, 1, s.shardings)
        state, metrics = loop.compile_step(s)(state, frozen, loop.global_batch(s, next(loader)))
        return (float(metrics["loss"]), jax.device_get(state.params), before,
                jax.device_get(frozen), state)


def test_sharded_step_equals_single_device(data):
    assert jax.device_count() == 8
    # Adam's first step is ±lr·g/(|g|+eps): for |g| ≪ eps it scales float noise in g by
    # lr/eps. A larger eps keeps the comparison about the sharded computation itself.
    config = tiny(data, **{"optim.eps": 1e-3})
    loss1, params1, before1, _, _ = one_step(config, jax.devices()[:1])
    config = tiny(data, **{"optim.eps": 1e-3, "mesh.shape": (2, 2, 2)})
    loss8, params8, before8, after8, state8 = one_step(config, jax.devices())
    assert abs(loss1 - loss8) <= 1e-5 * max(1.0, abs(loss1))
    for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(before8), jax.tree.leaves(after8)):
        np.testing.assert_array_equal(a, b)              # the backbone is bitwise unchanged
    for a, b in zip(jax.tree.leaves(before1), jax.tree.leaves(before8)):
        np.testing.assert_array_equal(a, b)
    # the optimiser holds δ-mem parameters only (Adam: two moments per parameter)
    n_params = sum(x.size for x in jax.tree.leaves(state8.params))
    n_opt = sum(x.size for x in jax.tree.leaves(state8.opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_params
    leaf = jax.tree.leaves(state8.opt_state)[-1]
    assert len(leaf.sharding.device_set) == 8


def _train_cmd(data, workdir, *extra):
    return [sys.executable, str(REPO / "train.py"), f"--config={HERE / 'tiny_train_config.py'}",
            f"--workdir={workdir}", f"--config.data.train={data / 'train.jsonl'}", *extra]


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _history(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(data, tmp_path):
    port = _free_port()
    common = ["--config.train.steps=3", "--config.mesh.shape=(-1, 1, 1)"]
    procs = [subprocess.Popen(
        _train_cmd(data, tmp_path / "multi", *common, "--config.distributed.initialize=True",
                   f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                   "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
        env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    single = subprocess.run(_train_cmd(data, tmp_path / "single", *common), env=_env(4),
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    multi, one = _history(tmp_path / "multi"), _history(tmp_path / "single")
    for step in (1, 2, 3):
        assert abs(multi[step]["loss"] - one[step]["loss"]) <= 1e-5, (step, multi, one)
        assert multi[step]["batch_digest"] == one[step]["batch_digest"]
    a = load_file(str(tmp_path / "multi" / "adapter" / "delta_mem_adapter.safetensors"))
    b = load_file(str(tmp_path / "single" / "adapter" / "delta_mem_adapter.safetensors"))
    for k in a:      # Adam turns reduction-order noise in ~0 gradients into visible steps
        assert np.abs(a[k] - b[k]).max() <= 1e-3 * max(np.abs(b[k]).max(), 1e-6), k


def test_resume_after_kill_is_exact(data, tmp_path):
    """6 steps straight == killed part-way (after checkpoint 3) and resumed to 6."""
    six = "--config.train.steps=6"
    straight = subprocess.run(_train_cmd(data, tmp_path / "straight", six), env=_env(1),
                              capture_output=True, text=True, timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(data, killed, six), env=_env(1),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = killed / "checkpoints"
    deadline = time.time() + 900
    while time.time() < deadline and not (ckpts / "3").is_dir():
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert done and done[-1] < 6, done                 # really interrupted
    resumed = subprocess.run(_train_cmd(data, killed, six), env=_env(1), capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {done[-1]}" in resumed.stderr
    a = load_file(str(tmp_path / "straight" / "adapter" / "delta_mem_adapter.safetensors"))
    b = load_file(str(killed / "adapter" / "delta_mem_adapter.safetensors"))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6)
    h1, h2 = _history(tmp_path / "straight"), _history(killed)
    for step in range(done[-1] + 1, 7):                # the batches after the resume point
        assert h1[step]["batch_digest"] == h2[step]["batch_digest"]
        assert abs(h1[step]["loss"] - h2[step]["loss"]) <= 1e-6


def test_checkpoint_restores_onto_another_mesh(data, tmp_path):
    config = tiny(data, **{"train.steps": 2})
    loop.train(config, str(tmp_path), devices=jax.devices()[:1])
    saved = load_file(str(tmp_path / "adapter" / "delta_mem_adapter.safetensors"))
    s = loop.setup(tiny(data, **{"train.steps": 2, "mesh.shape": (2, 2, 2)}))
    from deltamem_jax.training.checkpointing import Checkpointer
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), every=1, keep=3)
    with jax.set_mesh(s.mesh), logical_rules(s.rules):
        state, data_state, meta = ckpt.restore_latest(abstract_train_state(s.plan, s.tx, 42,
                                                                           s.shardings))
        frozen = jax.device_get(load_frozen(s.plan, "", 0))
    ckpt.close()
    assert int(state.step) == 2 and data_state["batch"] == 2 and meta["step"] == 2
    leaf = jax.tree.leaves(state.params)[0]
    assert leaf.sharding.mesh.shape == s.mesh.shape and len(leaf.sharding.device_set) == 8
    from deltamem_jax.checkpoints.adapters import adapter_tensors
    restored = adapter_tensors(s.plan.merge(jax.device_get(state.params), frozen))
    for k, v in saved.items():
        np.testing.assert_array_equal(restored[k], v)


def test_learning_happens(data, tmp_path):
    """Memory alone (frozen random backbone) learns the replies' statistics."""
    summary = loop.train(tiny(data, **{"train.steps": 40, "checkpoint.every": 40,
                                       "optim.learning_rate": 0.03}),
                         str(tmp_path), devices=jax.devices()[:1])
    history = _history(tmp_path)
    start, last = history[1]["ce"], summary["final"]["ce"]
    assert last < 0.75 * start, (start, last)


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(data, tmp_path):
    config = tiny(data, **{"optim.learning_rate": 1e30, "train.steps": 5})
    with pytest.raises(FloatingPointError, match=r"at step (\d+).*Last good checkpoint: step"):
        loop.train(config, str(tmp_path), devices=jax.devices()[:1])
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) < 5


def test_bad_configs_fail_before_work(data, tmp_path):
    cases = [
        ({"train.batch_size": 6, "train.grad_accum": 4}, "train.batch_size"),
        ({"mesh.shape": (3, 1, 1)}, "mesh shape"),
        ({"data.p_state_only": 1.5}, "data.p_state_only"),
        ({"optim.schedule": "triangle"}, "optim.schedule"),
        ({"memory.state_update_mode": "diagonal"}, "state_update_mode"),
        ({"model.hf_dir": str(tmp_path / "nowhere")}, "model.hf_dir"),
        ({"mesh.rules": (("batch", "pipeline"),)}, "mesh.rules"),
        ({"data.train": ""}, "data.train"),
    ]
    for overrides, message in cases:
        with pytest.raises((settings.ConfigError, ValueError), match=message):
            loop.setup(tiny(data, **overrides))
    for flag, message in [("--config.train.stepz=3", "stepz"),
                          ("--config.train.steps=many", "steps")]:
        out = subprocess.run(_train_cmd(data, tmp_path / "x", flag), capture_output=True,
                             text=True, timeout=120, env=_env(1))
        assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
        assert not (tmp_path / "x").exists()


def test_bad_records_are_counted_and_skipped(data, tmp_path, caplog):
    """Bad records are counted and skipped; a prompt/response record trains like messages; a
    reply longer than data.max_length is cut to its tail (default) or skipped ("skip")."""
    lines = (data / "train.jsonl").read_text().splitlines()
    long_reply = ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
                  '"content": "' + "x" * 500 + '"}]}')
    bad = ['{"messages": []}', '{"messages": [{"role": "wizard", "content": "hi"}]}', long_reply,
           '{"prompt": "What is my code?", "response": "42"}', '{"prompt": 3, "response": "x"}',
           "not json"]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines + bad) + "\n")
    for long_replies, kept, reasons in [("truncate_left", 2, ()), ("skip", 1, ("reply_too_long",))]:
        c = tiny(data, **{"data.train": str(path), "data.long_replies": long_replies})
        s = loop.setup(c)
        caplog.clear()
        with caplog.at_level("INFO"):
            loader = loop.make_loader(s, str(path), load_tokenizer(c.tokenizer_spec))
        assert len(loader.source) == len(lines) + kept
        assert loader.source.truncated == (long_replies == "truncate_left")
        warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= 30)
        assert "skipped" in warning
        for reason in ("empty_conversation=1", "unknown_role=1", "non_string_content=1",
                       "invalid_json=1") + reasons:
            assert reason in warning
        assert ("reply_too_long" in warning) == (long_replies == "skip")
    with pytest.raises(settings.ConfigError, match="data.long_replies"):
        tiny(data, **{"data.long_replies": "drop"})


def test_dry_run_reports_counts_and_memory(data):
    out = loop.dry_run(tiny(data, **{"mesh.shape": (2, 2, 2)}))
    assert out["devices"] == 8 and out["memory"] > 0 and out["backbone"] > out["memory"]
    assert out["per_device_memory"]["total_gib"] > 0
    text = loop.format_dry_run(out)
    assert f"{out['memory']:,}" in text and "per-device memory" in text


def test_optimizer_wrt_memory_only(data):
    config = tiny(data)
    s = loop.setup(config)
    n_mem = sum(x.size for x in jax.tree.leaves(s.plan.abstract_params))
    full = s.plan.merge(s.plan.abstract_params, s.plan.abstract_frozen)
    from deltamem_jax.memory.layer import MemoryParam
    assert n_mem == sum(x.size for x in jax.tree.leaves(nnx.state(full, MemoryParam)))
