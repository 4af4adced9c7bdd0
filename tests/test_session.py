"""Chat sessions: incremental writes, windowed cache, snapshots, reset, and the chat CLI."""

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deltamem_jax import Runner, SamplingConfig
from deltamem_jax.checkpoints.pretrained import load_pretrained
from deltamem_jax.data.tokenizer import ByteTokenizer
from deltamem_jax.inference.session import Session, SnapshotError
from deltamem_jax.inference.snapshot import model_signature, state_digest
from deltamem_jax.tools.chat import ChatApp, main

from helpers import random_model, save_pretrained

CHUNK = 16              # one bucket length, one cache capacity, one padded length → few compiles
CAPACITY = 256
FULL = 256
SAMPLING = SamplingConfig(max_new_tokens=8, temperature=1.0)

CONVERSATION = [
    ("system", "You remember things."),
    ("user", "My cat is called Miso and she is eleven years old."),
    ("assistant", "Noted: Miso, eleven."),
    ("user", "I also have a dog named Biscuit who loves long walks by the river."),
    ("assistant", "Biscuit sounds lovely."),
    ("user", "What is my cat called?"),
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A backbone dir (HF format + byte-tokenizer marker) and an adapter dir on disk."""
    return save_pretrained(random_model(0), tmp_path_factory.mktemp("pretrained"))


@pytest.fixture(scope="module")
def model(dirs):
    # loaded the way the chat CLI loads it, so the CLI test reuses the compiled code
    model = load_pretrained(*dirs)
    assert all(np.any(np.asarray(model.layers[i].self_attn.memory.beta_proj.get_value()))
               for i in model.memory_layers)
    return model


@pytest.fixture(scope="module")
def runner(model):
    return Runner(model)


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


def _session(runner, tok, **kw):
    kw.setdefault("chunk", CHUNK)
    kw.setdefault("sampling", SAMPLING)
    kw.setdefault("capacity", CAPACITY)
    return Session(runner, tok, **kw)


def _feed_conversation(session, messages=CONVERSATION):
    for role, content in messages:
        session.add_message(role, content)


def _full_pass(runner, tok, messages):
    ids = tok.render_chat([{"role": r, "content": c} for r, c in messages]).ids
    n = len(ids)
    assert n <= FULL
    padded = np.zeros((1, FULL), np.int32)
    padded[0, :n] = ids
    out = runner(padded, attention_mask=np.arange(FULL)[None] < n)
    return np.asarray(out.memory_state), np.asarray(out.logits[0, n - 1]), ids


def test_turns_change_memory(runner, tok):
    s = _session(runner, tok)
    assert not np.any(np.asarray(s.memory_state))
    s.add_user("hello there")
    first = np.asarray(s.memory_state)
    assert np.all(np.linalg.norm(first.reshape(first.shape[0], -1), axis=1) > 0)
    s.add_user("and again")
    assert not np.allclose(np.asarray(s.memory_state), first)
    assert s.tokens_written == len(s.ids) == len(tok.render_chat(s.messages).ids)
    assert s.stats()["beta_means"] is not None and len(s.stats()["state_norms"]) == 2


def test_turn_by_turn_equals_one_full_pass(runner, tok):
    s = _session(runner, tok, capacity=128)         # window=None: keep everything
    cap0 = s.capacity
    _feed_conversation(s)
    state, logits, ids = _full_pass(runner, tok, CONVERSATION)
    assert s.ids == ids.tolist() and s.cache_ids == s.ids
    assert s.capacity > cap0 > 0                    # grew past its first size, still exact
    np.testing.assert_allclose(np.asarray(s.memory_state), state, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.next_token_logits(), logits, rtol=1e-5, atol=1e-5)


class ExactBytes(ByteTokenizer):
    """decode ∘ encode is the identity on every non-stop id (specials map to private chars)."""

    def encode(self, text):
        return [ord(c) - 0xE000 if ord(c) >= 0xE000 else ord(c) + self.OFFSET for c in text]

    def decode(self, ids):
        return "".join(chr(0xE000 + int(i)) if int(i) < self.OFFSET else chr(int(i) - self.OFFSET)
                       for i in ids)


class ConstantReply(ByteTokenizer):
    """Decodes every reply to "ok": the re-rendered reply never matches the generated tokens."""

    def decode(self, ids):
        return "ok"


def _check_matches_full_pass(s, runner):
    assert s.ids == s.tokenizer.render_chat(s.messages).ids.tolist()
    ids = s.tokenizer.render_chat(s.messages).ids
    padded = np.zeros((1, FULL), np.int32)
    padded[0, :len(ids)] = ids
    out = runner(padded, attention_mask=np.arange(FULL)[None] < len(ids))
    np.testing.assert_allclose(np.asarray(s.memory_state), np.asarray(out.memory_state),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.next_token_logits(), np.asarray(out.logits[0, len(ids) - 1]),
                               rtol=1e-5, atol=1e-5)
    assert s.tokens_written == len(s.ids)


def test_reply_writes_generated_tokens(runner):
    # a prefix-stable tokenizer: the generated tokens stay, so generation itself must write
    s = _session(runner, ExactBytes())
    _feed_conversation(s, CONVERSATION[:2])
    before = np.asarray(s.memory_state)
    text = s.reply(rng=jax.random.key(3))
    assert len(text) >= 2 and s.messages[-1] == {"role": "assistant", "content": text}
    assert s.stats()["reverts"] == 0 and s.stats()["rebuilds"] == 0
    _check_matches_full_pass(s, runner)
    assert not np.allclose(np.asarray(s.memory_state), before)


def test_reply_that_does_not_re_encode_is_rewritten(runner):
    s = _session(runner, ConstantReply())
    _feed_conversation(s, CONVERSATION[:2])
    assert s.reply(rng=jax.random.key(3)) == "ok"
    assert s.stats()["reverts"] == 1 and s.stats()["rebuilds"] == 0
    _check_matches_full_pass(s, runner)             # the generated tokens' writes were undone


def test_read_only_probe_reply(runner, tok):
    s = _session(runner, tok)
    _feed_conversation(s, CONVERSATION[:2])
    s.reply(rng=jax.random.key(1))
    _check_matches_full_pass(s, runner)
    s.add_user("Tell me more.")
    written = np.asarray(s.memory_state)
    cached = s.stats()["cache_tokens"]
    s.reply(rng=jax.random.key(4), write=False)
    np.testing.assert_array_equal(np.asarray(s.memory_state), written)
    assert s.stats()["cache_tokens"] > cached and s.messages[-1]["role"] == "assistant"
    assert s.ids == tok.render_chat(s.messages).ids.tolist()
    assert s.tokens_written < len(s.ids)


def test_snapshot_restore_is_bit_exact(runner, tok, tmp_path):
    s = _session(runner, tok, window=48, seed=7)
    _feed_conversation(s)
    s.reply()
    assert s.stats()["compactions"] > 0
    path = tmp_path / "snap"
    s.snapshot(path)
    s.snapshot(path)                                # overwriting works, leaves no temp dirs
    assert sorted(os.listdir(tmp_path)) == ["snap"]
    r = Session.restore(path, runner, tok)
    np.testing.assert_array_equal(np.asarray(r.memory_state), np.asarray(s.memory_state))
    np.testing.assert_array_equal(r.next_token_logits(), s.next_token_logits())
    assert r.messages == s.messages and r.ids == s.ids and r.cache_ids == s.cache_ids
    assert r.stats() == s.stats() and r.capacity == s.capacity
    n = s.stats()["cache_tokens"]
    for a, b in zip(r.cache.keys + r.cache.values, s.cache.keys + s.cache.values):
        np.testing.assert_array_equal(np.asarray(a[:, :n]), np.asarray(b[:, :n]))
    for sess in (s, r):
        sess.add_user("Where does Biscuit walk?")
    np.testing.assert_array_equal(r.next_token_logits(), s.next_token_logits())
    np.testing.assert_array_equal(np.asarray(r.memory_state), np.asarray(s.memory_state))
    assert r.reply() == s.reply()                   # the sampling key was restored too
    np.testing.assert_array_equal(np.asarray(r.memory_state), np.asarray(s.memory_state))


def test_restore_refuses_other_weights_and_bad_dirs(runner, tok, tmp_path):
    s = _session(runner, tok)
    s.add_user("hi")
    s.snapshot(tmp_path / "snap")
    other = nnx.clone(runner.model())               # the same model but one δ-mem weight
    bias = other.layers[0].self_attn.memory.beta_bias
    bias.set_value(jnp.asarray(np.asarray(bias.get_value()) + 0.5))
    with pytest.raises(SnapshotError, match="different model"):
        Session.restore(tmp_path / "snap", Runner(other), tok)
    with pytest.raises(SnapshotError, match="not a directory"):
        Session.restore(tmp_path / "missing", runner, tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SnapshotError, match="not a session snapshot"):
        Session.restore(tmp_path / "empty", runner, tok)


def test_reset_returns_to_zero_state(runner, tok):
    s = _session(runner, tok)
    _feed_conversation(s)
    s.reset()
    assert not np.any(np.asarray(s.memory_state))
    assert s.messages == [] and s.ids == [] and s.stats()["cache_tokens"] == 0
    assert not np.any(np.asarray(s.cache.mask))
    s.add_user("hello there")
    fresh = _session(runner, tok)
    fresh.add_user("hello there")
    np.testing.assert_array_equal(np.asarray(s.memory_state), np.asarray(fresh.memory_state))
    np.testing.assert_array_equal(s.next_token_logits(), fresh.next_token_logits())


def test_window_bounds_cache_while_memory_integrates(runner, tok):
    window = 40
    s = _session(runner, tok, window=window)
    full = _session(runner, tok)
    cap = s.capacity
    for role, content in CONVERSATION:
        s.add_message(role, content)
        full.add_message(role, content)
        n = s.stats()["cache_tokens"]
        assert n <= window and s.cache_ids == s.ids[len(s.ids) - n:]
        assert int(s.cache.index) == n and int(np.asarray(s.cache.mask).sum()) == n
    assert s.stats()["compactions"] > 0 and len(s.ids) > 3 * window
    # every token written exactly once: the first δ-mem layer sees only embeddings, so
    # its state must match the unwindowed session's (rebuilds are read-only)
    assert s.tokens_written == len(s.ids)
    state = np.asarray(s.memory_state)
    np.testing.assert_allclose(state[0], np.asarray(full.memory_state)[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(state[1], np.asarray(full.memory_state)[1], atol=1e-4)
    s.reply(rng=jax.random.key(0))
    assert s.stats()["cache_tokens"] <= window and s.capacity == cap
    # ... and the memory holds the turns that left the window
    recent = _session(runner, tok, window=window)
    for role, content in CONVERSATION[-2:]:
        recent.add_message(role, content)
    assert not np.allclose(np.asarray(recent.memory_state), np.asarray(s.memory_state)[:, :],
                           atol=1e-3)


def test_chat_commands(runner, tok, tmp_path):
    app = ChatApp(_session(runner, tok))
    assert isinstance(app.handle("My cat is Miso."), str)
    assert len(app.session.messages) == 2
    stats = app.handle("/stats")
    assert "messages 2" in stats and "beta mean" in stats
    assert len([ln for ln in stats.splitlines() if ln.split()[0] in ("0", "1")]) == 2
    saved_state = np.asarray(app.session.memory_state)
    assert app.handle(f"/save {tmp_path / 'chat'}").startswith("saved session (2 messages)")
    assert "reset" in app.handle("/reset")
    assert not np.any(np.asarray(app.session.memory_state)) and app.session.messages == []
    assert app.handle(f"/load {tmp_path / 'chat'}").startswith("loaded session (2 messages)")
    np.testing.assert_array_equal(np.asarray(app.session.memory_state), saved_state)
    err = app.handle(f"/load {tmp_path / 'nope'}")
    assert err.startswith("error:") and "no session snapshot" in err
    assert len(app.session.messages) == 2           # a failed load keeps the session
    assert app.handle("/load") == "usage: /load DIR" and app.handle("/save") == "usage: /save DIR"
    assert app.handle("/frobnicate").startswith("unknown command '/frobnicate'")
    assert app.handle(f"/save {tmp_path / 'chat' / 'arrays.npz' / 'x'}").startswith("error:")
    assert app.handle("") == "" and not app.done
    assert app.handle("/quit") == "bye" and app.done


def test_chat_cli_from_model_and_adapter_dirs(dirs, runner, tok, tmp_path):
    model_dir, adapter_dir = dirs
    snap = tmp_path / "snap"
    stdin = io.StringIO(f"Cat is Miso.\n/stats\n/save {snap}\n/bogus\n/quit\nnever read\n")
    stdout = io.StringIO()
    rc = main(["--model", str(model_dir), "--adapter", str(adapter_dir), "--max-new-tokens", "8",
               "--capacity", str(CAPACITY), "--chunk", str(CHUNK),
               "--temperature", "1.0", "--seed", "5"], stdin=stdin, stdout=stdout)
    out = stdout.getvalue()
    assert rc == 0 and "beta mean" in out and "saved session (2 messages)" in out
    assert "unknown command '/bogus'" in out and out.rstrip().endswith("bye")
    # the snapshot fits the in-memory model (same architecture, δ-mem config and weights)
    r = Session.restore(snap, runner, tok)
    assert r.messages[0] == {"role": "user", "content": "Cat is Miso."}
    state, _, _ = _full_pass(runner, tok, [(m["role"], m["content"]) for m in r.messages])
    np.testing.assert_allclose(np.asarray(r.memory_state), state, rtol=1e-5, atol=1e-6)
    # without the adapter the backbone runs bare and the snapshot does not fit it
    stdout = io.StringIO()
    main(["--model", str(model_dir), "--max-new-tokens", "4"],
         stdin=io.StringIO(f"/stats\n/load {snap}\n"), stdout=stdout)
    out = stdout.getvalue()
    assert "no δ-mem attached" in out and "error:" in out and "different model" in out
    with pytest.raises(SystemExit):                 # bad settings: a usage error, no traceback
        main(["--model", str(model_dir), "--window", "0"], stdin=io.StringIO(""),
             stdout=io.StringIO())


# ---------------------------------------------------------------- scanned layers, snapshot files


@pytest.fixture(scope="module")
def scanned_runner(dirs):
    """The same weights in the scanned (stacked) layer layout."""
    return Runner(load_pretrained(*dirs, scan_layers=True))


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scanned"])
def test_sessions_on_both_layouts(runner, scanned_runner, tok, tmp_path, scan):
    """Turns beyond the first capacity (the cache grows), a windowed session (compactions),
    snapshot and restore bit-exact: for the list-of-layers and the scanned layout."""
    run = scanned_runner if scan else runner
    grow = _session(run, tok, capacity=64)              # window=None: doubles when full
    _feed_conversation(grow)
    assert grow.capacity > 64
    _check_matches_full_pass(grow, run)
    win = _session(run, tok, window=40, seed=3)
    _feed_conversation(win)
    win.reply()
    assert win.stats()["compactions"] > 0 and win.stats()["cache_tokens"] <= 40
    for s, name in ((grow, "grow"), (win, "win")):
        s.snapshot(tmp_path / name)
        r = Session.restore(tmp_path / name, run, tok)
        assert state_digest(r.to_state()) == state_digest(s.to_state())
        assert r.capacity == s.capacity and r.cache.max_length == s.cache.max_length
        for sess in (s, r):
            sess.add_user("And the dog?")
        np.testing.assert_array_equal(r.next_token_logits(), s.next_token_logits())
        assert r.reply() == s.reply()
        np.testing.assert_array_equal(np.asarray(r.memory_state), np.asarray(s.memory_state))


def test_layouts_agree_and_share_snapshots(runner, scanned_runner, tok, tmp_path):
    """One model in both layouts: the same signature, the same session, and a snapshot of one
    continues on the other."""
    assert model_signature(runner) == model_signature(scanned_runner)
    a, b = _session(runner, tok, window=40), _session(scanned_runner, tok, window=40)
    for s in (a, b):
        _feed_conversation(s)
    np.testing.assert_allclose(np.asarray(b.memory_state), np.asarray(a.memory_state),
                               rtol=1e-5, atol=1e-6)
    a.snapshot(tmp_path / "a")
    moved = Session.restore(tmp_path / "a", scanned_runner, tok)
    assert state_digest(moved.to_state()) == state_digest(a.to_state())
    a.add_user("Again?")
    moved.add_user("Again?")
    np.testing.assert_allclose(moved.next_token_logits(), a.next_token_logits(),
                               rtol=1e-5, atol=1e-5)


def _corrupt(src, dst, edit):
    import shutil
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def test_snapshot_errors_name_the_file(runner, tok, tmp_path):
    s = _session(runner, tok)
    s.add_user("hi there")
    good = tmp_path / "good"
    s.snapshot(good)
    meta = json.loads((good / "session.json").read_text())

    def write_json(obj):
        return lambda d: (d / "session.json").write_text(json.dumps(obj))

    def resave(**change):
        def edit(d):
            with np.load(d / "arrays.npz") as z:
                arrays = {k: z[k] for k in z.files}
            for k, v in change.items():
                if v is None:
                    del arrays[k]
                else:
                    arrays[k] = v
            np.savez(d / "arrays.npz", **arrays)
        return edit

    cases = [
        ("json", lambda d: (d / "session.json").write_text('{"format": "deltamem-sess'),
         r"session\.json: not valid JSON"),
        ("npz", lambda d: (d / "arrays.npz").write_bytes(b"PK\x03\x04 truncated"),
         r"arrays\.npz: not a readable \.npz"),
        ("nokey", resave(key_1=None), r"arrays\.npz: missing array 'key_1'"),
        ("shape", resave(memory_state=np.zeros((2, 1, 1, 8, 9), np.float32)),
         r"arrays\.npz: array 'memory_state' has shape \(2, 1, 1, 8, 9\), expected"),
        ("field", write_json({k: v for k, v in meta.items() if k != "ids"}),
         r"session\.json: missing field 'ids'"),
        ("type", write_json(dict(meta, cache_len="7")),
         r"session\.json: field 'cache_len' has the wrong type"),
        ("window", write_json(dict(meta, cache_start=meta["cache_start"] + 1)),
         r"session\.json: inconsistent cache window"),
    ]
    for name, edit, pattern in cases:
        bad = _corrupt(good, tmp_path / name, edit)
        with pytest.raises(SnapshotError, match=pattern) as err:
            Session.restore(bad, runner, tok)
        assert str(bad) in str(err.value), name
    assert state_digest(Session.restore(good, runner, tok).to_state()) == \
        state_digest(s.to_state())


def test_keep_rebuilds_the_window_less_often(runner, tok):
    """keep=K: a full window is rebuilt down to K tokens, so rebuilds are rarer; the cache
    never exceeds the window and every token is still written exactly once."""
    every, rare = _session(runner, tok, window=40), _session(runner, tok, window=40, keep=16)
    for s in (every, rare):
        for role, content in CONVERSATION:
            s.add_message(role, content)
            assert s.stats()["cache_tokens"] <= 40
            assert s.cache_ids == s.ids[len(s.ids) - s.stats()["cache_tokens"]:]
    assert 0 < rare.stats()["compactions"] < every.stats()["compactions"]
    assert rare.tokens_written == every.tokens_written == len(rare.ids)
    np.testing.assert_allclose(np.asarray(rare.memory_state)[0],       # layer 0: embeddings
                               np.asarray(every.memory_state)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="keep must be"):
        _session(runner, tok, window=40, keep=40)


class _CountingSession(Session):
    """Counts the model passes a session runs."""

    passes = 0

    def run_pass(self, p):
        self.passes += 1
        return super().run_pass(p)


def _greedy(s, pending, n):
    """Decode ``pending`` greedily outside the session (what a batching decoder does)."""
    mem, cache, logits, tokens = pending.memory_state, pending.cache, pending.logits, []
    for _ in range(n):
        t = int(np.argmax(np.asarray(logits)))
        if t in s.tokenizer.stop_ids:
            break
        out = s.runner(np.array([[t]], np.int32), attention_mask=np.ones((1, 1), bool),
                       memory_state=mem, cache=cache, write=pending.write)
        mem, cache, logits = out.memory_state, out.cache, out.logits[0, -1]
        tokens.append(t)
    return tokens, mem, cache


def test_begin_turn_feeds_messages_and_prompt_together(runner, tok):
    """begin_turn = add_message for each message + begin_reply: the same ids, memory, logits
    and window bit for bit — in fewer passes when that rebuilds the window at the same
    points (with or without a rebuild in the turn), step by step when it would not."""
    new = [{"role": "user", "content": "What is my cat called?"},
           {"role": "user", "content": "And the dog?"}]
    seen = set()
    for window, keep in ((None, None), (40, None), (40, 16), (48, 24), (64, 8), (96, 8)):
        a, b = (_CountingSession(runner, tok, chunk=CHUNK, sampling=SAMPLING,
                                 capacity=CAPACITY, window=window, keep=keep) for _ in range(2))
        for s in (a, b):
            _feed_conversation(s, CONVERSATION[:5])
            s.passes, s.before = 0, s.compactions
        for m in new:
            a.add_message(m["role"], m["content"])
        pa = a.begin_reply(8)
        pb = b.begin_turn(new, 8)
        assert a.ids == b.ids and a.messages == b.messages and a.counts() == b.counts()
        assert (pa.n_ids, pa.cache_len) == (pb.n_ids, pb.cache_len)
        n = pa.cache_len                     # slots past it hold padding: never attended
        for x, y in ((pa.memory_state, pb.memory_state), (pa.logits, pb.logits),
                     (pa.cache.keys, pb.cache.keys), (pa.cache.values, pb.cache.values),
                     (pa.cache.mask, pb.cache.mask)):
            for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
                u, v = np.asarray(u), np.asarray(v)
                if u.ndim == 4:                  # [B, S, kv, hd] keys / values
                    u, v = u[:, :n], v[:, :n]
                np.testing.assert_array_equal(u, v)
        merged, rebuilt = b.passes < a.passes, b.compactions > b.before
        assert b.passes <= a.passes
        if not merged:
            assert state_digest(a.to_state()) == state_digest(b.to_state())
        seen.add((merged, rebuilt))
        text = b.end_reply(pb, *_greedy(b, pb, 8))
        assert b.messages[-1] == {"role": "assistant", "content": text}
    assert {(True, False), (True, True), (False, True)} <= seen, seen


def test_begin_turn_reply_that_does_not_re_encode_reverts_like_step_by_step(runner):
    """A reply that does not re-encode: the merged turn reverts to before its messages,
    feeds them again one by one, then the rendered reply — ending bit for bit where
    add_message + begin_reply + end_reply ends."""
    new = [{"role": "user", "content": CONVERSATION[1][1]}]
    for window, keep in ((None, None), (40, 16)):
        a, b = (_CountingSession(runner, ConstantReply(), chunk=CHUNK, sampling=SAMPLING,
                                 capacity=CAPACITY, window=window, keep=keep)
                for _ in range(2))
        for s in (a, b):
            _feed_conversation(s, CONVERSATION[:1])
            s.passes = 0
        a.add_message("user", new[0]["content"])
        pa, pb = a.begin_reply(8), b.begin_turn(new, 8)
        assert b.passes < a.passes                           # b merged its feed
        assert a.end_reply(pa, *_greedy(a, pa, 8)) == b.end_reply(pb, *_greedy(b, pb, 8)) == "ok"
        assert a.stats()["reverts"] == b.stats()["reverts"] == 1
        assert a.messages == b.messages and a.ids == b.ids and a.counts() == b.counts()
        assert state_digest(a.to_state()) == state_digest(b.to_state())
        if window is None:
            _check_matches_full_pass(b, runner)   # the message fed again, the reply rewritten
