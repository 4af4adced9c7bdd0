"""The authors' LoCoMo protocol: prompts character for character against a rendering built
here from the rules of PROTOCOLS.md §2 (from the raw JSON, not our parser), and their
scoring edge cases on hand cases."""

import json
import os
import re

import pytest

from deltamem_jax.evaluation import locomo as L
from deltamem_jax.evaluation import locomo_authors as A
from deltamem_jax.evaluation.scoring import (
    authors_locomo_f1,
    authors_locomo_multi_answer_f1,
    canonicalize_locomo_prediction,
    score_locomo_authors,
    summarize_locomo_authors,
)

SYSTEM = ("You are a helpful, respectful and honest assistant whose job is to understand the "
          "following conversation and answer questions based on the conversation. If you don't "
          "know the answer to a question, please don't share false information.")


@pytest.fixture(scope="module")
def raw():
    with open(os.environ["DELTAMEM_LOCOMO"], encoding="utf-8") as f:
        return json.load(f)


def _turn(t):
    s = t["speaker"] + ' said, "' + t["text"] + '"' + "\n"
    if t.get("blip_caption"):
        s = s + " and shared " + t["blip_caption"] + "."
    return s + "\n"


def _expected_user(sample, q, count=None, budget=None):
    """PROTOCOLS.md §2.2-2.3, written out independently of the code under test."""
    conv = sample["conversation"]
    nums = sorted(int(k[len("session_"):]) for k in conv if re.fullmatch(r"session_\d+", k))
    start = ("Below is a conversation between two people: " + conv["speaker_a"] + " and "
             + conv["speaker_b"] + ". The conversation takes place over multiple days and the "
             "date of each conversation is wriiten at the beginning of the conversation.\n\n")
    text = q["question"]
    if q["category"] == 2:
        text += " Use DATE of CONVERSATION to answer with an approximate date."
    qa = ("Based on the above conversations, write a short answer for the following question in "
          "a few words. Do not write complete and lengthy sentences. Answer with exact words from "
          "the conversations whenever possible.\n\nQuestion: " + text)
    blocks = []                                  # chronological (header, [turn texts])
    if budget is None:
        for n in nums:
            blocks.append((conv[f"session_{n}_date_time"],
                           [_turn(t) for t in conv[f"session_{n}"]]))
    else:
        used, done = 0, False
        for n in nums:
            date, kept = conv[f"session_{n}_date_time"], []
            for t in reversed(conv[f"session_{n}"]):
                cost = count("DATE: " + date + "\nCONVERSATION:\n" + _turn(t))
                if count(start) + cost + used + count(qa) < budget:
                    kept.insert(0, _turn(t))
                    used += count(_turn(t))
                else:
                    done = True
                    break
            blocks.append((date, kept))
            if done:
                break
    context = "".join("\nDATE: " + d + "\nCONVERSATION:\n" + "".join(ts)
                      for d, ts in reversed(blocks))
    return start + context + "\n\n" + qa


def _items(raw):
    """Several items: every category, captions, the first and last conversations."""
    picks = []
    for si in (0, 1, len(raw) - 1):
        seen = set()
        for qi, q in enumerate(raw[si]["qa"]):
            if q["category"] in (1, 2, 3, 4) and q["category"] not in seen:
                seen.add(q["category"])
                picks.append((si, qi))
    return picks


def test_prompts_match_the_rules_without_truncation(raw):
    convs = L.load_locomo(os.environ["DELTAMEM_LOCOMO"])
    items = _items(raw)
    assert len(items) >= 10
    for si, qi in items:
        q = raw[si]["qa"][qi]
        ours = next(x for x in convs[si].questions if x.qa_index == qi)
        spec = A.question_spec(ours, sample_id=convs[si].sample_id, question_index=0)
        msgs = A.build_messages(convs[si], spec, len, None)
        assert msgs[0] == {"role": "system", "content": SYSTEM}
        assert msgs[1]["role"] == "user"
        assert msgs[1]["content"] == _expected_user(raw[si], q), (si, qi)
    # spot checks of the layout rules themselves
    text = A.build_messages(convs[0], A.question_spec(convs[0].questions[0], sample_id="x",
                                                      question_index=0), len, None)[1]["content"]
    assert "wriiten at the beginning of the conversation.\n\n\nDATE: " in text
    last = convs[0].sessions[-1].date_time
    assert text.index(last) < text.index(convs[0].sessions[0].date_time)    # latest first


def test_prompts_match_the_rules_under_truncation(raw):
    convs = L.load_locomo(os.environ["DELTAMEM_LOCOMO"])
    count = lambda s: len(s.encode("utf-8")) // 4 + 1
    for si, qi in _items(raw)[:6]:
        q = raw[si]["qa"][qi]
        ours = next(x for x in convs[si].questions if x.qa_index == qi)
        spec = A.question_spec(ours, sample_id=convs[si].sample_id, question_index=0)
        for budget in (900, 2500):
            got = A.build_messages(convs[si], spec, count, budget)[1]["content"]
            assert got == _expected_user(raw[si], q, count, budget), (si, qi, budget)
            assert len(got) < len(_expected_user(raw[si], q))            # really truncated
            assert convs[si].sessions[0].date_time in got                # the oldest survive


def test_category_5_options_follow_the_sha256_rule():
    q = L.LocomoQuestion("Did she go?", "yes", 5, ())
    flips = []
    for idx in range(8):
        spec = A.question_spec(q, sample_id="conv-26", question_index=idx, seed=42)
        import hashlib
        h = hashlib.sha256(f"42|conv-26|{idx}|cat5".encode()).digest()
        no_info_first = int.from_bytes(h[:8], "big") % 2 == 0
        flips.append(no_info_first)
        a, b = (("No information available", "yes") if no_info_first
                else ("yes", "No information available"))
        assert spec.text == (f"Did she go? (a) {a} (b) {b}. "
                             "Select the correct answer by writing (a) or (b).")
    assert len(set(flips)) == 2


def test_print_prompt_shows_the_authors_input(raw, tmp_path):
    """The task's render (eval.py --config.print_prompt) holds exactly the built messages."""
    from deltamem_jax.data.tokenizer import ByteTokenizer
    from deltamem_jax.evaluation.chat import prompt_text
    from deltamem_jax.evaluation.defaults import eval_config
    from deltamem_jax.evaluation.locomo_task import LocomoTask
    from deltamem_jax.evaluation.settings import resolve

    c = eval_config()
    c.data.path = os.environ["DELTAMEM_LOCOMO"]
    s = resolve(c, need_model=False)

    class EM:                                   # what the task reads of a loaded model
        tokenizer = ByteTokenizer()
        context_window = 1 << 30

    task = LocomoTask(s, EM())
    sid, qa = raw[1]["sample_id"], 3
    out = task.render(f"{sid}:{qa}", "full_context")
    q = raw[1]["qa"][qa]
    expected = prompt_text(EM.tokenizer, [{"role": "system", "content": SYSTEM},
                                          {"role": "user", "content": _expected_user(raw[1], q)}])
    assert expected in out and "tokens)" in out
    with pytest.raises(ValueError, match="no conversation"):
        task.render("nope:1", "full_context")


# ----------------------------------------------------------------------------- scoring

@pytest.mark.parametrize("raw_text, expected", [
    ("(a) Paris", "paris"),
    ("a) Paris", "paris"),
    ("Answer: Paris", "paris"),
    ("answer:Paris\nmore text", "paris"),
    ("\n\n  Samba (samba)  \n", "samba (samb"),      # plain substring deletion eats letters
    ('He said \\"hi\\"', "he said 'hi'"),
    ("", ""),
])
def test_canonicalisation(raw_text, expected):
    assert canonicalize_locomo_prediction(raw_text, 4) == expected


def test_category_5_canonicalisation_maps_options():
    opts = {"a": "No information available", "b": "blue"}
    assert canonicalize_locomo_prediction("(b)", 5, opts) == "blue"
    assert canonicalize_locomo_prediction("a", 5, opts) == "No information available"
    assert (canonicalize_locomo_prediction("It is not mentioned", 5, opts)
            == "No information available")
    assert score_locomo_authors("No information available", "blue", 5) == 1.0
    assert score_locomo_authors("blue", "blue", 5) == 0.0


def test_scoring_edge_cases():
    assert authors_locomo_f1("", "") == 0.0                    # empty vs empty: 0 (not 1)
    assert authors_locomo_f1("", "tea") == 0.0
    assert authors_locomo_f1("the, and", "tea") == 0.0         # nothing left after normalising
    assert authors_locomo_f1("libraries", "library") == 1.0    # Porter stemming
    assert authors_locomo_f1("Tea and cake", "cake, tea") == 1.0  # commas and "and" removed
    # multi-hop: comma split, empty parts dropped, mean over gold parts of the best match
    assert authors_locomo_multi_answer_f1("tea, , cake", "cake, tea") == 1.0
    assert authors_locomo_multi_answer_f1("tea", "cake, tea") == 0.5
    assert authors_locomo_multi_answer_f1(",", "tea") == 0.0
    assert score_locomo_authors("tea", "tea; coffee later", 3) == 1.0   # category 3 ';' cut
    assert score_locomo_authors("coffee later", "tea; coffee later", 3) == 0.0
    assert score_locomo_authors("7 May 2023", 2023, 2) == 0.5   # int gold via str(); P 1/3, R 1
    assert score_locomo_authors("a b c", "a", 4) == 0.0        # articles only on one side
    s = score_locomo_authors("one two three", "one two", 4)
    assert s == round(2 * (2 / 3) * 1 / (2 / 3 + 1), 4) == 0.8


def test_summary_is_micro_and_rounded():
    recs = [{"category": 1, "score": 1.0}, {"category": 1, "score": 0.0},
            {"category": 4, "score": 0.33333}]
    out = summarize_locomo_authors(recs)
    assert out["overall_score"] == round(1.33333 / 3, 4)
    assert out["category_scores"]["1"] == {"name": "multi_hop", "score": 0.5, "count": 2}
    assert out["category_scores"]["4"]["score"] == 0.3333
    assert out["num_questions"] == 3
