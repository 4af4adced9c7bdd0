"""A real ``deltamem-serve`` process for tests: started on 127.0.0.1 with a free port, the
official ``openai`` client pointed at it, raw HTTP for what a client library would refuse to
send, SIGKILL and restart. The process dies with the test process (PR_SET_PDEATHSIG) and is
bounded in time by the callers' timeouts."""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import openai

REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL_NAME = "tiny"


# The server process asks the kernel to SIGKILL it when the test process dies
# (PR_SET_PDEATHSIG, kept across exec), then becomes the server: no preexec_fn (unsafe in a
# process with JAX's threads).
_LAUNCH = ("import ctypes, os, signal, sys; "
           "ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGKILL); "
           "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


class ServerProcess:
    """``python -m deltamem_jax.tools.serve`` on a free loopback port."""

    def __init__(self, model_dir, adapter_dir, state_dir, *, keys=(), env=None,
                 args=("--window", "64", "--chunk", "32", "--max-tokens", "16",
                       "--slots", "4", "--max-prompt-tokens", "2048",
                       "--max-body-bytes", "65536")):
        self.state_dir = pathlib.Path(state_dir)
        self.keys = tuple(keys)
        self.cmd = [sys.executable, "-c", _LAUNCH, "-m", "deltamem_jax.tools.serve", "--model", str(model_dir),
                    "--state-dir", str(state_dir), "--host", "127.0.0.1", "--port", "0",
                    "--model-name", MODEL_NAME, "--log-level", "warning", *args]
        if adapter_dir is not None:
            self.cmd += ["--adapter", str(adapter_dir)]
        for k in self.keys:
            self.cmd += ["--api-key", k]
        self.env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.env["JAX_PLATFORMS"] = "cpu"
        # cache every compiled program, however quick, so that restarts skip compiling
        self.env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None
        self.port = None
        self.starts = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 180) -> ServerProcess:
        port_file = self.state_dir.parent / f"{self.state_dir.name}.port.json"
        port_file.unlink(missing_ok=True)
        self.log = self.state_dir.parent / f"{self.state_dir.name}.log{self.starts}"
        self.starts += 1
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd + ["--port-file", str(port_file)],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not port_file.is_file():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server not ready in {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)
        self.port = json.loads(port_file.read_text())["port"]
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ clients
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str | None = None, timeout: float = 120) -> openai.OpenAI:
        key = key if key is not None else (self.keys[0] if self.keys else "none")
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0,
                             timeout=timeout)

    def request(self, method: str, path: str, body=None, headers=None, *, key=None,
                timeout: float = 60) -> tuple[int, dict | None]:
        """Raw HTTP; ``body`` may be bytes (sent as is) or JSON-able. Returns (status, json)."""
        h = dict(headers or {})
        key = key if key is not None else (self.keys[0] if self.keys else None)
        if key:
            h.setdefault("Authorization", f"Bearer {key}")
        if body is not None and not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=h)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            parsed = {"_raw": data[:200].decode(errors="replace")}
        return resp.status, parsed

    def session(self, sid: str, key=None) -> dict | None:
        status, body = self.request("GET", f"/v1/sessions/{sid}", key=key)
        return body if status == 200 else None

    def chat(self, sid, messages, *, key=None, mode=None, **kw):
        """One non-streamed turn with the openai client (greedy unless told otherwise)."""
        headers = {}
        if sid is not None:
            headers["X-Session-Id"] = sid
        if mode:
            headers["X-Session-Mode"] = mode
        kw.setdefault("temperature", 0)
        kw.setdefault("max_tokens", 8)
        return self.client(key).chat.completions.create(
            model=MODEL_NAME, messages=messages, extra_headers=headers, **kw)
