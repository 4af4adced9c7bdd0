"""Watching a run: a log line every few steps, TensorBoard events, a JSONL history."""

from __future__ import annotations

import json
import logging
import math
import os
import time

import jax

log = logging.getLogger("deltamem_jax.train")


def eta_seconds(elapsed: float, done: int, remaining: int) -> float:
    """Seconds left for ``remaining`` steps at the mean rate of the ``done`` so far
    (nan before any step was timed)."""
    return remaining * elapsed / done if done > 0 else float("nan")


def format_duration(seconds: float) -> str:
    """``"1h02m"``, ``"3m07s"`` or ``"42s"``."""
    if math.isnan(seconds):
        return "?"
    s = round(max(seconds, 0.0))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class MetricsLogger:
    """Writes on process 0 only. ``log(step, metrics, tokens)`` once per step."""

    def __init__(self, workdir: str, *, total_steps: int, every: int, tensorboard: bool = True):
        self.total = total_steps
        self.every = every
        self.main = jax.process_index() == 0
        self.writer = None
        self.history_file: str | None = None
        if self.main:
            os.makedirs(workdir, exist_ok=True)
            self.history_file = os.path.join(workdir, "metrics.jsonl")
            if tensorboard:
                from tensorboardX import SummaryWriter
                self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._t0 = time.perf_counter()
        self._tokens = 0
        self.start = time.perf_counter()
        self._first: tuple[int, float] | None = None   # (step, time) of the first log call
        self.last: dict = {}

    def log(self, step: int, metrics: dict, tokens: int, extra: dict | None = None) -> None:
        self._tokens += tokens
        if self._first is None:     # the first step includes compilation: rate from here on
            self._first = (step, time.perf_counter())
        if step % self.every and step != self.total:
            return
        values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        values["tokens_per_s"] = self._tokens / elapsed
        eta = eta_seconds(time.perf_counter() - self._first[1], step - self._first[0],
                          self.total - step)
        if not math.isnan(eta):
            values["eta_s"] = eta
        values.update(extra or {})
        self._t0, self._tokens = time.perf_counter(), 0
        self.last = values
        if not self.main:
            return
        log.info("step %d/%d | loss %.4f | ce %.4f | acc %.3f | %.0f tok/s | lr %.2e | "
                 "β %.3f | |S| %.3f | grad %.3f | eta %s", step, self.total, values["loss"],
                 values["ce"], values["accuracy"], values["tokens_per_s"],
                 values["learning_rate"], values["beta_mean"], values["state_norm"],
                 values["grad_norm"], format_duration(values.get("eta_s", float("nan"))))
        with open(self.history_file, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.main and self.writer is not None:
            self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
