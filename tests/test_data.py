import gzip
import hashlib
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fedinf_jax.data import digits
from tests.conftest import MNIST_LABELS_DIR

# sha256 of the suite subset's uncompressed IDX files (data/README.md).
SUBSET_SHA256 = {
    "train_images": "2782ff6f3467f3487a520503c34fe99b761aa97623af029969e59716ac3585c3",
    "train_labels": "0d830540a6191e75a9f5cd63cd5b4bde38960b893784bbf456d560179296d7cd",
    "test_images": "de7c252b04f05e1f8309634180ccdf286dc6dbac8c579b74e76e02ae0331ca52",
    "test_labels": "832c0d20f0dc42e575488c75a83a970787d4c8d4d05831b2ef03701b4a478a90",
}


def _uncompressed_sha256(path) -> str:
    with gzip.open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_full_label_files_are_canonical(mnist_train_labels):
    for name in ("train_labels", "test_labels"):  # the canonical files' well-known hashes
        path = MNIST_LABELS_DIR / digits.IDX_FILES[name]
        assert _uncompressed_sha256(path) == digits.IDX_SHA256[name]
    assert mnist_train_labels.shape == (60000,)
    assert tuple(np.bincount(mnist_train_labels)) == digits.TRAIN_CLASS_COUNTS


def test_subset_is_mnist_first_examples(mnist, mnist_dir, mnist_train_labels):
    """The suite's subset: MNIST's first 6,000 training and 1,000 test examples in IDX order."""
    assert mnist.train_images.shape == (6000, 28, 28) and mnist.test_images.shape == (1000, 28, 28)
    np.testing.assert_array_equal(mnist.train_labels, mnist_train_labels[:6000])
    test_labels = digits.read_idx(MNIST_LABELS_DIR / digits.IDX_FILES["test_labels"])
    np.testing.assert_array_equal(mnist.test_labels, test_labels[:1000])
    assert set(np.unique(mnist.train_labels)) == set(range(10))
    for name, digest in SUBSET_SHA256.items():
        assert _uncompressed_sha256(mnist_dir / digits.IDX_FILES[name]) == digest
    # MNIST's well-known pixel statistics (mean 0.1307, std 0.3081 over its 60,000 training
    # images), within three standard errors of the subset's estimates: the images are the units
    # of the sample, so the errors come from the per-image moments (the std's by the delta method).
    x = mnist.train_images.reshape(6000, -1) / 255.0
    moments = np.stack([x.mean(axis=1), (x**2).mean(axis=1)])
    mean, square = moments.mean(axis=1)
    std = np.sqrt(square - mean**2)
    cov = np.cov(moments) / x.shape[0]
    grad = np.array([-mean / std, 0.5 / std])
    assert abs(mean - 0.1307) <= 3 * np.sqrt(cov[0, 0])
    assert abs(std - 0.3081) <= 3 * np.sqrt(grad @ cov @ grad)


def test_model_input_range(mnist):
    x = digits.to_model_input(mnist.test_images[:5])
    assert x.shape == (5, 28, 28, 1) and x.dtype == np.float32
    assert x.min() == -1.0 and x.max() == 1.0


def test_env_var_selects_directory(monkeypatch, mnist_dir):
    monkeypatch.setenv(digits.MNIST_DIR_ENV, str(mnist_dir))
    assert digits.resolve_mnist_dir("") == str(mnist_dir)
    assert digits.resolve_mnist_dir("/elsewhere") == "/elsewhere"
    monkeypatch.delenv(digits.MNIST_DIR_ENV)
    assert digits.resolve_mnist_dir("") is None


def _write_idx(path, magic, dims, payload):
    header = np.array([magic, *dims], dtype=">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + payload)


def _write_valid_dir(directory, n=3):
    for split in ("train", "test"):
        _write_idx(
            directory / digits.IDX_FILES[f"{split}_images"], 2051, (n, 28, 28), bytes(n * 784)
        )
        _write_idx(directory / digits.IDX_FILES[f"{split}_labels"], 2049, (n,), bytes(range(n)))


def test_small_valid_directory_loads(tmp_path):
    _write_valid_dir(tmp_path)
    m = digits.load_mnist_idx(tmp_path)
    assert m.train_images.shape == (3, 28, 28)
    np.testing.assert_array_equal(m.test_labels, [0, 1, 2])


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: p.unlink(), "not found"),
        (lambda p: _write_idx(p, 2051, (3, 28, 28), bytes(100)), "truncated"),
        (lambda p: _write_idx(p, 1234, (3, 28, 28), bytes(3 * 784)), "magic number 1234"),
        (lambda p: p.write_bytes(b"not gzip at all"), "not a complete gzip"),
        (lambda p: p.write_bytes(gzip.compress(b"\x00\x00")), "truncated"),
    ],
    ids=["missing", "truncated", "wrong-magic", "not-gzip", "no-header"],
)
def test_corrupt_idx_is_a_clear_error_naming_the_file(tmp_path, corrupt, message):
    _write_valid_dir(tmp_path)
    target = tmp_path / digits.IDX_FILES["train_images"]
    corrupt(target)
    with pytest.raises(digits.MnistError, match=message) as info:
        digits.load_mnist_idx(tmp_path)
    assert str(target) in str(info.value)


def test_count_mismatch_between_images_and_labels(tmp_path):
    _write_valid_dir(tmp_path)
    _write_idx(tmp_path / digits.IDX_FILES["test_labels"], 2049, (2,), bytes(2))
    with pytest.raises(digits.MnistError, match="3 images but 2 labels"):
        digits.load_mnist_idx(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(digits.MnistError, match="directory not found"):
        digits.load_mnist(str(tmp_path / "nope"))


def test_tfds_path_with_mock_data(monkeypatch):
    monkeypatch.delenv(digits.MNIST_DIR_ENV, raising=False)
    monkeypatch.setattr(digits, "_unreachable_reason", lambda url, timeout: None)
    with tfds.testing.mock_data(num_examples=12):
        m = digits.load_mnist()
    assert m.train_images.shape == (12, 28, 28) and m.train_images.dtype == np.uint8
    assert m.test_labels.shape == (12,) and m.test_labels.dtype == np.int32
    assert m.train_labels.min() >= 0 and m.train_labels.max() < 10


def test_tfds_prepared_offline_equals_idx_bitwise(monkeypatch, tfds_data_dir, mnist_dir, mnist):
    """TFDS's own preparation of the local archives (the suite's subset, so not canonical),
    read back through the TFDS loader: the same 7,000 images and labels in the same order as the
    IDX loader."""
    monkeypatch.delenv(digits.MNIST_DIR_ENV, raising=False)
    assert (tfds_data_dir / "mnist" / "3.0.1" / "dataset_info.json").is_file()
    from_tfds = digits.load_mnist(tfds_data_dir=str(tfds_data_dir))
    for name, array in mnist._asdict().items():
        got = getattr(from_tfds, name)
        assert got.dtype == array.dtype and got.shape == array.shape, name
        np.testing.assert_array_equal(got, array, err_msg=name)
    # The same call on a prepared data_dir prepares nothing again.
    before = sorted(p.name for p in (tfds_data_dir / "mnist" / "3.0.1").iterdir())
    digits.prepare_tfds_mnist(mnist_dir, tfds_data_dir, canonical=False)
    assert sorted(p.name for p in (tfds_data_dir / "mnist" / "3.0.1").iterdir()) == before


def test_prepare_refuses_an_archive_that_is_not_mnist(tmp_path, mnist_dir):
    _write_valid_dir(tmp_path)
    with pytest.raises(digits.MnistError, match="not the canonical train_images IDX file"):
        digits.prepare_tfds_mnist(tmp_path, tmp_path / "tfds")
    # Real MNIST images, but not all of them: not canonical either.
    with pytest.raises(digits.MnistError, match="not the canonical train_images IDX file"):
        digits.prepare_tfds_mnist(mnist_dir, tmp_path / "tfds")
    assert not (tmp_path / "tfds").exists()


def test_write_idx_is_read_idx_inverse(tmp_path, mnist):
    digits.save_mnist_idx(mnist, tmp_path)
    again = digits.load_mnist_idx(tmp_path)
    for name, array in mnist._asdict().items():
        assert getattr(again, name).dtype == array.dtype, name
        np.testing.assert_array_equal(getattr(again, name), array, err_msg=name)
    first = (tmp_path / digits.IDX_FILES["test_labels"]).read_bytes()
    digits.write_idx(tmp_path / digits.IDX_FILES["test_labels"], mnist.test_labels)
    assert (tmp_path / digits.IDX_FILES["test_labels"]).read_bytes() == first  # no time stamp
    with pytest.raises(digits.MnistError, match=r"uint8 values; got int64 in \[-1, 3\]"):
        digits.write_idx(tmp_path / "x.gz", np.array([-1, 3]))
    with pytest.raises(digits.MnistError, match=r"images or \(N,\) labels, got \(2, 2\)"):
        digits.write_idx(tmp_path / "x.gz", np.zeros((2, 2), np.uint8))


def test_no_copy_and_no_network_is_one_clear_error(monkeypatch, tmp_path):
    """Nothing prepared in the data_dir and the download host refuses (a closed port on this
    machine stands in for it): an MnistError naming every way to provide MNIST, no download."""
    monkeypatch.delenv(digits.MNIST_DIR_ENV, raising=False)
    monkeypatch.setattr(digits.urllib.request, "getproxies", dict)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setattr(tfds.builder_cls("mnist"), "URL", f"http://127.0.0.1:{closed}/mnist/")
    with pytest.raises(digits.MnistError) as info:
        digits.load_mnist(tfds_data_dir=str(tmp_path))
    message = str(info.value)
    for way in (digits.MNIST_DIR_ENV, "data.mnist_dir", "data.tfds_data_dir", "TFDS_DATA_DIR"):
        assert way in message
    assert str(tmp_path) in message and "ConnectionRefusedError" in message
    assert list(tmp_path.iterdir()) == []
