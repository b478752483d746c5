"""MNIST as numpy arrays, from a local IDX directory or from TFDS.

Two sources, one result:

* a directory holding the four standard gzip-compressed IDX files
  (``train-images-idx3-ubyte.gz`` and friends), given as ``data.mnist_dir`` in the config or the
  ``FEDINF_MNIST_DIR`` environment variable;
* TFDS ``mnist`` when no directory is given (it downloads on first use, which needs internet).

IDX layout (LeCun et al.): a big-endian int32 magic (2051 for images, 2049 for labels), an int32
record count, for images two int32 dimensions (rows, cols), then raw uint8 data, row-major.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import zlib
from typing import NamedTuple

import numpy as np

MNIST_DIR_ENV = "FEDINF_MNIST_DIR"
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049


class MnistError(ValueError):
    """A missing, truncated or malformed MNIST file."""


class Mnist(NamedTuple):
    """MNIST splits as host arrays: images uint8 (N, 28, 28), labels int32 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one gzip-compressed IDX file (images or labels).

    Args:
      path: a ``.gz`` IDX file.

    Returns:
      uint8 array, (N, rows, cols) for images or (N,) for labels.

    Raises:
      MnistError: the file is missing, not gzip, has an unknown magic number or is truncated.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise MnistError(f"MNIST file not found: {path}")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise MnistError(f"MNIST file {path} is not a complete gzip file: {e}") from e
    if len(raw) < 8:
        raise MnistError(f"MNIST file {path} is truncated: {len(raw)} bytes, no IDX header")
    magic, count = np.frombuffer(raw[:8], dtype=">i4")
    if magic == _IMAGES_MAGIC:
        if len(raw) < 16:
            raise MnistError(f"MNIST file {path} is truncated: image header incomplete")
        rows, cols = np.frombuffer(raw[8:16], dtype=">i4")
        shape, offset = (int(count), int(rows), int(cols)), 16
    elif magic == _LABELS_MAGIC:
        shape, offset = (int(count),), 8
    else:
        raise MnistError(
            f"MNIST file {path} has magic number {int(magic)}; valid IDX magics are "
            f"{_IMAGES_MAGIC} (images) and {_LABELS_MAGIC} (labels)"
        )
    expected = int(np.prod(shape))
    if len(raw) - offset != expected:
        raise MnistError(
            f"MNIST file {path} is truncated or padded: header promises {expected} data bytes "
            f"for shape {shape}, file has {len(raw) - offset}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def load_mnist_idx(directory: str | os.PathLike) -> Mnist:
    """Loads MNIST from a directory with the four standard IDX ``.gz`` files.

    Raises:
      MnistError: the directory or one of its files is missing or malformed (names the file), or
        images and labels disagree in count.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise MnistError(f"MNIST directory not found: {directory}")
    arrays = {name: read_idx(directory / fname) for name, fname in IDX_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1:
            raise MnistError(
                f"MNIST {split} files in {directory} have swapped or wrong kinds: images "
                f"{images.shape}, labels {labels.shape}"
            )
        if images.shape[0] != labels.shape[0]:
            raise MnistError(
                f"MNIST {split} split in {directory}: {images.shape[0]} images but "
                f"{labels.shape[0]} labels"
            )
    return Mnist(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int32),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int32),
    )


def load_mnist_tfds(data_dir: str | None = None) -> Mnist:
    """Loads MNIST through TFDS (``tfds.load('mnist')``), downloading it on first use."""
    import tensorflow_datasets as tfds

    splits = {}
    for split in ("train", "test"):
        # Batched iteration rather than batch_size=-1, which aborts inside TF under mock_data.
        ds = tfds.load("mnist", split=split, data_dir=data_dir, as_supervised=True)
        parts = list(tfds.as_numpy(ds.batch(10_000)))
        images = np.concatenate([im for im, _ in parts])[..., 0].astype(np.uint8)
        labels = np.concatenate([lb for _, lb in parts]).astype(np.int32)
        splits[split] = (images, labels)
    return Mnist(*splits["train"], *splits["test"])


def resolve_mnist_dir(mnist_dir: str | None) -> str | None:
    """The IDX directory to use: the given one, else ``$FEDINF_MNIST_DIR``, else None (TFDS)."""
    return mnist_dir or os.environ.get(MNIST_DIR_ENV) or None


def load_mnist(mnist_dir: str | None = None) -> Mnist:
    """Loads MNIST from ``mnist_dir`` / ``$FEDINF_MNIST_DIR`` if set, else from TFDS."""
    directory = resolve_mnist_dir(mnist_dir)
    if directory:
        return load_mnist_idx(directory)
    return load_mnist_tfds()


def to_model_input(images: np.ndarray, centered: bool = True) -> np.ndarray:
    """uint8 (..., 28, 28) -> float32 (..., 28, 28, 1) in [-1, 1] (centered) or [0, 1]."""
    x = images.astype(np.float32)[..., None] / 255.0
    return 2.0 * x - 1.0 if centered else x
