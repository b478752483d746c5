"""The runs shipped in pretrained/cpu (pretrain.py): intact, what the cpu preset trains today,
and usable: each restores and samples, the classifier reads real digits."""

import pathlib

import numpy as np
import pytest

from configs import reproduce as reproduce_config
from fedinf_jax.agents import pretrained, runs
from fedinf_jax.core import provenance
from fedinf_jax.evaluation import classifier
from fedinf_jax.workflows import federation, pipeline, sample_lib

SHIPPED = pathlib.Path(__file__).resolve().parent.parent / "pretrained" / "cpu"
FEDERATIONS = tuple(reproduce_config.REGIME_FILES)  # control, homogeneous, heterogeneous
CONFIG = reproduce_config.get_config("cpu")


def test_every_shipped_run_is_listed_here():
    found = {p.name for p in SHIPPED.iterdir() if pretrained.is_shipped(p)}
    assert found == {"classifier", *FEDERATIONS}


@pytest.mark.parametrize("regime", FEDERATIONS)
def test_a_shipped_federation_is_the_cpu_presets_run_and_samples(regime, tmp_path, monkeypatch):
    run = SHIPPED / regime
    manifest = pretrained.verify(run)
    config = pipeline.regime_config(CONFIG, regime, "mean")
    # What the cpu preset trains today: a changed default needs `make pretrained`.
    assert (
        provenance.differences(runs.run_inputs(manifest["config"]), runs.run_inputs(config)) == []
    )
    assert manifest["step"] == config.train.num_steps == manifest["loss"][-1][0]
    assert np.asarray(manifest["counts"]).shape == (config.partition.num_agents, 10)
    config.sampler.num_steps = 2
    config.sampler.num_per_class = 1
    config.sampler.batch_size = 10
    config.sampler.progress = False
    config.agent_axis.map_unroll = 1
    restored = sample_lib.load_federation(config, str(run))
    assert pretrained.params_sha256(restored.params) == manifest["params_sha256"]
    per_agent = runs.count_params(restored.params) // restored.num_agents
    assert per_agent == manifest["params_per_agent"] == 243_833
    assert restored.config.sampler.guidance == 2.0  # the preset's guidance, on its null label
    monkeypatch.chdir(tmp_path)
    out = pathlib.Path(federation.run(config, str(run)))
    with np.load(out / "samples.npz") as f:
        assert f["images"].shape == (10, 28, 28) and f["images"].std() > 0


def test_the_shipped_classifier_reads_real_digits(mnist):
    run = SHIPPED / "classifier"
    manifest = pretrained.verify(run)
    clf = classifier.load_classifier(str(run))
    assert clf.test_accuracy == manifest["test_accuracy"] >= CONFIG.classifier.min_test_accuracy
    assert classifier.check_reuse(pipeline.classifier_config(CONFIG), str(run), False)
    _, probs = clf.features_and_probs(mnist.test_images)
    assert np.mean(probs.argmax(axis=1) == mnist.test_labels) >= 0.98
