"""Evaluators (recall, LoCoMo, perplexity) on a tiny random byte-level model.

Shapes are kept few on purpose (batch 4, sequences padded to ≥ 512 via
``min_bucket``): every distinct shape is a compile. Two runners share one
graphdef (same structure) so they share compiles: ``mem`` (random, amplified Δ
heads, non-zero write gates) and ``zero`` (the same with all Δ heads zero, i.e.
memory that cannot change any output).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deltamem_jax.data import ByteTokenizer, EpisodeConfig, build_episode, generate_split
from deltamem_jax.evaluation import locomo as L
from deltamem_jax.evaluation import locomo_eval, perplexity, prompts, recall
from deltamem_jax.evaluation.report import write_report
from deltamem_jax.evaluation.scoring import exact_match, token_f1
from deltamem_jax.memory.config import DeltaMemConfig
from deltamem_jax.models.config import DecoderConfig
from deltamem_jax.models.decoder import DecoderLM
from deltamem_jax.models.functional import Runner
from deltamem_jax.training.losses import causal_lm_loss

CFG = DecoderConfig(model_type="llama", vocab_size=264, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
W, R = 512, 128  # max_write_length, max_length of the recall / perplexity runs
RECALL = dict(batch_size=4, max_new_tokens=8, max_write_length=W, max_length=R, min_bucket=512,
              progress=False)


def _runner(zero_heads: bool) -> Runner:
    model = DecoderLM(CFG, rngs=nnx.Rngs(0), memory=DeltaMemConfig(output_init="random"))
    rng = np.random.default_rng(0)
    for i in model.memory_layers:
        mem = model.layers[i].self_attn.memory
        mem.beta_proj.set_value(jnp.asarray(rng.normal(size=mem.beta_proj.shape) * 0.5,
                                            jnp.float32))
        for h in mem.config.delta_heads:
            p = getattr(mem, f"delta_{h}_proj")
            # amplified so that memory visibly changes greedy outputs; or exactly zero
            p.set_value(jnp.zeros_like(p[...]) if zero_heads else p[...] * 40.0)
    return Runner(model)


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def mem_runner():
    return _runner(zero_heads=False)


@pytest.fixture(scope="module")
def zero_runner():
    return _runner(zero_heads=True)


@pytest.fixture(scope="module")
def records():
    return generate_split(6, "test")


@pytest.fixture(scope="module")
def recall_result(mem_runner, tok, records):
    return recall.evaluate_recall(mem_runner, tok, records, return_states=True, **RECALL)


def _direct_write(runner, segments):
    """One writing pass from a fresh state per id list, built by hand: a batch of 4 rows
    right-padded to W (the same shape as the evaluators' write, so no extra compile)."""
    assert 1 <= len(segments) <= 4
    x = np.zeros((4, W), np.int32)
    m = np.zeros((4, W), bool)
    for i, ids in enumerate(segments):
        x[i, : len(ids)], m[i, : len(ids)] = ids, True
    zero = jnp.zeros((len(runner.memory_layers), 4, 1, 8, 8), jnp.float32)
    out = runner(jnp.asarray(x), attention_mask=jnp.asarray(m), memory_state=zero, write=True,
                 compute_logits=False)
    return np.asarray(out.memory_state[:, : len(segments)])


def _episode(tok, rec, max_length=1 << 30):
    msgs = rec["messages"]
    cfg = EpisodeConfig(max_length=max_length, max_write_length=W, recent_messages=1)
    return build_episode(tok, msgs, len(msgs) - 1, cfg, "memory")


# ---------------------------------------------------------------- recall

def test_recall_end_to_end_and_states(recall_result, mem_runner, tok, records, tmp_path):
    res = recall_result
    assert set(res["per_setting"]) == set(recall.SETTINGS)
    for s, m in res["per_setting"].items():
        assert m["n"] == len(records)
        assert 0.0 <= m["exact_match"] <= 1.0 and 0.0 <= m["f1"] <= 1.0
    assert ([e["reference"] for e in res["examples"]]
            == [r["messages"][-1]["content"] for r in records])
    assert ([e["question"] for e in res["examples"]]
            == [r["messages"][-2]["content"] for r in records])
    # (a) each delta_mem state is a direct write pass over that record's episode write segment
    eps = [_episode(tok, rec) for rec in records]
    assert all(ep.has_write for ep in eps)
    ref = np.concatenate([_direct_write(mem_runner, [ep.write_ids for ep in eps[:3]]),
                          _direct_write(mem_runner, [ep.write_ids for ep in eps[3:]])], axis=1)
    got = np.stack([e["memory_state"] for e in res["examples"]], axis=1)
    assert np.abs(ref).max() > 1e-3
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
    assert not np.allclose(ref[:, 0], ref[:, 1], atol=1e-3)
    # memory changes what the (amplified) model says: delta_mem is not a copy of no_memory
    preds = [e["predictions"] for e in res["examples"]]
    assert any(p["delta_mem"] != p["no_memory"] for p in preds)
    assert len({p["no_memory"] for p in preds}) > 1  # outputs depend on the prompt
    paths = write_report(recall.to_report_rows(res), tmp_path, "recall")
    assert all(p.is_file() for p in paths.values())


def test_recall_zero_heads_delta_equals_no_memory(zero_runner, tok, records):
    # (b) memory that cannot act: same prompt + zero corrections -> identical predictions
    res = recall.evaluate_recall(zero_runner, tok, records, settings=("no_memory", "delta_mem"),
                                 return_states=True, **RECALL)
    for e in res["examples"]:
        assert e["predictions"]["delta_mem"] == e["predictions"]["no_memory"]
        assert np.abs(e["memory_state"]).max() > 1e-3  # it was written all the same
    assert res["per_setting"]["delta_mem"] == res["per_setting"]["no_memory"]


def test_recall_oracle_scoring(mem_runner, tok, records, monkeypatch):
    # (c) a "cheating" generator that returns the references scores EM = F1 = 1 in every setting;
    # a misaligned one does not
    examples, _ = recall.prepare_recall(tok, records, max_write_length=W, max_length=R)
    refs = [e["reference"] for e in examples]
    assert all(exact_match(r, r) == 1.0 and token_f1(r, r) == 1.0 for r in refs)

    def oracle(shift):
        def fake(runner, tokenizer, prompts_, **kw):
            assert len(prompts_) == len(refs)
            return refs[shift:] + refs[:shift]
        return fake

    settings = ("no_memory", "full_context")
    monkeypatch.setattr(recall, "generate_texts", oracle(0))
    res = recall.evaluate_recall(mem_runner, tok, records, settings=settings, **RECALL)
    assert all(m["exact_match"] == 1.0 and m["f1"] == 1.0 for m in res["per_setting"].values())
    monkeypatch.setattr(recall, "generate_texts", oracle(1))
    res = recall.evaluate_recall(mem_runner, tok, records, settings=settings, **RECALL)
    assert all(m["exact_match"] < 1.0 for m in res["per_setting"].values())


def test_batched_generation_matches_single(mem_runner, tok, records):
    # (d) left padding inside a batch leaks nothing: a batch of 4 prompts of different lengths
    # (padded to 512), each with its own memory state == one by one (each padded only to its own
    # bucket, 64)
    examples, _ = recall.prepare_recall(tok, records[:4], max_write_length=W, max_length=R)
    ps = [e["short_prompt"] for e in examples]
    assert len({len(p) for p in ps}) >= 3 and max(len(p) for p in ps) <= 64
    states = prompts.write_memory(mem_runner, [e["write"] for e in examples], max_write_length=W,
                                  batch_size=4, min_bucket=512)
    batched = prompts.generate_texts(mem_runner, tok, ps, batch_size=4, min_bucket=512,
                                     memory_state=states, use_memory=True, max_new_tokens=8)
    single = [prompts.generate_texts(mem_runner, tok, [p], batch_size=1, use_memory=True,
                                     memory_state=prompts.take_rows(states, [i]),
                                     max_new_tokens=8)[0]
              for i, p in enumerate(ps)]
    assert batched == single
    assert len(set(batched)) > 1


def test_chunk_segment_packs_messages():
    lens = [3, 4, 10, 2]
    msg = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lens)])
    seg = prompts.WriteSegment(np.arange(len(msg), dtype=np.int32), msg, msg)
    chunks = prompts.chunk_segment(seg, 5)
    assert [len(c) for c in chunks] == [3, 5, 5, 4, 2]
    np.testing.assert_array_equal(np.concatenate([c.ids for c in chunks]), seg.ids)
    assert prompts.chunk_segment(seg, 100)[0] is seg
    assert [prompts.bucket(n, cap=1000) for n in (1, 16, 17, 600, 1000)] == [16, 16, 32, 1000, 1000]


# ---------------------------------------------------------------- perplexity

PPL = dict(batch_size=4, max_write_length=W, max_length=R, min_bucket=512, progress=False)


def test_perplexity_zero_heads_and_sensitivity(zero_runner, mem_runner, tok, records):
    z = perplexity.evaluate_perplexity(zero_runner, tok, records, **PPL)
    m = perplexity.evaluate_perplexity(mem_runner, tok, records, **PPL)
    for res in (z, m):
        assert set(res) == set(perplexity.PPL_SETTINGS)
        assert len({r["tokens"] for r in res.values()}) == 1 and res["delta_mem"]["tokens"] > 0
        assert all(r["n"] == len(records) and np.isfinite(r["loss"]) for r in res.values())
        assert all(abs(r["ppl"] - np.exp(r["loss"])) < 1e-6 * r["ppl"] for r in res.values())
    # (e) Δ heads zero: the written state cannot matter
    assert z["delta_mem"]["loss"] == pytest.approx(z["no_memory"]["loss"], rel=1e-6)
    assert abs(m["delta_mem"]["loss"] - m["no_memory"]["loss"]) > 1e-4
    # full context never uses memory: identical for both runners (same backbone)
    assert m["full_context"]["loss"] == pytest.approx(z["full_context"]["loss"], rel=1e-6)
    assert perplexity.to_report_rows(m)["delta_mem"]["ppl"] == m["delta_mem"]["ppl"]


def test_perplexity_matches_hand_computation(mem_runner, tok, records):
    rec = records[0]
    res = perplexity.evaluate_perplexity(mem_runner, tok, [rec], **PPL)
    ep = _episode(tok, rec, max_length=R)
    full = tok.render_chat(rec["messages"])
    full_labels = np.where(full.message_index == len(rec["messages"]) - 1, full.ids, -100)
    # one hand-made batch: [read with the written state, read with a zero state, whole conversation
    # with a zero state (zero state = no correction = memory off)]
    T = len(full.ids)
    ids = np.zeros((3, T), np.int32)
    mask = np.zeros((3, T), bool)
    labels = np.full((3, T), -100, np.int32)
    for i, (x, y) in enumerate([(ep.read_ids, ep.labels)] * 2 + [(full.ids, full_labels)]):
        ids[i, : len(x)], mask[i, : len(x)], labels[i, : len(x)] = x, True, y
    state = jnp.zeros((len(mem_runner.memory_layers), 3) + (1, 8, 8), jnp.float32)
    state = state.at[:, 0].set(_direct_write(mem_runner, [ep.write_ids])[:, 0])
    logits = mem_runner(jnp.asarray(ids), attention_mask=jnp.asarray(mask), memory_state=state,
                        write=False).logits
    for i, setting in enumerate(perplexity.PPL_SETTINGS):
        loss, count = causal_lm_loss(logits[i:i + 1], jnp.asarray(labels[i:i + 1]))
        assert res[setting]["tokens"] == int(count) > 0
        assert res[setting]["loss"] == pytest.approx(float(loss), rel=1e-5), setting


# ---------------------------------------------------------------- LoCoMo

@pytest.fixture(scope="module")
def locomo_conv():
    path = L.default_locomo_path()
    if not path.is_file():
        pytest.fail(f"LoCoMo data not found at {path}; set {L.LOCOMO_ENV_VAR}")
    conv = L.load_locomo(path, max_conversations=1, categories=(1, 2, 3, 4))[0]
    qs = [q for c in (1, 2, 3, 4) for q in [q for q in conv.questions if q.category == c][:2]]
    # the first 2 turns of the first two real sessions (672 byte tokens) keep the tiny model fast
    sessions = tuple(dataclasses.replace(s, turns=s.turns[:2]) for s in conv.sessions[:2])
    return dataclasses.replace(conv, sessions=sessions, questions=tuple(qs))


def test_locomo_end_to_end(mem_runner, tok, locomo_conv, tmp_path):
    res = locomo_eval.evaluate_locomo(
        mem_runner, tok, [locomo_conv], batch_size=4, max_new_tokens=8, max_write_length=128,
        max_context_tokens=512, recent_window_tokens=64, min_bucket=512, progress=False)
    assert set(res["per_setting"]) == set(locomo_eval.SETTINGS)
    for agg in res["per_setting"].values():
        assert agg["n"] == 8 and 0.0 <= agg["overall"] <= 1.0
        assert set(agg["per_category"]) == {1, 2, 3, 4}
        assert all(0.0 <= v <= 1.0 for v in agg["per_category"].values())
    assert len(res["examples"]) == 8
    for e in res["examples"]:
        assert set(e["predictions"]) == set(locomo_eval.SETTINGS)
        assert all(0.0 <= s <= 1.0 for s in e["scores"].values())
    rows = locomo_eval.to_report_rows(res)
    assert {"cat1_multi_hop", "cat4_single_hop", "overall"} <= set(rows["delta_mem"])
    assert write_report(rows, tmp_path, "locomo")["json"].is_file()


def test_locomo_written_cache_writes_each_conversation_once(mem_runner, tok, locomo_conv,
                                                           monkeypatch):
    """Questions evaluated in two calls sharing ``written`` get the answers of one call, and
    the history is written only by the first."""
    kw = dict(settings=("delta_mem",), batch_size=4, max_new_tokens=8, max_write_length=128,
              min_bucket=512, progress=False)
    whole = locomo_eval.evaluate_locomo(mem_runner, tok, [locomo_conv], **kw)
    calls = []
    real = locomo_eval.write_memory
    monkeypatch.setattr(locomo_eval, "write_memory",
                        lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    written: dict = {}
    qs = locomo_conv.questions
    parts = [locomo_eval.evaluate_locomo(
        mem_runner, tok, [dataclasses.replace(locomo_conv, questions=half)], written=written,
        **kw) for half in (qs[:3], qs[3:])]
    assert calls == [1] and set(written) == {locomo_conv.sample_id}
    split = [e["predictions"]["delta_mem"] for p in parts for e in p["examples"]]
    assert split == [e["predictions"]["delta_mem"] for e in whole["examples"]]


def test_locomo_full_context_fit(tok, locomo_conv):
    # a budget that fits the latest session but not both: the oldest goes
    qs = locomo_conv.questions
    size = lambda conv: max(  # noqa: E731
        len(tok.render_chat(L.full_context_messages(conv, q), add_generation_prompt=True))
        for q in qs)
    latest = dataclasses.replace(locomo_conv, sessions=locomo_conv.sessions[1:])
    budget = size(latest)
    assert size(locomo_conv) > budget
    fitted = locomo_eval.fit_full_context(tok, locomo_conv, qs, budget)
    assert [s.index for s in fitted.sessions] == [2]
    tight = locomo_eval.fit_full_context(tok, locomo_conv, qs, budget - 1)
    assert [s.index for s in tight.sessions] == []
    assert locomo_eval.fit_full_context(tok, locomo_conv, qs, size(locomo_conv)) is locomo_conv


def test_locomo_chunked_write_equals_one_pass(mem_runner, tok, locomo_conv):
    seg = locomo_eval.locomo_write_segment(tok, locomo_conv)
    assert set(np.unique(seg.message_ids)) == {0, 1}  # one message per session
    chunks = prompts.chunk_segment(seg, 128)
    assert len(chunks) == 6 and all(len(c) <= 128 for c in chunks)
    np.testing.assert_array_equal(np.concatenate([c.ids for c in chunks]), seg.ids)
    # passes of ≤ 128 tokens carrying state and KV cache == one pass over the whole history
    chunked = prompts.write_memory(mem_runner, [seg], max_write_length=128, min_bucket=512)
    one = mem_runner(jnp.asarray(seg.ids[None]), write=True, compute_logits=False).memory_state
    assert np.abs(np.asarray(one)).max() > 1e-3
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(one), atol=5e-5, rtol=1e-4)
