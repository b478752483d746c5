"""3x3 convolutions on XLA:CPU three ways, beside PyTorch's (oneDNN) ``conv2d``: where the paper
architecture's time goes, against diffusers at the paper's channel counts.

    python -m benchmarks.speed.conv_impl

For each shape (kernel 3x3 or 1x1, batch, height, channels; 'SAME' padding) times one forward:
the U-Net's ``layers.Conv`` as ``xla`` (``lax.conv_general_dilated``, what ``flax.linen.Conv``
lowers to) and as ``matmul`` (3x3: three matmuls, one per kernel row; 1x1: one), and for 3x3
im2col (``conv_general_dilated_patches`` then one matmul) and nine shifted matmuls (one per
kernel tap, summed), each checked against the first; then ``torch.nn.functional.conv2d`` when
torch is installed (``pip install .[bench]``). Prints milliseconds (median) and GFLOP/s.
"""

import os

from absl import app, flags

from benchmarks.common import timing

flags.DEFINE_integer("repeats", 5, "timed calls per measurement (median reported)")
FLAGS = flags.FLAGS

# (kernel, batch, height, channels in, channels out). 3x3: the paper preset's 14x14 and 7x7 levels
# for one agent's batch of 4 (the federated score evaluation runs each agent on the batch) and its
# 4x4 mid level, the 14x14 level for 10 agents' 40 images, and the cpu preset's widest 28x28
# level. 1x1: the paper preset's attention projections and a skip shortcut, the cpu preset's
# shortcut at its batch of 20.
SHAPES = (
    (3, 4, 14, 480, 480),
    (3, 4, 7, 576, 576),
    (3, 4, 4, 576, 576),
    (3, 40, 14, 480, 480),
    (3, 4, 28, 32, 32),
    (1, 4, 14, 480, 480),
    (1, 4, 14, 1056, 480),
    (1, 20, 28, 24, 8),
)


def _torch_ms(x, w, repeats: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    import numpy as np

    torch.set_num_threads(os.cpu_count())
    xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()
    wt = torch.from_numpy(np.array(w)).permute(3, 2, 0, 1).contiguous()
    with torch.no_grad():  # a warm-up call, then the median of ``repeats``
        _, seconds = timing.time_calls(
            lambda: torch.nn.functional.conv2d(xt, wt, padding=w.shape[0] // 2), repeats
        )
    return seconds * 1e3


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from fedinf_jax.models.layers import Conv

    dims = ("NHWC", "HWIO", "NHWC")

    def layer(impl):
        def conv(x, w):
            params = {"kernel": w, "bias": jnp.zeros(w.shape[-1])}
            return Conv(w.shape[-1], w.shape[0], impl).apply({"params": params}, x)

        return conv

    def im2col(x, w):
        patches = jax.lax.conv_general_dilated_patches(
            x, (3, 3), (1, 1), "SAME", dimension_numbers=dims
        )  # (N, H, W, C * 9), channel-major
        return patches @ jnp.transpose(w, (2, 0, 1, 3)).reshape(-1, w.shape[-1])

    def shifted(x, w):
        h, wd = x.shape[1:3]
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return sum(
            padded[:, i : i + h, j : j + wd, :] @ w[i, j] for i in range(3) for j in range(3)
        )

    impls = {  # the last two: 3x3 only
        "lax.conv": layer("xla"),
        "matmul": layer("matmul"),
        "im2col": im2col,
        "9 matmuls": shifted,
    }
    print(f"jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} cores")
    print("| kernel, batch, HxW, channels | " + " | ".join(impls) + " | torch conv2d |")
    print("|" + " --- |" * (len(impls) + 2))
    for k, batch, height, c_in, c_out in SHAPES:
        x = jax.random.normal(jax.random.key(0), (batch, height, height, c_in))
        w = jax.random.normal(jax.random.key(1), (k, k, c_in, c_out)) * 0.01
        gflop = 2 * batch * height * height * c_in * c_out * k * k / 1e9
        reference = jax.jit(impls["lax.conv"])(x, w)
        cells = []
        for name, fn in impls.items():
            if k == 1 and name in ("im2col", "9 matmuls"):
                cells.append("-")
                continue
            jitted = jax.jit(fn)
            error = float(jnp.max(jnp.abs(jitted(x, w) - reference)))
            if error > 1e-4:
                raise SystemExit(f"{name} differs from lax.conv by {error}")
            ms = timing.time_calls(lambda f=jitted, x=x, w=w: f(x, w), FLAGS.repeats)[1] * 1e3
            cells.append(f"{ms:.2f} ms ({gflop / ms * 1e3:.0f} GFLOP/s)")
        torch_ms = _torch_ms(x, w, FLAGS.repeats)
        if torch_ms is None:
            cells.append("-")
        else:
            cells.append(f"{torch_ms:.2f} ms ({gflop / torch_ms * 1e3:.0f} GFLOP/s)")
        shape = f"{k}x{k}, {batch}, {height}x{height}, {c_in} -> {c_out}"
        print(f"| {shape} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    app.run(main)
