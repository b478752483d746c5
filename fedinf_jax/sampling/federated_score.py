"""The federated score at one point of the reverse process: every agent's score, checked, and
the aggregator's combination of them.

``FederatedScore`` evaluates the K agents in one call (``agent_score_fn``, through the configured
agent-axis strategy), adds Hutchinson estimates of each agent's score divergence when the
aggregator asks for them (the probability-flow ODE's density change), and applies the
aggregator. Each evaluation is tallied (``Tally``): the evaluations are counted and the first
non-finite agent score or aggregate is recorded (which agents, which t), so that a failed solve
is named after it ends, without parsing any error message. The tally is values in the compiled
solve (``ValueTally``, JAX references), not host callbacks, so the solve's program goes into the
persistent compilation cache; solvers whose internals refuse references (the implicit ones'
root finders) tally through host callbacks instead (``CallbackTally``).
"""

from __future__ import annotations

import copy
import threading
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


class Tallied(NamedTuple):
    """What a solve's evaluations tallied: how many there were, and the first that was not finite
    (the largest t, since the solve runs from T down): its t (-inf when none) and the rows of the
    agents' scores that were not finite then (none: only the aggregate was)."""

    evaluations: Array
    nonfinite_t: Array
    nonfinite_agents: Array

    def failure(self) -> str | None:
        """The first non-finite evaluation, in words, or None."""
        t = float(self.nonfinite_t)
        if not np.isfinite(t):
            return None
        agents = np.flatnonzero(np.asarray(self.nonfinite_agents)).tolist()
        what = (
            f"agent(s) {agents} gave non-finite scores"
            if agents
            else "the aggregator returned a non-finite score from finite agent scores"
        )
        return f"{what} at t = {t:.6g}"


def _first_failure(tallied: Tallied, bad_agents, bad_aggregate, t, xp=jnp) -> Tallied:
    """``tallied`` after one more evaluation at ``t``, which keeps its failure if it is the first
    (the largest t) so far; in ``xp`` (jax.numpy in the trace, numpy on the host)."""
    first = (bad_agents.any() | bad_aggregate) & (t > tallied.nonfinite_t)
    return Tallied(
        tallied.evaluations + 1,
        xp.where(first, xp.asarray(t, np.float32), tallied.nonfinite_t),
        xp.where(first, bad_agents, tallied.nonfinite_agents),
    )


def _nothing_tallied(rows: int, xp=jnp) -> Tallied:
    return Tallied(
        xp.zeros((), np.int32), xp.full((), -np.inf, np.float32), xp.zeros((rows,), bool)
    )


def _padded(bad_agents, capacity: int):
    """The per-row flags of one evaluation's scores (agents, or 2K rows under guidance), padded
    with False to the tally's fixed ``capacity``."""
    if bad_agents.shape[0] > capacity:
        raise ValueError(f"{bad_agents.shape[0]} score rows, but the tally holds {capacity}")
    return jnp.zeros((capacity,), bool).at[: bad_agents.shape[0]].set(bad_agents)


class ValueTally:
    """A tally held in JAX references inside the compiled solve: no host callback, so the solve's
    program can be cached across processes. Built inside the solve's trace, for evaluations of at
    most ``capacity`` score rows; read at its end (``read``)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.refs = Tallied(*(jax.new_ref(v) for v in _nothing_tallied(capacity)))

    def record(self, bad_agents, bad_aggregate, t) -> None:
        bad_agents = _padded(bad_agents, self.capacity)
        now = _first_failure(Tallied(*(r[...] for r in self.refs)), bad_agents, bad_aggregate, t)
        for ref, value in zip(self.refs, now, strict=True):
            ref[...] = value

    def read(self) -> Tallied:
        return Tallied(*(r[...] for r in self.refs))


class CallbackTally:
    """A tally kept on the host, each evaluation reported by a host callback (for the solvers
    whose internals refuse JAX references). Its program is not cached across processes (JAX
    skips programs with host callbacks). One per sampler, ``reset`` before each solve and read
    (``host_read``) once the solve has run and ``jax.effects_barrier`` returned."""

    def __init__(self):
        self.tallied: Tallied | None = None
        self.lock = threading.Lock()  # host callbacks may arrive from XLA's threads

    def reset(self) -> None:
        self.tallied = None

    def _host_record(self, bad_agents, bad_aggregate, t) -> None:
        with self.lock:
            before = self.tallied or _nothing_tallied(len(bad_agents), xp=np)
            self.tallied = _first_failure(before, bad_agents, bad_aggregate, t, xp=np)

    def record(self, bad_agents, bad_aggregate, t) -> None:
        jax.debug.callback(self._host_record, bad_agents, bad_aggregate, t)

    def host_read(self) -> Tallied:
        return self.tallied or _nothing_tallied(0, xp=np)


class FederatedScore:
    """``score(params, labels, probe_keys, x, t, state) -> Evaluation`` at one diffusion time t.

    Args:
      agent_score_fn: ``(params, x, t, y) -> (agents, batch, ...)`` scores of all K agents.
      aggregator: how to combine them.
      image_shape: one sample's shape (the Hutchinson probes').
      tally: where each evaluation is tallied (``ValueTally`` or ``CallbackTally``; the
        sampler binds one per solve with ``tallying``); None: nothing is tallied.
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
        grouped_score_fn: Callable | None = None,
        tally: ValueTally | CallbackTally | None = None,
    ):
        self.agent_score_fn = agent_score_fn
        self.aggregator = aggregator
        self.image_shape = tuple(image_shape)
        self.grouped_score_fn = grouped_score_fn
        self.tally = tally

    def tallying(self, tally: ValueTally | CallbackTally) -> FederatedScore:
        """This score, its evaluations tallied in ``tally``."""
        bound = copy.copy(self)
        bound.tally = tally
        return bound

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
        if self.tally is not None:
            bad_agents = ~jnp.all(jnp.isfinite(scores.reshape(scores.shape[0], -1)), axis=1)
            self.tally.record(bad_agents, ~jnp.all(jnp.isfinite(score)), t)
        return Evaluation(scores, score, state, t_batch, extra)
