"""Writes the suite's MNIST data (data/README.md) from a full copy of MNIST's IDX files,
or with --check compares the shipped files' IDX content with what the rule gives.

    python data/make_mnist_subset.py --mnist_dir=DIR [--check]

The rule: the first ``NUM_TRAIN`` training and the first ``NUM_TEST`` test examples in IDX order
(``mnist_subset/``), and the two full label files (``mnist_labels/``), all as gzip-compressed IDX
files with no time stamp, so that the same source gives the same bytes.
"""

import gzip
import pathlib
import sys
import tempfile

from absl import app, flags

from fedinf_jax.data import digits

NUM_TRAIN = 6000
NUM_TEST = 1000
HERE = pathlib.Path(__file__).resolve().parent
LABEL_FILES = ("train_labels", "test_labels")

flags.DEFINE_string("mnist_dir", None, "A directory with MNIST's four canonical IDX .gz files.")
flags.DEFINE_bool("check", False, "Compare the shipped files with the rule's instead of writing.")
flags.mark_flag_as_required("mnist_dir")


def write(mnist: digits.Mnist, out: pathlib.Path) -> None:
    subset = digits.Mnist(
        mnist.train_images[:NUM_TRAIN],
        mnist.train_labels[:NUM_TRAIN],
        mnist.test_images[:NUM_TEST],
        mnist.test_labels[:NUM_TEST],
    )
    digits.save_mnist_idx(subset, out / "mnist_subset")
    (out / "mnist_labels").mkdir(parents=True, exist_ok=True)
    for name in LABEL_FILES:
        digits.write_idx(out / "mnist_labels" / digits.IDX_FILES[name], getattr(mnist, name))


def _content(path: pathlib.Path) -> bytes:
    """A file's uncompressed IDX bytes (gzip's own bytes may differ between zlib builds)."""
    with gzip.open(path, "rb") as f:
        return f.read()


def main(argv):
    del argv
    mnist = digits.load_mnist_idx(flags.FLAGS.mnist_dir)
    if not flags.FLAGS.check:
        write(mnist, HERE)
        print(f"wrote {HERE / 'mnist_subset'} and {HERE / 'mnist_labels'}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        write(mnist, pathlib.Path(tmp))
        made = sorted(p.relative_to(tmp) for p in pathlib.Path(tmp).rglob("*.gz"))
        differ = [p for p in made if _content(HERE / p) != _content(pathlib.Path(tmp) / p)]
    for p in made:
        print(f"{p}: {'DIFFERS' if p in differ else 'same IDX content'}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    app.run(main)
