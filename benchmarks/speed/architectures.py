"""Train-step cost of U-Net candidates on this machine: parameters, FLOPs per image, images/s and
achieved GFLOP/s against the fp32 matrix-product ceiling measured in the same run.

    python -m benchmarks.speed.architectures            # every candidate, batch 32, K = 1
    python -m benchmarks.speed.architectures --candidates=demo,cpu --batch_size=64

Each candidate is a preset plus ``model`` overrides (``CANDIDATES``); the presets' own rows are
the presets as they are. FLOPs are XLA's cost analysis of the compiled train step (forward,
backward, AdamW and EMA) divided by the images in the step; the time is the median of
``--repeats`` steps after the first (compiling) call. The sgemm ceiling (numpy 4096 x 4096
float32) is measured before and after each candidate, and the ratio uses their mean. Prints a
Markdown table and writes JSON (``--output``).
"""

import json
import statistics
import time

import jax
from absl import app, flags

from benchmarks.common import timing
from benchmarks.common.candidates import CANDIDATES, candidate
from configs import base
from fedinf_jax.agents import runs
from fedinf_jax.data.input_pipeline import synthetic_batch
from fedinf_jax.workflows import train_lib

FLAGS = flags.FLAGS
flags.DEFINE_list("candidates", list(CANDIDATES), f"Which to time; known: {sorted(CANDIDATES)}.")
flags.DEFINE_integer("batch_size", 32, "Images per agent per step.")
flags.DEFINE_integer("num_agents", 1, "K (stacked agents in the step).")
flags.DEFINE_integer("repeats", 10, "Timed steps per candidate.")
flags.DEFINE_string("output", "", "JSON output path (optional).")


def candidate_config(name: str):
    preset, overrides = candidate(name)
    partition = "control" if FLAGS.num_agents == 1 else "homogeneous"
    config = base.for_regime(preset, partition, FLAGS.num_agents)
    config.model.update(overrides)
    config.train.batch_size = FLAGS.batch_size
    config.agent_axis.train = "vmap"  # one jitted program to analyse (for K = 1 the same work)
    return config


def measure(name: str) -> dict:
    config = candidate_config(name)
    comp = runs.resolve(config)
    k, b = FLAGS.num_agents, FLAGS.batch_size
    params = runs.init_agents(comp.model, k, runs.make_key(0))
    state = train_lib.create_train_state(params, comp.tx)
    batch = synthetic_batch(k, b)
    key = jax.random.key(0)
    step = train_lib.build_train_step(config)
    ceiling_before = timing.sgemm_gflops()
    start = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost["flops"])
    times = []
    for _ in range(FLAGS.repeats + 1):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[1:])
    ceiling_after = timing.sgemm_gflops()
    ceiling = 0.5 * (ceiling_before + ceiling_after)
    return {
        "candidate": name,
        "model": config.model.to_dict(),
        "parameters_per_agent": runs.count_params(params) // k,
        "gflop_per_image": flops / (k * b) / 1e9,
        "step_s": step_s,
        "images_per_s": k * b / step_s,
        "gflops": flops / step_s / 1e9,
        "sgemm_gflops": [ceiling_before, ceiling_after],
        "fraction_of_ceiling": flops / step_s / 1e9 / ceiling,
        "compile_s": compile_s,
    }


def table(rows: list[dict]) -> str:
    header = ["candidate", "channels", "params", "GFLOP/image", "images/s", "GFLOP/s"]
    header += ["sgemm GFLOP/s", "of ceiling", "compile s"]
    return timing.markdown_table(
        header,
        [
            [
                r["candidate"],
                tuple(r["model"]["block_out_channels"]),
                f"{r['parameters_per_agent']:,}",
                f"{r['gflop_per_image']:.3f}",
                f"{r['images_per_s']:.0f}",
                f"{r['gflops']:.1f}",
                f"{r['sgemm_gflops'][0]:.0f}-{r['sgemm_gflops'][1]:.0f}",
                f"{100 * r['fraction_of_ceiling']:.0f}%",
                f"{r['compile_s']:.0f}",
            ]
            for r in rows
        ],
        numeric_from=2,
    )


def main(argv):
    del argv
    for name in FLAGS.candidates:  # every name checked before anything runs
        candidate_config(name)
    print(
        f"backend {jax.default_backend()}, K = {FLAGS.num_agents}, batch {FLAGS.batch_size}",
        flush=True,
    )
    rows = []
    for name in FLAGS.candidates:
        rows.append(measure(name))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(
                {"num_agents": FLAGS.num_agents, "batch_size": FLAGS.batch_size, "rows": rows},
                f,
                indent=2,
            )


if __name__ == "__main__":
    app.run(main)
