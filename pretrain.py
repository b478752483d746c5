"""Trains the runs shipped in pretrained/<preset>/ and writes them there: the reproduction's three
regimes (control, homogeneous, heterogeneous) at the preset and its evaluation classifier.

    python pretrain.py                     # make pretrained: pretrained/cpu (hours on 2 cores)
    python pretrain.py --preset=smoke --workdir=/tmp/pretrain --dest=/tmp/shipped

Each run is trained under --workdir/<name> exactly as train.py would train it (its record names
that train.py command), resumably: run the same command again to go on. Once trained, a
federation's EMA parameters (a classifier's checkpoint) are written to --dest/<name> with
pretrained.json: the commands, the resolved config, the partition's count matrix, the step, the
code's commit, a digest of the arrays and a sha256 per file (fedinf_jax/workflows/pretrain_lib.py
writes them, fedinf_jax/agents/pretrained.py verifies them). Where
--dest already ships a run, the log says whether the regenerated arrays are bitwise the shipped
ones before replacing it. MNIST is read as train.py reads it.

    python pretrain.py --runs=control --check_steps=50

checks instead that the first 50 steps of each shipped federation's recorded training (in a
temporary folder) log the loss its record holds at step 50: minutes, where regenerating takes hours.
"""

import os
import shlex
import sys

from absl import app, flags, logging

from configs import reproduce as reproduce_config
from fedinf_jax.core import runtime
from fedinf_jax.evaluation import classifier
from fedinf_jax.workflows import pipeline, pretrain_lib, train_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "cpu", "The regimes' preset (configs/base.py).")
flags.DEFINE_string("workdir", None, "Where the runs are trained (default runs/pretrain_PRESET).")
flags.DEFINE_string("dest", None, "Where they are shipped (default pretrained/PRESET).")
flags.DEFINE_list(
    "runs",
    ["classifier", *reproduce_config.REGIME_FILES],
    "Which runs, in this order: classifier, control, homogeneous, heterogeneous.",
)
flags.DEFINE_integer(
    "check_steps",
    0,
    "> 0: train nothing; check that this many first steps of each shipped federation's recorded "
    "training reproduce the loss logged at that step (a multiple of its train.log_every).",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = reproduce_config.get_config(FLAGS.preset)
    valid = ["classifier", *reproduce_config.REGIME_FILES]
    unknown = [name for name in FLAGS.runs if name not in valid]
    if unknown:
        raise app.UsageError(f"unknown runs {unknown}; valid: {valid}")
    runtime.setup()
    workdir = FLAGS.workdir or os.path.join("runs", f"pretrain_{FLAGS.preset}")
    dest = FLAGS.dest or os.path.join("pretrained", FLAGS.preset)
    command = shlex.join(["python", *sys.argv])
    if FLAGS.check_steps > 0:
        checked = [
            pretrain_lib.check_first_steps(os.path.join(dest, name), FLAGS.check_steps)
            for name in FLAGS.runs
            if name != "classifier"
        ]
        sys.exit(0 if all(checked) else 1)
    for name in FLAGS.runs:
        source, target = os.path.join(workdir, name), os.path.join(dest, name)
        if name == "classifier":
            classifier.train_classifier(pipeline.classifier_config(config), source)
            record = {"command": command}
            manifest = pretrain_lib.export_classifier(source, target, FLAGS.preset, record)
        else:
            cfg = pipeline.regime_config(config, name)
            if (train_lib.check_workdir(cfg, source) or 0) < cfg.train.num_steps:
                train_lib.train(cfg, source)
            file = reproduce_config.REGIME_FILES[name].__name__.rpartition(".")[2]
            record = {
                "command": command,
                "train_command": f"python train.py --config=configs/{file}.py:{FLAGS.preset} "
                f"--workdir={source}",
            }
            manifest = pretrain_lib.export_federation(source, target, FLAGS.preset, name, record)
        logging.info(
            "shipped %s: %s (%d files, arrays %s)",
            name,
            target,
            len(manifest["files"]),
            manifest["params_sha256"][:12],
        )


if __name__ == "__main__":
    runtime.run_entry_point(main)
