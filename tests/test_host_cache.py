"""The session store's host-memory LRU: a hit is bit for bit a cold load from disk, an entry
stands only for the version CURRENT names, and the bounds (count, bytes) hold."""

import jax
import numpy as np
import pytest

from deltamem_jax import Runner, SamplingConfig
from deltamem_jax.data.tokenizer import ByteTokenizer
from deltamem_jax.inference.host_cache import HostCache
from deltamem_jax.inference.session import Session
from deltamem_jax.inference.snapshot import snapshot_parts, state_digest
from deltamem_jax.inference.store import SessionStore

from helpers import random_model

WINDOW, CHUNK, MAX = 48, 16, 8
CAPACITY = Session.required_capacity(WINDOW, MAX, CHUNK)
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def runner():
    return Runner(random_model(0))


def _session(runner, texts, seed=0):
    s = Session(runner, TOK, window=WINDOW, keep=WINDOW // 2, chunk=CHUNK, capacity=CAPACITY,
                seed=seed, sampling=SamplingConfig(max_new_tokens=MAX))
    for t in texts:
        s.add_user(t)
        s.reply()
    return s


def _leaves(session):
    st = session.to_state()
    return jax.tree.leaves((st.memory, st.cache, st.logits, st.beta_means,
                            jax.random.key_data(st.rng)))


def test_hit_is_bit_for_bit_a_cold_load_and_continues_alike(runner, tmp_path):
    s = _session(runner, ["My cat is called Miso and she is eleven years old.",
                          "She sleeps all day long on the warm windowsill."])
    assert s.compactions > 0                          # the window was rebuilt at least once
    cached = SessionStore(tmp_path, runner, TOK, fsync=False, cache=HostCache(8, 1 << 30))
    info = cached.commit("ns", "a", s.to_state(), {"turns": 2})
    hot = cached.load("ns", "a")
    assert cached.cache.stats()["hits"] == 1          # served from memory, not from disk
    cold = SessionStore(tmp_path, runner, TOK, fsync=False).load("ns", "a")
    assert hot.info == cold.info == info and hot.version == cold.version == 1
    assert state_digest(hot.session.to_state()) == state_digest(cold.session.to_state()) \
        == info["state_sha256"]
    for a, b in zip(_leaves(hot.session), _leaves(cold.session), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # capacity-sized, padding too
    assert hot.session.messages == cold.session.messages and hot.session.ids == cold.session.ids
    assert hot.session.counts() == cold.session.counts()
    for loaded in (hot, cold):                        # and they go on identically
        loaded.session.add_user("What is her name?")
        loaded.reply = loaded.session.reply()
    assert hot.reply == cold.reply
    assert state_digest(hot.session.to_state()) == state_digest(cold.session.to_state())
    # what the cache holds is read-only and shared with nobody
    _, entry, _ = cached.cache._entries[("ns", "a")]
    assert all(not a.flags.writeable for a in entry.arrays.values())
    assert state_digest(cached.load("ns", "a").session.to_state()) == info["state_sha256"]


def test_an_entry_stands_only_for_the_version_on_disk(runner, tmp_path):
    s = _session(runner, ["The launch code is 4711."])
    mine = SessionStore(tmp_path, runner, TOK, fsync=False, cache=HostCache(8, 1 << 30))
    other = SessionStore(tmp_path, runner, TOK, fsync=False)       # another writer, same dir
    mine.commit("ns", "a", s.to_state(), {"turns": 1})
    s.add_user("And the second code is 1234.")
    newer = other.commit("ns", "a", s.to_state(), {"turns": 2})
    got = mine.load("ns", "a")
    assert got.version == 2 and got.info == newer
    assert state_digest(got.session.to_state()) == newer["state_sha256"]
    assert mine.info("ns", "a") == newer
    assert mine.delete("ns", "a") and ("ns", "a") not in mine.cache
    assert mine.load("ns", "a") is None and mine.info("ns", "a") is None
    mine.commit("ns", "b", s.to_state(), {})
    mine.recover()
    assert len(mine.cache) == 0                       # a restart's view: disk only


def test_bounds_by_count_and_bytes_least_recently_used_first(runner, tmp_path):
    sessions = [_session(runner, [t], seed=i) for i, t in enumerate(["one", "two", "three"])]
    size = snapshot_parts(sessions[0].to_state(), runner).frozen().nbytes
    store = SessionStore(tmp_path, runner, TOK, fsync=False, cache=HostCache(2, 1 << 30))
    for i, s in enumerate(sessions[:2]):
        store.commit("ns", f"s{i}", s.to_state(), {})
    store.load("ns", "s0")                            # s0 is now the most recent
    store.commit("ns", "s2", sessions[2].to_state(), {})
    assert ("ns", "s1") not in store.cache and len(store.cache) == 2
    assert store.cache.stats()["evictions"] == 1
    assert store.load("ns", "s1").version == 1        # evicted: read from disk again

    by_bytes = HostCache(100, int(1.5 * size) + 64)
    store = SessionStore(tmp_path / "b", runner, TOK, fsync=False, cache=by_bytes)
    for i, s in enumerate(sessions):
        store.commit("ns", f"s{i}", s.to_state(), {})
        st = by_bytes.stats()
        assert st["sessions"] == 1 and st["bytes"] <= by_bytes.max_bytes
    assert ("ns", "s2") in by_bytes

    tiny = HostCache(100, size // 2)                  # an entry larger than the bound: not kept
    store = SessionStore(tmp_path / "c", runner, TOK, fsync=False, cache=tiny)
    store.commit("ns", "a", sessions[0].to_state(), {})
    assert len(tiny) == 0 and tiny.stats()["bytes"] == 0
    assert store.load("ns", "a").version == 1
    with pytest.raises(ValueError, match="≥ 0"):
        HostCache(-1, 10)
