"""What crosses devices per score evaluation when the agents are sharded
(fedinf_jax/agents/sharding.py).

Compiles one federated score evaluation (K agents' scores on a batch, then the aggregator, and
its density update where it has one) on a mesh of virtual CPU devices, and lists the collective
operations XLA put in the program, with their operand shapes and the bytes of their operands:

    python -m benchmarks.speed.sharded_collectives --devices=4 --num_agents=10 --batch=100

Results: benchmarks/results/sharded_collectives.log. The parameters never appear in a collective.
"""

import os
import re
import sys

from absl import app, flags

flags.DEFINE_integer("devices", 4, "virtual CPU devices, all on the agents axis")
flags.DEFINE_integer("num_agents", 10, "K")
flags.DEFINE_integer("batch", 100, "images per evaluation")
flags.DEFINE_list(
    "aggregators",
    [
        "mean",
        "weighted",
        "label_prior",
        "schedule",
        "superdiff_or",
        "median",
        "trimmed_mean",
        "superdiff_and",
    ],
    "members to compile",
)
FLAGS = flags.FLAGS

_COLLECTIVE = re.compile(
    r"= (.{1,300}?) (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
    r"(?:-start)?\("
)
_ARRAY = re.compile(r"(f32|f64|s32|u32|pred|bf16)\[([\d,]*)\]")
_BYTES = {"f32": 4, "f64": 8, "s32": 4, "u32": 4, "pred": 1, "bf16": 2}


def _bytes(shapes: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shapes):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES[dtype]
    return total


def _shapes(operands: str) -> str:
    """``(f32[2,4]{1,0}, f32[2,4]{1,0})`` -> ``f32[2,4] f32[2,4]``."""
    return " ".join(f"{dtype}[{dims}]" for dtype, dims in _ARRAY.findall(operands))


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs import base
    from fedinf_jax.agents import runs, sharding
    from fedinf_jax.sampling import aggregators
    from fedinf_jax.workflows import sample_lib

    config = base.get_config("cpu")
    comp = runs.resolve(config)
    k, b = FLAGS.num_agents, FLAGS.batch
    agent_mesh = sharding.make_mesh(config.mesh, k)
    print(agent_mesh.describe())
    print(f"U-Net {tuple(config.model.block_out_channels)}, batch {b} images of 28x28x1")
    params = runs.init_agents(comp.model, k, runs.make_key(0))
    per_device = runs.count_params(params) // k * agent_mesh.padded_agents // FLAGS.devices
    print(f"parameters per device (never communicated): {per_device:,}")
    params = sharding.to_mesh(params, agent_mesh)
    score_fn = sample_lib.agent_score_fn(comp, "map", agent_mesh)
    x, t, y = jnp.zeros((b, 28, 28, 1)), jnp.full((b,), 0.5), jnp.arange(b) % 10
    counts = np.ones((k, 10))
    print("\n| aggregator | collectives (operand shapes) | operand bytes |\n| --- | --- | --- |")
    for name in FLAGS.aggregators:
        config.aggregator.name = name
        agg = aggregators.from_config(config.aggregator, counts, k, comp.sde, "sde")

        def evaluate(params, x, t, y, agg=agg):
            state = agg.init(k, x, y, None)
            scores = score_fn(params, x, t, y)
            score, state = agg.aggregate(scores, t, x, y, state)
            if agg.tendency is not None:
                state = agg.tendency(scores, t, x, y, state, x, 0.01)
            return score, state

        hlo = jax.jit(evaluate).lower(params, x, t, y).compile().as_text()
        found = [(m.group(2), m.group(1)) for m in _COLLECTIVE.finditer(hlo)]
        listed = "; ".join(f"{op} {_shapes(s)}" for op, s in found)
        print(f"| `{name}` | {listed} | {sum(_bytes(s) for _, s in found):,} |")


if __name__ == "__main__":
    count = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "4")
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
    app.run(main)
