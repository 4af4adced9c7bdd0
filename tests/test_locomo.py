"""LoCoMo loading / rendering (real file) and the report writers."""

import copy
import json
import os
from pathlib import Path

import pytest

from deltamem_jax.evaluation import locomo as L
from deltamem_jax.evaluation import report as R

REPO_ROOT = Path(__file__).resolve().parents[1]
# Expected counts for locomo10.json (computed once from the file; stable).
EXPECTED_CATEGORY_COUNTS = {1: 282, 2: 321, 3: 96, 4: 841, 5: 446}
EXPECTED_SAMPLE_IDS = ["conv-26", "conv-30", "conv-41", "conv-42", "conv-43",
                       "conv-44", "conv-47", "conv-48", "conv-49", "conv-50"]


def _locomo_path() -> Path:
    env = os.environ.get("DELTAMEM_LOCOMO")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "locomo10.json"
    if not path.is_file():
        pytest.fail(f"LoCoMo data not found at {path}; set DELTAMEM_LOCOMO or place locomo10.json "
                    f"in ../shared/data/ relative to the repo root")
    return path


@pytest.fixture(scope="module")
def convs():
    return L.load_locomo(_locomo_path())


@pytest.fixture(scope="module")
def raw():
    with open(_locomo_path(), encoding="utf-8") as fh:
        return json.load(fh)


# ---------------------------------------------------------------- loading

def test_default_path_matches_test_path():
    assert L.default_locomo_path().resolve() == _locomo_path().resolve()


def test_real_file_structure(convs):
    assert [c.sample_id for c in convs] == EXPECTED_SAMPLE_IDS
    assert L.count_by_category(convs) == EXPECTED_CATEGORY_COUNTS
    assert sum(len(c.questions) for c in convs) == 1986
    c0 = convs[0]
    assert c0.speakers == ("Caroline", "Melanie")
    assert len(c0.sessions) == 19  # conv-26 lists date_times up to 35 but only 19 sessions
    assert [s.index for s in c0.sessions] == list(range(1, 20))
    assert c0.sessions[0].date_time == "1:56 pm on 8 May, 2023"
    assert c0.sessions[0].turns[0] == L.Turn("Caroline", "D1:1",
                                             "Hey Mel! Good to see you! How have you been?")
    for c in convs:
        assert c.sessions and all(s.date_time.strip() and s.turns for s in c.sessions)
        assert {t.speaker for s in c.sessions for t in s.turns} == set(c.speakers)
        assert all(isinstance(q.answer, str) and q.answer for q in c.questions)


def test_question_fields(convs):
    q = convs[0].questions[0]
    assert q == L.LocomoQuestion("When did Caroline go to the LGBTQ support group?",
                                 "7 May 2023", 2, ("D1:3",), None, 0)
    assert convs[0].questions[1].answer == "2022"  # integer answers are stringified
    adv = [q for q in convs[0].questions if q.category == 5]
    assert adv and all(q.adversarial_answer is not None for q in adv)
    # category 5 without 'answer' falls back to 'adversarial_answer'
    only_adv = [q for q in adv if q.answer == q.adversarial_answer]
    assert only_adv


def test_limits_and_category_filter(raw):
    path = _locomo_path()
    few = L.load_locomo(path, max_conversations=2, max_questions_per_conversation=3)
    assert [c.sample_id for c in few] == ["conv-26", "conv-30"]
    assert [len(c.questions) for c in few] == [3, 3]
    assert [q.qa_index for q in few[0].questions] == [0, 1, 2]
    scored = L.load_locomo(path, categories=(1, 2, 3, 4))
    assert L.count_by_category(scored) == {k: v for k, v in EXPECTED_CATEGORY_COUNTS.items()
                                           if k != 5}
    firsts = L.load_locomo(path, max_conversations=1, categories=[3],
                           max_questions_per_conversation=2)
    want = [i for i, q in enumerate(raw[0]["qa"]) if q["category"] == 3][:2]
    assert [q.qa_index for q in firsts[0].questions] == want
    assert all(q.category == 3 for q in firsts[0].questions)


def test_env_var_override(tmp_path, monkeypatch, raw):
    p = tmp_path / "mini.json"
    p.write_text(json.dumps(raw[1:2]))
    monkeypatch.setenv("DELTAMEM_LOCOMO", str(p))
    assert L.default_locomo_path() == p
    assert [c.sample_id for c in L.load_locomo()] == ["conv-30"]


# ---------------------------------------------------------------- rendering

def test_render_session_and_turn(convs):
    s = convs[0].sessions[0]
    text = L.render_session(s)
    assert text.startswith("DATE: 1:56 pm on 8 May, 2023\nCONVERSATION:\n"
                           'Caroline said, "Hey Mel! Good to see you! How have you been?"\n'
                           'Melanie said, "Hey Caroline!')
    assert text.endswith("\n") and text.count("\n") == 2 + len(s.turns)
    assert (L.render_turn(L.Turn("A", "D1:1", "look", "a photo of a cat"))
            == 'A said, "look" and shared a photo of a cat.')
    captioned = [t for t in s.turns if t.blip_caption]
    assert captioned and f" and shared {captioned[0].blip_caption}." in text


def test_render_conversation_order_and_contents(convs):
    c = convs[0]
    latest = L.render_conversation(c)
    chrono = L.render_conversation(c, order="chronological")
    for sp in c.speakers:
        assert f"{sp} said, " in latest
    for s in c.sessions:
        assert f"DATE: {s.date_time}\nCONVERSATION:\n" in latest
    first, last = c.sessions[0].date_time, c.sessions[-1].date_time
    assert latest.index(last) < latest.index(first)
    assert chrono.index(first) < chrono.index(last)
    assert sorted(latest.split("\n")) == sorted(chrono.split("\n"))
    with pytest.raises(ValueError):
        L.render_conversation(c, order="random")


def test_session_messages(convs):
    c = convs[1]
    msgs = L.session_messages(c)
    assert len(msgs) == len(c.sessions)
    assert all(m["role"] == "user" for m in msgs)
    assert msgs[0]["content"] == L.render_session(c.sessions[0])
    assert msgs[-1]["content"].startswith(f"DATE: {c.sessions[-1].date_time}\n")


def test_question_prompt_and_full_context(convs):
    c = convs[0]
    q2 = c.questions[0]
    assert q2.category == 2
    p2 = L.question_prompt(q2)
    assert p2.startswith("Based on the above conversations, write a short answer")
    assert p2.endswith("\n\nQuestion: When did Caroline go to the LGBTQ support group? "
                       "Use DATE of CONVERSATION to answer with an approximate date.")
    q4 = next(q for q in c.questions if q.category == 4)
    assert L.question_prompt(q4).endswith(f"Question: {q4.question}")
    assert L.question_prompt("Why?", category=2).endswith(L.CATEGORY_2_SUFFIX)
    full = L.full_context_prompt(c, q4)
    assert full.startswith("Below is a conversation between two people: Caroline and Melanie.")
    assert L.render_conversation(c) + "\n\n" + L.question_prompt(q4) in full
    msgs = L.full_context_messages(c, q4, system_prompt="SYS")
    assert [m["role"] for m in msgs] == ["system", "user"] and msgs[1]["content"] == full
    assert [m["role"] for m in L.full_context_messages(c, q4)] == ["user"]


# ---------------------------------------------------------------- errors

def test_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="DELTAMEM_LOCOMO"):
        L.load_locomo(tmp_path / "nope.json")


def test_bad_json_and_top_level(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(L.LocomoFormatError, match="not valid JSON"):
        L.load_locomo(p)
    p.write_text(json.dumps({"sample_id": "x"}))
    with pytest.raises(L.LocomoFormatError, match="list of samples"):
        L.load_locomo(p)


@pytest.mark.parametrize("mutate, field", [
    (lambda s: s.pop("conversation"), "'conversation'"),
    (lambda s: s["conversation"].pop("speaker_b"), "conversation.speaker_b"),
    (lambda s: s["conversation"].pop("session_2_date_time"), "conversation.session_2_date_time"),
    (lambda s: s["conversation"]["session_3"][4].pop("text"), "conversation.session_3[4].text"),
    (lambda s: s["conversation"]["session_1"][0].__setitem__("speaker", 5),
     "conversation.session_1[0].speaker"),
    (lambda s: s["qa"][7].pop("question"), "qa[7].question"),
    (lambda s: s["qa"][2].pop("answer"), "qa[2].answer"),
    (lambda s: s["qa"][0].__setitem__("category", 9), "qa[0].category"),
    (lambda s: s["qa"][0].__setitem__("evidence", "D1:3"), "qa[0].evidence"),
    (lambda s: s.pop("qa"), "'qa'"),
])
def test_malformed_sample_names_sample_and_field(raw, tmp_path, mutate, field):
    data = copy.deepcopy(raw[:2])
    mutate(data[1])
    with pytest.raises(L.LocomoFormatError) as exc:
        L.parse_locomo_sample(data[1], position=1)
    msg = str(exc.value)
    assert "conv-30" in msg and field in msg and "index 1" in msg
    p = tmp_path / "m.json"
    p.write_text(json.dumps(data))
    with pytest.raises(L.LocomoFormatError, match="conv-30"):
        L.load_locomo(p)
    # the intact first sample alone still loads
    assert L.load_locomo(p, max_conversations=1)[0].sample_id == "conv-26"


def test_category5_without_any_answer_is_an_error(raw):
    s = copy.deepcopy(raw[0])
    i = next(i for i, q in enumerate(s["qa"]) if q["category"] == 5 and "answer" not in q)
    s["qa"][i].pop("adversarial_answer")
    with pytest.raises(L.LocomoFormatError, match=rf"qa\[{i}\]"):
        L.parse_locomo_sample(s)


# ---------------------------------------------------------------- reports

RESULTS = {
    "no_memory": {"exact_match": 0.125, "f1": 0.25, "n": 8},
    "delta_mem": {"exact_match": 0.5, "f1": 0.6875, "n": 8},
    "full_context": {"exact_match": 0.875, "f1": 0.9375, "n": 8},
}


def test_write_json_round_trip_and_atomic(tmp_path):
    import numpy as np

    p = tmp_path / "sub" / "r.json"
    R.write_json(RESULTS, p)
    assert R.read_json(p) == RESULTS
    assert [f.name for f in p.parent.iterdir()] == ["r.json"]  # no temp files left
    R.write_json({"a": np.float32(0.5), "b": np.arange(3), "c": float("nan"), 1: (1, 2)}, p)
    assert R.read_json(p) == {"a": 0.5, "b": [0, 1, 2], "c": None, "1": [1, 2]}


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "x.json"
    R.write_json({"ok": 1}, p)
    with pytest.raises(TypeError):
        R.write_json({"bad": object()}, p)
    assert R.read_json(p) == {"ok": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]


def test_report_writes_through_the_one_atomic_helper(tmp_path):
    """Reports are written by utils.atomic: a temp file left by a crashed write is cleared by
    the next write of that file, and nothing but the report files remains."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("locomo.json", "locomo.md", "locomo.png"):
        (out / f".{name}.crashed.tmp").write_text("torn")
    R.write_report(RESULTS, out, "locomo", title="t")
    assert sorted(p.name for p in out.iterdir()) == ["locomo.json", "locomo.md", "locomo.png"]
    assert not hasattr(R, "atomic_write_bytes") or R.atomic_write_bytes.__module__ == \
        "deltamem_jax.utils.atomic"


def test_markdown_table():
    md = R.markdown_table(RESULTS, float_fmt="{:.3f}")
    lines = md.strip().split("\n")
    assert lines[0] == "| setting | exact_match | f1 | n |"
    assert lines[2] == "| no_memory | 0.125 | 0.250 | 8 |"
    assert lines[3] == "| delta_mem | 0.500 | 0.688 | 8 |"
    assert lines[4] == "| full_context | 0.875 | 0.938 | 8 |"
    nested = {"no_memory": {"f1": {"1": 0.5}, "loss": None},
              "delta_mem": {"f1": {"1": float("nan"), "2": 0.25}}}
    md2 = R.markdown_table(nested, metrics=["f1/1", "f1/2", "loss"])
    assert "| no_memory | 0.5000 | — | n/a |" in md2
    assert "| delta_mem | n/a | 0.2500 | — |" in md2


def test_write_report_files(tmp_path):
    locomo = {
        "no_memory": {"cat1_multi_hop": 0.1, "cat2_temporal": 0.2, "overall": 0.15, "n": 4},
        "delta_mem": {"cat1_multi_hop": 0.3, "cat2_temporal": 0.4, "overall": 0.35, "n": 4},
        "full_context": {"cat1_multi_hop": 0.5, "cat2_temporal": 0.6, "overall": 0.55, "n": 4},
    }
    paths = R.write_report(locomo, tmp_path / "out", "locomo", title="LoCoMo F1", meta={"seed": 42})
    assert R.read_json(paths["json"]) == {"title": "LoCoMo F1", "meta": {"seed": 42},
                                          "results": locomo}
    md = paths["markdown"].read_text()
    assert ("## LoCoMo F1" in md and "| delta_mem | 0.3000 | 0.4000 | 0.3500 | 4 |" in md
            and "- seed: 42" in md)
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    from matplotlib.image import imread

    img = imread(str(paths["png"]))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["locomo.json", "locomo.md",
                                                                    "locomo.png"]


def test_bar_chart_default_metrics_skip_counts_and_draw_values(tmp_path):
    ppl = {"no_memory": {"loss": 2.0, "ppl": 7.389, "n_tokens": 1000},
           "delta_mem": {"loss": 1.5, "ppl": 4.482, "n_tokens": 1000}}
    assert R._chart_metrics(R._rows(ppl)) == ["loss", "ppl"]
    a = R.bar_chart_png(ppl)
    b = R.bar_chart_png({"no_memory": {"loss": 2.0, "ppl": 7.389},
                         "delta_mem": {"loss": 1.5, "ppl": 1.0}})
    assert a[:8] == b"\x89PNG\r\n\x1a\n" and a != b
    p = R.write_bar_chart(ppl, tmp_path / "ppl.png", metrics=["ppl"], title="ppl")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
