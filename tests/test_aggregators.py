import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedinf_jax.data import partitions
from fedinf_jax.diffusion.sde import VPSDE
from fedinf_jax.sampling import aggregators as A

K, B = 5, 6
COUNTS = np.array([[30, 5], [10, 5], [5, 20], [5, 10], [10, 10]])


def _members(k=K):
    """Every registered member, built from its config section at its defaults."""
    counts = COUNTS[:k] if k <= len(COUNTS) else np.ones((k, 2))
    section = A.config_section()
    A.fit_to_agents(section, k)
    members = {}
    for name in A.AGGREGATORS:
        section.name = name
        members[name] = A.from_config(section, counts, k, VPSDE())
    return members


def _inputs(k=K, seed=0):
    key = jax.random.key(seed)
    scores = jax.random.normal(key, (k, B, 3, 3, 1))
    x = jnp.zeros((B, 3, 3, 1))
    y = jnp.array([0, 1, 0, 1, 1, 0])
    t = jnp.linspace(0.1, 0.9, B)
    return scores, t, x, y


def _apply(agg, scores, t, x, y, num_agents=None):
    keys = jax.random.split(jax.random.key(1), len(y))
    state = agg.init(num_agents or scores.shape[0], x, y, keys)
    return jax.jit(agg.aggregate)(scores, t, x, y, state)


def test_every_setting_has_a_config_field():
    section = A.config_section()
    for name in A.AGGREGATORS:
        assert dict(section.get(name, {})) == A.AGGREGATORS.settings(name)
    with pytest.raises(ValueError, match=r"unknown aggregator 'avg'; valid: \['mean', 'weighted'"):
        A.config_section("avg")
    with pytest.raises(ValueError, match="setting 'w' needs a default"):
        A.member("needs_w")(lambda w: A.mean())
    with pytest.raises(ValueError, match="aggregator 'mean' is already registered"):
        A.member("mean")(A.mean)


@pytest.mark.parametrize("name", A.AGGREGATORS.names())
def test_jittable_shape_finite(name):
    scores, t, x, y = _inputs()
    out, state = _apply(_members()[name], scores, t, x, y)
    assert out.shape == scores.shape[1:]
    assert np.all(np.isfinite(out))
    if name.startswith("superdiff"):  # every agent starts at the prior's log-density
        assert state.log_q.shape == (K, B) and np.all(state.log_q == state.log_q[0])
    elif name == "route":  # each sample's agent
        assert state.agent.shape == (B,) and set(np.asarray(state.agent)) <= set(range(K))
        np.testing.assert_array_equal(out, scores[np.asarray(state.agent, int), np.arange(B)])
    else:
        assert state == A.EmptyState()


@pytest.mark.parametrize("name", A.AGGREGATORS.names())
def test_every_member_says_its_weights_and_the_agents_it_asks(name):
    """A weighted member's ``weights`` at a point are the weights its aggregate sums the agents'
    scores with (summing to one per sample); the element-wise members say they have none; and
    every member says how many agents each sample asks (all K without ``dispatch``)."""
    scores, t, x, y = _inputs()
    member = _members()[name]
    keys = jax.random.split(jax.random.key(1), len(y))
    state = member.init(K, x, y, keys)
    out, state = jax.jit(member.aggregate)(scores, t, x, y, state)
    asked = A.agents_asked(member, K)
    assert asked == (1 if name == "route" else K)
    if name in ("median", "trimmed_mean"):
        assert member.weights is None
        return
    w = jnp.broadcast_to(jnp.asarray(member.weights(scores, t, x, y, state)).T, (B, K)).T
    np.testing.assert_allclose(w.sum(axis=0), 1.0, rtol=1e-5)
    expected = jnp.einsum("kb,kb...->b...", w, scores)
    tol = 1e-4 if name == "superdiff_and" else 1e-6
    np.testing.assert_allclose(out, expected, rtol=10 * tol, atol=tol)


@pytest.mark.parametrize("name", A.AGGREGATORS.names())
def test_one_agent_is_that_agent(name):
    scores, t, x, y = _inputs(k=1)
    out, _ = _apply(_members(k=1)[name], scores, t, x, y)
    np.testing.assert_allclose(out, scores[0], rtol=1e-6)


@pytest.mark.parametrize("name", A.AGGREGATORS.names())
def test_identical_agents_give_the_agent(name):
    scores, t, x, y = _inputs()
    same = jnp.broadcast_to(scores[:1], scores.shape)
    out, _ = _apply(_members()[name], same, t, x, y)
    np.testing.assert_allclose(out, scores[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name", ["mean", "median", "trimmed_mean", "superdiff_or", "superdiff_and"]
)
def test_permutation_invariant(name):
    scores, t, x, y = _inputs()
    perm = np.array([3, 0, 4, 1, 2])
    members = _members()
    if name == "superdiff_or":  # with a uniform prior; the label prior follows the agents
        members[name] = A.superdiff_or(VPSDE(), "sde", prior="uniform")
    a, _ = _apply(members[name], scores, t, x, y)
    b, _ = _apply(members[name], scores[perm], t, x, y)
    # superdiff_and solves float32 normal equations, which square the condition number.
    tol = 1e-4 if name == "superdiff_and" else 1e-6
    np.testing.assert_allclose(a, b, rtol=10 * tol, atol=tol)


def test_label_prior_weights_in_the_heterogeneous_regime(mnist_train_labels):
    counts = partitions.heterogeneous(mnist_train_labels, 10).counts
    agg = A.label_prior(counts)
    scores = jnp.eye(10)[:, None, :]  # agent i's "score" is the unit vector e_i
    y = jnp.array([3])
    out, _ = agg.aggregate(scores, 0.5, jnp.zeros((1, 10)), y, agg.init(10, None, y))
    np.testing.assert_allclose(out[0], counts[:, 3] / counts[:, 3].sum(), rtol=1e-5)
    # The shard sizes use every class up (partitions.heterogeneous), so the owner's weight is
    # u_y / (2 n_y) = (9/8)(1 - N / (18 n_y)), near but not exactly 1/2.
    n = np.bincount(mnist_train_labels)
    np.testing.assert_allclose(out[0, 3], 9 / 8 * (1 - n.sum() / (18 * n[3])), atol=1e-3)
    assert out[0, 3] == out[0].max()
    np.testing.assert_allclose(out[0].sum(), 1.0, rtol=1e-5)


def test_weighted_and_schedule_values():
    scores, t, x, y = _inputs()
    w = np.arange(1, K + 1) / np.arange(1, K + 1).sum()
    out, _ = _apply(A.weighted(np.arange(1, K + 1)), scores, t, x, y)
    np.testing.assert_allclose(out, np.tensordot(w, scores, axes=1), rtol=1e-5, atol=1e-6)
    out, _ = _apply(A.schedule(A.switch_schedule(K, [2], t_switch=0.5)), scores, t, x, y)
    early = np.asarray(t) > 0.5
    np.testing.assert_allclose(out[early], scores[2][early], rtol=1e-6)
    np.testing.assert_allclose(out[~early], scores.mean(axis=0)[~early], rtol=1e-5, atol=1e-6)
    # Owners: agent 0 holds most of class 0, agent 2 most of class 1 (COUNTS).
    out, _ = _apply(A.schedule(A.owner_switch_schedule(COUNTS, t_switch=0.5)), scores, t, x, y)
    owner = np.array([0, 2])[np.asarray(y)]
    expected = np.where(
        early[:, None, None, None], scores[owner, np.arange(B)], scores.mean(axis=0)
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_top_k_keeps_the_largest_weights_renormalised():
    """label_prior's top-k: per class the k largest n_{i,y} / n_y (ties to the lower agent),
    renormalised; k = 1 is the owner alone, k = K the plain member. superdiff_or's: the
    softmax over each sample's k largest logits."""
    scores, t, x, y = _inputs()
    rows = np.arange(B)
    owner = np.array([0, 2])[np.asarray(y)]  # COUNTS' largest entry per class
    out, _ = _apply(A.label_prior(COUNTS, top_k=1), scores, t, x, y)
    np.testing.assert_array_equal(out, scores[owner, rows])
    # class 0: 30 (agent 0) and the tie 10 / 10 (agents 1, 4) to agent 1; class 1: 20 (agent 2),
    # then 10 / 10 (agents 3, 4) to agent 3.
    w = {0: {0: 0.75, 1: 0.25}, 1: {2: 2 / 3, 3: 1 / 3}}
    expected = np.stack([sum(v * scores[i, b] for i, v in w[int(y[b])].items()) for b in range(B)])
    out, _ = _apply(A.label_prior(COUNTS, top_k=2), scores, t, x, y)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    full, _ = _apply(A.label_prior(COUNTS), scores, t, x, y)
    np.testing.assert_array_equal(_apply(A.label_prior(COUNTS, top_k=K), scores, t, x, y)[0], full)

    log_q = jax.random.normal(jax.random.key(3), (K, B))
    member = A.superdiff_or(VPSDE(), "sde", COUNTS, K, temperature=0.7, top_k=2)
    weights = np.asarray(member.weights(None, None, None, y, A.DensityState(log_q)))
    logits = 0.7 * np.asarray(log_q) + A.log_prior_table(COUNTS)[:, np.asarray(y)]
    kept = np.argsort(-logits, axis=0)[:2]
    expected = np.zeros_like(logits)
    for b in range(B):
        e = np.exp(logits[kept[:, b], b] - logits[kept[0, b], b])
        expected[kept[:, b], b] = e / e.sum()
    np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-7)
    out, _ = member.aggregate(scores, t, x, y, A.DensityState(log_q))
    np.testing.assert_allclose(out, np.einsum("kb,kb...->b...", expected, scores), atol=1e-5)


def test_keep_top_k_is_one_wrapper_for_every_weighted_member():
    """keep_top_k keeps exactly k agents, ties to the lower index, whatever the member: equal
    tracked log-densities under the uniform prior (superdiff_or at t = T) keep agents 0..k-1;
    fixed weights with a tie likewise. Weights from the labels alone are declared as the agents
    asked (dispatch); state-driven ones are not. A member without weights is refused."""
    scores, t, x, y = _inputs()
    member = A.superdiff_or(VPSDE(), "sde", num_agents=K, prior="uniform", top_k=2)
    assert member.dispatch is None
    weights = np.asarray(member.weights(None, None, None, y, A.DensityState(jnp.zeros((K, B)))))
    np.testing.assert_array_equal(weights, np.tile([[0.5], [0.5], [0], [0], [0]], (1, B)))

    fixed = A.keep_top_k(A.weighted([1.0, 3.0, 3.0, 1.0, 2.0]), 2, K)
    kept = fixed.weights(scores, t, x, y, A.EmptyState())
    np.testing.assert_allclose(kept, np.tile([[0], [0.5], [0.5], [0], [0]], (1, B)))
    np.testing.assert_array_equal(fixed.dispatch(A.EmptyState(), y), np.tile([[1], [2]], (1, B)))
    np.testing.assert_allclose(
        fixed.aggregate(scores, t, x, y, A.EmptyState())[0], (scores[1] + scores[2]) / 2, rtol=1e-6
    )
    assert A.keep_top_k(A.weighted([1.0] * K), K, K).dispatch is None  # k = K: the member itself
    with pytest.raises(ValueError, match="keep_top_k needs a member that is a weighted sum"):
        A.keep_top_k(A.median(), 1, K)


def test_route_draws_each_samples_agent_from_the_prior():
    """Each sample's agent ~ n_{k,y} / n_y (the label prior) or n_k / N (shares), one draw per
    sample key (the same key, the same agent); the aggregate is that agent's score."""
    n = 20_000
    y = jnp.arange(n) % 2
    keys = jax.random.split(jax.random.key(5), n)
    for prior, table in [("label", COUNTS / COUNTS.sum(0)), ("shares", None)]:
        state = A.route(COUNTS, K, prior=prior).init(K, None, y, keys)
        agent = np.asarray(state.agent, int)
        for label in (0, 1):
            freq = np.bincount(agent[np.asarray(y) == label], minlength=K) / (n / 2)
            want = table[:, label] if table is not None else COUNTS.sum(1) / COUNTS.sum()
            np.testing.assert_allclose(freq, want, atol=0.015)  # 3 binomial standard errors
    again = A.route(COUNTS, K).init(K, None, y[:10], keys[:10])
    np.testing.assert_array_equal(again.agent, A.route(COUNTS, K).init(K, None, y, keys).agent[:10])
    uniform = A.route(None, 4, prior="uniform").init(4, None, y, keys).agent
    np.testing.assert_allclose(np.bincount(uniform.astype(int), minlength=4) / n, 0.25, atol=0.01)
    with pytest.raises(ValueError, match="init needs keys"):
        A.route(COUNTS, K).init(K, None, y)


def test_robust_members_ignore_one_faulty_agent():
    scores, t, x, y = _inputs()
    honest = jnp.broadcast_to(scores[:1], scores.shape)
    faulty = honest.at[4].set(1e6)
    for agg in (A.median(), A.trimmed_mean(1)):
        out, _ = _apply(agg, faulty, t, x, y)
        np.testing.assert_allclose(out, scores[0], rtol=1e-5, atol=1e-6)
    out, _ = _apply(A.mean(), faulty, t, x, y)
    assert np.abs(out).max() > 1e5


def test_from_config():
    cfg = A.config_section()
    cfg.name = "weighted"  # no weights: the data shares n_i / N
    scores, t, x, y = _inputs()
    out, _ = _apply(A.from_config(cfg, COUNTS, K), scores, t, x, y)
    shares = COUNTS.sum(axis=1) / COUNTS.sum()
    np.testing.assert_allclose(out, np.tensordot(shares, scores, axes=1), rtol=1e-5, atol=1e-6)
    cfg.weighted.weights = (1.0, 2.0)
    with pytest.raises(ValueError, match="2 entries for 5 agents"):
        A.from_config(cfg, COUNTS, K)
    for name in ("label_prior", "schedule", "superdiff_or"):
        cfg.name = name
        with pytest.raises(ValueError, match="needs the partition's count matrix"):
            A.from_config(cfg, None, K, VPSDE())
    cfg.name = "superdiff_and"
    with pytest.raises(ValueError, match="needs the agents' SDE"):
        A.from_config(cfg, COUNTS, K)
    cfg.name = "nope"
    with pytest.raises(ValueError, match="unknown aggregator 'nope'"):
        A.from_config(cfg, COUNTS, K)


@pytest.mark.parametrize(
    "member, setting, value, message",
    [
        ("trimmed_mean", "trim", 3, "needs more than 6 agents, got 5"),
        ("trimmed_mean", "trim", -1, "trim must be >= 0"),
        ("superdiff_or", "temperature", -1.0, "temperature must be > 0"),
        ("superdiff_or", "prior", "flat", r"unknown prior 'flat'; valid: \['label'"),
        ("superdiff_and", "ridge", -1.0, "ridge must be >= 0"),
        ("label_prior", "top_k", 6, r"top_k must be in \[0, 5\] \(0: every agent\), got 6"),
        ("superdiff_or", "top_k", -1, r"top_k must be in \[0, 5\]"),
        ("route", "prior", "flat", r"unknown prior 'flat'; valid: \['label'"),
        ("schedule", "early_agents", (5,), r"non-empty subset of 0\.\.4"),
        ("schedule", "t_switch", -0.5, "t_switch must be >= 0"),
    ],
)
def test_settings_out_of_range_are_refused_when_built(member, setting, value, message):
    cfg = A.config_section(member)
    cfg[member][setting] = value
    with pytest.raises(ValueError, match=message):
        A.from_config(cfg, COUNTS, K, VPSDE())


def test_bad_arguments():
    with pytest.raises(ValueError, match="non-negative vector"):
        A.weighted([1.0, -1.0])
    with pytest.raises(ValueError, match=r"classes \[1\] are held by no agent"):
        A.label_prior([[3, 0], [2, 0]])
    with pytest.raises(ValueError, match=r"non-empty subset of 0\.\.4"):
        A.switch_schedule(K, [5], t_switch=0.5)
    with pytest.raises(ValueError, match="trim must be >= 0"):
        A.trimmed_mean(-1)
    with pytest.raises(ValueError, match=r"unknown prior 'flat'; valid: \['label'"):
        A.log_prior_table(COUNTS, "flat")
    with pytest.raises(ValueError, match="needs >= 1 Hutchinson probe"):
        A.superdiff_or(VPSDE(), "ode", prior="uniform", probes=0)
    with pytest.raises(ValueError, match="unknown sampler method 'pf'"):
        A.superdiff_and(VPSDE(), "pf")
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        A.superdiff_and(VPSDE(), "sde", ridge=-1.0)
    scores, t, x, y = _inputs(k=2)
    with pytest.raises(ValueError, match="needs more than 2 agents"):
        _apply(A.trimmed_mean(1), scores, t, x, y)


# Classifier-free guidance of the federation (aggregators.guided): the agents' scores stacked as
# (2K, batch, ...), the conditional ones first; COUNTS has two classes, so the null label is 2.
W, NULL = 2.5, 2


def _guided_pair(name, k=K, guide_label=NULL):
    """(member, the member guided): by the null label, for the count matrix with its null class;
    with ``guide_label`` None by weaker agents at the same label (autoguidance)."""
    counts = COUNTS[:k] if guide_label is None else A.with_null_class(COUNTS[:k])
    section = A.config_section(name)
    A.fit_to_agents(section, k)
    member = A.from_config(section, counts, k, VPSDE())
    return member, A.guided(member, W, guide_label)


@pytest.mark.parametrize("guide_label", [NULL, None], ids=["null_label", "autoguidance"])
@pytest.mark.parametrize("name", A.AGGREGATORS.names())
def test_guided_is_the_null_aggregate_plus_w_times_the_difference(name, guide_label):
    """Every member, guided: S_null + w (S_y - S_null), S_null its aggregate of the guide's
    scores at the null label (autoguidance: at the label itself); the state is the pair
    (conditional, guide)."""
    scores, t, x, y = _inputs()
    null_scores = _inputs(seed=1)[0]
    member, guided = _guided_pair(name, guide_label=guide_label)
    out, state = _apply(guided, jnp.concatenate([scores, null_scores]), t, x, y, K)
    score_y, state_y = _apply(member, scores, t, x, y)
    y_guide = y if guide_label is None else jnp.full_like(y, NULL)
    score_null, state_null = _apply(member, null_scores, t, x, y_guide)
    np.testing.assert_allclose(out, score_null + W * (score_y - score_null), rtol=1e-5, atol=1e-5)
    for got, want in zip(
        jax.tree.leaves(state), jax.tree.leaves((state_y, state_null)), strict=True
    ):
        np.testing.assert_array_equal(got, want)


def test_guidance_in_an_interval_is_the_conditional_aggregate_outside_it():
    """Guided only where t_lo < t <= t_hi: there S_null + w (S_y - S_null), S_y elsewhere, per
    sample (t runs from 0.1 to 0.9 over the batch); the default interval holds every t, bitwise
    the guided member; an empty or negative interval is refused."""
    scores, t, x, y = _inputs()
    null_scores = _inputs(seed=1)[0]
    both = jnp.concatenate([scores, null_scores])
    member, always = _guided_pair("label_prior")
    counts = A.with_null_class(COUNTS)
    inside = (t > 0.3) & (t <= 0.7)
    assert 0 < int(inside.sum()) < len(t)
    limited = A.guided(A.label_prior(counts), W, NULL, (0.3, 0.7))
    out, _ = _apply(limited, both, t, x, y, K)
    guided_out, _ = _apply(always, both, t, x, y, K)
    score_y, _ = _apply(member, scores, t, x, y)
    np.testing.assert_array_equal(out[inside], guided_out[inside])
    np.testing.assert_allclose(out[~inside], score_y[~inside], rtol=1e-5, atol=1e-6)
    default, _ = _apply(A.guided(A.label_prior(counts), W, NULL, A.ALWAYS), both, t, x, y, K)
    np.testing.assert_array_equal(default, guided_out)
    for interval in ((0.5, 0.5), (0.7, 0.3), (-0.1, 0.5)):
        with pytest.raises(ValueError, match="guidance interval must be"):
            A.guided(member, W, NULL, interval)


@pytest.mark.parametrize("name", A.AGGREGATORS.names())
def test_guided_identical_agents_give_the_guided_agent(name):
    scores, t, x, y = _inputs()
    null_scores = _inputs(seed=1)[0]
    same = jnp.concatenate(
        [
            jnp.broadcast_to(scores[:1], scores.shape),
            jnp.broadcast_to(null_scores[:1], scores.shape),
        ]
    )
    out, _ = _apply(_guided_pair(name)[1], same, t, x, y, K)
    want = null_scores[0] + W * (scores[0] - null_scores[0])
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


def test_guided_label_prior_weighs_the_null_label_by_the_data_shares():
    """label_prior's null-label weights are the agents' data shares n_i / N (the label-free
    prior), its conditional ones n_{i,y} / n_y."""
    _, guided = _guided_pair("label_prior")
    unit = jnp.eye(K)[:, None, :]  # agent i's "score" is the unit vector e_i
    y = jnp.array([1])
    out, _ = _apply(guided, jnp.concatenate([unit, unit]), 0.5, jnp.zeros((1, K)), y, K)
    shares = COUNTS.sum(axis=1) / COUNTS.sum()
    rho = COUNTS[:, 1] / COUNTS[:, 1].sum()
    np.testing.assert_allclose(out[0], shares + W * (rho - shares), rtol=1e-5)


def test_guided_superdiff_or_with_exact_densities_is_the_pooled_model_guided():
    """Gaussian agents with their exact log-densities in the state: the guided density-weighted
    member is the score of the pooled data's class-conditional mixture, guided by the pooled
    data's unconditional mixture (weights n_{i,y} and n_i)."""
    sde, s0, t = VPSDE(), 0.5, jnp.float32(0.3)
    alpha, std = (float(v) for v in sde.marginal(t))
    var = alpha**2 * s0**2 + std**2
    rng = np.random.default_rng(0)
    means = rng.normal(size=(K, 3, 4))  # agent i's data mean for labels 0, 1 and the null label
    x = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
    y = jnp.array([0, 1])

    def scores_and_log_q(label):
        mu = alpha * means[:, label]  # (K, batch, D)
        log_q = -0.5 * jnp.sum((x - mu) ** 2, -1) / var - 2 * jnp.log(2 * jnp.pi * var)
        return -(x - mu) / var, log_q

    def mixture_score(weights, label):  # the score of sum_i w_i N(alpha mu_i, var)
        scores, log_q = scores_and_log_q(label)
        post = jax.nn.softmax(jnp.log(weights) + log_q, axis=0)
        return jnp.sum(post[..., None] * scores, axis=0)

    (s_y, q_y), (s_null, q_null) = scores_and_log_q(y), scores_and_log_q(jnp.full_like(y, NULL))
    guided = A.guided(A.superdiff_or(sde, "sde", counts=A.with_null_class(COUNTS)), W, NULL)
    state = (A.DensityState(q_y), A.DensityState(q_null))
    out, _ = guided.aggregate(jnp.concatenate([s_y, s_null]), t, x, y, state)
    pooled_y = mixture_score(jnp.asarray(COUNTS[:, y], jnp.float32), y)
    pooled_null = mixture_score(
        jnp.asarray(COUNTS.sum(1), jnp.float32)[:, None], jnp.full_like(y, NULL)
    )
    np.testing.assert_allclose(
        out, pooled_null + W * (pooled_y - pooled_null), rtol=1e-4, atol=1e-5
    )


def test_guidance_one_builds_the_member_itself():
    """w = 1 is no guidance: make_aggregator returns the member, bitwise the unguided one."""
    from configs import base
    from fedinf_jax.agents import runs
    from fedinf_jax.workflows import sample_lib

    config = base.get_config("smoke")
    components = runs.resolve_score(config)
    scores, t, x, y = _inputs(k=2)
    for name in ("mean", "superdiff_or"):
        config.aggregator.name = name
        plain = A.from_config(config.aggregator, COUNTS[:2], 2, components.sde)
        unguided = sample_lib.make_aggregator(config.aggregator, COUNTS[:2], 2, components, "sde")
        np.testing.assert_array_equal(
            _apply(unguided, scores, t, x, y)[0], _apply(plain, scores, t, x, y)[0]
        )


def test_a_function_of_the_scores_is_a_member():
    """``from_function``: a function returning the aggregate is that aggregate; one returning
    weights, (agents,) or (agents, batch), is the weighted sum with the weights normalised."""
    scores, t, x, y = _inputs()
    mean_out, _ = _apply(A.mean(), scores, t, x, y)
    out, _ = _apply(A.from_function(lambda s: s.mean(axis=0)), scores, t, x, y)
    np.testing.assert_array_equal(out, mean_out)
    w = np.arange(1.0, K + 1)
    fixed, _ = _apply(A.weighted(w), scores, t, x, y)
    for weights in (lambda s: 3.0 * jnp.asarray(w), lambda s, t, x, y: jnp.outer(w, 1 + 0 * y)):
        out, _ = _apply(A.from_function(weights), scores, t, x, y)
        np.testing.assert_allclose(out, fixed, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"returns the aggregate score, shaped like one agent's"):
        _apply(A.from_function(lambda s: s[:, :, 0]), scores, t, x, y)
    with pytest.raises(TypeError, match=r"takes \(scores, t, x, y\) or the first of them"):
        A.from_function(lambda: 0.0)
    with pytest.raises(TypeError, match="a member's name, an Aggregator or a function"):
        A.as_aggregator(42)
    member = A.mean()
    assert A.as_aggregator(member) is member


def test_guided_function_weights_cover_the_null_label():
    """Guidance calls a function on the conditional and the unconditional scores (at the null
    label); its weights are normalised, so a field every agent agrees on stays that field even
    where the function's weights do not sum to one (here a per-class table read at the null
    label, which JAX clips to its last row)."""
    scores, t, x, y = _inputs()
    ones = jnp.ones_like(scores)
    table = jnp.asarray(COUNTS.T / COUNTS.sum(axis=1))  # (classes, agents), rows not normalised
    member = A.from_function(lambda s, t, x, y: table[y].T)  # y = 10 is clipped to the last row
    guided = A.guided(member, 2.0, null_label=10)
    out, _ = _apply(guided, jnp.concatenate([ones, ones]), t, x, y)
    np.testing.assert_allclose(out, 1.0, rtol=1e-6)
    cond, _ = _apply(member, scores, t, x, y)
    null, _ = _apply(member, 2 * scores, t, x, jnp.full_like(y, 10))
    out, _ = _apply(guided, jnp.concatenate([scores, 2 * scores]), t, x, y)
    np.testing.assert_allclose(out, null + 2.0 * (cond - null), rtol=1e-5, atol=1e-5)


def test_a_member_is_replaced_only_on_purpose():
    name = "test_replaced_member"
    try:
        A.member(name)(lambda: A.mean())
        with pytest.raises(ValueError, match=f"'{name}' is already registered; .*replace=True"):
            A.member(name)(lambda: A.median())
        A.member(name, replace=True)(lambda: lambda scores: scores.max(axis=0))
        scores, t, x, y = _inputs()
        section = A.config_section()
        section.name = name
        out, _ = _apply(A.from_config(section, COUNTS, K), scores, t, x, y)
        np.testing.assert_array_equal(out, scores.max(axis=0))
    finally:
        A.AGGREGATORS._members.pop(name, None)
