"""Sparse dispatch: the grouped evaluation equals the dense one on the pairs it asks, whatever
the groups, and the sampler asks only the agents a sparse member can weight.

Grouped and dense scores are the same arithmetic compiled in different programs (a gathered
batch against the whole one): they agree to float32 rounding (a few ulps), not bitwise, and the
solves to 1e-5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from fedinf_jax.agents import agent_axis, dispatch
from fedinf_jax.diffusion.sde import VPSDE
from fedinf_jax.sampling import aggregators, federated_sampler, federated_score, solvers
from fedinf_jax.workflows import sample_lib
from tests.conftest import count_traces

K = 4
S0 = 0.5
MUS = jnp.array([[4.0, -2.0], [-2.0, 1.0], [1.0, 4.0], [0.5, -3.0]])
# n[agent, class]: every agent holds each class, most of one (class c's owner is agent c % K).
COUNTS = np.array([[50 if c % K == i else 5 + i for c in range(10)] for i in range(K)])


def gaussian_score(sde):
    """One agent's exact score of N(mu, S0^2 I) diffused by ``sde``; it reads the label, so a
    null-label evaluation differs from a conditional one."""

    def score(params, x, t, y):
        alpha, std = sde.marginal(t)
        alpha, var = alpha[:, None], (alpha**2 * S0**2 + std**2)[:, None]
        shift = 0.1 * y[:, None].astype(x.dtype)
        return -(x - alpha * (params["mu"] + shift)) / var

    return score


@pytest.mark.parametrize("layout", [(2, 2), (1, 1), (1, 3)])
def test_grouped_equals_dense_on_the_pairs_it_asks_and_zero_elsewhere(layout):
    """Any assignment: several agents per sample, empty groups, one agent taking every sample
    (its group spans several tiles), pairs of other devices (outside the offset's range); for
    the default layout (tiles of half the mean group, two per step), whole-mean tiles one per
    step, and three per step (the tile count rounded up to a multiple of three)."""
    score = gaussian_score(VPSDE())
    dense = agent_axis.over_agents(score, "vmap", (0, None, None, None))
    grouped = jax.jit(dispatch.grouped(score, *layout), static_argnums=5)
    b = 12
    x = jax.random.normal(jax.random.key(0), (b, 2))
    t = jnp.linspace(0.1, 0.9, b)
    y = jnp.arange(b, dtype=jnp.int32) % 10
    full = dense({"mu": MUS}, x, t, y)
    rng = np.random.default_rng(0)
    cases = {
        "one agent each": rng.integers(0, K, (1, b)),
        "two distinct each": np.stack([np.arange(b) % K, (np.arange(b) + 1) % K]),
        "all on agent 2": np.full((1, b), 2),
        "agents 0 and 3 only": np.where(np.arange(b) % 2, 0, 3)[None],
    }
    for name, index in cases.items():
        out = grouped({"mu": MUS}, x, t, y, jnp.asarray(index), 0)
        asked = np.zeros((K, b), bool)
        for row in index:
            asked[row, np.arange(b)] = True
        np.testing.assert_allclose(
            np.asarray(out)[asked], np.asarray(full)[asked], rtol=1e-6, atol=1e-7, err_msg=name
        )
        assert not np.asarray(out)[~asked].any(), name
    # A device holding agents 2 and 3 of a mesh (offset 2) evaluates only their pairs.
    index = rng.integers(0, K, (1, b))
    out = grouped({"mu": MUS[2:]}, x, t, y, jnp.asarray(index), 2)
    mine = index[0] >= 2
    np.testing.assert_allclose(
        np.asarray(out)[index[0, mine] - 2, np.flatnonzero(mine)],
        np.asarray(full)[index[0, mine], np.flatnonzero(mine)],
        rtol=1e-6,
        atol=1e-7,
    )
    assert int(np.count_nonzero(np.asarray(out).any(axis=-1))) == mine.sum()


def test_tiles_hold_any_assignment():
    """sum_i ceil(n_i / tile) <= num_tiles for every way of splitting P pairs among K."""
    for pairs, k in ((12, 4), (200, 10), (7, 3), (1, 5)):
        tile = dispatch.tile_size(pairs, k)
        for sizes in (
            [pairs] + [0] * (k - 1),
            [pairs // k] * (k - 1) + [pairs - (k - 1) * (pairs // k)],
            [1] * min(k, pairs) + [0] * (k - min(k, pairs)),
        ):
            sizes[-1] += pairs - sum(sizes)
            assert sum(-(-n // tile) for n in sizes) <= dispatch.num_tiles(pairs, k, tile)


def _samplers(aggregator, guided=False, **spec):
    sde = VPSDE()
    score = gaussian_score(sde)
    dense = agent_axis.over_agents(score, "vmap", (0, None, None, None))
    grouped = dispatch.grouped(score)
    if guided:
        dense = federated_score.with_null_label(dense, 10)
        grouped = federated_score.with_null_label(grouped, 10)
    spec = solvers.SolverSpec(
        method=spec.get("method", "sde"),
        solver=solvers.make_solver(spec.get("method", "sde"), spec.get("solver", "euler")),
        num_steps=spec.get("num_steps", 20),
        adaptive=spec.get("adaptive", False),
    )
    make = lambda g: federated_sampler.FederatedSampler(dense, sde, aggregator, spec, (2,), None, g)  # noqa: E731
    return make(None), make(grouped)


SPARSE_MEMBERS = {
    "route": lambda: aggregators.route(COUNTS),
    "label_prior:top_k=1": lambda: aggregators.label_prior(COUNTS, top_k=1),
    "label_prior:top_k=2": lambda: aggregators.label_prior(COUNTS, top_k=2),
}


def _guided_member(member):
    """``member`` guided at w = 2 by the null label (10), on the count matrix with the null
    label's column (what the sampler gives a guided member)."""
    counts = aggregators.with_null_class(COUNTS)
    if member == "route":
        return aggregators.guided(aggregators.route(counts), 2.0, 10)
    return aggregators.guided(aggregators.label_prior(counts, top_k=int(member[-1])), 2.0, 10)


@pytest.mark.parametrize("member", sorted(SPARSE_MEMBERS))
@pytest.mark.parametrize(
    "spec",
    [{}, {"method": "ode", "solver": "tsit5", "adaptive": True}, {"guided": True}],
    ids=["sde-euler", "ode-tsit5-adaptive", "guided"],
)
def test_sparse_sampler_equals_dense_on_a_gaussian_federation(member, spec):
    spec = dict(spec)
    guided = spec.pop("guided", False)
    agg = _guided_member(member) if guided else SPARSE_MEMBERS[member]()
    dense, sparse = _samplers(agg, guided, **spec)
    assert sparse.score.sparse and not dense.score.sparse
    keys = federated_sampler.sample_keys(0, 24)
    labels = jnp.arange(24, dtype=jnp.int32) % 10
    a, b = dense({"mu": MUS}, keys, labels), sparse({"mu": MUS}, keys, labels)
    np.testing.assert_allclose(b.images, a.images, rtol=1e-5, atol=1e-5)
    assert a.stats["score_evaluations"] == b.stats["score_evaluations"]


def test_one_compilation_per_sparse_sampler():
    _, sparse = _samplers(aggregators.label_prior(COUNTS, top_k=1))
    labels = np.arange(10, dtype=np.int32)
    sample_lib.sample_in_batches(sparse, {"mu": MUS}, labels[:8], 4, seed=0)  # compiles
    with count_traces() as traces:
        sample_lib.sample_in_batches(sparse, {"mu": MUS}, labels, 4, seed=1)
    assert traces == []


@pytest.mark.parametrize(
    "procedure, asked",
    [
        ("mean", K),
        ("route", 1),
        ("label_prior:top_k=2", 2),
        ("label_prior:top_k=1", 1),
        ("superdiff_or:top_k=1", K),  # every agent's log-density is tracked
    ],
)
@pytest.mark.parametrize("guided", [False, True])
def test_the_computation_asks_the_agents_the_member_declares(procedure, asked, guided):
    """The agents the sampler evaluates per sample (what it computes, and what the traffic
    table counts from its record) are the ones the member declares it asks."""
    section = sample_lib.with_procedure(base.get_config("smoke"), procedure).aggregator
    counts = aggregators.with_null_class(COUNTS) if guided else COUNTS
    agg = aggregators.from_config(section, counts, K, VPSDE(), "sde")
    if guided:
        agg = aggregators.guided(agg, 2.0, 10)
    dense, sparse = _samplers(agg, guided)
    assert sparse.agents_asked(K) == aggregators.agents_asked(agg, K) == asked
    assert dense.agents_asked(K) == K


@pytest.mark.parametrize("procedure", ["route", "label_prior:top_k=1"])
def test_sparse_sampler_equals_dense_on_smoke_agents(smoke_run, procedure):
    """The trained smoke U-Nets (K = 2), the smoke preset's sampler: the grouped batches give
    the dense path's samples to float32 rounding."""
    federation = sample_lib.load_federation(base.get_config("smoke"), str(smoke_run))
    sparse = sample_lib.build_sampler(federation, procedure=procedure)
    dense = sample_lib.build_sampler(federation, procedure=procedure, sparse=False)
    assert sparse.score.sparse and not dense.score.sparse
    keys, labels = federated_sampler.sample_keys(0, 10), jnp.arange(10, dtype=jnp.int32)
    params = federation.sampler_params
    a, b = dense(params, keys, labels), sparse(params, keys, labels)
    np.testing.assert_allclose(b.images, a.images, rtol=1e-4, atol=1e-4)
