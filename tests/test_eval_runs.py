"""eval.py end to end on a tiny random model: both LoCoMo protocols, a run killed with
SIGKILL and resumed (same final numbers), batch rows over 4 devices and items over 2
processes (same numbers as 1 device), print_prompt, and config errors before any work."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from deltamem_jax.evaluation.defaults import eval_config
from deltamem_jax.evaluation.settings import ConfigError, resolve

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
from helpers import random_model, run_eval, save_pretrained  # noqa: E402


def locomo_file(path, convs=2, questions=24):
    data = []
    for i in range(convs):
        c = {"speaker_a": "Ann", "speaker_b": "Bob"}
        for s in (1, 2, 3):
            c[f"session_{s}"] = [
                {"speaker": "Ann", "dia_id": f"D{s}:1", "text": f"My code is {i}{s}7."},
                {"speaker": "Bob", "dia_id": f"D{s}:2", "text": "Noted.", "blip_caption": "a note"}]
            c[f"session_{s}_date_time"] = f"1:00 pm on {s} May, 2023"
        qa = [{"question": f"What is code {k}?", "answer": f"{i}{k % 3 + 1}7",
               "category": 1 + k % 4, "evidence": []} for k in range(questions)]
        qa.insert(3, {"question": "Adversarial?", "adversarial_answer": "x", "category": 5})
        data.append({"sample_id": f"conv-{i}", "conversation": c, "qa": qa})
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model_dir, adapter = save_pretrained(random_model(0), root)
    return {"model": str(model_dir), "adapter": str(adapter),
            "locomo": str(locomo_file(root / "locomo.json"))}


def _config(tiny, **over):
    c = eval_config()
    c.task = "locomo"
    c.data.path = tiny["locomo"]
    c.model.hf_dir, c.model.adapter = tiny["model"], tiny["adapter"]
    c.batch_size, c.progress = 4, False
    c.decoding.max_new_tokens = 12
    c.mesh.data = 1
    for dotted, v in over.items():
        node = c
        *path, last = dotted.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def _cmd(tiny, workdir, *extra):
    return [sys.executable, str(REPO / "eval.py"), f"--config={REPO / 'configs' / 'eval_locomo.py'}",
            f"--workdir={workdir}", f"--config.data.path={tiny['locomo']}",
            f"--config.model.hf_dir={tiny['model']}", f"--config.model.adapter={tiny['adapter']}",
            "--config.batch_size=2", "--config.progress=False",
            "--config.decoding.max_new_tokens=24", *extra]


def _env(devices=1):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _records(workdir, setting):
    recs = {}
    for f in sorted((pathlib.Path(workdir) / "records" / setting).glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            recs[r["key"]] = r
    return recs


def test_both_protocols_in_process(tiny, tmp_path):
    out = run_eval(_config(tiny, settings=("full_context", "delta_mem_full_context", "no_memory",
                                           "delta_mem")), str(tmp_path / "a"))
    assert set(out["rows"]) == {"full_context", "delta_mem_full_context", "no_memory", "delta_mem"}
    summ = out["summaries"]["delta_mem_full_context"]
    assert summ["num_questions"] == 48 and set(summ["category_scores"]) == {"1", "2", "3", "4"}
    recs = _records(tmp_path / "a", "delta_mem_full_context")
    base = _records(tmp_path / "a", "full_context")
    assert len(recs) == 48 and all(0 <= r["score"] <= 1 for r in recs.values())
    # the memory changes what the model says (random adapter), same prompts
    assert sum(recs[k]["raw_prediction"] != base[k]["raw_prediction"] for k in recs) > 10
    assert all(recs[k]["prompt_tokens"] == base[k]["prompt_tokens"] for k in recs)
    for f in ("locomo.json", "locomo.md", "locomo.png"):
        assert (tmp_path / "a" / f).is_file()
    # a finished run is not run again
    again = run_eval(_config(tiny, settings=("full_context", "delta_mem_full_context",
                                             "no_memory", "delta_mem")), str(tmp_path / "a"))
    assert again.get("skipped") and again["rows"] == json.loads(json.dumps(out["rows"]))
    mem = run_eval(_config(tiny, protocol="memory_only"), str(tmp_path / "b"))
    assert set(mem["rows"]) == {"no_memory", "delta_mem", "full_context"}
    assert mem["rows"]["delta_mem"]["n"] == 48


def test_rows_over_four_devices_equal_one(tiny, tmp_path):
    one = run_eval(_config(tiny, **{"mesh.data": 1, "locomo.max_questions": 8}), str(tmp_path / "1"))
    four = run_eval(_config(tiny, **{"mesh.data": 4, "locomo.max_questions": 8}), str(tmp_path / "4"))
    assert one["rows"] == four["rows"]
    for st in ("full_context", "delta_mem_full_context"):
        a, b = _records(tmp_path / "1", st), _records(tmp_path / "4", st)
        assert {k: v["raw_prediction"] for k, v in a.items()} == \
               {k: v["raw_prediction"] for k, v in b.items()}


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("straight")
    r = subprocess.run(_cmd(tiny, work), env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return work


def test_killed_run_resumes_to_the_same_numbers(tiny, straight, tmp_path):
    work = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(tiny, work), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = work / "records" / "full_context" / "rank0.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:
        if target.is_file() and len(target.read_text().splitlines()) >= 4:
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _records(work, "full_context")
    assert 4 <= len(partial) < 48 and not (work / "locomo.json").exists()   # really interrupted
    r = subprocess.run(_cmd(tiny, work), env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already done, resuming" in r.stderr
    a = json.loads((straight / "locomo.json").read_text())["results"]
    b = json.loads((work / "locomo.json").read_text())["results"]
    assert a == b
    for st in ("full_context", "delta_mem_full_context"):
        x, y = _records(straight, st), _records(work, st)
        assert {k: v["raw_prediction"] for k, v in x.items()} == \
               {k: v["raw_prediction"] for k, v in y.items()}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tiny, straight, tmp_path):
    port, work = _free_port(), tmp_path / "multi"
    procs = [subprocess.Popen(
        _cmd(tiny, work, "--config.distributed.initialize=True",
             f"--config.distributed.coordinator_address=127.0.0.1:{port}",
             "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert sorted(p.name for p in (work / "records" / "full_context").iterdir()) == \
        ["rank0.jsonl", "rank1.jsonl"]
    a = json.loads((straight / "locomo.json").read_text())["results"]
    b = json.loads((work / "locomo.json").read_text())["results"]
    assert a == b


def test_print_prompt_command(tiny):
    r = subprocess.run(_cmd(tiny, "/tmp/unused", "--config.print_prompt=conv-1:4",
                            "--config.settings=('full_context','delta_mem')"),
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "conv-1 qa[4]" in r.stdout and "written into memory first" in r.stdout
    assert 'Ann said, "My code is 137."' in r.stdout and "tokens)" in r.stdout


@pytest.mark.parametrize("over, field", [
    ({"settings": ("with_memory",)}, "renamed: use 'delta_mem'"),
    ({"settings": ("bogus",)}, "config.settings"),
    ({"protocol": "nope"}, "config.protocol"),
    ({"task": "recall", "protocol": "authors"}, "has no 'authors' protocol"),
    ({"decoding.top_p": 0.0}, "config.decoding.top_p"),
    ({"locomo.categories": (7,)}, "config.locomo.categories"),
    ({"model.adapter": ""}, "config.model.adapter"),
])
def test_config_errors_name_the_field(tiny, over, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(")):
        resolve(_config(tiny, **over))


def test_unknown_and_ill_typed_fields(tiny):
    c = _config(tiny)
    c.unlock()
    c.data.tokeniser = "x"
    with pytest.raises(ConfigError, match="config.data.tokeniser: unknown field"):
        resolve(c)
    c = _config(tiny)
    c.unlock()
    c.model["tokenizer"] = "byte"                  # moved to data.tokenizer, as in training
    with pytest.raises(ConfigError, match="config.model.tokenizer: unknown field"):
        resolve(c)
