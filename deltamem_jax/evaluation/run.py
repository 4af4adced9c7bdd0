"""``evaluate(settings, workdir)``: what eval.py calls.

Resolves the config once (:func:`settings.resolve`), starts the distributed runtime when
asked, builds a mesh over this process's devices (batch rows over its ``data`` axis),
loads the model once, then for each setting runs the task's items through the engine
(streamed, resumable records) and, on process 0, writes the summaries and the report
(``WORKDIR/<task>.json``, ``.md``, ``.png``). A finished run with the same configuration
is not run again.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from pathlib import Path

import jax
from jax.sharding import AxisType

from deltamem_jax.evaluation.engine import RecordStore, Shard, check_fingerprint, collect, run_items
from deltamem_jax.evaluation.report import write_json, write_report
from deltamem_jax.evaluation.settings import EvalSettings
from deltamem_jax.utils.atomic import atomic_write_json
from deltamem_jax.utils.sharding import logical_rules

log = logging.getLogger("deltamem_jax.eval")

__all__ = ["RULES", "eval_mesh", "evaluate", "task_class"]

_TASKS = {
    "locomo": "deltamem_jax.evaluation.locomo_task:LocomoTask",
    "recall": "deltamem_jax.evaluation.chat_tasks:RecallTask",
    "perplexity": "deltamem_jax.evaluation.chat_tasks:PerplexityTask",
    "hotpotqa": "deltamem_jax.evaluation.hotpotqa:HotpotQATask",
    "gpqa": "deltamem_jax.evaluation.gpqa:GPQATask",
    "ifeval": "deltamem_jax.evaluation.ifeval:IFEvalTask",
    "memory_agent_bench": "deltamem_jax.evaluation.mab:MABTask",
}
#: batch rows over the mesh's data axis; weights replicated (one model per device)
RULES = (("batch", "data"),)
#: fields that change nothing in the numbers (how a run is driven, not what it computes)
_DRIVING = ("progress", "print_prompt", "resume", "mesh_data", "distributed")


def task_class(name: str):
    module, _, cls = _TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def _initialize(s: EvalSettings) -> Shard:
    d = s.distributed
    if d.initialize and not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        kwargs = {}
        if d.coordinator_address:
            kwargs = dict(coordinator_address=d.coordinator_address,
                          num_processes=d.num_processes, process_id=d.process_id)
        jax.distributed.initialize(**kwargs)
    return Shard(jax.process_index(), jax.process_count())


def eval_mesh(data: int = -1, batch_size: int = 1) -> jax.sharding.Mesh:
    """A one-axis ``data`` mesh over this process's first ``data`` devices (-1 = as many
    local devices as divide ``batch_size``)."""
    devices = jax.local_devices()
    n = data
    if data == -1:
        n = max(k for k in range(1, len(devices) + 1) if batch_size % k == 0)
    if n > len(devices):
        raise ValueError(f"config.mesh.data: {n} devices asked, {len(devices)} available here")
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=devices[:n])


def _barrier(name: str, shard: Shard) -> None:
    if shard.world > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def evaluate(settings: EvalSettings, workdir: str) -> dict:
    """Run the configured evaluation; returns ``{"rows", "summaries", "files"}`` (process 0)
    or ``{"printed": text}`` for ``print_prompt``. ``settings`` come from
    :func:`~deltamem_jax.evaluation.settings.resolve` (the ConfigDict stops at eval.py)."""
    if not isinstance(settings, EvalSettings):
        raise TypeError(f"evaluate takes EvalSettings, got {type(settings).__name__}; resolve "
                        "a config first: deltamem_jax.evaluation.settings.resolve(config)")
    s = settings
    shard = _initialize(s)
    mesh = eval_mesh(s.mesh_data, s.batch_size)
    n_data = mesh.shape["data"]
    if s.batch_size % n_data:
        raise ValueError(f"config.batch_size: {s.batch_size} is not a multiple of the "
                         f"{n_data} devices on the mesh's data axis (config.mesh.data)")
    out_dir = Path(workdir)
    final = out_dir / f"{s.task}.json"
    fingerprint = {k: v for k, v in s.to_dict().items() if k not in _DRIVING}
    if not s.print_prompt and s.resume and final.is_file():
        done = json.loads(final.read_text())
        if done.get("meta", {}).get("fingerprint") == json.loads(json.dumps(fingerprint)):
            log.info("%s: finished already (%s); nothing to do", s.task, final)
            return {"rows": done["results"], "summaries": done["meta"].get("summaries", {}),
                    "files": {"json": str(final)}, "skipped": True}
    from deltamem_jax.evaluation.loading import load_eval_model

    with jax.set_mesh(mesh), logical_rules(RULES):
        t0 = time.time()
        em = load_eval_model(s, mesh, RULES)
        task = task_class(s.task)(s, em)
        if s.print_prompt:
            text = "\n".join(task.render(s.print_prompt, st) for st in s.settings)
            print(text)
            return {"printed": text}
        log.info("%s (%s protocol): %d items, settings %s, %d process(es) x %d device(s); "
                 "model loaded in %.1fs", s.task, s.protocol, len(task.keys()), s.settings,
                 shard.world, n_data, time.time() - t0)
        if shard.rank == 0:
            check_fingerprint(out_dir, fingerprint, s.resume)
        _barrier("deltamem-eval-start", shard)
        store, keys, timing = RecordStore(out_dir), task.keys(), {}
        for setting in s.settings:
            t = time.time()
            run_items(setting, keys, lambda idx, st=setting: task.run_batch(st, idx),
                      store=store, batch_size=s.batch_size, shard=shard, resume=s.resume,
                      progress=s.progress and shard.rank == 0, desc=f"{s.task} {setting}")
            timing[setting] = round(time.time() - t, 2)
        _barrier("deltamem-eval-done", shard)
    if shard.rank != 0:
        return {"rows": {}, "summaries": {}, "files": {}}
    summaries, rows = {}, {}
    for setting in s.settings:
        records = collect(store, setting, keys)
        summaries[setting] = task.summarize(records)
        rows[setting] = task.report_row(summaries[setting])
        atomic_write_json(out_dir / "summaries" / f"{s.task}.{setting}.json",
                          {"setting": setting, "summary": summaries[setting]})
    meta = {"task": s.task, "protocol": s.protocol, "settings": list(s.settings),
            "seconds_this_run": timing, **task.meta()}
    files = write_report(rows, out_dir, s.task, title=task.title, meta=meta)
    write_json({"title": task.title, "results": rows,
                "meta": {**meta, "fingerprint": fingerprint, "summaries": summaries}}, final)
    log.info("%s -> %s", task.title, files["markdown"])
    return {"rows": rows, "summaries": summaries, "files": {k: str(v) for k, v in files.items()}}
