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

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence

import diffrax
import jax
import numpy as np
from absl import logging

from fedinf_jax.core import files, provenance
from fedinf_jax.core.registry import check_choice
from fedinf_jax.core.types import AgentParams, Key, Labels
from fedinf_jax.sampling import solvers
from fedinf_jax.sampling.aggregators import DensityState
from fedinf_jax.sampling.federated_sampler import FederatedSampler
from fedinf_jax.workflows import sample_lib

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
        rows.append(_against_reference(row, arrays, *references[ref.name][:2]))
        if report is not None:
            report(i + 1, len(cells), cell, computed)
    return rows


def _against_reference(row: dict, arrays: dict, ref_row: dict, ref_arrays: dict) -> dict:
    """A cell's ``row`` with its reference's name, its images' RMS error to the reference's
    (NaN when either has none) and, where both tracked log-densities, their drift."""
    row = dict(row, reference=ref_row["name"])
    row["rms_error"] = (
        rms_error(arrays["images"], ref_arrays["images"])
        if "images" in arrays and "images" in ref_arrays
        else float("nan")
    )
    if "log_q" in arrays and "log_q" in ref_arrays:  # (agents, N): the error per sample
        row["log_density_drift"] = rms_error(arrays["log_q"].T, ref_arrays["log_q"].T)
    return row


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
