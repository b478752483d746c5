"""What made an output: inputs, digests, and the rerun's decision
(fedinf_jax/core/provenance.py)."""

import json

import ml_collections
import numpy as np
import pytest

from configs import hetero
from fedinf_jax.agents import checkpoint, runs
from fedinf_jax.core import provenance
from fedinf_jax.models import optim
from fedinf_jax.workflows import sample_lib, train_lib


def test_flatten_and_digest_are_canonical():
    tree = {"b": {"y": (1, 2), "x": 0.5}, "a": "s"}
    assert provenance.flatten(tree) == {"b.y": [1, 2], "b.x": 0.5, "a": "s"}
    # Key order and tuple-or-list do not matter; a value does.
    same = {"a": "s", "b": {"x": 0.5, "y": [1, 2]}}
    assert provenance.digest(provenance.flatten(tree)) == provenance.digest(
        provenance.flatten(same)
    )
    other = provenance.flatten({"a": "s", "b": {"x": 0.25, "y": [1, 2]}})
    assert provenance.digest(other) != provenance.digest(provenance.flatten(tree))
    config = ml_collections.ConfigDict(tree)
    assert provenance.config_fields(config, ("b", "missing")) == {"b.y": [1, 2], "b.x": 0.5}


def test_check_reuse_reuses_recomputes_or_names_each_change():
    stored = {"sampler.num_steps": 8, "aggregator.name": "mean", "gone": 1}
    current = {"sampler.num_steps": 4, "aggregator.name": "mean", "new": 2}
    assert provenance.check_reuse("sample/x", "/out/x", stored, dict(stored), False)
    assert not provenance.check_reuse("sample/x", "/out/x", stored, current, True)
    with pytest.raises(provenance.StaleOutputError) as info:
        provenance.check_reuse("sample/x", "/out/x", stored, current, False)
    message = str(info.value)
    assert message.startswith("sample/x: /out/x was made with other settings")
    for change in ("gone: 1 -> '(absent)'", "new: '(absent)' -> 2", "sampler.num_steps: 8 -> 4"):
        assert change in message
    assert "a fresh --outdir" in message and "--recompute" in message
    with pytest.raises(provenance.StaleOutputError, match="no record of the settings"):
        provenance.check_reuse("agreement", "/out/a.json", None, current, False)
    record = {provenance.RECORD_KEY: provenance.record(current)}
    assert provenance.stored_inputs(record) == current and provenance.stored_inputs({}) is None


def _record(config) -> dict:
    """The JSON config a checkpoint's record holds (``train_lib.run_record``)."""
    return json.loads(config.to_json_best_effort())


@pytest.mark.parametrize(
    "path, value, named",
    [
        ("train.learning_rate", 1e-3, "train.learning_rate: 0.002 -> 0.001"),
        ("seed", 1, "seed: 0 -> 1"),
        ("train.batch_size", 4, "train.batch_size: 8 -> 4"),
        ("train.noise", "lognormal", "train.noise: 'uniform_t' -> 'lognormal'"),
        ("partition.seed", 2, "partition.seed: 0 -> 2"),
    ],
)
def test_resume_refuses_a_field_of_the_run(path, value, named):
    config = hetero.get_config("smoke")
    record = _record(config)
    section, _, field = path.rpartition(".")
    (config[section] if section else config)[field] = value
    with pytest.raises(checkpoint.CheckpointMismatchError, match="other settings") as info:
        train_lib.check_resume(record, config, "/w", step=30)
    assert named in str(info.value)


def test_resume_allows_free_fields_and_fields_the_record_lacks():
    config = hetero.get_config("smoke")
    record = _record(config)
    del record["train"]["p_std"]  # a field added since the run was trained: its default
    config.train.log_every, config.train.checkpoint_every = 7, 3
    config.data.mnist_dir = "/elsewhere"
    config.sampler.num_steps, config.agent_axis.train = 3, "map"
    train_lib.check_resume(record, config, "/w", step=30)
    assert set(runs.FREE_FIELDS).isdisjoint(runs.run_inputs(config))


def test_num_steps_may_change_only_where_the_schedules_agree():
    """A cosine schedule spans num_steps: past the warm-up an extension is refused; inside the
    warm-up (the schedules agree), or with a constant schedule, it is the longer run's."""
    config = hetero.get_config("smoke")  # 30 steps, 5 warm-up, cosine to 0.01 x
    record = _record(config)
    config.train.num_steps = 60
    with pytest.raises(checkpoint.CheckpointMismatchError, match="other learning rates"):
        train_lib.check_resume(record, config, "/w", step=30)
    train_lib.check_resume(record, config, "/w", step=5)  # only warm-up steps taken
    config.train.num_steps = 20
    with pytest.raises(checkpoint.CheckpointMismatchError, match="past step 20"):
        train_lib.check_resume(record, config, "/w", step=30)
    config = hetero.get_config("smoke")
    config.train.end_lr_factor = 1.0  # constant after the warm-up
    record = _record(config)
    config.train.num_steps = 60
    train_lib.check_resume(record, config, "/w", step=30)
    before = optim.make_schedule(ml_collections.ConfigDict(record["train"]))
    after = optim.make_schedule(config.train)
    np.testing.assert_array_equal(before(np.arange(30)), after(np.arange(30)))


def test_sample_set_inputs_are_the_run_the_step_and_how_to_sample():
    config = hetero.get_config("smoke")
    inputs = sample_lib.sample_set_inputs(config, 30)
    assert inputs["run"] == runs.run_digest(config) and inputs["checkpoint_step"] == 30
    assert inputs["sampler.num_steps"] == 8 and inputs["aggregator.name"] == "mean"
    for field in sample_lib.EXECUTION_FIELDS:
        assert field not in inputs
    assert not [k for k in inputs if k.startswith("aggregator.superdiff_or")]  # not its member
    config.aggregator.name = "superdiff_or"
    assert inputs != sample_lib.sample_set_inputs(config, 30)
    assert sample_lib.sample_set_inputs(config, 30)["aggregator.superdiff_or.temperature"] == 1.0
    how = config.copy_and_resolve_references()
    how.sampler.batch_size, how.sampler.progress, how.conv_impl = 3, False, "matmul"
    how.agent_axis.score, how.data.mnist_dir = "map", "/elsewhere"
    assert sample_lib.sample_set_inputs(how, 30) == sample_lib.sample_set_inputs(config, 30)
    config.train.learning_rate = 1.0  # another run
    assert sample_lib.sample_set_inputs(config, 30)["run"] != inputs["run"]
