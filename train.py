"""Train δ-mem on a frozen backbone: ``python train.py --config=configs/<name>.py --workdir=DIR``.

Any config field can be overridden (``--config.train.steps=50``). ``--dry_run``
compiles the train step for the configured mesh without weights and prints the
parameter counts and per-device memory.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, adapter).")
flags.DEFINE_bool("dry_run", False, "Compile the train step without weights; print sizes.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)      # orbax's per-save chatter
    from deltamem_jax.training import loop
    from deltamem_jax.training.settings import resolve
    settings = resolve(FLAGS.config, need_data=not FLAGS.dry_run)   # the ConfigDict stops here
    if FLAGS.dry_run:
        print(loop.format_dry_run(loop.dry_run(settings)))
        return
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required (except with --dry_run)")
    loop.train(settings, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
