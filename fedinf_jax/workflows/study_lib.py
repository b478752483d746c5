"""Solver studies as a workflow (``study.py``): a study run on a trained federation's agents,
its cells measured (``fedinf_jax.workflows.study``), their samples scored by the reproduction's
classifier, and its outputs: results.json and .csv, the error and step plots, the sample grids,
study.md.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from absl import logging

from fedinf_jax.agents import pretrained
from fedinf_jax.core import errors, files, runtime
from fedinf_jax.data import digits
from fedinf_jax.evaluation import metrics, sample_sets
from fedinf_jax.evaluation.report import QUALITY_HEAD, markdown_table, quality_cells
from fedinf_jax.sampling import solvers
from fedinf_jax.sampling.federated_sampler import sample_keys, to_uint8
from fedinf_jax.workflows import plots, sample_lib
from fedinf_jax.workflows.study import (
    Cell,
    CellCache,
    adaptive_steps,
    cell_inputs,
    cells_of,
    fitted_orders,
    reference_cell,
    run,
    series_points,
)

# The error levels study.md finds the cheapest cell for (RMS over pixels in [-1, 1]).
ERROR_LEVELS = (0.3, 0.1, 0.03, 0.01, 0.003)


def sample_quality(
    row: dict,
    labels: np.ndarray,
    measured_of: Callable[[str], tuple[np.ndarray, np.ndarray, np.ndarray] | None],
    real: sample_sets.RealDigits,
) -> dict:
    """A finished cell's samples through a reproduction's classifier (``pipeline``'s metrics):
    accuracy, noise rate and FID against the MNIST test set's features, the pixel measures
    against its images (``metrics.fidelity``), and ``feature_rms_error``, the RMS distance to its
    reference's samples in the classifier's feature space (per sample, the same draws).
    ``measured_of(cell name)``: that cell's (uint8 images, features, softmax), None for a cell
    without finite images (then the row gets nothing)."""

    own = measured_of(row["name"])
    if own is None:
        return {}
    pixels, features, probs = own
    quality = sample_sets.sample_set_metrics(features, probs, labels, real.features)
    out = {k: quality[k] for k in ("accuracy", "noise_rate", "fid")}
    out.update(metrics.fidelity(pixels, real.images))
    reference = measured_of(row["reference"])
    if reference is not None:
        out["feature_rms_error"] = float(np.sqrt(np.mean((features - reference[1]) ** 2)))
    return out


def budgets(rows: Iterable[dict]) -> dict[str, list[Cell]]:
    """The finished cells of each budget and aggregator, to compare solvers at equal steps (or
    tolerance): {"<schedule><steps> or tol<tol>-<aggregator>": cells, in row order}."""
    out: dict[str, list[Cell]] = {}
    for row in rows:
        if row.get("status") == "ok":
            cell = Cell.of_row(row)
            out.setdefault(f"{cell.budget}-{cell.aggregator}", []).append(cell)
    return out


def plot_solver_samples(
    images: dict[str, np.ndarray], labels: np.ndarray, path: str, title: str
) -> str:
    """A row per solver ({"method-solver": images}), the first sample of each digit."""
    first = plots.first_per_class(labels, 1)
    pixels = np.concatenate([to_uint8(x[first]) for x in images.values()])
    rows = np.repeat(np.arange(len(images)), len(first))
    return plots.plot_sample_grid(pixels, rows, path, title, dict(enumerate(images)))


def cheapest_cells(
    rows: Iterable[dict], levels: Sequence[float] = ERROR_LEVELS
) -> list[tuple[str, str, float, dict | None]]:
    """Per (method, aggregator) and error level, the finished cell with the fewest score
    evaluations whose error to the reference is at most the level (ties: the smaller error), or
    None where no cell reaches it."""
    rows = list(rows)
    out = []
    for method, aggregator in sorted({(r["method"], r["aggregator"]) for r in rows}):
        ok = [
            r
            for r in rows
            if (r["method"], r["aggregator"]) == (method, aggregator)
            and r.get("status") == "ok"
            and np.isfinite(r.get("rms_error", float("nan")))
        ]
        for level in levels:
            reaching = [r for r in ok if r["rms_error"] <= level]
            best = min(
                reaching, key=lambda r: (r["score_evaluations"], r["rms_error"]), default=None
            )
            out.append((method, aggregator, level, best))
    return out


def render_summary(rows: list[dict], record: dict) -> str:
    """study.md: per method and aggregator, the cheapest cell (fewest score evaluations) that
    reaches each of ``ERROR_LEVELS``; each series' fitted order and best error; the samples'
    quality where measured; where cells failed (diverged or refused, with the reason); where the
    adaptive controllers stepped; the plots."""
    lines = [
        "# Solver study",
        "",
        f"{len(rows)} cells on the agents of `{record.get('workdir', '?')}` (checkpoint step "
        f"{record.get('checkpoint_step', '?')}, code {record.get('code_version', '?')}); every "
        "cell solves the same prior draws and Brownian paths and is measured against its "
        "reference (RMS over pixels in [-1, 1]).",
        "",
        "![errors](errors.png)",
    ]
    for section in (_cheapest, _convergence, _quality, _failures, _adaptive_steps):
        lines += section(rows)
    return "\n".join(lines) + "\n"


def _cheapest(rows: list[dict]) -> list[str]:
    table = [
        [method, aggregator, f"{level:g}"]
        + (
            [f"`{best['name']}`", str(best["score_evaluations"]), f"{best['rms_error']:.3g}"]
            if best
            else ["none reaches it", "-", "-"]
        )
        for method, aggregator, level, best in cheapest_cells(rows)
    ]
    head = ["method", "aggregator", "error <=", "cheapest cell", "score evals", "its error"]
    return ["", "## The cheapest cell for each error", "", *markdown_table(head, table)]


def _convergence(rows: list[dict]) -> list[str]:
    series = series_points(rows)
    orders = fitted_orders(series)
    table = []
    for name, points in sorted(series.items()):
        evaluations, error = min(points, key=lambda p: p[1])
        order = f"{orders[name]:.2f}" if name in orders else "-"
        table.append([f"`{name}`", order, f"{error:.3g}", str(evaluations)])
    head = ["series", "fitted order", "best error", "at evals"]
    return ["", "## Convergence per series", "", *markdown_table(head, table)]


def _quality(rows: list[dict]) -> list[str]:
    scored = [r for r in rows if "accuracy" in r]
    if not scored:
        return []
    table = []
    for r in scored:
        error = f"{r.get('feature_rms_error', float('nan')):.3g}"
        table.append([f"`{r['name']}`", str(r["score_evaluations"]), *quality_cells(r), error])
    head = ["cell", "score evals", *QUALITY_HEAD, "feature error"]
    title = "## Sample quality (the reproduction's classifier)"
    return ["", title, "", *markdown_table(head, table)]


def _failures(rows: list[dict]) -> list[str]:
    failed = [r for r in rows if r.get("status") != "ok"]
    lines = ["", "## Where cells failed", ""]
    if not failed:
        return [*lines, "Every cell finished with finite samples."]
    table = [
        [
            f"`{r['name']}`",
            r["status"],
            f"{r.get('diverged_share', float('nan')):.2f}",
            (r.get("failure") or r.get("result") or "").replace("|", "/"),
        ]
        for r in failed
    ]
    return lines + markdown_table(["cell", "status", "diverged share", "reason"], table)


def _adaptive_steps(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "## Where the adaptive controllers stepped",
        "",
        "![steps](steps.png)",
        "",
        "Smallest accepted step per adaptive cell (where the reverse process is stiffest):",
        "",
    ]
    adaptive = [r for r in rows if r.get("status") == "ok" and r.get("step_t")]
    if not adaptive:
        return [*lines, "No finished adaptive cells."]
    table = [
        [
            f"`{r['name']}`",
            f"{r['accepted_steps']} / {r['rejected_steps']}",
            f"{r['min_step']:.3g}",
            f"{r['t_min_step']:.3g}",
        ]
        for r in adaptive
    ]
    head = ["cell", "accepted / rejected steps", "smallest step", "at t"]
    return lines + markdown_table(head, table)


def write_results(rows: list[dict], outdir: str | os.PathLike, record: dict) -> None:
    """``results.json`` (``record``: the study's config and code version, and the rows) and
    ``results.csv`` (one row per cell, its scalar fields: an adaptive cell's ``step_t`` list is
    in the JSON) under ``outdir``."""
    os.makedirs(outdir, exist_ok=True)
    files.write_json(os.path.join(outdir, "results.json"), {**record, "rows": rows})
    columns = list(
        dict.fromkeys(key for row in rows for key, v in row.items() if not isinstance(v, list))
    )
    table = io.StringIO()
    writer = csv.DictWriter(table, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    files.write_text(os.path.join(outdir, "results.csv"), table.getvalue())


def run_study(config, workdir: str, overrides: dict | None = None, recompute: bool = False) -> str:
    """The config's study on the agents of the train.py run ``workdir``: every cell measured
    against its reference, written to ``workdir/study/<study.name>/`` (results.json and .csv,
    the plots, study.md, ``cells/`` the cache); with ``study.classifier``, each row also gets its
    samples' quality (``sample_quality``). Returns that folder.

    A cached cell made from other inputs (``cell_inputs``) stops the study before any solve,
    unless ``recompute``, which solves it again.

    Raises:
      ConfigError: an invalid study or sampler setting (before any checkpoint is read).
      MissingInputError: ``workdir`` holds no checkpoint, or ``study.classifier`` no classifier.
      StaleOutputError: a cached cell made from other inputs, without ``recompute``.
    """

    s = config.study
    with errors.as_config_error():
        cells = cells_of(s)
    clf = sample_sets.require_classifier(s.classifier) if s.get("classifier") else None
    federation = sample_lib.load_federation(config, workdir, overrides)
    # FID's reference, before any solve: the MNIST test set in the classifier's features.
    real = None if clf is None else _real_digits(config, clf)
    sde = federation.components.sde
    with errors.as_config_error():
        base = solvers.SolverSpec.from_config(federation.config.sampler, sde)
    outdir = os.path.join(pretrained.output_root(workdir), "study", s.name)
    labels = sample_lib.class_labels(s.num_per_class)
    ref = s.reference

    def reference(cell: Cell) -> Cell:
        return reference_cell(
            cell.method, cell.aggregator, ref.ode_solver, ref.ode_tol, ref.sde_steps
        )

    cache = CellCache(
        os.path.join(outdir, "cells"),
        lambda cell: cell_inputs(federation.config, federation.step, cell),
        recompute,
    )
    rows = run(
        cells,
        lambda cell: sample_lib.build_sampler(federation, cell.spec(base), cell.aggregator),
        federation.sampler_params,
        sample_keys(s.seed, len(labels)),
        labels,
        cache,
        reference,
        _progress(),
    )
    if clf is not None:
        rows = _with_quality(rows, clf, real, cache, labels)
    record = {
        "config": json.loads(config.to_json_best_effort()),
        "workdir": os.path.abspath(workdir),
        "checkpoint_step": federation.step,
        "code_version": runtime.code_version(),
    }
    _write_outputs(rows, record, cache, labels, sde.T, outdir)
    logging.info("%d cells: %s", len(rows), outdir)
    return outdir


def _progress() -> Callable[[int, int, Cell, bool], None]:
    """``report(done, total, cell, computed)``: logs each finished cell with the elapsed time
    and the ETA."""
    start = time.perf_counter()

    def report(done: int, total: int, cell: Cell, computed: bool) -> None:
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (total - done)
        logging.info(
            "cell %d/%d %s: %s; %.0f s elapsed, ETA %.0f s",
            done,
            total,
            cell.name,
            "computed" if computed else "cached",
            elapsed,
            eta,
        )

    return report


def _real_digits(config, clf) -> sample_sets.RealDigits:
    """The MNIST test digits with the study's classifier's features of them."""
    mnist = digits.load_mnist(config.data.mnist_dir, config.data.tfds_data_dir)
    return sample_sets.real_test_digits(clf, config.study.classifier, mnist)


def _with_quality(
    rows: list[dict], clf, real: sample_sets.RealDigits, cache: CellCache, labels
) -> list[dict]:
    """``rows`` with their samples' quality (``sample_quality``) through ``clf`` against the
    ``real`` test digits."""

    @functools.cache  # a reference serves many cells: its features once
    def measured_of(name: str):
        images = cache.load_array(name)
        if images is None or not np.isfinite(images).all():
            return None
        pixels = to_uint8(images)
        return (pixels, *clf.features_and_probs(pixels))

    return [dict(row, **sample_quality(row, labels, measured_of, real)) for row in rows]


def _write_outputs(rows: list[dict], record: dict, cache: CellCache, labels, T: float, outdir):
    """results.json and .csv, the error and step plots, the sample grids per budget, study.md."""
    write_results(rows, outdir, record)
    series = series_points(rows)
    plots.plot_study_errors(series, fitted_orders(series), os.path.join(outdir, "errors.png"))
    plots.plot_study_steps(adaptive_steps(rows, T), os.path.join(outdir, "steps.png"))
    for budget, cells_at in budgets(rows).items():
        images = {f"{c.method}-{c.solver}": cache.load_array(c.name) for c in cells_at}
        path = os.path.join(outdir, f"samples_{budget}.png")
        plot_solver_samples(images, labels, path, f"solvers at {budget}")
    files.write_text(os.path.join(outdir, "study.md"), render_summary(rows, record))
