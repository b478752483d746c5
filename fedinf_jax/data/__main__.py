"""``python -m fedinf_jax.data --mnist_dir=DIR --tfds_data_dir=OUT``: TFDS's own preparation of
``mnist`` from the four IDX files in DIR (``digits.prepare_tfds_mnist``)."""

from absl import app, flags

from fedinf_jax.data import digits

flags.DEFINE_string("mnist_dir", None, "A directory with the four MNIST IDX .gz files.")
flags.DEFINE_string("tfds_data_dir", None, "The TFDS data_dir to prepare 'mnist' in.")
flags.DEFINE_bool(
    "canonical",
    True,
    "Refuse IDX files whose content is not canonical MNIST (their sha256); --nocanonical "
    "prepares any well-formed IDX copy, e.g. a subset, under the name 'mnist'.",
)
flags.mark_flags_as_required(["mnist_dir", "tfds_data_dir"])


def main(argv):
    del argv
    prepared = digits.prepare_tfds_mnist(
        flags.FLAGS.mnist_dir, flags.FLAGS.tfds_data_dir, canonical=flags.FLAGS.canonical
    )
    print(f"TFDS mnist prepared in {prepared}; use it with --config.data.tfds_data_dir={prepared}")


if __name__ == "__main__":
    app.run(main)
