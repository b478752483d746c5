"""Training K score-model agents at once.

Every agent's parameters, EMA parameters and optimizer state are stacked on a leading ``agents``
axis; one jitted ``train_step(state, batch, key) -> (state, metrics)`` updates all K agents, each
on its own shard's batch and its own key, through the configured agent-axis strategy
(``fedinf_jax.agents.agent_axis``). Nothing crosses agents: agent i's update reads only agent i's
parameters, data and key.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from fedinf_jax.agents import agent_axis, checkpoint, pretrained, runs, sharding
from fedinf_jax.core import errors, provenance, runtime
from fedinf_jax.core.types import AgentParams, Key, PyTree
from fedinf_jax.data import digits, partitions
from fedinf_jax.data.input_pipeline import AgentBatcher
from fedinf_jax.diffusion.score import (
    make_loss_fn,
)
from fedinf_jax.models import optim
from fedinf_jax.workflows import plots


class TrainState(NamedTuple):
    """All K agents' training state; every leaf but ``step`` has a leading ``agents`` axis."""

    step: jax.Array
    params: AgentParams
    ema_params: AgentParams
    opt_state: PyTree


def create_train_state(params: AgentParams, tx: optax.GradientTransformation) -> TrainState:
    """The step-0 state of stacked agents: EMA starts at the parameters."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        # A copy, not an alias: the train step donates its input state.
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=jax.vmap(tx.init)(params),
    )


def abstract_train_state(components: runs.Components, num_agents: int) -> TrainState:
    """Shapes and dtypes of the K-agent train state, computed without running anything: the
    target a checkpoint is restored into."""
    return jax.eval_shape(
        lambda k: create_train_state(
            runs.init_agents(components.model, num_agents, k), components.tx
        ),
        runs.make_key(0),
    )


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    ema_decay: float,
    strategy: str,
    agent_mesh: sharding.AgentMesh | None = None,
    map_unroll: int = 1,
) -> Callable:
    """Builds ``train_step(state, batch, key) -> (state, metrics)`` for stacked agents.

    The step's key is ``fold_in(key, state.step)`` split into one key per agent, so a resumed run
    draws the same noise. ``metrics`` hold per-agent arrays: ``loss`` and ``grad_norm`` (K,).
    On ``agent_mesh`` the state and batch carry its padded agent axis, each device updates its own
    agents, the padding agents get copies of real agents' keys and their metrics are dropped: the
    real agents' numbers are the single-device ones.
    """

    def agent_update(params, ema, opt_state, images, labels, key, step):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = optax.incremental_update(params, ema, 1.0 - optim.ema_decay_at(step, ema_decay))
        return params, ema, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    in_axes = (0, 0, 0, 0, 0, 0, None)
    if agent_mesh is None:
        update_all = agent_axis.over_agents(agent_update, strategy, in_axes, map_unroll)
    else:
        update_all = sharding.over_sharded_agents(
            agent_update, agent_mesh, strategy, in_axes, map_unroll=map_unroll
        )

    def train_step(state: TrainState, batch: dict[str, jax.Array], key: Key):
        stacked = agent_axis.num_agents_of(state.params)
        num_agents = stacked if agent_mesh is None else agent_mesh.num_agents
        keys = jax.random.split(jax.random.fold_in(key, state.step), num_agents)
        keys = keys[jnp.arange(stacked) % num_agents]  # padding agents: any valid keys
        params, ema, opt_state, metrics = update_all(
            state.params,
            state.ema_params,
            state.opt_state,
            batch["images"],
            batch["labels"],
            keys,
            state.step,
        )
        metrics = sharding.first_agents(metrics, num_agents)
        if agent_mesh is not None:  # replicated: every process reads all agents' metrics
            metrics = jax.lax.with_sharding_constraint(metrics, agent_mesh.sharding())
        return TrainState(state.step + 1, params, ema, opt_state), metrics

    return train_step


def check_finite(loss: np.ndarray, step: int, saved_step: int) -> None:
    """Raises FloatingPointError naming the agents whose loss at ``step`` is not finite (the
    training loop checks every step's loss at the next log or checkpoint step)."""
    if not np.all(np.isfinite(loss)):
        bad = np.flatnonzero(~np.isfinite(loss)).tolist()
        raise FloatingPointError(
            f"non-finite loss at step {step} for agent(s) {bad} (losses {loss.tolist()}); "
            f"the last checkpoint (step {saved_step}) is kept"
        )


_TRAIN_RULES = {
    "num_steps": (lambda v: v >= 1, ">= 1"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "learning_rate": (lambda v: v > 0, "> 0"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
    "end_lr_factor": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "grad_clip": (lambda v: v > 0, "> 0"),
    "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "label_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "p_std": (lambda v: v > 0, "> 0"),
    "log_every": (lambda v: v >= 1, ">= 1"),
    "checkpoint_every": (lambda v: v >= 1, ">= 1"),
    "keep_checkpoints": (lambda v: v >= 1, ">= 1"),
}
_AGENT_AXIS_RULES = {"map_unroll": (lambda v: v >= 1, ">= 1")}


def check_config(config: ml_collections.ConfigDict) -> tuple[runs.Components, np.ndarray]:
    """Every setting ``train.py`` reads, checked before any data or checkpoint is read: the
    registries' names, the fields' ranges, the model's shapes, the mesh against the devices and
    the partition on MNIST's class sizes.

    Returns:
      The resolved components and the partition's count matrix as it will be on MNIST.

    Raises:
      ConfigError: the first invalid setting, named with what is valid.
    """
    errors.check_fields("partition", config.partition, {"num_agents": (lambda v: v >= 1, ">= 1")})
    errors.check_fields("train", config.train, _TRAIN_RULES)
    errors.check_fields("agent_axis", config.agent_axis, _AGENT_AXIS_RULES)
    with errors.as_config_error(f"partition {config.partition.name}: "):
        counts = partitions.expected_counts(config.partition)
    with errors.as_config_error():
        components = runs.resolve(config)
        if not 0 < config.sde.eps < components.sde.T:
            raise ValueError(
                f"sde.eps must lie in (0, T = {components.sde.T}), got {config.sde.eps}"
            )
        sharding.make_mesh(config.mesh, config.partition.num_agents)
    return components, counts


def make_partition(config: ml_collections.ConfigDict, labels: np.ndarray) -> partitions.Partition:
    """The config's partition of the training labels."""
    return partitions.from_config(config.partition, labels)


def run_record(config: ml_collections.ConfigDict, partition: partitions.Partition) -> dict:
    """The JSON ``meta`` a checkpoint carries: config, count matrix, agents."""
    return {
        "config": json.loads(config.to_json_best_effort()),
        "counts": partition.counts.tolist(),
        "num_agents": partition.num_agents,
        "partition": config.partition.name,
    }


def check_resume(record: dict, config: ml_collections.ConfigDict, workdir: str, step: int) -> None:
    """Refuses to go on with the run in ``workdir``, checkpointed at ``step`` with the JSON
    config ``record``, under a ``config`` that would give another trajectory: any field of
    ``runs.run_inputs`` that differs (a field the record lacks, added since it was written, is
    not compared), whether or not the run has reached its last step.

    ``train.num_steps`` may grow when the run so extended equals one that asked for the longer
    budget from the start: the learning-rate schedule spans ``num_steps``
    (``optim.make_schedule``), so that holds only when both schedules agree on every step already
    taken (steps inside the warm-up, or a constant schedule); it may shrink to no less than
    ``step`` on the same terms.

    Raises:
      CheckpointMismatchError: the first fields that differ (old -> new), or a ``num_steps``
        whose schedule disagrees with the steps taken.
    """
    stored, current = runs.run_inputs(record), runs.run_inputs(config)
    shared = [k for k in stored if k in current and k != "train.num_steps"]
    changed = provenance.differences(
        {k: stored[k] for k in shared}, {k: current[k] for k in shared}
    )
    if changed:
        raise checkpoint.CheckpointMismatchError(
            f"the run in {workdir} was trained with other settings ({'; '.join(changed[:6])}): "
            "resuming would mix two runs. Use the run's settings, or a fresh --workdir (fields "
            f"that may differ: {', '.join(runs.FREE_FIELDS)})"
        )
    old, new = stored.get("train.num_steps"), config.train.num_steps
    if old is None or old == new:
        return
    before = optim.make_schedule(
        ml_collections.ConfigDict({**config.train.to_dict(), **record["train"]})
    )
    after = optim.make_schedule(config.train)
    steps = np.arange(step)
    if new < step or not np.array_equal(before(steps), after(steps)):
        raise checkpoint.CheckpointMismatchError(
            f"the run in {workdir} was trained to step {step} of train.num_steps = {old}; "
            f"train.num_steps = {new} cannot resume it: "
            + (
                f"it is past step {new}"
                if new < step
                else "the learning-rate schedule spans num_steps, so the steps already taken "
                f"would have had other learning rates in a {new}-step run"
            )
            + ". Use a fresh --workdir for the new budget"
        )
    logging.info("train.num_steps %d -> %d: the steps taken agree with the new schedule", old, new)


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> int | None:
    """The latest step of the run in ``workdir`` once its record agrees with ``config``
    (``check_resume``), or None when it holds no checkpoint. Reads only the JSON records, newest
    first (a record that cannot be read is skipped with a warning), no array.

    Raises:
      CheckpointMismatchError: the run was trained with other settings.
    """
    if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
        return None
    manager = checkpoint.make_manager(workdir, create=False)
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        for step in steps:
            try:
                record = checkpoint.restore_meta(manager, step)
            except checkpoint.CheckpointDamagedError as err:
                logging.warning("%s", err)
                continue
            check_resume(record.get("config", {}), config, workdir, steps[0])
            return steps[0]
    finally:
        manager.close()
    return steps[0] if steps else None


def _restore_intact(manager, target: TrainState, num_agents: int, workdir: str) -> TrainState:
    """The newest kept step that can be read back; each newer damaged one is moved aside
    (``checkpoint.set_aside``) with a warning naming it and why.

    Raises:
      CheckpointDamagedError: no kept step can be read (all moved aside).
    """
    error = None
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state, _ = checkpoint.restore(manager, target, step, num_agents=num_agents)
            return state
        except checkpoint.CheckpointDamagedError as err:
            moved = checkpoint.set_aside(manager, workdir, step)
            logging.warning(
                "skipping checkpoint step %d, which cannot be read (%s): moved to %s",
                step,
                err.reason,
                moved,
            )
            error = err
    raise error


def build_train_step(config: ml_collections.ConfigDict) -> Callable:
    """The config's jitted ``train_step(state, batch, key)`` (input state donated).

    Memoised on the config's JSON: a second run in the same process (a resume, a notebook) reuses
    the traced program instead of re-tracing K unrolled U-Nets.
    """
    return _build_train_step(config.to_json_best_effort(sort_keys=True))


@functools.cache
def _build_train_step(config_json: str) -> Callable:
    config = ml_collections.ConfigDict(json.loads(config_json))
    components = runs.resolve(config)
    return components_train_step(
        config, components, components.train_strategy, training_mesh(config), donate_argnums=(0,)
    )


def components_train_step(
    config: ml_collections.ConfigDict,
    components: runs.Components,
    strategy: str,
    agent_mesh: sharding.AgentMesh | None = None,
    **jit_kwargs,
) -> Callable:
    """The jitted train step of resolved ``components`` lifted over agents by ``strategy`` (on
    ``agent_mesh`` when given): what ``build_train_step`` compiles, for a chosen strategy."""
    loss_fn = make_loss_fn(
        components.model,
        components.sde,
        param=components.param,
        times=components.times,
        label_dropout=config.train.get("label_dropout", 0.0),
    )
    step = make_train_step(
        loss_fn,
        components.tx,
        config.train.ema_decay,
        strategy,
        agent_mesh,
        components.map_unroll,
    )
    return jit_train_step(step, strategy, agent_mesh, **jit_kwargs)


def jit_train_step(
    step: Callable, strategy: str, agent_mesh: sharding.AgentMesh | None = None, **jit_kwargs
) -> Callable:
    """``jax.jit`` of a ``make_train_step`` step, except a host strategy's step on one device,
    which dispatches per agent (on a mesh a host loop runs unrolled inside one program)."""
    if agent_mesh is not None:
        return jax.jit(step, **jit_kwargs)
    return agent_axis.maybe_jit(step, strategy, **jit_kwargs)


def training_mesh(config: ml_collections.ConfigDict) -> sharding.AgentMesh | None:
    """The config's mesh for training (None on one device): agents only.

    Raises:
      ValueError: ``mesh.batch`` > 1 (each agent's batch is not split: the loss's noise draws
        would differ from the single-device run's), or an invalid mesh.
    """
    agent_mesh = sharding.make_mesh(config.mesh, config.partition.num_agents)
    if agent_mesh is not None and agent_mesh.batch_shards > 1:
        raise ValueError(
            f"training splits the agents, not their batches: set mesh.batch = 1 (got "
            f"{agent_mesh.batch_shards}); mesh.batch is for sampling"
        )
    return agent_mesh


def train(
    config: ml_collections.ConfigDict, workdir: str, stop_at: int | None = None
) -> TrainState:
    """Trains the config's K agents, writing checkpoints and summaries under ``workdir``.

    Resumes from the latest checkpoint in ``workdir`` when there is one (same step counter,
    optimizer state, EMA and data order as an uninterrupted run).

    Args:
      config: a run's ``ConfigDict`` (see ``configs/base.py``); resolved here, outside ``jit``.
      workdir: where checkpoints and TensorBoard files go.
      stop_at: stop (with a checkpoint) after this step even if ``train.num_steps`` is larger,
        e.g. to split a long run into time slices; the schedule still spans ``num_steps``.

    A damaged checkpoint (files that cannot be read back) is moved to
    ``workdir/damaged_checkpoints/`` with a warning, and the run resumes from the newest kept
    step that can be read.

    Raises:
      CheckpointMismatchError: ``workdir`` holds a run trained with other settings
        (``check_resume``), checked before any data or array is read.
      CheckpointDamagedError: no kept step of ``workdir`` can be read.
      FloatingPointError: a non-finite loss (names the agents and the step).
    """
    components, _ = check_config(config)
    pretrained.check_writable(workdir, "training")
    resume_step = check_workdir(config, workdir)
    runtime.tensorflow()  # clu's summary writer runs TensorFlow ops
    batcher, partition = _batcher(config)
    agent_mesh = training_mesh(config)
    if agent_mesh is not None:
        logging.info("%s", agent_mesh.describe())
    init_key, train_key = jax.random.split(runs.make_key(config.seed))
    os.makedirs(workdir, exist_ok=True)
    manager = checkpoint.make_manager(workdir, keep=config.train.keep_checkpoints)
    resumed = resume_step is not None
    state = _initial_state(
        config, components, partition.num_agents, init_key, manager, workdir, agent_mesh, resumed
    )
    num_steps = config.train.num_steps
    initial_step = int(state.step)
    if initial_step >= num_steps:
        logging.info("already trained to step %d >= num_steps %d", initial_step, num_steps)
        manager.close()
        return state
    last_step = num_steps if stop_at is None else min(stop_at, num_steps)
    t_start = time.time()
    loop = _Loop(config, components, manager, run_record(config, partition), workdir)
    state = loop.run(state, batcher, train_key, agent_mesh, last_step)
    if jax.process_index() == 0:
        logging.info("loss curves: %s", plots.plot_training_loss(workdir))
    logging.info("trained steps %d-%d in %.1f s", initial_step, last_step, time.time() - t_start)
    return state


def _batcher(config: ml_collections.ConfigDict) -> tuple[AgentBatcher, partitions.Partition]:
    """The run's partition of MNIST's training digits and each agent's batches of its shard."""
    mnist = digits.load_mnist(config.data.mnist_dir, config.data.tfds_data_dir)
    partition = make_partition(config, mnist.train_labels)
    batcher = AgentBatcher(
        mnist.train_images,
        mnist.train_labels,
        partition,
        config.train.batch_size,
        seed=config.seed,
        centered=config.data.centered,
    )
    logging.info(
        "partition %s: %d agents, shard sizes %s",
        config.partition.name,
        partition.num_agents,
        partition.counts.sum(axis=1).tolist(),
    )
    return batcher, partition


def _initial_state(
    config: ml_collections.ConfigDict,
    components: runs.Components,
    num_agents: int,
    init_key,
    manager,
    workdir: str,
    agent_mesh: sharding.AgentMesh | None,
    resumed: bool,
) -> TrainState:
    """The state training starts from: the newest intact checkpoint when ``resumed``, else K
    freshly initialised agents; laid out on the mesh, or committed to the one device."""
    abstract = abstract_train_state(components, num_agents)
    per_agent = runs.count_params(abstract.params) // num_agents
    logging.info(
        "U-Net %s: %s parameters per agent, %s for %d agents",
        tuple(config.model.block_out_channels),
        f"{per_agent:,}",
        f"{per_agent * num_agents:,}",
        num_agents,
    )
    if resumed:
        target = abstract if agent_mesh is None else sharding.abstract_on_mesh(abstract, agent_mesh)
        state = _restore_intact(manager, target, num_agents, workdir)
        logging.info(
            "resumed from %s at step %d", checkpoint.checkpoint_dir(workdir), int(state.step)
        )
    else:
        params = runs.init_agents(components.model, num_agents, init_key)
        state = create_train_state(params, components.tx)
        if agent_mesh is not None:
            state = sharding.to_mesh(state, agent_mesh)
    if agent_mesh is None:
        # Committed to the device, as a restored state and every step's output are: one argument
        # signature from the first step on, so a (resumed) run compiles its step once.
        state = jax.device_put(state, jax.devices()[0])
    return state


class _Loop:
    """The training loop's steps, summaries and checkpoints. The losses of the steps since the
    last read-back stay on the device: the host waits on it only at log and checkpoint steps,
    where every pending step is checked."""

    def __init__(self, config, components: runs.Components, manager, meta: dict, workdir: str):
        from clu import metric_writers  # imports TensorFlow: only for a valid config

        self.config, self.components, self.manager, self.meta = config, components, manager, meta
        self.writer = metric_writers.create_default_writer(
            workdir, just_logging=jax.process_index() > 0
        )
        self.pending: list[tuple[int, jax.Array]] = []
        self.saved_step = 0

    def check_pending(self) -> np.ndarray | None:
        losses = [np.asarray(loss) for _, loss in self.pending]
        for (s, _), loss in zip(self.pending, losses, strict=True):
            check_finite(loss, s, self.saved_step)
        self.pending.clear()
        return losses[-1] if losses else None

    def save(self, state: TrainState, step: int) -> None:
        checkpoint.save(self.manager, step, state, self.meta)
        self.saved_step = step

    def run(self, state, batcher, train_key, agent_mesh, last_step: int) -> TrainState:
        from clu import periodic_actions

        train = self.config.train
        train_step = build_train_step(self.config)
        logging.info(
            "agent-axis strategy for training: %s (backend %s)",
            self.components.train_strategy,
            jax.default_backend(),
        )
        report = periodic_actions.ReportProgress(
            num_train_steps=train.num_steps, writer=self.writer, every_steps=train.log_every
        )
        self.saved_step = int(state.step)
        try:
            for step in range(int(state.step), last_step):
                batch = batcher(step)
                if agent_mesh is not None:
                    batch = sharding.to_mesh(batch, agent_mesh)
                state, metrics = train_step(state, batch, train_key)
                self.pending.append((step, metrics["loss"]))
                done = step + 1
                report(done)
                log_now = done % train.log_every == 0 or done == train.num_steps
                save_now = done % train.checkpoint_every == 0 or done == last_step
                loss = self.check_pending() if log_now or save_now else None
                if log_now:
                    self.log(done, step, loss, metrics)
                if save_now:
                    self.save(state, done)
        except KeyboardInterrupt:
            # If the interrupt landed inside the call, ``state`` may be the donated input.
            intact = not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))
            if intact and int(state.step) > self.saved_step:
                self.check_pending()  # never save a state whose steps went non-finite
                logging.warning("interrupted: saving step %d before exiting", int(state.step))
                self.save(state, int(state.step))
            raise
        finally:
            self.writer.flush()
            self.manager.close()
        return state

    def log(self, done: int, step: int, loss: np.ndarray, metrics) -> None:
        scalars = {
            "loss": float(loss.mean()),
            "grad_norm": float(np.mean(metrics["grad_norm"])),
            "learning_rate": float(self.components.schedule(step)),
        }
        scalars.update({f"loss/agent_{k}": float(v) for k, v in enumerate(loss)})
        self.writer.write_scalars(done, scalars)
