"""The project's GroupNorm and convolution are Flax's: same parameters, same function, same
gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from fedinf_jax.agents import runs
from fedinf_jax.models.layers import (
    CONV_IMPLS,
    MATMUL_MIN_CHANNELS,
    Conv,
    GroupNorm,
    conv_impl_for,
)
from fedinf_jax.models.unet import depth_to_space, make_unet, space_to_depth


@pytest.mark.parametrize("shape,groups", [((3, 7, 5, 8), 4), ((2, 4, 4, 6), 3), ((5, 9, 2), 1)])
def test_group_norm_is_flax_group_norm(shape, groups):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1.5, 3.0, size=shape), jnp.float32)
    # Jitted, as the U-Net runs them: one compilation each instead of one per operation.
    ours, flax_gn = GroupNorm(groups, epsilon=1e-5), nn.GroupNorm(groups, epsilon=1e-5)
    params = jax.jit(ours.init)(jax.random.key(0), x)
    flax_params = jax.eval_shape(flax_gn.init, jax.random.key(0), x)
    assert jax.tree.structure(params) == jax.tree.structure(flax_params)
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    np.testing.assert_allclose(
        jax.jit(ours.apply)(params, x), jax.jit(flax_gn.apply)(params, x), atol=2e-5
    )

    def loss(module):
        return lambda p, x: jnp.sum(module.apply(p, x) * jnp.cos(x))

    got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x)
    want = jax.jit(jax.grad(loss(flax_gn), argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_group_norm_dtype_and_bad_groups():
    x = jnp.ones((2, 4, 4, 6), jnp.bfloat16)
    module = GroupNorm(3, dtype=jnp.bfloat16)
    params = module.init(jax.random.key(0), x)
    assert params["params"]["scale"].dtype == jnp.float32
    assert module.apply(params, x).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="6 channels do not split into 4 groups"):
        GroupNorm(4).init(jax.random.key(0), x)


@pytest.mark.parametrize("impl", ["xla", "matmul"])  # "auto" picks one of them per layer
@pytest.mark.parametrize("kernel_size,in_channels", [(3, 3), (3, MATMUL_MIN_CHANNELS), (1, 5)])
def test_conv_is_flax_conv(impl, kernel_size, in_channels):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 5, 4, in_channels)), jnp.float32)
    ours = Conv(6, kernel_size, impl)
    flax_conv = nn.Conv(6, (kernel_size, kernel_size), padding="SAME")
    params = ours.init(jax.random.key(0), x)
    want_init = flax_conv.init(jax.random.key(0), x)  # same names, shapes and initial values
    assert jax.tree.structure(params) == jax.tree.structure(want_init)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want_init), strict=True):
        np.testing.assert_array_equal(a, b)
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    np.testing.assert_allclose(ours.apply(params, x), flax_conv.apply(params, x), atol=1e-4)
    cotangent = jnp.asarray(rng.normal(size=(2, 5, 4, 6)), jnp.float32)

    def loss(module):
        return lambda p, x: jnp.sum(module.apply(p, x) * cotangent)

    got = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    want = jax.grad(loss(flax_conv), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv_impl_choice_and_bad_input():
    assert conv_impl_for("auto", MATMUL_MIN_CHANNELS, "cpu") == "matmul"
    assert conv_impl_for("auto", MATMUL_MIN_CHANNELS - 1, "cpu") == "xla"
    assert conv_impl_for("auto", 4 * MATMUL_MIN_CHANNELS, "gpu") == "xla"
    assert conv_impl_for("matmul", 1, "gpu") == "matmul"
    assert CONV_IMPLS.names() == ("xla", "matmul")
    with pytest.raises(ValueError, match="kernel_size must be 1 or 3, got 5"):
        Conv(2, 5).init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))
    config = base.get_config("smoke")
    config.conv_impl = "winograd"
    with pytest.raises(ValueError, match=r"unknown convolution 'winograd'; valid: \['auto', 'xla'"):
        runs.resolve(config)


def test_space_to_depth_is_patch_layout_and_inverse():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    z = space_to_depth(x, 2)
    assert z.shape == (2, 2, 3, 12)
    # Channel (di * 2 + dj) * C + c of output pixel (i, j) is input pixel (2i + di, 2j + dj, c).
    for di in range(2):
        for dj in range(2):
            np.testing.assert_array_equal(
                z[..., (di * 2 + dj) * 3 : (di * 2 + dj + 1) * 3], x[:, di::2, dj::2]
            )
    np.testing.assert_array_equal(depth_to_space(z, 2), x)
    assert space_to_depth(x, 1) is x
    with pytest.raises(ValueError, match="patch_size 4 must divide the image size 4 x 6"):
        space_to_depth(x, 4)


def test_unet_patch_stem_keeps_the_image_shape():
    config = base.get_config("smoke")
    config.model.patch_size = 2
    model = make_unet(config.model)
    x, t, y = jnp.ones((2, 28, 28, 1)), jnp.ones((2,)), jnp.array([0, 1])
    # Shapes only: traced, not run (running the U-Net eagerly compiles every operation).
    params = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
    assert jax.eval_shape(model.apply, params, x, t, y).shape == x.shape
    # The stem's input and output convolutions see the 2 x 2 patches as 4 channels.
    assert params["params"]["conv_in"]["kernel"].shape[-2] == 4
    assert params["params"]["conv_out"]["kernel"].shape[-1] == 4
