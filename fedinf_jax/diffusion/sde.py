"""Forward diffusion SDEs dx = f(x, t) dt + g(t) dW (Song et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations"), with their Gaussian marginals.

Every SDE here has an affine drift, so the perturbation kernel is
    x_t | x_0 ~ N(alpha(t) x_0, std(t)^2 I),
and ``marginal(t)`` returns (alpha(t), std(t)). Classes follow equinox's rule: ``SDE`` is abstract,
the members are final.
"""

from __future__ import annotations

import abc
import dataclasses
import math

import jax
import jax.numpy as jnp

from fedinf_jax.core.registry import Registry
from fedinf_jax.core.types import Array, Key

SDES: Registry[type[SDE]] = Registry("SDE")
"""The SDEs by name; ``make_sde`` builds one from a config section's fields of the same names."""


class SDE(abc.ABC):
    """Abstract forward SDE on t in [0, T]."""

    T: float = 1.0

    @abc.abstractmethod
    def drift(self, x: Array, t: Array) -> Array:
        """f(x, t), broadcasting t against the batch axis of x."""

    @abc.abstractmethod
    def diffusion(self, t: Array) -> Array:
        """g(t) (scalar noise level per time)."""

    @abc.abstractmethod
    def marginal(self, t: Array) -> tuple[Array, Array]:
        """(alpha(t), std(t)) of the perturbation kernel N(alpha x_0, std^2 I)."""

    @abc.abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the prior N(0, prior_std^2 I) at t = T."""

    @abc.abstractmethod
    def drift_divergence(self, x: Array, t: Array) -> Array:
        """div_x f(x, t) per example, shape (batch,) (every drift here is linear in x)."""

    def prior_logp(self, x: Array) -> Array:
        """log N(x; 0, prior_std^2 I) per example, shape (batch,)."""
        var = self.prior_std() ** 2
        x = x.reshape(x.shape[0], -1)
        return -0.5 * (jnp.sum(x**2, axis=1) / var + x.shape[1] * math.log(2.0 * math.pi * var))

    def prior_sample(self, key: Key, shape: tuple[int, ...]) -> Array:
        """A draw from the prior N(0, prior_std^2 I)."""
        return self.prior_std() * jax.random.normal(key, shape)

    def noise_level(self, t: Array) -> Array:
        """sigma(t) = std(t) / alpha(t): x_t / alpha(t) is x_0 plus noise of this scale (EDM's
        sigma; exp(-log-SNR / 2)). Increasing in t for every SDE here."""
        alpha, std = self.marginal(t)
        return std / alpha

    def time_at_noise_level(self, sigma: Array, t_min: float = 0.0) -> Array:
        """The t in [t_min, T] with ``noise_level(t) = sigma`` (clipped to the interval's ends),
        by bisection: one inverse for every SDE, to float32 resolution after 32 halvings."""
        sigma = jnp.asarray(sigma, jnp.float32)
        lo = jnp.full_like(sigma, t_min)
        hi = jnp.full_like(sigma, self.T)

        def halve(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            below = self.noise_level(mid) < sigma
            return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))
        return 0.5 * (lo + hi)

    def perturb(self, x0: Array, t: Array, noise: Array) -> Array:
        """x_t = alpha(t) x_0 + std(t) z, with t of shape (batch,)."""
        alpha, std = self.marginal(t)
        return batch_broadcast(alpha, x0) * x0 + batch_broadcast(std, x0) * noise


def batch_broadcast(v: Array, x: Array) -> Array:
    """Reshapes a per-example vector (batch,) to broadcast against x (batch, ...)."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def tweedie_denoise(sde: SDE, x: Array, score: Array, t) -> Array:
    """E[x_0 | x_t] = (x + std(t)^2 s) / alpha(t) (Tweedie's formula), for x_t = x with score
    s at the time t (a scalar)."""
    alpha, std = sde.marginal(jnp.asarray(t))
    return (x + batch_broadcast(std**2, x) * score) / batch_broadcast(alpha, x)


@dataclasses.dataclass(frozen=True)
class _LinearBetaSDE(SDE):
    """Abstract: the VP family's linear schedule beta(t) = beta_min + t (beta_max - beta_min),
    drift f = -beta(t) x / 2, alpha(t) = exp(-t^2 (beta_max - beta_min) / 4 - t beta_min / 2)."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def drift(self, x, t):
        return -0.5 * batch_broadcast(self.beta(t), x) * x

    def drift_divergence(self, x, t):
        dim = math.prod(x.shape[1:])
        return jnp.broadcast_to(-0.5 * dim * self.beta(t), x.shape[:1])

    def prior_std(self):
        return 1.0


@SDES.register("vp")
@dataclasses.dataclass(frozen=True)
class VPSDE(_LinearBetaSDE):
    """Variance preserving: g = sqrt(beta(t)), std(t) = sqrt(1 - alpha(t)^2)."""

    def diffusion(self, t):
        return jnp.sqrt(self.beta(t))

    def marginal(self, t):
        log_alpha = self.log_alpha(t)
        return jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2.0 * log_alpha))


@SDES.register("subvp")
@dataclasses.dataclass(frozen=True)
class SubVPSDE(_LinearBetaSDE):
    """Sub-VP: g(t)^2 = beta(t) (1 - alpha(t)^4), std(t) = 1 - alpha(t)^2."""

    def diffusion(self, t):
        return jnp.sqrt(self.beta(t) * -jnp.expm1(4.0 * self.log_alpha(t)))

    def marginal(self, t):
        log_alpha = self.log_alpha(t)
        return jnp.exp(log_alpha), -jnp.expm1(2.0 * log_alpha)


@SDES.register("ve")
@dataclasses.dataclass(frozen=True)
class VESDE(SDE):
    """Variance exploding (score_sde): sigma(t) = sigma_min (sigma_max / sigma_min)^t, f = 0,
    g = sigma(t) sqrt(2 log(sigma_max / sigma_min)); alpha = 1 and, started at x_0 at t = 0,
    std(t)^2 = sigma(t)^2 - sigma_min^2 exactly (score_sde approximates std by sigma(t))."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def drift(self, x, t):
        return jnp.zeros_like(x)

    def drift_divergence(self, x, t):
        return jnp.zeros(x.shape[:1], x.dtype)

    def diffusion(self, t):
        return self.sigma(t) * math.sqrt(2.0 * math.log(self.sigma_max / self.sigma_min))

    def marginal(self, t):
        return jnp.ones_like(t), jnp.sqrt(self.sigma(t) ** 2 - self.sigma_min**2)

    def prior_std(self):
        return math.sqrt(self.sigma_max**2 - self.sigma_min**2)


@SDES.register("ve_paper")
@dataclasses.dataclass(frozen=True)
class PaperVESDE(SDE):
    """The paper's VE SDE (Song's tutorial form): f = 0, g(t) = sigma^t, so
    std(t)^2 = int_0^t sigma^(2s) ds = (sigma^(2t) - 1) / (2 ln sigma); alpha = 1
    (the paper's code's SDE; docs/results.md)."""

    sigma: float = 25.0

    def drift(self, x, t):
        return jnp.zeros_like(x)

    def drift_divergence(self, x, t):
        return jnp.zeros(x.shape[:1], x.dtype)

    def diffusion(self, t):
        return self.sigma**t

    def marginal(self, t):
        var = jnp.expm1(2.0 * t * math.log(self.sigma)) / (2.0 * math.log(self.sigma))
        return jnp.ones_like(t), jnp.sqrt(var)

    def prior_std(self):
        return math.sqrt((self.sigma ** (2 * self.T) - 1.0) / (2.0 * math.log(self.sigma)))


def make_sde(sde_config) -> SDE:
    """Builds the SDE named by ``sde_config.name`` from the section's fields that are that SDE's
    parameters (``beta_min``, ``beta_max`` for ``vp``; ``sigma`` for ``ve_paper``; ...).

    Raises:
      ValueError: an unknown name (the message lists the valid ones).
    """
    return SDES.build(sde_config.name, sde_config)
