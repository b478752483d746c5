"""The score parametrizations: targets, scores and their closed forms."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base
from fedinf_jax.diffusion import sde as sde_lib
from fedinf_jax.diffusion.score import (
    PARAMETRIZATIONS,
    Parametrization,
    make_time_sampler,
    parametrization_of,
)

T = jnp.asarray([1e-3, 0.05, 0.3, 0.7, 1.0])


def _marginal(name):
    c = ml_collections.ConfigDict(base.get_config("smoke").sde.to_dict())
    c.name = name
    alpha, std = sde_lib.make_sde(c).marginal(T)
    return alpha[:, None], std[:, None]


@pytest.mark.parametrize("sde_name", sorted(sde_lib.SDES))
@pytest.mark.parametrize("name", PARAMETRIZATIONS)
def test_the_target_output_gives_the_conditional_score(sde_name, name):
    """A network that outputs its target F*(x_0, z) scores x_t = alpha x_0 + std z with the
    conditional score -z / std, and denoises it to x_0 (Tweedie)."""
    param = Parametrization(name, sigma_data=0.7)
    alpha, std = _marginal(sde_name)
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.uniform(k1, (len(T), 64), minval=-1, maxval=1)
    z = jax.random.normal(k2, x0.shape)
    x = alpha * x0 + std * z
    score = param.score(param.target(x0, z, alpha, std), x, alpha, std)
    np.testing.assert_allclose(score * std, -z, rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose((x + std**2 * score) / alpha, x0, rtol=1e-3, atol=2e-3)


def test_edm_under_vp_with_unit_sigma_data_is_v_prediction():
    alpha, std = _marginal("vp")
    param = Parametrization("edm", sigma_data=1.0)
    x0, z = jnp.linspace(-1, 1, len(T))[:, None], jnp.full((len(T), 1), 0.3)
    v = alpha * z - std * x0  # Salimans & Ho 2022
    np.testing.assert_allclose(param.target(x0, z, alpha, std), -v, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(param.input_scale(alpha, std), 1.0, rtol=1e-5)


def test_eps_reads_the_output_as_noise():
    alpha, std = _marginal("vp")
    param = Parametrization("eps")
    out = jnp.ones((len(T), 1))
    np.testing.assert_allclose(param.score(out, 0 * out, alpha, std), -1.0 / std, rtol=1e-6)
    np.testing.assert_allclose(param.input_scale(alpha, std), 1.0, rtol=1e-5)


def test_config_and_old_records():
    assert parametrization_of(base.get_config("smoke").model) == Parametrization("edm", 0.5)
    record = ml_collections.ConfigDict({"block_out_channels": [8, 16]})  # before the field
    assert parametrization_of(record) == Parametrization("eps")
    with pytest.raises(ValueError, match=r"unknown parametrization 'x0'; valid: \['eps', 'edm'\]"):
        Parametrization("x0")
    with pytest.raises(ValueError, match="sigma_data must be > 0"):
        Parametrization("edm", 0.0)


def _vp():
    c = ml_collections.ConfigDict(base.get_config("smoke").sde.to_dict())
    return sde_lib.make_sde(c)


def test_lognormal_training_noise_has_the_stated_distribution():
    """ln sigma(t) of the sampled times ~ N(P_mean, P_std^2) (apart from the clipped tails: under
    the VP SDE sigma(T) = 152, 5.2 standard deviations above the mean)."""
    sde = _vp()
    t = make_time_sampler(sde, "lognormal", 1e-5, p_mean=-1.2, p_std=1.2)(jax.random.key(0), 40_000)
    assert float(t.min()) >= 1e-5 and float(t.max()) <= 1.0
    log_sigma = np.log(np.asarray(sde.noise_level(t)))
    se = 1.2 / np.sqrt(len(log_sigma))
    assert abs(log_sigma.mean() + 1.2) < 4 * se
    assert abs(log_sigma.std() - 1.2) < 4 * se
    assert abs(np.median(log_sigma) + 1.2) < 6 * se


def test_log_snr_training_noise_is_uniform_in_log_sigma():
    sde = _vp()
    t = make_time_sampler(sde, "log_snr", 1e-4)(jax.random.key(2), 40_000)
    log_sigma = np.log(np.asarray(sde.noise_level(t)))
    lo, hi = (float(np.log(sde.noise_level(jnp.float32(s)))) for s in (1e-4, 1.0))
    assert log_sigma.min() >= lo - 1e-4 and log_sigma.max() <= hi + 1e-4
    # Uniform on [lo, hi]: every quarter of the range holds a quarter of the draws.
    counts, _ = np.histogram(log_sigma, bins=4, range=(lo, hi))
    np.testing.assert_allclose(
        counts / len(log_sigma), 0.25, atol=4 * np.sqrt(0.25 * 0.75 / 40_000)
    )


def test_uniform_training_noise_and_bad_names():
    sde = _vp()
    t = np.asarray(make_time_sampler(sde, "uniform_t", 0.25)(jax.random.key(1), 20_000))
    assert t.min() >= 0.25 and t.max() <= 1.0 and abs(t.mean() - 0.625) < 0.01
    with pytest.raises(ValueError, match=r"unknown train.noise 'edm'; valid: \['uniform_t'"):
        make_time_sampler(sde, "edm")
    with pytest.raises(ValueError, match="p_std must be > 0"):
        make_time_sampler(sde, "lognormal", p_std=0.0)


def test_label_dropout_replaces_labels_by_the_null_label():
    """A model with the null label has one more class; with dropout 1 every label is the null
    label, and the times and noise are those of the same key without dropout."""
    from fedinf_jax.agents import runs
    from fedinf_jax.diffusion.score import make_loss_fn, null_label
    from tests.conftest import micro_config

    config = micro_config()
    config.train.label_dropout = 0.2
    model = runs.resolve_score(config).model
    assert model.num_classes == 11 and null_label(model) == 10
    sde = sde_lib.make_sde(config.sde)
    params = model.init(
        jax.random.key(0), jnp.zeros((4, 28, 28, 1)), jnp.zeros(4), jnp.zeros(4, int)
    )
    x0 = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
    y, key = jnp.array([0, 3, 7, 9]), jax.random.key(2)
    always = make_loss_fn(model, sde, label_dropout=1.0)(params, x0, y, key)
    never = make_loss_fn(model, sde)(params, x0, jnp.full_like(y, 10), key)
    assert always == never
    assert make_loss_fn(model, sde)(params, x0, y, key) != never  # the label matters
