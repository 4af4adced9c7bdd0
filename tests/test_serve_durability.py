"""Durability: a server killed with SIGKILL — mid-stream, at each point of a commit, at a
random moment under load — and restarted on the same state directory continues every
session exactly at its last acknowledged turn (state digests bit for bit), with nothing
half-written left behind."""

import random
import threading
import time

import openai
import pytest
from serve_harness import MODEL_NAME, ServerProcess

from deltamem_jax.inference.store import CRASH_ENV, POINTER_FILE

from helpers import random_model, save_pretrained

POINTS = ("in-version", "before-pointer", "after-pointer")
CRASHES = ",".join(f"{p}:crash-{p}:2" for p in POINTS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    dirs = save_pretrained(random_model(0), tmp_path_factory.mktemp("pretrained"))
    srv = ServerProcess(*dirs, tmp_path_factory.mktemp("durable") / "state",
                        env={CRASH_ENV: CRASHES},
                        args=("--window", "64", "--chunk", "32", "--max-tokens", "384",
                              "--slots", "4", "--log-level", "warning"))
    srv.start()
    yield srv
    srv.stop()


def _say(server, sid, text, **kw):
    return server.chat(sid, [{"role": "user", "content": text}], mode="append", **kw)


def _clean(server):
    """Every session directory holds CURRENT and the one version it names, nothing else."""
    for d in (server.state_dir / "sessions").glob("*/*"):
        names = sorted(p.name for p in d.iterdir())
        current = (d / POINTER_FILE).read_text().strip()
        assert names == [POINTER_FILE, current], names
    assert not list((server.state_dir / "sessions").glob("*/.*"))


def test_kill_mid_stream_then_resume(server):
    for sid in ("a", "twin"):
        for text in ("My cat is Miso.", "She is eleven."):
            _say(server, sid, text)
    acked = server.session("a")
    for attempt in range(6):
        stream = server.client().chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Tell me a long story."}],
            stream=True, max_tokens=384, temperature=1.0, seed=attempt,
            extra_headers={"X-Session-Id": "a", "X-Session-Mode": "append"})
        pieces, finished = 0, False
        for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finished = True
            elif chunk.choices and chunk.choices[0].delta.content:
                pieces += 1
            if pieces >= 5 or finished:
                break
        if not finished:
            break
        for _ in stream:                               # a short story: let it commit
            pass
        acked = server.session("a")
    else:
        pytest.fail("every reply ended before the stream could be interrupted")
    server.kill()                                      # mid-stream: the turn is not acked
    stream.close()
    server.start()
    assert server.session("a") == acked                # bit for bit: digests, counts, times
    _clean(server)
    # continuing: the same reply as a twin that never saw the interrupted turn (greedy),
    # unless an earlier attempt's story made "a" a different session
    ra, rt = _say(server, "a", "What is her name?"), _say(server, "twin", "What is her name?")
    if acked["turns"] == 2:
        assert ra.choices[0].message.content == rt.choices[0].message.content
        assert server.session("a")["content_sha256"] == server.session("twin")["content_sha256"]
    assert server.session("a")["turns"] == acked["turns"] + 1


def test_kill_at_every_point_of_a_commit(server):
    before = {}
    for point in POINTS:
        sid = f"crash-{point}"
        _say(server, sid, "The code word is tangerine.")
        before[point] = server.session(sid)
        assert before[point]["version"] == 1
        with pytest.raises(openai.APIConnectionError):
            _say(server, sid, "Remember it.")          # its commit kills the server
        server.proc.wait(30)
        assert not server.alive()
        server.start()
        after = server.session(sid)
        if point == "after-pointer":                   # committed, just never acknowledged
            assert after["version"] == 2 and after["turns"] == 2
        else:                                          # nothing of the turn is visible
            assert after == before[point]
        _clean(server)
    for point in POINTS:                               # each rule fired once: serving goes on
        sid = f"crash-{point}"
        turns = server.session(sid)["turns"]
        _say(server, sid, "What was the code word?")
        assert server.session(sid)["turns"] == turns + 1


def test_kill_at_a_random_moment_under_load(server):
    """Four clients take turns on their sessions; SIGKILL lands whenever it lands. After the
    restart each session is at its last acknowledged turn or (if that commit completed
    but its response was lost) one turn later — never anything else — and continues."""
    sids = [f"load-{i}" for i in range(4)]
    acked = {sid: None for sid in sids}
    for sid in sids:
        acked[sid] = _say(server, sid, f"I am {sid}.").session
    stop = threading.Event()

    def client(sid):
        i = 0
        while not stop.is_set():
            try:
                r = _say(server, sid, f"turn {i} of {sid}", max_tokens=16)
            except openai.APIError:
                return
            acked[sid] = r.session
            i += 1

    threads = [threading.Thread(target=client, args=(sid,)) for sid in sids]
    for t in threads:
        t.start()
    time.sleep(random.Random(7).uniform(1.0, 2.5))
    server.kill()
    stop.set()
    for t in threads:
        t.join(60)
    server.start()
    for sid in sids:
        now, last = server.session(sid), acked[sid]
        assert now["turns"] in (last["turns"], last["turns"] + 1)
        if now["turns"] == last["turns"]:
            assert now["state_sha256"] == last["state_sha256"]
        _say(server, sid, "Still there?")
        assert server.session(sid)["turns"] == now["turns"] + 1
    _clean(server)
