"""Evaluate a backbone + δ-mem adapter: ``python eval.py --config=configs/eval_<task>.py
--config.model.hf_dir=DIR --config.model.adapter=DIR --workdir=OUT``.

Tasks: memory recall (exact match / F1), LoCoMo (F1 per category), held-out loss;
each under no memory, δ-mem, and full context. Writes JSON, markdown and a PNG.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Evaluation config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory for the report.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    from deltamem_jax.evaluation.report import markdown_table
    from deltamem_jax.evaluation.run import evaluate
    out = evaluate(FLAGS.config, FLAGS.workdir)
    print(markdown_table(out["rows"]))


if __name__ == "__main__":
    app.run(main)
