"""The real server for tests: :class:`deltamem_jax.tools.serve.process.ServerProcess` with the
tests' small settings, plus the official ``openai`` client pointed at it."""

from __future__ import annotations

import openai

from deltamem_jax.tools.serve import process

MODEL_NAME = "tiny"
ARGS = ("--window", "64", "--chunk", "32", "--max-tokens", "16", "--slots", "4",
        "--prefill-rows", "2",
        "--max-prompt-tokens", "2048", "--max-body-bytes", "65536", "--log-level", "warning")


class ServerProcess(process.ServerProcess):
    """A server on 127.0.0.1 (free port) that dies with the test process."""

    def __init__(self, model_dir, adapter_dir, state_dir, *, keys=(), env=None, args=ARGS):
        env = dict(env or {})
        env.setdefault("JAX_PLATFORMS", "cpu")
        # cache every compiled program, however quick, so that restarts skip compiling
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        super().__init__(model_dir, adapter_dir, state_dir, keys=keys, args=args, env=env,
                         model_name=MODEL_NAME)

    def client(self, key: str | None = None, timeout: float = 120) -> openai.OpenAI:
        key = key if key is not None else (self.keys[0] if self.keys else "none")
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0,
                             timeout=timeout)

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
