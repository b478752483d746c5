"""Layers shared by the score network and the evaluation classifier."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedinf_jax.core.registry import Registry, check_choice


class GroupNorm(nn.Module):
    """``flax.linen.GroupNorm(num_groups, epsilon)``'s function and parameters (``scale`` and
    ``bias``, one per channel), for channels-last inputs (N, ..., C).

    y = (x - mean_g) / sqrt(var_g + epsilon) * scale + bias, with mean_g and var_g = E[x^2] -
    mean_g^2 (Flax's fast variance, clipped at 0) over the spatial axes and the C / G channels of
    each group, in float32.

    The statistics are taken in two stages: per-channel means over the spatial axes, then the
    mean over each group's channels; the normalisation is then one multiply-add per element with a
    per-(sample, channel) scale and shift. Flax reduces over (spatial..., C / G) in one strided
    reduction, which XLA:CPU runs slowly on NHWC arrays (``benchmarks/speed/group_norm.py``,
    docs/performance.md); the sums only change order (float32 rounding).
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


CONV_IMPLS: Registry[Callable[[jax.Array, jax.Array], jax.Array]] = Registry("convolution")
"""How ``Conv`` computes a stride-1 SAME convolution ``(x, kernel (k, k, C_in, C_out)) -> y``;
``auto`` (not a member) picks one per layer (``conv_impl_for``)."""


@CONV_IMPLS.register("xla")
def xla_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``lax.conv_general_dilated``, what Flax's Conv lowers to."""
    pad = (kernel.shape[0] // 2,) * 2
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), (pad, pad), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@CONV_IMPLS.register("matmul")
def matmul_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """1x1: one matmul over the channel axis; 3x3: three matmuls, one per kernel row i: the
    zero-padded input's three column shifts side by side on the channel axis, rows i .. i + H,
    times row i of the kernel as a (3 C_in, C_out) matrix, i.e.
    y[h, w] = sum_ij x[h + i - 1, w + j - 1] @ W[i, j]."""
    if kernel.shape[0] == 1:
        return x @ kernel[0, 0]
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([padded[:, :, j : j + w] for j in range(3)], axis=-1)
    features = kernel.shape[-1]
    return sum(cols[:, i : i + h] @ kernel[i].reshape(-1, features) for i in range(3))


MATMUL_MIN_CHANNELS = 128
"""``auto`` runs a layer as ``matmul`` on CPU from this many input channels (the paper preset's
480- to 1,056-channel layers), as ``xla`` below it (docs/performance.md)."""


def conv_impl_for(impl: str, in_channels: int, backend: str | None = None) -> str:
    """The computation ``Conv(impl=impl)`` uses for a layer with ``in_channels`` inputs.

    ``auto`` on CPU: ``matmul`` for layers (1x1 or 3x3) with at least ``MATMUL_MIN_CHANNELS``
    inputs, ``xla`` for narrower ones, where the matmuls lose inside the network even for 1x1
    layers that are faster alone; ``xla`` on other backends (not measured there).

    Raises:
      ValueError: an unknown ``impl`` (the message lists the valid ones).
    """
    check_choice("convolution", impl, ("auto", *CONV_IMPLS))
    if impl != "auto":
        return impl
    if (backend or jax.default_backend()) != "cpu":
        return "xla"
    return "matmul" if in_channels >= MATMUL_MIN_CHANNELS else "xla"


class Conv(nn.Module):
    """``flax.linen.Conv(features, (k, k), padding="SAME")`` for k = 1 or 3, stride 1: its function
    and parameters (``kernel`` (k, k, C_in, C_out) and ``bias``, same names and initialisers, so
    checkpoints are shared), computed one of two ways (``impl``; ``auto`` picks per layer,
    ``conv_impl_for``): ``xla_conv`` (``lax.conv_general_dilated``) or ``matmul_conv`` (matmuls
    over the channel axis). Which is faster depends on the layer's width and the backend
    (``benchmarks/speed/conv_impl.py``, docs/performance.md).
    """

    features: int
    kernel_size: int = 3
    impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        if k not in (1, 3):
            raise ValueError(f"Conv: kernel_size must be 1 or 3, got {k}")
        impl = conv_impl_for(self.impl, x.shape[-1])
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return CONV_IMPLS.get(impl)(x, kernel) + bias
