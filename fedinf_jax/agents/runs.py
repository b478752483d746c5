"""A run: what its config resolves into and what makes it the run it is.

A config resolves, once and outside ``jit``, into plain objects (``ScoreComponents`` for
evaluating scores, ``Components`` for training too); the K agents are initialised from the
run's root key; and the fields of ``RUN_SECTIONS`` (but ``FREE_FIELDS``) name the trained run
(``run_digest``) wherever an output records what it was made from.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fedinf_jax.agents import agent_axis
from fedinf_jax.core import provenance
from fedinf_jax.core.types import AgentParams, Key, PyTree
from fedinf_jax.data import digits
from fedinf_jax.diffusion.score import (
    EDM_P_MEAN,
    EDM_P_STD,
    Parametrization,
    make_time_sampler,
    parametrization_of,
)
from fedinf_jax.diffusion.sde import SDE, make_sde
from fedinf_jax.models import make_unet
from fedinf_jax.models.optim import make_optimizer, make_schedule


def make_key(seed: int) -> Key:
    """The run's root key. XLA's RngBitGenerator ("rbg") rather than threefry: initialising a
    U-Net's many parameters with threefry compiles far more slowly on XLA:CPU."""
    return jax.random.key(seed, impl="rbg")


@functools.cache
def _jitted_init(model, image_shape: tuple[int, ...]) -> Callable:
    """One agent's init, traced and compiled once per (model, image shape) and process, whatever
    the number of agents."""

    def init(key):
        x = jnp.zeros((1, *image_shape))
        t, y = jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
        return model.init(key, x, t, y)

    return jax.jit(init)


def init_agents(model, num_agents: int, key: Key, image_shape=digits.IMAGE_SHAPE) -> AgentParams:
    """K independently initialised agents, stacked: agent i is initialised from the i-th key of
    ``jax.random.split(key, K)``, by one compiled single-agent init (a new K compiles nothing
    but the stacking)."""
    init = _jitted_init(model, tuple(image_shape))
    keys = jax.random.split(key, num_agents)
    if isinstance(keys, jax.core.Tracer):  # under eval_shape / jit: one traced init, mapped
        return jax.lax.map(init, keys)
    return jax.jit(agent_axis.stack_agents)([init(k) for k in keys])


def abstract_agent_params(model, num_agents: int) -> AgentParams:
    """Shapes and dtypes of K stacked agents' parameters, computed without running anything."""
    return jax.eval_shape(lambda k: init_agents(model, num_agents, k), make_key(0))


def count_params(params: PyTree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


@dataclasses.dataclass(frozen=True)
class ScoreComponents:
    """What evaluating the agents' scores needs, resolved from a config outside ``jit``: the
    model, the SDE, how the network's output is read, and the agent-axis strategy."""

    model: Any
    sde: SDE
    score_strategy: str
    map_unroll: int  # agents per iteration of the ``map`` strategy's loop
    param: Parametrization  # how the network's output is read as a score


@dataclasses.dataclass(frozen=True)
class Components(ScoreComponents):
    """A config resolved into plain objects for training, once, outside ``jit``: the score's
    components and the optimizer, its schedule, the training strategy and the training times."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    train_strategy: str
    times: Callable  # (key, n) -> training times


def guidable(config) -> bool:
    """Whether a run's agents learn the unconditional score too (``train.label_dropout`` > 0):
    their model has the null label, and they can be sampled with classifier-free guidance."""
    return config.train.get("label_dropout", 0.0) > 0


def resolve_score(config: ml_collections.ConfigDict) -> ScoreComponents:
    """Builds the model, SDE, parametrization and score strategy a config names (no optimizer:
    what sampling needs).

    Raises:
      ValueError: an unknown SDE, strategy or convolution name, or a model that cannot be built
        (``check_config`` checks all of a config).
    """
    return ScoreComponents(
        model=make_unet(config.model, config.get("conv_impl", "auto"), guidable(config)),
        sde=make_sde(config.sde),
        score_strategy=agent_axis.resolve_strategy(config.agent_axis.score, "score"),
        map_unroll=config.agent_axis.get("map_unroll", 1),
        param=parametrization_of(config.model),
    )


def resolve(config: ml_collections.ConfigDict) -> Components:
    """``resolve_score``'s components plus the optimizer, its schedule, the training strategy
    and the training-time sampler.

    Raises:
      ValueError: an unknown SDE, strategy, convolution or training-noise name, or a model that
        cannot be built (``check_config`` checks all of a config).
    """
    score = resolve_score(config)
    train = config.train
    return Components(
        **vars(score),
        tx=make_optimizer(train),
        schedule=make_schedule(train),
        train_strategy=agent_axis.resolve_strategy(config.agent_axis.train, "train"),
        times=make_time_sampler(
            score.sde,
            train.get("noise", "uniform_t"),
            config.sde.eps,
            train.get("p_mean", EDM_P_MEAN),  # records that predate the fields
            train.get("p_std", EDM_P_STD),
        ),
    )


RUN_SECTIONS = ("seed", "data", "model", "sde", "partition", "train")
"""The parts of a config that make a training run what it is: its trajectory (initial
parameters, shards, batches, updates) is fixed by their fields but ``FREE_FIELDS``. A resume must
agree with the run's record on every one of them (``check_resume``); sampling takes them from the
record (``sample_lib``), and a sample set's inputs name the run by their digest (``run_digest``).
Everything else (``sampler``, ``aggregator``, ``agent_axis``, ``mesh``, ``conv_impl``, the
preset's name) says how to run, not what is trained, and may differ."""


FREE_FIELDS = (
    "data.mnist_dir",  # where MNIST is read from: every source gives the same arrays
    "data.tfds_data_dir",
    "train.log_every",  # logging and checkpoint cadence
    "train.checkpoint_every",
    "train.keep_checkpoints",
)
"""Fields of ``RUN_SECTIONS`` that do not change the trajectory: they may differ on a resume."""


def run_inputs(config) -> dict[str, Any]:
    """The flat fields (``provenance.flatten``) of ``RUN_SECTIONS`` but ``FREE_FIELDS``, of a
    config or of a run record's JSON config."""
    fields = provenance.config_fields(config, RUN_SECTIONS)
    return {k: v for k, v in fields.items() if k not in FREE_FIELDS}


def run_digest(config) -> str:
    """The digest of ``run_inputs``: which trained run an output was made from."""
    return provenance.digest(run_inputs(config))
