"""The federated score at one point of the reverse process: every agent's score, checked, and
the aggregator's combination of them.

``FederatedScore`` evaluates the K agents in one call (``agent_score_fn``, through the configured
agent-axis strategy), adds Hutchinson estimates of each agent's score divergence when the
aggregator asks for them (the probability-flow ODE's density change), and applies the
aggregator. Each evaluation is reported to a host-side ``SolveMonitor``: it counts the
evaluations and records the first non-finite agent score or aggregate (which agents, which t),
so that a failed solve is named after it ends, without parsing any error message.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedinf_jax.core.types import AgentParams, Array, Key, Labels
from fedinf_jax.diffusion import density
from fedinf_jax.sampling.aggregators import Aggregator


class Evaluation(NamedTuple):
    """One evaluation: the agents' ``scores`` (agents, batch, ...), their aggregate ``score``
    (batch, ...), the aggregator's ``state`` after ``aggregate``, the per-sample times ``t``
    (batch,) and ``extra`` ({"divergence": (agents, batch)} when the aggregator asks for it)."""

    scores: Array
    score: Array
    state: Any
    t: Array
    extra: dict


def with_null_label(agent_score_fn: Callable, null_label: int) -> Callable:
    """``(params, x, t, y, *rest) -> (2K, batch, ...)``: every agent's score at (x, y), then every
    agent's score at (x, null label), from one call of ``agent_score_fn`` on the doubled batch
    (what ``aggregators.guided`` combines; one network call, the images twice). ``rest`` is
    passed on (a grouped function's agent numbers, already laid out for the doubled batch)."""

    def scores(params, x, t, y, *rest):
        both = agent_score_fn(
            params,
            jnp.concatenate([x, x]),
            jnp.concatenate([t, t]),
            jnp.concatenate([y, jnp.full_like(y, null_label)]),
            *rest,
        )
        k, b = both.shape[0], x.shape[0]
        both = both.reshape(k, 2, b, *both.shape[2:])
        return jnp.swapaxes(both, 0, 1).reshape(2 * k, b, *both.shape[3:])

    return scores


@dataclasses.dataclass
class SolveMonitor:
    """What the evaluations of one solve reported to the host: how many there were, and the
    first that was not finite (the agents whose scores were not, or none when only the
    aggregate was not, and t)."""

    evaluations: int = 0
    nonfinite: tuple[list[int], float] | None = None
    _counter: Any = dataclasses.field(default_factory=itertools.count, repr=False)

    def reset(self) -> None:
        self.evaluations, self.nonfinite, self._counter = 0, None, itertools.count()

    def count(self) -> None:
        # next() on a count is atomic under the GIL; host callbacks may arrive from XLA's threads.
        self.evaluations = next(self._counter) + 1

    def record_nonfinite(self, bad_agents, t) -> None:
        # The solve runs from t = T down: the first failure is the one at the largest t, whatever
        # order the host callbacks arrive in.
        if self.nonfinite is None or float(t) > self.nonfinite[1]:
            self.nonfinite = (np.flatnonzero(np.asarray(bad_agents)).tolist(), float(t))

    def failure(self) -> str | None:
        """The first non-finite evaluation, in words, or None."""
        if self.nonfinite is None:
            return None
        agents, t = self.nonfinite
        what = (
            f"agent(s) {agents} gave non-finite scores"
            if agents
            else "the aggregator returned a non-finite score from finite agent scores"
        )
        return f"{what} at t = {t:.6g}"


class FederatedScore:
    """``score(params, labels, probe_keys, x, t, state) -> Evaluation`` at one diffusion time t.

    Args:
      agent_score_fn: ``(params, x, t, y) -> (agents, batch, ...)`` scores of all K agents.
      aggregator: how to combine them.
      image_shape: one sample's shape (the Hutchinson probes').
      monitor: where each evaluation is reported (a fresh one by default).
      grouped_score_fn: ``(params, x, t, y, agent_index) -> (agents, batch, ...)``, the same
        scores for the (agent, sample) pairs ``agent_index`` names and zeros elsewhere
        (``fedinf_jax.agents.dispatch.grouped``); used when the aggregator declares ``dispatch``.

    ``probe_keys`` (one per sample) is None unless the aggregator asks for divergence probes.
    Fresh probes are drawn at every evaluation, a deterministic function of (sample, t): the
    estimator's errors then average out over the steps instead of adding up.
    """

    def __init__(
        self,
        agent_score_fn: Callable,
        aggregator: Aggregator,
        image_shape: tuple[int, ...],
        monitor: SolveMonitor | None = None,
        grouped_score_fn: Callable | None = None,
    ):
        self.agent_score_fn = agent_score_fn
        self.aggregator = aggregator
        self.image_shape = tuple(image_shape)
        self.monitor = monitor or SolveMonitor()
        self.grouped_score_fn = grouped_score_fn

    @property
    def sparse(self) -> bool:
        """Whether only the pairs the aggregator dispatches are evaluated."""
        return self.grouped_score_fn is not None and self.aggregator.dispatch is not None

    def __call__(
        self, params: AgentParams, labels: Labels, probe_keys: Key | None, x: Array, t, state
    ) -> Evaluation:
        t_batch = jnp.full((x.shape[0],), t, x.dtype)
        extra = {}
        if self.sparse and probe_keys is None:
            agent_index = self.aggregator.dispatch(state, labels)
            scores = self.grouped_score_fn(params, x, t_batch, labels, agent_index)
        elif probe_keys is None:
            scores = self.agent_score_fn(params, x, t_batch, labels)
        else:
            t_bits = jax.lax.bitcast_convert_type(jnp.asarray(t, jnp.float32), jnp.uint32)
            keys = jax.vmap(lambda k: jax.random.fold_in(k, t_bits))(probe_keys)
            probes = density.rademacher_probes(
                keys, self.aggregator.divergence_probes, self.image_shape
            )
            scores, extra["divergence"] = density.scores_and_divergence(
                lambda z: self.agent_score_fn(params, z, t_batch, labels), x, probes
            )
        score, state = self.aggregator.aggregate(scores, t_batch, x, labels, state, **extra)
        bad_agents = ~jnp.all(jnp.isfinite(scores.reshape(scores.shape[0], -1)), axis=1)
        bad = bad_agents.any() | ~jnp.all(jnp.isfinite(score))
        jax.lax.cond(
            bad,
            lambda: jax.debug.callback(self.monitor.record_nonfinite, bad_agents, t),
            lambda: None,
        )
        jax.debug.callback(self.monitor.count)
        return Evaluation(scores, score, state, t_batch, extra)
