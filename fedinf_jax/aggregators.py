"""Aggregators: how the server combines K agents' scores, as optax-style pure plug-ins.

An ``Aggregator`` is a pair of pure functions, plus an optional third:

    state = init(num_agents, x, y)
    score, state = aggregate(agent_scores, t, x, y, state)
    dstate = tendency(agent_scores, t, x, y, state, dx, dt)     # optional

with ``agent_scores`` of shape (agents, batch, ...), ``t`` a scalar or (batch,) diffusion time,
``x`` (batch, ...) the current state of the reverse process and ``y`` (batch,) labels.

The state is a pytree carried inside the sampler's Diffrax solve, as part of the solution
``(x, state)``, so a member can accumulate quantities along a trajectory (the density-weighted
members of a later issue do). Because a Diffrax vector field returns rates, not new values, the
state evolves through ``tendency``: its increment over a reverse step ``dx`` taken in time ``dt``
(``dt`` > 0 runs from noise to data), which must be linear in ``(dx, dt)``. The sampler feeds it
``dx = b dtau + g dW``, split into its drift and noise parts, so for Euler-Maruyama the update is
exactly ``state + tendency(..., dx, dt)`` with the step actually taken. ``aggregate`` may add
quantities derived at the current point (weights, say) to the state it returns; ``tendency``
receives that state. Without ``tendency`` (every member here) the state is constant.

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
    state)``; optionally ``tendency(scores, t, x, y, state, dx, dt) -> dstate`` (see the module
    docstring)."""

    init: Callable[..., Any]
    aggregate: Callable[..., tuple[Array, Any]]
    tendency: Callable[..., Any] | None = None


def _stateless(combine: Callable[[Array, Array, Array, Array], Array]) -> Aggregator:
    def init(num_agents, x, y):
        del num_agents, x, y
        return EmptyState()

    def aggregate(agent_scores, t, x, y, state):
        return combine(agent_scores, t, x, y), state

    return Aggregator(init, aggregate)


def _count_matrix(counts) -> np.ndarray:
    """The count matrix n[agent, class] as float64, checked."""
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 2 or np.any(n < 0):
        raise ValueError(f"counts must be a non-negative (agents, classes) matrix, got {n.shape}")
    return n


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
    n = _count_matrix(counts)
    totals = n.sum(axis=0)
    if np.any(totals == 0):
        raise ValueError(f"classes {np.flatnonzero(totals == 0).tolist()} are held by no agent")
    rho = jnp.asarray(n / totals, jnp.float32)  # (agents, classes)
    return _stateless(lambda scores, t, x, y: _weighted_sum(scores, rho[:, y]))


def schedule(weight_fn: Callable[[Array, Array], Array]) -> Aggregator:
    """Time-dependent weights s = sum_i w_i(t, y) s_i; ``weight_fn(t, y)`` returns (agents,)
    weights summing to one for a scalar t and label y (vmapped over the batch)."""

    def combine(scores, t, x, y):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (scores.shape[1],))
        return _weighted_sum(scores, jax.vmap(weight_fn)(t, y).T)  # (agents, batch)

    return _stateless(combine)


def _switch(early: Array, late: Array, t_switch: float) -> Callable[[Array, Array], Array]:
    """w(t, y) = early[:, y] for t > t_switch, else late[:, y] ((agents, classes) tables)."""
    early, late = jnp.asarray(early, jnp.float32), jnp.asarray(late, jnp.float32)
    return lambda t, y: jnp.where(t > t_switch, early[:, y], late[:, y])


def switch_schedule(num_agents: int, early_agents, t_switch: float) -> Callable:
    """The paper's suggested remedy: for t > t_switch only ``early_agents`` (uniformly), for
    t <= t_switch all agents uniformly; the same for every label."""
    idx = np.asarray(early_agents, dtype=np.int64)
    if idx.size == 0 or np.any((idx < 0) | (idx >= num_agents)):
        raise ValueError(
            f"early_agents must be a non-empty subset of 0..{num_agents - 1}, got {idx}"
        )
    early = np.zeros((num_agents, 1), np.float32)
    early[idx] = 1.0
    early /= early.sum()
    late = np.full((num_agents, 1), 1.0 / num_agents, np.float32)
    return _switch(early, late, t_switch)


def owner_switch_schedule(counts, t_switch: float) -> Callable:
    """For t > t_switch only the agents holding the most examples of the label y (its owner in
    the heterogeneous regime; ties share uniformly), for t <= t_switch all agents uniformly."""
    n = _count_matrix(counts)
    owners = (n == n.max(axis=0, keepdims=True)).astype(np.float32)
    early = owners / owners.sum(axis=0, keepdims=True)
    late = np.full(n.shape, 1.0 / n.shape[0], np.float32)
    return _switch(early, late, t_switch)


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


def _need_counts(name: str, counts) -> np.ndarray:
    if counts is None:
        raise ValueError(
            f"aggregator {name!r} needs the partition's count matrix n[agent, class], and the "
            "checkpoint carries none (it is written by train.py into the checkpoint's meta)"
        )
    return np.asarray(counts)


def from_config(agg_config, counts=None, num_agents: int | None = None) -> Aggregator:
    """The aggregator a config's ``aggregator`` section names (``configs/base.py``).

    Args:
      agg_config: ``name`` plus the members' settings: ``weights`` (``weighted``; empty: the data
        shares n_i / N), ``early_agents`` and ``t_switch`` (``schedule``; no early agents: each
        label's owners), ``trim`` (``trimmed_mean``).
      counts: the partition's count matrix n[agent, class] from the checkpoint, or None.
      num_agents: K, checked against ``weights`` and ``early_agents``.

    Raises:
      ValueError: an unknown name, settings that do not fit K, or a member that needs the count
        matrix when there is none.
    """
    name = agg_config.name
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; valid: {sorted(AGGREGATORS)}")
    k = num_agents if num_agents is not None else (None if counts is None else len(counts))
    if name == "weighted":
        if agg_config.weights:
            weights = np.asarray(agg_config.weights, np.float64)
            if k is not None and weights.shape != (k,):
                raise ValueError(f"aggregator.weights has {weights.size} entries for {k} agents")
        else:
            weights = _need_counts(name, counts).sum(axis=1)
        return weighted(weights)
    if name == "label_prior":
        return label_prior(_need_counts(name, counts))
    if name == "schedule":
        if agg_config.early_agents:
            if k is None:
                raise ValueError("schedule with early_agents needs the number of agents")
            return schedule(switch_schedule(k, agg_config.early_agents, agg_config.t_switch))
        return schedule(owner_switch_schedule(_need_counts(name, counts), agg_config.t_switch))
    if name == "trimmed_mean":
        return trimmed_mean(agg_config.trim)
    return AGGREGATORS[name]()
