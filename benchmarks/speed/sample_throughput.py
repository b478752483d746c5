"""Federated sampling throughput: agent-axis strategies against the paper's Python loop, and
score evaluations per image for adaptive against constant steps at matched accuracy.

    python -m benchmarks.speed.sample_throughput --preset=cpu --steps=10 \\
        --output=benchmarks/results/sample_throughput_cpu.json

Part 1 (throughput): K agents with random weights, a fixed-step Euler probability-flow ODE with
the uniform mean, batch --batch. Each agent-axis strategy runs the whole solve as one jitted
Diffrax call (``FederatedSampler``); ``paper_loop`` is the paper's execution model: a Python loop
over solver steps that calls one jitted single-agent score function K times per step, averages on
the host side and takes the Euler step. Compile time (ahead of time; for the loop: its first run)
and the second of two solves are reported separately; images/s are for the measured --steps (the
time per step does not depend on the step count, so images/s for 100 steps is
batch / (101 x the time per score evaluation)).

Part 2 (--workdir, a trained run): score evaluations per image against the error to a reference
solution (tsit5 at rtol = atol = --reference_tol, same prior draws), for constant-step Euler and
adaptive tsit5, all with the ``map`` strategy. Error: root mean square over pixels of the final
images (model space, [-1, 1]).
"""

import itertools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.common.candidates import CANDIDATES, candidate
from configs import base
from fedinf_jax.agents import agent_axis, runs
from fedinf_jax.data import digits
from fedinf_jax.diffusion.score import make_score_fn
from fedinf_jax.diffusion.sde import tweedie_denoise
from fedinf_jax.sampling import aggregators, federated_sampler, reverse, solvers
from fedinf_jax.workflows import sample_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "cpu", "Model preset of the random-weight agents (part 1).")
flags.DEFINE_string(
    "candidate",
    "",
    f"Part 1: a U-Net of candidates.py instead of the preset's; known: {sorted(CANDIDATES)}.",
)
flags.DEFINE_integer("num_agents", 10, "K.")
flags.DEFINE_integer("batch", 100, "Images per solve.")
flags.DEFINE_integer("steps", 100, "Euler steps per solve (part 1).")
flags.DEFINE_list("strategies", ["paper_loop", "map", "unroll", "vmap"], "What to time.")
flags.DEFINE_string("workdir", "", "A trained run for part 2 (skipped when empty).")
flags.DEFINE_integer("quality_batch", 10, "Images per solve in part 2.")
flags.DEFINE_list("euler_steps", ["25", "50", "100", "200"], "Part 2 constant step counts.")
flags.DEFINE_list("tsit5_tols", ["1e-2", "1e-3", "1e-4"], "Part 2 adaptive rtol = atol values.")
flags.DEFINE_float("reference_tol", 1e-6, "Part 2 reference tsit5 tolerance.")
flags.DEFINE_string("output", "", "Optional JSON output path.")


def _spec(solver, steps=100, adaptive=False, tol=1e-3):
    return solvers.SolverSpec(
        method="ode",
        solver=solvers.make_solver("ode", solver),
        num_steps=steps,
        adaptive=adaptive,
        rtol=tol,
        atol=tol,
        max_steps=100_000,
    )


def _sampler(comp, strategy, spec, agent_mesh=None):
    lifted = sample_lib.agent_score_fn(comp, strategy, agent_mesh)
    k = agent_mesh.num_agents if agent_mesh is not None else None
    return federated_sampler.FederatedSampler(
        lifted, comp.sde, aggregators.mean(), spec, digits.IMAGE_SHAPE, num_agents=k
    )


def _paper_loop(comp, params, keys, labels, steps, sampler):
    """The paper's execution: host loop over steps and agents, one jitted call per agent."""
    score_one = jax.jit(make_score_fn(comp.model, comp.sde, comp.param))
    singles = [agent_axis.agent(params, i) for i in range(agent_axis.num_agents_of(params))]
    sde, t_end = comp.sde, sampler.spec.t_end

    @jax.jit
    def euler(x, mean_score, t, dt):
        return x + dt * reverse.reverse_drift(sde, "ode", x, t, mean_score)

    def run():
        x, _ = sampler.prior(keys)
        taus = np.linspace(0.0, sde.T - t_end, steps + 1)
        for tau0, tau1 in itertools.pairwise(taus):
            t = jnp.full((x.shape[0],), sde.T - tau0)
            scores = [score_one(p, x, t, labels) for p in singles]
            x = euler(x, sum(scores) / len(scores), sde.T - tau0, tau1 - tau0)
        t = jnp.full((x.shape[0],), t_end)
        mean_score = sum(score_one(p, x, t, labels) for p in singles) / len(singles)
        return tweedie_denoise(sde, x, mean_score, t_end)

    return run


def throughput(config):
    k, b, steps = FLAGS.num_agents, FLAGS.batch, FLAGS.steps
    comp = runs.resolve(config)
    params = runs.init_agents(comp.model, k, runs.make_key(0))
    keys = federated_sampler.sample_keys(0, b)
    labels = jnp.asarray(np.arange(b) % 10, jnp.int32)
    model = " ".join(filter(None, (FLAGS.preset, FLAGS.candidate)))
    print(
        f"part 1: backend {jax.default_backend()}, preset {model}, K={k}, batch {b}, "
        f"{steps} Euler ODE steps, {runs.count_params(params) // k:,} parameters per agent",
        flush=True,
    )
    results = {}
    for strategy in FLAGS.strategies:
        sampler = _sampler(
            comp, "map" if strategy == "paper_loop" else strategy, _spec("euler", steps)
        )
        t0 = time.perf_counter()
        if strategy == "paper_loop":
            run = _paper_loop(comp, params, keys, labels, steps, sampler)
            x = jax.block_until_ready(run())  # compiles the single-agent call and the step
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            x = jax.block_until_ready(run())
        else:
            args = (params, keys, labels, sampler.steps)
            compiled = sampler.compiled_solve.lower(*args).compile()
            compile_s = time.perf_counter() - t0
            jax.block_until_ready(compiled(*args))  # untimed warm-up run
            t0 = time.perf_counter()
            x = jax.block_until_ready(compiled(*args)).images
        solve_s = time.perf_counter() - t0
        results[strategy] = {
            "compile_s": compile_s,
            "solve_s": solve_s,
            "step_s": solve_s / (steps + 1),
            "images_per_s": b / solve_s,
            "finite": bool(np.all(np.isfinite(np.asarray(x)))),
        }
        print(
            f"{strategy:>10}: compile {compile_s:7.1f} s, solve {solve_s:7.1f} s "
            f"({solve_s / (steps + 1):.3f} s per score evaluation), {b / solve_s:.3f} images/s",
            flush=True,
        )
        if strategy == "paper_loop":
            reference = np.asarray(x)
        elif "paper_loop" in results:
            results[strategy]["max_abs_diff_to_paper_loop"] = float(
                np.abs(np.asarray(x) - reference).max()
            )
    if "paper_loop" in results:
        ref_s = results["paper_loop"]["solve_s"]
        print("\nimages/s relative to the paper's loop:")
        for name, r in results.items():
            r["speedup_vs_paper_loop"] = ref_s / r["solve_s"]
            print(f"  {name:>10}: {r['speedup_vs_paper_loop']:.2f}x")
    return results


def quality(config):
    config.sampler.use_ema = True
    federation = sample_lib.load_federation(config, FLAGS.workdir)
    comp = federation.components
    n = FLAGS.quality_batch
    keys = federated_sampler.sample_keys(0, n)
    labels = jnp.asarray(np.arange(n) % 10, jnp.int32)

    def solve(spec):
        out = _sampler(comp, "map", spec, federation.agent_mesh)(federation.params, keys, labels)
        return np.asarray(out.images), out.stats["score_evaluations"]

    print(
        f"\npart 2: {FLAGS.workdir} (step {federation.step}, {federation.num_agents} agents), "
        f"batch {n}, reference tsit5 tol {FLAGS.reference_tol:g}",
        flush=True,
    )
    reference, ref_nfe = solve(_spec("tsit5", adaptive=True, tol=FLAGS.reference_tol))
    print(f"  reference: {ref_nfe} score evaluations", flush=True)
    rows = []
    runs = [("euler", int(s), False, None) for s in FLAGS.euler_steps]
    runs += [("tsit5", 100, True, float(tol)) for tol in FLAGS.tsit5_tols]
    for solver, steps, adaptive, tol in runs:
        x, nfe = solve(_spec(solver, steps, adaptive, tol or 1e-3))
        err = float(np.sqrt(np.mean((x - reference) ** 2)))
        name = f"tsit5 tol {tol:g}" if adaptive else f"euler {steps} steps"
        rows.append({"run": name, "score_evaluations": nfe, "rms_error": err})
        print(f"  {name:>18}: {nfe:5d} score evaluations, RMS error {err:.4f}", flush=True)
    return {"reference_score_evaluations": ref_nfe, "rows": rows}


def main(_):
    config = base.get_config(FLAGS.preset)
    record = {"backend": jax.default_backend(), "preset": FLAGS.preset}
    if FLAGS.candidate:
        try:
            config.model.update(candidate(FLAGS.candidate)[1])
        except ValueError as e:
            raise app.UsageError(f"--candidate: {e}") from None
        record["candidate"] = FLAGS.candidate
    if FLAGS.strategies:
        record["throughput"] = throughput(config)
        record.update(num_agents=FLAGS.num_agents, batch=FLAGS.batch, steps=FLAGS.steps)
    if FLAGS.workdir:
        record["quality"] = quality(config)
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    app.run(main)
