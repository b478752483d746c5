"""Fail fast: every entry point checks its whole config before it reads data or checkpoints, and
a user's error is one line, ``error: ...``, with exit status 2 and nothing written."""

import os
import re

import pytest

from configs import control, hetero
from configs import reproduce as reproduce_config
from fedinf_jax.core import errors, runtime
from fedinf_jax.diffusion.sde import VPSDE
from fedinf_jax.evaluation import sample_sets
from fedinf_jax.sampling import solvers
from fedinf_jax.workflows import federation, pipeline, sample_lib, train_lib
from tests.conftest import BAD_INPUTS


def _set(path: str, value):
    def apply(config):
        section, _, field = path.rpartition(".")
        target = config
        for part in section.split(".") if section else ():
            target = target[part]
        target[field] = value

    return apply


TRAIN_CASES = [
    ("partition.num_agents", 0, r"partition.num_agents must be >= 1, got 0"),
    ("partition.name", "iid", r"unknown partition 'iid'; valid: \['control', 'homogeneous'"),
    ("partition.owner_fraction", 0.05, "owner_fraction must exceed the others' share"),
    ("model.norm_groups", 3, r"norm_groups = 3 must divide every width \(8, 16, 32\)"),
    ("model.attention_levels", (True,), "must have one entry per level"),
    ("model.num_heads", 3, "num_heads = 3 must divide the attention levels' widths"),
    ("model.patch_size", 3, "patch_size 3 must divide the image size"),
    ("model.dtype", "float13", "'float13' is not a dtype"),
    ("model.parametrization", "x0", r"unknown parametrization 'x0'; valid: \['eps', 'edm'\]"),
    ("sde.name", "edm", r"unknown SDE 'edm'; valid: \['vp', 'subvp', 've', 've_paper'\]"),
    ("sde.eps", 0.0, r"sde.eps must lie in \(0, T = 1.0\), got 0.0"),
    ("train.num_steps", 0, "train.num_steps must be >= 1, got 0"),
    ("train.batch_size", 0, "train.batch_size must be >= 1, got 0"),
    ("train.learning_rate", -1e-3, "train.learning_rate must be > 0"),
    ("train.ema_decay", 1.0, r"train.ema_decay must be in \[0, 1\), got 1.0"),
    ("train.noise", "edm", r"unknown train.noise 'edm'; valid: \['uniform_t'"),
    ("agent_axis.train", "pmap", r"unknown agent-axis strategy 'pmap'; valid: \['auto', 'vmap'"),
    ("agent_axis.map_unroll", 0, "agent_axis.map_unroll must be >= 1, got 0"),
    ("conv_impl", "winograd", r"unknown convolution 'winograd'; valid: \['auto', 'xla'"),
    ("mesh.batch", 2, r"mesh.batch = 2 must be >= 1 and divide the number of devices \(1\)"),
]


@pytest.mark.parametrize("path, value, message", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_config_errors_name_the_setting(path, value, message):
    config = hetero.get_config("cpu")
    train_lib.check_config(config)  # the preset itself is valid
    _set(path, value)(config)
    with pytest.raises(errors.ConfigError, match=message):
        train_lib.check_config(config)


def test_partition_is_checked_on_mnist_class_sizes(mnist_train_labels):
    """The check's count matrix is the one the real labels give, for every regime."""
    for get_config in (control.get_config, hetero.get_config):
        config = get_config("cpu")
        _, counts = train_lib.check_config(config)
        real = train_lib.make_partition(config, mnist_train_labels).counts
        assert (counts == real).all()
    config = control.get_config("cpu")
    config.partition.num_agents = 3
    with pytest.raises(errors.ConfigError, match=r"partition control: .*exactly one agent"):
        train_lib.check_config(config)


SAMPLE_CASES = [
    ("aggregator.name", "avg", r"unknown aggregator 'avg'; valid: \['mean', 'weighted'"),
    ("sampler.solver", "rk4", r"unknown sde solver 'rk4'; valid: \['euler', 'heun'"),
    ("sampler.method", "pde", r"unknown sampler method 'pde'; valid: \['sde', 'ode'\]"),
    ("sampler.t_end", 0.0, r"t_end must lie in \(0, T = 1.0\), got 0.0"),
    ("sampler.num_steps", 0, "num_steps must be >= 1, got 0"),
    ("sampler.max_steps", 20, "max_steps must be >= 1 and, for constant steps, >= sampler.num"),
    ("sampler.schedule", "cosine", r"unknown step schedule 'cosine'; valid: \['uniform'"),
    ("sampler.brownian", "bridge", r"unknown sampler.brownian 'bridge'; valid: \['auto', 'tree'\]"),
    ("sampler.num_per_class", 0, "sampler.num_per_class must be >= 1, got 0"),
    ("sampler.checkpoint_step", -2, "sampler.checkpoint_step must be >= 0, or -1"),
    ("sampler.root_finder.rtol", 0.0, r"sampler.root_finder needs rtol > 0, atol > 0"),
    ("sampler.guidance_interval", (0.5, 0.2), r"guidance_interval must be \(t_lo, t_hi\) with"),
    ("aggregator.weighted.weights", (1.0, 2.0), "2 entries for 10 agents"),
    ("aggregator.schedule.early_agents", (12,), r"non-empty subset of 0\.\.9"),
]
SAMPLE_AGGREGATOR_CASES = [
    ("trimmed_mean", "trim", 5, "needs more than 10 agents, got 10"),
    ("superdiff_or", "temperature", -1.0, "temperature must be > 0, got -1.0"),
    ("superdiff_or", "prior", "flat", r"unknown prior 'flat'; valid: \['label'"),
    ("superdiff_and", "ridge", -1.0, "ridge must be >= 0"),
]


@pytest.mark.parametrize("path, value, message", SAMPLE_CASES, ids=[c[0] for c in SAMPLE_CASES])
def test_sample_config_errors_name_the_setting(path, value, message):
    config = hetero.get_config("cpu")
    member = path.startswith("aggregator.") and path.count(".") == 2
    config.aggregator.name = path.split(".")[1] if member else "mean"
    sample_lib.check_config(config)
    _set(path, value)(config)
    with pytest.raises(errors.ConfigError, match=message):
        sample_lib.check_config(config)


@pytest.mark.parametrize("member, setting, value, message", SAMPLE_AGGREGATOR_CASES)
def test_aggregator_settings_are_checked_for_the_runs_agents(member, setting, value, message):
    config = hetero.get_config("cpu")
    config.aggregator.name = member
    if member.startswith("superdiff"):  # tracked densities: Euler-Maruyama steps them
        config.sampler.solver = "euler"
    sample_lib.check_config(config)
    config.aggregator[member][setting] = value
    with pytest.raises(errors.ConfigError, match=f"aggregator {member}: .*{message}"):
        sample_lib.check_config(config)


def test_a_stratonovich_solver_is_refused_for_an_ito_state():
    config = hetero.get_config("cpu")
    config.aggregator.name, config.sampler.solver = "superdiff_or", "heun"
    with pytest.raises(errors.ConfigError, match=r"use an Ito solver: \['euler'\]"):
        sample_lib.check_config(config)
    config.sampler.solver = "dpmpp_1"  # steps the images alone; the densities move with them
    with pytest.raises(errors.ConfigError, match=r"use a sde solver that steps it too: \['euler'"):
        sample_lib.check_config(config)


def test_overrides_that_contradict_the_trained_run():
    record = {"partition": {"num_agents": 10, "name": "heterogeneous"}, "model": {"dtype": "f"}}
    overrides = {
        "partition.num_agents": 3,
        "partition.name": "heterogeneous",  # agrees
        "sampler.num_steps": 5,  # not a trained section
        "model.block_out_channels": (8, 16),  # not in the record: the default holds
    }
    assert sample_lib.contradicted_fields(overrides, record) == [
        "--config.partition.num_agents=3 (the checkpoint has 10)"
    ]


def test_sampling_a_run_checks_against_its_record(smoke_run):
    config = hetero.get_config("smoke")
    with pytest.raises(errors.ConfigError, match=r"partition.num_agents=3 \(the checkpoint has 2"):
        sample_lib.load_federation(config, str(smoke_run), {"partition.num_agents": 3})
    config.aggregator.name = "trimmed_mean"
    config.aggregator.trimmed_mean.trim = 1  # the run has 2 agents
    with pytest.raises(errors.ConfigError, match="needs more than 2 agents, got 2"):
        sample_lib.load_federation(config, str(smoke_run))


def test_a_bad_setting_is_named_before_a_missing_run(tmp_path):
    config = hetero.get_config("smoke")
    config.aggregator.name = "avg"
    with pytest.raises(errors.ConfigError, match="unknown aggregator 'avg'"):
        federation.run(config, str(tmp_path / "empty"))
    config.aggregator.name = "mean"
    with pytest.raises(errors.MissingInputError, match="no checkpoint under"):
        federation.run(config, str(tmp_path / "empty"))
    assert not os.path.exists(tmp_path / "empty")


@pytest.mark.parametrize("preset", ["smoke", "demo", "cpu", "paper"])
def test_every_presets_reproduction_passes_its_checks(preset):
    pipeline.check_config(reproduce_config.get_config(preset))


@pytest.mark.parametrize("preset", ["smoke", "demo", "cpu", "paper"])
def test_only_the_cpu_preset_guides_and_never_the_papers_procedure(preset):
    config = reproduce_config.get_config(preset)
    guided = preset == "cpu"
    for run in config.runs.values():
        assert run.train.label_dropout == (0.1 if guided else 0.0)
        assert run.sampler.guidance == (2.0 if guided else 1.0)
    assert config.sampler.guidance == (2.0 if guided else 1.0)
    assert config.paper_sampler.guidance == 1.0 and config.paper_sampler.guide == ""


def test_reproduce_checks_every_regime_and_procedure_first(tmp_path):
    config = reproduce_config.get_config("smoke")
    pipeline.check_config(config)
    config.procedures = ("paper", "avg")
    with pytest.raises(errors.ConfigError, match=r"unknown procedure 'avg'; valid: \['paper', "):
        pipeline.run(config, str(tmp_path / "out"))
    config = reproduce_config.get_config("smoke")
    config.regimes = ("control", "iid")
    with pytest.raises(errors.ConfigError, match=r"unknown regime 'iid'"):
        pipeline.run(config, str(tmp_path / "out"))
    config = reproduce_config.get_config("smoke")
    config.sampler.t_end = 2.0
    with pytest.raises(errors.ConfigError, match=r"control/mean: sampler\.t_end must lie in"):
        pipeline.run(config, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_evaluate_refuses_a_folder_that_is_no_sample_set(tmp_path):
    with pytest.raises(errors.MissingInputError, match="is not a sample set"):
        sample_sets.check_sample_dir(str(tmp_path))


def test_user_errors_print_one_line_and_exit_2(capsys):
    def main(argv):
        raise errors.ConfigError("sampler.t_end must lie in (0, T = 1.0), got 0.0")

    with pytest.raises(SystemExit) as exit_info:
        runtime.exit_on_user_error(main)(["sample.py"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: sampler.t_end must lie in (0, T = 1.0), got 0.0\n"

    def buggy(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # not a user error: the traceback stays
        runtime.exit_on_user_error(buggy)(["sample.py"])


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_entry_points_exit_2_with_one_line_and_write_nothing(bad_input_runs, name):
    returncode, stderr, wrote = bad_input_runs[name]
    assert returncode == 2, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith(BAD_INPUTS[name][1]), stderr[-3000:]
    assert "Traceback" not in stderr
    assert not wrote
    # Refused before the library imports TensorFlow (seconds of start-up) for TFDS or summaries.
    assert not re.search(r"\|\s+tensorflow$", stderr, re.MULTILINE)


def test_adaptive_steps_leave_the_grid_unused():
    """The default grid (Karras's) places constant steps; an adaptive solve's controller places
    its own, so the config's schedule is not read there (a SolverSpec built directly with both is
    refused, test_sampling)."""
    config = hetero.get_config("cpu")
    assert config.sampler.schedule == "karras"
    config.sampler.update(method="ode", solver="tsit5", adaptive=True)
    sample_lib.check_config(config)
    spec = solvers.SolverSpec.from_config(config.sampler, VPSDE())
    assert spec.adaptive and spec.schedule == "uniform"
