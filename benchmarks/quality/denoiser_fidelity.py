"""How clean an agent's denoiser leaves real digits: speckle of E[x_0 | x_t] at each noise level.

    python -m benchmarks.quality.denoiser_fidelity --workdir=pretrained/cpu/control
    python -m benchmarks.quality.denoiser_fidelity --workdir=pretrained/cpu/heterogeneous \\
        --config=heterogeneous --agent=3

The first ``--num`` MNIST test digits, diffused to x_t = alpha(t) x_0 + std(t) z at each ``--times``
(one noise draw, the same at every t), denoised by one agent of a shipped (or trained) run with
Tweedie's formula, D = (x_t + std^2 s) / alpha: with the digit's own label, the null label, and
guided at w (D_null + w (D_y - D_null)), each measured like a sample set (background speckle,
black share; ``fedinf_jax.evaluation.metrics``) and by its RMS error to x_0. The samplers end on
this denoiser: what it leaves on real digits at a noise level is what no sampler removes there.
Writes ``--output`` (JSON) and its Markdown table beside it.
"""

import os

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.common import timing
from configs import control, hetero, homo
from fedinf_jax.agents import agent_axis
from fedinf_jax.core import files, runtime
from fedinf_jax.data import digits
from fedinf_jax.diffusion.score import make_score_fn, null_label
from fedinf_jax.diffusion.sde import batch_broadcast, tweedie_denoise
from fedinf_jax.evaluation import metrics
from fedinf_jax.sampling import federated_sampler
from fedinf_jax.workflows import sample_lib

REGIMES = {"control": control, "homogeneous": homo, "heterogeneous": hetero}

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "pretrained/cpu/control", "A shipped or trained run.")
flags.DEFINE_enum("config", "control", list(REGIMES), "The run's regime file (configs/).")
flags.DEFINE_integer("agent", 0, "Which of the run's agents.")
flags.DEFINE_integer("num", 500, "Test digits (the first ones).")
flags.DEFINE_list("times", ["0.001", "0.01", "0.03", "0.05", "0.1", "0.2", "0.3", "0.5"], "t.")
flags.DEFINE_float("guidance", 2.0, "w of the guided denoiser.")
flags.DEFINE_string("mnist_dir", "data/mnist_subset", "MNIST IDX folder (the test digits).")
flags.DEFINE_string(
    "output", "benchmarks/results/denoiser_fidelity_cpu.json", "Results JSON; .md beside it."
)


def main(argv):
    del argv
    runtime.setup()
    config = REGIMES[FLAGS.config].get_config("cpu")
    federation = sample_lib.load_federation(config, FLAGS.workdir)
    comp = federation.components
    params = agent_axis.agent(federation.params, FLAGS.agent)
    score_fn = jax.jit(make_score_fn(comp.model, comp.sde, comp.param))
    mnist = digits.load_mnist(FLAGS.mnist_dir, None)
    real = mnist.test_images[: FLAGS.num]
    x0 = jnp.asarray(digits.to_model_input(real, config.data.centered))
    y = jnp.asarray(mnist.test_labels[: FLAGS.num], jnp.int32)
    z = jax.random.normal(jax.random.key(0), x0.shape)
    rows = [dict(t=0.0, sigma=0.0, label="real digits", **metrics.fidelity(real, real), rmse=0.0)]
    for t in (float(v) for v in FLAGS.times):
        t_batch = jnp.full((len(y),), t)
        alpha, std = comp.sde.marginal(t_batch)
        x_t = batch_broadcast(alpha, x0) * x0 + batch_broadcast(std, x0) * z
        s_y = score_fn(params, x_t, t_batch, y)
        s_null = score_fn(params, x_t, t_batch, jnp.full_like(y, null_label(comp.model)))
        w = FLAGS.guidance
        for label, s in (
            ("label", s_y),
            ("null", s_null),
            (f"w={w:g}", s_null + w * (s_y - s_null)),
        ):
            d = tweedie_denoise(comp.sde, x_t, s, t)
            pixels = federated_sampler.to_uint8(d, config.data.centered)
            rmse = float(jnp.sqrt(jnp.mean((d - x0) ** 2)))
            sigma = float(std[0] / alpha[0])
            rows.append(
                dict(t=t, sigma=sigma, label=label, **metrics.fidelity(pixels, real), rmse=rmse)
            )
    record = {"workdir": FLAGS.workdir, "agent": FLAGS.agent, "num": FLAGS.num, "rows": rows}
    files.write_json(FLAGS.output, record)
    table = [
        [f"{r['t']:g}", f"{r['sigma']:.3f}", r["label"], f"{r['speckle']:.4f}"]
        + [f"{r[k]:.3f}" for k in ("black", "grey_distance", "rmse")]
        for r in rows
    ]
    head = ["t", "sigma", "denoiser", "speckle", "black", "grey dist.", "RMS error"]
    files.write_text(
        os.path.splitext(FLAGS.output)[0] + ".md",
        timing.markdown_table(head, table, numeric_from=3),
    )
    print(timing.markdown_table(head, table, numeric_from=3))


if __name__ == "__main__":
    app.run(main)
