"""Samples digits from a trained federation: K agents' scores, aggregated, through Diffrax.

    python sample.py --config=configs/hetero.py:cpu --workdir=runs/hetero_cpu
    python sample.py --config=configs/hetero.py:cpu --workdir=runs/hetero_cpu \\
        --config.sampler.method=ode --config.sampler.solver=tsit5 \\
        --config.sampler.adaptive=True --config.aggregator.name=label_prior
    python sample.py --config=configs/hetero.py:cpu,paper_sampler --workdir=runs/hetero_cpu
    python sample.py --config=configs/hetero.py:cpu --workdir=runs/hetero_cpu \\
        --config.aggregator.name=superdiff_or --config.aggregator.superdiff_or.temperature=0.5 \\
        --config.sampler.save_trajectory=11

--workdir is a train.py run: its checkpoint fixes what was trained (seed, data, model, SDE,
partition, training recipe); the config's ``sampler`` and ``aggregator`` sections
(configs/base.py documents every field) choose how to sample (aggregators: mean weighted
label_prior schedule median trimmed_mean superdiff_or route superdiff_and, and whatever else
registers in fedinf_jax.sampling.aggregators.AGGREGATORS; a member's settings are
--config.aggregator.MEMBER.SETTING). A bad setting, a trained-section flag that contradicts the
run, or a checkpoint that cannot be read stops with one line, "error: ...", exit status 2.

Writes samples.npz (uint8 images, labels, solver statistics; the agents' weights for
superdiff_or), samples.png (one row per digit), trajectory.png and weights.png when the
trajectory is saved, and samples.json (resolved config and statistics) to --outdir, by default
WORKDIR/samples/<method>_<solver>_<aggregator>.
"""

from absl import flags, logging
from ml_collections import config_flags

from fedinf_jax.core import runtime
from fedinf_jax.workflows import federation

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file with an optional preset, e.g. configs/hetero.py:cpu or :cpu,paper_sampler.",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "A train.py run directory (its checkpoints are sampled).")
flags.DEFINE_string("outdir", None, "Output folder (default WORKDIR/samples/<name>).")
flags.mark_flags_as_required(["config", "workdir"])
runtime.define_distributed_flags()


def main(argv):
    runtime.start_distributed_entry_point(argv)
    logging.info("sampler: %s\naggregator: %s", FLAGS.config.sampler, FLAGS.config.aggregator)
    overrides = config_flags.get_override_values(FLAGS["config"])
    federation.run(FLAGS.config, FLAGS.workdir, FLAGS.outdir, overrides)


if __name__ == "__main__":
    runtime.run_entry_point(main)
