"""Federated sampling: the reverse diffusion with an aggregate of K agents' scores, on Diffrax.

The server integrates, from the prior at t = T down to ``t_end``, either the reverse SDE
(Anderson 1982; Song et al. 2021, eq. 6)

    dx = [f(x, t) - g(t)^2 s(x, t, y)] dt + g(t) dW_bar

or the probability-flow ODE (Song et al. 2021, eq. 13)

    dx = [f(x, t) - g(t)^2 s(x, t, y) / 2] dt,

where s = aggregate(s_1, ..., s_K) combines the agents' scores
(``fedinf_jax.sampling.aggregators``).
The parts, one job each:

* ``fedinf_jax.sampling.federated_score``: the K agents' scores at a point, checked, with divergence
  probes when the aggregator asks, and their aggregate;
* ``fedinf_jax.sampling.reverse``: the reverse process as Diffrax terms in tau = T - t (every solver
  runs forward: the stochastic Runge-Kutta solvers were reported wrong backwards,
  diffrax issue 598), its solution the pair ``(x, aggregator state)``;
* ``fedinf_jax.sampling.solvers``: which solver, which steps, what is saved (``SolverSpec``);
* here: ``FederatedSampler``, the one jitted solve per batch, and its host side (statistics,
  and failures turned into errors from Diffrax's ``Solution.result`` and the evaluations' own
  record, with ``throw=False``).

Each sample has its own key (its prior draw and its own Brownian path), so with constant steps a
sample does not depend on which other samples share its batch. Adaptive steps are controlled on
the batch's error norm over the images, so there the batch matters. The final denoising step is
Tweedie's formula, x_0 = (x + std^2 s(x, t_end)) / alpha at t_end, the posterior mean
E[x_0 | x_t_end] (score_sde's ``noise_removal``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from fedinf_jax.agents.agent_axis import num_agents_of
from fedinf_jax.core.errors import UserError
from fedinf_jax.core.types import AgentParams, Array, Key, Labels
from fedinf_jax.diffusion.sde import SDE, tweedie_denoise
from fedinf_jax.sampling.aggregators import Aggregator, agents_asked
from fedinf_jax.sampling.federated_score import (
    CallbackTally,
    FederatedScore,
    Tallied,
    ValueTally,
)
from fedinf_jax.sampling.reverse import SolveState, reverse_terms
from fedinf_jax.sampling.solvers import (
    BUDGET_FIELDS,
    SolverSpec,
    check_solver_for,
    save_at,
    step_inputs,
    stepping,
)


class NonFiniteScoreError(UserError, FloatingPointError):
    """An agent's score or the aggregate became non-finite during a solve (names them and t)."""


class MaxStepsError(UserError, RuntimeError):
    """An adaptive solve reached ``sampler.max_steps`` before t_end."""


class Samples(NamedTuple):
    """A batch of samples.

    ``images``: (N, H, W, C) in model space, denoised to t = 0 when asked (else at t_end);
    ``aggregator_state``: the aggregator's state at t_end; ``stats``: Diffrax's step counts (and,
    from ``FederatedSampler.__call__``, ``score_evaluations``); ``trajectory_t`` (S,),
    ``trajectory`` (S, N, H, W, C) and ``trajectory_state`` (the aggregator's state, each leaf
    with a leading S axis): the reverse process at S diffusion times from T to t_end, when
    ``save_trajectory`` > 0 (else None); ``result``: Diffrax's ``RESULTS`` item for the solve;
    ``failure``: from ``FederatedSampler.run``, the first non-finite evaluation in words, or None;
    ``step_t`` (max_steps,): with ``save_steps``, the diffusion time each accepted step ended at,
    from T towards t_end, NaN after the last step (else None); ``tallied``: what the solve's
    evaluations tallied (``federated_score.Tallied``; None from a solve that tallies on the
    host).
    """

    images: Array
    aggregator_state: Any
    stats: dict[str, Array]
    trajectory_t: Array | None
    trajectory: Array | None
    trajectory_state: Any = None
    result: Any = None
    failure: str | None = None
    step_t: Array | None = None
    tallied: Tallied | None = None


class FederatedSampler:
    """``sampler(params, keys, labels) -> Samples``: one jitted Diffrax solve for a batch.

    Args:
      agent_score_fn: ``(params, x, t, y) -> (agents, batch, ...)`` scores of all K agents for
        stacked ``params`` (e.g.
        ``agent_axis.over_agents(score_fn, strategy, (0, None, None, None))``).
      sde: the forward SDE the agents were trained with.
      aggregator: how to combine the scores.
      spec: how to integrate.
      image_shape: the shape of one sample, e.g. (28, 28, 1).
      num_agents: K, when ``params`` carry padding agents that ``agent_score_fn`` drops
        (``fedinf_jax.agents.sharding``); default: the size of the params' agent axis.
      grouped_score_fn: the agents' scores for the pairs an aggregator's ``dispatch`` names
        (``fedinf_jax.agents.dispatch.grouped``): given, a member that declares ``dispatch`` asks
        only those agents (``FederatedScore``); None: every agent is evaluated.
      host_tally: tally the evaluations (their count, the first non-finite one) on the host,
        through host callbacks, rather than as values in the solve, whose program then stays
        out of the persistent compilation cache; default: only for the implicit solvers, whose
        root finders refuse the values' JAX references.

    ``keys`` holds one key per sample (its prior draw and Brownian path); ``labels`` (N,) the
    classes to condition on. ``solve`` is the jitted solve itself (no checks, no statistics).

    Raises (on call):
      NonFiniteScoreError: an agent's score or the aggregate became non-finite (names the
        agents and t).
      MaxStepsError: an adaptive solve ran out of ``max_steps``.
    """

    def __init__(
        self,
        agent_score_fn: Callable,
        sde: SDE,
        aggregator: Aggregator,
        spec: SolverSpec,
        image_shape: tuple[int, ...],
        num_agents: int | None = None,
        grouped_score_fn: Callable | None = None,
        host_tally: bool | None = None,
    ):
        spec.check(sde)
        check_solver_for(aggregator, spec)
        self.sde, self.aggregator, self.spec = sde, aggregator, spec
        self.image_shape = tuple(image_shape)
        self.num_agents = num_agents
        self.score = FederatedScore(
            agent_score_fn, aggregator, self.image_shape, grouped_score_fn=grouped_score_fn
        )
        # The evaluations are tallied in JAX references inside the solve, so that its program
        # has no host callback and is cached across processes; the implicit solvers' root
        # finders refuse references (equinox compares their closures), so they tally on the host.
        if host_tally is None:
            host_tally = isinstance(spec.solver, diffrax.AbstractImplicitSolver)
        self._host_tally = CallbackTally() if host_tally else None
        # The budget (the constant steps' times; the adaptive tolerances) enters the compiled
        # solve as an input: samplers that differ only in it share one compilation.
        self.steps = step_inputs(spec, sde)
        # What the compiled solve reads of the spec: everything but the budget (None here, so
        # that a read of a budget field inside the trace fails instead of freezing this
        # sampler's value into a solve that ``with_budget`` copies share).
        self._traced_spec = dataclasses.replace(spec, **dict.fromkeys(BUDGET_FIELDS))
        self.compiled_solve = jax.jit(self._solve)

    def solve(self, params: AgentParams, keys: Key, labels: Labels) -> Samples:
        """The jitted solve (``compiled_solve`` on this sampler's ``steps``)."""
        return self.compiled_solve(params, keys, labels, self.steps)

    def with_budget(self, **budget) -> FederatedSampler:
        """This sampler with other ``solvers.BUDGET_FIELDS`` (constant steps: ``num_steps`` on
        ``schedule``; adaptive: ``rtol``, ``atol``, and ``num_steps`` for the first step), sharing
        this sampler's compiled solve: nothing is traced or compiled again.

        Raises:
          ValueError: a field that is not a budget's, or an invalid value.
        """
        if not set(budget) <= set(BUDGET_FIELDS):
            raise ValueError(
                f"not budget fields: {sorted(set(budget) - set(BUDGET_FIELDS))}; "
                f"valid: {list(BUDGET_FIELDS)}"
            )
        other = copy.copy(self)
        other.spec = dataclasses.replace(self.spec, **budget)
        other.spec.check(self.sde)
        other.steps = step_inputs(other.spec, self.sde)
        return other

    def agents_in(self, params: AgentParams) -> int:
        """K: ``num_agents`` when given (the params then carry padding), else the params' axis."""
        return self.num_agents or num_agents_of(params)

    def agents_asked(self, num_agents: int) -> int:
        """How many agents each sample's score evaluation asks: the m its aggregator dispatches
        when this sampler evaluates only those (``FederatedScore.sparse``), else all K."""
        return agents_asked(self.aggregator, num_agents) if self.score.sparse else num_agents

    def prior(self, keys: Key) -> tuple[Array, Key]:
        """Each sample's prior draw x_T and its Brownian key, both from the sample's key."""
        split = jax.vmap(jax.random.split)(keys)
        x = jax.vmap(lambda k: self.sde.prior_sample(k, self.image_shape))(split[:, 0])
        return x, split[:, 1]

    def _solve(self, params: AgentParams, keys: Key, labels: Labels, steps) -> Samples:
        spec, sde = self._traced_spec, self.sde
        # Rows of an evaluation's scores: K agents, or 2K (guidance at the null label, or a
        # guide's K agents beside them on the params' axis).
        tally = self._host_tally or ValueTally(2 * num_agents_of(params))
        score = self.score.tallying(tally)
        x, path_keys = self.prior(keys)
        init_keys = jax.vmap(lambda k: jax.random.fold_in(k, 2))(path_keys)  # route's draws
        state = SolveState(x, self.aggregator.init(self.agents_in(params), x, labels, init_keys))
        probe_keys = None
        if self.aggregator.divergence_probes:
            probe_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(path_keys)
        args = (params, labels, probe_keys)
        controller, dt0, max_steps = stepping(spec, sde, steps)
        sol = diffrax.diffeqsolve(
            reverse_terms(score, sde, spec, path_keys, self.image_shape),
            spec.solver,
            t0=0.0,
            t1=sde.T - spec.t_end,
            dt0=dt0,
            y0=state,
            args=args,
            saveat=save_at(spec, sde),
            stepsize_controller=controller,
            max_steps=max_steps,
            adjoint=diffrax.ForwardMode(),  # sampling never differentiates through the solve
            throw=False,  # failures come back in sol.result, turned into errors by __call__
            progress_meter=(
                diffrax.TqdmProgressMeter() if spec.progress else diffrax.NoProgressMeter()
            ),
        )
        ts, ys = (sol.ts[0], sol.ys[0]) if spec.save_steps else (sol.ts, sol.ys)
        final = jax.tree.map(lambda leaf: leaf[-1], ys)
        images = final.x
        if spec.denoise:
            ev = score(*args, images, spec.t_end, final.aggregator)
            images = tweedie_denoise(sde, images, ev.score, spec.t_end)
        stats = {k: sol.stats[k] for k in ("num_steps", "num_accepted_steps", "num_rejected_steps")}
        trajectory_t = trajectory = trajectory_state = step_t = None
        if spec.save_trajectory:
            trajectory_t, trajectory, trajectory_state = sde.T - ts, ys.x, ys.aggregator
        if spec.save_steps:  # Diffrax pads the unused steps with inf
            step_t = jnp.where(jnp.isfinite(sol.ys[1]), sde.T - sol.ys[1], jnp.nan)
        return Samples(
            images,
            final.aggregator,
            stats,
            trajectory_t,
            trajectory,
            trajectory_state,
            sol.result,
            step_t=step_t,
            tallied=None if self._host_tally else tally.read(),
        )

    def run(self, params: AgentParams, keys: Key, labels: Labels) -> Samples:
        """The solve with its statistics, failures recorded rather than raised: ``result`` is
        Diffrax's outcome, ``failure`` names the first non-finite evaluation (None if none)."""
        if keys.shape != labels.shape or labels.ndim != 1:
            raise ValueError(
                f"need one key per label: keys {keys.shape}, labels {labels.shape} (both (N,))"
            )
        if self._host_tally is not None:
            self._host_tally.reset()
        samples = jax.block_until_ready(self.solve(params, keys, labels))
        if self._host_tally is None:
            tallied = jax.device_get(samples.tallied)
        else:
            jax.effects_barrier()  # every evaluation has reported to the host
            tallied = self._host_tally.host_read()
        stats = dict(samples.stats, score_evaluations=int(tallied.evaluations))
        return samples._replace(stats=stats, failure=tallied.failure(), tallied=tallied)

    def __call__(self, params: AgentParams, keys: Key, labels: Labels) -> Samples:
        samples = self.run(params, keys, labels)
        if samples.failure is not None:
            raise NonFiniteScoreError(f"sampling stopped: {samples.failure}")
        if bool(samples.result == diffrax.RESULTS.max_steps_reached):
            raise MaxStepsError(
                "the adaptive solve reached sampler.max_steps before t_end; raise "
                "sampler.max_steps or loosen sampler.rtol/atol"
            )
        if bool(samples.result != diffrax.RESULTS.successful):
            raise RuntimeError(f"the solve failed: {diffrax.RESULTS[samples.result]}")
        return samples


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
