"""Check this implementation against reference outputs of the authors' δ-mem release.

``python -m deltamem_jax.tools.parity FIXTURE_DIR [--case NAME ...]`` reads
``FIXTURE_DIR/cases/index.json``, runs each case's protocol (dispatching on its
``kind``, never its name) on the backbone and adapter directories it names,
compares every array with the case's tolerances, prints one line per case and
exits non-zero if any case fails. Runs in float32 at full matmul precision.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltamem_jax.checkpoints.pretrained import load_pretrained
from deltamem_jax.memory.layer import MemoryParam
from deltamem_jax.models.cache import KVCache
from deltamem_jax.models.decoder import DecoderLM
from deltamem_jax.models.functional import Runner
from deltamem_jax.training.losses import causal_lm_loss

KINDS: dict[str, Callable] = {}


def kind(name):
    def register(fn):
        KINDS[name] = fn
        return fn
    return register


@dataclasses.dataclass
class ArrayResult:
    name: str
    max_abs_err: float
    ok: bool


@dataclasses.dataclass
class CaseResult:
    name: str
    kind: str
    arrays: list
    notes: list

    @property
    def ok(self) -> bool:
        return all(a.ok for a in self.arrays) and not any(n.startswith("FAIL") for n in self.notes)


# ---------------------------------------------------------------------------
# Protocols: each returns {array name: our value} for the arrays the case stores.


def _states(out_state, like: np.ndarray) -> np.ndarray:
    s = np.asarray(out_state)
    return s[:, :, 0] if like.ndim == 4 else s          # H = 1 is stored squeezed


def _ids(z, name):
    return jnp.asarray(z[name]) if name in z else None


@kind("base")
def _base(run: Runner, z, case):
    out = run(z["input_ids"], attention_mask=_ids(z, "attention_mask"), use_memory=False)
    return {"logits": out.logits}


@kind("single")
def _single(run: Runner, z, case):
    out = run(z["input_ids"], attention_mask=_ids(z, "attention_mask"), write=True)
    return {"logits": out.logits, "states": _states(out.memory_state, z["states"])}


@kind("episode")
def _episode(run: Runner, z, case):
    w = run(z["write_input_ids"], attention_mask=_ids(z, "write_attention_mask"), write=True)
    r = run(z["read_input_ids"], attention_mask=_ids(z, "read_attention_mask"),
            memory_state=w.memory_state, write=False)
    return {"write_logits": w.logits, "read_logits": r.logits,
            "states_after_write": _states(w.memory_state, z["states_after_write"])}


@kind("incremental")
def _incremental(run: Runner, z, case):
    ids = jnp.asarray(z["input_ids"])
    B, T = ids.shape
    p = int(z["prefix_len"])
    full = run(ids, write=True)
    cache = KVCache.init(run.config, B, T)
    out = run(ids[:, :p], cache=cache, write=True)
    logits, state, cache = [out.logits], out.memory_state, out.cache
    for t in range(p, T):
        out = run(ids[:, t:t + 1], cache=cache, memory_state=state, write=True)
        logits.append(out.logits)
        state, cache = out.memory_state, out.cache
    return {"logits_full": full.logits, "states_full": _states(full.memory_state, z["states_full"]),
            "logits_incremental": jnp.concatenate(logits, axis=1),
            "states_incremental": _states(state, z["states_incremental"])}


@kind("span_episode")
def _span_episode(run: Runner, z, case):
    outs, state = {}, None
    for w in ("write1", "write2"):
        o = run(z[f"{w}_input_ids"], attention_mask=_ids(z, f"{w}_attention_mask"),
                memory_state=state, write=True, message_ids=_ids(z, f"{w}_message_ids"),
                sentence_ids=_ids(z, f"{w}_sentence_ids"))
        state = o.memory_state
        outs[f"{w}_logits"] = o.logits
        outs[f"states_after_{w}"] = _states(state, z[f"states_after_{w}"])
    r = run(z["read_input_ids"], attention_mask=_ids(z, "read_attention_mask"),
            memory_state=state, write=False)
    outs["read_logits"] = r.logits
    return outs


@kind("episode_grads")
def _episode_grads(run: Runner, z, case):
    model = run.model()
    graphdef, params, rest = nnx.split(model, MemoryParam, ...)
    write_ids, read_ids, labels = (jnp.asarray(z[k]) for k in
                                   ("write_input_ids", "read_input_ids", "labels"))

    def loss_fn(params):
        m: DecoderLM = nnx.merge(graphdef, params, rest)
        w = m(write_ids, write=True, compute_logits=False)
        r = m(read_ids, memory_state=w.memory_state, write=False)
        return causal_lm_loss(r.logits, labels)[0], (r.logits, w.memory_state)

    (loss, (logits, state)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    nnx.update(model, grads)                         # grads laid out like the parameters
    from deltamem_jax.checkpoints.adapters import adapter_tensors
    out = {"loss": loss, "read_logits": logits,
           "states_after_write": _states(state, z["states_after_write"])}
    out.update({f"grad.{k}": v for k, v in adapter_tensors(model).items()})
    return out


# ---------------------------------------------------------------------------
# Comparison


def _compare(name, ours, ref, spec, z) -> ArrayResult:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return ArrayResult(name, float("inf"), False)
    diff = np.abs(ours - ref)
    where = spec.get("only_where")
    if where:
        mask_name, value = where.split("==")
        mask = np.asarray(z[mask_name]) == int(value)
        mask = mask.reshape(mask.shape + (1,) * (diff.ndim - mask.ndim))
        diff = np.where(mask, diff, 0.0)
        ref = np.where(mask, ref, 0.0)
    err = float(diff.max()) if diff.size else 0.0
    ok = bool(np.all(diff <= spec.get("atol", 0.0) + spec.get("rtol", 0.0) * np.abs(ref)))
    if not ok and "or_per_tensor" in spec:
        ok = err <= 1e-3 * float(np.abs(ref).max())
    return ArrayResult(name, err, ok)


def _spec_for(name, compare):
    if name in compare:
        return compare[name]
    for pattern, spec in compare.items():
        if fnmatch.fnmatchcase(name, pattern):
            return spec
    return None


def run_case(fixture_dir: str, case: dict, models: dict) -> CaseResult:
    z = dict(np.load(os.path.join(fixture_dir, case["file"])))
    key = (case["backbone_dir"], case.get("adapter_dir"))
    if key not in models:
        adapter = case.get("adapter_dir")
        models[key] = Runner(load_pretrained(os.path.join(fixture_dir, case["backbone_dir"]),
                                             os.path.join(fixture_dir, adapter) if adapter
                                             else None))
    run = models[key]
    notes = []
    if "state_layers" in z and list(z["state_layers"]) != list(run.memory_layers):
        notes.append(f"FAIL δ-mem layers {list(run.memory_layers)} != fixture "
                     f"{list(z['state_layers'])}")
    ours = KINDS[case["kind"]](run, z, case)
    results = []
    for name, ref in z.items():
        spec = _spec_for(name, case["compare"])
        if spec is None:
            continue
        if name not in ours:
            results.append(ArrayResult(name, float("inf"), False))
            continue
        results.append(_compare(name, ours[name], ref, spec, z))
    notes += _check_moves(case, ours, z)
    return CaseResult(case["name"], case["kind"], results, notes)


def _check_moves(case, ours, z) -> list[str]:
    """δ-mem cases must not reproduce the backbone: compare the change vs base logits."""
    expected = case.get("rel_change_vs_base")
    if not expected:
        return []
    name = "read_logits" if "read_logits" in ours else (
        "logits_full" if "logits_full" in ours else "logits")
    base = next((z[k] for k in ("base_read_logits", "base_logits") if k in z), None)
    if base is None:
        return []
    mask = z.get("attention_mask")
    ours_l = np.asarray(ours[name])
    m = np.ones(base.shape[:2]) if mask is None or name != "logits" else mask
    diff = np.linalg.norm((ours_l - base) * m[..., None]) / np.linalg.norm(base * m[..., None])
    ok = diff >= 0.5 * float(expected)
    return [f"{'ok' if ok else 'FAIL'} moves logits by {diff:.3f} vs base "
            f"(reference {float(expected):.3f})"]


def run_fixtures(fixture_dir: str, names: list[str] | None = None,
                 echo: Callable[[str], None] = print) -> list[CaseResult]:
    """Run every case (or those named) of a fixture set; print a line per case."""
    index_file = os.path.join(fixture_dir, "cases", "index.json")
    if not os.path.isfile(index_file):
        raise FileNotFoundError(f"no cases/index.json under {fixture_dir!r}")
    with open(index_file) as f:
        index = json.load(f)
    cases = [c for c in index["cases"] if not names or c["name"] in names]
    unknown = sorted({c["kind"] for c in cases} - set(KINDS))
    if unknown:
        raise ValueError(f"unknown case kinds {unknown}; this harness knows {sorted(KINDS)}")
    models: dict = {}
    results = []
    with jax.default_matmul_precision("highest"):
        for case in cases:
            r = run_case(fixture_dir, case, models)
            results.append(r)
            errs = ", ".join(f"{a.name}={a.max_abs_err:.2e}{'' if a.ok else '!'}"
                             for a in r.arrays if not a.name.startswith("grad."))
            grads = [a for a in r.arrays if a.name.startswith("grad.")]
            if grads:
                worst = max(grads, key=lambda a: a.max_abs_err)
                errs += (f", {len(grads)} grads max={worst.max_abs_err:.2e}"
                         f"{'' if all(a.ok for a in grads) else ' FAIL'}")
            extra = "; ".join(r.notes)
            echo(f"{'PASS' if r.ok else 'FAIL'} {r.name} [{r.kind}] {errs}"
                 + (f" ({extra})" if extra else ""))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("fixture_dir")
    parser.add_argument("--case", action="append", help="run only this case (repeatable)")
    args = parser.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    results = run_fixtures(args.fixture_dir, args.case)
    failed = [r.name for r in results if not r.ok]
    print(f"{len(results) - len(failed)}/{len(results)} cases passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
