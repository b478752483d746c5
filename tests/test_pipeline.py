"""The reproduction pipeline (reproduce.py): end to end on the smoke preset, resumption, configs."""

import json
import os
import re
import shutil

import numpy as np
import pytest

import evaluate
from configs import homo, reproduce
from fedinf_jax.core import errors
from fedinf_jax.evaluation import report
from fedinf_jax.workflows import pipeline
from tests.conftest import REPRODUCE_PROCEDURES, SUPERDIFF_OR, run_reproduce

PROCEDURES = REPRODUCE_PROCEDURES


def _section(report: str, title: str) -> list[str]:
    """The lines of ``## title...`` up to the next ``## `` heading."""
    body = report.split("\n## " + title, 1)[1].split("\n## ", 1)[0]
    return body.splitlines()


def _table_rows(lines: list[str]) -> list[list[str]]:
    rows = [line for line in lines if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def test_report_tables_parse(reproduced):
    outdir, log = reproduced
    assert "stage train/heterogeneous: reused" in log  # the copied run is at num_steps
    report = (outdir / "report.md").read_text()

    # What was trained: the smoke preset's heterogeneous agents (the copied run).
    agents = _table_rows(_section(report, "The agents"))
    assert agents == [["heterogeneous", "2", "heterogeneous", "(8, 16)", "30 x 8", "-"]]

    table1 = _table_rows(_section(report, "Table 1"))
    assert [(r[0], r[1]) for r in table1] == [("MNIST train", "real images")] + [
        ("heterogeneous", p) for p in PROCEDURES
    ]
    for row in table1:
        is_mean, is_std = (float(v) for v in row[2].split("+-"))
        assert 1.0 <= is_mean <= 10.0 and is_std >= 0.0
        fid, accuracy, noise, precision, recall = (float(v.split("+-")[0]) for v in row[3:8])
        for cell in row[4:6]:  # accuracy and noise rate: p +- sqrt(p (1 - p) / n)
            p, se = (float(v) for v in cell.split("+-"))
            assert se == pytest.approx(np.sqrt(p * (1 - p) / 20), abs=6e-4)
        fid_se = float(row[3].split("+-")[1])  # a bootstrap over the set (test_metrics)
        assert fid >= 0.0 and fid_se >= 0.0
        assert all(0.0 <= v <= 1.0 for v in (accuracy, noise, precision, recall))
        speckle, black, grey_distance = (float(v) for v in row[8:11])
        assert all(0.0 <= v <= 1.0 for v in (speckle, black, grey_distance))
    assert table1[0][11:] == ["-", "-"]  # real images: no sampler
    assert float(table1[0][8]) < 0.02  # real digits' background: clean
    for row in table1[1:]:
        assert int(row[11]) > 0 and float(row[12]) >= 0.0

    # Both sets ask both agents at every evaluation; a FedAvg round moves 2 x 2 x P x 4 bytes.
    traffic = _table_rows(_section(report, "Communication"))
    assert [(r[0], r[1], r[2]) for r in traffic] == [("heterogeneous", p, "2") for p in PROCEDURES]
    for row in traffic:
        assert int(row[3]) > 0 and float(row[4]) > 0 and float(row[5]) > 0

    grids = re.findall(r"!\[[^]]*\]\(([^)]+)\)", "\n".join(_section(report, "Figure 2")))
    assert len(grids) == len(PROCEDURES)
    assert all(os.path.getsize(outdir / g) > 1000 for g in grids)
    # superdiff_or's agents' weights: saved along its trajectory, plotted, each summing to one.
    plots = re.findall(r"!\[[^]]*\]\(([^)]+)\)", "\n".join(_section(report, "The agents' w")))
    assert plots == [f"heterogeneous/samples/{SUPERDIFF_OR}/weights.png"]
    assert os.path.getsize(outdir / plots[0]) > 1000
    with np.load(outdir / f"heterogeneous/samples/{SUPERDIFF_OR}/samples.npz") as f:
        weights, trajectory_weights = f["weights"], f["trajectory_weights"]
    assert weights.shape == (2, 20) and trajectory_weights.shape == (11, 2, 20)
    np.testing.assert_allclose(trajectory_weights.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(trajectory_weights[-1], weights, rtol=1e-5)

    agreement = _section(report, "Tables 3/4")
    times = [line for line in agreement if line.startswith("t = ")]
    assert [float(line.split()[2].rstrip(":")) for line in times] == [1.0, 0.5, 0.1, 0.01]
    rows = _table_rows(agreement[agreement.index(times[0]) :])[:2]
    assert [r[:2] for r in rows] == [["noise", "heterogeneous"], ["label", "heterogeneous"]]
    for cell in rows[0][2:]:
        magnitude, cosine = (float(v.split("+-")[0]) for v in cell.split("/"))
        assert magnitude > 0.0 and -1.0 <= cosine <= 1.0
    assert len(rows[0]) == 2 + 10

    metrics = json.loads((outdir / "metrics.json").read_text())
    assert metrics["reference_mnist_train"]["num_samples"] == 20  # smoke: 2 per digit
    assert set(metrics["results"]) == {f"heterogeneous/{p}" for p in PROCEDURES}
    # The claim set: the best corrected procedure of Table 1, sampled again (smoke: 1 per digit).
    best = max(
        (r for r in metrics["results"].values() if r["procedure"] != "paper"),
        key=lambda r: (r["accuracy"], -r["noise_rate"]),
    )["procedure"]
    assert list(metrics["claims"]) == [f"heterogeneous/{best}"]
    assert metrics["claims"][f"heterogeneous/{best}"]["num_samples"] == 10
    claim_rows = _table_rows(_section(report, "The claim sets"))
    assert [r[:2] for r in claim_rows] == [["heterogeneous", best]]
    rows = json.loads((outdir / "agreement.json").read_text())["rows"]
    assert len(rows) == 3 * 2 * 10 * 4  # mean, label_prior, superdiff_and
    assert {r["aggregator"] for r in rows} == {"mean", "label_prior", "superdiff_and"}
    summary = _table_rows(_section(report, "Agreement at a glance"))
    assert [r[:3] for r in summary] == [
        [name, kind, "heterogeneous"]
        for name in ("mean", "label_prior", "superdiff_and")
        for kind in ("noise", "label")
    ]
    for name in ("label_prior", "superdiff_and"):
        assert len(_table_rows(_section(report, f"Tables 3/4 under `{name}`"))) >= 2
    timings = json.loads((outdir / "timings.json").read_text())
    assert {"classifier", "agreement/heterogeneous"} <= set(timings)


def test_rerun_reuses_every_finished_stage(reproduced):
    outdir, _ = reproduced
    outputs = [
        outdir / "timings.json",
        outdir / "agreement.json",
        *(outdir / "heterogeneous" / "samples" / p / "samples.npz" for p in PROCEDURES),
        *(outdir / "heterogeneous" / "claims").glob("*/samples.npz"),
    ]
    assert len(outputs) == 3 + len(PROCEDURES)
    before = [os.stat(p).st_mtime_ns for p in outputs]
    log = run_reproduce(outdir)
    assert [os.stat(p).st_mtime_ns for p in outputs] == before
    assert "running" not in " ".join(line for line in log.splitlines() if "stage " in line)
    for stage in ("classifier", "train/heterogeneous", "agreement"):
        assert f"stage {stage}: reused" in log


def _files(folder) -> dict:
    """Every file under ``folder`` with its modification time."""
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


# One determining field of each cached stage, changed: (the change, what the error names).
STALE_CASES = {
    "sample set": (
        lambda c: setattr(c.sampler, "num_steps", 4),
        f"sample/heterogeneous/{SUPERDIFF_OR}: .* sampler.num_steps: 8 -> 4",
    ),
    "the sets' seed": (
        lambda c: setattr(c, "seed", 1),
        "sample/heterogeneous/paper: .* sampler.seed: 0 -> 1",
    ),
    "an aggregator's setting": (
        lambda c: setattr(c.runs.heterogeneous.aggregator.superdiff_or, "temperature", 0.5),
        rf"sample/heterogeneous/{SUPERDIFF_OR}: .*aggregator.superdiff_or.temperature: 1.0 -> 0.5",
    ),
    "claim set": (
        lambda c: setattr(c, "claim_per_class", 2),
        r"claim/heterogeneous/[\w:=,]+: .*sampler.num_per_class: 1 -> 2",
    ),
    "agreement": (
        lambda c: setattr(c, "agreement_samples", 5),
        r"agreement: .*agreement.json .*agreement_samples: 10 -> 5",
    ),
    "classifier": (
        lambda c: setattr(c.classifier.train, "num_steps", 21),
        r"classifier: .*classifier .*train.num_steps: 20 -> 21",
    ),
    "training": (
        lambda c: setattr(c.runs.heterogeneous.train, "learning_rate", 1e-3),
        r"the run in .*heterogeneous was trained with other settings \(train.learning_rate: "
        r"0.002 -> 0.001\)",
    ),
}


def _smoke_pipeline_config():
    """``run_reproduce``'s config (conftest), in process."""
    config = reproduce.get_config("smoke")
    config.regimes, config.procedures = ("heterogeneous",), PROCEDURES
    return config


def test_a_rerun_with_other_settings_stops_before_any_work(reproduced, tmp_path):
    """Each cached stage with one determining field changed: the rerun stops with an error that
    names the stage and the field (old -> new), and nothing in the output folder changes."""
    outdir = tmp_path / "out"
    shutil.copytree(reproduced[0], outdir)
    before = _files(outdir)
    for name, (change, message) in STALE_CASES.items():
        config = _smoke_pipeline_config()
        change(config)
        with pytest.raises(errors.UserError, match=message):
            pipeline.run(config, str(outdir))
        assert _files(outdir) == before, name


def test_recompute_redoes_only_what_changed(reproduced, tmp_path):
    """``--recompute``: the agreement tables, made with 10 points, are made again with 5 and
    replaced; the sample sets, whose inputs did not change, are not touched."""
    outdir = tmp_path / "out"
    shutil.copytree(reproduced[0], outdir)
    sets = [p for p in _files(outdir) if p.name == "samples.npz"]
    before = {p: p.stat().st_mtime_ns for p in sets}
    config = _smoke_pipeline_config()
    config.agreement_samples = 5
    pipeline.run(config, str(outdir), recompute=True)
    assert {p: p.stat().st_mtime_ns for p in sets} == before
    agreement = json.loads((outdir / "agreement.json").read_text())
    assert agreement["made_by"]["inputs"]["agreement_samples"] == 5
    assert agreement["made_by"]["inputs"] == pipeline.agreement_inputs(config)
    pipeline.check_outputs(config, str(outdir))  # everything now matches the new settings


def test_evaluate_cli_matches_the_pipeline(reproduced, mnist, tmp_path):
    outdir, _ = reproduced
    clf_dir = str(outdir / "classifier")
    sample_dir = tmp_path / "superdiff_or"
    shutil.copytree(outdir / f"heterogeneous/samples/{SUPERDIFF_OR}", sample_dir)
    missing = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"'.*nothing' is not a sample set: .*samples.npz"):
        evaluate.evaluate(clf_dir, [str(sample_dir), missing], mnist)
    assert not (sample_dir / "metrics.json").exists()  # checked before anything is written
    with pytest.raises(FileNotFoundError, match=r"no classifier checkpoint in '.*nothing'"):
        evaluate.evaluate(missing, [str(sample_dir)], mnist)

    (printed,) = evaluate.evaluate(clf_dir, [str(sample_dir)], mnist, write=False).values()
    assert not (sample_dir / "metrics.json").exists()  # --nowrite_metrics: printed only
    (result,) = evaluate.evaluate(clf_dir, [str(sample_dir)], mnist).values()
    assert printed == result
    result = json.loads(json.dumps(result))
    pipeline_result = json.loads((outdir / "metrics.json").read_text())["results"]
    expected = pipeline_result[f"heterogeneous/{SUPERDIFF_OR}"]
    assert result == {k: v for k, v in expected.items() if k not in ("regime", "procedure")}
    written = json.loads((sample_dir / "metrics.json").read_text())
    assert written == dict(result, classifier=clf_dir)


def test_timings_add_an_interrupted_attempt_to_the_stage(tmp_path, monkeypatch):
    clock = iter([100.0, 130.0, 200.0, 210.0])
    monkeypatch.setattr(pipeline.time, "time", lambda: next(clock))
    timings = pipeline.Timings(str(tmp_path / "timings.json"))

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        timings.run("train/control", interrupted)
    assert json.loads((tmp_path / "timings.json").read_text()) == {
        "train/control (interrupted)": 30.0
    }
    resumed = pipeline.Timings(str(tmp_path / "timings.json"))  # the rerun
    assert resumed.run("train/control", lambda: "done") == "done"
    assert json.loads((tmp_path / "timings.json").read_text()) == {"train/control": 40.0}


def test_claim_procedures_pick_the_best_corrected_set():
    config = reproduce.get_config("smoke")
    config.regimes = ("control", "heterogeneous")

    def row(regime, procedure, accuracy, noise):
        return {"regime": regime, "procedure": procedure, "accuracy": accuracy, "noise_rate": noise}

    results = {
        f"{r}/{p}": row(r, p, a, n)
        for r, p, a, n in [
            ("control", "paper", 0.9, 0.0),
            ("control", "mean", 0.5, 0.1),
            ("heterogeneous", "paper", 0.99, 0.0),  # the paper's procedure is never the claim
            ("heterogeneous", "mean", 0.7, 0.1),
            ("heterogeneous", "label_prior", 0.8, 0.05),
            ("heterogeneous", "superdiff_or", 0.8, 0.02),  # the tie goes to less noise
        ]
    }
    assert pipeline.claim_procedures(config, results) == {
        "control": "mean",
        "heterogeneous": "superdiff_or",
    }
    claim = pipeline.claim_config(config, "heterogeneous", SUPERDIFF_OR)
    assert claim.sampler.num_per_class == config.claim_per_class
    assert claim.sampler.seed == config.seed + 1 and claim.sampler.save_trajectory == 0


def test_procedures_and_regime_configs():
    config = reproduce.get_config("cpu")
    control = pipeline.regime_config(config, "control")
    assert pipeline.procedures_for(control, config.procedures) == ["paper", "mean"]
    hetero = pipeline.regime_config(config, "heterogeneous", "label_prior")
    assert hetero.partition.num_agents == 10 and hetero.aggregator.name == "label_prior"
    assert hetero.sampler.num_per_class == config.eval_per_class
    paper = pipeline.regime_config(config, "homogeneous", "paper")
    sampler = paper.sampler
    assert (sampler.method, sampler.t_end, sampler.denoise) == ("ode", 0.05, False)
    assert paper.aggregator.name == "mean"
    with pytest.raises(ValueError, match=r"unknown procedure 'avg'; valid: \['paper', "):
        pipeline.regime_config(config, "heterogeneous", "avg")
    with pytest.raises(ValueError, match="unknown regime 'iid'"):
        pipeline.regime_config(config, "iid")
    demo = reproduce.get_config("demo")
    assert demo.procedures == ("paper", "mean", SUPERDIFF_OR)
    # The density-weighted members: Euler-Maruyama (the cpu preset's at 100 steps), their
    # trajectory saved under any settings.
    superdiff = pipeline.regime_config(config, "heterogeneous", "superdiff_or:top_k=1,solver=euler")
    assert superdiff.sampler.save_trajectory == config.trajectory_times
    assert "superdiff_or:solver=euler,num_steps=100" in config.procedures
    assert hetero.sampler.save_trajectory == 0
    assert (hetero.sampler.method, hetero.sampler.solver) == ("sde", "dpmpp_1")
    assert (demo.classifier.preset, demo.sampler.num_steps) == ("demo", 25)
    assert config.classifier.preset == "cpu" and config.sampler.num_steps == 25
    # The paper's procedure: the regime's config under the paper_sampler modifier.
    expected = homo.get_config("cpu,paper_sampler")
    expected.sampler.update(num_per_class=config.eval_per_class, seed=config.seed)
    assert paper.to_dict() == expected.to_dict()
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        reproduce.get_config("huge")


def test_a_procedure_can_set_its_members_settings():
    config = reproduce.get_config("cpu")
    top1 = pipeline.regime_config(config, "heterogeneous", "label_prior:top_k=1")
    assert top1.aggregator.name == "label_prior" and top1.aggregator.label_prior.top_k == 1
    both = pipeline.regime_config(
        config, "heterogeneous", "superdiff_or:top_k=2, temperature=0.5, prior=shares"
    )
    assert dict(both.aggregator.superdiff_or) == dict(
        probes=1, top_k=2, temperature=0.5, prior="shares"
    )
    assert pipeline.parse_procedure("route") == ("route", {})
    guided = pipeline.regime_config(config, "heterogeneous", "label_prior:top_k=1,guidance=2")
    assert guided.sampler.guidance == 2 and guided.aggregator.label_prior.top_k == 1
    # The cpu preset guides at w = 2 (configs/base.py); the paper's procedure stays unguided.
    assert top1.sampler.guidance == 2 and "guidance" not in guided.aggregator.label_prior
    unguided = pipeline.regime_config(config, "heterogeneous", "label_prior:guidance=1")
    assert unguided.sampler.guidance == 1
    assert pipeline.regime_config(config, "heterogeneous", "paper").sampler.guidance == 1
    with pytest.raises(
        ValueError, match=r"unknown setting of label_prior 'k'; valid: \['top_k', 'guidance', 'gui"
    ):
        pipeline.parse_procedure("label_prior:k=1")
    with pytest.raises(ValueError, match="settings are name=value, got 'top_k'"):
        pipeline.parse_procedure("label_prior:top_k")
    config.procedures = ("mean", "label_prior:top_k=11")
    with pytest.raises(
        errors.ConfigError, match=r"homogeneous/label_prior:top_k=11: .* top_k must"
    ):
        pipeline.check_config(config)
    config.procedures = ("mean:guidance=2",)
    pipeline.check_config(config)  # the cpu preset's agents learn the null label
    for run in config.runs.values():
        run.train.label_dropout = 0.0
    with pytest.raises(errors.ConfigError, match=r"control/mean:guidance=2: sampler.guidance"):
        pipeline.check_config(config)


def test_ratios_to_control_and_the_papers():
    def result(regime, procedure, is_, fid, accuracy, noise):
        return dict(regime=regime, procedure=procedure, inception_score=is_, fid=fid,
                    accuracy=accuracy, noise_rate=noise)  # fmt: skip

    results = {
        "control/paper": result("control", "paper", 5.0, 2.0, 0.9, 0.1),
        "control/mean": result("control", "mean", 8.0, 1.0, 0.95, 0.0),
        "heterogeneous/paper": result("heterogeneous", "paper", 2.5, 10.0, 0.5, 0.6),
        "heterogeneous/label_prior": result("heterogeneous", "label_prior", 8.0, 1.5, 0.9, 0.02),
    }
    rows = _table_rows(report.ratio_table(results))
    assert rows == [
        ["heterogeneous", "paper", "0.50", "5.0", "-0.400", "+0.500", "0.53", "22.9"],
        ["heterogeneous", "label_prior", "1.00", "1.5", "-0.050", "+0.020", "0.53", "22.9"],
    ]
    del results["control/mean"]
    assert len(_table_rows(report.ratio_table(results))) == 1
    assert report.ratio_table({"heterogeneous/paper": results["heterogeneous/paper"]}) == []


def test_the_heterogeneity_sweep_is_regimes_of_its_own(tmp_path):
    """``PRESET,sweep``: one federation per (partition, seed), sampled under the sweep's
    procedures (the pooled control under the mean only); the summary is the mean and standard
    error over the seeds; a bad partition setting is named with the valid ones."""
    config = reproduce.get_config("demo,sweep")
    assert pipeline.sweep_runs(reproduce.get_config("demo")) == {}
    runs = pipeline.sweep_runs(config)
    assert len(runs) == len(reproduce.SWEEP_PARTITIONS) * 3
    cfg = runs["sweep_dirichlet:alpha=0.1_seed2"]
    assert (cfg.partition.name, cfg.partition.alpha, cfg.partition.num_agents) == (
        "dirichlet",
        0.1,
        10,
    )
    assert cfg.partition.seed == cfg.seed == 2
    assert runs["sweep_pathological:classes_per_agent=1_seed0"].partition.classes_per_agent == 1
    assert runs["sweep_control_seed1"].partition.num_agents == 1
    assert pipeline.regime_procedures(config, "sweep_control_seed1") == ["mean"]
    assert pipeline.regime_procedures(config, "sweep_dirichlet:alpha=0.1_seed2") == [
        "mean",
        "label_prior",
        SUPERDIFF_OR,
        "route",
    ]
    route = pipeline.regime_config(config, "sweep_dirichlet:alpha=0.1_seed2", "route")
    assert route.aggregator.name == "route" and route.partition.alpha == 0.1
    scaling = pipeline.sweep_runs(reproduce.get_config("demo,scaling"))
    assert [scaling[f"sweep_heterogeneous:num_agents={k}_seed0"].partition.num_agents
            for k in (2, 5, 10, 20)] == [2, 5, 10, 20]  # fmt: skip
    config.sweep.partitions = ("dirichlet:beta=1.0",)
    with pytest.raises(errors.ConfigError, match=r"sweep: unknown setting of dirichlet 'beta'"):
        pipeline.check_config(config)

    config = reproduce.get_config("demo,sweep")
    config.sweep.partitions = ("control", "dirichlet:alpha=0.1")
    results = {}
    for seed, accuracy in enumerate((0.5, 0.7, 0.9)):
        for spec, procedures in (("control", ["mean"]), ("dirichlet:alpha=0.1", ["mean", "route"])):
            for procedure in procedures:
                bump = 0.05 if procedure == "route" else 0.0
                results[f"sweep_{spec}_seed{seed}/{procedure}"] = dict(
                    accuracy=accuracy + bump,
                    noise_rate=0.1,
                    fid=float(seed),
                    speckle=0.01 * seed,
                    sampling_wall_time_s=9.0,
                )
    rows = pipeline.sweep_summary(config, results)
    assert [(r["partition"], r["procedure"], r["seeds"]) for r in rows] == [
        ("control", "mean", 3),
        ("dirichlet:alpha=0.1", "mean", 3),
        ("dirichlet:alpha=0.1", "route", 3),
    ]
    assert rows[2]["accuracy"] == pytest.approx(0.75)
    assert rows[0]["accuracy_se"] == pytest.approx(0.2 / np.sqrt(3))  # std 0.2 over 3 seeds
    assert rows[0]["noise_rate_se"] == pytest.approx(0.0) and rows[0]["fid"] == 1.0
    table = _table_rows(report.sweep_table(rows))
    assert table[2] == ["dirichlet:alpha=0.1", "route", "3", "0.750 +- 0.115", "0.100 +- 0.000",
                        "1.00 +- 0.58", "0.010 +- 0.006", "9"]  # fmt: skip
    from fedinf_jax.workflows import plots

    assert os.path.getsize(plots.plot_sweep(rows, str(tmp_path / "sweep.png"), "K scaling")) > 1000
