"""The exponential integrators (DPM-Solver++) against closed forms: a point mass, whose denoiser
is exact and constant, and the Gaussian federation of test_sampling; and the residual noise that
each last step leaves for the final Tweedie step."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from fedinf_jax.agents import agent_axis
from fedinf_jax.diffusion.sde import VPSDE
from fedinf_jax.sampling import aggregators, federated_sampler, solvers
from tests.test_sampling import MUS, _assert_closed_form, draw, make_sampler

MU = jnp.array([[0.7, -0.4]])  # one agent whose data is the point mass at MU


def point_mass_sampler(sde, method, solver, num_steps, aggregator=None, **spec):
    """One agent with the exact score of the diffused point mass, N(alpha MU, std^2 I):
    s = (alpha MU - x) / std^2, whose denoiser is MU at every t."""

    def score(params, x, t, y):
        alpha, std = sde.marginal(t)
        return (alpha[:, None] * params["mu"] - x) / std[:, None] ** 2

    spec = solvers.SolverSpec(
        method=method, solver=solvers.make_solver(method, solver), num_steps=num_steps, **spec
    )
    lifted = agent_axis.over_agents(score, "vmap", in_axes=(0, None, None, None))
    return federated_sampler.FederatedSampler(
        lifted, sde, aggregator or aggregators.mean(), spec, (2,)
    )


def _marginal(sde, t):
    alpha, std = sde.marginal(jnp.asarray(t, jnp.float32))
    return float(alpha), float(std)


@pytest.mark.parametrize("solver", ["dpmpp_1", "dpmpp_2m"])
def test_on_the_ode_a_point_mass_is_solved_exactly(solver):
    """With the denoiser constant (the point mass), DDIM and DPM-Solver++(2M) integrate the
    probability-flow ODE exactly at any steps: x(t) = alpha(t) MU + std(t) / std(T) (x_T -
    alpha(T) MU)."""
    sde, t_end = VPSDE(), 1e-3
    sampler = point_mass_sampler(sde, "ode", solver, 6, schedule="karras", denoise=False)
    keys = federated_sampler.sample_keys(0, 64)
    out = sampler({"mu": MU}, keys, jnp.zeros(64, jnp.int32))
    x_T, _ = sampler.prior(keys)
    (a_T, s_T), (a_end, s_end) = _marginal(sde, sde.T), _marginal(sde, t_end)
    want = a_end * MU + s_end / s_T * (x_T - a_T * MU)
    np.testing.assert_allclose(out.images, want, rtol=1e-5, atol=1e-6)
    assert out.stats["score_evaluations"] == 6


def _residual_prediction(sde, solver: str, taus: np.ndarray) -> tuple[float, float]:
    """(mean, std) of x - alpha(t_end) MU per coordinate (MU's first) after the reverse SDE on
    the solver times ``taus`` from x_T ~ N(0, I), for the point mass: each step is affine in x
    with Gaussian noise, so its mean m and variance v follow in closed form.

    Euler-Maruyama over dtau from t: x' = x + (beta x / 2 + beta (alpha MU - x) / std^2) dtau +
    sqrt(beta dtau) z. The ancestral step (dpmpp_1), with D = MU and h the step in
    log(alpha / std): x' = (std' / std) e^(-h) x + alpha' (1 - e^(-2h)) MU + std' sqrt(1 -
    e^(-2h)) z."""
    mu = float(MU[0, 0])
    m, v = -_marginal(sde, sde.T)[0] * mu, 1.0  # x_T - alpha(T) MU
    for tau0, tau1 in itertools.pairwise(taus):
        t, s = sde.T - tau0, sde.T - tau1
        (a_t, s_t), (a_s, s_s) = _marginal(sde, t), _marginal(sde, s)
        if solver == "euler":
            beta, dtau = float(sde.beta(t)), tau1 - tau0
            gain = 1 + 0.5 * beta * dtau - beta * dtau / s_t**2
            drift_of_mean = a_t * mu * (1 + 0.5 * beta * dtau) - a_s * mu
            m, v = gain * m + drift_of_mean, gain**2 * v + beta * dtau
        else:
            decay = np.exp(-(np.log(a_s / s_s) - np.log(a_t / s_t)))
            m, v = s_s / s_t * decay * m, (s_s / s_t * decay) ** 2 * v + s_s**2 * (1 - decay**2)
    return m, np.sqrt(v)


def test_the_last_steps_residual_noise_matches_its_prediction():
    """The reverse SDE on 10 uniform steps for a point mass: the noise left in the final state
    (before Tweedie's step) is what each step's closed form predicts. The ancestral step keeps
    exactly the marginal's std(t_end); Euler-Maruyama's last step adds beta dtau whatever the
    score removed, several times std(t_end)^2, which a Tweedie step at t_end, expecting
    std(t_end), cannot remove: the speckle of few-step Euler-Maruyama samples."""
    sde, t_end, n = VPSDE(), 1e-3, 4000
    taus = np.asarray(solvers.tau_grid(sde, "uniform", 10, t_end), np.float64)
    std_end = _marginal(sde, t_end)[1]
    residual_std = {}
    for solver in ("euler", "dpmpp_1"):
        sampler = point_mass_sampler(sde, "sde", solver, 10, denoise=False)
        x = np.asarray(
            sampler({"mu": MU}, federated_sampler.sample_keys(1, n), jnp.zeros(n)).images
        )
        residual = x - _marginal(sde, t_end)[0] * np.asarray(MU)
        mean, std = _residual_prediction(sde, solver, taus)
        # Standard errors of 2 x 4000 draws: the mean's std / 90, the std's std / 127.
        np.testing.assert_allclose(residual[:, 0].mean(), mean, atol=4 * std / 90)
        np.testing.assert_allclose(residual.std(axis=0), std, rtol=4 / 127)
        residual_std[solver] = std
    np.testing.assert_allclose(residual_std["dpmpp_1"], std_end, rtol=1e-3)
    assert residual_std["euler"] > 5 * std_end, residual_std


@pytest.mark.parametrize("method,num_steps", [("ode", 25), ("sde", 50)])
def test_second_order_multistep_reaches_the_gaussian_federations_closed_form(method, num_steps):
    """DPM-Solver++(2M) on Karras steps (25 on the ODE; its SDE form, whose noise adds to the
    error, 50), the uniform mean of the Gaussian federation (data N(mu_i, S0^2 I)): the closed
    form's moments after Tweedie's step."""
    sde = VPSDE()
    sampler = make_sampler(
        sde, aggregators.mean(), method, "dpmpp_2m", num_steps, schedule="karras"
    )
    _assert_closed_form(np.asarray(draw(sampler, 4000).images), sde, np.full(3, 1 / 3), 1e-3, True)
    assert int(draw(sampler, 4).stats["score_evaluations"]) == num_steps + 1


def test_a_state_that_moves_with_the_path_is_refused():
    """The exponential integrators step the images alone: a member whose tracked densities move
    with the path (superdiff_and) is refused with the solvers that step it, before any solve."""
    sde = VPSDE()
    for method in ("sde", "ode"):
        with pytest.raises(ValueError, match=r"dpmpp_1, dpmpp_2m.*\['euler', "):
            make_sampler(sde, aggregators.superdiff_and(sde, method), method, "dpmpp_1")
    assert solvers.solver_nature("sde", solvers.make_solver("sde", "dpmpp_1")) == {
        "calculus": "ito",
        "error_estimate": False,
    }
    make_sampler(sde, aggregators.mean(), "sde", "dpmpp_2m")  # a member without such state
    assert MUS.shape == (3, 2)
