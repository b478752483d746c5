import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from configs import base
from fedinf_jax.diffusion import sde as sde_lib

CONFIG = base.get_config("smoke").sde


def _make(name):
    c = ml_collections.ConfigDict(CONFIG.to_dict())
    c.name = name
    return sde_lib.make_sde(c)


@pytest.mark.parametrize("name", sorted(sde_lib.SDES))
def test_marginals_solve_the_moment_odes(name):
    """For dx = -a(t) x dt + g dW: d alpha/dt = -a alpha, d var/dt = -2 a var + g^2."""
    sde = _make(name)

    def rhs(t, y):
        # The drift is linear: f(x, t) = -a(t) x, read off at x = 1.
        a = -float(sde.drift(jnp.ones((1,)), jnp.asarray([t]))[0])
        g = float(sde.diffusion(jnp.asarray(t)))
        return [-a * y[0], -2 * a * y[1] + g**2]

    ts = np.array([0.05, 0.3, 0.7, 1.0])
    sol = solve_ivp(rhs, (0.0, 1.0), [1.0, 0.0], t_eval=ts, rtol=1e-9, atol=1e-12)
    alpha, std = sde.marginal(jnp.asarray(ts))
    np.testing.assert_allclose(alpha, sol.y[0], rtol=1e-4)
    np.testing.assert_allclose(std**2, sol.y[1], rtol=1e-3)
    assert sde.prior_std() == pytest.approx(float(std[-1]), rel=0.02 if name != "ve" else 1e-6)


def test_paper_ve_closed_form():
    sde = _make("ve_paper")
    t = jnp.asarray([0.05, 1.0])
    _, std = sde.marginal(t)
    np.testing.assert_allclose(std, np.sqrt((25 ** (2 * t) - 1) / (2 * np.log(25))), rtol=1e-5)
    assert float(std[0]) == pytest.approx(0.243, abs=1e-3)  # where the paper stopped sampling


@pytest.mark.parametrize("name", sorted(sde_lib.SDES))
def test_perturb_matches_marginal_statistics(name):
    sde = _make(name)
    x0 = jnp.full((20000, 1), 0.7)
    t = jnp.full((20000,), 0.4)
    xt = sde.perturb(x0, t, jax.random.normal(jax.random.key(0), x0.shape))
    alpha, std = sde.marginal(jnp.asarray(0.4))
    np.testing.assert_allclose(xt.mean(), 0.7 * alpha, atol=4 * std / np.sqrt(20000))
    np.testing.assert_allclose(xt.std(), std, rtol=0.03)
    prior = sde.prior_sample(jax.random.key(1), (20000,))
    np.testing.assert_allclose(prior.std(), sde.prior_std(), rtol=0.03)


def test_unknown_sde_lists_valid_names():
    c = ml_collections.ConfigDict(CONFIG.to_dict())
    c.name = "edm"
    with pytest.raises(
        ValueError, match=r"unknown SDE 'edm'; valid: \['vp', 'subvp', 've', 've_paper'\]"
    ):
        sde_lib.make_sde(c)


@pytest.mark.parametrize("name", sorted(sde_lib.SDES))
def test_time_at_noise_level_inverts_noise_level(name):
    sde = _make(name)
    t = jnp.linspace(0.01, 1.0, 9)
    sigma = sde.noise_level(t)
    assert np.all(np.diff(np.asarray(sigma)) > 0)
    np.testing.assert_allclose(sde.time_at_noise_level(sigma), t, atol=1e-6)
    # Outside [sigma(t_min), sigma(T)] the time is the interval's end.
    ends = sde.time_at_noise_level(jnp.array([1e-9, 1e9]), t_min=0.01)
    np.testing.assert_allclose(ends, [0.01, 1.0], atol=1e-6)


def test_vp_time_at_noise_level_closed_form():
    """VP: sigma^2 = exp(int_0^t beta) - 1, so (b1 - b0) t^2 / 2 + b0 t = log(1 + sigma^2)."""
    sde = _make("vp")
    b0, b1 = sde.beta_min, sde.beta_max
    sigma = np.array([3e-3, 0.05, 0.3, 1.0, 7.0, 80.0])
    expected = (-b0 + np.sqrt(b0**2 + 2 * (b1 - b0) * np.log1p(sigma**2))) / (b1 - b0)
    np.testing.assert_allclose(sde.time_at_noise_level(jnp.asarray(sigma)), expected, rtol=1e-5)
