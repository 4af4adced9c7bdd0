"""Watching a run: a log line every few steps, TensorBoard events, a JSONL history."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

import jax

log = logging.getLogger("deltamem_jax.train")


class MetricsLogger:
    """Writes on process 0 only. ``log(step, metrics, tokens)`` once per step."""

    def __init__(self, workdir: str, *, total_steps: int, every: int, tensorboard: bool = True):
        self.total = total_steps
        self.every = every
        self.main = jax.process_index() == 0
        self.writer = None
        self.history_file: Optional[str] = None
        if self.main:
            os.makedirs(workdir, exist_ok=True)
            self.history_file = os.path.join(workdir, "metrics.jsonl")
            if tensorboard:
                from tensorboardX import SummaryWriter
                self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._t0 = time.perf_counter()
        self._tokens = 0
        self.start = time.perf_counter()
        self.last: dict = {}

    def log(self, step: int, metrics: dict, tokens: int, extra: Optional[dict] = None) -> None:
        self._tokens += tokens
        if step % self.every and step != self.total:
            return
        values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        values["tokens_per_s"] = self._tokens / elapsed
        values.update(extra or {})
        self._t0, self._tokens = time.perf_counter(), 0
        self.last = values
        if not self.main:
            return
        log.info("step %d/%d | loss %.4f | ce %.4f | acc %.3f | %.0f tok/s | lr %.2e | "
                 "β %.3f | |S| %.3f | grad %.3f", step, self.total, values["loss"], values["ce"],
                 values["accuracy"], values["tokens_per_s"], values["learning_rate"],
                 values["beta_mean"], values["state_norm"], values["grad_norm"])
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
