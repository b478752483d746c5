"""From a noise-prediction network to a score, and the denoising score-matching loss.

The network eps_theta(c_in(t) x, 999 t, y) predicts the noise z in x_t = alpha(t) x_0 + std(t) z,
so the score is s(x, t, y) = -eps_theta / std(t) (Ho et al. 2020; Song et al. 2021). The input is
scaled by c_in(t) = 1 / sqrt(alpha(t)^2 + std(t)^2) so that it has about unit scale under every
SDE (for VE, x_t reaches sigma_max = 50); this, and dividing by std(t), is the score scaling the
paper's code left out (RESEARCH.md section 1).

Loss (denoising score matching with lambda(t) = std(t)^2, Song et al. 2021 eq. 7):
    L = E_{t ~ U(eps, T), x_0, z} || eps_theta(x_t, t, y) - z ||^2,
averaged over pixels and the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedinf_jax.sde import SDE, batch_broadcast
from fedinf_jax.types import Array, Images, Key, Labels, Params, Times

TIME_SCALE = 999.0
"""Diffusion time t in [0, 1] enters the sinusoidal embedding as 999 t (the DDPM step range)."""


def make_eps_fn(model: nn.Module, sde: SDE) -> Callable[[Params, Images, Times, Labels], Images]:
    """eps_theta(params, x_t, t, y): the network's noise prediction with input scaling."""

    def eps_fn(params, x, t, y):
        alpha, std = sde.marginal(t)
        c_in = jax.lax.rsqrt(alpha**2 + std**2)
        return model.apply(params, x * batch_broadcast(c_in, x), TIME_SCALE * t, y)

    return eps_fn


def make_score_fn(model: nn.Module, sde: SDE) -> Callable[[Params, Images, Times, Labels], Images]:
    """s_theta(params, x, t, y) = -eps_theta(params, x, t, y) / std(t)."""
    eps_fn = make_eps_fn(model, sde)

    def score_fn(params, x, t, y):
        _, std = sde.marginal(t)
        return -eps_fn(params, x, t, y) / batch_broadcast(std, x)

    return score_fn


def make_loss_fn(model: nn.Module, sde: SDE, eps: float = 1e-5):
    """loss(params, x0, y, key) -> scalar DSM loss for one agent's batch (t ~ U(eps, T))."""
    eps_fn = make_eps_fn(model, sde)

    def loss_fn(params: Params, x0: Images, y: Labels, key: Key) -> Array:
        t_key, z_key = jax.random.split(key)
        t = jax.random.uniform(t_key, (x0.shape[0],), minval=eps, maxval=sde.T)
        z = jax.random.normal(z_key, x0.shape)
        pred = eps_fn(params, sde.perturb(x0, t, z), t, y)
        return jnp.mean(jnp.square(pred - z))

    return loss_fn
