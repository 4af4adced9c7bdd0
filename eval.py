"""Evaluate a backbone (+ δ-mem adapter): ``python eval.py --config=configs/eval_<task>.py
--config.model.hf_dir=DIR --config.model.adapter=DIR --workdir=OUT``.

Tasks: LoCoMo, HotpotQA, GPQA-Diamond, IFEval, MemoryAgentBench (the authors' protocol),
recall and held-out loss (our memory-only tests); ``--config.protocol=authors|memory_only``.
Per-item records stream to OUT/records/ (a killed run resumes), then OUT/<task>.json, .md
and .png. ``--config.print_prompt=CONV:QA`` prints the exact model input and exits.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Evaluation config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (records, summaries, report).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    from deltamem_jax.evaluation.report import markdown_table
    from deltamem_jax.evaluation.run import evaluate
    from deltamem_jax.evaluation.settings import resolve
    settings = resolve(FLAGS.config)                  # the ConfigDict stops here
    if not FLAGS.workdir and not settings.print_prompt:
        raise app.UsageError("--workdir is required (except with --config.print_prompt)")
    out = evaluate(settings, FLAGS.workdir or "/tmp/deltamem-print-prompt")
    if out.get("rows"):
        print(markdown_table(out["rows"]))


if __name__ == "__main__":
    app.run(main)
