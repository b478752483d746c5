"""Shipped runs (fedinf_jax/agents/pretrained.py): a trained run exported as a read-only workdir
samples exactly like the run it came from, is verified on load, and is never written into."""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from configs import base
from configs import reproduce as reproduce_config
from fedinf_jax.agents import checkpoint, pretrained, runs
from fedinf_jax.core import errors, files, runtime
from fedinf_jax.evaluation import classifier
from fedinf_jax.workflows import federation, pipeline, pretrain_lib, sample_lib, train_lib


def _listing(folder: pathlib.Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def shipped(reproduced, tmp_path_factory) -> pathlib.Path:
    """The smoke pipeline's heterogeneous run and classifier, exported as shipped runs."""
    outdir = reproduced[0]
    dest = tmp_path_factory.mktemp("shipped")
    record = {"command": "python pretrain.py --preset=smoke"}
    pretrain_lib.export_federation(
        str(outdir / "heterogeneous"), str(dest / "heterogeneous"), "smoke", "heterogeneous", record
    )
    pretrain_lib.export_classifier(
        str(outdir / "classifier"), str(dest / "classifier"), "smoke", record
    )
    return dest


def _tiny_sampler(config):
    config.sampler.num_steps = 3
    config.sampler.num_per_class = 1
    config.sampler.batch_size = 10
    config.sampler.progress = False
    return config


def test_a_shipped_run_records_its_making_and_samples_bitwise_like_its_workdir(
    reproduced, shipped, tmp_path, monkeypatch
):
    workdir, run = reproduced[0] / "heterogeneous", shipped / "heterogeneous"
    manifest = pretrained.verify(run)
    meta = checkpoint.read_meta(workdir, 30)
    assert manifest["step"] == 30 and manifest["num_agents"] == 2
    assert manifest["counts"] == meta["counts"] and manifest["config"] == meta["config"]
    assert manifest["command"] == "python pretrain.py --preset=smoke"
    assert len(manifest["commit"]) >= 40 or manifest["commit"] == "unknown"
    on_disk = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {pretrained.MANIFEST}
    config = _tiny_sampler(base.get_config("smoke"))
    original = sample_lib.load_federation(config, str(workdir))
    restored = sample_lib.load_federation(config, str(run))
    assert manifest["params_sha256"] == pretrained.params_sha256(original.params)
    assert manifest["params_per_agent"] * 2 == runs.count_params(restored.params)
    before = _listing(run)
    monkeypatch.chdir(tmp_path)  # sample sets of a shipped run go under ./runs/pretrained
    out = federation.run(config, str(run))
    assert out == os.path.join(
        "runs", "pretrained", "smoke", "heterogeneous", "samples", "sde_dpmpp_1_mean"
    )
    ref = federation.run(config, str(workdir), str(tmp_path / "from_workdir"))
    with np.load(os.path.join(out, "samples.npz")) as a, np.load(f"{ref}/samples.npz") as b:
        np.testing.assert_array_equal(a["images"], b["images"])
    assert _listing(run) == before  # nothing written inside


def test_a_damaged_or_missing_shipped_file_is_one_error_line(shipped, tmp_path, capsys):
    run = tmp_path / "heterogeneous"
    shutil.copytree(shipped / "heterogeneous", run)
    manifest = json.loads((run / pretrained.MANIFEST).read_text())
    biggest = max(manifest["files"], key=lambda rel: (run / rel).stat().st_size)
    with open(run / biggest, "r+b") as f:
        f.truncate((run / biggest).stat().st_size // 2)
    config = _tiny_sampler(base.get_config("smoke"))
    main = runtime.exit_on_user_error(
        lambda argv: federation.run(config, str(run), str(tmp_path / "out"))
    )
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: shipped file {run / biggest} is damaged")
    assert "make pretrained" in line and not (tmp_path / "out").exists()
    (run / biggest).unlink()
    with pytest.raises(pretrained.ShippedFileError, match=r"shipped file .* is missing; restore"):
        sample_lib.load_federation(config, str(run))
    clf = tmp_path / "classifier"
    shutil.copytree(shipped / "classifier", clf)
    (clf / pretrained.MANIFEST).write_text("{")
    with pytest.raises(pretrained.ShippedFileError, match=r"pretrained.json cannot be read"):
        classifier.load_classifier(str(clf))


def test_a_shipped_run_is_never_trained_into_and_keeps_only_ema(shipped, tmp_path, monkeypatch):
    run = str(shipped / "heterogeneous")
    before = _listing(shipped)
    config = base.get_config("smoke")
    with pytest.raises(
        pretrained.ShippedRunError, match=r"is a shipped run \(read-only\): training"
    ):
        train_lib.train(config, run)
    config.sampler.use_ema = False
    with pytest.raises(pretrained.ShippedRunError, match=r"sampler\.use_ema must be true"):
        sample_lib.load_federation(config, run)
    clf_config = reproduce_config.get_config("smoke").classifier
    clf_config.train.num_steps += 1  # other settings: it would be retrained in place
    with pytest.raises(pretrained.ShippedRunError, match="training the classifier"):
        classifier.train_classifier(clf_config, str(shipped / "classifier"), recompute=True)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    monkeypatch.setenv(files.CACHE_DIR_ENV, str(tmp_path / "cache"))
    clf = classifier.load_classifier(str(shipped / "classifier"))
    images = np.zeros((3, 28, 28), np.uint8)
    classifier.test_set_features(clf, str(shipped / "classifier"), images)
    cached = tmp_path / "cache" / "pretrained" / "smoke" / "classifier" / "test_features.npz"
    assert cached.exists()  # in the user's cache: nothing in the current folder
    assert list((tmp_path / "here").iterdir()) == []
    assert _listing(shipped) == before


def test_the_pipeline_uses_shipped_runs_after_checking_them(shipped, tmp_path):
    config = reproduce_config.get_config("smoke")
    config.regimes = ("heterogeneous",)
    config.pretrained = str(shipped)
    pipeline.check_outputs(config, str(tmp_path / "out"))
    assert pipeline.run_dir(config, "out", "heterogeneous") == str(shipped / "heterogeneous")
    assert pipeline.classifier_dir(config, "out") == str(shipped / "classifier")
    config.regimes = ("control", "heterogeneous")
    with pytest.raises(
        errors.MissingInputError,
        match=r"ships no run 'control' .* shipped there: \['classifier', 'heterogeneous'\]",
    ):
        pipeline.check_pretrained(config)
    config.regimes = ("heterogeneous",)
    config.runs.heterogeneous.train.num_steps = 40
    with pytest.raises(checkpoint.CheckpointMismatchError):
        pipeline.check_outputs(config, str(tmp_path / "out"))


def test_the_first_steps_of_a_shipped_run_log_its_recorded_loss(shipped):
    """The smoke run's first 10 steps, retrained from its record: the loss at step 10 bitwise."""
    assert pretrain_lib.check_first_steps(str(shipped / "heterogeneous"), 10)
    with pytest.raises(pretrained.ShippedRunError, match=r"records its loss at steps \[10, 20, 30"):
        pretrain_lib.check_first_steps(str(shipped / "heterogeneous"), 15)


def test_the_shipped_modifier_samples_shipped_runs_without_training_or_writing_them(
    shipped, tmp_path
):
    """``PRESET,shipped`` (``make demo``): the repository's MNIST digits, the demo's procedures on
    the shipped runs, the report in the outdir; nothing is trained, the shipped folder is
    unchanged."""
    config = reproduce_config.get_config("smoke,shipped")
    assert config.pretrained == "pretrained/smoke"
    assert config.data.mnist_dir == reproduce_config.SHIPPED_MNIST_DIR
    assert os.path.isdir(reproduce_config.SHIPPED_MNIST_DIR)  # relative to the repository root
    assert config.claim_per_class == 0 and config.eval_per_class == 10
    config.pretrained, config.regimes = str(shipped), ("heterogeneous",)
    config.eval_per_class, config.sampler.num_steps = 1, 3
    config.sampler.progress = config.paper_sampler.progress = False
    before = _listing(shipped)
    report = pipeline.run(config, str(tmp_path / "demo"))
    timings = json.loads((tmp_path / "demo" / "timings.json").read_text())
    assert not [stage for stage in timings if stage.startswith(("train", "classifier"))]
    assert sorted(os.listdir(tmp_path / "demo" / "heterogeneous" / "samples")) == sorted(
        config.procedures
    )
    assert "nothing was trained here" in pathlib.Path(report).read_text()
    assert _listing(shipped) == before
