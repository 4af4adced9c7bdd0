"""The CPU demo: δ-mem recalls facts the frozen model no longer sees.

``python -m deltamem_jax.tools.demo [--workdir DIR] [--data DIR]`` runs, offline:

1. data: a seeded synthetic chat set (facts stated early, small talk, then a
   question about one fact), or ``--data DIR`` with your own
   ``train/validation/test.jsonl`` (the last assistant message is the answer);
2. stage 1: a tiny byte-level backbone trained from scratch with the whole
   conversation visible, until it answers from context;
3. stage 2: the backbone frozen, δ-mem attached (rank 8, Δ heads q and o, token
   writes) and trained with the history *only* in memory (SPEC §3 episodes);
4. evaluation on the test split: exact match with no memory (history dropped),
   δ-mem (history written into memory, only the question visible) and full
   context (history in the prompt), as a table, JSON, markdown and a bar chart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

from deltamem_jax.data import load_records
from deltamem_jax.data.synthetic import SyntheticConfig, chance_accuracy, write_synthetic_dataset

log = logging.getLogger("deltamem_jax.tools.demo")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; :meth:`quick` shrinks everything for the test suite."""

    n_train: int = 8000
    n_test: int = 200
    facts: tuple = (1, 2)
    filler_turns: tuple = (0, 1)
    hidden_size: int = 64
    layers: int = 2
    backbone_steps: int = 2000
    backbone_lr: float = 2e-3
    backbone_batch_size: int = 16
    copy_steps: int = 400
    copy_length: int = 64
    copy_fraction: float = 0.25
    reply_weight: float = 4.0
    context_length: int = 176
    memory_steps: int = 1200
    memory_lr: float = 1e-2
    batch_size: int = 32
    max_new_tokens: int = 40
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(n_train=64, n_test=8, hidden_size=32, backbone_steps=4, copy_steps=2,
                   memory_steps=2, batch_size=8, max_new_tokens=8)


def _backbone_config(cfg: DemoConfig):
    from deltamem_jax.models.config import DecoderConfig
    return DecoderConfig(model_type="llama", vocab_size=264, hidden_size=cfg.hidden_size,
                         intermediate_size=4 * cfg.hidden_size, num_hidden_layers=cfg.layers,
                         num_attention_heads=4, num_key_value_heads=4,
                         head_dim=cfg.hidden_size // 4, max_position_embeddings=1024,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)


def make_data(workdir: str, cfg: DemoConfig) -> str:
    out = os.path.join(workdir, "data")
    synth = SyntheticConfig(n_train=cfg.n_train, n_validation=cfg.n_test, n_test=cfg.n_test,
                            facts=tuple(cfg.facts), filler_turns=tuple(cfg.filler_turns),
                            seed=cfg.seed, answer_style="sentence")
    write_synthetic_dataset(out, synth)
    return out


def train_backbone(data_dir: str, workdir: str, cfg: DemoConfig) -> str:
    """Stage 1: pre-train the tiny backbone with everything in context; save it (HF layout)."""
    from deltamem_jax.checkpoints.hf import save_hf_model
    from deltamem_jax.data import ByteTokenizer
    from deltamem_jax.data.tokenizer import save_byte_tokenizer_marker
    from deltamem_jax.training.pretrain import pretrain
    out = os.path.join(workdir, "backbone")
    model = pretrain(_backbone_config(cfg), ByteTokenizer(),
                     load_records(os.path.join(data_dir, "train.jsonl")),
                     steps=cfg.backbone_steps, batch_size=cfg.backbone_batch_size,
                     length=cfg.context_length, learning_rate=cfg.backbone_lr,
                     reply_weight=cfg.reply_weight, copy_fraction=cfg.copy_fraction,
                     copy_steps=cfg.copy_steps, copy_length=cfg.copy_length, seed=cfg.seed,
                     log_every=max(1, cfg.backbone_steps // 12))
    save_hf_model(model, out)
    save_byte_tokenizer_marker(out)
    return out


def train_memory(data_dir: str, backbone: str, workdir: str, cfg: DemoConfig) -> dict:
    """Stage 2: δ-mem on the frozen backbone, history only in memory (train.py's loop)."""
    from deltamem_jax.training import loop
    from deltamem_jax.training.settings import resolve
    from deltamem_jax.training.defaults import demo_config
    c = demo_config()
    c.model.hf_dir = backbone
    c.data.train = os.path.join(data_dir, "train.jsonl")
    c.data.validation = os.path.join(data_dir, "validation.jsonl")
    c.train.steps = cfg.memory_steps
    c.train.batch_size = cfg.batch_size
    c.train.seed = cfg.seed
    c.optim.learning_rate = cfg.memory_lr
    c.train.log_every = max(1, cfg.memory_steps // 12)
    c.checkpoint.every = max(1, cfg.memory_steps)
    return loop.train(resolve(c), os.path.join(workdir, "memory"))


def evaluate(data_dir: str, backbone: str, adapter: str, workdir: str, cfg: DemoConfig,
             progress: bool = True) -> dict:
    """Exact match on the test split under the three settings; writes the report files."""
    from deltamem_jax.checkpoints.adapters import load_adapter
    from deltamem_jax.checkpoints.hf import load_hf_model
    from deltamem_jax.data import ByteTokenizer
    from deltamem_jax.evaluation.recall import evaluate_recall
    from deltamem_jax.evaluation.report import write_report
    from deltamem_jax.models.functional import Runner
    from deltamem_jax.models.summary import parameter_counts
    model = load_hf_model(backbone)
    load_adapter(model, adapter)
    counts = parameter_counts(model)
    test = load_records(os.path.join(data_dir, "test.jsonl"))
    result = evaluate_recall(Runner(model), ByteTokenizer(), test, batch_size=cfg.batch_size,
                             max_new_tokens=cfg.max_new_tokens, max_write_length=256,
                             max_length=64, min_bucket=64, progress=progress)
    per = result["per_setting"]
    results = {
        "no_memory": per["no_memory"]["exact_match"],
        "delta_mem": per["delta_mem"]["exact_match"],
        "full_context": per["full_context"]["exact_match"],
        "chance": chance_accuracy(test, fit=load_records(os.path.join(data_dir, "train.jsonl"))),
        "memory_params": counts["memory"],
        "backbone_params": counts["backbone"],
        "memory_share": counts["memory_share"],
        "n_test": per["delta_mem"]["n"],
        "f1": {k: v["f1"] for k, v in per.items()},
        "examples": result["examples"][:10],
    }
    rows = {k: {"exact_match": per[k]["exact_match"], "token_f1": per[k]["f1"]}
            for k in ("no_memory", "delta_mem", "full_context")}
    write_report(rows, workdir, "demo_table", title="δ-mem CPU demo: answer exact match",
                 meta={k: results[k] for k in ("chance", "memory_params", "backbone_params",
                                               "n_test")}, ylabel="accuracy")
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    return results


def format_table(r: dict) -> str:
    return "\n".join([
        "| setting | exact match |",
        "|---|---|",
        f"| no memory (history dropped) | {r['no_memory']:.3f} |",
        f"| δ-mem (history only in memory) | {r['delta_mem']:.3f} |",
        f"| full context (history in prompt) | {r['full_context']:.3f} |",
        f"| chance (the training set's most frequent answer) | {r['chance']:.3f} |",
        "",
        f"δ-mem parameters: {r['memory_params']:,} = {100 * r['memory_share']:.2f} % of the "
        f"{r['backbone_params']:,}-parameter backbone",
    ])


def run(workdir: str, data: str | None = None, cfg: DemoConfig = DemoConfig(),
        progress: bool = True) -> dict:
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    if data is None:
        log.info("[1/4] synthetic data -> %s", os.path.join(workdir, "data"))
        data = make_data(workdir, cfg)
    else:
        for split in ("train", "validation", "test"):
            if not os.path.isfile(os.path.join(data, f"{split}.jsonl")):
                raise FileNotFoundError(f"--data {data!r} has no {split}.jsonl")
    log.info("[2/4] stage 1: backbone from scratch, everything in context")
    backbone = train_backbone(data, workdir, cfg)
    log.info("[3/4] stage 2: frozen backbone + δ-mem, history only in memory")
    train_memory(data, backbone, workdir, cfg)
    log.info("[4/4] evaluation on the test split")
    results = evaluate(data, backbone, os.path.join(workdir, "memory", "adapter"), workdir, cfg,
                       progress)
    results["seconds"] = time.perf_counter() - start
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="δ-mem CPU demo (offline, ~15 min on 2 cores)")
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--data", default=None,
                        help="directory with train/validation/test.jsonl (chat format)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    results = run(args.workdir, args.data, cfg)
    print()
    print(format_table(results))
    print(f"\n(total {results['seconds'] / 60:.1f} min; files in {args.workdir}: results.json, "
          "demo_table.md, demo_table.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
