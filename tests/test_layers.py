"""The project's GroupNorm is Flax's: same parameters, same function, same gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedinf_jax.models.layers import GroupNorm


@pytest.mark.parametrize("shape,groups", [((3, 7, 5, 8), 4), ((2, 4, 4, 6), 3), ((5, 9, 2), 1)])
def test_group_norm_is_flax_group_norm(shape, groups):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1.5, 3.0, size=shape), jnp.float32)
    ours, flax_gn = GroupNorm(groups, epsilon=1e-5), nn.GroupNorm(groups, epsilon=1e-5)
    params = ours.init(jax.random.key(0), x)
    assert jax.tree.structure(params) == jax.tree.structure(flax_gn.init(jax.random.key(0), x))
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    np.testing.assert_allclose(ours.apply(params, x), flax_gn.apply(params, x), atol=2e-5)

    def loss(module):
        return lambda p, x: jnp.sum(module.apply(p, x) * jnp.cos(x))

    got = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    want = jax.grad(loss(flax_gn), argnums=(0, 1))(params, x)
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
