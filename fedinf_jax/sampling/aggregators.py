"""Aggregators: how the server combines K agents' scores, as optax-style pure plug-ins.

An ``Aggregator`` is a pair of pure functions, plus optional parts for members with state:

    state = init(num_agents, x, y, keys)
    score, state = aggregate(agent_scores, t, x, y, state)
    dstate = tendency(agent_scores, t, x, y, state, dx, dt[, divergence=...])  # optional
    dx_noise = noise(agent_scores, t, x, y, state, g_dw)                      # optional

with ``agent_scores`` of shape (agents, batch, ...), ``t`` a scalar or (batch,) diffusion time,
``x`` (batch, ...) the current state of the reverse process, ``y`` (batch,) labels and ``keys``
(batch,) one PRNG key per sample for a member whose initial state is drawn at random (``route``
draws each sample's agent; the others ignore it, and it may be None for them).

The state is a pytree carried inside the sampler's Diffrax solve, as part of the solution
``(x, state)``, so a member can accumulate quantities along a trajectory (the density-weighted
members do). Because a Diffrax vector field returns rates, not new values, the state evolves
through ``tendency``: its increment over a reverse step ``dx`` taken in time ``dt`` (``dt`` > 0
runs from noise to data), which must be linear in ``(dx, dt)``. The sampler feeds it
``dx = b dtau + g dW``, split into its drift and noise parts, so for Euler-Maruyama the update is
exactly ``state + tendency(..., dx, dt)`` with the step actually taken; for higher-order SDE
solvers it is the solver's own combination of those evaluations (consistent, not exact per step).
``aggregate`` may add quantities derived at the current point to the state it returns; ``tendency``
receives that state. Without ``tendency`` the state is constant.

``noise`` (optional) replaces the reverse SDE's noise g dW by a state-dependent linear map of it
(``superdiff_and`` projects out the directions that would make the agents' densities drift apart).
``divergence_probes`` > 0 asks the sampler for Hutchinson estimates of each agent's score
divergence, passed to ``aggregate`` and ``tendency`` as ``divergence`` (agents, batch) (the
probability-flow ODE's density change needs it). ``weights(agent_scores, t, x, y, state[,
divergence=...])`` returns the (agents, batch) weights of a member that is a weighted sum of the
agents' scores (``weighted_sum`` builds one; ``median`` and ``trimmed_mean`` have none), and
``weights_from_state`` says they are a function of the state and the labels alone, which change
along the solve (``superdiff_or``, ``route``: the sampler saves them); ``weights_from_labels``
says they are a function of the labels alone, the same all along the solve (``label_prior``,
``weighted``), so ``keep_top_k`` knows the agents asked before the solve starts.
``dispatch(state, y)``, where given, returns (m, batch) agent numbers: for each sample, the m
agents whose weights can be non-zero during the whole solve, known from the initial state and
the labels alone. The sampler then evaluates only those (``fedinf_jax.agents.dispatch``), and the
other agents' entries of ``agent_scores`` are zeros.

Weighted members compute s = sum_i w_i s_i. Only the mixture weights
w_i proportional to pi_i p_i,t(x) give the score of the pooled data (the mixture's score,
docs/aggregators.md); the
uniform mean is the score of a tempered product of experts and is exact only when all agents agree.
``superdiff_or`` tracks log p_i,t along the trajectory (``fedinf_jax.diffusion.density``) to use
exactly those weights.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedinf_jax.core.registry import Registry, check_choice
from fedinf_jax.core.types import Array
from fedinf_jax.diffusion import density
from fedinf_jax.diffusion.sde import SDE


class EmptyState(NamedTuple):
    """The state of a stateless aggregator."""


class Aggregator(NamedTuple):
    """``init(num_agents, x, y, keys=None) -> state``; ``aggregate(scores, t, x, y, state) ->
    (score, state)``; optionally ``tendency``, ``noise``, ``weights``, ``weights_from_state``,
    ``weights_from_labels``, ``divergence_probes`` and ``dispatch`` (see the module docstring)."""

    init: Callable[..., Any]
    aggregate: Callable[..., tuple[Array, Any]]
    tendency: Callable[..., Any] | None = None
    noise: Callable[..., Array] | None = None
    weights: Callable[..., Array] | None = None
    divergence_probes: int = 0
    dispatch: Callable[[Any, Array], Array] | None = None
    weights_from_state: bool = False
    weights_from_labels: bool = False


# A factory's parameters that come from the run, not from the config (the partition's count
# matrix, K, the agents' SDE, the sampler's method); every other parameter of a registered factory
# is a setting of that member, with a default.
_NO_COUNTS = (
    "the partition's count matrix n[agent, class], and the checkpoint carries none (it is written "
    "by train.py into the checkpoint's meta)"
)
AGGREGATORS: Registry[Callable[..., Aggregator]] = Registry(
    "aggregator",
    context={
        "counts": _NO_COUNTS,
        "num_agents": "the number of agents",
        "sde": "the agents' SDE",
        "method": "the sampler's method",
    },
)


def member(name: str, *, replace: bool = False):
    """Registers an aggregator factory under ``name``; its parameters are its settings (the
    config's ``aggregator.<name>`` section, from their defaults) and any of the registry's
    context. It returns an ``Aggregator`` or a plain function (``from_function``).
    ``replace``: replace a member of that name on purpose (a notebook cell run again).

    Raises:
      ValueError: a setting without a default, or a name already registered (without
        ``replace``).
    """

    def add(factory):
        for p in inspect.signature(factory).parameters.values():
            if p.name not in AGGREGATORS.context and p.default is inspect.Parameter.empty:
                raise ValueError(f"aggregator {name!r}: setting {p.name!r} needs a default")
        return AGGREGATORS.register(name, factory, replace=replace)

    return add


_FUNCTION_ARGS = ("scores", "t", "x", "y")


def from_function(fn: Callable[..., Array]) -> Aggregator:
    """A stateless member from a plain function of the agents' scores,
    ``fn(scores, t, x, y)`` or the first of those arguments it takes (``fn(scores)``), with
    ``scores`` (agents, batch, ...), ``t`` scalar or (batch,), ``x`` (batch, ...) and ``y``
    (batch,) labels. It returns either

    * the aggregate score, shaped like one agent's (batch, ...): used as it is; or
    * the agents' weights, (agents,) or (agents, batch): normalised to sum to one over the
      agents, s = sum_i w_i s_i / sum_i w_i (non-negative weights are the caller's to give).

    Which of the two is read from the returned shape when the solve is traced. Under guidance
    (``guided``) the function is called twice per evaluation, once with the labels and once with
    the null label (``num_classes``, 10 for MNIST) and the agents' unconditional scores, so a
    function that indexes a per-class table must give that row too (the label-free one).

    Raises:
      TypeError: ``fn`` takes none of those arguments, or others without defaults.
    """
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if not 1 <= len(params) <= len(_FUNCTION_ARGS):
        raise TypeError(
            f"an aggregator function takes (scores, t, x, y) or the first of them, e.g. "
            f"f(scores); {getattr(fn, '__name__', fn)!r} takes {len(params)} arguments"
        )
    num_args = len(params)

    def weights_or_score(scores, t, x, y):
        out = jnp.asarray(fn(*(scores, t, x, y)[:num_args]))
        if out.shape == scores.shape[1:]:
            return out, None
        if out.shape in (scores.shape[:1], scores.shape[:2]):
            out = out.astype(scores.dtype)
            return None, out / jnp.sum(out, axis=0, keepdims=True)
        raise ValueError(
            "an aggregator function returns the aggregate score, shaped like one agent's "
            f"{scores.shape[1:]}, or the agents' weights {scores.shape[:1]} or "
            f"{scores.shape[:2]}; {getattr(fn, '__name__', fn)!r} returned {out.shape}"
        )

    def aggregate(scores, t, x, y, state):
        score, weights = weights_or_score(scores, t, x, y)
        return (score if weights is None else _weighted_sum(scores, weights)), state

    return Aggregator(_empty_init, aggregate)


def as_aggregator(member: Aggregator | Callable[..., Array]) -> Aggregator:
    """``member`` as an ``Aggregator``: itself, or a plain function through
    ``from_function``.

    Raises:
      TypeError: neither an ``Aggregator`` nor a callable.
    """
    if isinstance(member, Aggregator):
        return member
    if callable(member):
        return from_function(member)
    raise TypeError(
        f"an aggregator is a member's name, an Aggregator or a function of the agents' scores; "
        f"got {type(member).__name__}"
    )


def _empty_init(num_agents, x, y, keys=None) -> EmptyState:
    del num_agents, x, y, keys
    return EmptyState()


def weighted_sum(weight_fn: Callable[..., Array], **parts) -> Aggregator:
    """A member that is a weighted sum of the agents' scores, s = sum_i w_i s_i with
    ``w = weight_fn(scores, t, x, y, state, divergence=None)``, (agents,) or (agents, batch): its
    ``aggregate`` and its ``weights``. ``parts``: the ``Aggregator``'s other fields (``init``
    defaults to the stateless one)."""

    def aggregate(scores, t, x, y, state, divergence=None):
        return _weighted_sum(scores, weight_fn(scores, t, x, y, state, divergence)), state

    return Aggregator(parts.pop("init", _empty_init), aggregate, weights=weight_fn, **parts)


def _stateless(combine: Callable[[Array, Array, Array, Array], Array]) -> Aggregator:
    """A member without state: ``combine(agent_scores, t, x, y) -> score``."""

    def aggregate(agent_scores, t, x, y, state):
        return combine(agent_scores, t, x, y), state

    return Aggregator(_empty_init, aggregate)


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


@member("mean")
def mean() -> Aggregator:
    """The paper's uniform average s = (1/K) sum_i s_i (its eq. 6). Permutation-invariant."""
    # Its own arithmetic (a mean, not a sum of 1/K-weighted terms), its weights uniform.
    return _stateless(lambda scores, t, x, y: jnp.mean(scores, axis=0))._replace(
        weights=lambda scores, *_, **__: jnp.full(scores.shape[:2], 1.0 / scores.shape[0])
    )


@member("weighted")
def weighted(weights=(), counts=None) -> Aggregator:
    """Fixed weights s = sum_i w_i s_i, w normalised to sum to one; no weights: the data shares
    n_i / N from the count matrix ``counts``.

    Raises:
      ValueError: a negative weight, an all-zero vector, a length other than the number of
        agents in ``counts``, or neither weights nor counts.
    """
    if len(weights) == 0:
        weights = _need_counts("weighted", counts).sum(axis=1)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be a non-negative vector with a positive sum, got {w}")
    if counts is not None and w.shape != (len(counts),):
        raise ValueError(f"aggregator weights: {w.size} entries for {len(counts)} agents")
    w = jnp.asarray(w / w.sum(), jnp.float32)
    return weighted_sum(lambda *_, **__: w, weights_from_labels=True)


@member("label_prior")
def label_prior(counts, top_k: int = 0) -> Aggregator:
    """Label-prior weights rho_i(y) = n_{i,y} / n_y from the count matrix n[agent, class].

    In the heterogeneous regime with equal shard sizes the owner of digit y gets 1/2 and each
    other agent 1/18 (the pooled data's posterior); with ``partitions.heterogeneous``' sizes,
    which use every class up, the owner gets (9/8)(1 - N / (18 n_y)) (0.51 for digit 3). This is the
    mixture weight without its density term. ``top_k`` > 0 keeps each class's k largest weights,
    renormalised (``keep_top_k``): a router with nothing to train, whose other agents need not
    be asked.

    Raises:
      ValueError: a class that no agent holds (its weights would be 0/0), or top_k outside
        [0, K].
    """
    n = _count_matrix(counts)
    totals = n.sum(axis=0)
    if np.any(totals == 0):
        raise ValueError(f"classes {np.flatnonzero(totals == 0).tolist()} are held by no agent")
    rho = jnp.asarray(n / totals, jnp.float32)  # (agents, classes)
    member = weighted_sum(lambda scores, t, x, y, *_, **__: rho[:, y], weights_from_labels=True)
    return keep_top_k(member, top_k, len(n))


def _check_top_k(top_k: int, num_agents: int | None) -> bool:
    """Whether ``top_k`` restricts the weights (0: all agents); refuses one outside [0, K]."""
    if top_k < 0 or (num_agents is not None and top_k > num_agents):
        limit = f"[0, {num_agents}]" if num_agents is not None else ">= 0"
        raise ValueError(f"top_k must be in {limit} (0: every agent), got {top_k}")
    return top_k > 0 and top_k != num_agents


def keep_top_k(member: Aggregator, k: int, num_agents: int | None = None) -> Aggregator:
    """``member`` restricted to each sample's k largest weights, renormalised: exactly k agents,
    ties to the lower agent index (``jax.lax.top_k``'s order). A wrapper in optax's manner: it
    takes a weighted member (built by ``weighted_sum``) and returns one. k = 0 or K returns
    ``member`` itself. When the member's weights come from the labels alone
    (``weights_from_labels``), the k agents are known before the solve and declared
    (``dispatch``), so the sampler asks only them; otherwise they change along the solve and
    every agent is asked.

    Raises:
      ValueError: a member without weights, or k outside [0, K].
    """
    if member.weights is None:
        raise ValueError("keep_top_k needs a member that is a weighted sum (one with weights)")
    if not _check_top_k(k, num_agents):
        return member

    def full_weights(scores, t, x, y, state, divergence=None):  # (agents, batch)
        w = member.weights(scores, t, x, y, state, divergence)
        return jnp.broadcast_to(w.reshape(w.shape[0], -1), (w.shape[0], y.shape[0]))

    def kept(w):  # (k, batch): the agents of each column's k largest weights
        return jax.lax.top_k(w.T, k)[1].T

    def weights(scores, t, x, y, state, divergence=None):
        w = full_weights(scores, t, x, y, state, divergence)
        w = w * jax.nn.one_hot(kept(w), w.shape[0], axis=0, dtype=w.dtype).sum(axis=1)
        return w / w.sum(axis=0)

    def dispatch(state, y):
        return kept(full_weights(None, None, None, y, state))

    return member._replace(
        aggregate=weighted_sum(weights).aggregate,
        weights=weights,
        dispatch=dispatch if member.weights_from_labels else None,
    )


def schedule(weight_fn: Callable[[Array, Array], Array]) -> Aggregator:
    """Time-dependent weights s = sum_i w_i(t, y) s_i; ``weight_fn(t, y)`` returns (agents,)
    weights summing to one for a scalar t and label y (vmapped over the batch)."""

    def weights(scores, t, x, y, *_, **__):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (scores.shape[1],))
        return jax.vmap(weight_fn)(t, y).T  # (agents, batch)

    return weighted_sum(weights)


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


@member("schedule")
def switch(early_agents=(), t_switch: float = 0.5, counts=None, num_agents=None) -> Aggregator:
    """``schedule`` with the paper's switch: for t > t_switch only ``early_agents``
    (``switch_schedule``) or, with none given, each label's owners (``owner_switch_schedule``);
    all agents uniformly for t <= t_switch.

    Raises:
      ValueError: t_switch < 0, early agents outside 0..K-1, or no early agents and no counts.
    """
    if not t_switch >= 0:
        raise ValueError(f"t_switch must be >= 0, got {t_switch}")
    if len(early_agents) == 0:
        return schedule(owner_switch_schedule(_need_counts("schedule", counts), t_switch))
    k = num_agents if num_agents is not None else len(_need_counts("schedule", counts))
    return schedule(switch_schedule(k, early_agents, t_switch))


@member("median")
def median() -> Aggregator:
    """Elementwise median over agents: robust to fewer than half the agents being faulty."""
    return _stateless(lambda scores, t, x, y: jnp.median(scores, axis=0))


@member("trimmed_mean")
def trimmed_mean(trim: int = 1, num_agents: int | None = None) -> Aggregator:
    """Elementwise mean after dropping the ``trim`` largest and ``trim`` smallest agent values.

    Raises:
      ValueError: trim < 0, or 2 trim >= ``num_agents`` (checked here when given, else at the
        first call).
    """
    if trim < 0:
        raise ValueError(f"trim must be >= 0, got {trim}")
    if num_agents is not None and 2 * trim >= num_agents:
        raise ValueError(
            f"trimmed_mean(trim={trim}) needs more than {2 * trim} agents, got {num_agents}"
        )

    def combine(scores, t, x, y):
        k = scores.shape[0]
        if 2 * trim >= k:
            raise ValueError(
                f"trimmed_mean(trim={trim}) needs more than {2 * trim} agents, got {k}"
            )
        return jnp.mean(jnp.sort(scores, axis=0)[trim : k - trim], axis=0)

    return _stateless(combine)


class DensityState(NamedTuple):
    """The density-weighted members' state: each agent's tracked log-density log q_i,t(x | y)
    at the current point, (agents, batch)."""

    log_q: Array


PRIORS = ("label", "shares", "uniform")


def log_prior_table(counts, prior: str = "label") -> np.ndarray:
    """log pi_i(y) as an (agents, classes) table from the count matrix n[agent, class]:
    ``label``: n_{i,y} / n_y (the pooled data's posterior weights);
    ``shares``: n_i / N for every class; ``uniform``: 1 / K. Zero counts give -inf (weight 0).

    Raises:
      ValueError: an unknown prior, or a class no agent holds.
    """
    check_choice("prior", prior, PRIORS)
    n = _count_matrix(counts)
    if prior == "shares":
        n = np.broadcast_to(n.sum(axis=1, keepdims=True), n.shape)
    elif prior == "uniform":
        n = np.ones_like(n)
    totals = n.sum(axis=0)
    if np.any(totals == 0):
        raise ValueError(f"classes {np.flatnonzero(totals == 0).tolist()} are held by no agent")
    with np.errstate(divide="ignore"):
        return np.log(n / totals)


def _density_init(sde: SDE):
    def init(num_agents, x, y, keys=None):
        del y, keys
        return DensityState(jnp.broadcast_to(sde.prior_logp(x), (num_agents, x.shape[0])))

    return init


def _density_tendency(sde: SDE, method: str):
    def tendency(scores, t, x, y, state, dx, dt, divergence=None):
        del y, state
        inc = density.log_density_increment(sde, method, scores, t, x, dx, dt, divergence)
        return DensityState(inc)

    return tendency


def _check_method(method: str, probes: int) -> int:
    check_choice("sampler method", method, density.METHODS)
    if method == "ode" and probes < 1:
        raise ValueError(f"the ODE's density needs >= 1 Hutchinson probe, got {probes}")
    return probes if method == "ode" else 0


@member("superdiff_or")
def superdiff_or(
    sde: SDE,
    method: str,
    counts=None,
    num_agents=None,
    prior="label",
    temperature: float = 1.0,
    probes: int = 1,
    top_k: int = 0,
) -> Aggregator:
    """The mixture (SuperDiff's OR): s = sum_i w_i s_i, w = softmax_i(T log q_i + log pi_i(y)).

    log q_i is each agent's log-density tracked along the trajectory
    (``fedinf_jax.diffusion.density``): the Ito estimator on the reverse SDE (no extra network
    evaluations) or, on the probability-flow ODE, the instantaneous change of variables with
    ``probes`` Hutchinson probes. With temperature T = 1 and the label prior this is the score of
    the pooled data's class-conditional mixture, up to the agents' and the estimator's errors.

    Args:
      sde: the SDE the agents were trained with.
      method: the sampler's method, "sde" or "ode".
      counts: the partition's count matrix n[agent, class] (the ``label`` and ``shares`` priors).
      prior: log pi_i(y): a name of ``PRIORS`` (``log_prior_table``) or an (agents, classes)
        table; ``uniform`` (or None) adds nothing.
      temperature: T > 0.
      probes: Rademacher probes per ODE step (ignored on the SDE).
      top_k: k > 0 keeps each sample's k largest weights at each step, renormalised
        (``keep_top_k``: a sparse posterior router; every agent's log-density is still tracked,
        so every agent is asked); 0: every agent.

    Raises:
      ValueError: an unknown method or prior, no probe for the ODE, T <= 0, a named prior
        other than ``uniform`` without counts, or top_k outside [0, K].
    """
    probes = _check_method(method, probes)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(prior, str):
        check_choice("prior", prior, PRIORS)
        prior = (
            None
            if prior == "uniform"
            else log_prior_table(_need_counts("superdiff_or", counts), prior)
        )
    table = None if prior is None else jnp.asarray(prior, jnp.float32)

    def weights(scores, t, x, y, state, divergence=None):
        logits = temperature * state.log_q
        if table is not None:
            logits = logits + table[:, y]
        return jax.nn.softmax(logits, axis=0)

    member = weighted_sum(
        weights,
        init=_density_init(sde),
        tendency=_density_tendency(sde, method),
        divergence_probes=probes,
        weights_from_state=True,
    )
    return keep_top_k(member, top_k, num_agents)


class RouteState(NamedTuple):
    """``route``'s state: each sample's agent, (batch,), drawn once at the start; held as a
    float (the sampler's Diffrax solve carries its state as floats, and with no tendency it stays
    exactly the drawn integer)."""

    agent: Array


@member("route")
def route(counts=None, num_agents=None, prior="label") -> Aggregator:
    """Ancestral mixture sampling: each sample draws one agent k ~ pi_k(y) when its solve
    starts (from its own key) and the reverse process follows that agent's score alone.

    Drawing the component, then sampling it, samples the mixture sum_k pi_k(y) p_k(x | y) of the
    agents' models exactly, with no per-step aggregation; with the ``label`` prior that is the
    pooled data's class-conditional model (docs/aggregators.md), the target ``superdiff_or``
    reaches through its tracked densities. The member declares each sample's agent
    (``dispatch``), so the sampler asks that agent only (``fedinf_jax.agents.dispatch``), as a
    deployment would send each sample to one agent.

    Args:
      counts: the partition's count matrix (the ``label`` and ``shares`` priors).
      num_agents: K (the ``uniform`` prior needs only this).
      prior: pi_k(y): a name of ``PRIORS`` (``log_prior_table``) or an (agents, classes) table
        of log-probabilities.

    Raises:
      ValueError: an unknown prior, or a named prior without the counts (or K) it needs.
    """
    if isinstance(prior, str):
        check_choice("prior", prior, PRIORS)
        if prior == "uniform" and counts is None:
            if num_agents is None:
                raise ValueError("aggregator 'route' with the uniform prior needs K")
            prior = np.zeros((num_agents, 1))
        else:
            prior = log_prior_table(_need_counts("route", counts), prior)
    table = jnp.asarray(prior, jnp.float32)  # (agents, classes) log pi_k(y)

    def init(num_agents, x, y, keys=None):
        del x
        if keys is None:
            raise ValueError("aggregator 'route' draws each sample's agent: init needs keys")
        logits = (table[:, y] if table.shape[1] > 1 else table[:, jnp.zeros_like(y)]).T
        return RouteState(jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.float32))

    def weights(scores, t, x, y, state, divergence=None):
        return jax.nn.one_hot(state.agent.astype(jnp.int32), table.shape[0], axis=0)

    def aggregate(scores, t, x, y, state):
        index = state.agent.astype(jnp.int32).reshape((1, -1) + (1,) * (scores.ndim - 2))
        return jnp.take_along_axis(scores, index, axis=0)[0], state

    def dispatch(state, y):
        return state.agent.astype(jnp.int32)[None]

    # Its own arithmetic (the drawn agent's score, selected), its weights that agent's.
    return Aggregator(init, aggregate, weights=weights, dispatch=dispatch, weights_from_state=True)


def _equal_density_system(sde, method, scores, t, x, divergence, ridge):
    """kappa (agents, batch) with sum 1 such that the reverse drift b = -f + c g^2 sum_j kappa_j s_j
    changes every agent's log-density at the same rate: <s_i - s_0, b> + a_i - a_0 = 0 for
    i = 1..K-1 (a_i: ``density.log_density_rate``). Solved per sample as ridge-regularised least
    squares towards uniform kappa, which keeps it defined when agents agree."""
    k, b = scores.shape[:2]
    s = scores.reshape(k, b, -1)
    c = 1.0 if method == "sde" else 0.5
    g2 = sde.diffusion(t) ** 2  # (batch,)
    rate = density.log_density_rate(sde, method, scores, t, x, divergence)  # (k, b)
    d = s[1:] - s[:1]  # (k-1, b, dim)
    f = sde.drift(x, t).reshape(b, -1)
    a = c * g2[:, None, None] * jnp.einsum("ibd,jbd->bij", d, s)  # (b, k-1, k)
    r = jnp.einsum("ibd,bd->bi", d, f) - (rate[1:] - rate[:1]).T  # (b, k-1)
    ata = jnp.einsum("bij,bil->bjl", a, a)  # (b, k, k)
    lam = ridge * jnp.trace(ata, axis1=1, axis2=2) / k + 1e-30
    u = jnp.full((k,), 1.0 / k)
    top = jnp.concatenate([ata + lam[:, None, None] * jnp.eye(k), jnp.ones((b, k, 1))], axis=2)
    bottom = jnp.concatenate([jnp.ones((b, 1, k)), jnp.zeros((b, 1, 1))], axis=2)
    rhs = jnp.concatenate(
        [jnp.einsum("bij,bi->bj", a, r) + lam[:, None] * u, jnp.ones((b, 1))], axis=1
    )
    sol = jnp.linalg.solve(jnp.concatenate([top, bottom], axis=1), rhs[..., None])[..., 0]
    return sol[:, :k].T  # (k, b)


def _project_out_differences(scores, g_dw, ridge):
    """(I - P) g dW with P the (ridge-regularised) projection onto span{s_i - s_0}: the noise
    that leaves every <s_i - s_0, dx> unchanged."""
    k, b = scores.shape[:2]
    d = (scores[1:] - scores[:1]).reshape(k - 1, b, -1).transpose(1, 0, 2)  # (b, k-1, dim)
    v = g_dw.reshape(b, -1)
    gram = jnp.einsum("bid,bjd->bij", d, d)
    lam = ridge * jnp.trace(gram, axis1=1, axis2=2) / (k - 1) + 1e-30
    coef = jnp.linalg.solve(
        gram + lam[:, None, None] * jnp.eye(k - 1), jnp.einsum("bid,bd->bi", d, v)[..., None]
    )[..., 0]
    return (v - jnp.einsum("bi,bid->bd", coef, d)).reshape(g_dw.shape)


@member("superdiff_and")
def superdiff_and(sde: SDE, method: str, probes: int = 1, ridge: float = 1e-6) -> Aggregator:
    """Equal-density superposition (SuperDiff's AND), generalised to K agents.

    SuperDiff picks kappa so that d log q_1 = d log q_2 over each Euler-Maruyama step, noise
    included. Written out, that step is the drift of the midpoint kappa = 1/2 plus the noise g dW
    with its component along s_1 - s_2 removed. For K agents the same conditions
    d log q_i = d log q_0 (i = 1..K-1) give: the drift of the point of the agents' affine hull
    sum_j kappa_j s_j (sum kappa = 1) that equalises the rates of change (on the SDE, the point
    equidistant from all s_i, the circumcentre), plus the noise projected onto the complement of
    span{s_i - s_0}. The agents' tracked log-densities then move together; the state is
    ``DensityState`` (one log q per agent, all equal up to ``ridge``). On the ODE the rates include
    the scores' divergence (``probes`` Hutchinson probes) and there is no noise.

    Args:
      sde: the SDE the agents were trained with.
      method: "sde" or "ode".
      probes: Rademacher probes per ODE step (ignored on the SDE).
      ridge: relative Tikhonov term towards uniform kappa (and in the projection), which keeps
        both defined where the agents' scores (nearly) coincide.

    Raises:
      ValueError: an unknown method, no probe for the ODE, or ridge < 0.
    """
    probes = _check_method(method, probes)
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")

    def kappa(scores, t, x, y, state, divergence=None):
        if scores.shape[0] == 1:
            return jnp.ones(scores.shape[:2], scores.dtype)
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        return _equal_density_system(sde, method, scores, t, x, divergence, ridge)

    def noise(scores, t, x, y, state, g_dw):
        if scores.shape[0] == 1:
            return g_dw
        return _project_out_differences(scores, g_dw, ridge)

    return weighted_sum(
        kappa,
        init=_density_init(sde),
        tendency=_density_tendency(sde, method),
        noise=None if method == "ode" else noise,
        divergence_probes=probes,
    )


def _need_counts(name: str, counts) -> np.ndarray:
    if counts is None:
        raise ValueError(f"aggregator {name!r} needs {_NO_COUNTS}")
    return np.asarray(counts)


def config_section(name: str = "mean"):
    """The config's ``aggregator`` section: ``name`` plus one subsection per member with
    settings, ``aggregator.<member>.<setting>``, at the factories' defaults."""
    import ml_collections  # only configs build sections

    section = ml_collections.ConfigDict({"name": AGGREGATORS.check(name)})
    for member_name in AGGREGATORS:
        settings = AGGREGATORS.settings(member_name)
        if settings:
            section[member_name] = ml_collections.ConfigDict(settings)
    return section


def agents_asked(member: Aggregator, num_agents: int) -> int:
    """How many agents ``member`` asks for each sample's score: the m agents its ``dispatch``
    names (``route``: 1; ``label_prior`` with ``top_k`` = k: k; guided, the same for the
    label's and the guide's score), all K for a member without ``dispatch``."""
    if member.dispatch is None:
        return num_agents
    x, y = jnp.zeros((1, 1)), jnp.zeros(1, jnp.int32)
    keys = jax.random.split(jax.random.key(0), 1)
    state = jax.eval_shape(lambda: member.init(num_agents, x, y, keys))
    return jax.eval_shape(member.dispatch, state, y).shape[0]


def fit_to_agents(section, num_agents: int):
    """``section`` (the config's ``aggregator`` section) with the settings a federation of
    ``num_agents`` cannot take capped, in place: ``trimmed_mean`` keeps at least one agent (with
    2 agents it trims none). Returns it."""
    if "trimmed_mean" in section:
        section.trimmed_mean.trim = min(section.trimmed_mean.trim, (num_agents - 1) // 2)
    return section


def with_null_class(counts) -> np.ndarray:
    """The count matrix n[agent, class] with one more class, the null label of classifier-free
    guidance, holding each agent's whole shard n_i: a member's label prior at the null label is
    then its label-free prior (``label_prior``: the data shares n_i / N)."""
    n = _count_matrix(counts)
    return np.concatenate([n, n.sum(axis=1, keepdims=True)], axis=1)


def _halves(tree):
    """(conditional, null) halves of a pytree of (2K, ...) arrays (``guided``)."""
    first = jax.tree.map(lambda a: a[: a.shape[0] // 2], tree)
    return first, jax.tree.map(lambda a: a[a.shape[0] // 2 :], tree)


ALWAYS = (0.0, math.inf)
"""A guidance interval that holds every t (``guided``)."""


def guided(
    member: Aggregator,
    guidance: float,
    null_label: int | None,
    interval: tuple[float, float] = ALWAYS,
) -> Aggregator:
    """Classifier-free guidance of the federation (Ho and Salimans 2022), guiding the aggregate:

        s = S_null + w (S_y - S_null),

    with S_y the member's aggregate of the agents' conditional scores s_i(x, y) at the label y,
    and S_null its aggregate of their null-label (unconditional) scores s_i(x, null) at the null
    label, where a member's label prior is its label-free prior (``with_null_class``); w = 1 is
    S_y. The agent scores come stacked as (2K, batch, ...), the K conditional ones first
    (``federated_score.with_null_label``), and so does a ``divergence``.

    ``null_label`` None is autoguidance (Karras et al. 2024): the second K scores are those of
    weaker versions of the same agents at the same label y (an earlier checkpoint), aggregated at
    y, s = S_weak + w (S_y - S_weak).

    ``interval`` (t_lo, t_hi): guidance only where t_lo < t <= t_hi, s = S_y elsewhere
    (Kynkaanniemi et al. 2024, guidance in a limited interval of noise levels: at low noise it
    amplifies whatever the conditional and unconditional denoisers disagree on, the image's
    fine detail and its errors alike, and adds nothing to which digit is drawn). Both scores are
    evaluated at every t.

    A member with state keeps two, (conditional, null), each driven along the path actually
    taken by its own agents' scores: the density-weighted members track every agent's
    conditional and unconditional log-density (``fedinf_jax.diffusion.density`` holds along any
    path), so S_y and S_null are the pooled data's conditional and unconditional scores and the
    guided field is the pooled data's, guided. A member's own noise (``superdiff_and``) acts as for
    its conditional aggregate; its ``weights`` are the conditional ones.
    """
    null_of = (lambda y: y) if null_label is None else (lambda y: jnp.full_like(y, null_label))
    t_lo, t_hi = (float(v) for v in interval)
    if not 0.0 <= t_lo < t_hi:
        raise ValueError(
            f"the guidance interval must be (t_lo, t_hi) with 0 <= t_lo < t_hi, got {interval}"
        )

    def init(num_agents, x, y, keys=None):
        return member.init(num_agents, x, y, keys), member.init(num_agents, x, null_of(y), keys)

    def aggregate(scores, t, x, y, state, **extra):
        (sc, ec), (su, eu) = zip(*map(_halves, (scores, extra)), strict=True)
        score_y, state_y = member.aggregate(sc, t, x, y, state[0], **ec)
        score_null, state_null = member.aggregate(su, t, x, null_of(y), state[1], **eu)
        w = jnp.where((t > t_lo) & (t <= t_hi), guidance, 1.0).astype(score_y.dtype)
        w = w.reshape(w.shape + (1,) * (score_y.ndim - w.ndim))
        return score_null + w * (score_y - score_null), (state_y, state_null)

    def tendency(scores, t, x, y, state, dx, dt, **extra):
        (sc, ec), (su, eu) = zip(*map(_halves, (scores, extra)), strict=True)
        return (
            member.tendency(sc, t, x, y, state[0], dx, dt, **ec),
            member.tendency(su, t, x, null_of(y), state[1], dx, dt, **eu),
        )

    def noise(scores, t, x, y, state, g_dw):
        return member.noise(_halves(scores)[0], t, x, y, state[0], g_dw)

    def weights(scores, t, x, y, state, **extra):
        (sc, ec), _ = zip(*map(_halves, (scores, extra)), strict=True)
        return member.weights(sc, t, x, y, state[0], **ec)

    def dispatch(state, y):  # the doubled batch of with_null_label: (m, 2 batch)
        return jnp.concatenate(
            [member.dispatch(state[0], y), member.dispatch(state[1], null_of(y))], axis=1
        )

    return Aggregator(
        init,
        aggregate,
        tendency if member.tendency is not None else None,
        noise if member.noise is not None else None,
        weights if member.weights is not None else None,
        member.divergence_probes,
        # A guide model's scores come from other parameters (autoguidance): every agent is asked.
        dispatch if member.dispatch is not None and null_label is not None else None,
        member.weights_from_state,
    )


def from_config(
    agg_config,
    counts=None,
    num_agents: int | None = None,
    sde: SDE | None = None,
    method: str = "sde",
) -> Aggregator:
    """The member a config's ``aggregator`` section names, with its settings
    (``aggregator.<name>``) and the run's context (the registry's ``context``).

    Args:
      agg_config: ``name`` plus the members' sections (``config_section``).
      counts: the partition's count matrix n[agent, class] from the checkpoint, or None.
      num_agents: K; default: the rows of ``counts``.
      sde, method: the agents' SDE and the sampler's method (the superdiff members need them).

    Raises:
      ValueError: an unknown name, settings out of range or not fitting K, or a member that
        needs context (the count matrix, the SDE) that is not given.
    """
    if num_agents is None and counts is not None:
        num_agents = len(counts)
    return as_aggregator(
        AGGREGATORS.build(
            agg_config.name,
            agg_config.get(agg_config.name, None) or {},
            counts=counts,
            num_agents=num_agents,
            sde=sde,
            method=method,
        )
    )
