"""Solver stability study: a grid of solvers, step budgets, schedules and aggregators on a
trained federation, each cell against a tight reference solve of the same draws.

    python study.py --config=configs/study.py:cpu --workdir=runs/hetero_cpu
    python study.py --config=configs/study.py:cpu --workdir=runs/hetero_cpu \\
        --config.study.name=ode_only --config.study.methods='("ode",)'

--workdir is a train.py run. Writes WORKDIR/study/<study.name>/results.json (the config, the
code version and a row per cell) and results.csv; finished cells are kept under cells/ with the
settings that made them, so a rerun computes nothing again, an extended grid only its new cells,
and a cell made with other settings stops the study (or, with --recompute, is solved again). A
bad setting stops with one line, "error: ...", exit status 2, before any checkpoint is read.
"""

from absl import flags
from ml_collections import config_flags

from fedinf_jax.core import runtime
from fedinf_jax.workflows import study_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file with a preset, e.g. configs/study.py:cpu.", lock_config=True
)
flags.DEFINE_string("workdir", None, "A train.py run directory (its agents are studied).")
flags.DEFINE_bool(
    "recompute",
    False,
    "Solve again the cached cells made with other settings (the run's step, the study's draws, "
    "the sampler's or an aggregator's settings); without it such a cell stops the study before "
    "any solve, with an error naming what changed.",
)
flags.mark_flags_as_required(["config", "workdir"])
runtime.define_distributed_flags()


def main(argv):
    runtime.start_distributed_entry_point(argv)
    overrides = config_flags.get_override_values(FLAGS["config"])
    study_lib.run_study(FLAGS.config, FLAGS.workdir, overrides, FLAGS.recompute)


if __name__ == "__main__":
    runtime.run_entry_point(main)
