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
