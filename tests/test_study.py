"""Solver studies: the grid, the measurements against the reference, the cache."""

import csv
import dataclasses
import json
import shutil

import numpy as np
import pytest

from configs import study as study_config
from fedinf_jax.core import errors, provenance
from fedinf_jax.diffusion.sde import VPSDE
from fedinf_jax.sampling import aggregators, federated_sampler, solvers
from fedinf_jax.workflows import study, study_lib
from tests.test_sampling import MUS, gaussian_agents

SDE = VPSDE()
BASE = solvers.SolverSpec(method="ode", solver=solvers.make_solver("ode", "euler"), denoise=False)
REFERENCE = study.Cell("ode", "tsit5", "mean", tol=1e-6)


def _sampler_for(cell):
    return federated_sampler.FederatedSampler(
        gaussian_agents(SDE), SDE, aggregators.mean(), cell.spec(BASE), (2,)
    )


def _run(cells, cache, sampler_for=_sampler_for, reference=REFERENCE, num=64):
    """``study.run`` on the Gaussian federation, every cell against ``reference``: (rows, the
    names of the cells it computed)."""
    computed = []
    rows = study.run(
        cells,
        sampler_for,
        {"mu": MUS},
        federated_sampler.sample_keys(0, num),
        np.zeros(num, np.int32),
        cache,
        reference=lambda c: reference,
        report=lambda done, total, cell, fresh: computed.append(cell.name) if fresh else None,
    )
    return rows, computed


def test_grid_expands_budgets_schedules_and_tolerances():
    cells = study.grid(
        ("ode",), {"ode": ("euler", "tsit5")}, ("mean",), (10, 20), ("uniform", "karras"), (1e-3,)
    )
    names = [c.name for c in cells]
    assert len(names) == len(set(names)) == 2 * 2 * 2 + 1  # euler has no error estimate
    assert "ode-tsit5-tol1e-03-mean" in names and "ode-euler-karras20-mean" in names
    with pytest.raises(ValueError, match="unknown ode solver 'rk4'"):
        study.grid(("ode",), {"ode": ("rk4",)}, ("mean",), (10,))


# Each ODE solver's order and the constant budgets it is fitted on (steps where its error lies
# well above the reference's and, for the implicit ones, the root finder's 1e-5): the fitted
# slope of error against evaluations must lie within 0.5 of the order; for the fifth-order
# pairs, and Kvaerno3 (whose error at 2 and 4 steps falls faster than its asymptotic rate),
# above 3.5 and 2.5.
ODE_ORDERS = {
    "midpoint": ((8, 16), 2.0),
    "implicit_euler": ((8, 16), 1.0),
    "tsit5": ((4, 8), None),
    "dopri5": ((4, 8), None),
    "kvaerno3": ((2, 4), None),
}
AT_LEAST = {"tsit5": 3.5, "dopri5": 3.5, "kvaerno3": 2.5}


def test_study_measures_against_the_reference_and_caches_cells(tmp_path):
    """Errors to a tight tsit5 solve of the same prior draws fall at Euler's order 1 and Heun's
    order 2 (fitted per evaluation); a rerun computes nothing, an extended grid only its new
    cells (the other explicit and implicit solvers, each at its order); the results read back."""
    cache = study.CellCache(tmp_path / "cells")
    cells = study.grid(("ode",), {"ode": ("euler", "heun")}, ("mean",), (8, 16))
    rows, computed = _run(cells, cache)
    assert computed == [c.name for c in cells]
    orders = study.fitted_orders(study.series_points(rows))
    assert 0.6 < orders["ode-euler-uniform-mean"] < 1.4, orders  # theory: 1
    assert 1.5 < orders["ode-heun-uniform-mean"] < 2.5, orders  # theory: 2
    by_name = {row["name"]: row for row in rows}
    assert by_name["ode-heun-uniform8-mean"]["score_evaluations"] == 2 * 8  # no denoising step
    assert by_name["ode-euler-uniform8-mean"]["network_evaluations"] == 3 * 8  # K = 3
    assert all(row["status"] == "ok" and row["diverged_share"] == 0 for row in rows)
    assert {(row["solver"], row["calculus"], row["error_estimate"]) for row in rows} == {
        ("euler", "", False),
        ("heun", "", True),
    }

    reference, _ = cache.load(REFERENCE)  # adaptive: where its controller stepped
    step_t = np.array(reference["step_t"])
    assert len(step_t) == reference["accepted_steps"] and np.all(np.diff(step_t) < 0)
    assert step_t[-1] == pytest.approx(BASE.t_end) and 0 < reference["min_step"] < 1
    assert "step_t" not in rows[0]  # constant steps: the grid is the schedule's
    assert not any("log_density_drift" in row for row in rows)  # the mean tracks no density

    more = [
        study.Cell("ode", solver, "mean", num_steps=n)
        for solver, (steps, _) in ODE_ORDERS.items()
        for n in steps
    ]
    again, computed = _run([*cells, *more], cache)
    assert computed == [c.name for c in more]
    assert again[: len(rows)] == rows
    assert all(row["status"] == "ok" for row in again), again
    orders = study.fitted_orders(study.series_points(again))
    for solver, (_, order) in ODE_ORDERS.items():
        fitted = orders[f"ode-{solver}-uniform-mean"]
        if order is None:
            assert fitted > AT_LEAST[solver], (solver, orders)
        else:
            assert abs(fitted - order) < 0.5, (solver, orders)

    study_lib.write_results(again, tmp_path / "out", {"config": {"name": "test"}})
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["config"] == {"name": "test"} and record["rows"] == again
    with open(tmp_path / "out" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == [r["name"] for r in again]
    assert float(table[0]["rms_error"]) == pytest.approx(again[0]["rms_error"])


def test_an_implicit_stage_that_does_not_converge_fails_the_cell():
    """A root finder asked for more than float32 Newton iterations reach in ``max_steps``: the
    solve ends early, and the row says so with Diffrax's reason, not "ok"."""
    tight = dataclasses.replace(BASE, root_finder=solvers.RootFinder(rtol=1e-7, atol=1e-7))

    def sampler_for(cell):
        return federated_sampler.FederatedSampler(
            gaussian_agents(SDE), SDE, aggregators.mean(), cell.spec(tight), (2,)
        )

    cell = study.Cell("ode", "implicit_euler", "mean", num_steps=4)
    keys = federated_sampler.sample_keys(0, 8)
    row, _ = study.measure(cell, sampler_for(cell), {"mu": MUS}, keys, np.zeros(8, np.int32))
    assert row["status"] == "failed" and "nonlinear solver" in row["result"], row
    with pytest.raises(ValueError, match=r"root_finder needs rtol > 0"):
        solvers.RootFinder(rtol=0.0).check()


def test_tracked_log_densities_converge_to_the_reference_path(tmp_path):
    """``superdiff_or`` on the reverse SDE (its log-densities an Ito integral of the same
    Brownian paths): each agent's tracked log q at t_end drifts from the fine reference's by
    less as the steps shrink."""
    sde_base = dataclasses.replace(BASE, method="sde", solver=solvers.make_solver("sde", "euler"))

    def sampler_for(cell):
        agg = aggregators.superdiff_or(SDE, "sde", prior="uniform")
        return federated_sampler.FederatedSampler(
            gaussian_agents(SDE), SDE, agg, cell.spec(sde_base), (2,)
        )

    cells = [study.Cell("sde", "euler", "superdiff_or", num_steps=n) for n in (8, 32)]
    reference = study.Cell("sde", "euler", "superdiff_or", num_steps=256)
    rows, _ = _run(cells, study.CellCache(tmp_path), sampler_for, reference)
    coarse, fine = (row["log_density_drift"] for row in rows)
    assert 0 < fine < 0.5 * coarse, (coarse, fine)
    assert study.CellCache(tmp_path).load_array(reference.name, "log_q").shape == (3, 64)


def test_cheapest_cells_take_the_fewest_evaluations_that_reach_each_error():
    def row(name, evaluations, error, status="ok", aggregator="mean"):
        return {
            "name": name,
            "method": "ode",
            "aggregator": aggregator,
            "status": status,
            "score_evaluations": evaluations,
            "rms_error": error,
        }

    rows = [
        row("a", 10, 0.2),
        row("b", 20, 0.05),
        row("c", 40, 0.06),
        row("d", 5, 0.001, status="diverged"),
        row("e", 80, 0.004),
        row("f", 10, 0.15),  # ties a's evaluations with a smaller error
        row("g", 1, 0.01, aggregator="label_prior"),
    ]
    chosen = {
        (agg, level): best and best["name"]
        for _, agg, level, best in study_lib.cheapest_cells(rows, (0.3, 0.1, 0.01, 0.003))
    }
    assert chosen == {
        ("label_prior", 0.3): "g",
        ("label_prior", 0.1): "g",
        ("label_prior", 0.01): "g",
        ("label_prior", 0.003): None,
        ("mean", 0.3): "f",
        ("mean", 0.1): "b",
        ("mean", 0.01): "e",
        ("mean", 0.003): None,
    }


def test_a_refused_cell_is_recorded_with_its_reason(tmp_path):
    """A Stratonovich solver for an aggregator whose state is an Ito integral is refused, and the
    row says why; nothing is solved for it."""

    def sampler_for(cell):
        raise ValueError("this aggregator's state is driven by the SDE's noise")

    cell = study.Cell("sde", "heun", "superdiff_or", num_steps=10)
    rows, _ = _run([cell], study.CellCache(tmp_path), sampler_for, reference=cell, num=4)
    assert rows[0]["status"] == "refused" and "driven by the SDE's noise" in rows[0]["failure"]
    assert np.isnan(rows[0]["rms_error"])
    assert rows[0]["calculus"] == "stratonovich" and rows[0]["error_estimate"]  # Diffrax's Heun


def test_study_runs_on_the_smoke_run_and_resumes(smoke_run, reproduced, tmp_path, monkeypatch):
    """``study_lib.run_study`` on the session's smoke training run (copied), its samples scored by
    the smoke pipeline's classifier: its files read back, a rerun computes nothing; a bad grid is
    named before any checkpoint is read."""
    workdir = tmp_path / "run"
    shutil.copytree(smoke_run, workdir)
    config = study_config.get_config("smoke")
    config.study.num_steps = (4,)
    config.study.solvers.ode = ("euler",)
    # The plumbing, not the error: a cheap reference (Heun: a third of tsit5's stages to compile).
    config.study.reference.ode_solver, config.study.reference.ode_tol = "heun", 1e-2
    config.study.classifier = str(reproduced[0] / "classifier")
    outdir = study_lib.run_study(config, str(workdir))
    record = json.loads((tmp_path / "run" / "study" / "default" / "results.json").read_text())
    assert outdir == str(workdir / "study" / "default")
    assert record["checkpoint_step"] == 30 and record["code_version"]
    (row,) = record["rows"]
    assert row["name"] == "ode-euler-uniform4-mean" and row["status"] == "ok"
    assert row["reference"] == "ode-heun-tol1e-02-mean" and 0 < row["rms_error"] < 10
    assert row["network_evaluations"] == 2 * row["score_evaluations"]  # K = 2
    assert 0 <= row["accuracy"] <= 1 and 0 <= row["noise_rate"] <= 1 and row["fid"] > 0
    assert all(0 <= row[k] <= 1 for k in ("speckle", "black", "grey_distance"))
    assert row["feature_rms_error"] > 0  # 4 Euler steps are not the reference
    for plot in ("errors.png", "steps.png", "samples_uniform4-mean.png"):
        assert (workdir / "study" / "default" / plot).stat().st_size > 1000
    summary = (workdir / "study" / "default" / "study.md").read_text()
    assert "| `ode-euler-uniform-mean` | - |" in summary  # one budget: no fitted order
    assert "Every cell finished" in summary and "No finished adaptive cells." in summary
    assert "## Sample quality" in summary

    solved = []

    def no_solving(cell, *args, **kwargs):
        solved.append(cell.name)
        raise AssertionError("a cached cell was solved again")

    monkeypatch.setattr(study, "measure", no_solving)
    study_lib.run_study(config, str(workdir))
    # Other draws: the cached cells were made from other inputs. Refused before any solve, or
    # solved again with recompute (the patched solve is reached).
    config.study.seed = 1
    with pytest.raises(
        provenance.StaleOutputError,
        match=r"study cell ode-euler-uniform4-mean: .*study.seed: 0 -> 1",
    ):
        study_lib.run_study(config, str(workdir))
    with pytest.raises(AssertionError, match="a cached cell was solved again"):
        study_lib.run_study(config, str(workdir), recompute=True)
    config.study.seed = 0
    config.sampler.t_end = 2e-3  # a sampler setting the cells share
    with pytest.raises(provenance.StaleOutputError, match=r"sampler.t_end: 0.001 -> 0.002"):
        study_lib.run_study(config, str(workdir))
    config.sampler.t_end = 1e-3
    config.study.num_steps = (4, 8)  # a grown grid: only its new cell is solved
    solved.clear()
    with pytest.raises(AssertionError, match="a cached cell was solved again"):
        study_lib.run_study(config, str(workdir))
    assert solved == ["ode-euler-uniform8-mean"]
    config.study.num_steps = (4,)
    # Guidance as a grid axis (a procedure's settings): these agents have no null label, so the
    # guided cell is refused with the reason, and nothing is solved.
    config.study.aggregators = ("mean", "mean:guidance=2")
    solved.clear()
    study_lib.run_study(config, str(workdir))
    record = json.loads((workdir / "study" / "default" / "results.json").read_text())
    guided = [r for r in record["rows"] if r["aggregator"] == "mean:guidance=2"]
    assert [r["status"] for r in guided] == ["refused"] and solved == []
    assert "train.label_dropout > 0" in guided[0]["failure"]
    config.study.aggregators = ("mean",)
    config.study.solvers.ode = ("rk4",)
    with pytest.raises(errors.ConfigError, match="unknown ode solver 'rk4'"):
        study_lib.run_study(config, str(tmp_path / "nothing"))
    config.study.solvers.ode = ("euler",)
    config.study.classifier = str(tmp_path / "no_classifier")
    with pytest.raises(errors.MissingInputError, match="no classifier checkpoint"):
        study_lib.run_study(config, str(workdir))
