"""The agent axis: every strategy computes what a loop over agents computes; agents are isolated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedinf_jax.agents import agent_axis, runs
from fedinf_jax.data.input_pipeline import synthetic_batch
from fedinf_jax.diffusion.score import make_score_fn
from fedinf_jax.workflows import train_lib
from tests.conftest import count_traces, micro_config, micro_train_step

K, B = 2, 4


@pytest.fixture(scope="module")
def setup():
    config = micro_config()
    comp = runs.resolve(config)
    params = runs.init_agents(comp.model, K, runs.make_key(0))
    batch = synthetic_batch(K, B)
    return config, comp, params, batch


def _two_steps(step, comp, params, batch, key):
    """Two updates: the warm-up's learning rate is 0 at the first one."""
    state = train_lib.create_train_state(params, comp.tx)
    state, _ = step(state, batch, key)
    return step(state, batch, key)


@pytest.mark.parametrize("strategy", agent_axis.STRATEGIES)
def test_stacked_forward_equals_loop(setup, strategy):
    _, comp, params, batch = setup
    score_fn = make_score_fn(comp.model, comp.sde, comp.param)
    x, y = batch["images"][0], batch["labels"][0]
    t = jnp.linspace(0.1, 0.9, B)
    lifted = agent_axis.over_agents(score_fn, strategy, in_axes=(0, None, None, None))
    stacked = agent_axis.maybe_jit(lifted, strategy)
    out = stacked(params, x, t, y)
    single = jax.jit(score_fn)
    loop = jnp.stack([single(agent_axis.agent(params, i), x, t, y) for i in range(K)])
    assert out.shape == (K, B, 28, 28, 1)
    np.testing.assert_allclose(out, loop, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("map_unroll", [1, 2, 5])
def test_map_unroll_is_the_same_map(map_unroll):
    """``map`` with ``map_unroll`` agents per loop iteration (2 leaves a remainder of K = 5)."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(5, 3, 4)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    fn = lambda w, x: {"y": jnp.tanh(x @ w), "s": jnp.sum(w)}  # noqa: E731
    lifted = jax.jit(agent_axis.over_agents(fn, "map", (0, None), map_unroll))
    loop = [fn(w[i], x) for i in range(5)]
    out = lifted(w, x)
    np.testing.assert_allclose(out["y"], np.stack([o["y"] for o in loop]), rtol=1e-6)
    np.testing.assert_allclose(out["s"], np.stack([o["s"] for o in loop]), rtol=1e-6)


def test_train_step_same_numbers_for_each_strategy_kind(setup):
    """The train step lifted by an unrolled loop over agents (``loop``, CPU training's default)
    and by batching (``vmap``, the accelerators') gives the same numbers. ``unroll`` and ``map``
    lift through the same ``agent_axis.over_agents`` as ``loop`` and ``vmap``, checked on the
    network above; each extra strategy here would cost a train-step compilation (~15 s on 2
    cores)."""
    _, comp, params, batch = setup
    key = jax.random.key(3)
    results = {}
    for strategy in ("loop", "vmap"):
        state, metrics = _two_steps(micro_train_step(strategy), comp, params, batch, key)
        results[strategy] = (state, metrics)
    ref_state, ref_metrics = results["loop"]
    for strategy, (state, metrics) in results.items():
        np.testing.assert_allclose(
            metrics["loss"], ref_metrics["loss"], rtol=1e-5, err_msg=strategy
        )
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=strategy)
    assert int(ref_state.step) == 2


def test_train_steps_do_not_recompile(setup):
    """CPU training's step (``loop``): after the first step, new batches, keys and step counts
    reuse the compiled programs."""
    _, comp, params, _ = setup
    step = micro_train_step("loop")
    keys = [jax.random.key(i) for i in range(3)]
    batches = [synthetic_batch(K, B, seed=i) for i in range(3)]
    state, _ = step(train_lib.create_train_state(params, comp.tx), batches[0], keys[0])
    with count_traces() as traces:
        for key, other in zip(keys[1:], batches[1:], strict=True):
            state, _ = step(state, other, key)
    assert traces == [] and int(state.step) == 3


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_agent_isolation(setup, strategy):
    """Changing agent 1's data leaves agent 0's update bitwise unchanged."""
    _, comp, params, batch = setup
    key = jax.random.key(5)
    other = {name: value.copy() for name, value in batch.items()}
    other["images"][1] = -batch["images"][1]
    other["labels"][1] = (batch["labels"][1] + 1) % 10
    step = micro_train_step(strategy)
    a, _ = _two_steps(step, comp, params, batch, key)
    b, _ = _two_steps(step, comp, params, other, key)
    for x, y in zip(
        jax.tree.leaves(agent_axis.agent(a.params, 0)),
        jax.tree.leaves(agent_axis.agent(b.params, 0)),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)
    changed = [
        not np.array_equal(x, y)
        for x, y in zip(
            jax.tree.leaves(agent_axis.agent(a.params, 1)),
            jax.tree.leaves(agent_axis.agent(b.params, 1)),
            strict=True,
        )
    ]
    assert any(changed)


def test_strategy_resolution():
    assert agent_axis.resolve_strategy("auto", "train", backend="cpu") == "loop"
    assert agent_axis.resolve_strategy("auto", "score", backend="cpu") == "map"
    assert agent_axis.resolve_strategy("auto", "train", backend="gpu") == "vmap"
    assert agent_axis.resolve_strategy("map", "train") == "map"
    with pytest.raises(ValueError, match="map_unroll must be >= 1, got 0"):
        agent_axis.over_agents(jnp.sin, "map", map_unroll=0)
    with pytest.raises(ValueError, match=r"valid: \['auto', 'vmap', 'map', 'unroll', 'loop'\]"):
        agent_axis.resolve_strategy("pmap", "train")
