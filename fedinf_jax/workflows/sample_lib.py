"""Sampling a trained federation, its parts: restore the agents, build the sampler, draw in
batches.

The run's checkpoint fixes what was trained (its ``seed`` and its ``data``, ``model``, ``sde``,
``partition`` and ``train`` sections, ``runs.RUN_SECTIONS``, and the partition's count
matrix); the config chooses how to sample (``sampler``) and how to aggregate (``aggregator``).
``fedinf_jax.workflows.federation`` is the API built from these parts (``sample.py`` uses it),
and documents the sample set's files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fedinf_jax.agents import agent_axis, checkpoint, dispatch, pretrained, runs, sharding
from fedinf_jax.core import errors, provenance
from fedinf_jax.core.registry import check_choice, parse_spec
from fedinf_jax.core.types import AgentParams
from fedinf_jax.data import digits
from fedinf_jax.diffusion.score import make_score_fn, null_label
from fedinf_jax.sampling import aggregators, federated_sampler, solvers
from fedinf_jax.sampling.federated_score import with_null_label
from fedinf_jax.workflows import train_lib

EXECUTION_FIELDS = ("sampler.batch_size", "sampler.progress", "sampler.checkpoint_step")
"""Sampler fields that are not a sample set's inputs: how it is computed (the batching: each
sample's key is its own whatever the batches; the progress bar), and the step as asked (the step
resolved from it is an input)."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """Trained agents restored from a run directory, with the config that samples them
    (``fedinf_jax.workflows.federation.Federation`` is the API around it)."""

    config: ml_collections.ConfigDict  # the sampling config with the trained sections restored
    params: AgentParams  # stacked (EMA, unless sampler.use_ema is False)
    counts: np.ndarray | None  # n[agent, class]
    step: int
    components: runs.ScoreComponents
    # Several devices: the mesh ``params`` are padded and laid out on
    # (fedinf_jax/agents/sharding.py).
    agent_mesh: sharding.AgentMesh | None = None
    # Autoguidance (sampler.guide): the same agents' weaker parameters, stacked like ``params``.
    guide_params: AgentParams | None = None

    @property
    def num_agents(self) -> int:
        if self.agent_mesh is not None:
            return self.agent_mesh.num_agents
        return agent_axis.num_agents_of(self.params)

    @property
    def sampler_params(self) -> AgentParams:
        """What the sampler evaluates: ``params``, then ``guide_params`` on the same agent axis
        (2K agents in one call) under autoguidance."""
        if self.guide_params is None:
            return self.params
        return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), self.params, self.guide_params)


def parse_guide(guide: str) -> tuple[str | None, int] | None:
    """``sampler.guide``: "" (no guide: classifier-free guidance uses the null label), "N" (this
    run's checkpoint step N), "DIR" or "DIR@N" (another run of the same agents, its latest step
    or step N) -> None, (None, N), (DIR, -1), (DIR, N).

    Raises:
      ValueError: a step that is not an integer.
    """
    if not guide:
        return None
    where, at, step = guide.rpartition("@")
    if not at:
        where, step = (None, guide) if guide.isdigit() else (guide, "-1")
    try:
        return where or None, int(step)
    except ValueError:
        raise ValueError(
            f"sampler.guide {guide!r}: give a checkpoint step N, a run DIR or DIR@N"
        ) from None


_SAMPLER_RULES = {
    "guidance": (lambda v: v >= 0, ">= 0 (1: unguided, 0: the unconditional score)"),
    "num_per_class": (lambda v: v >= 1, ">= 1"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "checkpoint_step": (lambda v: v >= -1, ">= 0, or -1 for the latest"),
    "guidance_interval": (
        lambda v: isinstance(v, tuple | list) and len(v) == 2 and 0 <= v[0] < v[1],
        "(t_lo, t_hi) with 0 <= t_lo < t_hi: guidance where t_lo < t <= t_hi",
    ),
}


def check_config(config: ml_collections.ConfigDict, counts: np.ndarray | None = None) -> None:
    """Every setting ``sample.py`` reads, checked: the trained sections as ``train_lib``'s
    ``check_config`` does, then the sampling ones (``check_sampling``) for the partition's
    count matrix (``counts``; default: the config's partition on MNIST's class sizes).

    Raises:
      ConfigError: the first invalid setting, named with what is valid.
    """
    components, expected = train_lib.check_config(config)
    check_sampling(config, components, expected if counts is None else counts)


def check_sampling(
    config: ml_collections.ConfigDict,
    components: runs.ScoreComponents,
    counts: np.ndarray | None,
    member: aggregators.Aggregator | None = None,
) -> None:
    """The sampling settings of ``config`` checked for restored agents (their ``components``,
    the count matrix ``counts`` and its K): the sampler's fields, the solver, and the
    aggregator (the config's, or ``member``) with its guidance.

    Raises:
      ConfigError: the first invalid setting, named with what is valid.
    """
    errors.check_fields("sampler", config.sampler, _SAMPLER_RULES)
    guidance = guidance_of(config)
    with errors.as_config_error():
        spec = solvers.SolverSpec.from_config(config.sampler, components.sde)
        if member is None:
            aggregators.AGGREGATORS.check(config.aggregator.name)
    num_agents = None if counts is None else len(counts)
    with errors.as_config_error(f"aggregator {config.aggregator.name}: "):
        aggregator = make_aggregator(
            config.aggregator, counts, num_agents, components, spec.method, *guidance, member
        )
    with errors.as_config_error():
        solvers.check_solver_for(aggregator, spec)


SAMPLER_SETTINGS = ("guidance", "guidance_interval", "solver", "num_steps", "schedule")
"""Sampler fields a procedure may set after its colon, beside its member's settings
(``mean:guidance=2``: the member with classifier-free guidance; ``superdiff_or:solver=euler``:
a member whose tracked densities need a solver that steps them, Euler-Maruyama, where the
sampler's is an exponential integrator)."""


def parse_procedure(procedure: str) -> tuple[str, dict]:
    """A sampling procedure: a member's name alone (its defaults), or with settings after a
    colon, ``label_prior:top_k=1``, ``superdiff_or:top_k=2,temperature=0.5``,
    ``mean:guidance=2`` (the member's settings or ``SAMPLER_SETTINGS``; values as Python
    literals, a bare word a string).

    Raises:
      ValueError: an unknown member or setting (the valid ones listed), or an item that is not
        ``name=value``.
    """
    name = procedure.partition(":")[0]
    check_choice("procedure", name, aggregators.AGGREGATORS)
    return parse_spec(
        "procedure", procedure, [*aggregators.AGGREGATORS.settings(name), *SAMPLER_SETTINGS]
    )


def with_procedure(config: ml_collections.ConfigDict, procedure: str) -> ml_collections.ConfigDict:
    """A copy of ``config`` sampling with ``procedure`` (``parse_procedure``): its member as the
    aggregator, its settings in the member's section or the sampler's."""
    name, settings = parse_procedure(procedure)
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.aggregator.name = name
    if name not in cfg.aggregator:  # a member registered after the config was built
        cfg.aggregator[name] = aggregators.AGGREGATORS.settings(name)
    for key, value in settings.items():
        (cfg.sampler if key in SAMPLER_SETTINGS else cfg.aggregator[name])[key] = value
    return cfg


def contradicted_fields(overrides: dict, record: dict) -> list[str]:
    """The given ``overrides`` ({"section.field": value}, e.g. from the command line) that set a
    field of the run (``runs.run_inputs``) to something other than the run's ``record``
    holds, as "--config.F=given (the checkpoint has recorded)" lines."""
    recorded = runs.run_inputs(record)
    lines = []
    for path, given in sorted(overrides.items()):
        normal = provenance.flatten({path: given})[path]
        if path in recorded and normal != recorded[path]:
            lines.append(f"--config.{path}={given!r} (the checkpoint has {recorded[path]!r})")
    return lines


def sample_set_inputs(config: ml_collections.ConfigDict, step: int) -> dict:
    """What determines a sample set (``provenance``): the trained run (``runs.run_digest``)
    and its checkpoint step, the ``sampler`` section but ``EXECUTION_FIELDS``, and the
    aggregator's name and its own settings."""
    inputs = {"run": runs.run_digest(config), "checkpoint_step": int(step)}
    inputs.update(provenance.config_fields(config, ("sampler",)))
    for field in EXECUTION_FIELDS:
        inputs.pop(field, None)
    name = config.aggregator.name
    member = config.aggregator.get(name, None)
    inputs["aggregator.name"] = name
    inputs.update(provenance.flatten({f"aggregator.{name}": member.to_dict() if member else {}}))
    return inputs


def load_federation(
    config: ml_collections.ConfigDict, workdir: str, overrides: dict | None = None
) -> Restored:
    """Restores the agents of ``workdir`` (the latest checkpoint, or ``sampler.checkpoint_step``).

    The run's record is read first: ``overrides`` (the settings given on the command line,
    {"section.field": value}) that contradict a trained section are refused, and the whole
    config, with the run's trained sections and count matrix, is checked (``check_config``)
    before any array is restored. Without a checkpoint the config is still checked first, so a
    bad setting is named before the missing run.

    A shipped run (``pretrained``) is verified against its checksums first.

    Raises:
      ConfigError: an invalid setting, or an override that contradicts the run.
      MissingInputError: ``workdir`` holds no checkpoint (or not the step asked for).
      ShippedFileError: a shipped run's file is missing or damaged.
      ShippedRunError: the raw (non-EMA) parameters asked of a shipped run.
    """
    if pretrained.verify(workdir) is not None and not config.sampler.use_ema:
        raise pretrained.ShippedRunError(
            f"{workdir} is a shipped run: it keeps only the agents' EMA parameters, so "
            "sampler.use_ema must be true"
        )
    step, meta = _checkpoint_record(config, workdir)
    record = meta.get("config", {})
    contradicted = contradicted_fields(overrides or {}, record)
    if contradicted:
        raise errors.ConfigError(
            f"the run in {workdir} fixes its {', '.join(runs.RUN_SECTIONS)}, and "
            f"these settings contradict it: {'; '.join(contradicted)}. Drop them, or train "
            "a new run with them"
        )
    merged = _with_trained_sections(config, record, workdir)
    counts = np.asarray(meta["counts"]) if "counts" in meta else None
    num_agents = int(meta.get("num_agents", merged.partition.num_agents))
    merged.partition.num_agents = num_agents
    check_config(merged, counts)
    components = runs.resolve_score(merged)
    agent_mesh = sharding.make_mesh(merged.mesh, num_agents)
    abstract = runs.abstract_agent_params(components.model, num_agents)
    if agent_mesh is not None:
        abstract = sharding.abstract_on_mesh(abstract, agent_mesh)
    field = "ema_params" if config.sampler.use_ema else "params"
    guide = _guide_checkpoint(merged, workdir, counts, agent_mesh)
    params = checkpoint.restore_params(workdir, abstract, step, field, num_agents)
    guide_params = None
    if guide is not None:
        guide_params = checkpoint.restore_params(guide[0], abstract, guide[1], field, num_agents)
    return Restored(merged, params, counts, int(step), components, agent_mesh, guide_params)


def _checkpoint_record(config: ml_collections.ConfigDict, workdir: str) -> tuple[int, dict]:
    """(step, run record) of the checkpoint ``sampler.checkpoint_step`` (-1: the latest) in
    ``workdir``; when there is none, the config is checked first, so that a bad setting is
    named before the missing run.

    Raises:
      ConfigError: no checkpoint, and an invalid setting.
      MissingInputError: no checkpoint (or not the step asked for).
    """
    ckpt_dir = checkpoint.checkpoint_dir(workdir)
    if not os.path.isdir(ckpt_dir):
        check_config(config)
        raise errors.MissingInputError(
            f"no checkpoint under {ckpt_dir}: train first, e.g. "
            f"python train.py --config=configs/hetero.py:{config.preset} --workdir={workdir}"
        )
    manager = checkpoint.make_manager(workdir, create=False)
    try:
        steps = manager.all_steps()
        want = config.sampler.checkpoint_step
        step = manager.latest_step() if want < 0 else want
        if step is None or step not in steps:
            check_config(config)
            raise errors.MissingInputError(
                f"no checkpoint {'' if want < 0 else f'step {want} '}under {ckpt_dir} "
                f"(steps there: {sorted(steps)})"
            )
        return step, checkpoint.restore_meta(manager, step)
    finally:
        manager.close()


def _guide_checkpoint(config, workdir: str, counts, agent_mesh) -> tuple[str, int] | None:
    """(workdir, step) of ``sampler.guide``'s checkpoint, once its record shows the same agents
    (model and count matrix): autoguidance stacks its parameters beside the run's.

    Raises:
      MissingInputError: no such run or step.
      ConfigError: another model or partition, or several devices.
    """
    guide = parse_guide(config.sampler.get("guide", ""))
    if guide is None:
        return None
    if agent_mesh is not None:
        raise errors.ConfigError("sampler.guide (autoguidance) runs on one device for now")
    where, want = guide[0] or workdir, guide[1]
    pretrained.verify(where)
    step = checkpoint.resolve_step(where, want, f"sampler.guide = {config.sampler.guide!r}: ")
    meta = checkpoint.read_meta(where, step)
    record = meta.get("config", {})
    same_model = provenance.flatten({"model": record.get("model", {})}) == provenance.config_fields(
        config, ("model",)
    )
    if not same_model or not np.array_equal(np.asarray(meta.get("counts")), counts):
        raise errors.ConfigError(
            f"sampler.guide = {config.sampler.guide!r}: the guide must be the same agents "
            f"(model and partition) at another training stage; {where} step {step} has "
            f"{'another model' if not same_model else 'another count matrix'}"
        )
    return where, step


def _with_trained_sections(config, record: dict, workdir: str) -> ml_collections.ConfigDict:
    merged = ml_collections.ConfigDict(config.to_dict())
    current = json.loads(config.to_json_best_effort())
    for section in runs.RUN_SECTIONS:
        if section not in record:
            continue
        if record[section] != current.get(section):
            logging.info("using the %s %s was trained with", section, workdir)
        if isinstance(record[section], dict):
            # A field the record lacks (added since the run was trained) keeps its default,
            # which is what the code did before the field existed.
            merged[section] = ml_collections.ConfigDict({**current[section], **record[section]})
        else:
            merged[section] = record[section]
    return merged


def guidance_of(
    config: ml_collections.ConfigDict,
) -> tuple[float, tuple | None, tuple[float, float]]:
    """(``sampler.guidance``, its ``parse_guide``d ``sampler.guide``, ``sampler.guidance_interval``
    (``aggregators.ALWAYS`` for a config without one)), checked against the run.

    Raises:
      ConfigError: a guide without guidance, or guidance by the null label for agents trained
        without it (``train.label_dropout`` = 0).
    """
    guidance = config.sampler.get("guidance", 1.0)
    with errors.as_config_error():
        guide = parse_guide(config.sampler.get("guide", ""))
    if guide is not None and guidance == 1:
        raise errors.ConfigError(
            f"sampler.guide = {config.sampler.guide!r} guides with a weaker model, but "
            "sampler.guidance = 1 is unguided: set sampler.guidance > 1 (e.g. 2)"
        )
    if guide is None and guidance != 1 and not runs.guidable(config):
        raise errors.ConfigError(
            f"sampler.guidance = {guidance} needs agents that learnt the unconditional score too, "
            "trained with train.label_dropout > 0 (e.g. 0.15); these are trained with "
            f"train.label_dropout = {config.train.get('label_dropout', 0.0)}. Sample them with "
            "sampler.guidance = 1, or train a run with label dropout"
        )
    return guidance, guide, tuple(config.sampler.get("guidance_interval", aggregators.ALWAYS))


def make_aggregator(
    section,
    counts,
    num_agents: int,
    components,
    method: str,
    guidance: float = 1.0,
    guide: tuple | None = None,
    interval: tuple[float, float] = aggregators.ALWAYS,
    member: aggregators.Aggregator | Callable | None = None,
) -> aggregators.Aggregator:
    """The member ``section`` names, for the run's count matrix, K and SDE, or ``member`` (an
    ``Aggregator`` or a plain function, ``aggregators.as_aggregator``) instead; with
    ``guidance`` w != 1, that member guided (``aggregators.guided``) where t lies in
    ``interval``: by the agents' unconditional scores aggregated at the null label, whose prior
    is the label-free one (``aggregators.with_null_class``), or with a ``guide``
    (``parse_guide``) by the weaker agents' scores at the same label (autoguidance).

    Raises:
      ValueError: an unknown member or settings it refuses.
      TypeError: a ``member`` that is neither an ``Aggregator`` nor a function.
    """
    if member is None and guidance != 1 and guide is None and counts is not None:
        counts = aggregators.with_null_class(counts)
    if member is None:
        member = aggregators.from_config(section, counts, num_agents, components.sde, method)
    member = aggregators.as_aggregator(member)
    if guidance == 1:
        return member
    return aggregators.guided(
        member, guidance, null_label(components.model) if guide is None else None, interval
    )


def build_sampler(
    federation: Restored,
    spec: solvers.SolverSpec | None = None,
    procedure: str | None = None,
    sparse: bool = True,
    member: aggregators.Aggregator | Callable | None = None,
) -> federated_sampler.FederatedSampler:
    """The federation's sampler: its agents' scores through the configured agent-axis strategy,
    the configured aggregator and solver (or ``spec``, and the ``procedure`` (``parse_procedure``:
    a member's name, with settings after a colon) over the config's; or ``member``, an
    ``Aggregator`` or a plain function, instead of the config's). A member that declares
    ``dispatch`` asks only its agents (``fedinf_jax.agents.dispatch``; on a mesh, each device its
    own agents' pairs) unless ``sparse`` is False.

    Raises:
      ValueError: an unknown solver, method or aggregator, or settings out of range.
    """
    config, comp, agent_mesh = federation.config, federation.components, federation.agent_mesh
    if procedure is not None:
        config = with_procedure(config, procedure)
    spec = spec or solvers.SolverSpec.from_config(config.sampler, comp.sde)
    guidance, guide, interval = guidance_of(config)
    aggregator = make_aggregator(
        config.aggregator,
        federation.counts,
        federation.num_agents,
        comp,
        spec.method,
        guidance,
        guide,
        interval,
        member,
    )
    scores = agent_score_fn(comp, agent_mesh=agent_mesh)
    # Only the pairs a sparse member names (``dispatch``).
    grouped = grouped_score_fn(comp, agent_mesh) if sparse else None
    if guidance != 1 and guide is None:  # the guide's scores: the params' second K agents
        scores = with_null_label(scores, null_label(comp.model))
        grouped = grouped and with_null_label(grouped, null_label(comp.model))
    return federated_sampler.FederatedSampler(
        scores,
        comp.sde,
        aggregator,
        spec,
        digits.IMAGE_SHAPE,
        num_agents=federation.num_agents,
        grouped_score_fn=grouped,
    )


def grouped_score_fn(
    components: runs.ScoreComponents, agent_mesh: sharding.AgentMesh | None = None
):
    """``(stacked params, x, t, y, agent_index) -> (agents, batch, ...)``: the scores of the
    (agent, sample) pairs ``agent_index`` (m, batch) names, zeros elsewhere
    (``fedinf_jax.agents.dispatch``); on ``agent_mesh``, each device evaluates its own agents' pairs
    and the padding agents are dropped."""
    grouped = dispatch.grouped(make_score_fn(components.model, components.sde, components.param))
    if agent_mesh is None:
        return grouped
    return sharding.without_padding(sharding.over_sharded_pairs(grouped, agent_mesh), agent_mesh)


def agent_score_fn(
    components: runs.ScoreComponents,
    strategy: str | None = None,
    agent_mesh: sharding.AgentMesh | None = None,
):
    """``(stacked params, x, t, y) -> (agents, batch, ...)`` scores of all agents, through
    ``strategy`` (default: the config's score strategy); on ``agent_mesh``, each device scores
    its own agents on its slice of the batch and the padding agents are dropped."""
    score_fn = make_score_fn(components.model, components.sde, components.param)
    strategy = strategy or components.score_strategy
    in_axes, unroll = (0, None, None, None), components.map_unroll
    if agent_mesh is None:
        return agent_axis.over_agents(score_fn, strategy, in_axes, unroll)
    lifted = sharding.over_sharded_agents(
        score_fn, agent_mesh, strategy, in_axes, batch_args=(1, 2, 3), map_unroll=unroll
    )
    return sharding.without_padding(lifted, agent_mesh)


def class_labels(num_per_class: int, num_classes: int = 10) -> np.ndarray:
    """``num_per_class`` of each class, grouped by class: 0, 0, ..., 1, 1, ..."""
    return np.repeat(np.arange(num_classes), num_per_class).astype(np.int32)


class Drawn(NamedTuple):
    """What ``sample_in_batches`` returns: ``images`` (N, H, W, C) float, ``per_batch``
    statistics, and where saved/defined ``trajectory_t`` (S,), ``trajectory`` (S, N, H, W, C),
    the aggregator's agent ``weights`` (K, N) at t_end and ``trajectory_weights`` (S, K, N)."""

    images: np.ndarray
    per_batch: dict
    trajectory_t: np.ndarray | None = None
    trajectory: np.ndarray | None = None
    weights: np.ndarray | None = None
    trajectory_weights: np.ndarray | None = None


def sample_in_batches(
    sampler: federated_sampler.FederatedSampler,
    params: AgentParams,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    agent_mesh: sharding.AgentMesh | None = None,
) -> Drawn:
    """Draws one sample per label in batches of ``batch_size`` (the last one padded, so one
    compiled shape serves all). Sample i's key is ``fold_in(seed, i)`` whatever the batching.
    On ``agent_mesh`` each batch is split along its ``batch`` axis and every process gets all
    the results."""
    n = len(labels)
    batch = _batch_size(n, batch_size, agent_mesh)
    num_batches = math.ceil(n / batch)
    parts = {"images": [], "trajectory": [], "weights": [], "trajectory_weights": []}
    stats, trajectory_t = [], None
    from clu import periodic_actions  # imports TensorFlow: not for a run refused at its config

    progress = periodic_actions.ReportProgress(num_train_steps=num_batches, every_steps=1)
    progress(0)
    for b in range(num_batches):
        lo = b * batch
        y = jnp.asarray(labels[np.minimum(np.arange(lo, lo + batch), n - 1)])
        keys = federated_sampler.sample_keys(seed, batch, start=lo)
        if agent_mesh is not None:
            y, keys = sharding.put_batch((y, keys), agent_mesh)
        out = jax.tree.map(sharding.to_host, sampler(params, keys, y))
        keep = min(batch, n - lo)
        for name, part in _batch_parts(sampler.aggregator, out, sharding.to_host(y)).items():
            parts[name].append(part[(slice(None),) * _SAMPLE_AXIS[name] + (slice(keep),)])
        if out.trajectory is not None:
            trajectory_t = np.asarray(out.trajectory_t)
        stats.append({k: int(v) for k, v in out.stats.items()})
        logging.info(
            "batch %d/%d: %d images, %d score evaluations, %d steps (%d rejected)",
            b + 1,
            num_batches,
            keep,
            stats[-1]["score_evaluations"],
            stats[-1]["num_steps"],
            stats[-1]["num_rejected_steps"],
        )
        progress(b + 1)  # clu: batches/s, done and ETA
    per_batch = {k: np.array([s[k] for s in stats]) for k in stats[0]}
    joined = {k: np.concatenate(v, _SAMPLE_AXIS[k]) if v else None for k, v in parts.items()}
    return Drawn(
        joined["images"],
        per_batch,
        trajectory_t,
        joined["trajectory"],
        joined["weights"],
        joined["trajectory_weights"],
    )


# The sample axis of each per-batch output: images (N, ...), the trajectory (S, N, ...), the
# agents' weights (K, N) and along the trajectory (S, K, N).
_SAMPLE_AXIS = {"images": 0, "trajectory": 1, "weights": 1, "trajectory_weights": 2}


def _batch_size(n: int, batch_size: int, agent_mesh: sharding.AgentMesh | None) -> int:
    """The images per solve, checked: ``batch_size``, or all ``n`` when fewer."""
    if n < 1:
        raise ValueError("nothing to sample: sampler.num_per_class must be >= 1")
    if batch_size < 1:
        raise ValueError(f"sampler.batch_size must be >= 1, got {batch_size}")
    batch = min(batch_size, n)
    if agent_mesh is not None and batch % agent_mesh.batch_shards:
        raise ValueError(
            f"the sampler's batch ({batch} images) must be a multiple of mesh.batch = "
            f"{agent_mesh.batch_shards}"
        )
    return batch


def _batch_parts(
    agg: aggregators.Aggregator, out: federated_sampler.Samples, y
) -> dict[str, np.ndarray]:
    """A solved batch's arrays: its images, its trajectory when saved, and the agents' weights
    (at t_end and along the trajectory) for a member whose weights its state and the labels
    give."""
    parts = {"images": np.asarray(out.images)}
    if out.trajectory is not None:
        parts["trajectory"] = np.asarray(out.trajectory)
    if agg.weights_from_state:

        def weights_of(state, y):
            return agg.weights(None, None, None, y, state)

        parts["weights"] = np.asarray(weights_of(out.aggregator_state, y))
        if out.trajectory_state is not None:
            w = jax.vmap(weights_of, in_axes=(0, None))(out.trajectory_state, y)
            parts["trajectory_weights"] = np.asarray(w)
    return parts
