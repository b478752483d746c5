"""Sharded agents on 4 virtual CPU devices give the single-device numbers.

Not collected by the main session (one device there): ``tests/test_sharding.py`` runs this file
with pytest in a subprocess with ``--xla_force_host_platform_device_count=4``.
"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import base
from fedinf_jax.agents import agent_axis, checkpoint, runs, sharding
from fedinf_jax.data.input_pipeline import synthetic_batch
from fedinf_jax.sampling import aggregators, federated_sampler
from fedinf_jax.workflows import sample_lib, train_lib
from tests.conftest import micro_config, micro_train_step

DEVICES = 4
pytestmark = pytest.mark.skipif(
    jax.device_count() != DEVICES, reason=f"needs {DEVICES} devices (tests/test_sharding.py)"
)


def _mesh(num_agents, agent_shards=0, batch_shards=1):
    config = ml_collections.ConfigDict({"agents": agent_shards, "batch": batch_shards})
    return sharding.make_mesh(config, num_agents)


def _conv(x, w):
    layout = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=layout)


def test_shard_map_is_exact_on_the_miscompiled_pattern():
    """docs/multi_device.md: conv3x3 -> concatenate -> conv1x1 vmapped over agents. jax 0.10.2
    miscompiles it under automatic partitioning of the sharded agent axis; the project's path
    (``shard_map``, each device its own agents) must equal a loop over agents."""
    rng = np.random.default_rng(0)
    k = 8
    x = jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32)
    w = {
        "a": jnp.asarray(rng.normal(size=(k, 3, 3, 1, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(k, 3, 3, 1, 4)), jnp.float32),
        "c": jnp.asarray(rng.normal(size=(k, 1, 1, 8, 4)), jnp.float32),
    }

    def f(w, x):
        return _conv(jnp.concatenate([_conv(x, w["a"]), _conv(x, w["b"])], -1), w["c"])

    loop = jnp.stack([f(agent_axis.agent(w, i), x) for i in range(k)])
    agent_mesh = _mesh(k)
    for strategy in ("vmap", "map"):
        lifted = sharding.over_sharded_agents(f, agent_mesh, strategy, in_axes=(0, None))
        out = jax.jit(lifted)(sharding.to_mesh(w, agent_mesh), x)
        np.testing.assert_allclose(out, loop, rtol=1e-5, atol=1e-4, err_msg=strategy)


@pytest.fixture(scope="module")
def comp():
    return runs.resolve(micro_config())


def _two_steps(step, state, batch, key):
    state, _ = step(state, batch, key)
    return step(state, batch, key)


def test_sharded_train_step_equals_one_device(comp, num_agents=6):
    """K = 6 padded to 8 over 4 devices: two agent slots each (as K = 8 has), one of them padding
    on the last two devices. Each device runs its agents as CPU training does (``loop``). The
    unpadded layout, one agent per device, is the two-process check's (K = 4)."""
    params = runs.init_agents(comp.model, num_agents, runs.make_key(0))
    state = train_lib.create_train_state(params, comp.tx)
    batch = synthetic_batch(num_agents, 4)
    key = jax.random.key(3)
    ref_state, ref_metrics = _two_steps(micro_train_step("loop"), state, batch, key)

    agent_mesh = _mesh(num_agents)
    step = micro_train_step("loop", agent_mesh)
    sharded_state = sharding.to_mesh(state, agent_mesh)
    assert sharded_state.params["params"]["conv_in"]["kernel"].sharding.spec == P("agents")
    out_state, metrics = _two_steps(step, sharded_state, sharding.to_mesh(batch, agent_mesh), key)
    assert out_state.params["params"]["conv_in"]["kernel"].sharding.spec == P("agents")
    assert agent_axis.num_agents_of(out_state.params) == agent_mesh.padded_agents
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    real = sharding.first_agents(out_state, num_agents)
    for a, b in zip(jax.tree.leaves(real), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_checkpoint_restores_onto_any_mesh(comp, tmp_path, num_agents=3, agent_shards=2):
    """A padded, sharded state saved by Orbax restores exactly onto one device (K agents) and
    onto a mesh with another padding."""
    params = runs.init_agents(comp.model, num_agents, runs.make_key(1))
    state = train_lib.create_train_state(params, comp.tx)
    agent_mesh = _mesh(num_agents, agent_shards, DEVICES // agent_shards)
    manager = checkpoint.make_manager(tmp_path)
    checkpoint.save(manager, 1, sharding.to_mesh(state, agent_mesh), {"num_agents": num_agents})
    abstract = train_lib.abstract_train_state(comp, num_agents)
    one, _ = checkpoint.restore(manager, abstract, num_agents=num_agents)
    other_mesh = _mesh(num_agents, DEVICES)
    other, _ = checkpoint.restore(
        manager, sharding.abstract_on_mesh(abstract, other_mesh), num_agents=num_agents
    )
    manager.close()
    for a, b, c in zip(*(jax.tree.leaves(s) for s in (state, one, other)), strict=True):
        np.testing.assert_array_equal(b, a)
        np.testing.assert_array_equal(sharding.first_agents(c, num_agents), a)
    assert other.params["params"]["conv_in"]["kernel"].sharding.spec == P("agents")


def _federation(comp, config, num_agents, agent_mesh):
    params = runs.init_agents(comp.model, num_agents, runs.make_key(2))
    if agent_mesh is not None:
        params = sharding.to_mesh(params, agent_mesh)
    counts = np.arange(1, 10 * num_agents + 1).reshape(num_agents, 10)
    return sample_lib.Restored(config, params, counts, 0, comp, agent_mesh)


def test_sharded_sampling_equals_one_device(comp, num_agents=3, agent_shards=2):
    """The federation's samples under ``label_prior`` and ``superdiff_or`` (whose weights need
    every agent's log-density), K = 3 padded to 4 on a 2 x 2 mesh: two agent slots per device
    and the batch split in two.

    The agents' scores are bitwise the single-device ones; the aggregate's reductions over
    agents run in another order. ``superdiff_or``'s Ito estimator sums terms of order 1e3-1e5
    for these untrained agents (more at smaller t), so its log q agree to float32 rounding of
    those terms (relative 3e-5 measured at t_end = 0.5), and the images through the weights."""
    config = micro_config()
    config.sampler.update(num_steps=4, batch_size=4, num_per_class=1, t_end=0.5, denoise=False)
    config.mesh.update(agents=agent_shards, batch=DEVICES // agent_shards)
    agent_mesh = sharding.make_mesh(config.mesh, num_agents)
    keys, y = federated_sampler.sample_keys(0, 4), jnp.array([0, 3, 7, 9])
    for name in ("label_prior", "superdiff_or"):
        config.aggregator.name = name
        # label_prior with the default ancestral step; superdiff_or's densities: Euler-Maruyama.
        config.sampler.solver = "euler" if name == "superdiff_or" else "dpmpp_1"
        single = _federation(comp, config, num_agents, None)
        sharded = _federation(comp, config, num_agents, agent_mesh)
        ref = sample_lib.build_sampler(single)(single.params, keys, y)
        out = sample_lib.build_sampler(sharded)(sharded.params, keys, y)
        if name == "label_prior":
            np.testing.assert_allclose(out.images, ref.images, rtol=1e-5, atol=1e-5)
        else:
            log_q = ref.aggregator_state.log_q
            np.testing.assert_allclose(out.aggregator_state.log_q, log_q, rtol=1e-4)
            np.testing.assert_allclose(out.images, ref.images, atol=2e-3)


def test_sharded_guided_sampling_equals_one_device(num_agents=3, agent_shards=2):
    """Classifier-free guidance on the mesh: the doubled batch (each image with its label and
    with the null label) split along ``batch``, the agents along ``agents``; the guided
    ``label_prior`` samples are the single device's."""
    config = micro_config()
    config.train.label_dropout = 0.1  # the model with the null label
    config.sampler.update(num_steps=4, batch_size=4, num_per_class=1, t_end=0.5, denoise=False)
    config.sampler.guidance, config.aggregator.name = 2.0, "label_prior"
    config.mesh.update(agents=agent_shards, batch=DEVICES // agent_shards)
    comp = runs.resolve_score(config)
    agent_mesh = sharding.make_mesh(config.mesh, num_agents)
    keys, y = federated_sampler.sample_keys(0, 4), jnp.array([0, 3, 7, 9])
    single = _federation(comp, config, num_agents, None)
    sharded = _federation(comp, config, num_agents, agent_mesh)
    ref = sample_lib.build_sampler(single)(single.params, keys, y)
    out = sample_lib.build_sampler(sharded)(sharded.params, keys, y)
    np.testing.assert_allclose(out.images, ref.images, rtol=1e-5, atol=1e-5)


def test_sharded_sparse_sampling_equals_one_device(comp, num_agents=3, agent_shards=2):
    """Sparse dispatch on the mesh (each device evaluates only the pairs that name its own
    agents, on its slice of the batch): ``route`` and ``label_prior:top_k=2``, K = 3 padded to 4
    on a 2 x 2 mesh, give the single device's dense samples; the compiled routed evaluation
    keeps every parameter on its device and sums the scores across devices."""
    config = micro_config()
    config.sampler.update(num_steps=4, batch_size=4, num_per_class=1, t_end=0.5, denoise=False)
    config.mesh.update(agents=agent_shards, batch=DEVICES // agent_shards)
    agent_mesh = sharding.make_mesh(config.mesh, num_agents)
    keys, y = federated_sampler.sample_keys(0, 4), jnp.array([0, 3, 7, 9])
    single = _federation(comp, config, num_agents, None)
    sharded = _federation(comp, config, num_agents, agent_mesh)
    for procedure in ("route", "label_prior:top_k=2"):
        dense = sample_lib.build_sampler(single, procedure=procedure, sparse=False)
        sparse = sample_lib.build_sampler(sharded, procedure=procedure)
        assert sparse.score.sparse, procedure
        ref = dense(single.params, keys, y)
        out = sparse(sharded.params, keys, y)
        np.testing.assert_allclose(out.images, ref.images, rtol=1e-5, atol=1e-5, err_msg=procedure)

    grouped = sample_lib.grouped_score_fn(comp, agent_mesh)
    x, t = jnp.zeros((4, 28, 28, 1)), jnp.full((4,), 0.5)
    agent_index = jnp.array([[0, 2, 1, 2]])
    compiled = jax.jit(lambda p: grouped(p, x, t, y, agent_index).sum(0)).lower(sharded.params)
    compiled = compiled.compile()
    assert {s.spec for s in jax.tree.leaves(compiled.input_shardings[0][0])} == {P("agents")}
    hlo = compiled.as_text()
    assert re.search(r"all-reduce(-start)?\(", hlo)
    assert not re.search(r"all-gather|all-to-all|collective-permute", hlo)


def test_only_the_aggregate_crosses_devices(comp):
    """The compiled score evaluation takes every parameter split along ``agents`` and, under
    ``mean``, reduces the agents' scores across devices (an all-reduce of one score per image)
    and gathers nothing, padding included."""
    for num_agents in (4, 6):
        agent_mesh = _mesh(num_agents)
        score_fn = sample_lib.agent_score_fn(comp, "map", agent_mesh)
        mean = aggregators.mean()
        params = sharding.to_mesh(
            runs.init_agents(comp.model, num_agents, runs.make_key(0)), agent_mesh
        )
        x, t, y = jnp.zeros((4, 28, 28, 1)), jnp.full((4,), 0.5), jnp.arange(4)

        def federated(params, x, t, y, score_fn=score_fn, mean=mean, k=num_agents):
            return mean.aggregate(score_fn(params, x, t, y), t, x, y, mean.init(k, x, y))[0]

        compiled = jax.jit(federated).lower(params, x, t, y).compile()
        param_shardings = jax.tree.leaves(compiled.input_shardings[0][0])
        assert {s.spec for s in param_shardings} == {P("agents")}, num_agents
        hlo = compiled.as_text()
        assert re.search(r"all-reduce(-start)?\(", hlo), num_agents
        assert not re.search(r"all-gather|all-to-all|collective-permute", hlo), num_agents


def test_mesh_config_errors():
    config = base.get_config("smoke").mesh
    config.update(agents=3, batch=1)
    with pytest.raises(ValueError, match=r"3 x 1 must equal the number of devices \(4\)"):
        sharding.make_mesh(config, 4)
    config.update(agents=0, batch=3)
    with pytest.raises(ValueError, match=r"mesh.batch = 3 must be >= 1 and divide"):
        sharding.make_mesh(config, 4)
    config.update(agents=0, batch=2)
    agent_mesh = sharding.make_mesh(config, 5)
    cfg = micro_config()
    cfg.mesh.update(agents=2, batch=2)
    with pytest.raises(ValueError, match=r"set mesh\.batch = 1"):  # training splits agents only
        train_lib.training_mesh(cfg)
    assert (agent_mesh.agent_shards, agent_mesh.batch_shards, agent_mesh.padded_agents) == (2, 2, 6)
