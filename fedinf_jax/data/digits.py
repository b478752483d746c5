"""MNIST as numpy arrays, from a local IDX directory or from TFDS.

Two sources, one result (the same 70,000 images and labels, bitwise):

* a directory holding the four standard gzip-compressed IDX files
  (``train-images-idx3-ubyte.gz`` and friends), given as ``data.mnist_dir`` in the config or the
  ``FEDINF_MNIST_DIR`` environment variable;
* TFDS ``mnist`` when no directory is given, read from ``data.tfds_data_dir`` (empty: TFDS's own
  default, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). TFDS prepares it there on first use,
  which downloads and so needs internet; without a prepared copy and without a route to the
  download host, loading stops at once with an error naming the ways to provide the data.

``prepare_tfds_mnist`` (``python -m fedinf_jax.data``) runs TFDS's own preparation of ``mnist``
offline from a local IDX copy, for machines that have the files but no internet.

IDX layout (LeCun et al.): a big-endian int32 magic (2051 for images, 2049 for labels), an int32
record count, for images two int32 dimensions (rows, cols), then raw uint8 data, row-major.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import socket
import tempfile
import threading
import urllib.parse
import urllib.request
import zlib
from typing import NamedTuple

import numpy as np

from fedinf_jax.core import runtime
from fedinf_jax.core.errors import UserError

MNIST_DIR_ENV = "FEDINF_MNIST_DIR"
NUM_CLASSES = 10
TRAIN_CLASS_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
"""Examples of each digit in MNIST's 60,000 training images (a partition's count matrix
depends on the labels only through these)."""
IMAGE_SHAPE = (28, 28, 1)

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# sha256 of the four canonical uncompressed IDX files (LeCun et al.'s). TFDS registers checksums of
# the .gz archives, which depend on the gzip wrapper; these identify the data itself.
IDX_SHA256 = {
    "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# How long loading waits to learn whether TFDS's download host answers.
DOWNLOAD_PROBE_TIMEOUT_S = 10.0
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049


class MnistError(UserError, ValueError):
    """A missing, truncated or malformed MNIST file."""


class Mnist(NamedTuple):
    """MNIST splits as host arrays: images uint8 (N, 28, 28), labels int32 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _read_gzip(path: pathlib.Path) -> bytes:
    if not path.is_file():
        raise MnistError(f"MNIST file not found: {path}")
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise MnistError(f"MNIST file {path} is not a complete gzip file: {e}") from e


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
    raw = _read_gzip(path)
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


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes ``array`` as one gzip-compressed IDX file, ``read_idx``'s inverse: uint8 images
    (N, rows, cols) or labels (N,). The gzip header carries no time stamp, so the same array gives
    the same bytes."""
    array = np.asarray(array)
    if array.size and (array.min() < 0 or array.max() > 255):
        raise MnistError(
            f"IDX files hold uint8 values; got {array.dtype} in [{array.min()}, {array.max()}]"
        )
    magic = {3: _IMAGES_MAGIC, 1: _LABELS_MAGIC}.get(array.ndim)
    if magic is None:
        raise MnistError(f"IDX files hold (N, rows, cols) images or (N,) labels, got {array.shape}")
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(header + array.astype(np.uint8).tobytes())


def save_mnist_idx(mnist: Mnist, directory: str | os.PathLike) -> None:
    """Writes ``mnist`` as the four IDX files (``IDX_FILES``) in ``directory``, which
    ``load_mnist_idx`` reads back bitwise."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, fname in IDX_FILES.items():
        write_idx(directory / fname, getattr(mnist, name))


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


def _unreachable_reason(url: str, timeout: float) -> str | None:
    """Why ``url``'s host (or the proxy that serves it) cannot be reached within ``timeout``
    seconds, name resolution included; None when a TCP connection opens."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    target = urllib.parse.urlsplit(proxy) if proxy else parts
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"{type(e).__name__}: {e}")

    worker = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else f"no answer from {host}:{port} within {timeout:g} s"


def _no_data_message(data_dir: str, reason: str) -> str:
    files = ", ".join(IDX_FILES.values())
    return (
        f"MNIST is not available: no local IDX directory is set, TFDS has no prepared 'mnist' "
        f"in {data_dir}, and TFDS cannot download it ({reason}). Provide it one of these ways: "
        f"(1) set ${MNIST_DIR_ENV} or --config.data.mnist_dir to a directory with the four IDX "
        f"files ({files}); (2) set --config.data.tfds_data_dir (or $TFDS_DATA_DIR) to a TFDS "
        f"data_dir where 'mnist' is prepared: prepared elsewhere and copied, or here from IDX "
        f"files with 'python -m fedinf_jax.data --mnist_dir=DIR --tfds_data_dir=OUT'; (3) run "
        f"once with internet access, so that TFDS downloads and prepares it."
    )


def load_mnist_tfds(data_dir: str | None = None) -> Mnist:
    """Loads TFDS ``mnist`` from ``data_dir`` (None: TFDS's default), preparing it there first
    if needed, which downloads.

    Raises:
      MnistError: it is not prepared in ``data_dir`` and TFDS's download host cannot be reached
        (within ``DOWNLOAD_PROBE_TIMEOUT_S``); the message lists the ways to provide MNIST.
    """
    tfds = _tfds()

    builder = tfds.builder("mnist", data_dir=data_dir)
    if not builder.is_prepared():
        reason = _unreachable_reason(type(builder).URL, DOWNLOAD_PROBE_TIMEOUT_S)
        if reason is not None:
            raise MnistError(_no_data_message(str(builder.data_dir_root), reason))
        builder.download_and_prepare()
    splits = {}
    for split in ("train", "test"):
        # Batched iteration rather than batch_size=-1, which aborts inside TF under mock_data.
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
        parts = list(tfds.as_numpy(ds.batch(10_000)))
        images = np.concatenate([im for im, _ in parts])[..., 0].astype(np.uint8)
        labels = np.concatenate([lb for _, lb in parts]).astype(np.int32)
        if not builder.info.disable_shuffling:
            to_idx_order = _tfds_to_idx_order(split, len(labels))
            images, labels = images[to_idx_order], labels[to_idx_order]
        splits[split] = (images, labels)
    return Mnist(*splits["train"], *splits["test"])


def _tfds():
    """TFDS, TensorFlow kept off any accelerator first (``runtime.tensorflow``)."""

    runtime.tensorflow()
    import tensorflow_datasets as tfds

    return tfds


def _tfds_to_idx_order(split: str, num_examples: int) -> np.ndarray:
    """The permutation that takes a prepared TFDS ``mnist`` split from file order to IDX order:
    entry i is the file position of IDX example i.

    TFDS's ``mnist`` builder keys example ``i`` of the IDX files by ``i``, and its writer stores
    the records sorted by the salted hash ``Hasher(salt=split).hash_key(key)`` (a deterministic
    shuffle); inverting that sort gives back the IDX order, so that both sources give the same
    arrays, and so the same partitions and batches.
    """
    from tensorflow_datasets.core import hashing

    hasher = hashing.Hasher(salt=split)
    file_order = sorted(range(num_examples), key=hasher.hash_key)  # IDX index at each position
    return np.argsort(file_order)


def prepare_tfds_mnist(
    mnist_dir: str | os.PathLike, data_dir: str | os.PathLike, canonical: bool = True
) -> str:
    """Prepares TFDS ``mnist`` in ``data_dir`` from the IDX files in ``mnist_dir``, offline.

    TFDS's own preparation runs (its download manager, extraction, example generation and
    shard writing), with ``mnist_dir`` as the manual download directory. TFDS validates a manual
    download against its registered sha256 of the canonical ``.gz`` archives, which a copy with
    another gzip wrapper fails although its data are the same; so each archive's uncompressed
    content is checked here against the canonical IDX hashes (``IDX_SHA256``), and TFDS is given
    the archives' own checksums in place of the registered ones. Each split holds as many
    examples as its IDX files (TFDS's builder assumes MNIST's 60,000 and 10,000).
    ``tfds.load('mnist', data_dir=data_dir)`` then reads it like a downloaded copy. A prepared
    ``data_dir`` is reused.

    Args:
      mnist_dir: a directory with the four IDX ``.gz`` files (``IDX_FILES``).
      data_dir: the TFDS data_dir to prepare ``mnist`` in.
      canonical: refuse files whose content is not canonical MNIST; False prepares any
        well-formed IDX copy (a subset of MNIST, say) under the name ``mnist``.

    Returns:
      ``data_dir``.

    Raises:
      MnistError: a file is missing, not gzip or malformed, or (``canonical``) its IDX content
        is not canonical MNIST.
    """
    mnist_dir = pathlib.Path(mnist_dir)
    if canonical:
        for name, fname in IDX_FILES.items():
            digest = hashlib.sha256(_read_gzip(mnist_dir / fname)).hexdigest()
            if digest != IDX_SHA256[name]:
                raise MnistError(
                    f"MNIST file {mnist_dir / fname} is not the canonical {name} IDX file: its "
                    f"uncompressed sha256 is {digest}, expected {IDX_SHA256[name]}"
                )
    mnist = load_mnist_idx(mnist_dir)
    num_examples = {"train": len(mnist.train_labels), "test": len(mnist.test_labels)}
    tfds = _tfds()
    registered = tfds.builder_cls("mnist")
    local_infos = {
        urllib.parse.urljoin(registered.URL, fname): tfds.download.checksums.compute_url_info(
            mnist_dir / fname
        )
        for fname in IDX_FILES.values()
    }

    class LocalArchives(registered, skip_registration=True):
        """TFDS's ``mnist`` builder with the local archives' checksums registered and their
        example counts."""

        name = registered.name
        __module__ = registered.__module__  # recorded in dataset_info.json, as TFDS's own
        url_infos = local_infos

        def _split_generators(self, dl_manager):
            generators = super()._split_generators(dl_manager)
            for generator in generators:
                generator.gen_kwargs["num_examples"] = num_examples[str(generator.name)]
            return generators

    config = tfds.download.DownloadConfig(manual_dir=str(mnist_dir), try_download_gcs=False)
    with tempfile.TemporaryDirectory() as downloads:  # the extracted IDX files, 55 MB
        builder = LocalArchives(data_dir=str(data_dir))
        builder.download_and_prepare(download_dir=downloads, download_config=config)
    return str(data_dir)


def resolve_mnist_dir(mnist_dir: str | None) -> str | None:
    """The IDX directory to use: the given one, else ``$FEDINF_MNIST_DIR``, else None (TFDS)."""
    return mnist_dir or os.environ.get(MNIST_DIR_ENV) or None


def load_mnist(mnist_dir: str | None = None, tfds_data_dir: str | None = None) -> Mnist:
    """Loads MNIST from ``mnist_dir`` / ``$FEDINF_MNIST_DIR`` if set, else from TFDS in
    ``tfds_data_dir`` (None or empty: TFDS's default data_dir)."""
    directory = resolve_mnist_dir(mnist_dir)
    if directory:
        return load_mnist_idx(directory)
    return load_mnist_tfds(tfds_data_dir or None)


def to_model_input(images: np.ndarray, centered: bool = True) -> np.ndarray:
    """uint8 (..., 28, 28) -> float32 (..., 28, 28, 1) in [-1, 1] (centered) or [0, 1]."""
    x = images.astype(np.float32)[..., None] / 255.0
    return 2.0 * x - 1.0 if centered else x
