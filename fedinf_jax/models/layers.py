"""Layers shared by the score network and the evaluation classifier."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class GroupNorm(nn.Module):
    """``flax.linen.GroupNorm(num_groups, epsilon)``'s function and parameters (``scale`` and
    ``bias``, one per channel), for channels-last inputs (N, ..., C).

    y = (x - mean_g) / sqrt(var_g + epsilon) * scale + bias, with mean_g and var_g = E[x^2] -
    mean_g^2 (Flax's fast variance, clipped at 0) over the spatial axes and the C / G channels of
    each group, in float32.

    The statistics are taken in two stages: per-channel means over the spatial axes, then the
    mean over each group's channels; the normalisation is then one multiply-add per element with a
    per-(sample, channel) scale and shift. Flax reduces over (spatial..., C / G) in one strided
    reduction, which XLA:CPU runs 3-7x slower forward (2-3x for the gradient) on this project's
    shapes (``benchmarks/group_norm.py``); the sums only change order (float32 rounding).
    """

    num_groups: int
    epsilon: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(
                f"GroupNorm: {channels} channels do not split into {self.num_groups} groups"
            )
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        x32 = x.astype(jnp.float32)
        spatial = tuple(range(1, x.ndim - 1))
        grouped = (x.shape[0], self.num_groups, channels // self.num_groups)
        mean = jnp.mean(x32, spatial).reshape(grouped).mean(-1)  # (N, G)
        mean_sq = jnp.mean(jnp.square(x32), spatial).reshape(grouped).mean(-1)
        inv = jax.lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + self.epsilon)
        per_channel = lambda v: jnp.repeat(v, grouped[-1], axis=-1)  # noqa: E731  (N, G) -> (N, C)
        mul = per_channel(inv) * scale
        add = bias - per_channel(mean) * mul
        shape = (x.shape[0],) + (1,) * len(spatial) + (channels,)
        y = x32 * mul.reshape(shape) + add.reshape(shape)
        return y.astype(self.dtype or jnp.result_type(x.dtype, jnp.float32))


CONV_IMPLS = ("auto", "xla", "matmul")
MATMUL_MIN_CHANNELS = 128
"""``auto`` runs a layer as ``matmul`` on CPU from this many input channels (README, "Against the
paper's stack": the paper preset's 480- and 576-channel layers), as ``xla`` otherwise."""


def conv_impl_for(impl: str, in_channels: int, backend: str | None = None) -> str:
    """The computation ``Conv3x3(impl=impl)`` uses for a layer with ``in_channels`` inputs.

    Raises:
      ValueError: an unknown ``impl`` (the message lists the valid ones).
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown convolution {impl!r}; valid: {list(CONV_IMPLS)}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    return "matmul" if backend == "cpu" and in_channels >= MATMUL_MIN_CHANNELS else "xla"


class Conv3x3(nn.Module):
    """``flax.linen.Conv(features, (3, 3), padding=1)``'s function and parameters (``kernel``
    (3, 3, C_in, C_out) and ``bias``, same initialisers and names, so checkpoints are shared),
    computed one of two ways (``impl``; ``auto`` picks per layer, ``conv_impl_for``):

    * ``xla``: ``lax.conv_general_dilated``, what Flax's Conv lowers to;
    * ``matmul``: three matmuls, one per kernel row i: the zero-padded input's three column
      shifts side by side on the channel axis, rows i .. i + H, times row i of the kernel as a
      (3 C_in, C_out) matrix; y[h, w] = sum_ij x[h + i - 1, w + j - 1] @ W[i, j]. On XLA:CPU this
      is 5-20% faster than ``xla`` for wide channels on small maps at small batches
      (``benchmarks/conv_impl.py``), slower for narrow channels.
    """

    features: int
    impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        impl = conv_impl_for(self.impl, x.shape[-1])
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if impl == "xla":
            y = jax.lax.conv_general_dilated(
                x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        else:
            h, w = x.shape[1:3]
            padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            cols = jnp.concatenate([padded[:, :, j : j + w] for j in range(3)], axis=-1)
            y = sum(cols[:, i : i + h] @ kernel[i].reshape(-1, self.features) for i in range(3))
        return y + bias
