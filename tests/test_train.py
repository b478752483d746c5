"""End to end: train.py in a subprocess, resume equivalence, checkpoints, bad inputs."""

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base, hetero
from fedinf_jax.agents import checkpoint, runs
from fedinf_jax.core import errors
from fedinf_jax.data import digits
from fedinf_jax.workflows import federation, plots, sample_lib, train_lib
from tests.conftest import count_compiles, micro_config, zero_fill_data_files


def _abstract_state(config, num_agents):
    return train_lib.abstract_train_state(runs.resolve(config), num_agents)


def _restore(workdir, config):
    manager = checkpoint.make_manager(workdir, create=False)
    try:
        return checkpoint.restore(manager, _abstract_state(config, config.partition.num_agents))
    finally:
        manager.close()


@pytest.fixture(scope="module")
def cli_workdir(smoke_run):
    return smoke_run


def test_cli_writes_checkpoints_and_tensorboard(cli_workdir):
    config = hetero.get_config("smoke")
    steps = sorted(int(os.path.basename(p)) for p in glob.glob(f"{cli_workdir}/checkpoints/*"))
    assert steps == [10, 20, 30]
    assert glob.glob(f"{cli_workdir}/events.out.tfevents.*")
    scalars = plots.read_scalars(str(cli_workdir))
    np.testing.assert_array_equal(scalars["loss"][0], [10, 20, 30])
    assert {"loss/agent_0", "loss/agent_1", "learning_rate", "steps_per_sec"} <= set(scalars)
    assert os.path.getsize(cli_workdir / "training_loss.png") > 1000
    state, meta = _restore(cli_workdir, config)
    assert int(state.step) == 30
    assert isinstance(state.opt_state[1][0], optax.ScaleByAdamState)
    assert meta["num_agents"] == 2 and meta["partition"] == "heterogeneous"
    counts = np.asarray(meta["counts"])
    assert counts.shape == (2, 10) and counts[0, 0] > counts[0, 1]
    assert meta["config"]["model"]["block_out_channels"] == [8, 16]


def test_sampling_restores_the_parameters_alone(cli_workdir):
    """``checkpoint.restore_params`` (what sampling reads, no optimizer state) gives exactly the
    parameters and EMA parameters a full restore gives, and refuses another model."""
    config = hetero.get_config("smoke")
    state, _ = _restore(cli_workdir, config)
    model = runs.resolve_score(config).model
    abstract = runs.abstract_agent_params(model, 2)
    for field in ("params", "ema_params"):
        got = checkpoint.restore_params(cli_workdir, abstract, 30, field, num_agents=2)
        want = getattr(state, field)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
    config.model.block_out_channels = (8, 32)
    other = runs.abstract_agent_params(runs.resolve_score(config).model, 2)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="arrays differ"):
        checkpoint.restore_params(cli_workdir, other, 30, "ema_params", num_agents=2)


def _micro_resume_config():
    config = micro_config()
    config.train.num_steps = 12
    config.train.checkpoint_every = config.train.log_every = 4
    return config


@pytest.fixture(scope="module")
def micro_straight(tmp_path_factory):
    """``_micro_resume_config()`` trained straight to step 12 (checkpoints 4, 8, 12). Tests read
    it or copy it."""
    workdir = tmp_path_factory.mktemp("micro") / "straight"
    train_lib.train(_micro_resume_config(), str(workdir))
    return workdir


def _assert_same_state(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_resumed_run_equals_uninterrupted(micro_straight, tmp_path):
    """Stopped at step 8 (after the 5 warm-up steps, inside the cosine decay) and resumed to 12,
    a run ends bitwise where a straight run ends; resuming in the same process compiles nothing
    new (the restored state has a fresh state's signature)."""
    config = _micro_resume_config()
    resumed = tmp_path / "resumed"
    train_lib.train(config, str(resumed), stop_at=8)
    state, _ = _restore(resumed, config)
    assert int(state.step) == 8
    with count_compiles() as compiles:
        train_lib.train(config, str(resumed))
    assert compiles == []
    a, _ = _restore(resumed, config)
    b, _ = _restore(micro_straight, config)
    assert int(a.step) == config.train.num_steps
    _assert_same_state(a, b)


def test_a_finished_run_refuses_other_settings_before_reading_data(micro_straight, monkeypatch):
    """A new learning rate, seed or batch on a finished run: one error naming the field, before
    any data is read; a new log interval is no other run (nothing trained, nothing compiled)."""
    monkeypatch.setattr(digits, "load_mnist", lambda *a: pytest.fail("data read"))
    for path, value in (("learning_rate", 1e-3), ("batch_size", 2), ("seed", 3)):
        config = _micro_resume_config()
        (config if path == "seed" else config.train)[path] = value
        name = path if path == "seed" else f"train.{path}"
        with pytest.raises(checkpoint.CheckpointMismatchError, match=f"{name}: "):
            train_lib.train(config, str(micro_straight))
    config = _micro_resume_config()
    config.train.num_steps = 16  # the cosine decay of 12 steps is not the first 12 of 16
    with pytest.raises(checkpoint.CheckpointMismatchError, match="other learning rates"):
        train_lib.train(config, str(micro_straight))
    monkeypatch.undo()
    config = _micro_resume_config()
    config.train.log_every, config.train.keep_checkpoints = 6, 5
    before = sorted(os.listdir(micro_straight / "checkpoints"))
    with count_compiles() as compiles:
        state = train_lib.train(config, str(micro_straight))
    assert int(state.step) == 12 and compiles == []
    assert sorted(os.listdir(micro_straight / "checkpoints")) == before


def test_training_resumes_from_the_newest_intact_step(micro_straight, tmp_path, caplog):
    """The latest step's data files zero-filled (a full disk, an interrupted copy): the run says
    so, moves that step aside (nothing deleted) and resumes from step 8, ending bitwise at the
    straight run's step 12."""
    config = _micro_resume_config()
    workdir = tmp_path / "damaged"
    shutil.copytree(micro_straight, workdir)
    zero_fill_data_files(workdir / "checkpoints" / "12")
    with caplog.at_level("WARNING"):
        state = train_lib.train(config, str(workdir))
    assert "skipping checkpoint step 12, which cannot be read" in caplog.text
    assert (workdir / checkpoint.DAMAGED_DIR / "12").is_dir()
    assert checkpoint.latest_step(str(workdir)) == 12
    straight, _ = _restore(micro_straight, config)
    _assert_same_state(state, straight)


def test_training_lowers_the_loss_on_mnist(cli_workdir, mnist):
    config = hetero.get_config("smoke")
    comp = runs.resolve(config)
    trained, _ = _restore(cli_workdir, config)
    initial = runs.init_agents(comp.model, 2, jax.random.split(runs.make_key(0))[0])
    loss_fn = jax.jit(
        jax.vmap(
            train_lib.make_loss_fn(comp.model, comp.sde, param=comp.param),
            in_axes=(0, None, None, None),
        )
    )
    x = jnp.asarray(digits.to_model_input(mnist.test_images[:64]))
    y = jnp.asarray(mnist.test_labels[:64])
    key = jax.random.key(7)
    before = np.asarray(loss_fn(initial, x, y, key))
    after = np.asarray(loss_fn(trained.params, x, y, key))
    assert np.all(after < 0.8 * before), (before, after)


def test_mismatched_config_is_a_clear_error(cli_workdir):
    config = hetero.get_config("smoke")
    config.model.block_out_channels = (8, 24)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="model"):
        train_lib.train(config, str(cli_workdir))
    manager = checkpoint.make_manager(cli_workdir, create=False)
    with pytest.raises(
        checkpoint.CheckpointMismatchError, match=r"checkpoint \(2, 16, 16\), config \(2, 24, 24\)"
    ):
        checkpoint.restore(manager, _abstract_state(config, 2))
    manager.close()


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    tx = optax.adamw(1e-3)
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((2, 1))}
    state = train_lib.create_train_state(params, tx)._replace(step=jnp.asarray(4, jnp.int32))
    manager = checkpoint.make_manager(tmp_path)
    checkpoint.save(manager, 4, state, {"counts": [[1, 2]]})
    restored, meta = checkpoint.restore(manager, jax.eval_shape(lambda: state))
    manager.close()
    assert meta == {"counts": [[1, 2]]}
    assert isinstance(restored, train_lib.TrainState)
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_no_checkpoint(tmp_path):
    manager = checkpoint.make_manager(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.restore(manager, {})


def test_non_finite_loss_names_agent_and_step():
    train_lib.check_finite(np.array([0.5, 0.4]), step=3, saved_step=0)
    with pytest.raises(FloatingPointError, match=r"step 12 for agent\(s\) \[1\]"):
        train_lib.check_finite(np.array([0.5, np.nan, 0.2]), step=12, saved_step=10)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match=r"valid: \['smoke', 'demo', 'cpu', 'paper'\]"):
        base.get_config("huge")


def test_the_loop_checks_every_step_at_log_steps(tmp_path, monkeypatch):
    """The host reads the losses back only at log and checkpoint steps, and then checks each
    pending step: a non-finite loss at step 7 (agent 1), read back at step 10, is named exactly,
    and the checkpoint of step 10 is never written."""
    config = micro_config()
    config.train.num_steps, config.train.log_every, config.train.checkpoint_every = 20, 10, 5

    def fake_step(state, batch, key):
        loss = jnp.where((jnp.arange(2) == 1) & (state.step == 7), jnp.nan, 1.0)
        return state._replace(step=state.step + 1), {"loss": loss, "grad_norm": jnp.ones(2)}

    monkeypatch.setattr(train_lib, "build_train_step", lambda c: fake_step)
    with pytest.raises(FloatingPointError, match=r"step 7 for agent\(s\) \[1\].*step 5\) is kept"):
        train_lib.train(config, str(tmp_path))
    assert checkpoint.latest_step(str(tmp_path)) == 5


def test_agents_trained_with_label_dropout_sample_guided(tmp_path):
    """A run with ``train.label_dropout`` records it, and its agents sample with guidance
    through sample.py's path: finite images, every agent asked twice per evaluation."""
    config = micro_config()
    config.train.num_steps, config.train.label_dropout = 4, 0.5
    config.train.checkpoint_every = config.train.log_every = 4
    train_lib.train(config, str(tmp_path / "run"))
    config.sampler.guidance, config.sampler.num_steps = 2.0, 4
    config.sampler.num_per_class, config.sampler.progress = 1, False
    config.train.label_dropout = 0.0  # sampling takes the run's record
    outdir = federation.run(config, str(tmp_path / "run"), str(tmp_path / "guided"))
    with np.load(os.path.join(outdir, "samples.npz")) as f:
        assert f["images"].shape == (10, 28, 28)
    record = json.loads((tmp_path / "guided" / "samples.json").read_text())
    assert record["config"]["train"]["label_dropout"] == 0.5
    assert record["config"]["sampler"]["guidance"] == 2.0
    stats = record["stats"]
    assert stats["network_evaluations"] == 2 * 2 * stats["score_evaluations"]  # K = 2
    assert record["made_by"]["inputs"]["sampler.guidance"] == 2.0


def test_autoguidance_by_an_earlier_checkpoint_of_the_same_agents(micro_straight, tmp_path):
    """``sampler.guide``: the run's step 4 guides its step 12 (no null label needed): finite
    images, every agent asked twice per evaluation; a step that is not kept, and a guide without
    guidance, are refused with what is valid."""
    config = _micro_resume_config()
    config.sampler.guidance, config.sampler.guide, config.sampler.num_steps = 2.0, "4", 4
    config.sampler.num_per_class, config.sampler.progress = 1, False
    outdir = federation.run(config, str(micro_straight), str(tmp_path / "auto"))
    with np.load(os.path.join(outdir, "samples.npz")) as f:
        assert np.isfinite(f["images"].astype(float)).all() and f["images"].shape == (10, 28, 28)
    record = json.loads((tmp_path / "auto" / "samples.json").read_text())
    assert record["stats"]["network_evaluations"] == 4 * record["stats"]["score_evaluations"]
    assert record["made_by"]["inputs"]["sampler.guide"] == "4"
    config.sampler.guide = "5"
    with pytest.raises(FileNotFoundError, match=r"no checkpoint step 5 .*\[4, 8, 12\]"):
        sample_lib.load_federation(config, str(micro_straight))
    config.sampler.guide, config.sampler.guidance = "4", 1.0
    with pytest.raises(errors.ConfigError, match=r"sampler\.guidance = 1 is unguided"):
        sample_lib.check_config(config)
