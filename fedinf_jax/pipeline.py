"""The paper's experiment, end to end and resumable (``reproduce.py``).

Stages, each skipped when its output exists (a rerun redoes only what is missing):

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
7. ``report.md``: Table 1, the claim sets, the Figure 2 grids, Tables 3/4 and the wall times
   (``timings.json``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from configs import classifier as classifier_config
from configs import control, hetero, homo
from fedinf_jax import aggregators, checkpoint, data, errors, sample_lib, train_lib
from fedinf_jax.evaluation import agreement, classifier, metrics
from fedinf_jax.registry import check_choice

REGIME_FILES = {"control": control, "homogeneous": homo, "heterogeneous": hetero}
SINGLE_AGENT_PROCEDURES = ("paper", "mean")
PRECISION_RECALL_REAL = 2000  # test images in the real manifold for precision/recall


def procedures_for(regime_config: ml_collections.ConfigDict, procedures) -> list[str]:
    """With one agent every aggregator is that agent: only the paper's and the corrected mean."""
    if regime_config.partition.num_agents == 1:
        return [p for p in procedures if p in SINGLE_AGENT_PROCEDURES]
    return list(procedures)


def regime_config(config, regime: str, procedure: str | None = None) -> ml_collections.ConfigDict:
    """The regime's run config; with a procedure, its sampler and aggregator set."""
    check_choice("regime", regime, REGIME_FILES)
    paper = procedure == "paper"
    cfg = REGIME_FILES[regime].get_config(config.preset + (",paper_sampler" if paper else ""))
    cfg.data.update(config.data.to_dict())
    if procedure is not None and not paper:
        check_choice("procedure", procedure, ("paper", *aggregators.AGGREGATORS))
        cfg.sampler.update(config.sampler.to_dict())
        cfg.aggregator.name = procedure
        if procedure in config.get("trajectory_procedures", ()):
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
        self.record = _read_json(path) if os.path.exists(path) else {}

    def run(self, name: str, fn: Callable[[], object]):
        logging.info("stage %s: running", name)
        partial = f"{name} (interrupted)"
        start = time.time()
        try:
            out = fn()
        except BaseException:
            self.record[partial] = round(self.record.get(partial, 0.0) + time.time() - start, 1)
            write_json(self.path, self.record)
            raise
        self.record[name] = round(self.record.pop(partial, 0.0) + time.time() - start, 1)
        write_json(self.path, self.record)
        logging.info("stage %s: done in %.1f s", name, self.record[name])
        return out

    @staticmethod
    def reuse(name: str, path: str) -> None:
        logging.info("stage %s: reused (%s)", name, path)


def _sample_dir(outdir: str, regime: str, procedure: str, kind: str = "samples") -> str:
    return os.path.join(outdir, regime, kind, procedure)


def evaluate_sample_set(
    clf: classifier.TrainedClassifier,
    real_features: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
) -> dict:
    """Every metric of one sample set (uint8 images) against the real test features."""
    feats, probs = clf.features_and_probs(images)
    is_mean, is_std = metrics.inception_score(probs, splits=min(10, len(images)))
    accuracy, per_class = metrics.label_accuracy(probs, labels)
    rng = np.random.default_rng(0)
    real = real_features[rng.choice(len(real_features), PRECISION_RECALL_REAL, replace=False)]
    precision, recall = metrics.precision_recall(real, feats, k=3)
    return {
        "num_samples": len(images),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "fid": metrics.fid(feats, real_features),
        "accuracy": accuracy,
        "accuracy_per_digit": [None if np.isnan(a) else float(a) for a in per_class],
        "noise_rate": metrics.noise_rate(probs),
        "precision": precision,
        "recall": recall,
    }


def check_sample_dir(sample_dir: str) -> tuple[str, str]:
    """The paths of a sample set's ``samples.npz`` and ``samples.json``; an error if missing."""
    npz, meta = (os.path.join(sample_dir, f"samples.{ext}") for ext in ("npz", "json"))
    missing = [p for p in (npz, meta) if not os.path.exists(p)]
    if missing:
        raise errors.MissingInputError(
            f"{sample_dir!r} is not a sample set: {', '.join(missing)} missing (a sample set is "
            "the --outdir of sample.py or <regime>/samples/<procedure> of reproduce.py)"
        )
    return npz, meta


def evaluate_sample_dir(
    clf: classifier.TrainedClassifier, real_features: np.ndarray, sample_dir: str
) -> dict:
    """Every metric of a sample set written by ``sample.py`` or a pipeline stage (its
    ``samples.npz`` and ``samples.json``), with the sampler's wall time and score evaluations."""
    npz, meta = check_sample_dir(sample_dir)
    with np.load(npz) as f:
        images, labels = f["images"], f["labels"]
    stats = _read_json(meta)["stats"]
    return dict(
        evaluate_sample_set(clf, real_features, images, labels),
        sampling_wall_time_s=stats["wall_time_s"],
        score_evaluations=stats["score_evaluations"],
    )


def reference_set(mnist: data.Mnist, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` MNIST training images of each digit (none of them in FID's test-set
    reference): real data, measured like a sample set of the same size, show each metric's value
    for a perfect generator at that size (FID's finite-sample floor, IS's ceiling)."""
    rng = np.random.default_rng(seed)
    index = np.concatenate(
        [
            rng.choice(np.flatnonzero(mnist.train_labels == c), per_class, replace=False)
            for c in range(data.NUM_CLASSES)
        ]
    )
    return mnist.train_images[index], mnist.train_labels[index]


def require_classifier(classifier_dir: str) -> classifier.TrainedClassifier:
    """The classifier checkpointed in ``classifier_dir``; an error when there is none."""
    clf = classifier.load_classifier(classifier_dir)
    if clf is None:
        raise FileNotFoundError(
            f"no classifier checkpoint in {classifier_dir!r}: give the classifier/ folder of a "
            "reproduce.py run (it trains one)"
        )
    return clf


def load_evaluator(classifier_dir: str, mnist: data.Mnist):
    """(classifier, its features of the MNIST test images): what ``evaluate_sample_dir`` needs."""
    clf = require_classifier(classifier_dir)
    return clf, clf.features_and_probs(mnist.test_images)[0]


def agreement_rows(config, regime: str, workdir: str, mnist: data.Mnist) -> list[dict]:
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
    noise = rng.normal(size=(s, *data.IMAGE_SHAPE)).astype(np.float32)
    images = [
        data.to_model_input(
            mnist.train_images[rng.choice(np.flatnonzero(mnist.train_labels == c), s, False)]
        )
        for c in range(data.NUM_CLASSES)
    ]
    rows = agreement.agreement_table(
        lifted, federation.params, members, noise, images, config.agreement_times
    )
    return [dict(r, regime=regime) for r in rows]


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks every regime's config under every procedure it will sample (``sample_lib``'s
    ``check_config``), before anything is trained or written.

    Raises:
      ConfigError: an unknown regime or procedure, or an invalid setting (named with the regime
        and procedure).
    """
    for regime in config.regimes:
        with errors.as_config_error():
            procedures = procedures_for(regime_config(config, regime), config.procedures)
        for procedure in procedures:
            with errors.as_config_error(f"{regime}/{procedure}: "):
                cfg = regime_config(config, regime, procedure)
                sample_lib.check_config(cfg)


def run(config: ml_collections.ConfigDict, outdir: str) -> str:
    """Runs every missing stage under ``outdir`` and writes ``report.md``; returns its path.

    Raises:
      ConfigError: an invalid setting (``check_config``), before anything is written.
    """
    check_config(config)
    os.makedirs(outdir, exist_ok=True)
    timings = Timings(os.path.join(outdir, "timings.json"))
    mnist = data.load_mnist(config.data.mnist_dir, config.data.tfds_data_dir)

    clf_dir = os.path.join(outdir, "classifier")
    clf_cfg = classifier_config.get_config(config.classifier_preset)
    clf_cfg.data.update(config.data.to_dict())
    clf = classifier.load_classifier(clf_dir)
    if clf is None:
        clf = timings.run("classifier", lambda: classifier.train_classifier(clf_cfg, clf_dir))
    else:
        timings.reuse("classifier", clf_dir)
        classifier.check_accuracy(clf.test_accuracy, clf_cfg, clf_dir)
    real_features, _ = clf.features_and_probs(mnist.test_images)

    for regime in config.regimes:
        cfg = regime_config(config, regime)
        workdir = os.path.join(outdir, regime)
        if (checkpoint.latest_step(workdir) or 0) < cfg.train.num_steps:
            timings.run(
                f"train/{regime}", lambda c=cfg, w=workdir: train_lib.train_and_evaluate(c, w)
            )
        else:
            timings.reuse(f"train/{regime}", workdir)

    # Procedure by procedure (each across the regimes), so that an interrupted run has the
    # comparisons that matter most (the order of config.procedures) for every regime first.
    sets = [
        (regime, procedure)
        for procedure in config.procedures
        for regime in config.regimes
        if procedure in procedures_for(regime_config(config, regime), config.procedures)
    ]

    def sample_set(kind: str, regime: str, procedure: str, make_config) -> dict:
        """One sample set, sampled unless its samples exist, and its metrics."""
        stage = f"{'sample' if kind == 'samples' else 'claim'}/{regime}/{procedure}"
        workdir = os.path.join(outdir, regime)
        sample_dir = _sample_dir(outdir, regime, procedure, kind)
        if not os.path.exists(os.path.join(sample_dir, "samples.npz")):
            cfg = make_config(config, regime, procedure)
            timings.run(stage, lambda: sample_lib.run(cfg, workdir, sample_dir))
        else:
            timings.reuse(stage, sample_dir)
        measured = evaluate_sample_dir(clf, real_features, sample_dir)
        return dict(measured, regime=regime, procedure=procedure)

    results = {
        f"{regime}/{procedure}": sample_set("samples", regime, procedure, regime_config)
        for regime, procedure in sets
    }
    order = {regime: i for i, regime in enumerate(config.regimes)}
    results = dict(sorted(results.items(), key=lambda kv: order[kv[1]["regime"]]))

    claims = {}
    if config.claim_per_class > 0:
        claims = {
            f"{regime}/{procedure}": sample_set("claims", regime, procedure, claim_config)
            for regime, procedure in claim_procedures(config, results).items()
        }
    reference = evaluate_sample_set(
        clf, real_features, *reference_set(mnist, config.eval_per_class, config.seed)
    )
    write_json(
        os.path.join(outdir, "metrics.json"),
        {
            "classifier_test_accuracy": clf.test_accuracy,
            "reference_mnist_train": reference,
            "results": results,
            "claims": claims,
        },
    )

    agreement_path = os.path.join(outdir, "agreement.json")
    if not os.path.exists(agreement_path):
        rows = []
        for regime in config.regimes:
            rows += timings.run(
                f"agreement/{regime}",
                lambda r=regime: agreement_rows(config, r, os.path.join(outdir, r), mnist),
            )
        write_json(agreement_path, rows)
    else:
        timings.reuse("agreement", agreement_path)
    rows = _read_json(agreement_path)
    return write_report(
        config, outdir, clf.test_accuracy, results, rows, timings.record, reference, claims
    )


def _weights_png(outdir: str, result: dict) -> str:
    return os.path.join(_sample_dir(outdir, result["regime"], result["procedure"]), "weights.png")


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_text(path: str, text: str) -> None:
    """Writes a temporary file and renames it: never a half-written file."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2))


def write_report(
    config, outdir, clf_accuracy, results, rows, timings, reference, claims=None
) -> str:
    """``report.md``: Table 1 (with ``reference``, real images measured the same way), the
    claim sets, the grids, Tables 3/4 and the wall times."""
    lines = [
        f"# fedinf_jax reproduction, preset `{config.preset}`",
        "",
        f"Backend {jax.default_backend()}; evaluation classifier test accuracy "
        f"{clf_accuracy:.4f}; {config.eval_per_class} samples per digit per set; FID against the "
        "10,000 MNIST test images in the classifier's penultimate features; IS over 10 splits; "
        "noise rate = share with max softmax < 0.5; precision/recall with k = 3 against "
        f"{PRECISION_RECALL_REAL} test images.",
        "",
        "## The agents",
        "",
        *_agents_table(config, timings),
        "",
        "## Table 1: sample quality",
        "",
        *metrics_table(
            ["regime", "procedure"],
            [(["MNIST train", "real images"], reference)]
            + [([r["regime"], r["procedure"]], r) for r in results.values()],
        ),
        "",
        f"The first row is {config.eval_per_class} real training images per digit, measured like a "
        "sample set: a perfect generator's values at this sample size.",
    ]
    if claims:
        n = config.claim_per_class
        lines += [
            "",
            f"## The claim sets: {n} samples per digit",
            "",
            "The control's `mean` and each federated regime's best corrected procedure in Table 1, "
            f"sampled again, {n} per digit on fresh draws (seed {config.seed + 1}): the set that "
            "chose the winner does not score it. One standard error of an accuracy p is "
            f"sqrt(p (1 - p) / {10 * n}).",
            "",
            *metrics_table(
                ["regime", "procedure"],
                [([r["regime"], r["procedure"]], r) for r in claims.values()],
            ),
        ]
    lines += _ratio_table(results)
    lines += ["", "## Figure 2: samples (first 10 per digit)", ""]
    for r in results.values():
        rel = os.path.join(r["regime"], "samples", r["procedure"], "samples.png")
        lines.append(f"![{r['regime']} {r['procedure']}]({rel})")
    weights = [r for r in results.values() if os.path.exists(_weights_png(outdir, r))]
    if weights:
        lines += ["", "## The agents' weights along the reverse process", ""]
        lines += [
            f"![{r['regime']} {r['procedure']}]({os.path.relpath(_weights_png(outdir, r), outdir)})"
            for r in weights
        ]
    by_aggregator = {}
    for r in rows:  # rows written before the aggregator field existed are the mean's
        by_aggregator.setdefault(r.get("aggregator", "mean"), []).append(r)
    lines += ["", "## Agreement at a glance", ""]
    lines += _agreement_summary(by_aggregator)
    lines += ["", "## Tables 3/4: agreement of the agents' scores (uniform mean)", ""]
    lines += _agreement_tables(by_aggregator.pop("mean", []))
    for name, group in by_aggregator.items():
        lines += [
            "",
            f"## Tables 3/4 under `{name}`: the agents' agreement with that aggregate",
            "",
        ]
        note = {
            "label_prior": "`superdiff_or`'s weights before any density evidence, at t = T",
            "superdiff_and": "the drift that keeps the agents' log-densities changing equally",
        }.get(name)
        if note:
            lines += [f"({note}.)", ""]
        lines += _agreement_tables(group)
    lines += ["", "## Wall times (s)", "", "| stage | s |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in timings.items()]
    path = os.path.join(outdir, "report.md")
    write_text(path, "\n".join(lines) + "\n")
    return path


def _agents_table(config, timings: dict) -> list[str]:
    """What each regime trained: agents, partition, U-Net, steps x batch, training wall time."""
    lines = [
        "| regime | agents | partition | U-Net channels | steps x batch per agent | training s |",
        "| --- | ---: | --- | --- | --- | ---: |",
    ]
    for regime in config.regimes:
        cfg = regime_config(config, regime)
        m, t = cfg.model, cfg.train
        stem = f", {m.patch_size}x{m.patch_size} stem" if m.patch_size > 1 else ""
        train_s = timings.get(f"train/{regime}")
        lines.append(
            f"| {regime} | {cfg.partition.num_agents} | {cfg.partition.name} | "
            f"{tuple(m.block_out_channels)}{stem} | {t.num_steps} x {t.batch_size} | "
            f"{_seconds(train_s)} |"
        )
    return lines


def metrics_table(key_columns: list[str], rows: list[tuple[list[str], dict]]) -> list[str]:
    """Table 1's markdown: each row's key cells, then its ``evaluate_sample_dir`` metrics."""
    head = [*key_columns, "IS", "FID", "accuracy", "noise rate", "precision", "recall"]
    head += ["score evals", "sampling s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for keys, r in rows:
        lines.append(
            f"| {' | '.join(keys)} | {r['inception_score']:.2f} +- "
            f"{r['inception_score_std']:.2f} | {r['fid']:.2f} | {r['accuracy']:.3f} | "
            f"{r['noise_rate']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
            f"{r.get('score_evaluations', '-')} | {_seconds(r.get('sampling_wall_time_s'))} |"
        )
    return lines


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


# The paper's Table 1 (IS, FID), and its Figure 2 text: "over 50 % of the samples generated by
# the FederatedInference regimes were noise".
PAPER_TABLE1 = {"control": (5.9459, 1.6274), "homogeneous": (3.6795, 31.7551),
                "heterogeneous": (3.1651, 37.1922)}  # fmt: skip


def _ratio_table(results: dict) -> list[str]:
    """Federated / control for each set, against the control set of the same procedure (the
    corrected aggregators against the control's ``mean``), beside the paper's ratios: raw IS and
    FID depend on the feature extractor, their ratios less so."""
    rows = []
    for r in results.values():
        ref = "paper" if r["procedure"] == "paper" else "mean"
        control = results.get(f"control/{ref}")
        if r["regime"] == "control" or control is None:
            continue
        paper_is, paper_fid = PAPER_TABLE1[r["regime"]]
        rows.append(
            f"| {r['regime']} | {r['procedure']} | "
            f"{r['inception_score'] / control['inception_score']:.2f} | "
            f"{r['fid'] / control['fid']:.1f} | "
            f"{r['accuracy'] - control['accuracy']:+.3f} | "
            f"{r['noise_rate'] - control['noise_rate']:+.3f} | "
            f"{paper_is / PAPER_TABLE1['control'][0]:.2f} | "
            f"{paper_fid / PAPER_TABLE1['control'][1]:.1f} |"
        )
    if not rows:
        return []
    return [
        "",
        "Relative to the control agent sampled the same way (`paper` to `paper`, the corrected "
        "aggregators to `mean`); the paper's Table 1 ratios beside them (its IS/FID used other "
        "features, so only ratios compare; it reports over 50% noise for both federated regimes):",
        "",
        "| regime | procedure | IS / control | FID / control | accuracy - control | "
        "noise rate - control | paper IS / control | paper FID / control |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]


def _agreement_summary(by_aggregator: dict[str, list[dict]]) -> list[str]:
    """Tables 3/4 averaged over the digits: one row per (aggregate, input, regime), one column
    per t, cells "magnitude / cosine"."""
    times = sorted({r["t"] for rows in by_aggregator.values() for r in rows}, reverse=True)
    out = [
        "Mean over the 10 digits of Tables 3/4 (and their versions under the other aggregates): "
        "magnitude of the aggregate / mean cosine of each agent's score to it.",
        "",
        "| aggregate | input | regime | " + " | ".join(f"t = {t:g}" for t in times) + " |",
        "| --- | --- | --- |" + " --- |" * len(times),
    ]
    for name in sorted(by_aggregator, key=lambda n: n != "mean"):  # the paper's mean first
        rows = by_aggregator[name]
        for kind in agreement.INPUTS:
            for regime in dict.fromkeys(r["regime"] for r in rows):
                cells = []
                for t in times:
                    key = (t, kind, regime)
                    sel = [r for r in rows if (r["t"], r["input"], r["regime"]) == key]
                    magnitude = np.mean([r["magnitude"] for r in sel])
                    cells.append(f"{magnitude:.1f} / {np.mean([r['cosine'] for r in sel]):.2f}")
                out.append(f"| {name} | {kind} | {regime} | " + " | ".join(cells) + " |")
    return out


def _agreement_tables(rows: list[dict]) -> list[str]:
    """One table per t: rows (input, regime), columns digits, cells "magnitude / cosine"."""
    out = []
    for t in sorted({r["t"] for r in rows}, reverse=True):
        labels = sorted({r["label"] for r in rows})
        out += [
            f"t = {t:g}: magnitude +- std / cosine +- std",
            "",
            "| input | regime | " + " | ".join(str(c) for c in labels) + " |",
            "| --- | --- | " + " | ".join("---" for _ in labels) + " |",
        ]
        for kind in agreement.INPUTS:
            for regime in dict.fromkeys(r["regime"] for r in rows):
                cells = {
                    r["label"]: f"{r['magnitude']:.2f} +- {r['magnitude_std']:.2f} / "
                    f"{r['cosine']:.2f} +- {r['cosine_std']:.2f}"
                    for r in rows
                    if r["t"] == t and r["input"] == kind and r["regime"] == regime
                }
                out.append(f"| {kind} | {regime} | " + " | ".join(cells[c] for c in labels) + " |")
        out.append("")
    return out
