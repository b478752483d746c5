"""The Python API (``fedinf_jax.load``, ``Federation.sample``, docs/api.md): it samples what
``sample.py`` writes, compiles a program once, refuses bad settings before compiling, takes a
plain function as the aggregator, and every example of its page runs as written."""

import json
import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

import fedinf_jax
from fedinf_jax.core import errors, provenance
from fedinf_jax.sampling import aggregators
from tests.conftest import count_traces

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke_federation(smoke_run):
    return fedinf_jax.load(smoke_run)


@pytest.fixture
def restore_registry():
    """The aggregator registry as it was before the test (the page registers a member)."""
    before = dict(aggregators.AGGREGATORS._members)
    yield
    aggregators.AGGREGATORS._members.clear()
    aggregators.AGGREGATORS._members.update(before)


def test_the_api_samples_what_sample_py_writes(smoke_federation, sample_cli_run):
    """``sample.py --config=configs/hetero.py:smoke --config.aggregator.name=label_prior
    --config.sampler.save_trajectory=3`` and the API given the same two settings, no preset
    named: the same images, bit for bit, the same trajectory and the same inputs recorded."""
    fed = smoke_federation
    assert fed.num_agents == 2 and fed.step == 30 and fed.counts.shape == (2, 10)
    samples = fed.sample(aggregator="label_prior", save_trajectory=3)
    with np.load(sample_cli_run / "samples.npz") as f:
        np.testing.assert_array_equal(samples.images, f["images"])
        np.testing.assert_array_equal(samples.labels, f["labels"])
        np.testing.assert_array_equal(samples.arrays["trajectory"], f["trajectory"])
    assert samples.images.dtype == np.uint8 and samples.images.shape == (20, 28, 28)
    written = provenance.stored_inputs(json.loads((sample_cli_run / "samples.json").read_text()))
    assert provenance.stored_inputs(samples.record) == written
    assert samples.record["stats"]["num_images"] == 20


def test_another_budget_seed_or_labels_compiles_nothing_but_the_grid(smoke_federation):
    """The sampler is kept: the same call again traces nothing; another number of steps, seed
    or labels (of the same batch shape) traces only the new step grid, never the solve."""
    fed = smoke_federation
    first = fed.sample(num_per_class=1)
    with count_traces() as traces:
        again = fed.sample(num_per_class=1)
    assert traces == []
    with count_traces() as traces:
        other = fed.sample(num_per_class=1, num_steps=3, seed=5)
        chosen = fed.sample(labels=[7] * 5 + [1] * 5)
    assert traces == ["_padded_grid"]
    np.testing.assert_array_equal(again.images, first.images)
    assert other.record["stats"]["steps"] == 3 and not np.array_equal(other.images, first.images)
    np.testing.assert_array_equal(chosen.labels, [7] * 5 + [1] * 5)


def test_a_function_or_a_registered_member_samples_as_the_named_one(
    smoke_federation, restore_registry
):
    fed = smoke_federation
    named = fed.sample(num_per_class=1, aggregator="mean")
    function = fed.sample(num_per_class=1, aggregator=lambda scores: scores.mean(axis=0))
    np.testing.assert_array_equal(function.images, named.images)
    assert function.record["config"]["aggregator"]["name"].startswith("custom:")

    @aggregators.member("api_uniform")
    def api_uniform(scale: float = 1.0):
        return lambda scores: jnp.full(scores.shape[:1], scale)  # weights, normalised

    registered = fed.sample(num_per_class=1, aggregator="api_uniform:scale=3.0")
    np.testing.assert_allclose(registered.images, named.images, atol=1)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_stepps": 10}, r"no sampler setting 'num_stepps'; valid: \['adaptive'"),
        ({"num_steps": "abc"}, r"sampler.num_steps = 'abc' is of type str; the field takes int"),
        ({"guidance": True}, r"sampler.guidance = True is of type bool; the field takes float"),
        ({"use_ema": False}, r"sampler.use_ema is chosen when the agents are loaded"),
        ({"solver": "heunn"}, r"unknown sde solver 'heunn'; valid: \['euler'"),
        ({"aggregator": "label_prior:top=1"}, r"unknown setting of label_prior 'top'"),
        ({"aggregator": 42}, r"aggregator: an aggregator is a member's name, an Aggregator or"),
        ({"labels": [3, 10]}, r"labels must lie in 0..9, got 3..10"),
        ({"num_per_class": 0}, r"sampler.num_per_class must be >= 1"),
    ],
)
def test_bad_settings_are_one_clear_error_before_compiling(smoke_federation, settings, message):
    with count_traces() as traces, pytest.raises(errors.ConfigError, match=message):
        smoke_federation.sample(**settings)
    assert traces == []


def test_load_names_what_is_missing(tmp_path):
    with pytest.raises(errors.MissingInputError, match=r"no checkpoint under .* load a train.py"):
        fedinf_jax.load(tmp_path)


def test_the_api_page_runs_as_written(tmp_path, monkeypatch, restore_registry):
    """docs/api.md's examples, one after the other in one namespace as a reader would run
    them, from a folder where the shipped runs lie at pretrained/ (the repository's root)."""
    (tmp_path / "pretrained").symlink_to(ROOT / "pretrained")
    monkeypatch.chdir(tmp_path)
    page = (ROOT / "docs" / "api.md").read_text()
    namespace = {}
    for block in re.findall(r"```python\n(.*?)```", page, re.DOTALL):
        exec(compile(block, "docs/api.md", "exec"), namespace)
    samples, fewer, robust = (namespace[k] for k in ("samples", "fewer", "robust"))
    for drawn in (samples, fewer, robust):
        assert drawn.images.shape == (20, 28, 28) and drawn.images.dtype == np.uint8
        np.testing.assert_array_equal(drawn.labels, np.repeat(np.arange(10), 2))
    assert fewer.record["stats"]["steps"] == 10
    assert len(namespace["fed"]._samplers) == 2  # the default program and the function's
    assert namespace["scores"]["num_samples"] == 20
    assert "near_consensus" in aggregators.AGGREGATORS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrained"]  # nothing written
