"""Tests of the data layer (deltamem_jax.data): fast, offline, numpy only."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest

from deltamem_jax.data import (
    IGNORE_INDEX,
    VIEW_CODES,
    ByteTokenizer,
    EpisodeConfig,
    EpisodeError,
    EpisodeLoader,
    EpisodeSet,
    HFTokenizer,
    SyntheticConfig,
    TemplateError,
    Tokenizer,
    build_episode,
    build_episodes,
    chance_accuracy,
    clean_records,
    content_sentence_ids,
    generate_split,
    load_records,
    load_tokenizer,
    normalise_record,
    record_problem,
    split_sentences,
    write_synthetic_dataset,
)
from deltamem_jax.data.synthetic import ANSWER_SENTENCES, FACT_KINDS

BT = ByteTokenizer()


def msg(role, content):
    return {"role": role, "content": content}


CONV = [
    msg("system", "Be brief."),
    msg("user", "Hello there. How are you?"),
    msg("assistant", "Fine."),
    msg("user", "My code is 42."),
    msg("assistant", "Noted."),
    msg("user", "What is my code?"),
    msg("assistant", "42"),
]


def test_data_layer_imports_no_jax_or_model_code():
    """The data modules import only numpy/stdlib, datasets/transformers/tokenizers and each
    other."""
    import ast
    import pathlib

    import deltamem_jax.data as pkg

    allowed = {"numpy", "datasets", "transformers", "tokenizers"}
    files = sorted(pathlib.Path(pkg.__file__).parent.glob("*.py"))
    assert len(files) >= 7
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                top = name.split(".")[0]
                ok = (name.startswith(("deltamem_jax.data", "deltamem_jax.utils.files",
                                     "deltamem_jax.utils.atomic"))
                      or top in allowed or top in sys.stdlib_module_names)
                assert ok, f"{f.name} imports {name}"


# --------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_specials():
    text = "Hello, wörld! 🙂\n"
    ids = BT.encode(text)
    assert BT.decode(ids) == text
    assert BT.vocab_size == 264 and BT.vocab_size % 8 == 0
    assert min(ids) >= ByteTokenizer.OFFSET and max(ids) < BT.vocab_size
    assert BT.decode([BT.bos_id, *BT.encode("ab"), BT.END, BT.eos_id, BT.pad_id]) == "ab"
    assert {BT.pad_id, BT.bos_id, BT.eos_id} == {0, 1, 2}


def test_byte_render_chat_attribution():
    msgs = [msg("user", "hi"), msg("assistant", "yo")]
    chat = BT.render_chat(msgs, add_generation_prompt=True)
    expect = [BT.USER, *BT.encode("hi"), BT.END,
              BT.ASSISTANT, *BT.encode("yo"), BT.END, BT.ASSISTANT]
    assert chat.ids.tolist() == expect
    assert chat.message_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, -1]
    assert chat.content_spans == ((1, 3), (5, 7))
    with pytest.raises(ValueError, match="unknown role"):
        BT.render_chat([msg("tool", "x")])


TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Not prefix-stable by a single token: the last message is followed by <eos> unless prompting.
TEMPLATE_ROLLBACK = TEMPLATE.replace(
    "{% if add_generation_prompt %}",
    "{% if not add_generation_prompt %}<eos>{% endif %}{% if add_generation_prompt %}",
)
# Not prefix-stable at all: the header counts the messages.
TEMPLATE_UNSTABLE = "count {{ messages|length }} " + TEMPLATE


def _make_hf_dir(path, template):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ("be brief hello there how are you fine my code is 42 noted what ? . "
             "user assistant system count 1 2 3 4 5 6 7").split()
    vocab = {"[UNK]": 0, "<pad>": 1, "<eos>": 2, "<|im_start|>": 3, "<|im_end|>": 4}
    for w in words:
        vocab.setdefault(w, len(vocab))
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="[UNK]", pad_token="<pad>", eos_token="<eos>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    return {
        name: _make_hf_dir(base / name, t)
        for name, t in [("plain", TEMPLATE), ("rollback", TEMPLATE_ROLLBACK),
                        ("unstable", TEMPLATE_UNSTABLE), ("none", None)]
    }


LOWER = [msg(m["role"], m["content"].lower()) for m in CONV]


def test_hf_tokenizer_render_chat(hf_dirs):
    tok = load_tokenizer(hf_dirs["plain"])
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    hf = tok.hf_tokenizer
    assert (tok.pad_id == hf.convert_tokens_to_ids("<pad>")
            and tok.eos_id == hf.convert_tokens_to_ids("<eos>"))
    chat = tok.render_chat(LOWER, add_generation_prompt=True)
    full = hf.encode(hf.apply_chat_template(LOWER, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)
    assert chat.ids.tolist() == full
    start = hf.convert_tokens_to_ids("<|im_start|>")
    # each message: <|im_start|> role content... <|im_end|>;
    # the generation prompt is two tokens of no message
    owners = chat.message_index.tolist()
    assert owners[-2:] == [-1, -1] and chat.ids[-2] == start
    assert owners[:-2] == sorted(owners[:-2]) and set(owners[:-2]) == set(range(len(LOWER)))
    for i, m in enumerate(LOWER):
        lo, hi = chat.content_spans[i]
        assert chat.ids[lo:hi].tolist() == tok.encode(m["content"])
        assert chat.ids[chat.message_span(i)[0]] == start
    assert tok.decode(tok.encode("hello there")) == "hello there"


def test_hf_tokenizer_rollback_and_errors(hf_dirs, tmp_path):
    tok = HFTokenizer(hf_dirs["rollback"])
    hf = tok.hf_tokenizer
    chat = tok.render_chat(LOWER)
    assert chat.ids.tolist() == hf.encode(hf.apply_chat_template(LOWER, tokenize=False),
                                          add_special_tokens=False)
    # the trailing <eos> moved from each message to the next, ending on the last one
    assert chat.ids[-1] == tok.eos_id and chat.message_index[-1] == len(LOWER) - 1
    assert (chat.ids[chat.message_index < len(LOWER) - 1] != tok.eos_id).all()
    with pytest.raises(TemplateError, match="not prefix-stable"):
        HFTokenizer(hf_dirs["unstable"]).render_chat(LOWER)
    with pytest.raises(ValueError, match="no chat template"):
        HFTokenizer(hf_dirs["none"])
    with pytest.raises(ValueError, match="no usable tokenizer"):
        HFTokenizer(tmp_path)
    with pytest.raises(ValueError, match="neither 'byte'"):
        load_tokenizer(str(tmp_path / "missing"))
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_hf_episode_labels_include_template_tokens(hf_dirs):
    tok = HFTokenizer(hf_dirs["plain"])
    cfg = EpisodeConfig(recent_messages=1, sentence_ids=True)
    ep = build_episode(tok, LOWER, 6, cfg)
    read = tok.render_chat([LOWER[0], LOWER[5], LOWER[6]])
    assert ep.read_ids.tolist() == read.ids.tolist()
    sup = ep.labels != IGNORE_INDEX
    assert ep.read_ids[sup].tolist() == read.ids[read.message_index == 2].tolist()
    assert tok.decode(ep.read_ids[sup]) == "assistant 42"  # header + content (specials skipped)
    assert ep.read_ids[sup][0] == tok.hf_tokenizer.convert_tokens_to_ids("<|im_start|>")
    # write: system (−1) + 4 messages with ids 0..3; sentence ids on content only
    w = tok.render_chat(LOWER[:5])
    assert ep.write_ids.tolist() == w.ids.tolist()
    assert sorted(set(ep.write_message_ids.tolist())) == [-1, 0, 1, 2, 3]
    lo, hi = w.content_spans[1]  # "hello there. how are you?" -> two sentences
    assert ep.write_sentence_ids[lo:hi].tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert (ep.write_sentence_ids[w.message_index == 0] == -1).all()


# --------------------------------------------------------------------------- sentences


@pytest.mark.parametrize(
    "text, chunks",
    [
        ("Hi. How are you? Fine!", ["Hi.", " How are you?", " Fine!"]),
        ('He said "stop." Then left.', ['He said "stop."', " Then left."]),
        ("a: b; c", ["a:", " b;", " c"]),
        ("first\n\nsecond\nthird", ["first", "\n\nsecond\nthird"]),
        ("Pi is 3.14 today.", ["Pi is 3.14 today."]),
        ("End. ", ["End.", " "]),
        ("", []),
    ],
)
def test_split_sentences(text, chunks):
    assert split_sentences(text) == chunks


class _WholeTokenizer(ByteTokenizer):
    """Encodes any text as one token: chunk tokens never concatenate to the whole."""

    def encode(self, text):
        return [len(text) + 8] if text else []


def test_content_sentence_ids():
    ids, nxt = content_sentence_ids(BT, "Ab. Cd", 5)
    assert ids.tolist() == [5, 5, 5, 6, 6, 6] and nxt == 7
    ids, nxt = content_sentence_ids(_WholeTokenizer(), "Ab. Cd", 5)
    assert ids.tolist() == [5] and nxt == 6
    ids, nxt = content_sentence_ids(BT, "", 3)
    assert ids.size == 0 and nxt == 3


# --------------------------------------------------------------------------- episodes


class _OneTokenPerMessage(ByteTokenizer):
    """Renders every message as a single token."""

    def render_chat(self, messages, add_generation_prompt=False):
        from deltamem_jax.data import ChatTokens

        n = len(messages)
        return ChatTokens(np.full(n, 9, np.int32), np.arange(n, dtype=np.int32), (None,) * n)


def test_episode_written_vs_visible_and_labels():
    ep = build_episode(BT, CONV, 6, EpisodeConfig(recent_messages=1))
    assert ep.write_ids.tolist() == BT.render_chat(CONV[:5]).ids.tolist()
    read = BT.render_chat([CONV[0], CONV[5], CONV[6]])
    assert ep.read_ids.tolist() == read.ids.tolist()
    sup = np.flatnonzero(ep.labels != IGNORE_INDEX)
    assert ep.read_ids[sup].tolist() == [BT.ASSISTANT, *BT.encode("42"), BT.END]
    assert sup.tolist() == list(range(len(ep.read_ids) - 4, len(ep.read_ids)))
    assert (ep.labels[sup] == ep.read_ids[sup]).all()
    assert all(a.dtype == np.int32 for a in (ep.write_ids, ep.write_message_ids,
                                             ep.write_sentence_ids, ep.read_ids, ep.labels))
    # message ids: system −1, then 0..3 on every token of each message, template tokens included
    n_sys = len(BT.encode("Be brief.")) + 2
    expect = [-1] * n_sys
    for j, m in enumerate(CONV[1:5]):
        expect += [j] * (len(BT.encode(m["content"])) + 2)
    assert ep.write_message_ids.tolist() == expect
    assert (ep.write_sentence_ids == -1).all()  # not requested

    ep2 = build_episode(BT, CONV, 6, EpisodeConfig(recent_messages=2))
    assert ep2.write_ids.tolist() == BT.render_chat(CONV[:4]).ids.tolist()
    assert ep2.read_ids.tolist() == BT.render_chat([CONV[0], *CONV[4:]]).ids.tolist()
    ep0 = build_episode(BT, CONV, 6, EpisodeConfig(recent_messages=0))
    assert ep0.write_ids.tolist() == BT.render_chat(CONV[:6]).ids.tolist()
    assert ep0.read_ids.tolist() == BT.render_chat([CONV[0], CONV[6]]).ids.tolist()


def test_episode_views():
    cfg = EpisodeConfig(recent_messages=3)
    mem = build_episode(BT, CONV, 6, cfg, "memory")
    so = build_episode(BT, CONV, 6, cfg, "state_only")
    nm = build_episode(BT, CONV, 6, cfg, "no_memory")
    assert mem.write_ids.tolist() == BT.render_chat(CONV[:3]).ids.tolist()
    assert so.write_ids.tolist() == BT.render_chat(CONV[:5]).ids.tolist()
    assert so.read_ids.tolist() == BT.render_chat([CONV[0], CONV[5], CONV[6]]).ids.tolist()
    assert not nm.has_write and nm.write_ids.shape == (0,)
    assert (nm.read_ids.tolist() == mem.read_ids.tolist()
            and nm.labels.tolist() == mem.labels.tolist())
    with pytest.raises(ValueError, match="unknown view"):
        build_episode(BT, CONV, 6, cfg, "both")


def test_episode_targets_all_and_no_write():
    eps = build_episodes(BT, [{"messages": CONV}], EpisodeConfig(targets="all"))
    assert len(eps) == 3
    assert not eps[0].has_write  # target 2: prefix = system + one visible user message
    assert eps[1].write_ids.tolist() == BT.render_chat(CONV[:3]).ids.tolist()
    assert len(build_episodes(BT, [{"messages": CONV}], EpisodeConfig(targets="final"))) == 1
    only_sys = [msg("system", "S"), msg("user", "q"), msg("assistant", "a")]
    ep = build_episode(BT, only_sys, 2, EpisodeConfig(recent_messages=1))
    assert not ep.has_write  # a system prefix alone is not written


def test_episode_sentence_ids():
    ep = build_episode(BT, CONV, 6, EpisodeConfig(sentence_ids=True))
    chat = BT.render_chat(CONV[:5])
    s = ep.write_sentence_ids
    assert (s[chat.message_index == 0] == -1).all()  # system
    lo, hi = chat.content_spans[1]
    n1 = len(BT.encode("Hello there."))
    assert s[lo:hi].tolist() == [0] * n1 + [1] * (hi - lo - n1)
    assert s[lo - 1] == -1 and s[hi] == -1  # role marker and <|end|>
    for i, sid in [(2, 2), (3, 3), (4, 4)]:  # global counter across messages
        lo, hi = chat.content_spans[i]
        assert (s[lo:hi] == sid).all()


def test_episode_tail_truncation():
    full = build_episode(BT, CONV, 6, EpisodeConfig(sentence_ids=True))
    cut = build_episode(BT, CONV, 6,
                        EpisodeConfig(max_write_length=20, max_length=10, sentence_ids=True))
    assert cut.write_ids.tolist() == full.write_ids[-20:].tolist()
    assert cut.write_message_ids.tolist() == full.write_message_ids[-20:].tolist()  # not renumbered
    assert cut.write_sentence_ids.tolist() == full.write_sentence_ids[-20:].tolist()
    assert cut.read_ids.tolist() == full.read_ids[-10:].tolist()
    assert cut.labels.tolist() == full.labels[-10:].tolist()
    assert (cut.labels != IGNORE_INDEX).sum() == 4


def test_long_reply_truncated_from_the_left_as_the_authors_do(caplog):
    """A reply longer than max_length keeps the last max_length tokens of the whole rendered
    read segment (the authors' _truncate_sft_sequence), labels cut alongside; under
    long_replies="skip" the episode is dropped with reason reply_too_long."""
    history = [msg("system", "Be brief."), msg("user", "My code is 42."), msg("assistant", "ok"),
               msg("user", "Recite.")]
    reply = msg("assistant", "".join(chr(97 + i % 26) for i in range(50)))
    conv = history + [reply]
    # the rule, built from the rendering alone: read = system + recent user turn + reply
    read = [conv[0], conv[3], reply]
    rendered = BT.render_chat(read)
    ids = np.asarray(rendered.ids)
    labels = np.where(rendered.message_index == 2, ids, IGNORE_INDEX)
    for max_length in (20, 51):          # shorter than the reply (52 tokens)
        ep = build_episode(BT, conv, 4, EpisodeConfig(max_length=max_length))
        assert ep.reply_truncated and ep.has_write
        assert ep.read_ids.tolist() == ids[-max_length:].tolist()
        assert ep.labels.tolist() == labels[-max_length:].tolist()
        assert (ep.labels != IGNORE_INDEX).all()          # only the reply's tail is left
        assert BT.decode(ep.read_ids.tolist()).endswith(reply["content"][-10:])
    assert int((rendered.message_index == 2).sum()) == 52
    fits = build_episode(BT, conv, 4, EpisodeConfig(max_length=52))
    assert not fits.reply_truncated and fits.read_ids.tolist() == ids[-52:].tolist()
    state_only = build_episode(BT, conv, 4, EpisodeConfig(max_length=20), "state_only")
    assert state_only.read_ids.tolist() == ids[-20:].tolist() and state_only.reply_truncated
    assert build_episode(BT, conv, 4, EpisodeConfig(max_length=20), "no_memory").reply_truncated
    with pytest.raises(EpisodeError) as e:
        build_episode(BT, conv, 4, EpisodeConfig(max_length=20, long_replies="skip"))
    assert e.value.reason == "reply_too_long"
    with pytest.raises(ValueError, match="long_replies"):
        EpisodeConfig(long_replies="truncate_right")
    with caplog.at_level(logging.INFO, logger="deltamem_jax.data"):
        es = EpisodeSet(BT, [{"messages": conv}, {"messages": CONV}], EpisodeConfig(max_length=20))
    assert len(es) == 2 and es.truncated == 1 and not es.skipped
    assert any("1 of 2 episodes" in r.getMessage() and r.levelno == logging.INFO
               for r in caplog.records)


def test_bad_records_skipped(caplog):
    long_reply = [msg("user", "q"), msg("assistant", "x" * 50)]
    lone = [msg("assistant", "a")]  # nothing before the reply: its first token is not predicted
    assert (build_episode(BT, lone, 0, EpisodeConfig()).labels[1:] != IGNORE_INDEX).sum() == 2
    with pytest.raises(EpisodeError, match="no reply token") as e:
        build_episode(_OneTokenPerMessage(), lone, 0, EpisodeConfig())
    assert e.value.reason == "no_supervised_token"
    records = [
        {"messages": CONV},
        {"messages": long_reply},
        {"messages": []},
        {"messages": [msg("user", "hi")]},
        {"messages": [{"content": "x"}, msg("assistant", "y")]},
        {"messages": [msg("robot", "x"), msg("assistant", "y")]},
        {"messages": [{"role": "user", "content": 3}, msg("assistant", "y")]},
        {"prompt": "q", "response": None},
        {"prompt": "q"},
        {"text": "no messages"},
        "not a record",
    ]
    with caplog.at_level(logging.WARNING, logger="deltamem_jax.data"):
        eps = build_episodes(BT, records, EpisodeConfig(max_length=20, long_replies="skip"))
    assert len(eps) == 1 and eps[0].read_ids.shape[0] <= 20
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    for reason in ["reply_too_long=1", "empty_conversation=1", "no_assistant_message=1",
                   "missing_role=1", "unknown_role=1", "non_string_content=2",
                   "missing_messages=2", "not_a_mapping=1"]:
        assert reason in text
    assert len(build_episodes(BT, records, EpisodeConfig(max_length=20))) == 2  # truncate_left


def test_prompt_response_records_become_messages(tmp_path):
    """The authors' second record form: {"prompt", "response"} = [user, assistant]; a record
    with messages keeps them; other keys are ignored; downstream sees only messages."""
    pr = {"prompt": "What is my code?", "response": "42", "id": 7, "system": "ignored"}
    as_messages = {"messages": [msg("user", "What is my code?"), msg("assistant", "42")]}
    assert record_problem(pr) is None
    assert normalise_record(pr) == as_messages
    both = {"messages": CONV, "prompt": "x", "response": "y"}
    assert normalise_record(both) == {"messages": CONV}
    assert normalise_record({"messages": None, **pr}) == as_messages   # parquet: null column
    assert record_problem({"prompt": 1, "response": "y"}) == "non_string_content"
    p = tmp_path / "pr.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [pr, {"messages": CONV}, {"prompt": "only"}]))
    assert load_records(p) == [as_messages, {"messages": CONV}]
    a = build_episode(BT, as_messages["messages"], 1, EpisodeConfig())
    (b,) = build_episodes(BT, [pr], EpisodeConfig())
    assert a.read_ids.tolist() == b.read_ids.tolist() and a.labels.tolist() == b.labels.tolist()
    assert len(EpisodeSet(BT, [pr, {"messages": CONV}], EpisodeConfig())) == 2
    import datasets
    datasets.Dataset.from_list([{"messages": None, **pr}, {"messages": CONV[1:3], "prompt": None,
                                "response": None, "id": 1, "system": None}]
                               ).to_parquet(str(tmp_path / "pr.parquet"))
    assert load_records(tmp_path / "pr.parquet") == [as_messages, {"messages": CONV[1:3]}]


def test_clean_and_load_records(tmp_path, caplog):
    good = {"messages": [{"role": "user", "content": "a", "extra": 1}, msg("assistant", "b")]}
    assert record_problem(good) is None
    kept, counts = clean_records([good, {"messages": [msg("user", "x")]}], warn=False)
    assert kept == [{"messages": [msg("user", "a"), msg("assistant", "b")]}]
    assert counts == {"no_assistant_message": 1}
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join([json.dumps(good), "{broken",
                            json.dumps({"messages": [msg("user", 5)]}), ""]))
    with caplog.at_level(logging.WARNING, logger="deltamem_jax.data"):
        recs = load_records(p)
    assert recs == kept
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (len(warnings) == 1 and "invalid_json=1" in warnings[0]
            and "non_string_content=1" in warnings[0])
    j = tmp_path / "d.json"
    j.write_text(json.dumps([good, good]))
    assert len(load_records(j)) == 2
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_records(tmp_path / "d.txt")


def test_load_records_parquet(tmp_path):
    import datasets

    rows = [{"messages": [msg("user", "a"), msg("assistant", "b")]},
            {"messages": [msg("user", "c"), msg("user", "d")]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert load_records(tmp_path / "d.parquet") == rows[:1]


# --------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def episode_set():
    recs = generate_split(48, "train", SyntheticConfig(seed=3))
    return EpisodeSet(BT, recs, EpisodeConfig(max_length=64, max_write_length=256,
                                              recent_messages=1, sentence_ids=True))


WB, RB = [64, 128, 192, 256], [32, 64]


def make_loader(es, **kw):
    args = dict(write_buckets=WB, read_buckets=RB, seed=7, p_state_only=0.3, p_no_memory=0.2)
    args.update(kw)
    return EpisodeLoader(es, 8, **args)


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_loader_determinism_and_format(episode_set):
    a = [next(make_loader(episode_set)) for _ in range(1)]
    la, lb = make_loader(episode_set), make_loader(episode_set)
    lc = make_loader(episode_set, seed=8)
    xs = [next(la) for _ in range(12)]  # 2 epochs of 6 batches
    ys = [next(lb) for _ in range(12)]
    for x, y in zip(xs, ys):
        assert_batches_equal(x, y)
    assert_batches_equal(a[0], xs[0])
    assert any(not np.array_equal(x["example_index"], z["example_index"])
               for x, z in zip(xs, [next(lc) for _ in range(12)]))
    # each epoch is a permutation; epochs reshuffle
    e0 = np.concatenate([x["example_index"] for x in xs[:6]])
    e1 = np.concatenate([x["example_index"] for x in xs[6:]])
    assert (sorted(e0) == list(range(48)) and sorted(e1) == list(range(48))
            and not np.array_equal(e0, e1))
    b = xs[0]
    wm, rm = b["write_mask"].astype(bool), b["read_mask"].astype(bool)
    assert (b["write_ids"][~wm] == BT.pad_id).all() and (b["read_ids"][~rm] == BT.pad_id).all()
    assert (b["write_message_ids"][~wm] == -1).all() and (b["write_sentence_ids"][~wm] == -1).all()
    assert (b["labels"][~rm] == IGNORE_INDEX).all()
    assert (b["has_write"] == wm.any(1)).all()
    for r, i in enumerate(b["example_index"]):  # right padding, rows equal the source episode
        view = list(VIEW_CODES)[b["view"][r]]
        ep = episode_set.episode(int(i), view)
        n = ep.read_ids.shape[0]
        assert rm[r].tolist() == [True] * n + [False] * (rm.shape[1] - n)
        assert b["read_ids"][r, :n].tolist() == ep.read_ids.tolist()
        assert b["labels"][r, :n].tolist() == ep.labels.tolist()
        assert b["write_ids"][r, : ep.write_ids.shape[0]].tolist() == ep.write_ids.tolist()


def test_loader_resume(episode_set):
    ref = make_loader(episode_set)
    for k in [0, 3, 6, 8]:  # incl. an epoch boundary
        run = make_loader(episode_set)
        for _ in range(k):
            next(run)
        saved = json.loads(json.dumps(run.state()))
        fresh = make_loader(episode_set, process_count=1)
        fresh.restore(saved)
        for _ in range(4):
            assert_batches_equal(next(fresh), next(run))
    assert ref.state()["epoch"] == 0 and ref.state()["batch"] == 0
    with pytest.raises(ValueError, match="mismatch on 'seed'"):
        make_loader(episode_set, seed=1).restore(run.state())


FINE_WB, FINE_RB = [128, 160, 192, 224, 256], [28, 32, 36, 40, 64]


@pytest.mark.parametrize("batch, hosts_n", [(8, 2), (4, 2), (4, 4)])
def test_loader_multi_host_slices(episode_set, batch, hosts_n):
    kw = dict(write_buckets=FINE_WB, read_buckets=FINE_RB, seed=5, p_state_only=0.3,
              p_no_memory=0.2)
    one = EpisodeLoader(episode_set, batch, **kw)
    hosts = [EpisodeLoader(episode_set, batch, process_index=i, process_count=hosts_n, **kw)
             for i in range(hosts_n)]
    for _ in range(2 * one.batches_per_epoch):
        full, parts = next(one), [next(h) for h in hosts]
        assert parts[0]["read_ids"].shape == parts[1]["read_ids"].shape  # shapes agree across hosts
        for k in full:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k], err_msg=k)
    with pytest.raises(ValueError, match="not divisible"):
        make_loader(episode_set, process_count=3)


def test_loader_static_shapes_and_epochs(episode_set):
    assert len(list(make_loader(episode_set, epochs=2))) == 12
    wb, rb = FINE_WB, FINE_RB
    loader = EpisodeLoader(episode_set, 2, write_buckets=wb, read_buckets=rb, seed=1,
                           p_no_memory=0.3, epochs=3)
    batches = list(loader)
    assert len(batches) == 3 * loader.batches_per_epoch == 72
    shapes = {(b["write_ids"].shape, b["read_ids"].shape) for b in batches}
    assert 3 < len(shapes) <= len(wb) * len(rb)
    for b in batches:  # padded to the smallest bucket that fits the longest row
        lw, lr = b["write_mask"].sum(1).max(), b["read_mask"].sum(1).max()
        iw, ir = wb.index(b["write_ids"].shape[1]), rb.index(b["read_ids"].shape[1])
        assert lw <= wb[iw] and (iw == 0 or lw > wb[iw - 1])
        assert lr <= rb[ir] and (ir == 0 or lr > rb[ir - 1])
    with pytest.raises(ValueError, match="does not fit"):
        next(make_loader(episode_set, write_buckets=[8]))


def test_loader_view_sampling(episode_set):
    la, lb = make_loader(episode_set), make_loader(episode_set, p_state_only=0.3, p_no_memory=0.2)
    assert ([la.view_of(e, i) for e in range(3) for i in range(48)]
            == [lb.view_of(e, i) for e in range(3) for i in range(48)])
    views = [la.view_of(e, i) for e in range(20) for i in range(48)]
    frac = {v: views.count(v) / len(views) for v in VIEW_CODES}
    assert abs(frac["no_memory"] - 0.2) < 0.05 and abs(frac["state_only"] - 0.3) < 0.05
    assert any(la.view_of(0, i) != la.view_of(1, i) for i in range(48))  # redrawn per epoch
    b = next(la)
    assert (b["view"] == [VIEW_CODES[la.view_of(0, i)] for i in b["example_index"]]).all()
    assert not b["has_write"][b["view"] == VIEW_CODES["no_memory"]].any()
    only_mem = make_loader(episode_set, p_state_only=0.0, p_no_memory=0.0)
    assert all(only_mem.view_of(0, i) == "memory" for i in range(48))


def test_loader_callable_source():
    eps = build_episodes(BT, [{"messages": CONV}] * 4, EpisodeConfig())
    loader = EpisodeLoader(lambda i, v: eps[i], 2, num_examples=4, pad_id=0,
                           write_buckets=[64, 128], read_buckets=[40], epochs=1)
    out = list(loader)
    assert (len(out) == 2 and out[0]["write_ids"].shape == (2, 128)
            and out[0]["read_ids"].shape == (2, 40))


# --------------------------------------------------------------------------- synthetic


def test_synthetic_determinism_and_format(tmp_path):
    cfg = SyntheticConfig(n_train=300, n_validation=20, n_test=20, seed=11)
    p1 = write_synthetic_dataset(tmp_path / "a", cfg)
    p2 = write_synthetic_dataset(tmp_path / "b", cfg)
    p3 = write_synthetic_dataset(tmp_path / "c", SyntheticConfig(n_train=300, n_validation=20,
                                                                 n_test=20, seed=12))
    for split in ("train", "validation", "test"):
        assert open(p1[split]).read() == open(p2[split]).read()
        assert open(p1[split]).read() != open(p3[split]).read()
    train = load_records(p1["train"])
    assert len(train) == 300 and len(load_records(p1["test"])) == 20
    assert train != load_records(p1["validation"])[:20]
    for r in train:
        m = r["messages"]
        assert record_problem(r) is None
        assert [x["role"] for x in m] == ["user", "assistant"] * (len(m) // 2)
        assert 3 <= len(m) // 2 - 1 <= 2 + 3 + 2  # facts + filler turns
        answer, question = m[-1]["content"], m[-2]["content"]
        assert len(question) + len(answer) < 100 and sum(len(x["content"]) for x in m) < 500
        stated = [x["content"] for x in m[:-2] if x["role"] == "user" and answer in x["content"]]
        assert len(stated) == 1  # the answer is stated exactly once, earlier
    assert chance_accuracy(train) < 0.15  # ~17 records per question: the mode is inflated


def test_synthetic_sixteen_facts_and_sentence_answers():
    assert set(ANSWER_SENTENCES) == set(FACT_KINDS) and len(FACT_KINDS) >= 16
    cfg = SyntheticConfig(n_test=30, facts=(16, 16), filler_turns=(0, 0), answer_style="sentence")
    for r in generate_split(30, "test", cfg):
        m = r["messages"]
        assert len(m) == 2 * 16 + 2
        kind = next(k for k, v in FACT_KINDS.items() if v[1] == m[-2]["content"])
        stated = [x["content"] for x in m[:-2] if x["role"] == "user"]
        value = next(x for x in stated if x.startswith(FACT_KINDS[kind][0].split("{}")[0]))
        value = value[len(FACT_KINDS[kind][0].split("{}")[0]):-1]
        assert m[-1]["content"] == ANSWER_SENTENCES[kind].format(value)
        assert sum(value in x for x in stated) == 1
    with pytest.raises(ValueError, match="facts range"):
        SyntheticConfig(facts=(1, len(FACT_KINDS) + 1))


def test_chance_accuracy():
    def rec(q, a):
        return {"messages": [msg("user", q), msg("assistant", a)]}

    recs = [rec("q1", "x"), rec("q1", "x"), rec("q1", "y"), rec("q2", "x")]
    assert chance_accuracy(recs) == pytest.approx(3 / 4)
    assert chance_accuracy(recs, by_question=False) == pytest.approx(3 / 4)
    assert chance_accuracy([rec("q1", "x"), rec("q2", "y")]) == 1.0
    assert chance_accuracy([rec("q1", "x"), rec("q2", "y")], by_question=False) == 0.5
    # fitted on other records: their modes, scored here
    assert chance_accuracy([rec("q1", "y"), rec("q2", "x")], fit=recs) == 0.5
    assert chance_accuracy([rec("q3", "x")], fit=recs) == 0.0
    with pytest.raises(ValueError, match="no records"):
        chance_accuracy([])
