"""The score-agreement analysis (the paper's eqs. 9-13)."""

import jax.numpy as jnp
import numpy as np

from fedinf_jax.agents import agent_axis, runs
from fedinf_jax.diffusion.score import make_score_fn
from fedinf_jax.evaluation import agreement
from fedinf_jax.sampling import aggregators
from tests.conftest import micro_config


def test_agreement_closed_forms():
    e = jnp.eye(4)
    # Two agents with orthogonal unit scores: the mean has norm 1/sqrt(2), each cosine 1/sqrt(2).
    scores = jnp.stack([e[None, 0], e[None, 1]])  # (K=2, S=1, D=4)
    m, c = agreement.agreement(scores, scores.mean(axis=0))
    np.testing.assert_allclose(m, [1 / np.sqrt(2)], rtol=1e-6)
    np.testing.assert_allclose(c, [1 / np.sqrt(2)], rtol=1e-6)
    # Identical agents agree perfectly with their mean.
    same = jnp.broadcast_to(jnp.arange(1.0, 5.0), (3, 2, 4))
    m, c = agreement.agreement(same, same.mean(axis=0))
    np.testing.assert_allclose(m, [np.sqrt(30)] * 2, rtol=1e-6)
    np.testing.assert_allclose(c, [1.0, 1.0], rtol=1e-6)


def test_table_on_an_untrained_single_agent():
    config = micro_config()
    comp = runs.resolve(config)
    params = runs.init_agents(comp.model, 1, runs.make_key(0))
    lifted = agent_axis.over_agents(
        make_score_fn(comp.model, comp.sde, comp.param), "vmap", (0, None, None, None)
    )
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(3, 28, 28, 1)).astype(np.float32)
    images = [rng.uniform(-1, 1, (3, 28, 28, 1)).astype(np.float32) for _ in range(10)]
    members = {"mean": aggregators.mean(), "median": aggregators.median()}
    rows = agreement.agreement_table(lifted, params, members, noise, images, (1.0, 0.1))
    assert len(rows) == 2 * 2 * 2 * 10
    assert {r["aggregator"] for r in rows} == {"mean", "median"}
    assert {(r["t"], r["input"]) for r in rows} == {
        (t, k) for t in (1.0, 0.1) for k in ("noise", "label")
    }
    for r in rows:
        np.testing.assert_allclose(r["cosine"], 1.0, rtol=1e-5)
        assert r["magnitude"] > 0 and np.isfinite(r["magnitude"])
    # Noise rows share their inputs across labels, but the label conditions the score.
    noise_t1 = [r["magnitude"] for r in rows if r["t"] == 1.0 and r["input"] == "noise"]
    assert len(set(np.round(noise_t1, 6))) > 1
