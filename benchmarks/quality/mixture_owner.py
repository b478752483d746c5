"""Which agent a density-weighted sample ends on, and how good the samples are by that choice.

    python -m benchmarks.quality.mixture_owner --classifier=runs/reproduce_cpu/classifier \\
        runs/reproduce_cpu/heterogeneous/samples/superdiff_or

For sample sets saved with their trajectory (``sampler.save_trajectory``; the pipeline does for
``superdiff_or``): each sample's weights at t = T are its prior pi_i(y), at t_end its posterior.
Groups the samples by whether the agent with the largest final weight holds the largest share
of the label's data (heterogeneous: the digit's owner, prior about 0.5; the others about 0.5/9)
and prints each group's size, mean prior weight and label accuracy,
and the mean final weight beside the mean prior weight per agent rank (for the exact mixture the
posterior weights are a martingale: their mean stays the prior).
"""

import numpy as np
from absl import app, flags

from fedinf_jax.core import runtime
from fedinf_jax.evaluation import sample_sets

FLAGS = flags.FLAGS
flags.DEFINE_string("classifier", None, "The classifier/ folder of a reproduce.py run.")
flags.mark_flags_as_required(["classifier"])


def main(argv):
    runtime.setup()
    clf = sample_sets.require_classifier(FLAGS.classifier)
    for sample_dir in argv[1:]:
        npz, _ = sample_sets.check_sample_dir(sample_dir)
        with np.load(npz) as f:
            if "trajectory_weights" not in f:
                raise SystemExit(f"{sample_dir}: no trajectory_weights (sampler.save_trajectory)")
            images, labels, w = f["images"], f["labels"], f["trajectory_weights"]
        prior, final = w[0], w[-1]  # (K, N)
        _, probs = clf.features_and_probs(images)
        correct = probs.argmax(axis=1) == labels
        n = np.arange(len(labels))
        chosen = final.argmax(axis=0)
        owner = prior[chosen, n] >= prior.max(axis=0) - 1e-6  # the label's largest share
        uniform = np.ptp(prior, axis=0) < 0.01 * prior.max(axis=0)  # equal shares (homogeneous)
        print(f"{sample_dir}: {len(labels)} samples, {w.shape[1]} agents")
        print("  | final agent | samples | its mean prior weight | accuracy |")
        print("  | --- | --- | --- | --- |")
        groups = {
            "the label's largest share": owner & ~uniform,
            "another agent": ~owner & ~uniform,
            "any (uniform prior)": uniform,
        }
        for name, group in groups.items():
            if group.any():
                print(
                    f"  | {name} | {group.sum()} | {prior[chosen, n][group].mean():.3f} | "
                    f"{correct[group].mean():.3f} |"
                )
        order = np.argsort(-prior, axis=0)  # per sample, agents by prior weight
        ranked_prior = np.take_along_axis(prior, order, axis=0).mean(axis=1)
        ranked_final = np.take_along_axis(final, order, axis=0).mean(axis=1)
        print("  mean prior weight by rank:", " ".join(f"{v:.3f}" for v in ranked_prior))
        print("  mean final weight by rank:", " ".join(f"{v:.3f}" for v in ranked_final))


if __name__ == "__main__":
    app.run(main)
