"""Sample-quality metrics, each a pure function of arrays (float64 throughout).

Features and probabilities come from the project's own MNIST classifier (Inception
features mean little on digits): ``features`` its penultimate layer, ``probs`` its
softmax.

* FID (Heusel et al. 2017): with (mu, Sigma) the mean and covariance of each set's features,
      FID = ||mu_1 - mu_2||^2 + tr(Sigma_1) + tr(Sigma_2) - 2 tr((Sigma_1 Sigma_2)^(1/2)).
  tr((Sigma_1 Sigma_2)^(1/2)) is the sum of the square roots of the eigenvalues of the symmetric
  positive semi-definite Sigma_1^(1/2) Sigma_2 Sigma_1^(1/2) (the same eigenvalues as
  Sigma_1 Sigma_2), computed with ``eigh`` and clipped at 0: no complex parts to drop.
  Its standard error (``fid_standard_error``) is a bootstrap over the generated set.
* Inception Score (Salimans et al. 2016): IS = exp(E_x KL(p(y | x) || p(y))) with p(y) the
  split's mean prediction; mean and standard deviation over 10 splits. At most the number of
  classes (10), at least 1.
* Label accuracy: share of samples whose argmax equals the conditioning label, overall and per
  class.
* Noise rate: share of samples whose largest softmax probability is below 0.5, the paper's failure
  mode ("mostly noise").
* Precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls
  around its points with radius the distance to the point's k-th nearest neighbour (k = 3);
  precision is the share of generated samples inside the real manifold, recall the share of real
  samples inside the generated one.

The classifier reads a digit through a speckled background (it was trained on clean digits and
its features hardly move), so three pixel measures of fidelity, on uint8 images, sit beside them:

* Background speckle: the share of pixels in the border ring (the outer ``SPECKLE_RING`` = 3
  pixels of each side, 300 of a 28 x 28 image) brighter than ``SPECKLE_LEVEL`` = 10 grey
  levels. MNIST fits each digit in a 20 x 20 box centred by its centre of mass in the 28 x 28
  frame, so the ring is background but where a stroke reaches it (0.5% of the real test digits'
  ring pixels), while a sampler's residual noise lights it everywhere.
* Black share: the share of all pixels exactly 0 (82% of MNIST's). A grey level or two below the
  eye's notice decides it, so it describes a background rather than grades it.
* Grey-level distance: the total-variation distance between the set's and the real digits'
  histograms of pixel values in 16 bins of 16 grey levels, (1/2) sum_b |p_b - q_b| in [0, 1]:
  faint noise moves mass from the first bin to the next ones, grey backgrounds and washed-out
  strokes too, while the bins are wide enough that a level or two of offset does not count.
"""

from __future__ import annotations

import numpy as np

PRECISION_RECALL_REAL = 2000
"""Real test images in the manifold that sample sets' precision and recall are measured against
(all of them where the test set is smaller)."""


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features, float64, covariance with N - 1 degrees of freedom."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (module docstring)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched shapes: {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}")
    root1 = _sqrt_psd(s1)
    eig = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two sets of (N, D) features."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def fid_standard_error(
    features: np.ndarray, real_features: np.ndarray, resamples: int = 100, seed: int = 0
) -> float:
    """The bootstrap standard error of ``fid(features, real_features)``: the standard deviation
    of the FID of ``resamples`` sets of N rows drawn with replacement from the N generated
    ``features`` (seeded by ``seed``), the real set's statistics held fixed. It measures the
    spread a set of this size gives, not FID's finite-sample bias (a resampled set repeats rows,
    which raises its FID a little)."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2 or resamples < 2:
        raise ValueError(
            f"need (N >= 2, D) features and resamples >= 2, got {f.shape}, {resamples}"
        )
    real = feature_statistics(real_features)
    rng = np.random.default_rng(seed)
    draws = [
        frechet_distance(*feature_statistics(f[rng.integers(0, len(f), len(f))]), *real)
        for _ in range(resamples)
    ]
    return float(np.std(draws, ddof=1))


def _check_probs(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError(f"probs must be (N, classes) rows of probabilities, got {p.shape}")
    return p


def inception_score(probs: np.ndarray, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over ``splits`` equal splits of exp(E_x KL(p(y|x) || p(y))).

    The samples are shuffled (a fixed permutation drawn from ``seed``) before they are split, as
    torchmetrics' InceptionScore does: a set sorted by class (the pipeline's sets are sorted by
    conditioning label) would otherwise put one class in each split, where p(y) = p(y|x) and the
    score is 1 whatever the samples. Small splits bias IS low: a perfectly confident,
    class-balanced set of 200 in 10 splits scores 7.86 (each split's 20 samples cover the
    classes unevenly), 1000 in 10 splits about 9.5; compare sets of equal size.
    """
    p = _check_probs(probs)
    if not 1 <= splits <= len(p):
        raise ValueError(f"splits must be in [1, N = {len(p)}], got {splits}")
    p = p[np.random.default_rng(seed).permutation(len(p))]
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def label_accuracy(
    probs: np.ndarray, labels: np.ndarray, num_classes: int = 10
) -> tuple[float, np.ndarray]:
    """(overall accuracy, per-class accuracy (num_classes,); NaN for an absent class)."""
    p = _check_probs(probs)
    labels = np.asarray(labels)
    correct = p.argmax(axis=1) == labels
    per_class = np.array(
        [correct[labels == c].mean() if np.any(labels == c) else np.nan for c in range(num_classes)]
    )
    return float(correct.mean()), per_class


def noise_rate(probs: np.ndarray, threshold: float = 0.5) -> float:
    """Share of samples whose largest class probability is below ``threshold``."""
    return float(np.mean(_check_probs(probs).max(axis=1) < threshold))


def _pairwise_sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def _kth_radius(x: np.ndarray, k: int) -> np.ndarray:
    d = _pairwise_sq(x, x)
    return np.sqrt(np.sort(d, axis=1)[:, k])  # column 0 is the point itself


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall with k-nearest-neighbour balls (module docstring)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k = {k} points in each set")
    r_real, r_fake = _kth_radius(real, k), _kth_radius(fake, k)
    d = np.sqrt(_pairwise_sq(fake, real))  # (fake, real)
    precision = np.mean(np.any(d <= r_real[None, :], axis=1))
    recall = np.mean(np.any(d.T <= r_fake[None, :], axis=1))
    return float(precision), float(recall)


SPECKLE_RING = 3
"""Width in pixels of the border ring that ``background_speckle`` reads."""
SPECKLE_LEVEL = 10
"""Grey level (of 255) above which a ring pixel counts as lit."""
GREY_BINS = 16
"""Histogram bins of ``grey_level_distance`` (16 grey levels each)."""


def _check_pixels(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 3 or min(x.shape[1:]) <= 2 * SPECKLE_RING:
        raise ValueError(
            f"images must be uint8 (N, H, W) with H, W > {2 * SPECKLE_RING}, got {x.dtype} "
            f"{x.shape}"
        )
    return x


def border_ring(shape: tuple[int, int], width: int = SPECKLE_RING) -> np.ndarray:
    """The (H, W) mask of the pixels within ``width`` of an edge."""
    mask = np.ones(shape, bool)
    mask[width:-width, width:-width] = False
    return mask


def background_speckle(images: np.ndarray) -> float:
    """Share of border-ring pixels (``border_ring``) brighter than ``SPECKLE_LEVEL``, over uint8
    (N, H, W) images."""
    x = _check_pixels(images)
    return float(np.mean(x[:, border_ring(x.shape[1:])] > SPECKLE_LEVEL))


def black_share(images: np.ndarray) -> float:
    """Share of pixels exactly 0, over uint8 (N, H, W) images."""
    return float(np.mean(_check_pixels(images) == 0))


def grey_histogram(images: np.ndarray) -> np.ndarray:
    """The share of pixels in each of ``GREY_BINS`` equal bins of grey level."""
    x = _check_pixels(images).ravel().astype(np.int64)
    return np.bincount(x * GREY_BINS // 256, minlength=GREY_BINS) / x.size


def grey_level_distance(images: np.ndarray, real_images: np.ndarray) -> float:
    """Total-variation distance between the grey-level histograms (``grey_histogram``) of two
    sets of uint8 (N, H, W) images: 0 for the same histogram, 1 for disjoint ones."""
    return float(0.5 * np.abs(grey_histogram(images) - grey_histogram(real_images)).sum())


def fidelity(images: np.ndarray, real_images: np.ndarray) -> dict[str, float]:
    """The pixel measures of a set of uint8 (N, H, W) images against real ones (module
    docstring): ``speckle``, ``black`` and ``grey_distance``."""
    return {
        "speckle": background_speckle(images),
        "black": black_share(images),
        "grey_distance": grey_level_distance(images, real_images),
    }
