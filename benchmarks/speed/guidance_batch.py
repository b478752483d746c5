"""What a guided evaluation of K agents costs, two ways: the conditional and null-label scores
from one call on the doubled batch (``federated_score.with_null_label``, what the sampler does),
or from two calls on the batch; beside the unguided call.

    python -m benchmarks.speed.guidance_batch                     # cpu preset, K = 10, B = 100
    python -m benchmarks.speed.guidance_batch --preset=demo --agents=1

K agents of the preset's U-Net (random parameters, the null label's class included) at B noise
images; each variant jitted, compiled once, then timed in ``--rounds`` interleaved rounds of
``--repeats`` calls (the median of each round), so that drift on a shared machine touches every
variant alike; the fp32 ceiling (numpy sgemm) is measured before and after. Prints a Markdown
table; ``--output`` keeps the JSON.
"""

import json
import statistics

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.common import timing
from configs import base
from fedinf_jax.agents import runs
from fedinf_jax.core import runtime
from fedinf_jax.data import digits
from fedinf_jax.diffusion.score import null_label
from fedinf_jax.sampling import federated_score
from fedinf_jax.workflows import sample_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "cpu", "The U-Net's preset (configs/base.py).")
flags.DEFINE_integer("agents", 10, "K.")
flags.DEFINE_integer("batch", 100, "B, the sampler's batch.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
flags.DEFINE_integer("repeats", 5, "Calls per variant per round (their median is the round's).")
flags.DEFINE_string("output", None, "Where to write the JSON record (optional).")


def variants(k: int, b: int) -> tuple[dict, tuple]:
    """{name: jitted (params, x, t, y) -> scores} and the arguments."""
    config = base.get_config(FLAGS.preset)
    config.train.label_dropout = 0.1  # the model with the null label
    comp = runs.resolve(config)
    params = runs.init_agents(comp.model, k, runs.make_key(0))
    lifted = sample_lib.agent_score_fn(comp)
    null = null_label(comp.model)
    doubled = federated_score.with_null_label(lifted, null)

    def two_calls(p, x, t, y):
        return jnp.concatenate([lifted(p, x, t, y), lifted(p, x, t, jnp.full_like(y, null))])

    x = jax.random.normal(jax.random.key(1), (b, *digits.IMAGE_SHAPE))
    t, y = jnp.full((b,), 0.5), jnp.arange(b) % 10
    fns = {"unguided": lifted, "guided, doubled batch": doubled, "guided, two calls": two_calls}
    return {name: jax.jit(fn) for name, fn in fns.items()}, (params, x, t, y)


def main(argv):
    del argv
    runtime.setup()
    ceiling_before = timing.sgemm_gflops()
    fns, args = variants(FLAGS.agents, FLAGS.batch)
    compile_s = {name: timing.time_calls(lambda f=f: f(*args), 1)[0] for name, f in fns.items()}
    rounds = {name: [] for name in fns}
    for _ in range(FLAGS.rounds):
        for name, f in fns.items():
            rounds[name].append(timing.time_calls(lambda f=f: f(*args), FLAGS.repeats)[1])
    ceiling_after = timing.sgemm_gflops()
    base_s = statistics.median(rounds["unguided"])
    rows = []
    for name, times in rounds.items():
        median = statistics.median(times)
        rows.append(
            [
                name,
                f"{compile_s[name]:.1f}",
                f"{1e3 * median:.0f}",
                f"{1e3 * min(times):.0f}-{1e3 * max(times):.0f}",
                f"{median / base_s:.2f}",
            ]
        )
    header = ["variant", "first call s", "median ms", "round medians ms", "x unguided"]
    print(
        f"preset {FLAGS.preset}, K = {FLAGS.agents}, B = {FLAGS.batch}, backend "
        f"{jax.default_backend()}; sgemm {ceiling_before:.0f} -> {ceiling_after:.0f} GFLOP/s"
    )
    print(timing.markdown_table(header, rows))
    if FLAGS.output:
        record = {
            "preset": FLAGS.preset,
            "agents": FLAGS.agents,
            "batch": FLAGS.batch,
            "sgemm_gflops": [ceiling_before, ceiling_after],
            "compile_s": compile_s,
            "round_medians_s": rounds,
        }
        with open(FLAGS.output, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    app.run(main)
