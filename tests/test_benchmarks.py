"""HotpotQA, GPQA-Diamond, IFEval and MemoryAgentBench under the authors' protocol: tiny
files in each released format, loading, prompts, scoring on hand cases, a full run on a tiny
model (backbone vs δ-mem, a message-mean adapter on the span path).

CI budget: every task answers through one function (``SinglePromptTask.run_batch`` →
``answer_prompts``), so the backbone-alone setting runs on HotpotQA and GPQA only; IFEval
and MemoryAgentBench run δ-mem's setting, whose write paths differ per task."""

import csv
import hashlib
import json
import pathlib
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deltamem_jax.evaluation import gpqa, hotpotqa, ifeval, mab
from deltamem_jax.evaluation.defaults import eval_config
from deltamem_jax.memory.config import DeltaMemConfig

from helpers import random_model, run_eval, save_pretrained

HERE = pathlib.Path(__file__).resolve().parent

HOTPOT = [{"id": f"h{i}", "question": f" Who is {i}? ", "answer": "Ann", "type": "bridge",
           "level": "easy" if i % 2 else "hard",
           "context": {"title": ["T1", "T2", "T3"],
                       "sentences": [[" Ann is here. ", f"She is {i}."], ["  "], ["Bob."]]}}
          for i in range(3)]
GPQA_ROWS = [{"Question": f" What is {i}? ", "Correct Answer": " right ",
              "Incorrect Answer 1": "w1", "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3",
              "Record ID": f"rec{i}", "High-level domain": "Physics", "Subdomain": "x"}
             for i in range(3)]
IFEVAL_ROWS = [{"key": 1, "prompt": "  Write in lowercase.  ",
                "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
               {"key": 2, "prompt": "Answer in at least 2 sentences.",
                "instruction_id_list": ["length_constraints:number_sentences"],
                "kwargs": [{"relation": "at least", "num_sentences": 2}]}]


def _mab_rows(split):
    return [{"context": "Fact: the key is 42. " * 5, "questions": ["What is the key?", "Key?"],
             "answers": [["42", "forty-two", "42 "], ["42"]],
             "metadata": {"source": "eventqa_full"}},
            {"context": "Long text. " * 10, "questions": ["Summary?"], "answers": [["text"]],
             "metadata": {"source": "infbench_sum_eng_shots2"}}]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    (root / "hotpot.jsonl").write_text("\n".join(json.dumps(r) for r in HOTPOT))
    pq.write_table(pa.Table.from_pylist(HOTPOT), root / "hotpot.parquet")
    with open(root / "gpqa_diamond.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(GPQA_ROWS[0]))
        w.writeheader()
        w.writerows(GPQA_ROWS)
    (root / "ifeval.jsonl").write_text("\n".join(json.dumps(r) for r in IFEVAL_ROWS))
    (root / "mab" / "data").mkdir(parents=True)
    for split in mab.SPLITS[:2]:
        pq.write_table(pa.Table.from_pylist(_mab_rows(split)),
                       root / "mab" / "data" / f"{split}-00000-of-00001.parquet")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    token = save_pretrained(random_model(1), root / "token")
    span = save_pretrained(random_model(1, memory=DeltaMemConfig(
        output_init="random", memory_write_granularity="message_mean")), root / "span")
    return {"token": token, "span": span}


def _run(models, kind, task, path, workdir, **over):
    c = eval_config()
    c.task, c.data.path = task, str(path)
    c.model.hf_dir, c.model.adapter = map(str, models[kind])
    c.batch_size, c.progress, c.mesh.data = 2, False, 1
    c.decoding.max_new_tokens = 6
    c.ifeval.nltk = "shim"
    for k, v in over.items():
        node = c
        *p, last = k.split(".")
        for x in p:
            node = node[x]
        node[last] = v
    return run_eval(c, str(workdir))


# ----------------------------------------------------------------------------- HotpotQA

def test_hotpotqa_prompt_and_scoring():
    ctx = hotpotqa.build_context(HOTPOT[1])
    assert ctx == "Passage 1 - T1:\nAnn is here. She is 1.\n\nPassage 3 - T3:\nBob."
    assert hotpotqa.build_context({"context": {"title": ["a"], "sentences": [[" "]]}}) == \
        "No passages provided."
    assert hotpotqa.normalize_qa_span("The U.S.-based  co.") == "u s based co"   # punct -> space
    assert hotpotqa.qa_f1("", "") == 1.0 and hotpotqa.qa_f1("x", "") == 0.0
    assert hotpotqa.qa_f1("yes", "no") == 0.0                       # no yes/no special case
    assert hotpotqa.first_line("\n  Ann \nmore") == "Ann"


def test_hotpotqa_runs_from_jsonl_and_parquet(files, models, tmp_path):
    a = _run(models, "token", "hotpotqa", files / "hotpot.jsonl", tmp_path / "a")
    b = _run(models, "token", "hotpotqa", files / "hotpot.parquet", tmp_path / "b")
    assert a["rows"] == b["rows"]
    s = a["summaries"]["delta_mem_full_context"]
    assert s["num_samples"] == 3 and set(s["by_level"]) == {"easy", "hard"}


# ----------------------------------------------------------------------------- GPQA

def test_gpqa_choice_order_is_cpythons_shuffle():
    for rid in ("recA", "rec7", "xyz"):
        d = hashlib.md5(f"{rid}:42".encode()).hexdigest()
        order = [0, 1, 2, 3]
        random.Random(int(d[:8], 16)).shuffle(order)
        assert gpqa.choice_order(rid, 42) == order
    prompt, letter = gpqa.build_prompt(GPQA_ROWS[0], 42)
    assert f"{letter}. right" in prompt and prompt.startswith(
        "Answer the following multiple-choice question.\nPlease show your choice in the `answer`"
        " field with only the choice letter, for example: {\"answer\": \"C\"}."
        "\n\nQuestion: What is 0?\n\nA. ")


@pytest.mark.parametrize("text, letter", [
    ('```json\n{"answer": "B"}\n```', "B"), ('"answer": "c" then "answer": "D"', "D"),
    (r"so \boxed{\text{A}}", "A"), ("Final answer: **C**", "C"), ("The correct answer is B", "B"),
    ("The answer is B", ""), ("(C)", "C"), ("reasoning\nD. because", "D"), ("no letter", ""),
])
def test_gpqa_letter_extraction(text, letter):
    assert gpqa.extract_letter(text) == letter


def test_gpqa_runs_from_csv(files, models, tmp_path):
    out = _run(models, "token", "gpqa", files / "gpqa_diamond.csv", tmp_path / "g")
    assert out["summaries"]["full_context"]["num_samples"] == 3
    assert "Physics" in out["summaries"]["full_context"]["by_domain"]


# ----------------------------------------------------------------------------- IFEval

def test_ifeval_checkers_and_language_heuristic():
    utils = ifeval.ifeval_checkers("authors", "shim")
    r = ifeval.evaluate_response(IFEVAL_ROWS[0], "all lower case here", utils)
    assert r["prompt_level_strict_acc"] and r["inst_level_strict_acc"] == [True]
    r = ifeval.evaluate_response(IFEVAL_ROWS[0], "Not Lower", utils)
    assert not r["prompt_level_strict_acc"]
    r = ifeval.evaluate_response(IFEVAL_ROWS[1], "One. Two.", utils)
    assert r["prompt_level_strict_acc"]
    assert ifeval.detect_language("Das ist nicht gut") == "de"
    assert ifeval.detect_language("это не так") == "ru"
    assert ifeval.detect_language("xyz qqq") == "en"
    with pytest.raises(ifeval.LangDetectException):
        ifeval.detect_language("   ")


def test_ifeval_runs(files, models, tmp_path):
    out = _run(models, "span", "ifeval", files / "ifeval.jsonl", tmp_path / "i",
               settings=("delta_mem_full_context",))
    s = out["summaries"]["delta_mem_full_context"]
    assert s["num_samples"] == 2 and s["num_instructions"] == 2


# ----------------------------------------------------------------------------- MAB

def test_mab_helpers():
    assert mab.aliases(["42", " 42 ", "", "forty-two"]) == ["42", "forty-two"]
    assert mab.is_correct("The key is 42.", ["42"]) and not mab.is_correct("", ["42"])
    assert mab.is_correct("x1y", ["1"])          # character substring, no word boundary
    assert mab.clip_chars("a" * 200, 100).count("[... context truncated ...]") == 1
    assert len(mab.clip_chars("a" * 200, 100)) == 100
    assert mab.generation_length("eventqa_full", 4096) == 40
    assert mab.generation_length("mystery", 4096) == 4096
    recs = [{"split": "Accurate_Retrieval", "source": "eventqa_x", "primary_metric": "accuracy",
             "primary_score": 1.0}] * 3 + [
            {"split": "Accurate_Retrieval", "source": "ruler_qa1_197K",
             "primary_metric": "accuracy", "primary_score": 0.0}]
    s = mab.summarize_mab(recs)
    assert s["categories"]["Accurate Retrieval"]["overall"] == 0.75       # sample-weighted
    assert s["categories"]["Accurate Retrieval"]["datasets"]["SH-Doc QA"]["score"] == 0.0


def test_mab_runs_both_write_paths(files, models, tmp_path):
    out = _run(models, "span", "memory_agent_bench", files / "mab", tmp_path / "m",
               **{"memory_agent_bench.splits": tuple(mab.SPLITS[:2]),
                  "settings": ("delta_mem_full_context",)})
    s = out["summaries"]["delta_mem_full_context"]
    assert s["num_samples"] == 6
    assert set(s["categories"]) == {"Accurate Retrieval", "Test-time Learning"}
