"""Continuous batching: per-row sampling, slot decoding, the scheduler (exactness, stop
strings, streaming, cancellation), and the durable session store."""

import json
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltamem_jax import Runner, SamplingConfig
from deltamem_jax.data.tokenizer import ByteTokenizer
from deltamem_jax.inference.generation import sample_logits, sample_rows
from deltamem_jax.inference.scheduler import Scheduler, Turn, TurnCancelled
from deltamem_jax.inference.session import Session
from deltamem_jax.inference.snapshot import state_digest
from deltamem_jax.inference.store import POINTER_FILE, SessionStore, valid_name

from helpers import random_model

WINDOW, CHUNK, MAX = 48, 16, 8
CAPACITY = Session.required_capacity(WINDOW, MAX, CHUNK)
TOK = ByteTokenizer()
HISTORIES = [
    ["My cat is called Miso and she is eleven.", "What is her name?"],
    ["The launch code is 4711."],
    ["Biscuit the dog loves long walks by the river, every single morning at six.",
     "Where does he walk?", "And when?"],
    ["hi"],
    ["A somewhat longer message that will not fit in the window once the reply comes in."],
    ["Remember: blue."],
]


@pytest.fixture(scope="module")
def runner():
    return Runner(random_model(0))


def _session(runner, seed=0):
    return Session(runner, TOK, window=WINDOW, chunk=CHUNK, capacity=CAPACITY, seed=seed,
                   sampling=SamplingConfig(max_new_tokens=MAX))


def _prepared(runner, history, seed=0):
    """A session holding ``history[:-1]`` with replies; its last message is left to send."""
    s = _session(runner, seed)
    for text in history[:-1]:
        s.add_user(text)
        s.reply(SamplingConfig(max_new_tokens=MAX))
    return s


def _copy(s):
    return Session.from_state(s.to_state(), s.runner, s.tokenizer)


class Recorder:
    """Collects a turn's events; ``wait()`` returns (deltas, done-or-error event)."""

    def __init__(self):
        self.deltas, self.end, self.started = [], None, None
        self._done = threading.Event()

    def __call__(self, e):
        if e.kind == "start":
            self.started = e
        elif e.kind == "delta":
            self.deltas.append(e.text)
        else:
            self.end = e
            self._done.set()

    def wait(self, timeout=120):
        assert self._done.wait(timeout), "turn did not finish"
        return self.deltas, self.end


def _turn(session, text, rec, **kw):
    kw.setdefault("max_tokens", MAX)
    return Turn(session=session, messages=[{"role": "user", "content": text}], on_event=rec,
                **kw)


@pytest.fixture(scope="module")
def scheduler(runner):
    sched = Scheduler(runner, TOK, slots=4, capacity=CAPACITY, prefill_rows=4).start()
    yield sched
    sched.close()


def test_sample_rows_matches_sample_logits():
    logits = jax.random.normal(jax.random.key(0), (3, 264)) * 3
    keys = jax.random.split(jax.random.key(1), 3)
    settings = [(0.0, 1.0), (0.7, 1.0), (1.0, 0.5)]
    temps = jnp.asarray([t for t, _ in settings])
    tops = jnp.asarray([p for _, p in settings])
    for trial in range(4):
        ks = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, trial)
        got = np.asarray(sample_rows(logits, ks, temps, tops))
        for b, (t, p) in enumerate(settings):
            want = sample_logits(logits[b:b + 1], ks[b], SamplingConfig(temperature=t, top_p=p))
            assert got[b] == int(want[0]), (trial, b)
    assert got[0] == int(jnp.argmax(logits[0]))


def test_nucleus_never_samples_the_tail():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.1, 0.05, 0.05]]))
    keys = jax.random.split(jax.random.key(2), 200)
    draw = jax.jit(jax.vmap(lambda k: sample_rows(logits, k[None], jnp.ones(1),
                                                  jnp.full(1, 0.7))[0]))
    seen = set(np.asarray(draw(keys)).tolist())
    assert seen == {0, 1}                      # 0.5 + 0.3 covers 0.7; 0.1 starts after it


def test_batched_turns_equal_turns_alone_and_session_reply(runner, scheduler):
    """Six sessions (more than the four slots: requests join and leave) prefilled and decoded
    together give, bit for bit, the tokens and states each gives alone; greedy, they match
    Session.reply."""
    prepared = [_prepared(runner, h, seed=i) for i, h in enumerate(HISTORIES)]
    kinds = [{}, {"temperature": 1.0, "rng": jax.random.key(7)}] * 3

    alone = []
    for s, h, kw in zip(prepared, HISTORIES, kinds):
        c, rec = _copy(s), Recorder()
        scheduler.submit(_turn(c, h[-1], rec, **kw))
        deltas, end = rec.wait()
        assert end.kind == "done" and "".join(deltas) == end.text
        alone.append((end.text, state_digest(c.to_state()), c))

    together, recs = [], []
    for s, h, kw in zip(prepared, HISTORIES, kinds):
        c, rec = _copy(s), Recorder()
        together.append(c)
        recs.append(rec)
        scheduler.submit(_turn(c, h[-1], rec, **kw))
    for (text, digest, _), c, rec in zip(alone, together, recs):
        _, end = rec.wait()
        assert end.kind == "done" and end.text == text
        assert state_digest(c.to_state()) == digest
    # they shared decode steps and prefill calls
    assert scheduler.stats["max_live"] >= 3
    assert scheduler.stats["passes"] > scheduler.stats["pass_calls"]

    for s, h, kw, (text, _, c) in zip(prepared, HISTORIES, kinds, alone):
        if kw:                                   # sampled turns: checked above only
            continue
        ref = _copy(s)
        ref.add_user(h[-1])
        assert ref.reply(SamplingConfig(max_new_tokens=MAX)) == text
        assert ref.ids == c.ids and ref.messages == c.messages
        np.testing.assert_allclose(np.asarray(c.memory_state), np.asarray(ref.memory_state),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c.next_token_logits(), ref.next_token_logits(),
                                   rtol=1e-4, atol=1e-4)


def test_stop_strings_cut_the_reply_and_its_memory(runner, scheduler):
    base = _prepared(runner, HISTORIES[0])
    c, rec = _copy(base), Recorder()
    scheduler.submit(_turn(c, HISTORIES[0][-1], rec))
    full = rec.wait()[1].text
    assert len(full) >= 4
    stop = full[2:4]
    cut = full.index(stop)
    s, rec = _copy(base), Recorder()
    scheduler.submit(_turn(s, HISTORIES[0][-1], rec, stop=(stop, "never-there")))
    deltas, end = rec.wait()
    assert end.kind == "done" and end.finish_reason == "stop" and end.text == full[:cut]
    assert "".join(deltas) == end.text and s.messages[-1]["content"] == full[:cut]
    # memory holds the conversation as it reads: the cut reply, not what was decoded past it
    ref = _copy(base)
    ref.add_user(HISTORIES[0][-1])
    ref.add_message("assistant", full[:cut])
    assert ref.ids == s.ids
    np.testing.assert_allclose(np.asarray(s.memory_state), np.asarray(ref.memory_state),
                               rtol=1e-5, atol=1e-6)


def test_length_cancel_and_errors_leave_the_scheduler_serving(runner, scheduler):
    s, rec = _session(runner), Recorder()
    scheduler.submit(_turn(s, "count", rec, max_tokens=3, temperature=1.0,
                           rng=jax.random.key(0)))
    _, end = rec.wait()
    assert end.kind == "done" and end.completion_tokens <= 3
    assert end.finish_reason in ("stop", "length")
    bad, rec_bad = _session(runner), Recorder()
    scheduler.submit(Turn(session=bad, messages=[{"role": "robot", "content": "x"}],
                          max_tokens=2, on_event=rec_bad))
    assert rec_bad.wait()[1].kind == "error" and "unknown role" in str(rec_bad.end.error)
    gone, rec_gone = _session(runner), Recorder()
    turn = _turn(gone, "bye", rec_gone)
    turn.cancelled.set()
    scheduler.submit(turn)
    assert isinstance(rec_gone.wait()[1].error, TurnCancelled)
    ok, rec_ok = _session(runner), Recorder()
    scheduler.submit(_turn(ok, "still there?", rec_ok))
    assert rec_ok.wait()[1].kind == "done"


# ---------------------------------------------------------------------------- the store


def test_store_commits_versions_and_recovers(runner, tmp_path):
    store = SessionStore(tmp_path / "s", runner, TOK, fsync=False)
    s = _prepared(runner, HISTORIES[2])
    info = store.commit("ns", "a", s.to_state(), {"turns": 2})
    assert info["version"] == 1 and info["state_sha256"] == state_digest(s.to_state())
    s.add_user("one more")
    info = store.commit("ns", "a", s.to_state(), {"turns": 3})
    d = tmp_path / "s" / "ns" / "a"
    assert sorted(p.name for p in d.iterdir()) == [POINTER_FILE, "v00000002"]
    loaded = store.load("ns", "a")
    assert loaded.version == 2 and loaded.info["turns"] == 3
    assert state_digest(loaded.session.to_state()) == info["state_sha256"]
    assert store.load("ns", "missing") is None and store.sessions("ns") == ["a"]
    # leftovers of interrupted commits: a temp dir, an unreferenced newer version, a session
    # whose first commit never reached its pointer, a tombstone
    (d / ".v00000003.x.tmpdir").mkdir()
    (d / "v00000003").mkdir()
    (tmp_path / "s" / "ns" / "b" / "v00000001").mkdir(parents=True)
    (tmp_path / "s" / "ns" / ".deleted-c-1234").mkdir()
    removed = store.recover()
    assert removed == {"temporary": 2, "stale_versions": 1, "uncommitted_sessions": 1}
    assert sorted(p.name for p in d.iterdir()) == [POINTER_FILE, "v00000002"]
    assert store.sessions("ns") == ["a"] and store.load("ns", "b") is None
    assert json.loads((d / "v00000002" / "info.json").read_text())["turns"] == 3
    assert store.delete("ns", "a") and not store.delete("ns", "a")
    assert store.sessions("ns") == [] and not (tmp_path / "s" / "ns" / "a").exists()


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "a\\b", "", "x" * 129, "a b",
                                  "é", "a\x00"])
def test_store_rejects_unsafe_names(runner, tmp_path, name):
    assert not valid_name(name)
    store = SessionStore(tmp_path, runner, TOK, fsync=False)
    with pytest.raises(ValueError, match="invalid session id"):
        store.load("ns", name)
    assert valid_name("a.b-c_9") and valid_name("x" * 128)


def test_read_only_turn_writes_nothing(runner, scheduler):
    """write=False: the question and the reply read the memory and leave it bit for bit as it
    was; greedy, the reply is Session.reply(write=False)'s."""
    base = _prepared(runner, HISTORIES[2])
    s, rec = _copy(base), Recorder()
    scheduler.submit(_turn(s, "Where does he walk?", rec, write=False))
    _, end = rec.wait()
    assert end.kind == "done"
    np.testing.assert_array_equal(np.asarray(s.memory_state), np.asarray(base.memory_state))
    assert s.tokens_written == base.tokens_written and len(s.ids) > len(base.ids)
    ref = _copy(base)
    ref.add_user("Where does he walk?", write=False)
    assert ref.reply(SamplingConfig(max_new_tokens=MAX), write=False) == end.text
    np.testing.assert_allclose(s.next_token_logits(), ref.next_token_logits(), rtol=1e-4,
                               atol=1e-4)
