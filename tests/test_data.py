import gzip
import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fedinf_jax import data

# sha256 of the uncompressed canonical IDX files (../shared/data/mnist/README.md).
SHA256 = {
    "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
}


def test_real_mnist_shapes_and_hashes(mnist, mnist_dir):
    assert mnist.train_images.shape == (60000, 28, 28)
    assert mnist.test_images.shape == (10000, 28, 28)
    assert mnist.train_labels.shape == (60000,) and mnist.test_labels.shape == (10000,)
    assert set(np.unique(mnist.train_labels)) == set(range(10))
    for name, digest in SHA256.items():
        with gzip.open(mnist_dir / data.IDX_FILES[name], "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest
    # The README's pixel statistics.
    x = mnist.train_images / 255.0
    np.testing.assert_allclose([x.mean(), x.std()], [0.1307, 0.3081], atol=1e-4)


def test_model_input_range(mnist):
    x = data.to_model_input(mnist.test_images[:5])
    assert x.shape == (5, 28, 28, 1) and x.dtype == np.float32
    assert x.min() == -1.0 and x.max() == 1.0


def test_env_var_selects_directory(monkeypatch, mnist_dir):
    monkeypatch.setenv(data.MNIST_DIR_ENV, str(mnist_dir))
    assert data.resolve_mnist_dir("") == str(mnist_dir)
    assert data.resolve_mnist_dir("/elsewhere") == "/elsewhere"
    monkeypatch.delenv(data.MNIST_DIR_ENV)
    assert data.resolve_mnist_dir("") is None


def _write_idx(path, magic, dims, payload):
    header = np.array([magic, *dims], dtype=">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + payload)


def _write_valid_dir(directory, n=3):
    for split in ("train", "test"):
        _write_idx(directory / data.IDX_FILES[f"{split}_images"], 2051, (n, 28, 28), bytes(n * 784))
        _write_idx(directory / data.IDX_FILES[f"{split}_labels"], 2049, (n,), bytes(range(n)))


def test_small_valid_directory_loads(tmp_path):
    _write_valid_dir(tmp_path)
    m = data.load_mnist_idx(tmp_path)
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
    target = tmp_path / data.IDX_FILES["train_images"]
    corrupt(target)
    with pytest.raises(data.MnistError, match=message) as info:
        data.load_mnist_idx(tmp_path)
    assert str(target) in str(info.value)


def test_count_mismatch_between_images_and_labels(tmp_path):
    _write_valid_dir(tmp_path)
    _write_idx(tmp_path / data.IDX_FILES["test_labels"], 2049, (2,), bytes(2))
    with pytest.raises(data.MnistError, match="3 images but 2 labels"):
        data.load_mnist_idx(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(data.MnistError, match="directory not found"):
        data.load_mnist(str(tmp_path / "nope"))


def test_tfds_path_with_mock_data(monkeypatch):
    monkeypatch.delenv(data.MNIST_DIR_ENV, raising=False)
    with tfds.testing.mock_data(num_examples=12):
        m = data.load_mnist()
    assert m.train_images.shape == (12, 28, 28) and m.train_images.dtype == np.uint8
    assert m.test_labels.shape == (12,) and m.test_labels.dtype == np.int32
    assert m.train_labels.min() >= 0 and m.train_labels.max() < 10
