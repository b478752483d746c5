"""Density-weighted federation: the Ito/ODE log-density estimator and the superdiff members,
against closed forms on agents whose data are Gaussians (their diffused scores and densities are
exact)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedinf_jax.agents import agent_axis
from fedinf_jax.diffusion import density
from fedinf_jax.diffusion.sde import VESDE, VPSDE, SubVPSDE
from fedinf_jax.sampling import aggregators as A
from fedinf_jax.sampling import federated_sampler, reverse, solvers

S0 = 0.5  # each agent's data: an equal-weight mixture of N(mu_ic, S0^2 I) in 2-D
MUS = jnp.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])  # one component per agent
# Two components per agent, on lines that cross: the agents' Jacobians are not diagonal.
MIXTURES = jnp.array([[[2.0, 2.0], [-1.0, -1.0]], [[-2.0, 2.0], [1.5, -1.0]]])


def _components(mu):
    return mu if mu.ndim == 2 else mu[None]  # (components, 2)


def _log_density(sde, x, t, mu):
    """log p_t(x) of the diffused mixture: components N(alpha mu_c, (alpha^2 S0^2 + std^2) I)."""
    alpha, std = sde.marginal(t)
    var = alpha**2 * S0**2 + std**2
    mu = _components(mu)
    sq = jnp.sum((x[..., None, :] - jnp.asarray(alpha)[..., None, None] * mu) ** 2, -1)
    log_norm = -0.5 * x.shape[-1] * jnp.log(2 * jnp.pi * var)
    return (
        jax.nn.logsumexp(-0.5 * sq / jnp.asarray(var)[..., None], -1)
        - jnp.log(len(mu))
        + (log_norm)
    )


def true_log_density(sde, x, t, mu):
    return _log_density(sde, x, jnp.broadcast_to(t, x.shape[:1]), mu)


def gaussian_agents(sde):
    def score(params, x, t, y):
        return jax.grad(lambda z: jnp.sum(_log_density(sde, z, t, params["mu"])))(x)

    return agent_axis.over_agents(score, "vmap", in_axes=(0, None, None, None))


def solve(sde, aggregator, method, solver, steps, n, mus, save=0, denoise=True, seed=0):
    spec = solvers.SolverSpec(
        method=method,
        solver=solvers.make_solver(method, solver),
        num_steps=steps,
        save_trajectory=save,
        denoise=denoise,
    )
    sampler = federated_sampler.FederatedSampler(gaussian_agents(sde), sde, aggregator, spec, (2,))
    return sampler, sampler(
        {"mu": mus}, federated_sampler.sample_keys(seed, n), jnp.zeros(n, jnp.int32)
    )


def test_log_density_rate_worked_forms():
    """The general rate reduces to its VP and VE forms (fedinf_jax/diffusion/density.py); the ODE
    adds -(g^2/2) div s."""
    k1, k2 = jax.random.split(jax.random.key(0))
    scores = jax.random.normal(k1, (3, 4, 5))
    x = jax.random.normal(k2, (4, 5))
    t = jnp.linspace(0.1, 0.9, 4)
    vp = VPSDE()
    beta = vp.beta(t)
    expected = -0.5 * beta * (5 + jnp.einsum("bd,kbd->kb", x, scores) + jnp.sum(scores**2, -1))
    np.testing.assert_allclose(
        density.log_density_rate(vp, "sde", scores, t, x), expected, rtol=1e-5
    )
    ve = VESDE()
    g2 = ve.diffusion(t) ** 2
    np.testing.assert_allclose(
        density.log_density_rate(ve, "sde", scores, t, x),
        -0.5 * g2 * jnp.sum(scores**2, -1),
        rtol=1e-5,
    )
    div = jnp.ones((3, 4))
    np.testing.assert_allclose(
        density.log_density_rate(ve, "ode", scores, t, x, div),
        -0.5 * g2 * (jnp.sum(scores**2, -1) + 1.0),
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="needs the scores' divergence"):
        density.log_density_rate(ve, "ode", scores, t, x)


def test_hutchinson_divergence():
    """Exact for a diagonal Jacobian with one probe; unbiased for a full one."""
    mat = jax.random.normal(jax.random.key(1), (6, 6))
    x = jax.random.normal(jax.random.key(2), (3, 6))

    def score_fn(z):  # two "agents": s_1 = z A^T, s_2 = z diag(d)
        return jnp.stack([z @ mat.T, z * jnp.arange(6.0)])

    keys = jax.random.split(jax.random.key(3), 3)
    scores, div = density.scores_and_divergence(
        score_fn, x, density.rademacher_probes(keys, 4000, (6,))
    )
    np.testing.assert_allclose(scores, score_fn(x), rtol=1e-6)
    np.testing.assert_allclose(div[1], 15.0, rtol=1e-6)
    np.testing.assert_allclose(div[0], jnp.trace(mat), atol=0.25)  # sd ~ ||A||_F / sqrt(4000)
    _, one = density.scores_and_divergence(score_fn, x, density.rademacher_probes(keys, 1, (6,)))
    np.testing.assert_allclose(one[1], 15.0, rtol=1e-6)


@pytest.mark.parametrize(
    "sde,method,solver,steps,probes,mus,tol,tol_diff",
    [
        (VPSDE(), "sde", "euler", 1000, 0, MUS[:2], 0.35, 0.2),
        (VESDE(), "sde", "euler", 1000, 0, MUS[:2], 0.35, 0.2),
        (VPSDE(), "sde", "euler", 1000, 0, MIXTURES, 0.35, 0.25),
        (VPSDE(), "ode", "heun", 200, 4, MIXTURES, 0.15, 0.25),
    ],
    ids=[
        "VP-sde-gaussians",
        "VE-sde-gaussians",
        "VP-sde-mixtures",
        "VP-ode-mixtures",
    ],
)
def test_tracked_log_density_matches_the_closed_form(
    sde, method, solver, steps, probes, mus, tol, tol_diff
):
    """log q_i carried through the solve equals log p_i,t(x_t) along every trajectory (mean
    absolute error over samples): Euler-Maruyama's Ito estimator up to its strong O(sqrt(dt))
    error, the ODE's change of variables up to the prior mismatch at T and, for the mixtures'
    non-diagonal Jacobians, Hutchinson's noise; also for the agents' difference, which is what
    the weights use."""
    agg = A.superdiff_or(sde, method, prior="uniform", probes=max(probes, 1))
    _, out = solve(sde, agg, method, solver, steps, 300, mus, save=5, denoise=False)
    for s in range(1, 5):
        t, x = out.trajectory_t[s], out.trajectory[s]
        err = [
            out.trajectory_state.log_q[s, i] - true_log_density(sde, x, t, mus[i]) for i in (0, 1)
        ]
        assert float(jnp.mean(jnp.abs(err[0]))) < tol, (s, float(t))
        assert float(jnp.mean(jnp.abs(err[0] - err[1]))) < tol_diff, (s, float(t))


def test_ito_estimator_converges_with_the_step():
    sde = SubVPSDE()
    errors = []
    for steps in (250, 2000):
        _, out = solve(
            sde,
            A.superdiff_or(sde, "sde", prior="uniform"),
            "sde",
            "euler",
            steps,
            300,
            MUS[:2],
            2,
            False,
        )
        err = out.aggregator_state.log_q[0] - true_log_density(sde, out.images, 1e-3, MUS[0])
        errors.append(float(jnp.mean(jnp.abs(err))))
    assert errors[1] < 0.5 * errors[0], errors  # strong order 1/2: sqrt(8) smaller


@pytest.mark.parametrize(
    "method,solver,steps,share", [("sde", "euler", 500, 0.2), ("ode", "heun", 100, 0.5)]
)
def test_superdiff_or_samples_the_mixture(method, solver, steps, share):
    """Two agents N(+-3 e_1, S0^2 I) with prior (share, 1 - share): superdiff_or's samples split
    between the modes in those proportions with the mixture's mean; the uniform mean puts them
    between the modes (the product of experts), near neither."""
    sde, n = VPSDE(), 2000
    prior = np.log([[share], [1.0 - share]])
    _, out = solve(sde, A.superdiff_or(sde, method, prior=prior), method, solver, steps, n, MUS[:2])
    x = np.asarray(out.images)
    # Each mode is N(+-3, S0^2) along e_1, so |x_1| > 1.5 holds for all but 0.1% of its samples.
    assert np.mean(np.abs(x[:, 0]) > 1.5) > 0.99
    assert abs(np.mean(x[:, 0] > 0) - share) < 0.04
    mixture_mean = share * MUS[0] + (1 - share) * MUS[1]
    np.testing.assert_allclose(x.mean(axis=0), mixture_mean, atol=0.2)
    _, out = solve(sde, A.mean(), method, solver, steps, n, MUS[:2])
    assert np.mean(np.abs(np.asarray(out.images)[:, 0]) > 1.5) < 0.01


def test_route_samples_the_prior_mixture():
    """``route`` on the two agents N(+-3 e_1, S0^2 I) with prior (0.3, 0.7): each sample follows
    one agent's flow, so the samples split between the modes in the prior's proportions; a
    sample whose agent is 0 ends at agent 0's mode."""
    sde, n, share = VPSDE(), 2000, 0.3
    prior = np.log([[share], [1.0 - share]])
    _, out = solve(sde, A.route(prior=prior), "ode", "heun", 100, n, MUS[:2])
    x, agent = np.asarray(out.images), np.asarray(out.aggregator_state.agent)
    assert abs(np.mean(agent == 0) - share) < 0.04  # about 4 standard errors
    np.testing.assert_array_equal(x[:, 0] > 0, agent == 0)
    assert np.mean(np.abs(x[:, 0] - np.where(agent == 0, 3.0, -3.0)) < 1.5) > 0.99
    np.testing.assert_allclose(x[:, 1].std(), S0, rtol=0.1)


@pytest.mark.parametrize(
    "method,solver,steps,k", [("sde", "euler", 300, 3), ("ode", "heun", 100, 2)]
)
def test_superdiff_and_keeps_the_densities_equal(method, solver, steps, k):
    """The agents' tracked log-densities move together, and the samples land where the true
    densities are equal: on the bisector x_1 = 0 (K = 2), at the circumcentre 0 (K = 3)."""
    sde, n = VPSDE(), 500
    _, out = solve(sde, A.superdiff_and(sde, method), method, solver, steps, n, MUS[:k], save=4)
    log_q = out.trajectory_state.log_q
    assert float(jnp.max(jnp.abs(log_q - log_q[:, :1]))) < 5e-3
    x = np.asarray(out.images)
    assert np.abs(x[:, 0]).max() < 0.02
    if k == 3:
        assert np.abs(x[:, 1]).max() < 0.02
    else:  # along the bisector the samples keep the data's spread
        assert 0.4 < x[:, 1].std() < 0.6


def test_superdiff_and_is_superdiffs_two_agent_equation():
    """For K = 2 the member's Euler-Maruyama step is SuperDiff's: kappa solves
    d log q_1 = d log q_2 over the step with the Brownian increment drawn, i.e.
    <s_1 - s_2, dx(kappa)> + dtau (a_1 - a_2) = 0, dx(kappa) = dtau (-f + g^2 (kappa s_1 +
    (1 - kappa) s_2)) + g dW. A hand-written loop on the sampler's grid and increments."""
    sde, n, steps = VPSDE(), 64, 50
    sampler, out = solve(
        sde,
        A.superdiff_and(sde, "sde", ridge=0.0),
        "sde",
        "euler",
        steps,
        n,
        MUS[:2],
        denoise=False,
    )
    keys = federated_sampler.sample_keys(0, n)
    tau1 = sde.T - sampler.spec.t_end
    taus = jnp.linspace(0.0, tau1, steps + 1)
    x, path_keys = sampler.prior(keys)
    path = reverse.brownian_paths(sampler.spec, path_keys, tau1, sampler.image_shape)
    score_fn = gaussian_agents(sde)

    def step(x, taus):
        tau0, tau_next = taus
        dtau, t = tau_next - tau0, jnp.full((n,), sde.T - tau0)
        s = score_fn({"mu": MUS[:2]}, x, t, None)
        a = density.log_density_rate(sde, "sde", s, t, x)
        g = sde.diffusion(t)[:, None]
        dw = path.evaluate(tau0, tau_next)
        base = dtau * (-sde.drift(x, t) + g**2 * s[1]) + g * dw  # dx at kappa = 0
        delta = s[0] - s[1]
        # <delta, base + kappa dtau g^2 delta> + dtau (a_1 - a_2) = 0
        kappa = -(jnp.sum(delta * base, -1) + dtau * (a[0] - a[1])) / (
            dtau * g[:, 0] ** 2 * jnp.sum(delta**2, -1)
        )
        return x + base + kappa[:, None] * dtau * g**2 * delta, None

    x, _ = jax.lax.scan(step, x, (taus[:-1], taus[1:]))
    np.testing.assert_allclose(out.images, x, rtol=1e-3, atol=1e-3)


def test_noise_driven_state_costs_one_evaluation_per_step_and_needs_an_ito_solver():
    sde = VPSDE()
    _, out = solve(sde, A.superdiff_or(sde, "sde", prior="uniform"), "sde", "euler", 12, 4, MUS[:2])
    assert out.stats["score_evaluations"] == 12 + 1  # + the denoising step
    with pytest.raises(ValueError, match=r"Stratonovich solver.*use an Ito solver: \['euler'\]"):
        solve(sde, A.superdiff_or(sde, "sde", prior="uniform"), "sde", "heun", 12, 4, MUS[:2])
