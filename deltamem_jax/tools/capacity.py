"""Capacity study: δ-mem recall vs the number of facts written, by rank and write mode.

``python -m deltamem_jax.tools.capacity --backbone runs/demo_tiny/backbone --workdir runs/capacity``
(a byte-level backbone, e.g. from ``deltamem-demo --backbone tiny --workdir runs/demo_tiny``)
trains δ-mem on that frozen backbone once per (rank, write granularity) on
synthetic chats holding ``--train-facts`` facts (default 1–2, the demo's), then scores exact
match on test sets with exactly n facts for each n in ``--facts``. The full-context
row is the backbone's own in-context recall on the same tests. Writes
``capacity.json``, ``capacity.md`` and ``capacity.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from deltamem_jax.data.synthetic import SyntheticConfig, generate_split, write_synthetic_dataset

log = logging.getLogger("deltamem_jax.tools.capacity")

# Study names for the write modes -> ``memory_write_granularity`` values.
WRITE_MODES = {"token": "token", "message": "message_mean"}


def make_data(out: str, train_facts: tuple, facts: Sequence[int], n_train: int, n_test: int,
              seed: int) -> dict:
    """Train/validation jsonl with ``train_facts`` (lo, hi) facts; a test list per count."""
    write_synthetic_dataset(out, SyntheticConfig(
        n_train=n_train, n_validation=n_test, n_test=n_test, facts=tuple(train_facts),
        filler_turns=(0, 1), seed=seed, answer_style="sentence"))
    return {n: generate_split(n_test, "test", SyntheticConfig(
        facts=(n, n), filler_turns=(0, 1), seed=seed + 1000 + n, answer_style="sentence"))
        for n in facts}


def train_variant(backbone: str, data_dir: str, workdir: str, *, rank: int, write: str,
                  steps: int, batch_size: int, learning_rate: float, max_write_length: int,
                  seed: int) -> str:
    """Stage 2 of the demo with another rank / write granularity; returns the adapter dir."""
    from deltamem_jax.training import loop
    from deltamem_jax.training.defaults import demo_config
    from deltamem_jax.training.settings import resolve
    c = demo_config()
    c.model.hf_dir = backbone
    c.data.train = os.path.join(data_dir, "train.jsonl")
    c.data.validation = ""
    c.data.max_write_length = max_write_length
    c.data.num_buckets = 2
    c.memory.rank = rank
    c.memory.memory_write_granularity = WRITE_MODES[write]
    c.train.steps = steps
    c.train.batch_size = batch_size
    c.train.seed = seed
    c.train.log_every = max(1, steps // 6)
    c.optim.learning_rate = learning_rate
    c.checkpoint.every = steps
    c.checkpoint.keep = 1
    c.logging.tensorboard = False
    loop.train(resolve(c), workdir)
    return os.path.join(workdir, "adapter")


def score(backbone: str, adapter: str | None, tests: dict, *, setting: str,
          max_write_length: int, batch_size: int) -> dict:
    """Exact match per fact count under ``setting`` (``delta_mem`` or ``full_context``)."""
    from deltamem_jax.checkpoints.adapters import load_adapter
    from deltamem_jax.checkpoints.hf import load_hf_model
    from deltamem_jax.data import ByteTokenizer
    from deltamem_jax.evaluation.recall import evaluate_recall
    from deltamem_jax.models.functional import Runner
    model = load_hf_model(backbone)
    if adapter:
        load_adapter(model, adapter)
    runner, out = Runner(model), {}
    for n, records in tests.items():
        res = evaluate_recall(runner, ByteTokenizer(), records, settings=(setting,),
                              batch_size=batch_size, max_new_tokens=40,
                              max_write_length=max_write_length, max_length=64, min_bucket=64,
                              max_context_length=max_write_length + 64, progress=False)
        out[n] = res["per_setting"][setting]["exact_match"]
        log.info("  %s, %d facts: exact match %.3f", setting, n, out[n])
    return out


def format_markdown(res: dict) -> str:
    facts = res["facts"]
    lo, hi = res["train_facts"]
    lines = [f"δ-mem exact match by number of facts written (each variant trained "
             f"{res['steps']} steps × {res['batch_size']} episodes on chats with {lo}–{hi} "
             f"facts; {res['n_test']} test conversations per count; {res['minutes']:.0f} min "
             "in all)", "",
             "| variant | " + " | ".join(f"{n} facts" for n in facts) + " |",
             "|---|" + "---|" * len(facts)]
    for name, row in res["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[str(n)]:.2f}" for n in facts) + " |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, row in res["rows"].items():
        style = "k--" if name.startswith("full") else ("o-" if "token" in name else "s:")
        ax.plot(res["facts"], [row[str(n)] for n in res["facts"]], style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(res["facts"], [str(n) for n in res["facts"]])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("facts written into memory")
    ax.set_ylabel("exact match")
    ax.set_title("δ-mem capacity on the demo backbone")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(backbone: str, workdir: str, *, ranks=(4, 8, 16), writes=("token", "message"),
        facts=(1, 2, 3, 4, 8, 16), train_facts=(1, 2), steps: int = 1200, batch_size: int = 32,
        learning_rate: float = 1e-2, n_train: int = 8000, n_test: int = 64,
        max_write_length: int = 704, seed: int = 0) -> dict:
    bad = [w for w in writes if w not in WRITE_MODES]
    if bad:   # before any work: the full-context row alone takes minutes
        raise ValueError(f"write mode {bad[0]!r} is not one of {sorted(WRITE_MODES)}")
    start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    data_dir = os.path.join(workdir, "data")
    tests = make_data(data_dir, train_facts, facts, n_train, n_test, seed)
    rows = {}
    common = dict(max_write_length=max_write_length, batch_size=32)
    log.info("full context (the backbone's in-context upper bound)")
    rows["full context"] = score(backbone, None, tests, setting="full_context", **common)
    for write in writes:
        for rank in ranks:
            name = f"rank {rank}, {write} writes"
            log.info("%s: training %d steps", name, steps)
            adapter = train_variant(backbone, data_dir, os.path.join(workdir, f"r{rank}_{write}"),
                                    rank=rank, write=write, steps=steps, batch_size=batch_size,
                                    learning_rate=learning_rate,
                                    max_write_length=max_write_length, seed=seed)
            rows[name] = score(backbone, adapter, tests, setting="delta_mem", **common)
    res = {"facts": list(facts), "train_facts": list(train_facts), "steps": steps,
           "batch_size": batch_size, "n_test": n_test,
           "minutes": (time.perf_counter() - start) / 60,
           "rows": {k: {str(n): v for n, v in r.items()} for k, r in rows.items()}}
    with open(os.path.join(workdir, "capacity.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(workdir, "capacity.md"), "w") as f:
        f.write(format_markdown(res))
    plot(res, os.path.join(workdir, "capacity.png"))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", required=True,
                   help="a frozen byte-level backbone dir (deltamem-demo --backbone tiny)")
    p.add_argument("--workdir", default="runs/capacity")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--writes", nargs="+", default=list(WRITE_MODES), choices=list(WRITE_MODES))
    p.add_argument("--facts", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16])
    p.add_argument("--train-facts", type=int, nargs=2, default=[1, 2], metavar=("LO", "HI"),
                   help="facts per training conversation (inclusive range)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-test", type=int, default=64)
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.backbone, "config.json")):
        p.error(f"--backbone {args.backbone!r} has no config.json (run the demo first)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    res = run(args.backbone, args.workdir, ranks=tuple(args.ranks), writes=tuple(args.writes),
              facts=tuple(args.facts), train_facts=tuple(args.train_facts), steps=args.steps,
              batch_size=args.batch_size, n_test=args.n_test)
    print(format_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
