"""A class- and time-conditional U-Net in Flax Linen, laid out like diffusers'
``UNet2DConditionModel`` (the paper's model, appendix B), so that presets can mirror it.

Structure (diffusers names): sinusoidal time embedding (flip_sin_to_cos, shift 0) -> MLP to
4 x block_out_channels[0]; optional learned class embedding added to it (diffusers'
``num_class_embeds``); ``conv_in``; down blocks of ``layers_per_block`` ResNet blocks (each
followed by a cross-attention transformer in attention levels) and a stride-2 downsampler (all but
the last level); optionally, a ``patch_size`` x ``patch_size`` pixel-unshuffle (space-to-depth)
before ``conv_in`` and its inverse after ``conv_out``, so that every level runs at 1 / patch_size
of the resolution on patch_size^2 times the channels; a mid block ResNet -> transformer -> ResNet;
up blocks of ``layers_per_block + 1`` ResNet blocks over concatenated skips and a nearest
upsampler to the skip's size; GroupNorm, SiLU, ``conv_out``. Labels enter as one one-hot token
that the transformers cross-attend to (cross_attention_dim = number of classes), as in the paper.

The network predicts the noise eps; ``fedinf_jax.diffusion.score`` turns that into a score.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedinf_jax.models.layers import Conv, GroupNorm, conv_impl_for


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [cos(t w_j), sin(t w_j)], w_j = max_period^(-j / (dim / 2)).

    diffusers' ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) -> (B, H / p, W / p, p * p * C): each p x p patch's pixels as channels."""
    if p == 1:
        return x
    b, h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"patch_size {p} must divide the image size {h} x {w}")
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
    """The inverse of ``space_to_depth``."""
    if p == 1:
        return x
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c // (p * p))


class _NormedBlock(nn.Module):
    """The settings the U-Net's GroupNorm-opened blocks share: the norm's groups, the dtype and
    how their convolutions run (``layers.Conv``)."""

    groups: int
    dtype: jnp.dtype
    conv_impl: str


class ResnetBlock(_NormedBlock):
    """GN -> SiLU -> conv3x3 -> + proj(SiLU(temb)) -> GN -> SiLU -> conv3x3, 1x1 shortcut."""

    features: int

    @nn.compact
    def __call__(self, x, temb):
        h = GroupNorm(self.groups, epsilon=1e-5, dtype=self.dtype, name="norm1")(x)
        h = Conv(self.features, 3, self.conv_impl, self.dtype, name="conv1")(nn.silu(h))
        temb = nn.Dense(self.features, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
        h = h + temb[:, None, None, :]
        h = GroupNorm(self.groups, epsilon=1e-5, dtype=self.dtype, name="norm2")(h)
        h = Conv(self.features, 3, self.conv_impl, self.dtype, name="conv2")(nn.silu(h))
        if x.shape[-1] != self.features:
            x = Conv(self.features, 1, self.conv_impl, self.dtype, name="conv_shortcut")(x)
        return x + h


class Attention(nn.Module):
    """Multi-head attention with diffusers' projections: to_q/to_k/to_v without bias, to_out."""

    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        dim = x.shape[-1]
        head_dim = dim // self.heads
        dense = lambda name, bias=False: nn.Dense(dim, use_bias=bias, dtype=self.dtype, name=name)  # noqa: E731
        q, k, v = dense("to_q")(x), dense("to_k")(context), dense("to_v")(context)
        split = lambda a: a.reshape((*a.shape[:-1], self.heads, head_dim))  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape)
        return dense("to_out", bias=True)(out)


class TransformerBlock(nn.Module):
    """LN -> self-attention, LN -> cross-attention to the label token, LN -> GEGLU feed-forward."""

    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        dim = x.shape[-1]
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)  # noqa: E731
        x = x + Attention(self.heads, self.dtype, name="attn1")(ln("norm1")(x))
        x = x + Attention(self.heads, self.dtype, name="attn2")(ln("norm2")(x), context)
        h = nn.Dense(8 * dim, dtype=self.dtype, name="ff_proj")(ln("norm3")(x))
        h, gate = jnp.split(h, 2, axis=-1)
        return x + nn.Dense(dim, dtype=self.dtype, name="ff_out")(h * nn.gelu(gate, False))


class SpatialTransformer(_NormedBlock):
    """diffusers' Transformer2DModel: GN -> conv1x1 -> TransformerBlock over pixels -> conv1x1."""

    heads: int

    @nn.compact
    def __call__(self, x, context):
        b, hgt, wid, c = x.shape
        h = GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        h = Conv(c, 1, self.conv_impl, self.dtype, name="proj_in")(h)
        h = TransformerBlock(self.heads, self.dtype, name="block")(
            h.reshape(b, hgt * wid, c), context
        )
        h = Conv(c, 1, self.conv_impl, self.dtype, name="proj_out")(h.reshape(b, hgt, wid, c))
        return x + h


class UNet(nn.Module):
    """Noise-prediction U-Net: ``apply(params, x, t, y) -> eps_hat`` with x (B, H, W, C),
    t (B,) a noise-level input (the caller scales diffusion time, e.g. 999 t), y (B,) int labels.
    """

    block_out_channels: Sequence[int] = (16, 32, 64)
    layers_per_block: int = 1
    attention_levels: Sequence[bool] = (False, False, True)
    up_attention_levels: Sequence[bool] | None = None  # None: same as attention_levels
    mid_attention: bool = True
    norm_groups: int = 8
    num_heads: int = 4
    num_classes: int = 10
    class_embedding: bool = True
    out_channels: int = 1
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "auto"  # how stride-1 convolutions run (models.layers.Conv)
    patch_size: int = 1  # > 1: a pixel-unshuffle stem (space_to_depth)

    def __post_init__(self):
        """Checks the fields' shapes at construction, before anything is traced.

        Raises:
          ValueError: no levels; attention levels not one per level; a count < 1;
            ``norm_groups`` not dividing a level's width; ``num_heads`` not dividing an
            attention level's width.
        """
        chans = tuple(self.block_out_channels)
        if not chans or min(chans) < 1:
            raise ValueError(f"block_out_channels must be positive widths, got {chans}")
        down = tuple(self.attention_levels)
        up = down if self.up_attention_levels is None else tuple(self.up_attention_levels)
        for name, levels in (("attention_levels", down), ("up_attention_levels", up)):
            if len(levels) != len(chans):
                raise ValueError(
                    f"{name} {levels} must have one entry per level of block_out_channels {chans}"
                )
        for name in ("layers_per_block", "norm_groups", "num_heads", "num_classes", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(c % self.norm_groups for c in chans):
            raise ValueError(f"norm_groups = {self.norm_groups} must divide every width {chans}")
        attended = [c for c, a, u in zip(chans, down, up, strict=True) if a or u]
        if self.mid_attention:
            attended.append(chans[-1])
        if any(c % self.num_heads for c in attended):
            raise ValueError(
                f"num_heads = {self.num_heads} must divide the attention levels' widths {attended}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x, t, y):
        p = self.patch_size
        x = space_to_depth(x, p)
        h = self._body(x, t, y, self.out_channels * p * p)
        return depth_to_space(h, p)

    def _body(self, x, t, y, out_channels):
        chans = tuple(self.block_out_channels)
        down_attn = tuple(self.attention_levels)
        up_attn = down_attn if self.up_attention_levels is None else tuple(self.up_attention_levels)
        dtype, conv = self.dtype, self.conv_impl
        shared = dict(groups=self.norm_groups, dtype=dtype, conv_impl=conv)
        resnet = functools.partial(ResnetBlock, **shared)
        attend = functools.partial(SpatialTransformer, heads=self.num_heads, **shared)
        temb_dim = 4 * chans[0]
        temb = timestep_embedding(t, chans[0])
        temb = nn.Dense(temb_dim, dtype=dtype, name="time_linear_1")(temb)
        temb = nn.Dense(temb_dim, dtype=dtype, name="time_linear_2")(nn.silu(temb))
        if self.class_embedding:
            temb = temb + nn.Embed(self.num_classes, temb_dim, name="class_embedding")(y).astype(
                temb.dtype
            )
        context = jax.nn.one_hot(y, self.num_classes, dtype=dtype)[:, None, :]

        h = Conv(chans[0], 3, conv, dtype, name="conv_in")(x.astype(dtype))
        skips = [h]
        for level, ch in enumerate(chans):
            for i in range(self.layers_per_block):
                h = resnet(features=ch, name=f"down_{level}_res_{i}")(h, temb)
                if down_attn[level]:
                    h = attend(name=f"down_{level}_attn_{i}")(h, context)
                skips.append(h)
            if level < len(chans) - 1:
                h = nn.Conv(
                    ch, (3, 3), strides=2, padding=1, dtype=dtype, name=f"down_{level}_downsample"
                )(h)
                skips.append(h)

        h = resnet(features=chans[-1], name="mid_res_0")(h, temb)
        if self.mid_attention:
            h = attend(name="mid_attn")(h, context)
        h = resnet(features=chans[-1], name="mid_res_1")(h, temb)

        for level in reversed(range(len(chans))):
            ch = chans[level]
            for i in range(self.layers_per_block + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = resnet(features=ch, name=f"up_{level}_res_{i}")(h, temb)
                if up_attn[level]:
                    h = attend(name=f"up_{level}_attn_{i}")(h, context)
            if level > 0:
                # Nearest 2x, cropped to the next skip's size (7 -> 4 -> 8 -> 7 at 28x28).
                b, hh, ww, c = h.shape
                h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), "nearest")
                th, tw = skips[-1].shape[1:3]
                h = Conv(ch, 3, conv, dtype, name=f"up_{level}_upsample")(h[:, :th, :tw])
        h = GroupNorm(self.norm_groups, epsilon=1e-5, dtype=dtype, name="norm_out")(h)
        h = Conv(out_channels, 3, conv, dtype, name="conv_out")(nn.silu(h))
        return h.astype(jnp.float32)


def check_model_config(model_config, image_shape=(28, 28)) -> None:
    """Checks what the ``UNet`` cannot check at its construction (``UNet.__post_init__`` checks
    its own fields): the section's dtype name and that ``patch_size`` divides the image.

    Raises:
      ValueError: an unknown dtype, or ``patch_size`` not dividing the image.
    """
    m = model_config
    if m.patch_size >= 1 and any(s % m.patch_size for s in image_shape):
        raise ValueError(
            f"model.patch_size {m.patch_size} must divide the image size {image_shape}"
        )
    try:
        jnp.dtype(m.dtype)
    except TypeError:
        raise ValueError(f"model.dtype {m.dtype!r} is not a dtype (float32, bfloat16)") from None


def make_unet(model_config, conv_impl: str = "auto", null_label: bool = False) -> UNet:
    """Builds the U-Net from a ``config.model`` section; ``conv_impl``: see ``layers.Conv``;
    ``null_label``: one more class, the null label of classifier-free guidance
    (``score.null_label``), for agents trained with ``train.label_dropout`` > 0.

    Raises:
      ValueError: an unknown ``conv_impl`` (the message lists the valid ones), or a section
        ``check_model_config`` or ``UNet`` refuses.
    """
    conv_impl_for(conv_impl, in_channels=0)  # checks the name now rather than at the first trace
    check_model_config(model_config)
    return UNet(
        block_out_channels=tuple(model_config.block_out_channels),
        layers_per_block=model_config.layers_per_block,
        attention_levels=tuple(model_config.attention_levels),
        up_attention_levels=tuple(model_config.up_attention_levels),
        mid_attention=model_config.mid_attention,
        norm_groups=model_config.norm_groups,
        num_heads=model_config.num_heads,
        num_classes=model_config.num_classes + int(null_label),
        class_embedding=model_config.class_embedding,
        dtype=jnp.dtype(model_config.dtype),
        conv_impl=conv_impl,
        patch_size=model_config.patch_size,
    )
