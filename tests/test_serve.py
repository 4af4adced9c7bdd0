"""The HTTP server, through the official ``openai`` client and raw HTTP, against one real
server process on 127.0.0.1: sessions (full history, prefix diff, append, conflicts),
streaming, stateless requests, snapshots, API keys and isolation, errors, and a fuzz run."""

import json
import random
import socket
from concurrent import futures

import numpy as np
import openai
import pytest
from serve_harness import MODEL_NAME, ServerProcess

from deltamem_jax import Runner, SamplingConfig
from deltamem_jax.checkpoints.pretrained import load_pretrained
from deltamem_jax.data.tokenizer import ByteTokenizer
from deltamem_jax.inference.session import Session

from helpers import random_model, save_pretrained

KEY_A, KEY_B = "key-alpha-0123", "key-beta-4567"
WINDOW, CHUNK, LIMIT = 64, 32, 16
SYSTEM = {"role": "system", "content": "You remember things."}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_pretrained(random_model(0), tmp_path_factory.mktemp("pretrained"))


@pytest.fixture(scope="module")
def server(dirs, tmp_path_factory):
    srv = ServerProcess(*dirs, tmp_path_factory.mktemp("serve") / "state", keys=(KEY_A, KEY_B))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(dirs):
    """The library's own Session with the server's settings: what the server must compute."""
    runner = Runner(load_pretrained(*dirs))

    def make():
        return Session(runner, ByteTokenizer(), window=WINDOW, keep=WINDOW // 2, chunk=CHUNK,
                       capacity=Session.required_capacity(WINDOW, LIMIT, CHUNK),
                       sampling=SamplingConfig(max_new_tokens=8))
    return make


def _text(r):
    return r.choices[0].message.content


def test_models(server):
    c = server.client()
    assert [m.id for m in c.models.list().data] == [MODEL_NAME]
    assert c.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4o")
    status, body = server.request("GET", "/health", key="")
    assert status == 200 and body["status"] == "ok"


def test_session_turns_follow_the_library(server, reference):
    """Full history each turn (only the unseen suffix is ingested), then only new messages;
    every reply equals the library Session's greedy reply, and facts leave the window while
    the memory keeps integrating them."""
    ref = reference()
    history = [SYSTEM]
    turns = ["My cat is called Miso and she is eleven years old.",
             "I also have a dog named Biscuit.", "What is my cat called?"]
    for i, text in enumerate(turns):
        history.append({"role": "user", "content": text})
        r = server.chat("follow", history)
        if i == 0:
            ref.add_message("system", SYSTEM["content"])
        ref.add_user(text)
        assert _text(r) == ref.reply()
        # only the unseen suffix was ingested: <|user|> text <|end|>, the generation prompt
        # <|assistant|> (and the system message on the first turn)
        extra = len(SYSTEM["content"]) + 2 if i == 0 else 0
        assert r.usage.prompt_tokens == len(text) + 3 + extra
        history.append({"role": "assistant", "content": _text(r)})
        info = server.session("follow")
        assert info["turns"] == i + 1 and info["messages"] == len(history)
        assert info["tokens_written"] == ref.tokens_written
        assert info["window_tokens"] == ref.stats()["cache_tokens"] <= WINDOW
    # append mode: only the new message
    r = server.chat("follow", [{"role": "user", "content": "And the dog?"}], mode="append")
    ref.add_user("And the dog?")
    assert _text(r) == ref.reply()
    info = server.session("follow")
    assert info["turns"] == 4 and info["tokens_written"] > 2 * WINDOW
    assert r.session["state_sha256"] == info["state_sha256"]      # the response's own view
    # auto mode tells appended messages from a full history by the first message
    r = server.chat("follow", [{"role": "user", "content": "Thanks."}])
    assert server.session("follow")["turns"] == 5


def test_history_conflicts_are_409(server):
    history = [SYSTEM, {"role": "user", "content": "Remember the number 42."}]
    r = server.chat("conflict", history)
    digest = server.session("conflict")["state_sha256"]
    changed = [SYSTEM, {"role": "user", "content": "Remember the number 43."},
               {"role": "assistant", "content": _text(r)}, {"role": "user", "content": "?"}]
    with pytest.raises(openai.ConflictError, match="message 1 \\(user\\) differs"):
        server.chat("conflict", changed)
    with pytest.raises(openai.ConflictError, match="only its beginning"):
        server.chat("conflict", [SYSTEM])
    with pytest.raises(openai.ConflictError):
        server.chat("conflict", history, mode="full")      # lacks the assistant reply
    assert server.session("conflict")["state_sha256"] == digest


def test_streaming(server):
    msgs = [{"role": "user", "content": "Tell me something."}]
    server.chat("stream-twin", msgs, max_tokens=12)
    twin = _text(server.chat("stream-twin", [{"role": "user", "content": "More."}],
                             mode="append", max_tokens=12))
    server.chat("stream", msgs, max_tokens=12)
    stream = server.client().chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "More."}], stream=True,
        max_tokens=12, temperature=0, stream_options={"include_usage": True},
        extra_headers={"X-Session-Id": "stream", "X-Session-Mode": "append"})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert text == twin and finish in (["stop"], ["length"])
    assert chunks[-1].usage.completion_tokens >= 1 and not chunks[-1].choices
    a, b = server.session("stream"), server.session("stream-twin")
    assert a["turns"] == 2 and a["content_sha256"] == b["content_sha256"]
    # a stop string, streamed
    msgs = [{"role": "user", "content": "Say something."}]
    full = _text(server.chat(None, msgs, max_tokens=12))
    assert len(full) >= 5
    stop = full[3:5]
    stream = server.client().chat.completions.create(
        model=MODEL_NAME, messages=msgs, stream=True, max_tokens=12, temperature=0, stop=[stop])
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full[:full.index(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_stateless_requests_leave_no_session(server):
    before = server.request("GET", "/v1/sessions")[1]["data"]
    msgs = [{"role": "user", "content": "Hello there"}]
    a, b = server.chat(None, msgs), server.chat(None, msgs)
    assert _text(a) == _text(b) and getattr(a, "session", None) is None
    sampled = {_text(server.chat(None, msgs, temperature=1.0, seed=s)) for s in (1, 1)}
    assert len(sampled) == 1                                   # a seed decides the sample
    assert server.request("GET", "/v1/sessions")[1]["data"] == before


def test_snapshot_restore_and_fork(server):
    server.chat("snap", [{"role": "user", "content": "The password is swordfish."}])
    server.chat("snap", [{"role": "user", "content": "Got it?"}], mode="append")
    at2 = server.session("snap")
    status, body = server.request("POST", "/v1/sessions/snap/snapshot", {"name": "t2"})
    assert status == 200 and body["snapshot"] == "t2"
    server.chat("snap", [{"role": "user", "content": "Forget it."}], mode="append")
    assert server.session("snap")["state_sha256"] != at2["state_sha256"]
    status, body = server.request("POST", "/v1/sessions/snap/restore", {"snapshot": "t2"})
    assert status == 200 and body["state_sha256"] == at2["state_sha256"] and body["turns"] == 2
    status, body = server.request("POST", "/v1/sessions/snap-fork/restore",
                                  {"snapshot": "t2", "from_session": "snap"})
    assert status == 200 and body["state_sha256"] == at2["state_sha256"]
    a = server.chat("snap", [{"role": "user", "content": "What is it?"}], mode="append")
    b = server.chat("snap-fork", [{"role": "user", "content": "What is it?"}], mode="append")
    assert _text(a) == _text(b)
    assert server.session("snap")["snapshots"] == ["t2"]
    for body, want in (({"snapshot": "nope"}, 404), ({"snapshot": "../t2"}, 400),
                       ({"snapshot": 7}, 400), ({}, 400)):
        assert server.request("POST", "/v1/sessions/snap/restore", body)[0] == want
    assert server.request("POST", "/v1/sessions/snap/snapshot", {"name": ".x"})[0] == 400
    assert server.request("POST", "/v1/sessions/never/snapshot", {"name": "x"})[0] == 404


def test_keys_namespaces_and_no_leaks(server, reference):
    """No key → 401; each key sees only its own sessions, even under the same id; a secret
    planted in key A's session (served in the same batches as B's turns) changes nothing in
    B's state or replies."""
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong-key-000").models.list()
    assert server.request("GET", "/v1/models", key="")[0] == 401
    status, body = server.request("POST", "/v1/chat/completions", {"model": MODEL_NAME},
                                  key="")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"

    secret = "The vault code is 9137-ZEBRA. Never tell anyone."
    questions = ["Hello!", "What is the vault code?", "Say it again."]

    def plant():
        for i in range(3):
            server.chat("vault", [{"role": "user", "content": f"{secret} ({i})"}], key=KEY_A,
                        mode="append", max_tokens=16)

    def ask(sid):
        return [_text(server.chat(sid, [{"role": "user", "content": q}], key=KEY_B,
                                  mode="append")) for q in questions]

    with futures.ThreadPoolExecutor(3) as pool:
        planted = pool.submit(plant)
        victim = pool.submit(ask, "vault")               # B's own "vault", same id as A's
        control_f = pool.submit(ask, "control")
        planted.result(), victim.result(), control_f.result()
    b_vault, control = victim.result(), control_f.result()
    assert b_vault == control and not any("9137" in t or "ZEBRA" in t for t in b_vault)
    vb, vc = server.session("vault", key=KEY_B), server.session("control", key=KEY_B)
    assert vb["content_sha256"] == vc["content_sha256"] and vb["turns"] == 3
    va = server.session("vault", key=KEY_A)
    assert va["turns"] == 3 and va["content_sha256"] != vb["content_sha256"]
    # the library, fed only B's messages, agrees with what B got
    ref = reference()
    for q, got in zip(questions, b_vault):
        ref.add_user(q)
        assert ref.reply() == got
    # B can neither read, continue from, snapshot, restore nor delete A's sessions
    server.chat("a-only", [{"role": "user", "content": secret}], key=KEY_A)
    assert server.request("POST", "/v1/sessions/a-only/snapshot", {"name": "s"},
                          key=KEY_A)[0] == 200
    assert server.session("a-only", key=KEY_B) is None
    assert server.request("DELETE", "/v1/sessions/a-only", key=KEY_B)[0] == 404
    assert server.request("POST", "/v1/sessions/a-only/snapshot", {"name": "x"},
                          key=KEY_B)[0] == 404
    assert server.request("POST", "/v1/sessions/stolen/restore",
                          {"snapshot": "s", "from_session": "a-only"}, key=KEY_B)[0] == 404
    ids_b = [s["id"] for s in server.request("GET", "/v1/sessions", key=KEY_B)[1]["data"]]
    assert "a-only" not in ids_b and {"control", "vault"} <= set(ids_b)
    assert server.session("a-only", key=KEY_A)["turns"] == 1
    # delete is per key too
    assert server.request("DELETE", "/v1/sessions/control", key=KEY_B)[0] == 200
    assert server.session("control", key=KEY_B) is None
    assert server.session("vault", key=KEY_A)["turns"] == 3


BAD_REQUESTS = [
    # (body, headers, status, code or None)
    (b"{not json", {}, 400, None),
    (b"[1, 2]", {}, 400, None),
    ({"model": MODEL_NAME}, {}, 400, None),
    ({"model": MODEL_NAME, "messages": []}, {}, 400, None),
    ({"model": MODEL_NAME, "messages": "hi"}, {}, 400, None),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": 5}]}, {}, 400, None),
    ({"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "x"}]}, {}, 400, None),
    ({"model": MODEL_NAME, "messages": [{"role": "user"}]}, {}, 400, None),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}],
      "max_tokens": "8"}, {}, 400, None),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}],
      "max_tokens": 10 ** 6}, {}, 400, None),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}],
      "temperature": -1}, {}, 400, None),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "top_p": 0},
     {}, 400, None),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "n": 3},
     {}, 400, "unsupported_parameter"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "function"}]}, {}, 400, "unsupported_parameter"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "stop": [""]},
     {}, 400, None),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
     {}, 400, None),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, {}, 404,
     "model_not_found"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x" * 3000}]}, {}, 400,
     "context_length_exceeded"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}]},
     {"X-Session-Id": "../../etc"}, 400, "invalid_session_id"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}]},
     {"X-Session-Id": "a" * 129}, 400, "invalid_session_id"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}]},
     {"X-Session-Mode": "sideways"}, 400, None),
    (b"x" * 70000, {}, 413, "request_too_large"),
]


@pytest.mark.parametrize("case", range(len(BAD_REQUESTS)))
def test_bad_requests_get_openai_errors(server, case):
    body, headers, want, code = BAD_REQUESTS[case]
    status, answer = server.request("POST", "/v1/chat/completions", body, headers)
    assert status == want, answer
    err = answer["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err
    if code is not None:
        assert err["code"] == code


def test_unknown_routes_and_methods(server):
    for method, path, want in (("GET", "/nope", 404), ("GET", "/v1/chat/completions", 405),
                               ("PUT", "/v1/sessions/x", 405),
                               ("GET", "/v1/sessions/..%2F..%2Fetc", 404),
                               ("GET", "/v1/sessions/.hidden", 400),
                               ("GET", "/v1/sessions/" + "a" * 200, 400)):
        status, body = server.request(method, path)
        assert status == want and "error" in body, (method, path, status, body)


def _mutations(rng: random.Random, valid: dict):
    """Malformed variants of a valid request body: (bytes, headers)."""
    text = json.dumps(valid)
    junk = [None, True, -1, 2 ** 70, 1e308, "", "x" * 50, [], {}, [[]], {"a": {"b": [1]}},
            float("nan")]
    keys = ["model", "messages", "max_tokens", "temperature", "top_p", "seed", "stop",
            "stream", "n", "stream_options", "max_completion_tokens", "user"]
    for _ in range(60):                                     # wrong types in known fields
        body = json.loads(text)
        body[rng.choice(keys)] = rng.choice(junk)
        yield json.dumps(body).encode(), {}
    for _ in range(60):                                     # broken messages
        body = json.loads(text)
        m = body["messages"][0]
        m[rng.choice(["role", "content", "name"])] = rng.choice(
            junk + [[{"type": "image_url"}], [{"type": "text", "text": 3}], "tool"])
        yield json.dumps(body).encode(), {}
    for _ in range(60):                                     # truncated / flipped bytes
        raw = bytearray(text.encode())
        if rng.random() < 0.5:
            raw = raw[:rng.randrange(len(raw))]
        else:
            for _ in range(rng.randint(1, 5)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
        yield bytes(raw), {}
    for _ in range(50):                                     # random bytes, odd content types
        yield bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))), {
            "Content-Type": rng.choice(["application/json", "text/plain", "x/y"])}
    for _ in range(50):                                     # bad session ids and modes
        sid = "".join(rng.choice("ab./\\%: \t\x7f-_é") for _ in range(rng.randint(0, 140)))
        h = {"X-Session-Id": sid.encode("latin-1", "replace").decode("latin-1")}
        if rng.random() < 0.3:
            h["X-Session-Mode"] = rng.choice(["", "full ", "APPEND", "none"])
        yield text.encode(), h
    nested = "[" * 20000 + "]" * 20000
    yield f'{{"model": "{MODEL_NAME}", "messages": {nested}}}'.encode(), {}
    yield b'{"model": "' + MODEL_NAME.encode() + b'", "messages": [' + b'{"role":"user",' \
        b'"content":"' + b"\\ud800" + b'"}]}', {}


def test_fuzz_then_still_serving_and_sessions_intact(server):
    """A few hundred malformed requests, raw garbage on the socket, then: alive, every
    session unchanged, and a real turn still right."""
    for sid in ("fuzz-a", "fuzz-b"):
        server.chat(sid, [{"role": "user", "content": f"I am {sid}."}])
    sids = [s["id"] for s in server.request("GET", "/v1/sessions")[1]["data"]]
    before = {s: server.session(s)["state_sha256"] for s in sids}
    valid = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
             "max_tokens": 2, "temperature": 0}
    rng = random.Random(1234)
    statuses = {}
    count = 0
    for body, headers in _mutations(rng, valid):
        h = dict(headers)
        if "X-Session-Id" not in h and rng.random() < 0.5:
            h["X-Session-Id"] = rng.choice(sids)             # aimed at real sessions
            h.setdefault("X-Session-Mode", "full")
        status, answer = server.request("POST", "/v1/chat/completions", body, h)
        count += 1
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (body[:200], h, answer)
        if status != 200:
            assert isinstance(answer, dict) and "message" in answer["error"], answer
    garbage = (b"GARBAGE\r\n\r\n", b"\x00\xff" * 100, b"GET / HTTP/9\r\n\r\n",
               b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n{")
    for junk in garbage:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            try:
                sock.recv(4096)
            except OSError:
                pass
        count += 1
    assert count >= 280 and statuses.get(400, 0) > 150
    status, health = server.request("GET", "/health")
    assert server.alive() and status == 200
    assert health["live_turns"] == 0 and health["busy_sessions"] == 0   # nothing held
    # requests aimed at existing sessions were all refused (invalid, or a conflicting
    # "full" history): every session is bit for bit what it was
    assert {s: server.session(s)["state_sha256"] for s in sids} == before
    r1 = server.chat(None, [{"role": "user", "content": "still fine?"}])
    r2 = server.chat(None, [{"role": "user", "content": "still fine?"}])
    assert _text(r1) == _text(r2)


def test_idle_sessions_live_on_disk_only(server):
    """An idle session is its committed version on disk: state + window, nothing else."""
    server.chat("idle", [{"role": "user", "content": "x" * 200}])
    d = server.state_dir / "sessions"
    ns = next(p for p in d.iterdir() if (p / "idle").is_dir())
    files = sorted(f.name for f in (ns / "idle").rglob("*") if f.is_file())
    assert files == ["CURRENT", "arrays.npz", "info.json", "session.json"]
    with np.load(next((ns / "idle").rglob("arrays.npz"))) as z:
        assert z["key_0"].shape[1] == server.session("idle")["window_tokens"] <= WINDOW


def test_load_benchmark_drives_the_server(server):
    """The load benchmark's client (bench serve): concurrent sessions × turns, fixed-length
    replies (ignore_eos), counted and formatted."""
    import time

    from deltamem_jax.tools.bench import common, serve_load

    rows = [serve_load.run_load(server, "bench", 2, 2, 40, 4, concurrent, time.monotonic() + 120)
            for concurrent in (True, False)]
    for r in rows:
        assert r["requests"] == 4 and r["complete"] and r["tokens"] == 16
        assert r["tok_per_s"] > 0 and r["p95_s"] >= r["p50_s"] > 0
        assert r["cpu_s_per_req"] > 0 and 0 < r["busy_frac"] <= 1.0 + 1e-6
        assert r["passes_per_req"] >= 1 and r["rows_per_call"] >= 1
        r["speedup"] = r["tok_per_s"] / rows[-1]["tok_per_s"]
    assert server.session("bench-1")["turns"] == 4          # both runs used the same ids
    table = serve_load.format_table(
        {"rows": rows, "idle": {"sessions": 2, "disk_bytes_per_session": 2048.0,
                                "rss_growth_bytes_per_session": None,
                                "host_cache": server.health()["session_cache"],
                                "host_cache_bytes_per_session": 1024.0},
         "settings": {"model": "tiny", "turns": 2, "chars": 40, "max_tokens": 4, "window": 64,
                      "chunk": 32, "slots": 4, "fsync": True, "repeats": 1,
                      "prefill_rows": 2}}, common.machine_info())
    assert "| batched | 2 | 4 | 16 |" in table and "| sequential | 2 | 4 | 16 |" in table
    assert "2.0 KiB on disk" in table and "1.0 KiB is its host copy" in table
