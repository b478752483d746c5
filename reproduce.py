"""Reproduces the paper's experiment: trains the three regimes and the evaluation classifier,
samples under the paper's procedure and the corrected one with every aggregator, evaluates, and
writes OUTDIR/report.md. Rerunning resumes: finished stages are reused when they were made from
the same settings; one made with other settings stops the run (or, with --recompute, is redone).

    python reproduce.py --config=configs/reproduce.py:cpu --outdir=runs/reproduce_cpu
    python reproduce.py --config=configs/reproduce.py:smoke --outdir=/tmp/reproduce_smoke

Fields of configs/reproduce.py (regimes, procedures, samples per digit, the corrected sampler)
can be overridden with --config.FIELD=VALUE.
"""

from absl import app, flags
from ml_collections import config_flags

from fedinf_jax.core import runtime
from fedinf_jax.workflows import pipeline

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "configs/reproduce.py with a preset: smoke, demo, cpu or paper.",
    lock_config=True,
)
flags.DEFINE_string("outdir", None, "Where every stage writes; a rerun reuses what is there.")
flags.DEFINE_bool(
    "recompute",
    False,
    "Recompute the outputs in --outdir that were made with other settings (each replaced once "
    "its new version is complete). Without it, such an output stops the run before any work "
    "with an error naming the settings that changed. Trained agents are never redone in place.",
)
flags.mark_flags_as_required(["config", "outdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.setup()
    print(f"report: {pipeline.run(FLAGS.config, FLAGS.outdir, FLAGS.recompute)}", flush=True)


if __name__ == "__main__":
    runtime.run_entry_point(main)
