"""Aggregators: how the server combines K agents' scores, as optax-style pure plug-ins.

An ``Aggregator`` is a pair of pure functions:

    state = init(num_agents, x, y)
    score, state = aggregate(agent_scores, t, x, y, state)

with ``agent_scores`` of shape (agents, batch, ...), ``t`` a scalar or (batch,) diffusion time,
``x`` (batch, ...) the current state of the reverse process and ``y`` (batch,) labels. The state
is a pytree carried through the solve, so a member can accumulate quantities along a trajectory
(the density-weighted members of a later issue do); the members here are stateless.

Weighted members compute s = sum_i w_i s_i. Only the mixture weights
w_i proportional to pi_i p_i,t(x) give the score of the pooled data (RESEARCH.md section 2); the
uniform mean is the score of a tempered product of experts and is exact only when all agents agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedinf_jax.types import Array


class EmptyState(NamedTuple):
    """The state of a stateless aggregator."""


class Aggregator(NamedTuple):
    """``init(num_agents, x, y) -> state``; ``aggregate(scores, t, x, y, state) -> (score,
    state)``."""

    init: Callable[..., Any]
    aggregate: Callable[..., tuple[Array, Any]]


def _stateless(combine: Callable[[Array, Array, Array, Array], Array]) -> Aggregator:
    def init(num_agents, x, y):
        del num_agents, x, y
        return EmptyState()

    def aggregate(agent_scores, t, x, y, state):
        return combine(agent_scores, t, x, y), state

    return Aggregator(init, aggregate)


def _weighted_sum(agent_scores: Array, weights: Array) -> Array:
    """sum_i w_i s_i with weights (agents,) or (agents, batch)."""
    w = weights.reshape(weights.shape + (1,) * (agent_scores.ndim - weights.ndim))
    return jnp.sum(w * agent_scores, axis=0)


def mean() -> Aggregator:
    """The paper's uniform average s = (1/K) sum_i s_i (its eq. 6). Permutation-invariant."""
    return _stateless(lambda scores, t, x, y: jnp.mean(scores, axis=0))


def weighted(weights) -> Aggregator:
    """Fixed weights s = sum_i w_i s_i, w normalised to sum to one (e.g. data shares n_i / N).

    Raises:
      ValueError: a negative weight or an all-zero vector.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be a non-negative vector with a positive sum, got {w}")
    w = jnp.asarray(w / w.sum(), jnp.float32)
    return _stateless(lambda scores, t, x, y: _weighted_sum(scores, w))


def label_prior(counts) -> Aggregator:
    """Label-prior weights rho_i(y) = n_{i,y} / n_y from the count matrix n[agent, class].

    In the heterogeneous regime with equal shard sizes the owner of digit y gets 1/2 and each
    other agent 1/18 (RESEARCH.md section 2); with ``partitions.heterogeneous``' sizes, which use
    every class up, the owner gets (9/8)(1 - N / (18 n_y)) (0.51 for digit 3). This is the
    mixture weight without its density term.

    Raises:
      ValueError: a class that no agent holds (its weights would be 0/0).
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 2 or np.any(n < 0):
        raise ValueError(f"counts must be a non-negative (agents, classes) matrix, got {n.shape}")
    totals = n.sum(axis=0)
    if np.any(totals == 0):
        raise ValueError(f"classes {np.flatnonzero(totals == 0).tolist()} are held by no agent")
    rho = jnp.asarray(n / totals, jnp.float32)  # (agents, classes)
    return _stateless(lambda scores, t, x, y: _weighted_sum(scores, rho[:, y]))


def schedule(weight_fn: Callable[[Array], Array]) -> Aggregator:
    """Time-dependent weights s = sum_i w_i(t) s_i; ``weight_fn(t)`` returns (agents,) weights
    summing to one for a scalar t (vmapped over a batch of times)."""

    def combine(scores, t, x, y):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (scores.shape[1],))
        return _weighted_sum(scores, jax.vmap(weight_fn)(t).T)  # (agents, batch)

    return _stateless(combine)


def switch_schedule(num_agents: int, early_agents, t_switch: float) -> Callable[[Array], Array]:
    """The paper's suggested remedy: for t > t_switch only ``early_agents`` (uniformly), for
    t <= t_switch all agents uniformly."""
    early = np.zeros(num_agents, np.float32)
    early[np.asarray(early_agents, dtype=np.int64)] = 1.0
    early /= early.sum()
    late = np.full(num_agents, 1.0 / num_agents, np.float32)
    return lambda t: jnp.where(t > t_switch, jnp.asarray(early), jnp.asarray(late))


def median() -> Aggregator:
    """Elementwise median over agents: robust to fewer than half the agents being faulty."""
    return _stateless(lambda scores, t, x, y: jnp.median(scores, axis=0))


def trimmed_mean(trim: int = 1) -> Aggregator:
    """Elementwise mean after dropping the ``trim`` largest and ``trim`` smallest agent values.

    Raises:
      ValueError: trim < 0.
    """
    if trim < 0:
        raise ValueError(f"trim must be >= 0, got {trim}")

    def combine(scores, t, x, y):
        k = scores.shape[0]
        if 2 * trim >= k:
            raise ValueError(
                f"trimmed_mean(trim={trim}) needs more than {2 * trim} agents, got {k}"
            )
        return jnp.mean(jnp.sort(scores, axis=0)[trim : k - trim], axis=0)

    return _stateless(combine)


AGGREGATORS: dict[str, Callable[..., Aggregator]] = {
    "mean": mean,
    "weighted": weighted,
    "label_prior": label_prior,
    "schedule": schedule,
    "median": median,
    "trimmed_mean": trimmed_mean,
}


def make_aggregator(name: str, **kwargs) -> Aggregator:
    """Looks a member up by name.

    Raises:
      ValueError: an unknown name (the message lists the valid ones).
    """
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; valid: {sorted(AGGREGATORS)}")
    return AGGREGATORS[name](**kwargs)
