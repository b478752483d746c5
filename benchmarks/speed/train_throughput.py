"""Agent-steps per second for K agents under each agent-axis strategy vs a Python loop.

    python -m benchmarks.speed.train_throughput --preset=cpu --num_agents=10 --batch_size=64

The baseline is the paper's way: K separately held single-agent states and one jitted
single-agent update called K times per step from Python. Every strategy runs the same model,
batch and optimizer; one run, first-call (compile) time reported separately from the steady-state
time (median of --repeats steps). Prints a table and writes JSON.
"""

import json

import jax
from absl import app, flags

from benchmarks.common import timing
from configs import base
from fedinf_jax.agents import agent_axis, runs
from fedinf_jax.data.input_pipeline import synthetic_batch
from fedinf_jax.diffusion.score import make_loss_fn
from fedinf_jax.workflows import train_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "cpu", "Model preset (smoke, demo, cpu, paper).")
flags.DEFINE_integer("num_agents", 10, "K.")
flags.DEFINE_integer("batch_size", None, "Per-agent batch (default: the preset's).")
flags.DEFINE_integer("repeats", 5, "Timed steps per strategy.")
flags.DEFINE_list(
    "strategies",
    ["baseline", "loop", "unroll", "vmap"],
    "What to time: 'baseline' (K separately held single-agent states, one jitted call each) "
    "and agent-axis strategies. 'map' is slow for gradients on XLA:CPU (minutes per step at "
    "the cpu preset) and is off by default.",
)
flags.DEFINE_string("output", "", "Optional JSON output path.")


def main(_):
    config = base.get_config(FLAGS.preset)
    k = FLAGS.num_agents
    b = FLAGS.batch_size or config.train.batch_size
    comp = runs.resolve(config)
    params = runs.init_agents(comp.model, k, runs.make_key(0))
    batch = synthetic_batch(k, b)
    key = jax.random.key(0)
    loss_fn = make_loss_fn(comp.model, comp.sde, param=comp.param)
    print(
        f"backend {jax.default_backend()}, preset {FLAGS.preset}, K={k}, batch {b}/agent, "
        f"{runs.count_params(params) // k:,} parameters per agent",
        flush=True,
    )

    results = {}
    for strategy in FLAGS.strategies:
        state = train_lib.create_train_state(params, comp.tx)
        if strategy == "baseline":
            one = jax.jit(train_lib.make_train_step(loss_fn, comp.tx, 0.999, "unroll"))
            singles = [
                train_lib.TrainState(
                    state.step,
                    *(agent_axis.stack_agents([agent_axis.agent(x, i)]) for x in state[1:]),
                )
                for i in range(k)
            ]
            sub = [{n: v[i : i + 1] for n, v in batch.items()} for i in range(k)]

            def run(one=one, singles=singles, sub=sub):
                return [one(s, bt, key)[1]["loss"] for s, bt in zip(singles, sub, strict=True)]
        else:
            step = agent_axis.maybe_jit(
                train_lib.make_train_step(loss_fn, comp.tx, 0.999, strategy), strategy
            )

            def run(step=step, state=state):
                return step(state, batch, key)[1]["loss"]

        compile_s, step_s = timing.time_calls(run, FLAGS.repeats)
        results[strategy] = {
            "first_call_s": compile_s,
            "step_s": step_s,
            "agent_steps_per_s": k / step_s,
        }
        print(
            f"{strategy:>7}: first call {compile_s:7.1f} s, step {step_s:7.3f} s, "
            f"{k / step_s:7.2f} agent-steps/s",
            flush=True,
        )

    if "baseline" in results:
        base_s = results["baseline"]["step_s"]
        print("\nstep time / baseline:")
        for name, r in results.items():
            r["ratio_to_baseline"] = r["step_s"] / base_s
            print(f"  {name:>7}: {r['ratio_to_baseline']:.2f}x")
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(
                {
                    "preset": FLAGS.preset,
                    "num_agents": k,
                    "batch_size": b,
                    "backend": jax.default_backend(),
                    "results": results,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    app.run(main)
