"""The K-agent federated score evaluation the benchmarks time and profile
(``from benchmarks.common import federated_score``)."""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fedinf_jax.agents import runs
from fedinf_jax.data import digits
from fedinf_jax.workflows import sample_lib


@dataclasses.dataclass(frozen=True)
class FederatedScore:
    """K randomly initialised agents, their lifted score and the jitted mean over them."""

    lifted: Callable  # (params, x, t, y) -> (K, B, ...) scores: sample_lib.agent_score_fn
    federated: Callable  # jitted (params, x, t, y) -> (B, ...): the uniform mean of ``lifted``
    params: object  # the agents' stacked parameters
    args: tuple  # (x, t, y): B noise images at t = 0.5, labels 0..9 cycled

    def __call__(self):
        return self.federated(self.params, *self.args)


def build(comp: runs.Components, k: int, b: int) -> FederatedScore:
    params = runs.init_agents(comp.model, k, runs.make_key(0))
    lifted = sample_lib.agent_score_fn(comp)
    federated = jax.jit(lambda p, x, t, y: lifted(p, x, t, y).mean(0))
    x = jax.random.normal(jax.random.key(1), (b, *digits.IMAGE_SHAPE))
    t, y = jnp.full((b,), 0.5), jnp.arange(b) % 10
    return FederatedScore(lifted, federated, params, (x, t, y))
