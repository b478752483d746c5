"""Whole-sample wall time of the sparse members, dense (every agent on every sample) against
sparse (only the agents each sample's weights name; fedinf_jax/agents/dispatch.py), interleaved.

    python -m benchmarks.speed.sparse_dispatch --preset=cpu --num_agents=10 --batch=100 --steps=100

K random agents of the preset's U-Net (the cost does not depend on the weights), the
heterogeneous regime's count matrix (the owner of digit y holds half its examples), B images,
10 per digit, the preset's reverse SDE with ``--steps`` Euler-Maruyama steps (unguided, and
``--guided``: w = 2 with the null label), under ``route``, ``label_prior:top_k=1`` and
``label_prior:top_k=2``. Each round times every (member, path) once, in turn, after one
compiling call each; the sgemm ceiling is measured before and after. Results:
benchmarks/results/sparse_dispatch_<preset>.json and .md.
"""

import os

from absl import app, flags

flags.DEFINE_string("preset", "cpu", "model preset (configs/base.py)")
flags.DEFINE_integer("num_agents", 10, "K")
flags.DEFINE_integer("batch", 100, "images per solve")
flags.DEFINE_integer("steps", 100, "Euler-Maruyama steps")
flags.DEFINE_integer("rounds", 2, "timed calls per (member, path), interleaved")
flags.DEFINE_bool("guided", False, "classifier-free guidance at w = 2")
flags.DEFINE_string("output", "", "JSON path; default benchmarks/results/sparse_dispatch_<preset>")
FLAGS = flags.FLAGS

MEMBERS = ("route", "label_prior:top_k=1", "label_prior:top_k=2")


def main(argv):
    del argv
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.common import timing
    from configs import base
    from fedinf_jax.agents import runs
    from fedinf_jax.core import runtime
    from fedinf_jax.data import digits
    from fedinf_jax.diffusion.score import null_label
    from fedinf_jax.sampling import federated_sampler, solvers
    from fedinf_jax.sampling.federated_score import with_null_label
    from fedinf_jax.workflows import sample_lib

    runtime.setup()
    config = base.get_config(FLAGS.preset)
    config.sampler.num_steps, config.sampler.progress = FLAGS.steps, False
    comp = runs.resolve(config)
    k, b = FLAGS.num_agents, FLAGS.batch
    params = runs.init_agents(comp.model, k, runs.make_key(0))
    counts = np.full((k, 10), 1.0)
    counts[np.arange(10) % k, np.arange(10)] = 9.0  # the owner of digit y: 9 / 18 = 1/2
    spec = solvers.SolverSpec.from_config(config.sampler, comp.sde)
    dense_fn, grouped_fn = sample_lib.agent_score_fn(comp), sample_lib.grouped_score_fn(comp)
    if FLAGS.guided:
        dense_fn = with_null_label(dense_fn, null_label(comp.model))
        grouped_fn = with_null_label(grouped_fn, null_label(comp.model))
    keys = federated_sampler.sample_keys(0, b)
    labels = jnp.asarray(np.arange(b) % 10, jnp.int32)
    samplers = {}
    for procedure in MEMBERS:
        section = sample_lib.with_procedure(config, procedure).aggregator
        member = sample_lib.make_aggregator(
            section, counts, k, comp, "sde", 2.0 if FLAGS.guided else 1.0, None
        )
        for path, grouped in (("dense", None), ("sparse", grouped_fn)):
            samplers[procedure, path] = federated_sampler.FederatedSampler(
                dense_fn, comp.sde, member, spec, digits.IMAGE_SHAPE, k, grouped
            )

    def call(sampler):
        return sampler.solve(params, keys, labels).images  # random agents: no finiteness check

    ceiling = timing.sgemm_gflops()
    first, wall, images = {}, {key: [] for key in samplers}, {}
    for key, sampler in samplers.items():
        start = time.perf_counter()
        images[key] = np.asarray(jax.block_until_ready(call(sampler)))
        first[key] = time.perf_counter() - start
        print(f"{key}: first call {first[key]:.1f} s", flush=True)
    for _ in range(FLAGS.rounds):
        for key, sampler in samplers.items():
            start = time.perf_counter()
            jax.block_until_ready(call(sampler))
            wall[key].append(time.perf_counter() - start)
            print(f"{key}: {wall[key][-1]:.1f} s", flush=True)
    ceiling_after = timing.sgemm_gflops()
    results = {}
    for procedure in MEMBERS:
        d, s = (np.median(wall[procedure, p]) for p in ("dense", "sparse"))
        same = np.isfinite(images[procedure, "dense"]) & np.isfinite(images[procedure, "sparse"])
        results[procedure] = {
            "dense_s": [round(w, 2) for w in wall[procedure, "dense"]],
            "sparse_s": [round(w, 2) for w in wall[procedure, "sparse"]],
            "first_call_dense_s": round(first[procedure, "dense"], 1),
            "first_call_sparse_s": round(first[procedure, "sparse"], 1),
            "speedup": round(float(d / s), 2),
            "agents_asked": samplers[procedure, "sparse"].agents_asked(k),
            "max_abs_difference": float(
                np.max(np.abs(images[procedure, "dense"] - images[procedure, "sparse"])[same])
            ),
        }
    record = {
        "preset": FLAGS.preset,
        "num_agents": k,
        "batch": b,
        "steps": FLAGS.steps,
        "guided": FLAGS.guided,
        "score_strategy": comp.score_strategy,
        "sgemm_gflops_before_after": [round(ceiling, 1), round(ceiling_after, 1)],
        "code_version": runtime.code_version(),
        "results": results,
    }
    suffix = "_guided" if FLAGS.guided else ""
    path = FLAGS.output or os.path.join(
        timing.RESULTS_DIR, f"sparse_dispatch_{FLAGS.preset}{suffix}.json"
    )
    table = timing.markdown_table(
        ["member", "agents asked", "dense s", "sparse s", "speed-up", "first call s (d / s)"],
        [
            [
                f"`{name}`",
                r["agents_asked"],
                " / ".join(f"{w:.1f}" for w in r["dense_s"]),
                " / ".join(f"{w:.1f}" for w in r["sparse_s"]),
                f"{r['speedup']:.2f}x",
                f"{r['first_call_dense_s']:.0f} / {r['first_call_sparse_s']:.0f}",
            ]
            for name, r in results.items()
        ],
    )
    timing.write_results(path, record, table)
    print(f"sgemm {ceiling:.0f} -> {ceiling_after:.0f} GFLOP/s")


if __name__ == "__main__":
    app.run(main)
