"""Trains K score-model agents, one per data shard, all updated by one train step.

    python train.py --config=configs/hetero.py:cpu --workdir=runs/hetero_cpu
    python train.py --config=configs/hetero.py:smoke --workdir=/tmp/smoke

The config file takes a preset after a colon (smoke, demo, cpu, paper); any field can be
overridden with --config.SECTION.FIELD=VALUE. Running the same command again resumes from the
latest checkpoint in --workdir. Outputs: Orbax checkpoints (workdir/checkpoints), TensorBoard
event files and a console log with loss, steps/s and ETA.
"""

import sys

from absl import flags, logging
from ml_collections import config_flags

from fedinf_jax.core import runtime
from fedinf_jax.workflows import train_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "Training config file with an optional preset, e.g. configs/hetero.py:cpu.",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard summaries.")
flags.mark_flags_as_required(["config", "workdir"])
runtime.define_distributed_flags()


def main(argv):
    runtime.start_distributed_entry_point(argv)
    logging.info("config:\n%s", FLAGS.config)
    try:
        train_lib.train(FLAGS.config, FLAGS.workdir)
    except KeyboardInterrupt:
        logging.warning("interrupted; run the same command again to resume from %s", FLAGS.workdir)
        sys.exit(130)


if __name__ == "__main__":
    runtime.run_entry_point(main)
