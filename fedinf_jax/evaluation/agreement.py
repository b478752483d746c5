"""Score agreement between agents: the paper's section 4.4 analysis (its equations 9-13).

For a regime, conditional label l, time t and a batch of S inputs x_j (either Gaussian noise or
real MNIST images of digit l), with v_ij = s_i(x_j, t, l) agent i's score and
v_j = aggregate_i(v_ij) the aggregated score (the paper: the uniform mean, eq. 10):

    magnitude  m_j = ||v_j||                                                     (eq. 11)
    cosine     c_j = (1/K) sum_i <v_ij, v_j> / (||v_ij|| ||v_j||)                 (eq. 12, 13)

reported as mean and standard deviation over the S inputs. The inputs are used as they are, not
diffused to time t, as in the paper: the question is what the agents say at such a point.

Several aggregates can be measured from the same agent scores (one row per aggregator). At a fixed
point there is no trajectory, so a density-weighted member's weights are its prior's: the
``label_prior`` aggregate is ``superdiff_or`` before any density evidence (at t = T).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedinf_jax.agents.agent_axis import num_agents_of
from fedinf_jax.sampling.aggregators import Aggregator

PAPER_TIMES = (1.0, 0.5, 0.1, 0.01)
INPUTS = ("noise", "label")


def agreement(agent_scores: jax.Array, aggregate: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-input magnitude ||v_j|| (S,) and mean cosine c_j (S,) of (K, S, ...) agent scores
    against the (S, ...) aggregate."""
    v = agent_scores.reshape(agent_scores.shape[0], agent_scores.shape[1], -1)
    vbar = aggregate.reshape(aggregate.shape[0], -1)
    norm_bar = jnp.linalg.norm(vbar, axis=-1)
    cos = jnp.sum(v * vbar[None], axis=-1) / (jnp.linalg.norm(v, axis=-1) * norm_bar[None])
    return norm_bar, jnp.mean(cos, axis=0)


def make_agreement_fn(agent_score_fn: Callable, aggregators: Mapping[str, Aggregator]) -> Callable:
    """``fn(params, x (S, ...), t, label) -> {name: (magnitudes (S,), cosines (S,))}``, jitted:
    the agents' scores evaluated once, each aggregator applied to them."""

    @jax.jit
    def fn(params, x, t, label):
        t_batch = jnp.full((x.shape[0],), t, x.dtype)
        y = jnp.full((x.shape[0],), label, jnp.int32)
        scores = agent_score_fn(params, x, t_batch, y)
        keys = jax.random.split(jax.random.key(0), x.shape[0])  # route's draw per input
        out = {}
        for name, aggregator in aggregators.items():
            state = aggregator.init(num_agents_of(params), x, y, keys)
            aggregate, _ = aggregator.aggregate(scores, t_batch, x, y, state)
            out[name] = agreement(scores, aggregate)
        return out

    return fn


def agreement_table(
    agent_score_fn: Callable,
    params,
    aggregators: Mapping[str, Aggregator],
    noise: np.ndarray,
    images_by_label: Sequence[np.ndarray],
    times: Sequence[float] = PAPER_TIMES,
) -> list[dict]:
    """The paper's Tables 3/4 for one regime: one row per (aggregator, t, input kind, label).

    Args:
      aggregators: name -> aggregator (the paper's: ``{"mean": aggregators.mean()}``).
      noise: (S, H, W, C) Gaussian inputs, shared by all labels.
      images_by_label: per label l, (S, H, W, C) real images of digit l in model space.

    Returns:
      Rows ``{"aggregator", "t", "input", "label", "magnitude", "magnitude_std", "cosine",
      "cosine_std"}``.
    """
    fn = make_agreement_fn(agent_score_fn, aggregators)
    rows = []
    for t in times:
        for kind in INPUTS:
            for label, images in enumerate(images_by_label):
                x = noise if kind == "noise" else images
                for name, (m, c) in fn(params, jnp.asarray(x), t, label).items():
                    m, c = np.asarray(m, np.float64), np.asarray(c, np.float64)
                    rows.append(
                        {
                            "aggregator": name,
                            "t": float(t),
                            "input": kind,
                            "label": label,
                            "magnitude": float(m.mean()),
                            "magnitude_std": float(m.std()),
                            "cosine": float(c.mean()),
                            "cosine_std": float(c.std()),
                        }
                    )
    return rows
