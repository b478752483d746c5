"""The federated sampler: closed forms, equivalences, determinism, failures, the CLI."""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from fedinf_jax.agents import agent_axis
from fedinf_jax.core import errors, runtime
from fedinf_jax.diffusion.sde import VESDE, VPSDE, SubVPSDE
from fedinf_jax.evaluation import sample_sets
from fedinf_jax.sampling import aggregators, federated_sampler, federated_score, reverse, solvers
from fedinf_jax.workflows import federation, sample_lib
from tests.conftest import count_cache_reads, count_compiles, count_traces, zero_fill_data_files

S0 = 0.5  # every agent's data: N(mu_i, S0^2 I)
MUS = jnp.array([[4.0, -2.0], [-2.0, 1.0], [1.0, 4.0]])


def gaussian_agents(sde, strategy="vmap"):
    """Agents whose scores are exact: data N(mu_i, S0^2 I) diffused by ``sde`` is
    N(alpha mu_i, (alpha^2 S0^2 + std^2) I)."""

    def score(params, x, t, y):
        alpha, std = sde.marginal(t)
        alpha, var = alpha[:, None], (alpha**2 * S0**2 + std**2)[:, None]
        return -(x - alpha * params["mu"]) / var

    return agent_axis.over_agents(score, strategy, in_axes=(0, None, None, None))


def make_sampler(sde, aggregator, method="ode", solver="euler", num_steps=20, **spec):
    spec = solvers.SolverSpec(
        method=method, solver=solvers.make_solver(method, solver), num_steps=num_steps, **spec
    )
    return federated_sampler.FederatedSampler(gaussian_agents(sde), sde, aggregator, spec, (2,))


def draw(sampler, n, seed=0, mus=MUS):
    return sampler({"mu": mus}, federated_sampler.sample_keys(seed, n), jnp.zeros(n, jnp.int32))


CLOSED_FORM_CASES = [
    # (sde, method, solver, steps, adaptive, t_end, denoise, aggregator)
    (VPSDE(), "ode", "tsit5", 20, True, 1e-3, True, "mean"),
    (VPSDE(), "sde", "euler", 400, False, 1e-3, True, "weighted"),
    (VPSDE(), "sde", "euler", 400, False, 0.05, True, "mean"),
    (VPSDE(), "ode", "heun", 100, False, 0.05, False, "weighted"),  # the paper's stop, no denoise
    (VESDE(), "sde", "shark", 200, False, 1e-3, True, "mean"),
    (SubVPSDE(), "sde", "heun", 20, True, 1e-3, True, "weighted"),
]


@pytest.mark.parametrize(
    "case",
    CLOSED_FORM_CASES,
    ids=lambda c: (
        f"{type(c[0]).__name__}-{c[1]}-{c[2]}-t_end{c[5]}-{'denoise' if c[6] else 'raw'}-{c[7]}"
    ),
)
def test_gaussian_federation_matches_closed_form(case):
    """The w-weighted average of the agents' exact scores is the exact score of the diffused
    N(sum_i w_i mu_i, S0^2 I), so the samples must have its moments: at t_end, N(alpha m,
    (alpha^2 S0^2 + std^2) I); after Tweedie's denoising, E[x_0 | x_t_end], with mean m and
    standard deviation S0^2 alpha / sqrt(alpha^2 S0^2 + std^2)."""
    sde, method, solver, steps, adaptive, t_end, denoise, name = case
    w = np.array([0.2, 0.3, 0.5]) if name == "weighted" else np.full(3, 1 / 3)
    agg = aggregators.weighted(w) if name == "weighted" else aggregators.mean()
    sampler = make_sampler(
        sde,
        agg,
        method,
        solver,
        steps,
        adaptive=adaptive,
        rtol=1e-2 if method == "sde" else 1e-4,  # SDE: the error is the Brownian path's
        atol=1e-2 if method == "sde" else 1e-4,
        t_end=t_end,
        denoise=denoise,
    )
    _assert_closed_form(np.asarray(draw(sampler, 4000).images), sde, w, t_end, denoise)


def _assert_closed_form(x, sde, w, t_end, denoise, mus=MUS):
    m = w @ np.asarray(mus)
    alpha, std = (float(v) for v in sde.marginal(jnp.asarray(t_end)))
    spread = np.sqrt(alpha**2 * S0**2 + std**2)
    want_mean, want_std = (m, S0**2 * alpha / spread) if denoise else (alpha * m, spread)
    # Standard errors with 4000 samples: mean 0.008, std 0.006.
    np.testing.assert_allclose(x.mean(axis=0), want_mean, atol=0.04)
    np.testing.assert_allclose(x.std(axis=0), want_std, atol=0.025)


def test_guided_gaussian_federation_matches_the_tilted_closed_form():
    """Agents whose data for label y is N(mu_{i,y}, S0^2 I) and whose null-label model is
    N(mu_{i,null}, S0^2 I): under the guided mean, s = S_null + w (S_y - S_null) is at every t the
    exact score of the diffused N(m_null + w (m_y - m_null), S0^2 I) (m: the agents' average
    means), so the samples have its moments; the null-label scores come from the same call."""
    sde, w, null = VPSDE(), 2.0, 1

    def score(params, x, t, y):
        alpha, std = sde.marginal(t)
        alpha, var = alpha[:, None], (alpha**2 * S0**2 + std**2)[:, None]
        return -(x - alpha * params["mu"][y]) / var

    lifted = agent_axis.over_agents(score, "vmap", in_axes=(0, None, None, None))
    mus = jnp.stack([MUS, MUS[::-1] - 1.0], axis=1)  # (agents, label 0 and the null label, 2)
    spec = solvers.SolverSpec(
        method="ode", solver=solvers.make_solver("ode", "tsit5"), adaptive=True, rtol=1e-4,
        atol=1e-4, t_end=1e-3,
    )  # fmt: skip
    sampler = federated_sampler.FederatedSampler(
        federated_score.with_null_label(lifted, null),
        sde,
        aggregators.guided(aggregators.mean(), w, null),
        spec,
        (2,),
        num_agents=3,
    )
    x = draw(sampler, 4000, mus=mus).images
    m_y, m_null = np.asarray(mus).mean(axis=0)
    _assert_closed_form(np.asarray(x), sde, np.ones(1), 1e-3, True, [m_null + w * (m_y - m_null)])


_CLOSED_FORM_SDE_SOLVERS = {c[2] for c in CLOSED_FORM_CASES if c[1] == "sde"}


@pytest.mark.parametrize(
    "solver", [n for n in solvers.SDE_SOLVERS.names() if n not in _CLOSED_FORM_SDE_SOLVERS]
)
def test_every_sde_solver_reaches_the_closed_form(solver):
    """Each registered SDE solver the cases above leave out, on 200 constant steps of the
    reverse VP SDE with the uniform mean: the closed form (the noise is additive, so Ito and
    Stratonovich solvers converge to the same process)."""
    sde = VPSDE()
    sampler = make_sampler(sde, aggregators.mean(), "sde", solver, 200)
    _assert_closed_form(np.asarray(draw(sampler, 4000).images), sde, np.full(3, 1 / 3), 1e-3, True)


@pytest.mark.parametrize("schedule", ["karras", "log_snr"])
def test_second_order_ode_on_a_sigma_schedule_matches_closed_form(schedule):
    """Heun on the probability-flow ODE with 18 steps (36 evaluations) placed by a sigma
    schedule reaches the closed form of the uniform-weight Gaussian federation."""
    sde = VPSDE()
    sampler = make_sampler(sde, aggregators.mean(), "ode", "heun", 18, schedule=schedule)
    _assert_closed_form(np.asarray(draw(sampler, 4000).images), sde, np.full(3, 1 / 3), 1e-3, True)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(), SubVPSDE()], ids=lambda s: type(s).__name__)
def test_step_grids(sde):
    n, t_end = 12, 1e-3
    tau1 = np.float32(sde.T - t_end)
    for schedule in solvers.SCHEDULES:
        tau = np.asarray(solvers.tau_grid(sde, schedule, n, t_end))
        assert tau.shape == (n + 1,) and tau[0] == 0.0 and tau[-1] == tau1
        assert np.all(np.diff(tau) > 0), schedule
    sigma = lambda tau: np.asarray(sde.noise_level(sde.T - jnp.asarray(tau)))  # noqa: E731
    s = sigma(solvers.tau_grid(sde, "log_snr", n, t_end))
    np.testing.assert_allclose(np.diff(np.log(s)), np.log(s[-1] / s[0]) / n, rtol=1e-3)
    s = sigma(solvers.tau_grid(sde, "karras", n, t_end))
    root = s ** (1 / solvers.KARRAS_RHO)
    np.testing.assert_allclose(np.diff(root), (root[-1] - root[0]) / n, rtol=1e-3)

    # The uniform grid is the one the sampler always used (the same Brownian increments).
    np.testing.assert_array_equal(
        solvers.tau_grid(sde, "uniform", n, t_end), jnp.linspace(0.0, sde.T - t_end, n + 1)
    )


def reverse_euler_maruyama(sampler, params, keys, labels):
    """A hand-written ``lax.scan`` Euler-Maruyama on the sampler's grid and Brownian increments,
    before denoising: the oracle ``FederatedSampler`` is tested against."""
    spec, sde = sampler.spec, sampler.sde
    tau1 = sde.T - spec.t_end
    taus = jnp.linspace(0.0, tau1, spec.num_steps + 1)
    x, path_keys = sampler.prior(keys)
    path = reverse.brownian_paths(spec, path_keys, tau1, sampler.image_shape)
    agg = sampler.aggregator.init(sampler.agents_in(params), x, labels, None)

    def step(x, tau_pair):
        tau0, tau_next = tau_pair
        t = sde.T - tau0
        score = sampler.score(params, labels, None, x, t, agg).score
        drift = -sde.drift(x, t) + sde.diffusion(t) ** 2 * score
        dw = path.evaluate(tau0, tau_next)
        return x + (tau_next - tau0) * drift + sde.diffusion(t) * dw, None

    x, _ = jax.lax.scan(step, x, (taus[:-1], taus[1:]))
    return x


# Strong and weak orders for additive noise (Kloeden and Platen; Diffrax's solver docs): (strong,
# weak). The fitted strong slope must lie within STRONG_TOL of its order, the weak slope at most
# WEAK_TOL below its order: here the drift is linear in x, so the sample means follow the
# scheme applied to the mean's ODE, whose error may fall faster than its order at these steps
# (Heun's: 2.96).
SDE_ORDERS = {"euler": (1.0, 1.0), "heun": (1.0, 2.0), "shark": (1.5, 2.0)}
STRONG_TOL, WEAK_TOL = 0.3, 0.3


def test_sde_solvers_converge_at_their_strong_and_weak_orders_on_one_brownian_tree():
    """With ``brownian="tree"`` every step grid and solver integrates the same Brownian path of
    each sample, so each solver's samples converge to a fine ShARK solve of those paths: the
    RMS difference per sample at the solver's strong order, the difference of the sample means
    (the same paths, so the Monte Carlo noise cancels to first order) at its weak order. With
    "auto" (per-step draws) another grid walks other paths."""
    sde = VPSDE()

    @functools.cache
    def sampler_of(solver, brownian):  # one compiled solve per solver, each budget its input
        return make_sampler(
            sde,
            aggregators.mean(),
            "sde",
            solver,
            brownian=brownian,
            max_steps=256,  # the tree resolved to (T - t_end) / 1024, the same in every solve
            denoise=False,
        )

    def solve(num_steps, solver="euler", brownian="tree"):
        sampler = sampler_of(solver, brownian).with_budget(num_steps=num_steps)
        return np.asarray(draw(sampler, 256).images, np.float64)

    reference = solve(256, "shark")
    steps = (16, 64)
    for solver, (strong, weak) in SDE_ORDERS.items():
        solves = [solve(n, solver) for n in steps]
        strong_errors = [np.sqrt(np.mean((x - reference) ** 2)) for x in solves]
        weak_errors = [np.abs(x.mean(axis=0) - reference.mean(axis=0)).max() for x in solves]
        fitted = [-np.polyfit(np.log(steps), np.log(e), 1)[0] for e in (strong_errors, weak_errors)]
        assert abs(fitted[0] - strong) < STRONG_TOL, (solver, strong_errors, fitted)
        assert fitted[1] > weak - WEAK_TOL, (solver, weak_errors, fitted)
        if solver == "euler":
            other_paths = np.sqrt(np.mean((solve(64, brownian="auto") - reference) ** 2))
            assert other_paths > 10 * strong_errors[-1], (other_paths, strong_errors)


def test_diffrax_euler_maruyama_equals_a_scan():
    sampler = make_sampler(VPSDE(), aggregators.mean(), "sde", "euler", 50, denoise=False)
    keys, labels = federated_sampler.sample_keys(3, 64), jnp.zeros(64, jnp.int32)
    out = sampler({"mu": MUS}, keys, labels)
    ref = jax.jit(reverse_euler_maruyama, static_argnums=0)(sampler, {"mu": MUS}, keys, labels)
    np.testing.assert_allclose(out.images, ref, rtol=1e-5, atol=1e-5)
    assert out.stats["score_evaluations"] == 50


@pytest.mark.parametrize("solver,per_step", [("euler", 1), ("heun", 2)])
def test_score_evaluations_are_counted(solver, per_step):
    out = draw(make_sampler(VPSDE(), aggregators.mean(), "ode", solver, 7), 4)
    assert out.stats["score_evaluations"] == 7 * per_step + 1  # + the denoising step
    assert int(out.stats["num_accepted_steps"]) == 7


def test_host_and_value_tallies_agree():
    """The evaluations tallied on the host (host callbacks, as for the implicit solvers) and as
    values in the solve: the same count, the same first non-finite evaluation."""
    sde = VPSDE()
    base_scores = gaussian_agents(sde)

    def late_failure(params, x, t, y):  # agent 2 overflows once t < 0.5
        s = base_scores(params, x, t, y)
        return s.at[2].set(jnp.where(t[:, None] < 0.5, jnp.inf, s[2]))

    spec = solvers.SolverSpec(method="ode", solver=solvers.make_solver("ode", "heun"), num_steps=7)
    tallied = []
    for host in (False, True):
        sampler = federated_sampler.FederatedSampler(
            late_failure, sde, aggregators.mean(), spec, (2,), host_tally=host
        )
        out = sampler.run({"mu": MUS}, federated_sampler.sample_keys(0, 4), jnp.zeros(4, jnp.int32))
        tallied.append((out.failure, out.stats["score_evaluations"]))
    assert tallied[0] == tallied[1]
    assert tallied[0] == ("agent(s) [2] gave non-finite scores at t = 0.429143", 2 * 7 + 1)


@pytest.fixture
def cache_every_program():
    """The persistent cache keeps every program, however fast it compiled (the suite's own
    cache, ``conftest.compilation_cache``, keeps those over a second, as the entry points do)."""
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


def test_a_repeated_solve_is_read_from_the_persistent_cache(cache_every_program):
    """The solve's program holds no host callback, so the persistent compilation cache keeps it:
    once the in-memory caches are cleared (as in a new process), the same sampler compiles
    nothing. (The default sampler's solver and guidance, on the Gaussian agents.)"""
    spec = solvers.SolverSpec(
        method="sde",
        solver=solvers.make_solver("sde", "dpmpp_1"),
        num_steps=5,
        schedule="karras",
    )

    def solve():
        agg = aggregators.guided(aggregators.mean(), 2.0, None, (0.08, 0.58))
        sampler = federated_sampler.FederatedSampler(
            gaussian_agents(VPSDE()), VPSDE(), agg, spec, (2,)
        )
        return draw(sampler, 4, mus=jnp.concatenate([MUS, MUS]))

    jax.clear_caches()  # every program of the solve is looked up, compiled and kept
    first = solve()
    jax.clear_caches()
    with count_compiles() as compiles, count_cache_reads() as reads:
        again = solve()
    assert len(compiles) == len(reads) > 0  # every program read, none compiled
    np.testing.assert_array_equal(first.images, again.images)


def test_one_agent_under_each_aggregator_path_is_that_agent():
    sde = VPSDE()
    alone = aggregators.Aggregator(
        lambda k, x, y, keys: aggregators.EmptyState(), lambda s, t, x, y, st: (s[0], st)
    )
    ref = draw(make_sampler(sde, alone), 16, mus=MUS[:1]).images
    cfg = base.get_config("smoke").aggregator
    # The stateless members share one sampler path (their one-agent algebra is in
    # test_aggregators); the stateful ones each have their own.
    for name in ("mean", "superdiff_or", "superdiff_and"):
        cfg.name = name
        agg = aggregators.from_config(cfg, np.ones((1, 10)), 1, sde, "ode")
        out = draw(make_sampler(sde, agg), 16, mus=MUS[:1]).images
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6, err_msg=name)


def test_no_recompilation_across_batches_and_calls():
    """One compiled solve serves every batch (the last one padded) and every later call."""
    sampler = make_sampler(VPSDE(), aggregators.mean(), "sde", "euler", 5)
    labels = np.arange(10, dtype=np.int32) % 3
    sample_lib.sample_in_batches(sampler, {"mu": MUS}, labels[:8], 4, seed=0)  # compiles
    with count_traces() as traces:
        drawn = sample_lib.sample_in_batches(sampler, {"mu": MUS}, labels, 4, seed=1)
    assert traces == [] and len(drawn.per_batch["num_steps"]) == 3


def test_another_budget_shares_the_compiled_solve_and_gives_a_fresh_samplers_numbers():
    """The budget (constant steps' grid, adaptive tolerances) is an input of the compiled solve:
    ``with_budget`` reuses it (no trace) and samples exactly what a sampler built with that
    budget does."""
    for method, solver, budget in (
        ("sde", "euler", {"num_steps": 7, "schedule": "karras"}),
        ("ode", "tsit5", {"rtol": 1e-4, "atol": 1e-5, "num_steps": 3}),
    ):
        adaptive = solver == "tsit5"
        sampler = make_sampler(VPSDE(), aggregators.mean(), method, solver, adaptive=adaptive)
        draw(sampler, 8)  # compiles
        other = sampler.with_budget(**budget)
        with count_traces() as traces:
            retimed = draw(other, 8)
        assert traces == [], budget
        fresh = make_sampler(
            VPSDE(), aggregators.mean(), method, solver, adaptive=adaptive, **budget
        )
        np.testing.assert_array_equal(retimed.images, draw(fresh, 8).images)
        if not adaptive:
            assert int(retimed.stats["num_steps"]) == 7
    constant = make_sampler(VPSDE(), aggregators.mean(), "sde", "euler")
    with pytest.raises(ValueError, match="max_steps must be >= 1 and, for constant steps"):
        constant.with_budget(num_steps=5000)  # past the grid's padded length
    with pytest.raises(ValueError, match=r"not budget fields: \['solver'\]"):
        constant.with_budget(solver=None)


def test_determinism_and_batch_independence():
    sampler = make_sampler(VPSDE(), aggregators.mean(), "sde", "euler", 20)
    a, b = draw(sampler, 8).images, draw(sampler, 8).images
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, draw(sampler, 8, seed=1).images)
    # Sample i depends on its own key only: the first 4 of a batch of 8 are a batch of 4.
    np.testing.assert_allclose(draw(sampler, 4).images, a[:4], rtol=1e-5, atol=1e-5)
    # Every sample gets its own Brownian path and prior draw.
    assert len(np.unique(np.round(np.asarray(a[:, 0]), 5))) == 8


def _tracking_aggregator():
    """A toy stateful member: its state integrates d(state) = sum(dx) + dt, so at t_end it
    must equal sum(x_end - x_T) + (T - t_end) exactly, whichever solver."""

    def init(k, x, y, keys):
        return jnp.zeros(x.shape[0])

    def aggregate(scores, t, x, y, state):
        return jnp.mean(scores, axis=0), state

    def tendency(scores, t, x, y, state, dx, dt):
        return jnp.sum(dx, axis=1) + dt

    return aggregators.Aggregator(init, aggregate, tendency)


@pytest.mark.parametrize(
    "method,solver,steps,adaptive", [("sde", "euler", 30, False), ("ode", "tsit5", 10, True)]
)
def test_aggregator_state_is_carried_through_the_solve(method, solver, steps, adaptive):
    sde = VPSDE()
    sampler = make_sampler(
        sde, _tracking_aggregator(), method, solver, steps, adaptive=adaptive, denoise=False
    )
    keys = federated_sampler.sample_keys(0, 32)
    out = sampler({"mu": MUS}, keys, jnp.zeros(32, jnp.int32))
    x_T, _ = sampler.prior(keys)
    expected = np.sum(out.images - x_T, axis=1) + (sde.T - sampler.spec.t_end)
    np.testing.assert_allclose(out.aggregator_state, expected, rtol=1e-4, atol=1e-4)


def test_trajectory_is_saved_from_T_to_t_end():
    sampler = make_sampler(
        VPSDE(), aggregators.mean(), num_steps=10, save_trajectory=4, denoise=False
    )
    out = draw(sampler, 5)
    np.testing.assert_allclose(
        out.trajectory_t, [1.0, 1.0 - 0.999 / 3, 1.0 - 2 * 0.999 / 3, 1e-3], atol=1e-6
    )
    assert out.trajectory.shape == (4, 5, 2)
    np.testing.assert_array_equal(out.trajectory[-1], out.images)


def test_non_finite_scores_name_the_agent_and_time():
    sampler = make_sampler(VPSDE(), aggregators.mean(), num_steps=10)
    with pytest.raises(
        FloatingPointError, match=r"agent\(s\) \[1\] gave non-finite scores at t = 1$"
    ):
        draw(sampler, 4, mus=MUS.at[1, 0].set(jnp.nan))

    sde = VPSDE()
    base_scores = gaussian_agents(sde)

    def late_failure(params, x, t, y):  # agent 2 overflows once t < 0.3
        s = base_scores(params, x, t, y)
        return s.at[2].set(jnp.where(t[:, None] < 0.3, jnp.inf, s[2]))

    spec = solvers.SolverSpec(
        method="ode", solver=solvers.make_solver("ode", "euler"), num_steps=10
    )
    sampler = federated_sampler.FederatedSampler(
        late_failure, sde, aggregators.median(), spec, (2,)
    )
    with pytest.raises(FloatingPointError, match=r"agent\(s\) \[2\] .* at t = 0\.2"):
        draw(sampler, 4)


def test_bad_settings_are_clear_errors():
    sde = VPSDE()
    with pytest.raises(ValueError, match=r"unknown sampler method 'pde'; valid: \['sde', 'ode'\]"):
        solvers.make_solver("pde", "euler")
    with pytest.raises(ValueError, match=r"unknown ode solver 'rk4'; valid: \['euler', 'heun'"):
        solvers.make_solver("ode", "rk4")
    for t_end in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"t_end must lie in \(0, T = 1.0\)"):
            make_sampler(sde, aggregators.mean(), t_end=t_end)
    with pytest.raises(
        ValueError,
        match=r"Euler has no error estimate.*adaptive sde solver: "
        r"\['heun', 'reversible_heun', 'spark'\]",
    ):
        make_sampler(sde, aggregators.mean(), "sde", "euler", adaptive=True)
    with pytest.raises(ValueError, match=r"adaptive steps need rtol > 0 and atol > 0; got 0.0"):
        make_sampler(sde, aggregators.mean(), "ode", "tsit5", adaptive=True, rtol=0.0)
    with pytest.raises(ValueError, match="save_trajectory must be 0"):
        make_sampler(sde, aggregators.mean(), save_trajectory=1)
    with pytest.raises(ValueError, match=r"unknown step schedule 'cosine'; valid: \['uniform'"):
        make_sampler(sde, aggregators.mean(), schedule="cosine")
    with pytest.raises(ValueError, match="adaptive steps are placed by the controller"):
        make_sampler(sde, aggregators.mean(), "ode", "tsit5", adaptive=True, schedule="karras")
    with pytest.raises(ValueError, match="one key per label"):
        make_sampler(sde, aggregators.mean())(
            {"mu": MUS}, federated_sampler.sample_keys(0, 3), jnp.zeros(4, jnp.int32)
        )
    config = base.get_config("smoke")
    config.sampler.solver = "nope"
    with pytest.raises(ValueError, match="unknown sde solver 'nope'"):
        solvers.SolverSpec.from_config(config.sampler, sde)


def test_paper_sampler_preset():
    config = base.get_config("cpu,paper_sampler")
    assert (config.sampler.method, config.sampler.solver, config.sampler.adaptive) == (
        "ode",
        "dopri5",
        True,
    )
    assert (config.sampler.t_end, config.sampler.denoise, config.aggregator.name) == (
        0.05,
        False,
        "mean",
    )
    assert config.model.block_out_channels == base.get_config("cpu").model.block_out_channels
    with pytest.raises(
        ValueError, match=r"unknown preset modifier 'fast'; valid: \['paper_sampler'\]"
    ):
        base.get_config("cpu,fast")


def test_sample_cli_writes_the_files(sample_cli_run):
    """``sample.py --config.aggregator.name=label_prior --config.sampler.save_trajectory=3`` on
    the smoke run (conftest)."""
    outdir = sample_cli_run
    with np.load(outdir / "samples.npz") as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (20, 28, 28)
        np.testing.assert_array_equal(f["labels"], np.repeat(np.arange(10), 2))
        assert f["trajectory"].shape == (3, 20, 28, 28)
        np.testing.assert_array_equal(f["batch_num_steps"], [8, 8])  # batches of 10
    record = json.loads((outdir / "samples.json").read_text())
    assert record["stats"]["score_evaluations"] == 2 * (8 + 1)  # over the two batches
    assert sample_sets.evaluations_per_sample(record["stats"]) == 8 + 1  # Table 1's column
    assert record["stats"]["checkpoint_step"] == 30 and record["stats"]["num_agents"] == 2
    assert record["config"]["aggregator"]["name"] == "label_prior"
    # The default sampler: DDPM's ancestral step (dpmpp_1 on the SDE) on Karras's grid.
    sampler = record["config"]["sampler"]
    assert (sampler["method"], sampler["solver"], sampler["schedule"]) == (
        "sde",
        "dpmpp_1",
        "karras",
    )
    assert (outdir / "samples.png").stat().st_size > 1000
    assert (outdir / "trajectory.png").stat().st_size > 1000


def test_sampling_bad_workdir_and_settings(smoke_run, tmp_path):
    config = base.get_config("smoke")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint under .*train first"):
        federation.run(config, str(tmp_path / "empty"))
    config.sampler.checkpoint_step = 7
    with pytest.raises(FileNotFoundError, match=r"no checkpoint step 7 .*\[10, 20, 30\]"):
        sample_lib.load_federation(config, str(smoke_run))
    config.sampler.checkpoint_step = -1
    restored = sample_lib.load_federation(config, str(smoke_run))
    assert restored.step == 30 and restored.counts.shape == (2, 10)
    config.aggregator.name = "superdiff"
    with pytest.raises(ValueError, match="unknown aggregator 'superdiff'"):
        sample_lib.build_sampler(sample_lib.load_federation(config, str(smoke_run)))
    config.aggregator.name, config.sampler.guidance = "mean", 2.0  # no null label in this run
    with pytest.raises(
        errors.ConfigError,
        match=r"sampler.guidance = 2.0 needs agents .* train.label_dropout > 0 .* trained with "
        r"train.label_dropout = 0.0",
    ):
        sample_lib.load_federation(config, str(smoke_run))
    config.sampler.guidance = -1.0
    with pytest.raises(errors.ConfigError, match=r"sampler.guidance must be >= 0"):
        sample_lib.check_config(config)


def test_a_damaged_checkpoint_is_one_error_line_naming_the_step(smoke_run, tmp_path, capsys):
    """The latest step's data files zero-filled: sampling stops with one ``error:`` line that
    names the step and its folder, exit status 2, and writes nothing."""
    workdir = tmp_path / "run"
    shutil.copytree(smoke_run, workdir)
    zero_fill_data_files(workdir / "checkpoints" / "30")
    outdir = tmp_path / "out"
    main = runtime.exit_on_user_error(
        lambda argv: federation.run(base.get_config("smoke"), str(workdir), str(outdir))
    )
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: checkpoint step 30 ({workdir / 'checkpoints' / '30'}) is ")
    assert "damaged, it cannot be read" in line and not outdir.exists()
    config = base.get_config("smoke")
    config.sampler.checkpoint_step = 20  # an intact step samples
    assert sample_lib.load_federation(config, str(workdir)).step == 20


def test_trained_sections_keep_defaults_for_fields_added_since():
    """A run recorded before a model field existed samples with that field's default."""
    config = base.get_config("smoke")
    record = json.loads(config.to_json_best_effort())
    del record["model"]["patch_size"]
    record["model"]["block_out_channels"] = [4, 8]
    merged = sample_lib._with_trained_sections(config, record, "run")
    assert merged.model.patch_size == 1
    assert tuple(merged.model.block_out_channels) == (4, 8)
