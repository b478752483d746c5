"""The feature extractor for FID/IS: a small ResNet-style MNIST classifier trained here.

The paper used a ResNet18 MNIST classifier's 10 logits as FID features (docs/results.md);
this one is ResNet-style too, sized for a CPU: a 3x3 stem, one pre-activation residual block per
stage (GroupNorm, SiLU, two 3x3 convolutions; stride 2 from the second stage on), global average
pooling to the penultimate ``features`` (used for FID and precision/recall) and a linear layer to
the 10 logits (softmax for IS, accuracy, noise rate). Trained with AdamW on random 2-pixel shifts
of the training set; checkpointed with Orbax with its test accuracy, and reused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from fedinf_jax.agents import checkpoint, pretrained
from fedinf_jax.core import files, provenance
from fedinf_jax.data import digits
from fedinf_jax.models import optim
from fedinf_jax.models.layers import GroupNorm


class ResidualBlock(nn.Module):
    """GN -> SiLU -> conv3x3 (stride) -> GN -> SiLU -> conv3x3, plus a 1x1 shortcut on change."""

    features: int
    strides: int = 1
    groups: int = 8

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.features, (3, 3), self.strides, padding=1)(
            nn.silu(GroupNorm(self.groups)(x))
        )
        h = nn.Conv(self.features, (3, 3), padding=1)(nn.silu(GroupNorm(self.groups)(h)))
        if x.shape[-1] != self.features or self.strides != 1:
            x = nn.Conv(self.features, (1, 1), self.strides)(x)
        return x + h


class Classifier(nn.Module):
    """``apply(params, images) -> (logits (N, classes), features (N, channels[-1]))``; images in
    model space (N, 28, 28, 1)."""

    channels: Sequence[int] = (32, 64, 128)
    num_classes: int = 10
    groups: int = 8

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.channels[0], (3, 3), padding=1)(x)
        for i, c in enumerate(self.channels):
            h = ResidualBlock(c, strides=1 if i == 0 else 2, groups=self.groups)(h)
        h = nn.silu(GroupNorm(self.groups)(h))
        features = jnp.mean(h, axis=(1, 2))
        return nn.Dense(self.num_classes)(features), features


def make_classifier(model_config) -> Classifier:
    return Classifier(tuple(model_config.channels), model_config.num_classes, model_config.groups)


@dataclasses.dataclass(frozen=True)
class TrainedClassifier:
    """A restored classifier: ``features_and_probs(uint8 images)`` in batches."""

    model: Classifier
    params: dict
    test_accuracy: float
    centered: bool = True

    def features_and_probs(
        self, images: np.ndarray, batch_size: int = 1000
    ) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, 28, 28) -> (features (N, D) float64, softmax (N, classes) float64)."""
        apply = _jitted_apply(self.model)
        feats, probs = [], []
        for lo in range(0, len(images), batch_size):
            x = jnp.asarray(digits.to_model_input(images[lo : lo + batch_size], self.centered))
            logits, f = apply(self.params, x)
            feats.append(np.asarray(f, np.float64))
            probs.append(np.asarray(jax.nn.softmax(logits), np.float64))
        return np.concatenate(feats), np.concatenate(probs)


@functools.cache
def _jitted_apply(model: Classifier):
    return jax.jit(model.apply)


def _shift(images: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Random translations by up to ``max_shift`` pixels (zero padding), per image."""
    if max_shift == 0:
        return images
    n, h, w = images.shape
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    dy, dx = rng.integers(0, 2 * max_shift + 1, (2, n))
    rows = dy[:, None] + np.arange(h)[None]
    cols = dx[:, None] + np.arange(w)[None]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _abstract_params(model: Classifier):
    return jax.eval_shape(
        lambda k: model.init(k, jnp.zeros((1, *digits.IMAGE_SHAPE))), jax.random.key(0)
    )


def load_classifier(workdir: str) -> TrainedClassifier | None:
    """The classifier checkpointed in ``workdir``, or None when there is none.

    Raises:
      ShippedFileError: ``workdir`` is a shipped classifier with a missing or damaged file.
    """
    pretrained.verify(workdir)
    if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
        return None
    manager = checkpoint.make_manager(workdir, create=False)
    try:
        if manager.latest_step() is None:
            return None
        meta = checkpoint.restore_meta(manager)
        config = ml_collections.ConfigDict(meta["config"])
        model = make_classifier(config.model)
        params, _ = checkpoint.restore(manager, _abstract_params(model))
    finally:
        manager.close()
    return TrainedClassifier(model, params, meta["test_accuracy"], config.data.centered)


TEST_FEATURES = "test_features.npz"


def test_set_features(clf: TrainedClassifier, workdir: str, images: np.ndarray) -> np.ndarray:
    """``clf``'s features of ``images`` (the MNIST test set: FID's reference), kept in
    ``workdir/test_features.npz`` once computed, with a digest of the images and the parameters,
    so that every later evaluation against the classifier in ``workdir`` reads them (a shipped
    classifier's: in the user's cache folder, ``pretrained.cache_root``). A folder that cannot
    be written only costs the cache."""
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    for leaf in jax.tree.leaves(clf.params):
        digest.update(np.asarray(leaf).tobytes())
    digest = digest.hexdigest()
    path = os.path.join(pretrained.cache_root(workdir), TEST_FEATURES)
    if os.path.exists(path):
        with np.load(path) as f:
            if str(f["digest"]) == digest:
                return f["features"]
    features = clf.features_and_probs(images)[0]
    try:
        with files.atomic_path(path) as tmp:
            np.savez(tmp, features=features, digest=digest)
    except OSError as err:
        logging.warning("test-set features not kept in %s: %s", path, err)
    return features


def evaluate_accuracy(
    model: Classifier, params, images: np.ndarray, labels: np.ndarray, centered: bool = True
) -> float:
    clf = TrainedClassifier(model, params, float("nan"), centered)
    _, probs = clf.features_and_probs(images)
    return float(np.mean(probs.argmax(axis=1) == labels))


NOT_INPUTS = (
    "preset",
    "min_test_accuracy",
    "data.mnist_dir",
    "data.tfds_data_dir",
    "train.log_every",
)
"""Fields of a classifier's config that do not determine it: a name, the floor it is checked
against, where MNIST is read from (every source gives the same arrays), the logging cadence."""


def classifier_inputs(config) -> dict:
    """What determines a trained classifier (``provenance``): its config but ``NOT_INPUTS``."""
    fields = provenance.flatten(config.to_dict() if hasattr(config, "to_dict") else config)
    return {k: v for k, v in fields.items() if k not in NOT_INPUTS}


def check_reuse(config: ml_collections.ConfigDict, workdir: str, recompute: bool) -> bool:
    """Whether ``workdir`` holds a classifier trained from ``config``'s inputs
    (``provenance.check_reuse``; reads only its record).

    Raises:
      StaleOutputError: it was trained with other settings, and ``recompute`` is not set.
    """
    steps = checkpoint.all_steps(workdir)
    if not steps:
        return False
    stored = classifier_inputs(checkpoint.read_meta(workdir, steps[-1])["config"])
    return provenance.check_reuse(
        "classifier", workdir, stored, classifier_inputs(config), recompute
    )


def train_classifier(
    config: ml_collections.ConfigDict, workdir: str, recompute: bool = False
) -> TrainedClassifier:
    """Trains the classifier ``config`` describes (``configs/classifier.py``), saves it with
    its test accuracy under ``workdir``, and returns it; reuses a finished one trained from the
    same inputs (``check_reuse``). With ``recompute``, one trained with other settings is
    trained again and replaces the old folder once saved.

    Raises:
      StaleOutputError: ``workdir`` holds a classifier trained with other settings, and
        ``recompute`` is not set.
      ValueError: the trained classifier's test accuracy is below ``config.min_test_accuracy``
        (the checkpoint is kept, so the number can be inspected).
    """
    if check_reuse(config, workdir, recompute):
        found = load_classifier(workdir)
        logging.info("classifier in %s: test accuracy %.4f (reused)", workdir, found.test_accuracy)
        check_accuracy(found.test_accuracy, config, workdir)
        return found
    pretrained.check_writable(workdir, "training the classifier")
    if os.path.isdir(checkpoint.checkpoint_dir(workdir)):  # recompute: replaced once saved
        with files.atomic_path(workdir, folder=True) as fresh:
            trained = _train(config, fresh)
    else:
        trained = _train(config, workdir)
    check_accuracy(trained.test_accuracy, config, workdir)
    return trained


def _train(config: ml_collections.ConfigDict, workdir: str) -> TrainedClassifier:
    """Trains and saves the classifier under ``workdir``."""
    mnist = digits.load_mnist(config.data.mnist_dir, config.data.tfds_data_dir)
    model = make_classifier(config.model)
    tx = optim.make_optimizer(config.train)
    params = jax.jit(model.init)(jax.random.key(config.seed), jnp.zeros((1, *digits.IMAGE_SHAPE)))
    opt_state = tx.init(params)

    def loss_fn(p, x, y):
        logits, _ = model.apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, o, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    rng = np.random.default_rng(config.seed)
    n, b = len(mnist.train_labels), config.train.batch_size
    steps_per_epoch = n // b
    order = rng.permutation(n)
    from clu import periodic_actions  # imports TensorFlow: only where a classifier trains

    progress = periodic_actions.ReportProgress(
        num_train_steps=config.train.num_steps, every_steps=config.train.log_every
    )
    for s in range(config.train.num_steps):
        pos = s % steps_per_epoch
        if pos == 0 and s:
            order = rng.permutation(n)
        idx = order[pos * b : (pos + 1) * b]
        x = digits.to_model_input(
            _shift(mnist.train_images[idx], rng, config.train.max_shift), config.data.centered
        )
        params, opt_state, loss = step(params, opt_state, x, mnist.train_labels[idx])
        progress(s + 1)  # clu: steps/s, done and ETA
        if (s + 1) % config.train.log_every == 0 or s + 1 == config.train.num_steps:
            logging.info(
                "classifier step %d/%d: loss %.4f", s + 1, config.train.num_steps, float(loss)
            )
    accuracy = evaluate_accuracy(
        model, params, mnist.test_images, mnist.test_labels, config.data.centered
    )
    logging.info("classifier test accuracy %.4f after %d steps", accuracy, config.train.num_steps)
    os.makedirs(workdir, exist_ok=True)
    manager = checkpoint.make_manager(workdir, keep=1)
    try:
        meta = {"config": json.loads(config.to_json_best_effort()), "test_accuracy": accuracy}
        checkpoint.save(manager, config.train.num_steps, params, meta)
    finally:
        manager.close()
    return TrainedClassifier(model, params, accuracy, config.data.centered)


def check_accuracy(accuracy: float, config, workdir: str) -> None:
    if accuracy < config.min_test_accuracy:
        raise ValueError(
            f"the classifier in {workdir} reaches {accuracy:.4f} test accuracy, below "
            f"min_test_accuracy = {config.min_test_accuracy}: train longer "
            "(classifier.train.num_steps) in a fresh directory"
        )
