"""A ``deltamem-serve`` child process on a free loopback port (for benchmarks and tests).

:class:`ServerProcess` starts the server with ``--port 0 --port-file``, waits until it
is compiled and listening, and can stop, SIGKILL and restart it on the same state
directory. The child asks the kernel to SIGKILL it when its parent dies
(``PR_SET_PDEATHSIG``, Linux), so a crashed benchmark or test leaves no server behind.
:meth:`ServerProcess.request` is a dependency-free HTTP client (``http.client``).
"""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

__all__ = ["ServerProcess"]

# Becomes the server after asking to die with its parent (PR_SET_PDEATHSIG survives exec);
# no preexec_fn, which is unsafe in a process running JAX's threads.
_LAUNCH = ("import ctypes, os, signal, sys\n"
           "try:\n"
           "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
           "except (OSError, AttributeError):\n"
           "    pass\n"
           "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


class ServerProcess:
    """``python -m deltamem_jax.tools.serve`` on 127.0.0.1 with a free port.

    Args:
      model_dir, adapter_dir: what to serve (``adapter_dir`` may be None).
      state_dir: the server's ``--state-dir`` (its log and port file go next to it).
      keys: API keys (``--api-key``); ``request`` sends the first unless told otherwise.
      args: further command-line options.
      env: extra environment variables for the child.
    """

    def __init__(self, model_dir, adapter_dir, state_dir, *, keys: Sequence[str] = (),
                 args: Sequence[str] = (), env: dict[str, str] | None = None,
                 model_name: str = "model"):
        self.state_dir = pathlib.Path(state_dir)
        self.keys = tuple(keys)
        self.model_name = model_name
        self.cmd = [sys.executable, "-c", _LAUNCH, "-m", "deltamem_jax.tools.serve",
                    "--model", str(model_dir), "--state-dir", str(state_dir),
                    "--host", "127.0.0.1", "--port", "0", "--model-name", model_name,
                    *args]
        if adapter_dir is not None:
            self.cmd += ["--adapter", str(adapter_dir)]
        for k in self.keys:
            self.cmd += ["--api-key", k]
        repo = pathlib.Path(__file__).resolve().parents[3]
        self.env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(repo)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.starts = 0
        self.log: pathlib.Path | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 300) -> ServerProcess:
        """Start (or restart) and wait until the server listens; raises with its log tail."""
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
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
            time.sleep(0.05)
        self.port = json.loads(port_file.read_text())["port"]
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM (a graceful shutdown), SIGKILL after 20 s."""
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
            return self.log.read_text(errors="replace")[-n:] if self.log else ""
        except OSError:
            return ""

    def rss_bytes(self) -> int | None:
        """The server's resident memory (Linux)."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except (OSError, AttributeError):
            pass
        return None

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the server has used so far (Linux)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, AttributeError, IndexError, ValueError):
            return None

    def health(self) -> dict:
        """``GET /health`` (no key needed): scheduler counters, session-cache use."""
        status, body = self.request("GET", "/health", key="")
        if status != 200:
            raise RuntimeError(f"/health answered {status}: {body}")
        return body

    # ------------------------------------------------------------------ requests
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def request(self, method: str, path: str, body=None, headers=None, *, key=None,
                timeout: float = 300) -> tuple[int, dict | None]:
        """Raw HTTP; ``body`` bytes are sent as they are, anything else as JSON. Returns
        (status, parsed JSON body or ``{"_raw": ...}``)."""
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
