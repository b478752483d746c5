"""The evaluation classifier: trains, checkpoints with its accuracy, is reused, has a floor."""

import numpy as np
import pytest

from configs import classifier as classifier_config
from fedinf_jax.evaluation import classifier


def test_train_save_reuse_and_floor(reproduced, mnist):
    """The smoke pipeline trained the smoke classifier (and saved it with its accuracy)."""
    workdir = str(reproduced[0] / "classifier")
    config = classifier_config.get_config("smoke")
    trained = classifier.load_classifier(workdir)
    assert 0.0 <= trained.test_accuracy <= 1.0
    feats, probs = trained.features_and_probs(mnist.test_images[:5])
    assert feats.shape == (5, 16) and probs.shape == (5, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    # A second call restores the checkpoint instead of training: same numbers.
    again = classifier.train_classifier(config, workdir)
    assert again.test_accuracy == trained.test_accuracy
    np.testing.assert_array_equal(again.features_and_probs(mnist.test_images[:5])[1], probs)
    config.min_test_accuracy = 0.999
    with pytest.raises(ValueError, match=r"below min_test_accuracy = 0\.999"):
        classifier.train_classifier(config, workdir)


def test_shift_augmentation_moves_pixels_within_bounds():
    rng = np.random.default_rng(0)
    images = np.zeros((50, 28, 28), np.uint8)
    images[:, 14, 14] = 255
    shifted = classifier._shift(images, rng, 2)
    ys, xs = np.nonzero(shifted.reshape(50, 28, 28).max(axis=0))
    assert set(ys) <= set(range(12, 17)) and set(xs) <= set(range(12, 17))
    assert np.all(shifted.reshape(50, -1).sum(axis=1) == 255)
    assert len({tuple(np.argwhere(s)[0]) for s in shifted}) > 5


def test_test_set_features_are_computed_once(reproduced, mnist, tmp_path, monkeypatch):
    """The pipeline kept the test set's features beside its classifier; a cache is read back
    only for the same images (and parameters), else recomputed."""
    trained = classifier.load_classifier(str(reproduced[0] / "classifier"))
    with np.load(reproduced[0] / "classifier" / classifier.TEST_FEATURES) as f:
        assert f["features"].shape == (len(mnist.test_images), 16)
    images = mnist.test_images[:50]
    features = classifier.test_set_features(trained, str(tmp_path), images)
    np.testing.assert_array_equal(features, trained.features_and_probs(images)[0])
    monkeypatch.setattr(
        classifier.TrainedClassifier,
        "features_and_probs",
        lambda *a, **k: pytest.fail("recomputed"),
    )
    np.testing.assert_array_equal(
        classifier.test_set_features(trained, str(tmp_path), images), features
    )
    monkeypatch.undo()
    other = classifier.test_set_features(trained, str(tmp_path), mnist.test_images[50:60])
    np.testing.assert_array_equal(other, trained.features_and_probs(mnist.test_images[50:60])[0])
