"""Metric formulas pinned by closed forms and limiting cases."""

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import norm

from fedinf_jax.evaluation import metrics as M


def _spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_fid_of_a_set_with_itself_is_zero():
    f = np.random.default_rng(0).normal(size=(500, 16))
    assert abs(M.fid(f, f)) < 1e-8


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    a, b = rng.uniform(0.5, 2.0, 4), rng.uniform(0.5, 2.0, 4)
    # Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), want)
    # General covariances: against scipy's matrix square root.
    s1, s2 = _spd(rng, 6), _spd(rng, 6)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    want = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    np.testing.assert_allclose(M.frechet_distance(m1, s1, m2, s2), want, rtol=1e-8)


def test_fid_bootstrap_standard_error_matches_the_spread_over_independent_sets():
    """One set's bootstrap standard error estimates how FID varies between independent sets of
    its size from the same distribution (100 sets of 200 from N(0.5, 1.5^2 I) against N(0, I))."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(20000, 4))
    sets = [rng.normal(0.5, 1.5, size=(200, 4)) for _ in range(100)]
    spread = np.std([M.fid(s, real) for s in sets], ddof=1)
    ratios = [M.fid_standard_error(s, real) / spread for s in sets[:5]]
    assert 0.75 < np.mean(ratios) < 1.33 and min(ratios) > 0.5
    assert M.fid_standard_error(sets[0], real) == M.fid_standard_error(sets[0], real)
    assert M.fid_standard_error(sets[0], real, seed=1) != M.fid_standard_error(sets[0], real)
    with pytest.raises(ValueError, match="resamples >= 2"):
        M.fid_standard_error(sets[0], real, resamples=1)


def test_fid_of_samples_converges_to_the_gaussians_distance():
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, size=(20000, 3))
    b = rng.normal(1.0, 2.0, size=(20000, 3))
    want = 3 * 1.0 + 3 * (1.0 - 2.0) ** 2
    np.testing.assert_allclose(M.fid(a, b), want, rtol=0.03)


def test_inception_score_limits():
    confident = np.eye(10)[np.arange(1000) % 10]  # confident and uniform over classes
    np.testing.assert_allclose(M.inception_score(confident, splits=1), [10.0, 0.0], atol=1e-9)
    # In splits, the same up to the splits' class imbalance, in any order: sorted by class (as
    # the pipeline's sample sets are) scores like interleaved, not 1.
    interleaved = M.inception_score(confident)[0]
    by_class = M.inception_score(np.eye(10)[np.repeat(np.arange(10), 100)])[0]
    assert 9.3 < interleaved < 10.0 and 9.3 < by_class < 10.0
    constant = np.tile(np.full(10, 0.1), (1000, 1))
    np.testing.assert_allclose(M.inception_score(constant), [1.0, 0.0], atol=1e-9)
    one_class = np.eye(10)[np.zeros(1000, int)]
    np.testing.assert_allclose(M.inception_score(one_class)[0], 1.0)


def test_accuracy_and_noise_rate():
    labels = np.array([0, 1, 2, 2])
    probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.0, 0.3, 0.7], [0.4, 0.3, 0.3]])
    acc, per_class = M.label_accuracy(probs, labels, num_classes=4)
    assert acc == 0.5
    np.testing.assert_array_equal(per_class[:3], [1.0, 0.0, 0.5])
    assert np.isnan(per_class[3])
    assert M.noise_rate(probs) == 0.25


def test_precision_recall():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 2))
    assert M.precision_recall(real, real.copy()) == (1.0, 1.0)
    far = real + 100.0
    assert M.precision_recall(real, far) == (0.0, 0.0)
    # Generated samples covering half of the real support: high precision, recall about half.
    half = real[real[:, 0] > 0]
    precision, recall = M.precision_recall(real, half)
    assert precision == 1.0 and 0.4 < recall < 0.75


def test_bad_inputs():
    with pytest.raises(ValueError, match="rows of probabilities"):
        M.noise_rate(np.ones((3, 2)))
    with pytest.raises(ValueError, match="splits must be in"):
        M.inception_score(np.eye(3), splits=5)
    with pytest.raises(ValueError, match=r"features must be \(N >= 2, D\)"):
        M.fid(np.ones((1, 3)), np.ones((5, 3)))


def _rounded_noise(images, grey_levels, seed=0):
    """``images`` plus Gaussian noise of ``grey_levels`` standard deviation, rounded and clipped
    to uint8 as ``federated_sampler.to_uint8`` does."""
    noise = np.random.default_rng(seed).normal(0.0, grey_levels, images.shape)
    return np.clip(np.rint(images + noise), 0, 255).astype(np.uint8)


def test_pixel_fidelity_of_real_blank_and_noisy_digits(mnist):
    """Known answers: real test digits light about 0.5% of the border ring and are 82% black;
    blank images light nothing and are all black; noise of s grey levels on a black pixel lights
    it with probability P(s z > 10.5) = 1 - Phi(10.5 / s) and leaves it 0 with Phi(0.5 / s)."""
    real = mnist.test_images
    assert 0.002 < M.background_speckle(real) < 0.01
    assert 0.78 < M.black_share(real) < 0.86
    assert M.grey_level_distance(real, real) == 0.0

    blank = np.zeros((50, 28, 28), np.uint8)
    assert M.background_speckle(blank) == 0.0 and M.black_share(blank) == 1.0
    # All of the blank set's mass in the first bin: the distance is what the real set has
    # elsewhere.
    np.testing.assert_allclose(M.grey_level_distance(blank, real), 1.0 - M.grey_histogram(real)[0])
    assert M.background_speckle(np.full((5, 28, 28), 255, np.uint8)) == 1.0

    ring = M.border_ring((28, 28))
    assert ring.sum() == 28 * 28 - 22 * 22
    background = real[:, ring] == 0  # the ring's black pixels, most of it
    for s in (3.0, 6.0, 12.0):
        noisy = _rounded_noise(real, s)
        lit = noisy[:, ring] > M.SPECKLE_LEVEL
        np.testing.assert_allclose(lit[background].mean(), norm.sf(10.5 / s), atol=0.004)
        np.testing.assert_allclose((noisy == 0)[real == 0].mean(), norm.cdf(0.5 / s), atol=0.004)
        assert M.background_speckle(noisy) > M.background_speckle(real)
    # More noise, further from the real histogram, and the measure is symmetric.
    d = [M.grey_level_distance(_rounded_noise(real, s), real) for s in (3.0, 6.0, 12.0, 24.0)]
    assert d == sorted(d) and d[-1] > 0.2
    noisy = _rounded_noise(real, 12.0)
    assert M.grey_level_distance(noisy, real) == M.grey_level_distance(real, noisy)

    fid = M.fidelity(noisy, real)
    assert fid == {
        "speckle": M.background_speckle(noisy),
        "black": M.black_share(noisy),
        "grey_distance": M.grey_level_distance(noisy, real),
    }
    with pytest.raises(ValueError, match="uint8"):
        M.background_speckle(real.astype(np.float32))
