"""Federated sampling: the reverse diffusion with an aggregate of K agents' scores, on Diffrax.

The server integrates, from the prior at t = T down to ``t_end``, either the reverse SDE
(Anderson 1982; Song et al. 2021, eq. 6)

    dx = [f(x, t) - g(t)^2 s(x, t, y)] dt + g(t) dW_bar

or the probability-flow ODE (Song et al. 2021, eq. 13)

    dx = [f(x, t) - g(t)^2 s(x, t, y) / 2] dt,

where s = aggregate(s_1, ..., s_K) combines the agents' scores (``fedinf_jax.aggregators``).
Both are solved in the forward-running variable tau = T - t, so dx/dtau = -f + c g^2 s
(c = 1 SDE, 1/2 ODE) with noise g dW_tau, which keeps every Diffrax solver valid: the stochastic
Runge-Kutta solvers were reported wrong when integrating backwards in time (RESEARCH.md section 5,
diffrax issue 598).

Details that matter for the numbers:

* The solution is the pair ``(x, aggregator state)``: the aggregator's state is carried inside the
  solve and changes through its ``tendency`` (``fedinf_jax.aggregators``). Where the SDE's noise
  drives that state (the density-weighted members), drift and noise form one control term in
  (dtau, dW), so each step evaluates the K agents once, and only Ito solvers are accepted: the
  Ito density estimator integrated by a Stratonovich solver (Heun) is biased by (g^2/2) div s.
* For the probability-flow ODE, members that need the scores' divergence get Hutchinson
  estimates from one linearisation of the agents, with fresh Rademacher probes at each
  evaluation, drawn from the sample's key and t (so the vector field is still a function of
  (t, state)). Their errors average out over the steps; probes fixed for the whole solve (as in
  FFJORD) add up instead (docs/aggregators.md).
* Each sample has its own key (its prior draw and its own Brownian path), so with constant steps a
  sample does not depend on which other samples share its batch. Adaptive steps are controlled on
  the batch's error norm over the images (the aggregator's state rides along), so there the batch
  matters.
* Constant steps use ``StepTo`` on an exact grid and ``UnsafeBrownianPath`` (far cheaper than a
  ``VirtualBrownianTree`` for fixed steps, diffrax issue 489); adaptive SDE solves use a
  per-sample ``VirtualBrownianTree``.
* The final denoising step is Tweedie's formula, x_0 = (x + std^2 s(x, t_end)) / alpha at t_end,
  the posterior mean E[x_0 | x_t_end] (score_sde's ``noise_removal``).
* All K agents are evaluated in one call through the configured agent-axis strategy
  (``fedinf_jax.agents``) inside the one jitted solve; a non-finite agent score or aggregate stops
  the solve with a ``FloatingPointError`` that names the agents and t.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax
import numpy as np

from fedinf_jax import density
from fedinf_jax.agents import num_agents_of
from fedinf_jax.aggregators import Aggregator
from fedinf_jax.errors import UserError
from fedinf_jax.registry import Registry, check_choice
from fedinf_jax.sde import SDE, batch_broadcast
from fedinf_jax.types import AgentParams, Array, Key, Labels

METHODS = density.METHODS
ODE_SOLVERS: Registry[Callable[[], diffrax.AbstractSolver]] = Registry("ode solver")
for _name, _solver in (
    ("euler", diffrax.Euler),
    ("heun", diffrax.Heun),
    ("midpoint", diffrax.Midpoint),
    ("ralston", diffrax.Ralston),
    ("bosh3", diffrax.Bosh3),
    ("tsit5", diffrax.Tsit5),
    ("dopri5", diffrax.Dopri5),
    ("dopri8", diffrax.Dopri8),
):
    ODE_SOLVERS.register(_name, _solver)
SDE_SOLVERS: Registry[Callable[[], diffrax.AbstractSolver]] = Registry("sde solver")
for _name, _solver in (
    ("euler", diffrax.Euler),  # Euler-Maruyama
    ("heun", diffrax.Heun),
    ("sea", diffrax.SEA),  # the stochastic Runge-Kutta solvers for additive noise
    ("shark", diffrax.ShARK),
    ("sra1", diffrax.SRA1),
):
    SDE_SOLVERS.register(_name, _solver)
SOLVERS = {"ode": ODE_SOLVERS, "sde": SDE_SOLVERS}

# Where constant steps are placed: (sde, num_steps, t_end) -> the num_steps + 1 solver times
# tau = T - t from 0 (t = T) to T - t_end (``tau_grid``).
SCHEDULES: Registry[Callable[[SDE, int, float], Array]] = Registry("step schedule")
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5


@SCHEDULES.register("uniform")
def uniform_steps(sde: SDE, num_steps: int, t_end: float) -> Array:
    """Equal steps in t."""
    return jnp.linspace(0.0, sde.T - t_end, num_steps + 1)


def _noise_level_steps(sigmas: Callable[[Array, Array, Array], Array]):
    """A schedule placing steps at noise levels sigma = ``sigmas(u, sigma(T), sigma(t_end))``
    for u uniform on [0, 1], mapped back to t."""

    def grid(sde: SDE, num_steps: int, t_end: float) -> Array:
        s_max, s_min = sde.noise_level(jnp.float32(sde.T)), sde.noise_level(jnp.float32(t_end))
        sigma = sigmas(jnp.linspace(0.0, 1.0, num_steps + 1), s_max, s_min)
        tau = sde.T - sde.time_at_noise_level(sigma, t_min=t_end)
        return tau.at[0].set(0.0).at[-1].set(sde.T - t_end)  # the ends exactly

    return grid


def _karras_sigmas(u: Array, s_max: Array, s_min: Array) -> Array:
    inv = 1.0 / KARRAS_RHO
    return (s_max**inv + u * (s_min**inv - s_max**inv)) ** KARRAS_RHO


def _log_uniform_sigmas(u: Array, s_max: Array, s_min: Array) -> Array:
    return jnp.exp(jnp.log(s_max) + u * (jnp.log(s_min) - jnp.log(s_max)))


SCHEDULES.register("karras", _noise_level_steps(_karras_sigmas))
SCHEDULES.register("log_snr", _noise_level_steps(_log_uniform_sigmas))


def tau_grid(sde: SDE, schedule: str, num_steps: int, t_end: float) -> Array:
    """The ``num_steps + 1`` solver times tau = T - t, from 0 (t = T) to T - ``t_end``, that
    constant steps visit:

    * ``uniform``: equal steps in t;
    * ``karras``: Karras et al.'s sigma schedule, sigma_i = (sigma_max^(1/rho) + i / N
      (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho with rho = 7 between the noise levels
      sigma = std / alpha at T and at t_end, mapped back to t (steps shrink towards the data);
    * ``log_snr``: equal steps in log sigma (in the log signal-to-noise ratio).

    Raises:
      ValueError: an unknown schedule (the valid ones listed).
    """
    return SCHEDULES.get(schedule)(sde, num_steps, t_end)


_NONFINITE = "FEDINF_NONFINITE:"


def make_solver(method: str, name: str) -> diffrax.AbstractSolver:
    """The Diffrax solver called ``name`` for ``method`` ("sde" or "ode").

    Raises:
      ValueError: an unknown method or solver (the message lists the valid ones).
    """
    check_choice("sampler method", method, METHODS)
    return SOLVERS[method].get(name)()


@dataclasses.dataclass(frozen=True)
class SolverSpec:
    """How to integrate: a config's ``sampler`` section resolved and checked (see
    ``configs/base.py`` for the fields). ``solver`` may be any Diffrax solver object."""

    method: str
    solver: diffrax.AbstractSolver
    num_steps: int = 250
    adaptive: bool = False
    rtol: float = 1e-3
    atol: float = 1e-3
    max_steps: int = 4096
    t_end: float = 1e-3
    schedule: str = "uniform"  # constant steps: where they lie (``tau_grid``)
    denoise: bool = True
    save_trajectory: int = 0
    progress: bool = False

    @classmethod
    def from_config(cls, sampler_config, sde: SDE) -> SolverSpec:
        c = sampler_config
        spec = cls(
            method=c.method,
            solver=make_solver(c.method, c.solver),
            num_steps=c.num_steps,
            adaptive=c.adaptive,
            rtol=c.rtol,
            atol=c.atol,
            max_steps=c.max_steps,
            t_end=c.t_end,
            schedule=c.get("schedule", "uniform"),
            denoise=c.denoise,
            save_trajectory=c.save_trajectory,
            progress=c.progress,
        )
        spec.check(sde)
        return spec

    def check(self, sde: SDE) -> None:
        """Raises ValueError naming the first invalid setting and what is valid."""
        check_choice("sampler method", self.method, METHODS)
        if not 0.0 < self.t_end < sde.T:
            raise ValueError(f"sampler.t_end must lie in (0, T = {sde.T}), got {self.t_end}")
        if self.num_steps < 1:
            raise ValueError(f"sampler.num_steps must be >= 1, got {self.num_steps}")
        SCHEDULES.check(self.schedule)
        if self.adaptive and self.schedule != "uniform":
            raise ValueError(
                f"sampler.schedule={self.schedule!r} places constant steps; adaptive steps are "
                "placed by the controller: use sampler.adaptive=False or schedule='uniform'"
            )
        if self.adaptive:
            if not isinstance(self.solver, diffrax.AbstractAdaptiveSolver):
                adaptive = sorted(
                    name
                    for name, make in SOLVERS[self.method].items()
                    if isinstance(make(), diffrax.AbstractAdaptiveSolver)
                )
                raise ValueError(
                    f"solver {type(self.solver).__name__} has no error estimate, so it cannot take "
                    "adaptive steps; use constant steps (sampler.adaptive=False) or an adaptive "
                    f"{self.method} solver: {adaptive}"
                )
            if not (self.rtol > 0 and self.atol > 0 and self.max_steps >= 1):
                raise ValueError(
                    f"adaptive steps need rtol > 0, atol > 0, max_steps >= 1; got {self.rtol}, "
                    f"{self.atol}, {self.max_steps}"
                )
        if self.save_trajectory == 1 or self.save_trajectory < 0:
            raise ValueError(
                f"sampler.save_trajectory must be 0 (off) or >= 2 times, got {self.save_trajectory}"
            )


def noise_drives_state(aggregator: Aggregator, method: str) -> bool:
    """Whether the aggregator's state or noise depends on the Brownian increments (then the
    SDE is solved as one control term, and only Ito solvers are valid)."""
    return method == "sde" and (aggregator.tendency is not None or aggregator.noise is not None)


def check_solver_for(aggregator: Aggregator, spec: SolverSpec) -> None:
    """Refuses a Stratonovich solver where the aggregator's state is an Ito integral.

    Raises:
      ValueError: naming the solver and the valid (Ito) ones.
    """
    if noise_drives_state(aggregator, spec.method) and not isinstance(
        spec.solver, diffrax.AbstractItoSolver
    ):
        ito = [n for n, m in SDE_SOLVERS.items() if issubclass(m, diffrax.AbstractItoSolver)]
        raise ValueError(
            "this aggregator's state is driven by the SDE's noise (an Ito integral), which "
            f"{type(spec.solver).__name__} (a Stratonovich solver) would integrate with a "
            f"bias; use an Ito solver: {ito}"
        )


class SolveState(NamedTuple):
    """The solution Diffrax integrates: images and the aggregator's state."""

    x: Array
    aggregator: Any


class Samples(NamedTuple):
    """A batch of samples.

    ``images``: (N, H, W, C) in model space, denoised to t = 0 when asked (else at t_end);
    ``aggregator_state``: the aggregator's state at t_end; ``stats``: Diffrax's step counts;
    ``trajectory_t`` (S,), ``trajectory`` (S, N, H, W, C) and ``trajectory_state`` (the
    aggregator's state, each leaf with a leading S axis): the reverse process at S diffusion times
    from T to t_end, when ``save_trajectory`` > 0 (else None).
    """

    images: Array
    aggregator_state: Any
    stats: dict[str, Array]
    trajectory_t: Array | None
    trajectory: Array | None
    trajectory_state: Any = None


class PerSampleBrownianPath(diffrax.AbstractBrownianPath):
    """Independent Brownian paths, one per sample (leading axis), each from its own key.

    Diffrax's paths draw one key's noise for the whole shape; under ``vmap`` a shared key gives
    every sample the same path (diffrax issue 531). Here sample i's increments depend only on its
    key, so a sample is the same whatever batch it is drawn in.
    """

    paths: diffrax.AbstractBrownianPath
    levy_area: type = eqx.field(static=True)
    _t0: float = eqx.field(static=True)
    _t1: float = eqx.field(static=True)

    def __init__(
        self,
        make_path: Callable[[Key], diffrax.AbstractBrownianPath],
        keys: Key,
        t0: float = -math.inf,
        t1: float = math.inf,
    ):
        self.paths = eqx.filter_vmap(make_path)(keys)
        self.levy_area = self.paths.levy_area
        self._t0, self._t1 = t0, t1

    @property
    def t0(self):
        return self._t0

    @property
    def t1(self):
        return self._t1

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        out = eqx.filter_vmap(lambda p: p.evaluate(t0, t1, left, use_levy))(self.paths)
        if use_levy:  # the increment's dt is shared, not per sample
            out = eqx.tree_at(lambda v: v.dt, out, out.dt[0])
        return out


class NoiseOperator(lineax.AbstractLinearOperator):
    """The reverse SDE's additive noise on the solution ``(x, aggregator state)``:
    dW (shaped like x) -> SolveState(g dW, 0), for aggregators whose state the noise does not
    drive.

    An operator with array fields (not a closure) so that Diffrax's additive-noise solvers can
    evaluate it at two times under ``vmap``; it holds nothing that depends on the solution, which
    those solvers check.
    """

    g: Array
    structure: Any = eqx.field(static=True)  # (x, aggregator state) as ShapeDtypeStructs

    def mv(self, vector):
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.structure.aggregator)
        return SolveState(self.g * vector, zeros)

    def as_matrix(self):
        raise NotImplementedError("NoiseOperator is matrix-free")

    def transpose(self):
        raise NotImplementedError("NoiseOperator is matrix-free")

    def in_structure(self):
        return self.structure.x

    def out_structure(self):
        return self.structure


class StepOperator(lineax.AbstractLinearOperator):
    """The whole reverse-SDE step from one evaluation, for aggregators whose state the noise
    drives (``tendency``) or whose noise is their own (``noise``):
    (dtau, dW) -> SolveState(dx, tendency(..., dx, dtau)), dx = b dtau + noise(g dW).

    Linear in its control (dtau, dW) (``TimeAndNoise``), so Euler-Maruyama's single product
    ``vf_prod`` takes the step with the scores evaluated once; splitting drift and noise into two
    Diffrax terms would evaluate the K agents twice per step.
    """

    b: Array
    g: Array
    structure: Any = eqx.field(static=True)  # (x, aggregator state) as ShapeDtypeStructs
    aggregator: Aggregator = eqx.field(static=True)
    evaluation: tuple  # (agent scores, t per sample, x, labels, aggregator state, extra)

    def mv(self, vector):
        dtau, dw = vector
        scores, t_batch, x, y, state, extra = self.evaluation
        noise = self.g * dw
        if self.aggregator.noise is not None:
            noise = self.aggregator.noise(scores, t_batch, x, y, state, noise)
        dx = self.b * dtau + noise
        if self.aggregator.tendency is None:
            return SolveState(dx, jax.tree.map(jnp.zeros_like, state))
        tendency = self.aggregator.tendency(scores, t_batch, x, y, state, dx, dtau, **extra)
        return SolveState(dx, tendency)

    def as_matrix(self):
        raise NotImplementedError("StepOperator is matrix-free")

    def transpose(self):
        raise NotImplementedError("StepOperator is matrix-free")

    def in_structure(self):
        return (jax.ShapeDtypeStruct((), self.structure.x.dtype), self.structure.x)

    def out_structure(self):
        return self.structure


class TimeAndNoise(diffrax.AbstractPath):
    """The control (dtau, dW) of ``StepOperator``: the time increment and the Brownian one."""

    brownian: diffrax.AbstractBrownianPath

    @property
    def t0(self):
        return self.brownian.t0

    @property
    def t1(self):
        return self.brownian.t1

    def evaluate(self, t0, t1=None, left=True):
        if t1 is None:
            raise ValueError("TimeAndNoise is an increment path: evaluate(t0, t1)")
        dtau = jnp.asarray(t1 - t0, jnp.float32)
        return dtau, self.brownian.evaluate(t0, t1, left)


for _tag in (lineax.is_symmetric, lineax.is_positive_semidefinite, lineax.is_negative_semidefinite):
    _tag.register(NoiseOperator)(lambda operator: False)
    _tag.register(StepOperator)(lambda operator: False)


def reverse_drift(sde: SDE, method: str, x: Array, t, score: Array) -> Array:
    """dx/dtau = -f(x, t) + c g(t)^2 s of the reverse process in tau = T - t; c = 1 for the
    reverse SDE (noise g dW added separately), 1/2 for the probability-flow ODE."""
    c = 1.0 if method == "sde" else 0.5
    return -sde.drift(x, t) + c * sde.diffusion(t) ** 2 * score


def _raise_nonfinite(bad_agents, bad_aggregate, t) -> None:
    agents = np.flatnonzero(np.asarray(bad_agents)).tolist()
    what = (
        f"agent(s) {agents} gave non-finite scores"
        if agents
        else "the aggregator returned a non-finite score from finite agent scores"
    )
    raise FloatingPointError(f"{_NONFINITE} {what} at t = {float(t):.6g}")


class FederatedSampler:
    """``sampler(params, keys, labels) -> Samples``: one jitted Diffrax solve for a batch.

    Args:
      agent_score_fn: ``(params, x, t, y) -> (agents, batch, ...)`` scores of all K agents for
        stacked ``params`` (e.g. ``agents.over_agents(score_fn, strategy, (0, None, None, None))``).
      sde: the forward SDE the agents were trained with.
      aggregator: how to combine the scores.
      spec: how to integrate.
      image_shape: the shape of one sample, e.g. (28, 28, 1).
      num_agents: K, when ``params`` carry padding agents that ``agent_score_fn`` drops
        (``fedinf_jax.sharding``); default: the size of the params' agent axis.

    ``keys`` holds one key per sample (its prior draw and Brownian path); ``labels`` (N,) the
    classes to condition on. The number of score evaluations (each: K agents on the batch) of the
    last call is in ``stats["score_evaluations"]``.
    """

    def __init__(
        self,
        agent_score_fn: Callable,
        sde: SDE,
        aggregator: Aggregator,
        spec: SolverSpec,
        image_shape: tuple[int, ...],
        num_agents: int | None = None,
    ):
        spec.check(sde)
        self.num_agents = num_agents
        self.agent_score_fn = agent_score_fn
        self.sde = sde
        self.aggregator = aggregator
        self.spec = spec
        check_solver_for(aggregator, spec)
        self.image_shape = tuple(image_shape)
        self._evaluations = itertools.count()
        self._solve = jax.jit(self._solve_impl)

    # -- the vector fields -------------------------------------------------------------------
    def _evaluate(self, args, x, t, agg_state):
        """All agents' scores, checked, and their aggregate at one diffusion time t; ``extra``
        holds the scores' divergence estimates when the aggregator asks for them."""
        params, y, probe_keys = args
        t_batch = jnp.full((x.shape[0],), t, x.dtype)
        extra = {}
        if probe_keys is None:
            scores = self.agent_score_fn(params, x, t_batch, y)
        else:
            # Fresh probes at every evaluation, a deterministic function of (sample, t): the
            # estimator's errors then average out over the steps instead of adding up.
            t_bits = jax.lax.bitcast_convert_type(jnp.asarray(t, jnp.float32), jnp.uint32)
            keys = jax.vmap(lambda k: jax.random.fold_in(k, t_bits))(probe_keys)
            probes = density.rademacher_probes(
                keys, self.aggregator.divergence_probes, self.image_shape
            )
            scores, extra["divergence"] = density.scores_and_divergence(
                lambda z: self.agent_score_fn(params, z, t_batch, y), x, probes
            )
        score, agg_state = self.aggregator.aggregate(scores, t_batch, x, y, agg_state, **extra)
        bad_agents = ~jnp.all(jnp.isfinite(scores.reshape(scores.shape[0], -1)), axis=1)
        bad_aggregate = ~jnp.all(jnp.isfinite(score))
        jax.lax.cond(
            bad_agents.any() | bad_aggregate,
            lambda: jax.debug.callback(_raise_nonfinite, bad_agents, bad_aggregate, t),
            lambda: None,
        )
        jax.debug.callback(lambda: next(self._evaluations))
        return scores, score, agg_state, t_batch, extra

    def _drift(self, tau, state: SolveState, args) -> SolveState:
        y = args[1]
        t = self.sde.T - tau
        x = state.x
        scores, score, agg, t_batch, extra = self._evaluate(args, x, t, state.aggregator)
        b = reverse_drift(self.sde, self.spec.method, x, t, score)
        if self.aggregator.tendency is None:
            return SolveState(b, jax.tree.map(jnp.zeros_like, agg))
        return SolveState(b, self.aggregator.tendency(scores, t_batch, x, y, agg, b, 1.0, **extra))

    def _diffusion(self, tau, state: SolveState, args) -> NoiseOperator:
        g = self.sde.diffusion(self.sde.T - tau)
        return NoiseOperator(
            g, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
        )

    def _step(self, tau, state: SolveState, args) -> StepOperator:
        t = self.sde.T - tau
        scores, score, agg, t_batch, extra = self._evaluate(args, state.x, t, state.aggregator)
        structure = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
        evaluation = (scores, t_batch, state.x, args[1], agg, extra)
        b = reverse_drift(self.sde, "sde", state.x, t, score)
        return StepOperator(b, self.sde.diffusion(t), structure, self.aggregator, evaluation)

    def agents_in(self, params: AgentParams) -> int:
        """K: ``num_agents`` when given (the params then carry padding), else the params' axis."""
        return self.num_agents or num_agents_of(params)

    @property
    def noise_drives_state(self) -> bool:
        """``noise_drives_state`` of this sampler's aggregator and method."""
        return noise_drives_state(self.aggregator, self.spec.method)

    # -- the solve -----------------------------------------------------------------------------
    def _brownian(self, keys, tau1):
        shape = jax.ShapeDtypeStruct(self.image_shape, jnp.float32)
        levy = (
            diffrax.SpaceTimeLevyArea
            if isinstance(self.spec.solver, diffrax.AbstractSRK)
            else diffrax.BrownianIncrement
        )
        if self.spec.adaptive:
            tol = tau1 / (4.0 * self.spec.max_steps)
            return PerSampleBrownianPath(
                lambda k: diffrax.VirtualBrownianTree(0.0, tau1, tol, shape, k, levy_area=levy),
                keys,
                0.0,
                tau1,
            )
        return PerSampleBrownianPath(
            lambda k: diffrax.UnsafeBrownianPath(shape, k, levy_area=levy), keys
        )

    def terms(self, keys: Key, tau1: float):
        """The Diffrax terms of the reverse process in tau (Brownian paths from ``keys``)."""
        if self.spec.method == "ode":
            return diffrax.ODETerm(self._drift)
        if self.noise_drives_state:
            return diffrax.ControlTerm(self._step, TimeAndNoise(self._brownian(keys, tau1)))
        return diffrax.MultiTerm(
            diffrax.ODETerm(self._drift),
            diffrax.ControlTerm(self._diffusion, self._brownian(keys, tau1)),
        )

    def _prior(self, keys: Key) -> tuple[Array, Key]:
        """Each sample's prior draw x_T and its Brownian key, both from the sample's key."""
        split = jax.vmap(jax.random.split)(keys)
        x = jax.vmap(lambda k: self.sde.prior_sample(k, self.image_shape))(split[:, 0])
        return x, split[:, 1]

    def _solve_impl(self, params: AgentParams, keys: Key, labels: Labels) -> Samples:
        spec, sde = self.spec, self.sde
        tau1 = sde.T - spec.t_end
        x, path_keys = self._prior(keys)
        state = SolveState(x, self.aggregator.init(self.agents_in(params), x, labels))
        probe_keys = None
        if self.aggregator.divergence_probes:
            probe_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(path_keys)
        args = (params, labels, probe_keys)

        if spec.adaptive:
            # Steps are controlled on the images alone: the aggregator's state rides along (its
            # divergence estimates are noisy by design and would force tiny steps).
            controller = diffrax.PIDController(
                rtol=spec.rtol, atol=spec.atol, norm=lambda err: jnp.sqrt(jnp.mean(err.x**2))
            )
            dt0, max_steps = tau1 / spec.num_steps, spec.max_steps
        else:
            controller = diffrax.StepTo(ts=tau_grid(sde, spec.schedule, spec.num_steps, spec.t_end))
            dt0, max_steps = None, spec.num_steps
        if spec.save_trajectory:
            saveat = diffrax.SaveAt(ts=jnp.linspace(0.0, tau1, spec.save_trajectory))
        else:
            saveat = diffrax.SaveAt(t1=True)
        sol = diffrax.diffeqsolve(
            self.terms(path_keys, tau1),
            spec.solver,
            t0=0.0,
            t1=tau1,
            dt0=dt0,
            y0=state,
            args=args,
            saveat=saveat,
            stepsize_controller=controller,
            max_steps=max_steps,
            adjoint=diffrax.ForwardMode(),  # sampling never differentiates through the solve
            progress_meter=(
                diffrax.TqdmProgressMeter() if spec.progress else diffrax.NoProgressMeter()
            ),
        )
        final = jax.tree.map(lambda leaf: leaf[-1], sol.ys)
        images = final.x
        if spec.denoise:
            _, score, _, _, _ = self._evaluate(args, images, spec.t_end, final.aggregator)
            images = tweedie_denoise(sde, images, score, spec.t_end)
        stats = {k: sol.stats[k] for k in ("num_steps", "num_accepted_steps", "num_rejected_steps")}
        trajectory_t = trajectory = trajectory_state = None
        if spec.save_trajectory:
            trajectory_t, trajectory, trajectory_state = sde.T - sol.ts, sol.ys.x, sol.ys.aggregator
        return Samples(images, final.aggregator, stats, trajectory_t, trajectory, trajectory_state)

    def __call__(self, params: AgentParams, keys: Key, labels: Labels) -> Samples:
        if keys.shape != labels.shape or labels.ndim != 1:
            raise ValueError(
                f"need one key per label: keys {keys.shape}, labels {labels.shape} (both (N,))"
            )
        self._evaluations = itertools.count()
        try:
            samples = jax.block_until_ready(self._solve(params, keys, labels))
        except jax.errors.JaxRuntimeError as e:
            raise _translate(e) from None
        jax.effects_barrier()
        stats = dict(samples.stats)
        stats["score_evaluations"] = next(self._evaluations)
        return samples._replace(stats=stats)


class NonFiniteScoreError(UserError, FloatingPointError):
    """An agent's score or the aggregate became non-finite during a solve (names them and t)."""


class MaxStepsError(UserError, RuntimeError):
    """An adaptive solve reached ``sampler.max_steps`` before t_end."""


def _translate(error: Exception) -> Exception:
    """A readable exception for a failed solve (non-finite scores, Diffrax's own failures)."""
    message = str(error)
    if _NONFINITE in message:
        line = message[message.rindex(_NONFINITE) + len(_NONFINITE) :].strip().splitlines()[0]
        return NonFiniteScoreError(f"sampling stopped: {line}")
    if "maximum number of solver steps" in message:
        return MaxStepsError(
            "the adaptive solve reached sampler.max_steps before t_end; raise sampler.max_steps or "
            "loosen sampler.rtol/atol"
        )
    return error


def reverse_euler_maruyama(
    sampler: FederatedSampler, params: AgentParams, keys: Key, labels: Labels
) -> Array:
    """A hand-written ``lax.scan`` Euler-Maruyama on the sampler's own grid and Brownian
    increments, before denoising: the reference ``FederatedSampler`` is tested against."""
    spec, sde = sampler.spec, sampler.sde
    tau1 = sde.T - spec.t_end
    taus = jnp.linspace(0.0, tau1, spec.num_steps + 1)
    x, path_keys = sampler._prior(keys)
    path = sampler._brownian(path_keys, tau1)
    agg = sampler.aggregator.init(sampler.agents_in(params), x, labels)

    def step(x, tau_pair):
        tau0, tau_next = tau_pair
        t = sde.T - tau0
        _, score, _, _, _ = sampler._evaluate((params, labels, None), x, t, agg)
        drift = -sde.drift(x, t) + sde.diffusion(t) ** 2 * score
        dw = path.evaluate(tau0, tau_next)
        return x + (tau_next - tau0) * drift + sde.diffusion(t) * dw, None

    x, _ = jax.lax.scan(step, x, (taus[:-1], taus[1:]))
    return x


def to_uint8(images: Array, centered: bool = True) -> np.ndarray:
    """Model-space images (..., H, W, C), in [-1, 1] if ``centered`` else [0, 1], to uint8
    pixels (..., H, W) (the channel axis dropped when it has size 1)."""
    x = np.asarray(images, np.float32)
    if centered:
        x = (x + 1.0) / 2.0
    x = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    return x[..., 0] if x.shape[-1] == 1 else x


def sample_keys(seed: int, num: int, start: int = 0) -> Key:
    """One key per sample index: sample i's key depends only on (seed, i), never on batching."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + num))


def tweedie_denoise(sde: SDE, x: Array, score: Array, t: float) -> Array:
    """E[x_0 | x_t] = (x + std(t)^2 s) / alpha(t)."""
    alpha, std = sde.marginal(jnp.asarray(t))
    return (x + batch_broadcast(std**2, x) * score) / batch_broadcast(alpha, x)
