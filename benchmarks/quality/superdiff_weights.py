"""How concentrated ``superdiff_or``'s weights are along the reverse process, per step count.

    python -m benchmarks.quality.superdiff_weights --config=configs/homo.py:cpu \\
        --workdir=runs/reproduce_cpu/homogeneous --steps=100,400 --num_per_class=2

For each Euler-Maruyama step count, samples ``num_per_class`` images per digit from a trained
federation with ``superdiff_or`` (the config's other aggregator settings) and prints, at 11 times
from T to t_end, the mean entropy of the agents' weights (log K: uniform; 0: one agent) and the
mean largest weight. If the weights' collapse onto one agent came from the Ito estimator's step
error it would move with the step count; if it comes from the agents' own density differences it
does not.
"""

import json

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from fedinf_jax.core import runtime
from fedinf_jax.workflows import sample_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A regime config, e.g. configs/homo.py:cpu.")
flags.DEFINE_string("workdir", None, "A trained run of that regime.")
flags.DEFINE_list("steps", ["100", "400"], "Euler-Maruyama step counts to compare.")
flags.DEFINE_integer("num_per_class", 2, "Samples per digit (the same draws for every count).")
flags.DEFINE_string("output", "", "Optional JSON output path.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    runtime.setup()
    results = {}
    for steps in (int(s) for s in FLAGS.steps):
        cfg = FLAGS.config
        cfg.aggregator.name = "superdiff_or"
        cfg.sampler.update(
            method="sde", solver="euler", num_steps=steps, save_trajectory=11, progress=False
        )
        federation = sample_lib.load_federation(cfg, FLAGS.workdir)
        sampler = sample_lib.build_sampler(federation)
        labels = sample_lib.class_labels(FLAGS.num_per_class)
        drawn = sample_lib.sample_in_batches(
            sampler, federation.params, labels, len(labels), cfg.sampler.seed, federation.agent_mesh
        )
        w = drawn.trajectory_weights  # (S, K, N)
        entropy = -(w * np.log(np.clip(w, 1e-12, 1.0))).sum(axis=1).mean(axis=1)
        results[steps] = {
            "t": np.round(drawn.trajectory_t, 3).tolist(),
            "mean_entropy": np.round(entropy, 3).tolist(),
            "mean_max_weight": np.round(w.max(axis=1).mean(axis=1), 3).tolist(),
        }
        print(f"{steps} steps, {len(labels)} samples, {federation.num_agents} agents")
        print("  t:              ", " ".join(f"{t:5.2f}" for t in drawn.trajectory_t))
        print("  mean entropy:   ", " ".join(f"{e:5.2f}" for e in entropy))
        print(
            "  mean max weight:", " ".join(f"{m:5.2f}" for m in results[steps]["mean_max_weight"])
        )
        print(f"  (uniform entropy: log K = {np.log(federation.num_agents):.2f})", flush=True)
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
