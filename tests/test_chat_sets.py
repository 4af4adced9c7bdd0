"""The demo's synthetic chat families: format, determinism, answers in the history, and
that the families really differ (wording, answers, filler, system messages)."""

import collections
import json
import re

import numpy as np
import pytest

from deltamem_jax.data import load_records
from deltamem_jax.data.chat_sets import (
    DATASETS,
    ChatSetConfig,
    generate_chat_split,
    write_chat_dataset,
)
from deltamem_jax.data.records import record_problem
from deltamem_jax.tools.demo_eval import chance_scores

N = 150


@pytest.fixture(scope="module")
def splits():
    return {d: generate_chat_split(N, "train", ChatSetConfig(dataset=d)) for d in DATASETS}


def _history(rec):
    return " ".join(m["content"] for m in rec["messages"][:-2])


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_format_and_answer_in_history(splits, dataset):
    for rec in splits[dataset]:
        assert record_problem(rec) is None
        msgs = rec["messages"]
        assert set(rec) == {"messages"}
        assert msgs[-1]["role"] == "assistant" and msgs[-2]["role"] == "user"
        roles = [m["role"] for m in msgs if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2)   # alternating turns
        assert all(m["role"] != "system" for m in msgs[1:])         # system only first
        answer = msgs[-1]["content"]
        assert answer and answer in _history(rec)                   # recallable from history
        assert answer not in msgs[-2]["content"]                    # but not from the question


def test_fact_and_session_ranges():
    cfg = ChatSetConfig(dataset="storage", facts=(3, 3), filler_turns=(0, 0), sessions=(1, 1))
    for rec in generate_chat_split(40, "test", cfg):
        users = [m["content"] for m in rec["messages"] if m["role"] == "user"]
        assert len(users) == 4                                      # 3 facts + the question


def test_deterministic_and_splits_differ(tmp_path):
    cfg = ChatSetConfig(dataset="codes", n_train=20, n_validation=10, n_test=10, seed=3)
    a = write_chat_dataset(tmp_path / "a", cfg)
    b = write_chat_dataset(tmp_path / "b", cfg)
    for split in a:
        with open(a[split]) as fa, open(b[split]) as fb:
            assert fa.read() == fb.read()
    train = [json.dumps(r) for r in load_records(a["train"])]
    test = [json.dumps(r) for r in load_records(a["test"])]
    assert len(train) == 20 and len(test) == 10 and not set(train) & set(test)
    other = generate_chat_split(20, "train", ChatSetConfig(dataset="codes", seed=4))
    assert [json.dumps(r) for r in other] != train


def _signature(recs):
    """Wording, answer shapes, filler and system prompts of a family."""
    words = collections.Counter(w for r in recs for m in r["messages"]
                                for w in re.findall(r"[a-z]+", m["content"].lower()))
    answers = [r["messages"][-1]["content"] for r in recs]
    shape = collections.Counter(
        "digits" if re.search(r"\d", a) else "multiword" if " " in a else "word" for a in answers)
    systems = {r["messages"][0]["content"] for r in recs if r["messages"][0]["role"] == "system"}
    return words, shape, systems, set(answers)


def test_families_really_differ(splits):
    sig = {d: _signature(r) for d, r in splits.items()}
    names = sorted(DATASETS)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            wx, wy = set(sig[x][0]), set(sig[y][0])
            assert len(wx & wy) / len(wx | wy) < 0.25, (x, y)        # mostly different words
            assert not sig[x][3] & sig[y][3], (x, y)                  # no shared answer
            assert sig[x][2] != sig[y][2], (x, y)                     # different system prompts
    # answer formats: bare words / places (several words with a number) / codes with digits
    assert sig["personal"][1]["digits"] == 0
    assert sig["storage"][1]["digits"] == N and all(" " in a for a in sig["storage"][3])
    assert sig["codes"][1]["digits"] == N
    # filler: arithmetic only in storage, trivia and tech support only in codes
    hist = {d: " ".join(_history(r) for r in splits[d]) for d in DATASETS}
    assert "plus" in hist["storage"] and "plus" not in hist["codes"]
    assert "router" in hist["codes"] and "router" not in hist["personal"]


def test_paraphrased_questions(splits):
    for d, recs in splits.items():
        questions = {r["messages"][-2]["content"] for r in recs}
        assert len(questions) > 30, d


def test_chance_is_low_and_scored_like_the_model(splits):
    for d in DATASETS:
        test = generate_chat_split(100, "test", ChatSetConfig(dataset=d))
        scores = chance_scores(test, splits[d])
        assert set(scores) == {"answer_recall", "exact_match", "token_f1"}
        assert 0.0 <= scores["answer_recall"] < 0.2, d
        assert scores["exact_match"] <= scores["answer_recall"]


def test_chance_hand_case():
    def rec(q, a):
        return {"messages": [{"role": "user", "content": "x"},
                             {"role": "assistant", "content": "y"},
                             {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    fit = [rec("Q1", "red"), rec("Q1", "red"), rec("Q1", "blue"), rec("Q2", "bin 4")]
    test = [rec("Q1", "red"), rec("Q1", "The red one"), rec("Q2", "4"), rec("Q3", "red")]
    s = chance_scores(test, fit)
    # guesses: red, red, bin 4, red (Q3 unseen -> the most frequent answer overall)
    assert s["exact_match"] == pytest.approx(2 / 4)
    assert s["answer_recall"] == pytest.approx(3 / 4)    # gold "4" is inside "bin 4"
    # F1: 1; red vs {red, one}: 2/3; {bin, 4} vs {4}: 2/3; 1
    assert s["token_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3 + 1) / 4)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="dataset"):
        ChatSetConfig(dataset="recipes")
    with pytest.raises(ValueError, match="facts"):
        ChatSetConfig(facts=(0, 2))
    with pytest.raises(ValueError, match="split"):
        generate_chat_split(1, "dev")


def test_values_distinct_within_a_chat(splits):
    for d, recs in splits.items():
        for r in recs:
            gold = r["messages"][-1]["content"]
            # the gold answer is stated exactly once in the history (as whole words, any case)
            hits = re.findall(r"\b" + re.escape(gold) + r"\b", _history(r), re.IGNORECASE)
            assert len(hits) == 1, (d, gold)
    assert np.mean([len(r["messages"]) for r in splits["storage"]]) > 6
