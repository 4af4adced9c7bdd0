"""Orbax checkpoints of the δ-mem train state (never the frozen backbone).

Each checkpoint holds the memory parameters, optimiser state, step and RNG (one
pytree), the data iterator's position and a little metadata (JSON). Orbax writes
into ``<step>.orbax-checkpoint-tmp`` and renames it when complete, so a run
killed mid-save leaves the previous checkpoint as the latest. Restoring takes
abstract targets with the *current* mesh's shardings, so a run can resume on a
different mesh shape than the one that saved.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Save every ``every`` steps (and when forced), keep the last ``keep``."""

    def __init__(self, directory: str, *, every: int, keep: int):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        if step in self.manager.all_steps():
            return False
        saved = self.manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)))
        if saved:
            log.info("checkpoint %d -> %s", step, self.directory)
        return saved

    def restore_latest(self, abstract_state) -> tuple[Any, dict, dict] | None:
        """(state, data position, metadata) of the latest checkpoint, or None."""
        step = self.manager.latest_step()
        if step is None:
            return None
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["data"]), dict(out["meta"])

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
