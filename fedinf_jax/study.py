"""Solver stability studies: a grid of ways to integrate the reverse process, each cell measured
against a reference solve on the same prior draws and Brownian paths.

A cell is (method, solver, step budget, step schedule, aggregator): constant steps on a schedule,
or adaptive steps at a tolerance (rtol = atol). Every cell solves the same samples (one key per
sample: its prior draw and, for the SDE, its Brownian path on a ``VirtualBrownianTree``,
``sampler.brownian = "tree"``, so every grid walks the same path). The reference of a method
and aggregator is a tight solve: for the ODE a high-order adaptive solve, for the SDE a fine-step
solve of the same paths.

The study does not know where the agents come from: ``sampler_for(cell)`` builds the cell's
``FederatedSampler`` (over trained agents, or the closed-form Gaussian agents of the tests).
Finished cells are cached under the study's folder, one folder per cell, each with a record of
what made it (``cell_inputs``: the trained run and step, the study's draws, the sampler's and the
aggregator's settings, the cell), so a rerun computes nothing again, an extended grid computes
only its new cells, and a cell made with other settings stops the study before any solve (or,
with ``recompute``, is solved again).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence

import diffrax
import jax
import numpy as np
from absl import logging

from fedinf_jax import (
    data,
    errors,
    files,
    plots,
    pretrained,
    provenance,
    runtime,
    sample_lib,
    solvers,
)
from fedinf_jax.aggregators import DensityState
from fedinf_jax.evaluation import classifier, sample_sets
from fedinf_jax.evaluation.report import markdown_table
from fedinf_jax.registry import check_choice
from fedinf_jax.sampling import FederatedSampler, sample_keys, to_uint8
from fedinf_jax.types import AgentParams, Key, Labels

# A sample whose largest pixel exceeds this many times the data's bound (1) has diverged.
EXPLODED = 10.0


@dataclasses.dataclass(frozen=True)
class Cell:
    """One way to integrate: ``num_steps`` constant steps on ``schedule``, or adaptive steps at
    ``tol`` (rtol = atol = tol) when ``tol`` > 0."""

    method: str
    solver: str
    aggregator: str
    schedule: str = "uniform"
    num_steps: int = 0
    tol: float = 0.0

    @property
    def adaptive(self) -> bool:
        return self.tol > 0

    @property
    def budget(self) -> str:
        return f"tol{self.tol:.0e}" if self.adaptive else f"{self.schedule}{self.num_steps}"

    @property
    def name(self) -> str:
        return f"{self.method}-{self.solver}-{self.budget}-{self.aggregator}"

    @classmethod
    def of_row(cls, row: dict) -> Cell:
        """The cell a result row describes."""
        return cls(**{f.name: row[f.name] for f in dataclasses.fields(cls)})

    def spec(self, base: solvers.SolverSpec) -> solvers.SolverSpec:
        """``base`` (t_end, denoising, max_steps, ...) with this cell's way to integrate, on the
        shared Brownian tree."""
        return dataclasses.replace(
            base,
            method=self.method,
            solver=solvers.make_solver(self.method, self.solver, base.root_finder),
            num_steps=self.num_steps if not self.adaptive else base.num_steps,
            adaptive=self.adaptive,
            rtol=self.tol if self.adaptive else base.rtol,
            atol=self.tol if self.adaptive else base.atol,
            schedule=self.schedule,
            brownian="tree",
            save_trajectory=0,
            save_steps=self.adaptive,  # where the controller puts its steps
            progress=False,
        )


def grid(
    methods: Sequence[str],
    solvers_by_method: dict[str, Sequence[str]],
    aggregators: Sequence[str],
    num_steps: Sequence[int],
    schedules: Sequence[str] = ("uniform",),
    tolerances: Sequence[float] = (),
) -> list[Cell]:
    """Every cell of the grid: each solver of each method under each aggregator at each constant
    budget on each schedule, and, for solvers with an error estimate, at each tolerance.

    Raises:
      ValueError: an unknown method, solver or schedule (the valid ones listed).
    """
    for schedule in schedules:
        solvers.SCHEDULES.check(schedule)
    cells = []
    for method in methods:
        for name in solvers_by_method.get(method, ()):
            adaptive = solvers.solver_nature(method, solvers.make_solver(method, name))[
                "error_estimate"
            ]
            for aggregator in aggregators:
                for schedule in schedules:
                    cells += [Cell(method, name, aggregator, schedule, int(n)) for n in num_steps]
                if adaptive:
                    cells += [Cell(method, name, aggregator, tol=float(t)) for t in tolerances]
    return cells


def reference_cell(method: str, aggregator: str, ode_solver="dopri8", ode_tol=1e-6, sde_steps=1024):
    """The tight solve a cell is measured against: adaptive ``ode_solver`` at ``ode_tol`` for
    the ODE, ``sde_steps`` Euler-Maruyama steps of the same paths for the SDE."""
    if method == "ode":
        return Cell("ode", ode_solver, aggregator, tol=ode_tol)
    return Cell("sde", "euler", aggregator, num_steps=sde_steps)


def cell_inputs(config, step: int, cell: Cell) -> dict:
    """What determines a cell of a study on trained agents (``provenance``): a sample set's
    inputs (``sample_lib.sample_set_inputs``: the run, ``step``, the sampler and the aggregator's
    settings) under the cell's aggregator with the study's draws (``study.num_per_class``,
    ``study.seed``), less the sampler fields the cell sets, and the cell itself."""

    inputs = sample_lib.sample_set_inputs(sample_lib.with_procedure(config, cell.aggregator), step)
    set_by_study = ["num_per_class", "seed", "method", "solver", "adaptive", "schedule"]
    set_by_study += ["brownian", "save_trajectory", *(("rtol", "atol") if cell.adaptive else ())]
    for field in [*set_by_study, *(() if cell.adaptive else ("num_steps",))]:
        inputs.pop(f"sampler.{field}", None)
    inputs["study.num_per_class"] = config.study.num_per_class  # the draws every cell solves
    inputs["study.seed"] = config.study.seed
    inputs.update(provenance.flatten({"cell": dataclasses.asdict(cell)}))
    return inputs


class CellCache:
    """Finished cells under ``directory``: ``<cell.name>/row.json`` and its arrays
    (``images.npy``; for the density-weighted members ``log_q.npy``), each cell written whole or
    not at all. With ``inputs_of`` (cell -> its inputs, ``cell_inputs``), each row records what
    made it, and a cell whose inputs changed is refused (``provenance.check_reuse``) or, with
    ``recompute``, computed again."""

    def __init__(
        self,
        directory: str | os.PathLike,
        inputs_of: Callable[[Cell], dict] | None = None,
        recompute: bool = False,
    ):
        self.directory = os.fspath(directory)
        self.inputs_of = inputs_of
        self.recompute = recompute

    def _folder(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def row(self, cell: Cell) -> dict | None:
        """A finished cell's row when its inputs are the ones asked for, else None (unfinished,
        or changed and to be recomputed).

        Raises:
          StaleOutputError: it was made from other inputs and ``recompute`` is not set.
        """
        folder = self._folder(cell.name)
        if not os.path.isfile(os.path.join(folder, "row.json")):
            return None
        with open(os.path.join(folder, "row.json")) as f:
            row = json.load(f)
        if self.inputs_of is not None:
            stored = provenance.stored_inputs(row)
            stage = f"study cell {cell.name}"
            current = self.inputs_of(cell)
            if not provenance.check_reuse(
                stage, folder, stored, current, self.recompute, "a new study.name"
            ):
                return None
        row.pop(provenance.RECORD_KEY, None)
        return row

    def load(self, cell: Cell) -> tuple[dict, dict[str, np.ndarray]] | None:
        """(row, arrays by name) of a finished cell (``row``), or None; a refused cell has no
        arrays."""
        row = self.row(cell)
        if row is None:
            return None
        folder = self._folder(cell.name)
        arrays = {
            name[: -len(".npy")]: np.load(os.path.join(folder, name))
            for name in sorted(os.listdir(folder))
            if name.endswith(".npy")
        }
        return row, arrays

    def load_array(self, name: str, array: str = "images") -> np.ndarray | None:
        """An array (default: the images) of the cell called ``name`` (None: unfinished,
        refused, or an array the cell has not)."""
        path = os.path.join(self._folder(name), f"{array}.npy")
        return np.load(path) if os.path.isfile(path) else None

    def store(self, cell: Cell, row: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        os.makedirs(self.directory, exist_ok=True)
        if self.inputs_of is not None:
            row = {**row, provenance.RECORD_KEY: provenance.record(self.inputs_of(cell))}
        with files.atomic_path(self._folder(cell.name), folder=True) as tmp:
            for key, value in (arrays or {}).items():
                np.save(os.path.join(tmp, f"{key}.npy"), value)
            with open(os.path.join(tmp, "row.json"), "w") as f:
                json.dump(row, f, indent=1)


def _compile_seconds() -> tuple[Callable[[], float], Callable[[], None]]:
    """(read, stop): the seconds JAX spent tracing and compiling since the call."""
    spent = [0.0]
    events = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def listen(event, duration, **kwargs):
        if event in events:
            spent[0] += duration

    jax.monitoring.register_event_duration_secs_listener(listen)
    return (lambda: spent[0]), (lambda: jax.monitoring.unregister_event_duration_listener(listen))


def cell_fields(cell: Cell) -> dict:
    """A row's description of its cell: the cell's fields, its name, and its solver's nature
    (``solvers.solver_nature``: Ito or Stratonovich, error estimate or not)."""
    nature = solvers.solver_nature(cell.method, solvers.make_solver(cell.method, cell.solver))
    return {**dataclasses.asdict(cell), "name": cell.name, **nature}


def measure(
    cell: Cell, sampler: FederatedSampler, params: AgentParams, keys: Key, labels: Labels
) -> tuple[dict, dict[str, np.ndarray]]:
    """One solve of ``cell``: (its row of measurements, its arrays: the final ``images`` and,
    for a density-weighted aggregator, each agent's tracked ``log_q`` at t_end, (agents, N)).
    Failures are measured, not raised: the row says which share of samples diverged and where
    the first non-finite evaluation was."""
    read, stop = _compile_seconds()
    start = time.perf_counter()
    try:
        out = sampler.run(params, keys, labels)
    finally:
        stop()
    elapsed = time.perf_counter() - start
    images = np.asarray(out.images, np.float32)
    flat = images.reshape(len(images), -1)
    diverged = ~np.isfinite(flat).all(axis=1) | (np.abs(np.nan_to_num(flat)).max(axis=1) > EXPLODED)
    evaluations = int(out.stats["score_evaluations"])
    solved = out.result is None or bool(out.result == diffrax.RESULTS.successful)
    if out.failure is not None or diverged.any():
        status = "diverged"
    else:  # a solve Diffrax ended early (max_steps, an implicit stage that did not converge)
        status = "ok" if solved else "failed"
    row = {
        **cell_fields(cell),
        "status": status,
        "result": str(diffrax.RESULTS[out.result]) if out.result is not None else "",
        "failure": out.failure or "",
        "diverged_share": float(diverged.mean()),
        "score_evaluations": evaluations,
        "network_evaluations": evaluations * sampler.agents_asked(sampler.agents_in(params)),
        "steps": int(out.stats["num_steps"]),
        "accepted_steps": int(out.stats["num_accepted_steps"]),
        "rejected_steps": int(out.stats["num_rejected_steps"]),
        "compile_s": round(read(), 3),
        "wall_s": round(max(elapsed - read(), 0.0), 3),
    }
    if out.step_t is not None:
        row.update(step_sizes(np.asarray(out.step_t, np.float64), sampler.sde.T))
    arrays = {"images": images}
    if isinstance(out.aggregator_state, DensityState):  # each agent's tracked log-density
        arrays["log_q"] = np.asarray(out.aggregator_state.log_q, np.float32)
    return row, arrays


def step_sizes(step_t: np.ndarray, T: float) -> dict:
    """An adaptive solve's steps from its accepted steps' end times ``step_t`` (NaN-padded):
    ``step_t`` (the times, from T towards t_end) and where the controller took its smallest step
    (``min_step``, ``t_min_step``: its stiffness, in one number each), the first step (the
    initial guess) and the last (cut to end at t_end) left out when there are others."""
    ends = step_t[np.isfinite(step_t)]
    sizes = step_lengths(ends, T)
    if not len(sizes):
        return {"step_t": [], "min_step": float("nan"), "t_min_step": float("nan")}
    inner = slice(1, -1) if len(sizes) > 2 else slice(None)
    i = int(np.argmin(sizes[inner])) + (inner.start or 0)
    return {
        "step_t": [round(float(t), 7) for t in ends],
        "min_step": float(sizes[i]),
        "t_min_step": float(ends[i]),
    }


def step_lengths(ends: np.ndarray, T: float) -> np.ndarray:
    """The length of each step of a solve from T whose steps ended at ``ends``."""
    return -np.diff(np.concatenate([[T], np.asarray(ends, dtype=float)]))


def rms_error(images: np.ndarray, reference: np.ndarray) -> float:
    """RMS over every pixel of the samples that stayed finite in both (NaN if none did)."""
    keep = np.isfinite(images).reshape(len(images), -1).all(1)
    keep &= np.isfinite(reference).reshape(len(reference), -1).all(1)
    if not keep.any():
        return float("nan")
    return float(np.sqrt(np.mean((images[keep] - reference[keep]) ** 2)))


def run(
    cells: Iterable[Cell],
    sampler_for: Callable[[Cell], FederatedSampler],
    params: AgentParams,
    keys: Key,
    labels: Labels,
    cache: CellCache,
    reference: Callable[[Cell], Cell] = lambda c: reference_cell(c.method, c.aggregator),
    report: Callable[[int, int, Cell, bool], None] | None = None,
) -> list[dict]:
    """Every cell's row, in order, each with ``rms_error`` to its reference's images; computes
    only cells (and references) the cache lacks. A cell ``sampler_for`` refuses (ValueError:
    e.g. a Stratonovich solver for an aggregator whose state is an Ito integral) gets a
    ``refused`` row with the reason. ``report(done, total, cell, computed)`` follows progress.
    Cells that differ only in their budget (``solvers.BUDGET_FIELDS``) share one compiled solve,
    the first one's: ``sampler_for`` must build them alike but for the budget."""
    cells = list(cells)
    references: dict[str, tuple[dict, dict[str, np.ndarray], bool]] = {}
    first_sampler: dict[tuple, FederatedSampler] = {}

    def sampler_of(cell: Cell) -> FederatedSampler:
        """``sampler_for(cell)``'s budget on the first sampler of the cell's method, solver,
        aggregator and kind of steps: one compiled solve for all their budgets."""
        sampler = sampler_for(cell)
        key = (cell.method, cell.solver, cell.aggregator, cell.adaptive)
        budget = {f: getattr(sampler.spec, f) for f in solvers.BUDGET_FIELDS}
        return first_sampler.setdefault(key, sampler).with_budget(**budget)

    def solved(cell: Cell) -> tuple[dict, dict[str, np.ndarray], bool]:
        cached = cache.load(cell)
        if cached is not None:
            return (*cached, False)
        try:
            sampler = sampler_of(cell)
        except ValueError as err:
            row = {**cell_fields(cell), "status": "refused"}
            row["failure"] = str(err)
            cache.store(cell, row)
            return row, {}, True
        logging.info("solving %s (%d samples)", cell.name, len(labels))  # a reference takes long
        row, arrays = measure(cell, sampler, params, keys, labels)
        cache.store(cell, row, arrays)
        return row, arrays, True

    for cell in dict.fromkeys([*cells, *map(reference, cells)]):  # a stale cell: before any solve
        cache.row(cell)
    rows = []
    for i, cell in enumerate(cells):
        row, arrays, computed = solved(cell)
        ref = reference(cell)
        if ref.name not in references:  # each reference read or solved once per run
            references[ref.name] = solved(ref)
        ref_row, ref_arrays, _ = references[ref.name]
        row = dict(row, reference=ref_row["name"])
        row["rms_error"] = (
            rms_error(arrays["images"], ref_arrays["images"])
            if "images" in arrays and "images" in ref_arrays
            else float("nan")
        )
        if "log_q" in arrays and "log_q" in ref_arrays:  # (agents, N): the error per sample
            row["log_density_drift"] = rms_error(arrays["log_q"].T, ref_arrays["log_q"].T)
        rows.append(row)
        if report is not None:
            report(i + 1, len(cells), cell, computed)
    return rows


def series_name(row: dict) -> str:
    """The convergence series a row belongs to: its cell without the budget."""
    cell = Cell.of_row(row)
    steps = "adaptive" if cell.adaptive else cell.schedule
    return f"{cell.method}-{cell.solver}-{steps}-{cell.aggregator}"


def series_points(rows: Iterable[dict]) -> dict[str, list[tuple[int, float]]]:
    """Per series, the (score evaluations, RMS error) of its finished cells with a finite,
    positive error, by increasing evaluations."""
    points: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        error, evaluations = row.get("rms_error", float("nan")), row.get("score_evaluations", 0)
        if row.get("status") == "ok" and np.isfinite(error) and error > 0 and evaluations > 0:
            points.setdefault(series_name(row), []).append((evaluations, error))
    return {name: sorted(pts) for name, pts in points.items()}


def fitted_orders(series: dict[str, list[tuple[int, float]]]) -> dict[str, float]:
    """Per series (``series_points``) with at least two budgets, the order p of a least-squares
    fit error ~ evaluations^(-p) on log-log axes (the solver's order, counted per evaluation,
    where its evaluations per step are fixed)."""
    orders = {}
    for name, pts in series.items():
        x, y = np.log(np.array(pts, dtype=float)).T
        if len(set(x)) >= 2:
            orders[name] = float(-np.polyfit(x, y, 1)[0])
    return orders


def adaptive_steps(rows: Iterable[dict], T: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per finished adaptive cell, (its accepted steps' end times, their lengths)."""
    return {
        row["name"]: (np.asarray(row["step_t"]), step_lengths(row["step_t"], T))
        for row in rows
        if row.get("status") == "ok" and row.get("step_t")
    }


# The error levels study.md finds the cheapest cell for (RMS over pixels in [-1, 1]).
ERROR_LEVELS = (0.3, 0.1, 0.03, 0.01, 0.003)


def sample_quality(
    row: dict,
    labels: np.ndarray,
    features_of: Callable[[str], tuple[np.ndarray, np.ndarray] | None],
    real_features: np.ndarray,
) -> dict:
    """A finished cell's samples through a reproduction's classifier (``pipeline``'s metrics):
    accuracy, noise rate and FID against the MNIST test set's features, and
    ``feature_rms_error``, the RMS distance to its reference's samples in the classifier's
    feature space (per sample, the same draws). ``features_of(cell name)``: that cell's
    (features, softmax), None for a cell without finite images (then the row gets nothing)."""

    own = features_of(row["name"])
    if own is None:
        return {}
    quality = sample_sets.sample_set_metrics(*own, labels, real_features)
    out = {k: quality[k] for k in ("accuracy", "noise_rate", "fid")}
    reference = features_of(row["reference"])
    if reference is not None:
        out["feature_rms_error"] = float(np.sqrt(np.mean((own[0] - reference[0]) ** 2)))
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
    table = [
        [
            f"`{r['name']}`",
            str(r["score_evaluations"]),
            f"{r['accuracy']:.3f}",
            f"{r['noise_rate']:.3f}",
            f"{r['fid']:.2f}",
            f"{r.get('feature_rms_error', float('nan')):.3g}",
        ]
        for r in scored
    ]
    head = ["cell", "score evals", "accuracy", "noise rate", "FID", "feature error"]
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


def cells_of(study_config) -> list[Cell]:
    """The grid a config's ``study`` section asks for (``configs/study.py``).

    Raises:
      ValueError: an unknown method, solver or schedule, or an empty grid.
    """
    s = study_config
    for method in s.methods:
        check_choice("study method", method, solvers.METHODS)
        if method not in s.solvers:
            raise ValueError(f"study.solvers has no {method!r} entry: give study.solvers.{method}")
    cells = grid(
        tuple(s.methods),
        {method: tuple(s.solvers[method]) for method in s.methods},
        tuple(s.aggregators),
        tuple(s.num_steps),
        tuple(s.schedules),
        tuple(s.tolerances),
    )
    if not cells:
        raise ValueError("the study's grid is empty: give methods, solvers and budgets")
    if s.num_per_class < 1:
        raise ValueError(f"study.num_per_class must be >= 1, got {s.num_per_class}")

    for procedure in s.aggregators:  # a member, with settings after a colon (mean:guidance=2)
        sample_lib.parse_procedure(procedure)
    return cells


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
    real_features = None if clf is None else _test_features(config, clf)
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
        rows = _with_quality(rows, clf, real_features, cache, labels)
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


def _test_features(config, clf) -> np.ndarray:
    """The MNIST test images in the study's classifier's features."""
    mnist = data.load_mnist(config.data.mnist_dir, config.data.tfds_data_dir)
    return classifier.test_set_features(clf, config.study.classifier, mnist.test_images)


def _with_quality(rows: list[dict], clf, real_features, cache: CellCache, labels) -> list[dict]:
    """``rows`` with their samples' quality (``sample_quality``) through ``clf`` against
    ``real_features``."""

    @functools.cache  # a reference serves many cells: its features once
    def features_of(name: str):
        images = cache.load_array(name)
        if images is None or not np.isfinite(images).all():
            return None
        return clf.features_and_probs(to_uint8(images))

    return [dict(row, **sample_quality(row, labels, features_of, real_features)) for row in rows]


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
