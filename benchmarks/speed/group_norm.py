"""GroupNorm on XLA:CPU: ``flax.linen.GroupNorm`` against the project's ``models.layers.GroupNorm``
(same parameters and function; statistics in two stages), forward and gradient, on the ``cpu``
preset's activation shapes for a batch of K x B images.

    python -m benchmarks.speed.group_norm --images=200

Prints milliseconds per call (median after a warm-up) and the speed-up.
"""

from absl import app, flags

from benchmarks.common import timing

flags.DEFINE_integer("images", 200, "leading batch: K agents x B images (K = 10, B = 20)")
flags.DEFINE_integer("repeats", 7, "timed calls per measurement (median reported)")
FLAGS = flags.FLAGS

# (height, channels, groups): the cpu preset's U-Net levels (block_out_channels (8, 16, 32),
# norm_groups 4) and a wider level.
SHAPES = ((28, 8, 4), (14, 16, 4), (7, 32, 4), (28, 64, 8))


def main(argv):
    del argv
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from fedinf_jax.models.layers import GroupNorm

    print(f"jax {jax.__version__} ({jax.default_backend()}), {FLAGS.images} images")
    print("| shape (N, H, W, C), groups | pass | flax (ms) | fedinf_jax (ms) | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for height, channels, groups in SHAPES:
        x = jax.random.normal(jax.random.key(0), (FLAGS.images, height, height, channels))
        results = {}
        for name, module in (("flax", nn.GroupNorm(groups)), ("ours", GroupNorm(groups))):
            params = module.init(jax.random.key(1), x)
            forward = jax.jit(module.apply)
            grad = jax.jit(jax.grad(lambda p, x, m=module: jnp.sum(m.apply(p, x) ** 2), (0, 1)))
            results[name] = [
                timing.time_calls(
                    lambda f=f, p=params, x=x: jax.block_until_ready(f(p, x)), FLAGS.repeats
                )[1]
                for f in (forward, grad)
            ]
        for i, pass_name in enumerate(("forward", "gradient")):
            a, b = results["flax"][i] * 1e3, results["ours"][i] * 1e3
            print(
                f"| ({FLAGS.images}, {height}, {height}, {channels}), {groups} | {pass_name} | "
                f"{a:.2f} | {b:.2f} | {a / b:.1f}x |"
            )


if __name__ == "__main__":
    app.run(main)
