"""The Python API: a trained federation loaded from its run folder, sampled with keyword
arguments, its samples measured (docs/api.md).

    import fedinf_jax

    fed = fedinf_jax.load("pretrained/cpu/heterogeneous")
    samples = fed.sample(num_per_class=2)  # uint8 images, their labels, the record
    fed.sample(num_per_class=2, aggregator=lambda scores: scores.mean(axis=0))

``load`` reads the run's own record (the config it was trained with): its trained sections fix
the agents, and its preset (configs/base.py) gives the sampling defaults, the same that
``sample.py --config=configs/<regime>.py:<preset>`` uses. ``sample.py`` is a thin user of this
module (``run``).

A sample set's folder (``SampleSet.save``; written atomically, so a failure leaves any earlier
folder intact):

* ``samples.npz``: ``images`` uint8 (N, 28, 28), ``labels`` int (N,), the per-batch solver
  statistics, and ``trajectory_t`` / ``trajectory`` (S, N, 28, 28) when asked; for the
  density-weighted aggregators also ``weights`` (K, N), the agents' weights at t_end, and with the
  trajectory ``trajectory_weights`` (S, K, N);
* ``samples.png``: one row per digit, its first 10 samples (the paper's Figure 2 layout);
  ``trajectory.png``, the reverse process of one sample per digit, when the trajectory is saved,
  and ``weights.png``, the agents' weights along it (which agent "owns" a digit, and when);
* ``samples.json``: the resolved config, the checkpoint step and the statistics (score
  evaluations, accepted and rejected steps, wall time).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging

from configs import base
from fedinf_jax.agents import checkpoint, pretrained
from fedinf_jax.core import errors, files, provenance
from fedinf_jax.data import digits
from fedinf_jax.evaluation import metrics, sample_sets
from fedinf_jax.sampling import aggregators, federated_sampler, solvers
from fedinf_jax.workflows import plots, sample_lib

GRID_PER_CLASS = 10
"""Samples per digit shown in ``samples.png`` (the npz holds all of them)."""

_ARRAYS = ("trajectory_t", "trajectory", "weights", "trajectory_weights")


class SampleSet(NamedTuple):
    """What ``Federation.sample`` returns: uint8 ``images`` (N, 28, 28) in MNIST's grey levels,
    their ``labels`` (N,), the ``record`` of what made them (``config``: the resolved sampling
    config; ``stats``: score evaluations, steps, wall time; the provenance of the inputs), and
    the per-batch statistics with, where asked, the trajectory and the agents' weights
    (``arrays``, the names of ``samples.npz``)."""

    images: np.ndarray
    labels: np.ndarray
    record: dict
    arrays: dict

    def save(self, outdir: str | os.PathLike) -> str:
        """Writes ``samples.npz``, ``samples.png`` (and the trajectory's figures) and
        ``samples.json`` into ``outdir`` (the module docstring), atomically; returns it."""
        outdir = os.fspath(outdir)
        arrays = {"images": self.images, "labels": self.labels.astype(np.int64), **self.arrays}
        cfg = self.record["config"]
        title = (
            f"{cfg['partition']['name']}, {self.record['stats']['num_agents']} agents, "
            f"{cfg['aggregator']['name']}, {cfg['sampler']['method']} {cfg['sampler']['solver']}"
        )
        with files.atomic_path(outdir, folder=True) as tmp:
            np.savez_compressed(os.path.join(tmp, "samples.npz"), **arrays)
            shown = plots.first_per_class(self.labels, GRID_PER_CLASS)
            plots.plot_sample_grid(
                self.images[shown], self.labels[shown], os.path.join(tmp, "samples.png"), title
            )
            along = {  # the arrays saved along the trajectory, and their figures
                "trajectory": (plots.plot_trajectory, "trajectory.png"),
                "trajectory_weights": (plots.plot_weights, "weights.png"),
            }
            for key, (plot, name) in along.items():
                if key in arrays:
                    path = os.path.join(tmp, name)
                    plot(arrays[key], arrays["trajectory_t"], self.labels, path, title)
            files.write_json(os.path.join(tmp, "samples.json"), self.record)
        return outdir


def run_config(run_dir: str | os.PathLike, checkpoint_step: int = -1) -> ml_collections.ConfigDict:
    """The config that samples the run in ``run_dir`` by default: its preset's (and preset
    modifiers') config from configs/base.py, as its record names them, with the run's own
    trained sections (``sample_lib.load_federation`` restores them).

    Raises:
      MissingInputError: ``run_dir`` holds no checkpoint (or not the step asked for).
    """
    run_dir = os.fspath(run_dir)
    hint = ": load a train.py --workdir or a shipped run (pretrained/<preset>/<regime>)"
    step = checkpoint.resolve_step(run_dir, checkpoint_step, hint=hint)
    record = checkpoint.read_meta(run_dir, step).get("config", {})
    preset = ",".join(filter(None, (record.get("preset"), record.get("modifiers"))))
    config = base.get_config(preset)
    config.sampler.checkpoint_step = step
    return config


def load(
    run_dir: str | os.PathLike, checkpoint_step: int = -1, use_ema: bool = True, guide: str = ""
) -> Federation:
    """The federation trained in ``run_dir`` (a ``train.py`` workdir or a shipped run,
    ``pretrained/<preset>/<regime>``), restored from its latest checkpoint (or
    ``checkpoint_step``), with its EMA parameters unless ``use_ema`` is False, and with
    ``guide``'s weaker agents for autoguidance (``sampler.guide``: "N", "DIR" or "DIR@N").

    Raises:
      MissingInputError: no checkpoint (or not the step asked for).
      ShippedFileError: a shipped run's file is missing or damaged.
      ConfigError: a run whose record is not one this version can sample.
    """
    config = run_config(run_dir, checkpoint_step)
    config.sampler.use_ema, config.sampler.guide = use_ema, guide
    return Federation(sample_lib.load_federation(config, os.fspath(run_dir)), os.fspath(run_dir))


class Federation:
    """Trained agents and the settings that sample them (``load``).

    ``sample`` draws images with the run's sampling settings, any of which a keyword argument
    overrides; samplers are built once per setting and kept, so a second call with the same
    settings (or another number of steps) compiles nothing.
    """

    def __init__(self, restored: sample_lib.Restored, run_dir: str):
        self.restored, self.run_dir = restored, run_dir
        self._samplers: dict[Any, federated_sampler.FederatedSampler] = {}

    @property
    def num_agents(self) -> int:
        """K."""
        return self.restored.num_agents

    @property
    def counts(self) -> np.ndarray | None:
        """The partition's count matrix n[agent, class] (None for a run that has none)."""
        return self.restored.counts

    @property
    def step(self) -> int:
        """The checkpoint step the agents were restored from."""
        return self.restored.step

    @property
    def settings(self) -> dict:
        """The sampling settings ``sample`` uses by default (the config's ``sampler`` section and
        its aggregator's name)."""
        cfg = self.restored.config
        return dict(cfg.sampler.to_dict(), aggregator=cfg.aggregator.name)

    def __repr__(self) -> str:
        cfg = self.restored.config
        return (
            f"Federation({self.run_dir!r}: {cfg.partition.name}, {self.num_agents} agents, "
            f"step {self.step})"
        )

    def config_with(
        self, aggregator: str | aggregators.Aggregator | Callable | None = None, **settings
    ) -> tuple[ml_collections.ConfigDict, aggregators.Aggregator | Callable | None]:
        """(the sampling config with ``settings``, fields of its ``sampler`` section, and
        ``aggregator``: a procedure by name, ``label_prior:top_k=1``, checked; the member when
        ``aggregator`` is an ``Aggregator`` or a function, else None).

        Raises:
          ConfigError: an unknown setting or procedure, a value of the wrong type or out of
            range (the field named, with what is valid).
        """
        cfg = ml_collections.ConfigDict(self.restored.config.to_dict())
        for key, value in settings.items():
            if key in _LOAD_FIELDS:
                raise errors.ConfigError(
                    f"sampler.{key} is chosen when the agents are loaded: "
                    f"fedinf_jax.load(run_dir, {key}=...)"
                )
            if key not in cfg.sampler:
                raise errors.ConfigError(
                    f"no sampler setting {key!r}; valid: "
                    f"{sorted(set(cfg.sampler) - set(_LOAD_FIELDS))} and aggregator"
                )
            _set_checked(cfg.sampler, key, value)
        member = None
        if isinstance(aggregator, str):
            with errors.as_config_error():
                cfg = sample_lib.with_procedure(cfg, aggregator)
        elif aggregator is not None:
            try:
                aggregators.as_aggregator(aggregator)  # checked; kept as given, the sampler's key
            except TypeError as err:
                raise errors.ConfigError(f"aggregator: {err}") from None
            member = aggregator
            cfg.aggregator.name = _member_name(aggregator)
        sample_lib.check_sampling(cfg, self.restored.components, self.counts, member)
        return cfg, member

    def sampler(
        self, aggregator: str | aggregators.Aggregator | Callable | None = None, **settings
    ) -> tuple[ml_collections.ConfigDict, federated_sampler.FederatedSampler]:
        """(config, sampler) for ``config_with(aggregator, **settings)``: the sampler built once
        per program (a new budget, ``solvers.BUDGET_FIELDS``, shares the compiled solve)."""
        cfg, member = self.config_with(aggregator, **settings)
        spec = solvers.SolverSpec.from_config(cfg.sampler, self.restored.components.sde)
        program = {k: v for k, v in cfg.sampler.to_dict().items() if k not in _NOT_IN_PROGRAM}
        key = (
            json.dumps(program, sort_keys=True, default=str),
            json.dumps(cfg.aggregator.to_dict(), sort_keys=True, default=str),
            member,
        )
        if key not in self._samplers:
            restored = dataclasses.replace(self.restored, config=cfg)
            self._samplers[key] = sample_lib.build_sampler(restored, spec, member=member)
        budget = {f: getattr(spec, f) for f in solvers.BUDGET_FIELDS}
        return cfg, self._samplers[key].with_budget(**budget)

    def sample(
        self,
        num_per_class: int | None = None,
        *,
        labels: Sequence[int] | np.ndarray | None = None,
        aggregator: str | aggregators.Aggregator | Callable | None = None,
        **settings,
    ) -> SampleSet:
        """Draws images: ``num_per_class`` of every digit (default: the run's
        ``sampler.num_per_class``), or one per entry of ``labels``.

        Args:
          num_per_class: images per digit, grouped by digit.
          labels: the digit of each image instead (int, 0-9).
          aggregator: how the agents' scores are combined: a member's name with its settings
            (``"label_prior:top_k=1"``, ``"mean:guidance=1"``), an ``Aggregator``, or a plain
            function of the agents' scores (``aggregators.from_function``: the aggregate score,
            or the agents' weights); guided like a named member. Default: the run's.
          **settings: any field of the sampler's config section (configs/base.py documents
            each): ``num_steps``, ``solver``, ``method``, ``schedule``, ``guidance``,
            ``guidance_interval``, ``seed``, ``batch_size``, ``t_end``, ``save_trajectory``, ...

        Returns:
          The ``SampleSet``: uint8 images, labels, record.

        Raises:
          ConfigError: an unknown or invalid setting, named with what is valid.
          NonFiniteScoreError: an agent's score became non-finite (names the agent and t).
        """
        if num_per_class is not None:
            settings["num_per_class"] = num_per_class
        cfg, sampler = self.sampler(aggregator, **settings)
        if labels is None:
            labels = sample_lib.class_labels(cfg.sampler.num_per_class, cfg.model.num_classes)
        labels = _checked_labels(labels, cfg.model.num_classes)
        restored = self.restored
        _log_plan(restored, cfg, sampler, len(labels))
        start = time.time()
        drawn = sample_lib.sample_in_batches(
            sampler,
            restored.sampler_params,
            labels,
            cfg.sampler.batch_size,
            cfg.sampler.seed,
            restored.agent_mesh,
        )
        wall = time.time() - start
        centered = cfg.data.centered
        arrays = {f"batch_{k}": v for k, v in drawn.per_batch.items()}
        arrays["trajectory_t"] = drawn.trajectory_t
        arrays["trajectory"] = (
            None
            if drawn.trajectory is None
            else federated_sampler.to_uint8(drawn.trajectory, centered)
        )
        for name in ("weights", "trajectory_weights"):
            value = getattr(drawn, name)
            arrays[name] = None if value is None else value.astype(np.float32)
        stats = _stats(restored, cfg, sampler, drawn.per_batch, len(labels), wall)
        inputs = sample_lib.sample_set_inputs(cfg, stats["checkpoint_step"])
        record = {
            "config": json.loads(cfg.to_json_best_effort()),
            "stats": stats,
            provenance.RECORD_KEY: provenance.record(inputs),
        }
        images = federated_sampler.to_uint8(drawn.images, centered)
        logging.info("%d images in %.1f s (%s)", len(labels), wall, stats)
        arrays = {k: v for k, v in arrays.items() if v is not None}
        return SampleSet(images, labels, record, arrays)

    def evaluate(
        self,
        samples: SampleSet,
        classifier_dir: str | os.PathLike | None = None,
        mnist: digits.Mnist | None = None,
    ) -> dict:
        """``samples`` measured with the evaluation classifier in ``classifier_dir`` (default:
        the ``classifier`` shipped beside a shipped run): label accuracy, Inception Score and
        noise rate, and the pixels' background speckle and black share; with ``mnist`` (e.g.
        ``fedinf_jax.data.digits.load_mnist()``) every metric against its test digits too (FID,
        precision, recall, grey-level distance: ``sample_sets.evaluate_sample_set``).

        Raises:
          MissingInputError: no classifier given and none shipped beside the run.
        """
        classifier_dir = classifier_dir or self._shipped_classifier()
        clf = sample_sets.require_classifier(os.fspath(classifier_dir))
        if mnist is not None:
            real = sample_sets.real_test_digits(clf, os.fspath(classifier_dir), mnist)
            return sample_sets.evaluate_sample_set(clf, real, samples.images, samples.labels)
        _, probs = clf.features_and_probs(samples.images)
        return {
            **sample_sets.softmax_metrics(probs, samples.labels),
            "background_speckle": metrics.background_speckle(samples.images),
            "black_share": metrics.black_share(samples.images),
        }

    def _shipped_classifier(self) -> str:
        sibling = os.path.join(os.path.dirname(os.path.abspath(self.run_dir)), "classifier")
        if not pretrained.is_shipped(self.run_dir) or not pretrained.is_shipped(sibling):
            raise errors.MissingInputError(
                f"no classifier shipped beside {self.run_dir}: give classifier_dir, the "
                "classifier/ folder of a reproduce.py run or pretrained/<preset>/classifier"
            )
        return sibling


# Sampler fields that choose which parameters are restored: ``load``'s arguments.
_LOAD_FIELDS = ("use_ema", "checkpoint_step", "guide")

# Sampler fields that do not change the compiled solve: the budget (an input of the solve),
# the images asked for, their batching (a new batch shape is traced by jit itself) and the
# checkpoint step (fixed at loading). Not ``progress``: its bar is host callbacks in the solve.
_NOT_IN_PROGRAM = (
    *solvers.BUDGET_FIELDS,
    "batch_size",
    "checkpoint_step",
    "seed",
    "num_per_class",
)


def _set_checked(section: ml_collections.ConfigDict, key: str, value) -> None:
    """``section[key] = value`` refusing a value of another type than the field's (an integer
    for a float field is a float)."""
    current = section[key]
    kinds = {bool: (bool, np.bool_), int: (numbers.Integral,), float: (numbers.Real,)}
    kind = type(current)
    ok = isinstance(value, kinds.get(kind, (kind,)))
    if kind in (int, float) and isinstance(value, bool | np.bool_):
        ok = False
    if isinstance(current, tuple | list) and isinstance(value, tuple | list):
        value, ok = tuple(value), True
    elif ok and kind in kinds:
        value = kind(value)
    if not ok or isinstance(current, ml_collections.ConfigDict):
        raise errors.ConfigError(
            f"sampler.{key} = {value!r} is of type {type(value).__name__}; the field takes "
            f"{type(current).__name__} values (default {current!r})"
        )
    section[key] = value


def _member_name(member) -> str:
    """The name a sample set's record gives an aggregator passed as an object or function."""
    name = getattr(member, "__qualname__", None) or type(member).__name__
    return f"custom:{getattr(member, '__module__', '') or ''}.{name}".replace(":.", ":")


def _checked_labels(labels, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise errors.ConfigError(
            f"labels: a non-empty sequence of digits, got {labels.dtype} {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise errors.ConfigError(
            f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}"
        )
    return labels.astype(np.int32)


def _log_plan(restored, cfg, sampler: federated_sampler.FederatedSampler, num_images: int):
    logging.info(
        "sampling %d images from %d agents (checkpoint step %d): %s %s, %s steps, aggregator %s, "
        "agent-axis strategy %s",
        num_images,
        restored.num_agents,
        restored.step,
        cfg.sampler.method,
        cfg.sampler.solver,
        "adaptive" if cfg.sampler.adaptive else f"{cfg.sampler.num_steps} {sampler.spec.schedule}",
        cfg.aggregator.name,
        restored.components.score_strategy,
    )


def _stats(restored, cfg, sampler, per_batch: dict, num_images: int, wall: float) -> dict:
    """samples.json's statistics of a sampling run."""
    evaluations = int(per_batch["score_evaluations"].sum())
    guided = cfg.sampler.get("guidance", 1.0) != 1
    return {
        "num_images": num_images,
        "num_agents": restored.num_agents,
        "checkpoint_step": restored.step,
        "score_evaluations": evaluations,
        # Each evaluation asks each sample's agents (every agent, or the ones a sparse member
        # dispatches) once, twice under guidance (the null label or the guide too).
        "network_evaluations": evaluations
        * sampler.agents_asked(restored.num_agents)
        * (2 if guided else 1),
        "steps": int(per_batch["num_steps"].sum()),
        "accepted_steps": int(per_batch["num_accepted_steps"].sum()),
        "rejected_steps": int(per_batch["num_rejected_steps"].sum()),
        "batches": len(per_batch["num_steps"]),
        "wall_time_s": round(wall, 3),
        "images_per_s": round(num_images / wall, 4),
        "backend": jax.default_backend(),
    }


def default_outdir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """``workdir/samples/<method>_<solver>_<aggregator>`` (``paper_sampler`` for the paper's
    procedure); for a shipped run, under ``pretrained.output_root`` instead of ``workdir``."""
    s = config.sampler
    name = config.get("modifiers") or f"{s.method}_{s.solver}_{config.aggregator.name}"
    return os.path.join(pretrained.output_root(workdir), "samples", name)


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    outdir: str | None = None,
    overrides: dict | None = None,
) -> str:
    """``sample.py``: samples ``sampler.num_per_class`` images of every digit from
    ``workdir``'s federation with ``config`` and writes them (``SampleSet.save``).

    ``overrides``: the settings given on the command line (``load_federation`` refuses those
    that contradict the trained run).

    Returns:
      The output folder (see the module docstring for its files).

    Raises:
      MissingInputError: no checkpoint in ``workdir``.
      ConfigError: an invalid setting, or one that contradicts the trained run.
      FloatingPointError: an agent's score became non-finite (names the agent and t).
    """
    federation = Federation(sample_lib.load_federation(config, workdir, overrides), workdir)
    samples = federation.sample()
    outdir = outdir or default_outdir(federation.restored.config, workdir)
    if jax.process_index() == 0:  # every process holds the samples; one writes them
        samples.save(outdir)
    logging.info("wrote %s", outdir)
    return outdir
