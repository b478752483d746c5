"""Evaluates sample sets with a reproduction's classifier: IS, FID against the MNIST test set,
label accuracy, noise rate, precision and recall (the pipeline's Table 1 metrics).

    python evaluate.py --classifier=runs/reproduce_cpu/classifier \\
        runs/reproduce_cpu/heterogeneous/samples/superdiff_or runs/hetero_t05

Each argument is a sample set: the --outdir of sample.py or a <regime>/samples/<procedure> folder
of reproduce.py. Prints Table 1's rows for them and writes each set's metrics to
SAMPLE_DIR/metrics.json (--nowrite_metrics: prints only, writing nothing, e.g. for the sets
committed under docs/). MNIST is read from --mnist_dir, else $FEDINF_MNIST_DIR, else TFDS
(--tfds_data_dir).
"""

import os

from absl import app, flags

from fedinf_jax.core import files, runtime
from fedinf_jax.data import digits
from fedinf_jax.evaluation import report, sample_sets

FLAGS = flags.FLAGS
flags.DEFINE_string("classifier", None, "The classifier/ folder of a reproduce.py run.")
flags.DEFINE_string("mnist_dir", None, "MNIST IDX folder (default $FEDINF_MNIST_DIR, else TFDS).")
flags.DEFINE_string(
    "tfds_data_dir", None, "TFDS data_dir for 'mnist' without an IDX folder (default TFDS's own)."
)
flags.DEFINE_bool(
    "write_metrics", True, "Write each set's metrics.json beside its samples (else print only)."
)
flags.mark_flags_as_required(["classifier"])


def evaluate(
    classifier_dir: str, sample_dirs: list[str], mnist: digits.Mnist, write: bool = True
) -> dict[str, dict]:
    """Each sample set's metrics (``sample_sets.evaluate_sample_dir``), also written to its
    ``metrics.json`` when ``write``. Every folder is checked before anything is computed or
    written."""
    for sample_dir in sample_dirs:
        sample_sets.check_sample_dir(sample_dir)
    clf, real = sample_sets.load_evaluator(classifier_dir, mnist)
    results = {}
    for sample_dir in sample_dirs:
        results[sample_dir] = sample_sets.evaluate_sample_dir(clf, real, sample_dir)
        if write:
            files.write_json(
                os.path.join(sample_dir, "metrics.json"),
                dict(results[sample_dir], classifier=classifier_dir),
            )
    return results


def main(argv):
    if len(argv) < 2:
        raise app.UsageError("give one or more sample set folders (sample.py's --outdir)")
    runtime.setup()
    mnist = digits.load_mnist(FLAGS.mnist_dir, FLAGS.tfds_data_dir)
    results = evaluate(FLAGS.classifier, argv[1:], mnist, FLAGS.write_metrics)
    print("\n".join(report.metrics_table(["sample set"], [([d], r) for d, r in results.items()])))


if __name__ == "__main__":
    runtime.run_entry_point(main)
