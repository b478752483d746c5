"""fedinf_jax against the paper's stack, in one run on one machine.

The paper's stack: K diffusers ``UNet2DConditionModel`` agents in PyTorch, evaluated one after
the other from Python and averaged. fedinf_jax: the same architecture (``fedinf_jax/models/unet``
mirrors it; the parameter counts are checked to agree within 1%) as stacked parameters, all K
agents in one jitted program (the configured agent-axis strategy).

    pip install -e '.[bench]'   # torch 2.13.0 (a CPU build is on this machine's disk), diffusers
    python -m benchmarks.peers.peer_diffusers --preset=cpu --num_agents=10 --batch=20 --steps=10
    python -m benchmarks.peers.peer_diffusers --preset=paper --num_agents=10 --batch=4 --steps=2
    # options:
    XLA_FLAGS=... python -m benchmarks.peers.peer_diffusers --sides=jax --steps=0 --repeats=10

Both sides: random weights, float32, every core. Timed after a warm-up call (in which JAX
compiles), median of ``--repeats``:

1. one federated score evaluation: the K agents' noise predictions on a batch of B images turned
   into scores and averaged;
2. a fixed-step sampling loop: S Euler steps of the probability-flow ODE under the mean score.
   PyTorch: the paper's host loop over steps and agents. fedinf_jax: the project's
   ``FederatedSampler`` (one jitted Diffrax solve; the score's parametrization and SDE are the
   preset's, a few element-wise operations per step next to K U-Nets).

Prints the parameter counts, milliseconds per image and the ratios (PyTorch time / fedinf_jax
time: above 1, fedinf_jax is faster); ``--output`` writes them as JSON.
"""

import json
import os
import platform

from absl import app, flags

from benchmarks.common import peer

flags.DEFINE_enum(
    "preset", "cpu", ["cpu", "paper"], "model preset (both sides; cross-attention mid block)"
)
flags.DEFINE_integer("num_agents", 10, "K")
flags.DEFINE_integer("batch", 20, "images per evaluation")
flags.DEFINE_integer("steps", 10, "Euler steps of the sampling loop (0: skip it)")
flags.DEFINE_integer("repeats", 3, "timed calls per measurement (median reported)")
flags.DEFINE_string("strategy", "auto", "fedinf_jax agent-axis strategy for scores")
flags.DEFINE_integer("map_unroll", None, "fedinf_jax agents per map iteration (default: preset's)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "fedinf_jax compute dtype")
flags.DEFINE_enum(
    "conv_impl",
    "auto",
    ["auto", "xla", "matmul"],
    "fedinf_jax U-Net convolutions (config.conv_impl)",
)
flags.DEFINE_list("sides", ["torch", "jax"], "what to run: torch, jax (XLA_FLAGS sweeps: jax)")
flags.DEFINE_string("output", None, "write the results as JSON here")
FLAGS = flags.FLAGS
_FLAGS = (
    "preset",
    "num_agents",
    "batch",
    "steps",
    "repeats",
    "strategy",
    "map_unroll",
    "dtype",
    "conv_impl",
)


def main(argv):
    del argv
    import jax

    from configs import base

    config = base.get_config(FLAGS.preset)
    k, b, steps = FLAGS.num_agents, FLAGS.batch, FLAGS.steps
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax "
        f"{jax.__version__} ({jax.default_backend()}); preset {FLAGS.preset}, K = {k}, batch {b}, "
        f"{steps} Euler steps",
        flush=True,
    )
    unknown = set(FLAGS.sides) - {"torch", "jax"}
    if unknown or not FLAGS.sides:
        raise SystemExit(f"--sides takes torch and/or jax, got {FLAGS.sides}")
    results = {}
    if "torch" in FLAGS.sides:
        results["torch"] = peer.torch_side(config, k, b, steps, FLAGS.repeats)
        print(f"PyTorch + diffusers: {results['torch']}", flush=True)
    if "jax" in FLAGS.sides:
        config.agent_axis.score = FLAGS.strategy
        config.model.dtype = FLAGS.dtype
        config.conv_impl = FLAGS.conv_impl
        if FLAGS.map_unroll is not None:
            config.agent_axis.map_unroll = FLAGS.map_unroll
        results["jax"] = peer.jax_side(config, k, b, steps, FLAGS.repeats)
        print(f"fedinf_jax: {results['jax']}", flush=True)
    keys = [("score evaluation", "score_s")]
    if steps:
        keys.append((f"sampling, {steps} steps", "sample_s"))
    if len(results) == 1:
        (side, result), *_ = results.items()
        for name, key in keys:
            print(f"{side}, {name}: {result[key] / b * 1e3:.2f} ms/image", flush=True)
        if "score_first_call_s" in result:
            print(f"{side}, first score call (compile): {result['score_first_call_s']:.1f} s")
    else:
        counts = results["torch"]["params_per_agent"], results["jax"]["params_per_agent"]
        if abs(counts[1] - counts[0]) > 0.01 * counts[0]:
            raise SystemExit(f"parameter counts differ by more than 1%: {counts}")
        print("\n| | PyTorch + diffusers (ms/image) | fedinf_jax (ms/image) | ratio |")
        print("| --- | --- | --- | --- |")
        for name, key in keys:
            a, j = results["torch"][key] / b * 1e3, results["jax"][key] / b * 1e3
            print(f"| {name} | {a:.2f} | {j:.2f} | {a / j:.2f}x |")
        print(f"parameters per agent: diffusers {counts[0]:,}, fedinf_jax {counts[1]:,}")
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(
                {"flags": {n: FLAGS[n].value for n in _FLAGS}, **results},
                f,
                indent=2,
            )


if __name__ == "__main__":
    app.run(main)
