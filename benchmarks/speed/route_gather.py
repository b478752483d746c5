"""What one reverse step of ``route`` costs three ways: every agent on every sample (what the
sampler does), each sample's agent gathered per sample, and each agent on its own samples only.

``route`` gives each sample one agent k ~ pi_k(y), fixed for the whole solve, so only one agent's
score per sample is used. The sampler evaluates all K agents on the batch (K x B network
evaluations) and picks each sample's; the alternatives evaluate B:

* ``all agents``: ``agent_axis.over_agents`` (the preset's strategy) on the batch, then the pick;
* ``gathered``: each sample's parameters gathered (B copies), the network vmapped over samples
  (XLA turns it into per-sample kernels);
* ``grouped``: the samples sorted by agent, each agent's group padded to the largest (G), the
  agents evaluated on their own groups (K x G evaluations; the groups are known before the
  solve, since the draws are made once).

    python -m benchmarks.speed.route_gather --preset=cpu --num_agents=10 --batch=100

The draws use the heterogeneous regime's label prior (the owner of digit y holds half its
examples, each other agent 1/18), 10 samples per digit. Random agents (cost does not depend on the
weights); all three give the same routed scores (checked). Results:
benchmarks/results/route_gather_cpu.json and .md.
"""

import os

from absl import app, flags

flags.DEFINE_string("preset", "cpu", "model preset (configs/base.py)")
flags.DEFINE_integer("num_agents", 10, "K")
flags.DEFINE_integer("batch", 100, "samples per evaluation")
flags.DEFINE_integer("repeats", 5, "timed calls per way (median)")
flags.DEFINE_string(
    "output", "", "JSON path; default benchmarks/results/route_gather_<preset>.json"
)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.common import timing
    from configs import base
    from fedinf_jax.agents import agent_axis, runs
    from fedinf_jax.core import runtime
    from fedinf_jax.data import digits
    from fedinf_jax.diffusion.score import make_score_fn
    from fedinf_jax.sampling import aggregators
    from fedinf_jax.workflows import sample_lib

    runtime.setup()
    config = base.get_config(FLAGS.preset)
    comp = runs.resolve(config)
    k, b = FLAGS.num_agents, FLAGS.batch
    params = runs.init_agents(comp.model, k, runs.make_key(0))
    x = jax.random.normal(jax.random.key(1), (b, *digits.IMAGE_SHAPE))
    t, y = jnp.full((b,), 0.5), jnp.arange(b) % 10
    counts = np.full((k, 10), 1.0)
    counts[np.arange(10) % k, np.arange(10)] = 9.0  # the owner of digit y: 9 / 18 = 1/2
    route = aggregators.route(counts, k)
    agent = np.asarray(route.init(k, x, y, jax.random.split(jax.random.key(2), b)).agent, int)

    lifted = sample_lib.agent_score_fn(comp)
    rows = np.arange(b)

    @jax.jit
    def all_agents(params, x, t, y):
        return lifted(params, x, t, y)[agent, rows]

    score_fn = make_score_fn(comp.model, comp.sde, comp.param)
    one = lambda p, x, t, y: score_fn(p, x[None], t[None], y[None])[0]  # noqa: E731

    @jax.jit
    def gathered(params, x, t, y):
        mine = jax.tree.map(lambda leaf: leaf[agent], params)
        return jax.vmap(one)(mine, x, t, y)

    sizes = np.bincount(agent, minlength=k)
    g = int(sizes.max())
    # slot[i, j]: the sample in agent i's j-th place (padding repeats the agent's first sample,
    # or sample 0 for an agent with none); back[n]: where sample n's score lands.
    slot = np.zeros((k, g), int)
    back = np.zeros(b, int)
    for i in range(k):
        mine = np.flatnonzero(agent == i)
        slot[i] = np.resize(mine, g) if mine.size else 0
        back[mine] = i * g + np.arange(mine.size)
    per_agent = agent_axis.over_agents(score_fn, comp.score_strategy, (0, 0, 0, 0), comp.map_unroll)

    @jax.jit
    def grouped(params, x, t, y):
        out = per_agent(params, x[slot], t[slot], y[slot])  # (K, G, ...)
        return out.reshape(k * g, *out.shape[2:])[back]

    ceiling = timing.sgemm_gflops()
    results, reference = {}, None
    for name, fn, evaluations in [
        ("all agents", all_agents, k * b),
        ("gathered", gathered, b),
        ("grouped", grouped, k * g),
    ]:
        first, median = timing.time_calls(lambda fn=fn: fn(params, x, t, y), FLAGS.repeats)
        out = np.asarray(fn(params, x, t, y))
        if reference is None:
            reference = out
        np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4, err_msg=name)
        results[name] = {
            "network_evaluations": evaluations,
            "first_call_s": round(first, 3),
            "ms_per_step": round(1e3 * median, 2),
        }
        print(f"{name}: {evaluations} evaluations, {1e3 * median:.1f} ms", flush=True)
    ceiling_after = timing.sgemm_gflops()
    base_ms = results["all agents"]["ms_per_step"]
    for r in results.values():
        r["speedup_vs_all_agents"] = round(base_ms / r["ms_per_step"], 2)
    record = {
        "preset": FLAGS.preset,
        "num_agents": k,
        "batch": b,
        "score_strategy": comp.score_strategy,
        "group_sizes": sizes.tolist(),
        "sgemm_gflops_before_after": [round(ceiling, 1), round(ceiling_after, 1)],
        "code_version": runtime.code_version(),
        "results": results,
    }
    path = FLAGS.output or os.path.join(timing.RESULTS_DIR, f"route_gather_{FLAGS.preset}.json")
    table = timing.markdown_table(
        ["way", "network evaluations", "ms per step", "speed-up", "first call (s)"],
        [
            [
                name,
                r["network_evaluations"],
                f"{r['ms_per_step']:.1f}",
                f"{r['speedup_vs_all_agents']:.2f}x",
                f"{r['first_call_s']:.1f}",
            ]
            for name, r in results.items()
        ],
    )
    timing.write_results(path, record, table)
    print(f"group sizes {sizes.tolist()}; sgemm {ceiling:.0f} -> {ceiling_after:.0f} GFLOP/s")


if __name__ == "__main__":
    app.run(main)
