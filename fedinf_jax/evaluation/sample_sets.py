"""A sample set measured: the evaluation classifier's features of its images against those of
MNIST's test images (FID, precision, recall), its softmax (Inception Score, label accuracy,
noise rate), its pixels against the test images' (background speckle, black share, grey-level
distance), and real digits measured the same way (each metric's value for a perfect generator
at that size)."""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from fedinf_jax.core import errors, files
from fedinf_jax.data import digits
from fedinf_jax.evaluation import classifier, metrics


class RealDigits(NamedTuple):
    """The real digits a sample set is measured against: their uint8 (N, 28, 28) ``images``
    (the pixel measures) and the evaluation classifier's ``features`` of them (FID, precision
    and recall)."""

    images: np.ndarray
    features: np.ndarray


def evaluate_sample_set(
    clf: classifier.TrainedClassifier, real: RealDigits, images: np.ndarray, labels: np.ndarray
) -> dict:
    """Every metric of one sample set (uint8 images) against the real test digits: the
    classifier's (``sample_set_metrics``) and the pixels' (``metrics.fidelity``)."""
    measured = sample_set_metrics(*clf.features_and_probs(images), labels, real.features)
    return dict(measured, **metrics.fidelity(images, real.images))


def sample_set_metrics(
    feats: np.ndarray, probs: np.ndarray, labels: np.ndarray, real_features: np.ndarray
) -> dict:
    """``evaluate_sample_set``'s metrics from a set's classifier features and softmax."""
    rng = np.random.default_rng(0)
    num_real = min(metrics.PRECISION_RECALL_REAL, len(real_features))  # all of a smaller set
    real = real_features[rng.choice(len(real_features), num_real, replace=False)]
    precision, recall = metrics.precision_recall(real, feats, k=3)
    return {
        **softmax_metrics(probs, labels),
        "fid": metrics.fid(feats, real_features),
        "fid_se": metrics.fid_standard_error(feats, real_features),
        "precision": precision,
        "recall": recall,
    }


def softmax_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    """The metrics of a set that its classifier softmax alone gives, without real digits:
    Inception Score, label accuracy (overall and per digit) and noise rate."""
    is_mean, is_std = metrics.inception_score(probs, splits=min(10, len(probs)))
    accuracy, per_class = metrics.label_accuracy(probs, labels)
    return {
        "num_samples": len(probs),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "accuracy": accuracy,
        "accuracy_per_digit": [None if np.isnan(a) else float(a) for a in per_class],
        "noise_rate": metrics.noise_rate(probs),
    }


def check_sample_dir(sample_dir: str) -> tuple[str, str]:
    """The paths of a sample set's ``samples.npz`` and ``samples.json``; an error if missing."""
    npz, meta = (os.path.join(sample_dir, f"samples.{ext}") for ext in ("npz", "json"))
    missing = [p for p in (npz, meta) if not os.path.exists(p)]
    if missing:
        raise errors.MissingInputError(
            f"{sample_dir!r} is not a sample set: {', '.join(missing)} missing (a sample set is "
            "the --outdir of sample.py or <regime>/samples/<procedure> of reproduce.py)"
        )
    return npz, meta


def evaluate_sample_dir(
    clf: classifier.TrainedClassifier, real: RealDigits, sample_dir: str
) -> dict:
    """Every metric of a sample set written by ``sample.py`` or a pipeline stage (its
    ``samples.npz`` and ``samples.json``), with the sampler's wall time and score evaluations
    per sample."""
    npz, meta = check_sample_dir(sample_dir)
    with np.load(npz) as f:
        images, labels = f["images"], f["labels"]
    stats = files.read_json(meta)["stats"]
    return dict(
        evaluate_sample_set(clf, real, images, labels),
        sampling_wall_time_s=stats["wall_time_s"],
        score_evaluations=evaluations_per_sample(stats),
    )


def evaluations_per_sample(stats: dict) -> float:
    """Score evaluations per sample from samples.json's statistics, which count them over the
    set's batches (each solve evaluates its whole batch at once): their mean over the batches."""
    return stats["score_evaluations"] / stats["batches"]


def reference_set(mnist: digits.Mnist, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` MNIST training images of each digit (none of them in FID's test-set
    reference): real data, measured like a sample set of the same size, show each metric's value
    for a perfect generator at that size (FID's finite-sample floor, IS's ceiling)."""
    rng = np.random.default_rng(seed)
    index = np.concatenate(
        [
            rng.choice(np.flatnonzero(mnist.train_labels == c), per_class, replace=False)
            for c in range(digits.NUM_CLASSES)
        ]
    )
    return mnist.train_images[index], mnist.train_labels[index]


def require_classifier(classifier_dir: str) -> classifier.TrainedClassifier:
    """The classifier checkpointed in ``classifier_dir``; an error when there is none."""
    clf = classifier.load_classifier(classifier_dir)
    if clf is None:
        raise errors.MissingInputError(
            f"no classifier checkpoint in {classifier_dir!r}: give the classifier/ folder of a "
            "reproduce.py run (it trains one)"
        )
    return clf


def real_test_digits(
    clf: classifier.TrainedClassifier, classifier_dir: str, mnist: digits.Mnist
) -> RealDigits:
    """MNIST's test digits with ``clf``'s features of them (kept beside the classifier in
    ``classifier_dir``, ``classifier.test_set_features``)."""
    features = classifier.test_set_features(clf, classifier_dir, mnist.test_images)
    return RealDigits(mnist.test_images, features)


def load_evaluator(
    classifier_dir: str, mnist: digits.Mnist
) -> tuple[classifier.TrainedClassifier, RealDigits]:
    """(classifier, the MNIST test digits with its features of them): what
    ``evaluate_sample_dir`` needs."""
    clf = require_classifier(classifier_dir)
    return clf, real_test_digits(clf, classifier_dir, mnist)
