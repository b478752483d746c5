"""The paper's experiment, end to end and resumable (``reproduce.py``).

Stages, each skipped when its output exists and was made from the same inputs (``provenance``;
a rerun redoes only what is missing, and refuses, before any work, to reuse an output made with
other settings unless told to ``recompute`` it):

1. ``classifier/``: the evaluation classifier (``configs/classifier.py``), trained once;
2. ``<regime>/``: the regime's agents (``train.py``'s trainer; resumes an interrupted run);
3. ``<regime>/samples/<procedure>/``: ``eval_per_class`` samples per digit under each procedure:
   ``paper`` (uniform mean, stop at t = 0.05, no denoising) and the corrected sampler with each
   aggregator; procedure by procedure, each across the regimes;
4. ``<regime>/claims/<procedure>/``: ``claim_per_class`` samples per digit (0: none) of the sets a
   result rests on: the control's ``mean`` and each federated regime's best corrected procedure
   by the stage-3 accuracy (ties: lower noise rate), drawn afresh (seed + 1) so that the set that
   chose the winner does not also score it;
5. ``metrics.json``: IS, FID, label accuracy, noise rate, precision/recall of every sample set
   (and of as many real training images, the reference) against the MNIST test set, in the
   classifier's feature space;
6. ``agreement.json``: the paper's Tables 3/4 (magnitude and cosine agreement of the agents'
   scores) per regime;
7. ``report.md``: Table 1, the claim sets, the communication each set would need
   (``evaluation/communication.py``), the Figure 2 grids, Tables 3/4, the heterogeneity sweep and
   the wall times (``timings.json``).

With ``sweep.partitions`` (``reproduce.py:PRESET,sweep``), the heterogeneity sweep's federations
(``sweep_runs``: one per partition and seed, ``sweep_<partition>_seed<seed>/``) go through
stages 2-3 like the regimes, under ``sweep.procedures``; ``sweep.json`` and ``sweep.png`` hold
the mean and standard error over the seeds (``sweep_summary``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import ml_collections
import numpy as np
from absl import logging

from fedinf_jax.agents import pretrained, runs
from fedinf_jax.core import errors, files, provenance
from fedinf_jax.core.registry import check_choice
from fedinf_jax.data import digits, partitions
from fedinf_jax.evaluation import agreement, classifier, communication, report, sample_sets
from fedinf_jax.sampling import aggregators
from fedinf_jax.workflows import federation, plots, sample_lib, train_lib

SINGLE_AGENT_PROCEDURES = ("paper", "mean")


def procedures_for(regime_config: ml_collections.ConfigDict, procedures) -> list[str]:
    """With one agent every aggregator is that agent: only the paper's and the corrected mean
    (with its settings, ``mean:guidance=2``)."""
    if regime_config.partition.num_agents == 1:
        return [p for p in procedures if p.partition(":")[0] in SINGLE_AGENT_PROCEDURES]
    return list(procedures)


def parse_procedure(procedure: str) -> tuple[str, dict]:
    """A procedure's aggregator and settings: ``paper`` (no settings) or a member with its
    settings (``sample_lib.parse_procedure``: ``label_prior:top_k=1``, ``mean:guidance=2``)."""
    check_choice("procedure", procedure.partition(":")[0], ("paper", *aggregators.AGGREGATORS))
    if procedure == "paper":
        return "paper", {}
    return sample_lib.parse_procedure(procedure)


SWEEP_PREFIX = "sweep_"


def sweep_runs(config) -> dict[str, ml_collections.ConfigDict]:
    """The heterogeneity sweep's federations (``config.sweep``), as extra regimes: for each
    partition spec (``dirichlet:alpha=0.1``, ``pathological:classes_per_agent=1``, ``control``,
    ``heterogeneous:num_agents=20``) and seed, the heterogeneous run config with that partition,
    ``sweep.num_agents`` agents unless the spec sets them (one for ``control``) and the seed as
    both partition and training seed. Named
    ``sweep_<spec>_seed<seed>``; empty without ``sweep.partitions``.

    Raises:
      ValueError: an unknown partition or a setting that is not one of its parameters.
    """
    return {name: _sweep_run(config, *at) for name, at in _sweep_names(config).items()}


def _sweep_names(config) -> dict[str, tuple[str, int]]:
    """The sweep's federations by name: (partition spec, seed), without building their configs."""
    sweep = config.get("sweep")
    if not sweep or not sweep.partitions:
        return {}
    return {
        f"{SWEEP_PREFIX}{spec}_seed{seed}": (spec, int(seed))
        for spec in sweep.partitions
        for seed in sweep.seeds
    }


def _sweep_run(config, spec: str, seed: int) -> ml_collections.ConfigDict:
    """One federation of ``sweep_runs``."""

    name, settings = partitions.PARTITIONS.parse(spec)
    if "seed" in settings:
        raise ValueError(f"sweep partition {spec!r}: its seeds are sweep.seeds, not a setting")
    cfg = ml_collections.ConfigDict(config.runs.heterogeneous.to_dict())
    cfg.partition.name = name
    cfg.partition.num_agents = 1 if name == "control" else config.sweep.num_agents
    for key, value in settings.items():
        cfg.partition[key] = value
    cfg.partition.seed = cfg.seed = seed
    aggregators.fit_to_agents(cfg.aggregator, cfg.partition.num_agents)
    return cfg


def all_regimes(config) -> list[str]:
    """The reproduction's regimes, then the sweep's federations."""
    return [*config.regimes, *_sweep_names(config)]


def regime_procedures(config, regime: str) -> list[str]:
    """The procedures sampled for ``regime``: ``config.procedures`` for the paper's regimes,
    ``sweep.procedures`` for the sweep's; one agent's: only the paper's and the mean."""
    sweep = regime.startswith(SWEEP_PREFIX)
    return procedures_for(
        regime_config(config, regime), config.sweep.procedures if sweep else config.procedures
    )


def regime_config(config, regime: str, procedure: str | None = None) -> ml_collections.ConfigDict:
    """The regime's run config (``config.runs.<regime>``); with a procedure, its sampler and
    aggregator set: ``paper``, the paper's sampler (``config.paper_sampler``) with the uniform
    mean; an aggregator's name (with settings, ``parse_procedure``), the corrected sampler
    (``config.sampler``) with it."""
    swept = _sweep_names(config) if regime.startswith(SWEEP_PREFIX) else {}
    check_choice("regime", regime, [*config.runs, *swept])
    paper = procedure == "paper"
    run = _sweep_run(config, *swept[regime]) if regime in swept else config.runs[regime]
    cfg = ml_collections.ConfigDict(run.to_dict())
    cfg.data.update(config.data.to_dict())
    if paper:
        cfg.modifiers = "paper_sampler"
        cfg.sampler.update(config.paper_sampler.to_dict())
        cfg.aggregator.name = "mean"
    elif procedure is not None:
        parse_procedure(procedure)  # "paper" among the valid names of an unknown one
        cfg.sampler.update(config.sampler.to_dict())
        cfg = sample_lib.with_procedure(cfg, procedure)
        if cfg.aggregator.name in config.get("trajectory_procedures", ()):  # under any settings
            cfg.sampler.save_trajectory = config.trajectory_times
    cfg.sampler.num_per_class = config.eval_per_class
    cfg.sampler.seed = config.seed
    return cfg


def claim_config(config, regime: str, procedure: str) -> ml_collections.ConfigDict:
    """A claim set's config: the procedure's, at ``claim_per_class`` per digit on fresh draws."""
    cfg = regime_config(config, regime, procedure)
    cfg.sampler.num_per_class = config.claim_per_class
    cfg.sampler.seed = config.seed + 1
    cfg.sampler.save_trajectory = 0
    return cfg


def claim_procedures(config, results: dict) -> dict[str, str]:
    """Regime -> the procedure its claim rests on: ``mean`` for one agent, else the corrected
    procedure with the highest accuracy in ``results`` (ties: the lower noise rate)."""
    chosen = {}
    for regime in config.regimes:
        rows = [r for r in results.values() if r["regime"] == regime and r["procedure"] != "paper"]
        if not rows:
            continue
        if regime_config(config, regime).partition.num_agents == 1:
            chosen[regime] = "mean"
        else:
            best = max(rows, key=lambda r: (r["accuracy"], -r["noise_rate"]))
            chosen[regime] = best["procedure"]
    return chosen


class Timings:
    """Wall time per stage, kept in ``timings.json`` across reruns (a skipped stage keeps the
    time it took when it ran). A stage interrupted (Ctrl-C, ``kill``, an error) keeps the time
    it had run under ``"<name> (interrupted)"``, which its completion adds to its own."""

    def __init__(self, path: str):
        self.path = path
        self.record = files.read_json(path) if os.path.exists(path) else {}

    def run(self, name: str, fn: Callable[[], object]):
        logging.info("stage %s: running", name)
        partial = f"{name} (interrupted)"
        start = time.time()
        try:
            out = fn()
        except BaseException:
            self.record[partial] = round(self.record.get(partial, 0.0) + time.time() - start, 1)
            files.write_json(self.path, self.record)
            raise
        self.record[name] = round(self.record.pop(partial, 0.0) + time.time() - start, 1)
        files.write_json(self.path, self.record)
        logging.info("stage %s: done in %.1f s", name, self.record[name])
        return out

    @staticmethod
    def reuse(name: str, path: str) -> None:
        logging.info("stage %s: reused (%s)", name, path)


def run_dir(config, outdir: str, regime: str) -> str:
    """Where a regime's agents are: ``outdir/<regime>``, trained there, or with
    ``config.pretrained`` the shipped run ``<pretrained>/<regime>``."""
    return os.path.join(config.get("pretrained") or outdir, regime)


def classifier_dir(config, outdir: str) -> str:
    """Where the evaluation classifier is: ``outdir/classifier`` or the shipped one."""
    return run_dir(config, outdir, "classifier")


def check_pretrained(config) -> None:
    """With ``config.pretrained``: every regime and the classifier are shipped runs there, intact
    (``pretrained.verify``). ``check_outputs`` then checks them against the config.

    Raises:
      MissingInputError: a regime (or the classifier) that is not shipped there.
      ShippedFileError: a shipped file is missing or damaged.
    """
    folder = config.get("pretrained")
    if not folder:
        return
    for name in [*all_regimes(config), "classifier"]:
        where = os.path.join(folder, name)
        if not pretrained.is_shipped(where):
            shipped = (
                sorted(
                    n for n in os.listdir(folder) if pretrained.is_shipped(os.path.join(folder, n))
                )
                if os.path.isdir(folder)
                else []
            )
            raise errors.MissingInputError(
                f"pretrained = {folder!r} ships no run {name!r} ({where} has no "
                f"{pretrained.MANIFEST}); shipped there: {shipped}"
            )
        pretrained.verify(where)


def _sample_dir(outdir: str, regime: str, procedure: str, kind: str = "samples") -> str:
    return os.path.join(outdir, regime, kind, procedure)


def agreement_rows(config, regime: str, workdir: str, mnist: digits.Mnist) -> list[dict]:
    """The paper's Tables 3/4 for one regime: with its uniform mean (eq. 10) and each other
    aggregator in ``config.agreement_aggregators`` (one agent: the mean only, all are the agent)."""
    federation = sample_lib.load_federation(regime_config(config, regime, "mean"), workdir)
    comp = federation.components
    names = ["mean"]
    if federation.num_agents > 1:
        names += [n for n in config.get("agreement_aggregators", ()) if n != "mean"]
    members = {}
    for name in names:
        agg_config = federation.config.aggregator.copy_and_resolve_references()
        agg_config.name = name
        members[name] = aggregators.from_config(
            agg_config, federation.counts, federation.num_agents, comp.sde
        )
    lifted = sample_lib.agent_score_fn(comp, agent_mesh=federation.agent_mesh)
    s = config.agreement_samples
    rng = np.random.default_rng(config.seed)
    noise = rng.normal(size=(s, *digits.IMAGE_SHAPE)).astype(np.float32)
    images = [
        digits.to_model_input(
            mnist.train_images[rng.choice(np.flatnonzero(mnist.train_labels == c), s, False)]
        )
        for c in range(digits.NUM_CLASSES)
    ]
    rows = agreement.agreement_table(
        lifted, federation.params, members, noise, images, config.agreement_times
    )
    return [dict(r, regime=regime) for r in rows]


def agreement_inputs(config) -> dict:
    """What determines ``agreement.json``: each regime's run (``runs.run_digest``) and step,
    the points and times, the seed, and the aggregators with their settings."""
    inputs = provenance.config_fields(
        config, ("agreement_samples", "agreement_times", "agreement_aggregators", "seed")
    )
    for regime in config.regimes:
        cfg = regime_config(config, regime, "mean")
        inputs[f"{regime}.run"] = runs.run_digest(cfg)
        inputs[f"{regime}.checkpoint_step"] = cfg.train.num_steps
        for name in config.agreement_aggregators:
            member = cfg.aggregator.get(name, None)
            inputs.update(
                provenance.flatten({f"{regime}.{name}": member.to_dict() if member else {}})
            )
    return inputs


def _set_inputs(cfg: ml_collections.ConfigDict) -> dict:
    """A pipeline sample set's inputs: ``sample_lib.sample_set_inputs`` at the step the regime
    is trained to (the latest, unless the sampler names one)."""
    step = cfg.sampler.checkpoint_step
    return sample_lib.sample_set_inputs(cfg, step if step >= 0 else cfg.train.num_steps)


def _reusable_set(sample_dir: str, stage: str, cfg, recompute: bool) -> bool:
    """Whether the sample set in ``sample_dir`` exists and was made from ``cfg``'s inputs
    (``provenance.check_reuse``: an error if it was not, unless ``recompute``)."""
    npz, meta = (os.path.join(sample_dir, f"samples.{ext}") for ext in ("npz", "json"))
    if not (os.path.exists(npz) and os.path.exists(meta)):
        return False
    stored = provenance.stored_inputs(files.read_json(meta))
    return provenance.check_reuse(stage, sample_dir, stored, _set_inputs(cfg), recompute)


def _reusable_agreement(path: str, config, recompute: bool) -> bool:
    if not os.path.exists(path):
        return False
    stored = files.read_json(path)
    stored = provenance.stored_inputs(stored) if isinstance(stored, dict) else None
    return provenance.check_reuse("agreement", path, stored, agreement_inputs(config), recompute)


def check_outputs(config, outdir: str, recompute: bool = False) -> None:
    """Checks, before any work, that every output already in ``outdir`` was made from the
    inputs this run would use: the classifier, each regime's trained run
    (``train_lib.check_workdir``), the sample and claim sets there, and the agreement tables.

    Raises:
      StaleOutputError: an output made with other settings, without ``recompute``.
      CheckpointMismatchError: a regime's run trained with other settings (never recomputed in
        place: it would discard the run's checkpoints).
    """
    check_pretrained(config)
    shipped = bool(config.get("pretrained"))
    # A shipped run is never recomputed: one made with other settings is an error.
    clf_dir = classifier_dir(config, outdir)
    classifier.check_reuse(classifier_config(config), clf_dir, recompute and not shipped)
    for regime in all_regimes(config):
        cfg, workdir = regime_config(config, regime), run_dir(config, outdir, regime)
        step = train_lib.check_workdir(cfg, workdir)
        if shipped and step != cfg.train.num_steps:
            raise errors.ConfigError(
                f"the shipped run {workdir} is trained to step {step}, "
                f"the config asks for train.num_steps = {cfg.train.num_steps}"
            )
        for kind, make_config in (("samples", regime_config), ("claims", claim_config)):
            folder = os.path.join(outdir, regime, kind)
            names = os.listdir(folder) if os.path.isdir(folder) else []
            for procedure in regime_procedures(config, regime):
                if procedure in names:
                    stage = f"{_stage_kind(kind)}/{regime}/{procedure}"
                    cfg = make_config(config, regime, procedure)
                    _reusable_set(os.path.join(folder, procedure), stage, cfg, recompute)
    _reusable_agreement(os.path.join(outdir, "agreement.json"), config, recompute)


def _stage_kind(kind: str) -> str:
    return "sample" if kind == "samples" else "claim"


def classifier_config(config) -> ml_collections.ConfigDict:
    """The evaluation classifier's config (``config.classifier``) with the reproduction's data."""
    clf_cfg = ml_collections.ConfigDict(config.classifier.to_dict())
    clf_cfg.data.update(config.data.to_dict())
    return clf_cfg


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks every regime's config under every procedure it will sample (``sample_lib``'s
    ``check_config``), before anything is trained or written.

    Raises:
      ConfigError: an unknown regime or procedure, or an invalid setting (named with the regime
        and procedure).
    """
    with errors.as_config_error("sweep: "):
        sweep_runs(config)  # every partition spec, checked once
    regimes = all_regimes(config)
    for regime in regimes:
        with errors.as_config_error():
            procedures = regime_procedures(config, regime)
        for procedure in procedures:
            with errors.as_config_error(f"{regime}/{procedure}: "):
                cfg = regime_config(config, regime, procedure)
                sample_lib.check_config(cfg)


def run(config: ml_collections.ConfigDict, outdir: str, recompute: bool = False) -> str:
    """Runs every missing stage (``STAGES``) under ``outdir`` and writes ``report.md``; returns
    its path. An output already there is reused when it was made from the same inputs
    (``provenance``); one made with other settings stops the run before any work, or with
    ``recompute`` is made again (and replaced once complete).

    Raises:
      ConfigError: an invalid setting (``check_config``), before anything is written.
      StaleOutputError, CheckpointMismatchError: ``check_outputs``, before any work.
    """
    check_config(config)
    check_outputs(config, outdir, recompute)
    os.makedirs(outdir, exist_ok=True)
    reproduction = Reproduction(config, outdir, recompute)
    for stage in STAGES:
        stage.fn(reproduction)
    return os.path.join(outdir, "report.md")


class Reproduction:
    """One run of the stages under ``outdir``: what they share (the config, MNIST, the wall
    times) and what each leaves for the next (the classifier and its test features, the sets'
    metrics, the reference, the claims, the sweep)."""

    def __init__(self, config: ml_collections.ConfigDict, outdir: str, recompute: bool):
        self.config, self.outdir, self.recompute = config, outdir, recompute
        self.timings = Timings(os.path.join(outdir, "timings.json"))
        self.mnist = digits.load_mnist(config.data.mnist_dir, config.data.tfds_data_dir)
        self.clf, self.real, self.reference = None, None, None
        self.results, self.claims, self.sweep = {}, {}, None

    def cached(self, stage: str, path: str, reusable: bool, make: Callable[[], object]):
        """``make()`` timed as ``stage``, unless the output at ``path`` is ``reusable``."""
        if reusable:
            self.timings.reuse(stage, path)
            return None
        return self.timings.run(stage, make)

    def sample_set(self, kind: str, regime: str, procedure: str, make_config) -> dict:
        """One sample set, sampled unless it exists from the same inputs, and its metrics."""
        stage = f"{_stage_kind(kind)}/{regime}/{procedure}"
        sample_dir = _sample_dir(self.outdir, regime, procedure, kind)
        cfg = make_config(self.config, regime, procedure)
        workdir = run_dir(self.config, self.outdir, regime)
        self.cached(
            stage,
            sample_dir,
            _reusable_set(sample_dir, stage, cfg, self.recompute),
            lambda: federation.run(cfg, workdir, sample_dir),
        )
        measured = sample_sets.evaluate_sample_dir(self.clf, self.real, sample_dir)
        return dict(measured, regime=regime, procedure=procedure)


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage of the reproduction: its ``name``, what it ``makes`` under the outdir, and the
    function that makes it (reusing what exists from the same inputs)."""

    name: str
    makes: str
    fn: Callable[[Reproduction], None]


def _classifier_stage(r: Reproduction) -> None:
    clf_dir, clf_cfg = classifier_dir(r.config, r.outdir), classifier_config(r.config)
    reusable = classifier.check_reuse(clf_cfg, clf_dir, r.recompute)
    trained = r.cached(
        "classifier",
        clf_dir,
        reusable,
        lambda: classifier.train_classifier(clf_cfg, clf_dir, r.recompute),
    )
    # A reused one restored, its accuracy checked.
    r.clf = trained or classifier.train_classifier(clf_cfg, clf_dir)
    r.real = sample_sets.real_test_digits(r.clf, clf_dir, r.mnist)


def _train_stage(r: Reproduction) -> None:
    for regime in all_regimes(r.config):
        cfg, workdir = regime_config(r.config, regime), run_dir(r.config, r.outdir, regime)
        trained = (train_lib.check_workdir(cfg, workdir) or 0) >= cfg.train.num_steps
        make = lambda c=cfg, w=workdir: train_lib.train(c, w)  # noqa: E731
        r.cached(f"train/{regime}", workdir, trained, make)


def _samples_stage(r: Reproduction) -> None:
    # Procedure by procedure (each across the regimes), so that an interrupted run has the
    # comparisons that matter most (the order of config.procedures) for every regime first.
    regimes = all_regimes(r.config)
    procedures = dict.fromkeys(
        [*r.config.procedures, *r.config.get("sweep", {}).get("procedures", ())]
    )
    procedures_of = {regime: regime_procedures(r.config, regime) for regime in regimes}
    results = {
        f"{regime}/{procedure}": r.sample_set("samples", regime, procedure, regime_config)
        for procedure in procedures
        for regime in regimes
        if procedure in procedures_of[regime]
    }
    order = {regime: i for i, regime in enumerate(regimes)}
    r.results = dict(sorted(results.items(), key=lambda kv: order[kv[1]["regime"]]))


def _claims_stage(r: Reproduction) -> None:
    if r.config.claim_per_class > 0:
        r.claims = {
            f"{regime}/{procedure}": r.sample_set("claims", regime, procedure, claim_config)
            for regime, procedure in claim_procedures(r.config, r.results).items()
        }


def _metrics_stage(r: Reproduction) -> None:
    reference_images = sample_sets.reference_set(r.mnist, r.config.eval_per_class, r.config.seed)
    r.reference = sample_sets.evaluate_sample_set(r.clf, r.real, *reference_images)
    files.write_json(
        os.path.join(r.outdir, "metrics.json"),
        {
            "classifier_test_accuracy": r.clf.test_accuracy,
            "reference_mnist_train": r.reference,
            "results": r.results,
            "claims": r.claims,
        },
    )


def _agreement_stage(r: Reproduction) -> None:
    path = os.path.join(r.outdir, "agreement.json")
    if _reusable_agreement(path, r.config, r.recompute):
        r.timings.reuse("agreement", path)
        return
    rows = []
    for regime in r.config.regimes:
        workdir = run_dir(r.config, r.outdir, regime)
        rows += r.timings.run(
            f"agreement/{regime}",
            lambda g=regime, w=workdir: agreement_rows(r.config, g, w, r.mnist),
        )
    made_by = provenance.record(agreement_inputs(r.config))
    files.write_json(path, {provenance.RECORD_KEY: made_by, "rows": rows})


def _sweep_stage(r: Reproduction) -> None:
    swept = {k: s for k, s in r.results.items() if s["regime"].startswith(SWEEP_PREFIX)}
    r.results = {k: s for k, s in r.results.items() if k not in swept}
    if swept:
        r.sweep = sweep_summary(r.config, swept)
        plots.plot_sweep(r.sweep, os.path.join(r.outdir, "sweep.png"), r.config.sweep.title)
        files.write_json(os.path.join(r.outdir, "sweep.json"), r.sweep)


def _report_stage(r: Reproduction) -> None:
    config, outdir = r.config, r.outdir
    weights = []  # the density-weighted sets' weights.png, relative to the report
    for s in r.results.values():
        png = os.path.join(_sample_dir(outdir, s["regime"], s["procedure"]), "weights.png")
        if os.path.exists(png):
            weights.append(os.path.relpath(png, outdir))
    params_per_agent = {
        regime: runs.count_params(
            train_lib.abstract_train_state(runs.resolve(regime_config(config, regime)), 1).params
        )
        for regime in config.regimes
    }
    traffic = {
        key: communication.of_sample_dir(
            _sample_dir(outdir, s["regime"], s["procedure"]), params_per_agent[s["regime"]]
        )
        for key, s in r.results.items()
    }
    agents = [report.agents_row(regime, regime_config(config, regime)) for regime in config.regimes]
    text = report.render(
        report.ReportData(
            config=config,
            agents=agents,
            classifier_accuracy=r.clf.test_accuracy,
            results=r.results,
            reference=r.reference,
            agreement=files.read_json(os.path.join(outdir, "agreement.json"))["rows"],
            timings=r.timings.record,
            claims=r.claims,
            traffic=traffic,
            weights=weights,
            sweep=r.sweep,
            num_test_images=len(r.mnist.test_images),
        )
    )
    files.write_text(os.path.join(outdir, "report.md"), text)


STAGES = (
    Stage("classifier", "classifier/: the evaluation classifier", _classifier_stage),
    Stage("train", "<regime>/checkpoints/: each regime's agents", _train_stage),
    Stage("samples", "<regime>/samples/<procedure>/: Table 1's sets", _samples_stage),
    Stage("claims", "<regime>/claims/<procedure>/: the claim sets", _claims_stage),
    Stage("metrics", "metrics.json: every set's metrics, real images beside", _metrics_stage),
    Stage("agreement", "agreement.json: Tables 3/4", _agreement_stage),
    Stage("sweep", "sweep.json, sweep.png: the heterogeneity sweep", _sweep_stage),
    Stage("report", "report.md", _report_stage),
)
"""The reproduction's stages, in order."""


SWEEP_METRICS = ("accuracy", "noise_rate", "fid", "speckle", "sampling_wall_time_s")


def sweep_summary(config, results: dict) -> list[dict]:
    """The sweep's sets (``results`` of the ``sweep_runs`` regimes) per (partition, procedure),
    in ``config.sweep`` order: the number of seeds and, of each of ``SWEEP_METRICS``, the mean
    over seeds and its standard error (sample standard deviation / sqrt(seeds); 0 for one seed).
    """
    rows = []
    for spec in config.sweep.partitions:
        for procedure in config.sweep.procedures:
            found = [
                results[key]
                for seed in config.sweep.seeds
                if (key := f"{SWEEP_PREFIX}{spec}_seed{seed}/{procedure}") in results
            ]
            if not found:
                continue
            row = {"partition": spec, "procedure": procedure, "seeds": len(found)}
            for metric in SWEEP_METRICS:
                values = np.array([r[metric] for r in found], np.float64)
                se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
                row[metric], row[f"{metric}_se"] = float(values.mean()), float(se)
            rows.append(row)
    return rows
