"""eval.py end to end on a tiny random model: both LoCoMo protocols, a run killed with
SIGKILL and resumed (same final numbers), batch rows over 4 devices and items over 2
processes (same numbers as 1 device), print_prompt, and config errors before any work.

CI budget (compiling dominates; items cost milliseconds): one in-process reference run is
shared by the tests that compare against it, and later in-process runs of the same shapes
reuse its compiled programs; the eval.py processes run with the in-process test set-up (8
fake devices, "highest" matmul precision: the same programs, so the same numbers) and read
them from the persistent compilation cache, which this module makes keep every program.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
from filelock import FileLock

from deltamem_jax.evaluation.defaults import eval_config
from deltamem_jax.evaluation.settings import ConfigError, resolve
from deltamem_jax.utils.atomic import atomic_write_json

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
from helpers import random_model, run_eval, save_pretrained  # noqa: E402

QUESTIONS = 8                                  # per conversation: two of each category 1–4
ITEMS = 2 * QUESTIONS                          # two conversations
AUTHORS = ("full_context", "delta_mem_full_context")   # the authors' protocol's default settings
#: run in the reference: also the history written into memory with the QA prompt alone
#: ("no_memory" is full_context's path with a shorter prompt; its prompt is printed below)
REFERENCE = AUTHORS + ("delta_mem",)


@pytest.fixture(scope="module", autouse=True)
def cache_every_program():
    """Let the persistent compilation cache keep programs that compile in under a second
    too, so that the eval.py processes below compile nothing the reference compiled."""
    import jax

    old = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old)


def locomo_file(path, convs=2, questions=QUESTIONS):
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
    return atomic_write_json(path, data)


def _shared_root(tmp_path_factory):
    """A folder every pytest-xdist worker of this session sees: what is built in it (under
    a lock) is built once, whichever workers this module's tests land on."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "eval_runs"
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = _shared_root(tmp_path_factory)
    with FileLock(str(root / "tiny.lock")):
        if not (root / "tiny.json").is_file():
            model_dir, adapter = save_pretrained(random_model(0), root / "tiny")
            atomic_write_json(root / "tiny.json", {
                "model": str(model_dir), "adapter": str(adapter),
                "locomo": str(locomo_file(root / "locomo.json"))})
    return json.loads((root / "tiny.json").read_text())


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
    """eval.py with the settings of :func:`_config` (the protocol's default settings)."""
    return [sys.executable, str(REPO / "eval.py"),
            f"--config={REPO / 'configs' / 'eval_locomo.py'}",
            f"--workdir={workdir}", f"--config.data.path={tiny['locomo']}",
            f"--config.model.hf_dir={tiny['model']}", f"--config.model.adapter={tiny['adapter']}",
            "--config.batch_size=4", "--config.progress=False", "--config.mesh.data=1",
            "--config.decoding.max_new_tokens=12", *extra]


def _env():
    """The in-process set-up (conftest.py: 8 fake devices, its compilation cache), every
    program kept in the cache."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _records(workdir, setting):
    recs = {}
    for f in sorted((pathlib.Path(workdir) / "records" / setting).glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            recs[r["key"]] = r
    return recs


def _predictions(workdir, setting):
    return {k: v["raw_prediction"] for k, v in _records(workdir, setting).items()}


def _same_as_reference(reference, workdir, settings=AUTHORS):
    """Same report rows and, item by item, the same generated text as the reference run."""
    ref_dir, ref = reference
    rows = json.loads((pathlib.Path(workdir) / "locomo.json").read_text())["results"]
    assert rows == {st: ref["rows"][st] for st in settings}
    for st in settings:
        got, want = _predictions(workdir, st), _predictions(ref_dir, st)
        assert len(want) == ITEMS and got == want


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The authors' protocol, in process, on one device: ``(workdir, {"rows", "summaries"})``
    (computed once per session, see :func:`_shared_root`)."""
    work = _shared_root(tmp_path_factory) / "reference"
    with FileLock(str(work) + ".lock"):
        if not (work / "locomo.json").is_file():
            run_eval(_config(tiny, settings=REFERENCE), str(work))
    done = json.loads((work / "locomo.json").read_text())
    return work, {"rows": done["results"], "summaries": done["meta"]["summaries"]}


def test_both_protocols_in_process(tiny, reference, tmp_path):
    work, out = reference
    assert set(out["rows"]) == set(REFERENCE)
    summ = out["summaries"]["delta_mem_full_context"]
    assert summ["num_questions"] == ITEMS and set(summ["category_scores"]) == {"1", "2", "3", "4"}
    recs = _records(work, "delta_mem_full_context")
    base = _records(work, "full_context")
    assert len(recs) == ITEMS and all(0 <= r["score"] <= 1 for r in recs.values())
    # the memory changes what the model says (random adapter), same prompts
    assert sum(recs[k]["raw_prediction"] != base[k]["raw_prediction"] for k in recs) > ITEMS // 4
    assert all(recs[k]["prompt_tokens"] == base[k]["prompt_tokens"] for k in recs)
    for f in ("locomo.json", "locomo.md", "locomo.png"):
        assert (work / f).is_file()
    # a finished run is not run again
    again = run_eval(_config(tiny, settings=REFERENCE), str(work))
    assert again.get("skipped") and again["rows"] == out["rows"]
    # memory only: its default settings; the one that writes memory runs end to end (the
    # others are the backbone alone, and locomo_eval's own tests run all three)
    assert resolve(_config(tiny, protocol="memory_only")).settings == \
        ("no_memory", "delta_mem", "full_context")
    mem = run_eval(_config(tiny, protocol="memory_only", settings=("delta_mem",)),
                   str(tmp_path / "b"))
    assert set(mem["rows"]) == {"delta_mem"} and mem["rows"]["delta_mem"]["n"] == ITEMS
    assert (tmp_path / "b" / "locomo.png").is_file()


def test_rows_over_four_devices_equal_one(tiny, reference, tmp_path):
    """δ-mem's setting (memory state, KV cache and sampling keys split over the rows)."""
    settings = ("delta_mem_full_context",)
    four = run_eval(_config(tiny, **{"mesh.data": 4, "settings": settings}), str(tmp_path / "4"))
    assert four["files"] and set(four["rows"]) == set(settings)
    _same_as_reference(reference, tmp_path / "4", settings)


def test_killed_run_resumes_to_the_same_numbers(tiny, reference, tmp_path, caplog):
    """eval.py killed with SIGKILL after its first batch; the run resumed (in process: the
    reference's programs) ends with the reference's numbers, item by item."""
    work = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(tiny, work), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = work / "records" / AUTHORS[0] / "rank0.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (first.is_file() and first.read_text().strip()):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = sum(len(_records(work, st)) for st in AUTHORS)
    assert 4 <= partial < 2 * ITEMS and not (work / "locomo.json").exists()   # really interrupted
    with caplog.at_level("INFO", logger="deltamem_jax.eval"):
        run_eval(_config(tiny), str(work))
    assert any("already done, resuming" in r.getMessage() for r in caplog.records)
    _same_as_reference(reference, work)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tiny, reference, tmp_path):
    """Items over two processes (δ-mem's setting; the engine shards every setting alike)."""
    port, work = _free_port(), tmp_path / "multi"
    settings = ("delta_mem_full_context",)
    procs = [subprocess.Popen(
        _cmd(tiny, work, f"--config.settings={settings!r}", "--config.distributed.initialize=True",
             f"--config.distributed.coordinator_address=127.0.0.1:{port}",
             "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert sorted(p.name for p in (work / "records" / settings[0]).iterdir()) == \
        ["rank0.jsonl", "rank1.jsonl"]
    _same_as_reference(reference, work, settings)


def test_print_prompt_command(tiny):
    r = subprocess.run(_cmd(tiny, "/tmp/unused", "--config.print_prompt=conv-1:4",
                            "--config.settings=('full_context','delta_mem','no_memory')"),
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
