"""From the network's output to a score, and the denoising score-matching loss.

Every SDE here perturbs data as x_t = alpha(t) x_0 + std(t) z. The network F(c_in x, 999 t, y)
is read as a denoiser (Karras et al. 2022, "Elucidating the Design Space...", section 5)

    x0_hat(x, t, y) = c_skip(t) x + c_out(t) F(c_in(t) x, 999 t, y),

and the score follows from Tweedie's formula, s(x, t, y) = (alpha x0_hat - x) / std^2.
Two parametrizations (``config.model.parametrization``):

* ``eps`` (Ho et al. 2020; Song et al. 2021): F predicts the noise z: c_skip = 1 / alpha,
  c_out = -std / alpha, so s = -F / std; input scale c_in = 1 / sqrt(alpha^2 + std^2) (unit scale
  under every SDE; VE reaches sigma_max = 50). Dividing by std and scaling the input is what the
  paper's code left out (docs/results.md).
* ``edm`` (Karras et al. 2022, Table 1, in the scaled form of their eq. 4): with sigma = std /
  alpha and sigma_data = ``config.model.sigma_data``,
      c_in = 1 / sqrt(std^2 + alpha^2 sigma_data^2),
      c_skip = sigma_data^2 / ((sigma^2 + sigma_data^2) alpha),
      c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2).
  Under the VP SDE with sigma_data = 1 this is v-prediction (Salimans & Ho 2022). Its error in
  x0_hat stays of the order of the network's error at every noise level; under ``eps`` it is
  that error times std / alpha, which is about 150 at t = 1 of the VP SDE, so an agent that has
  not yet learnt the high-noise regime to 1e-3 drives the reverse process away from the data
  (docs/results.md, "Why the `edm` parametrization").

Loss (denoising score matching; Song et al. 2021 eq. 7 with lambda(t) = std^2 for ``eps``, EDM's
lambda = 1 / c_out^2 for ``edm``): the network's target is F* = (x_0 - c_skip x_t) / c_out,
    L = E_{t ~ p(t), x_0, z} || F - F* ||^2,
averaged over pixels and the batch (F* = z for ``eps``). The training times (``train.noise``):
``uniform_t``, t ~ U(eps, T) (score_sde); ``lognormal``, EDM's ln sigma ~ N(P_mean, P_std^2) for
the noise level sigma = std / alpha; or ``log_snr``, ln sigma uniform between sigma(eps) and
sigma(T) (every octave of noise equally often); the last two mapped to t through the SDE
(``SDE.time_at_noise_level``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedinf_jax.core.registry import Registry, check_choice
from fedinf_jax.core.types import Array, Images, Key, Labels, Params, Times
from fedinf_jax.diffusion.sde import SDE, batch_broadcast

TIME_SCALE = 999.0
"""Diffusion time t in [0, 1] enters the sinusoidal embedding as 999 t (the DDPM step range)."""

PARAMETRIZATIONS = ("eps", "edm")
TRAINING_NOISE: Registry[Callable[..., Callable[[Key, int], Times]]] = Registry("train.noise")
"""How training times are drawn: ``(sde, eps, p_mean, p_std) -> ((key, n) -> n times)``."""
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2  # Karras et al. 2022, Table 1: ln sigma ~ N(P_mean, P_std^2)


@dataclasses.dataclass(frozen=True)
class Parametrization:
    """How the network's output F maps to a denoised image and a score (module docstring)."""

    name: str = "eps"
    sigma_data: float = 0.5  # edm only

    def __post_init__(self):
        check_choice("parametrization", self.name, PARAMETRIZATIONS)
        if self.sigma_data <= 0:
            raise ValueError(f"model.sigma_data must be > 0, got {self.sigma_data}")

    def input_scale(self, alpha: Array, std: Array) -> Array:
        """c_in(t)."""
        if self.name == "eps":
            return jax.lax.rsqrt(alpha**2 + std**2)
        return jax.lax.rsqrt(std**2 + (alpha * self.sigma_data) ** 2)

    def _edm(self, alpha: Array, std: Array) -> tuple[Array, Array, Array]:
        """(c_skip, c_out, 1 - alpha c_skip) of ``edm``; the last computed without cancellation."""
        sigma2, sd2 = (std / alpha) ** 2, self.sigma_data**2
        c_skip = sd2 / ((sigma2 + sd2) * alpha)
        c_out = std / alpha * self.sigma_data * jax.lax.rsqrt(sigma2 + sd2)
        return c_skip, c_out, sigma2 / (sigma2 + sd2)

    def score(self, out: Array, x: Array, alpha: Array, std: Array) -> Array:
        """s = (alpha x0_hat - x) / std^2 from the network output ``out`` at x (per-example
        alpha and std, already broadcast)."""
        if self.name == "eps":
            return -out / std
        _, c_out, residual = self._edm(alpha, std)
        return (alpha * c_out * out - residual * x) / std**2

    def target(self, x0: Array, z: Array, alpha: Array, std: Array) -> Array:
        """F* = (x_0 - c_skip x_t) / c_out for x_t = alpha x_0 + std z."""
        if self.name == "eps":
            return z
        c_skip, c_out, residual = self._edm(alpha, std)
        return (residual * x0 - c_skip * std * z) / c_out


def parametrization_of(model_config) -> Parametrization:
    """The ``config.model`` section's parametrization (``eps`` for records that predate it)."""
    return Parametrization(
        model_config.get("parametrization", "eps"), float(model_config.get("sigma_data", 0.5))
    )


def _network(model: nn.Module, param: Parametrization, sde: SDE):
    """(params, x, t, y) -> (F, alpha, std), the latter two broadcast against x."""

    def apply(params, x, t, y):
        alpha, std = sde.marginal(t)
        alpha, std = batch_broadcast(alpha, x), batch_broadcast(std, x)
        out = model.apply(params, x * param.input_scale(alpha, std), TIME_SCALE * t, y)
        return out, alpha, std

    return apply


def make_score_fn(
    model: nn.Module, sde: SDE, param: Parametrization = Parametrization()
) -> Callable[[Params, Images, Times, Labels], Images]:
    """s_theta(params, x, t, y) = (alpha x0_hat - x) / std^2."""
    network = _network(model, param, sde)

    def score_fn(params, x, t, y):
        out, alpha, std = network(params, x, t, y)
        return param.score(out, x, alpha, std)

    return score_fn


@TRAINING_NOISE.register("uniform_t")
def _uniform_t(sde: SDE, eps: float, p_mean: float, p_std: float):
    del p_mean, p_std
    return lambda key, n: jax.random.uniform(key, (n,), minval=eps, maxval=sde.T)


@TRAINING_NOISE.register("lognormal")
def _lognormal(sde: SDE, eps: float, p_mean: float, p_std: float):
    def lognormal(key, n):
        sigma = jnp.exp(p_mean + p_std * jax.random.normal(key, (n,)))
        return sde.time_at_noise_level(sigma, t_min=eps)

    return lognormal


@TRAINING_NOISE.register("log_snr")
def _log_snr(sde: SDE, eps: float, p_mean: float, p_std: float):
    del p_mean, p_std
    lo, hi = (math.log(float(sde.noise_level(jnp.float32(t)))) for t in (eps, sde.T))

    def log_uniform(key, n):
        sigma = jnp.exp(jax.random.uniform(key, (n,), minval=lo, maxval=hi))
        return sde.time_at_noise_level(sigma, t_min=eps)

    return log_uniform


def make_time_sampler(
    sde: SDE,
    name: str = "uniform_t",
    eps: float = 1e-5,
    p_mean: float = EDM_P_MEAN,
    p_std: float = EDM_P_STD,
) -> Callable[[Key, int], Times]:
    """(key, n) -> n training times in [eps, T], by ``name``: ``uniform_t``, ``lognormal`` (with
    ``p_mean``, ``p_std``) or ``log_snr`` (module docstring).

    Raises:
      ValueError: an unknown name (the valid ones listed) or p_std <= 0.
    """
    build = TRAINING_NOISE.get(name)
    if p_std <= 0:
        raise ValueError(f"train.p_std must be > 0, got {p_std}")
    return build(sde, eps, p_mean, p_std)


def null_label(model: nn.Module) -> int:
    """The label of the unconditional score: the last class of a model built with a null class
    (``models.make_unet(..., null_label=True)``)."""
    return model.num_classes - 1


def make_loss_fn(
    model: nn.Module,
    sde: SDE,
    eps: float = 1e-5,
    param: Parametrization = Parametrization(),
    times: Callable[[Key, int], Times] | None = None,
    label_dropout: float = 0.0,
):
    """loss(params, x0, y, key) -> scalar DSM loss for one agent's batch, at training times from
    ``times`` (default t ~ U(eps, T)).

    ``label_dropout`` > 0 (classifier-free guidance, Ho and Salimans 2022): each example's label
    is replaced by the null label ``model.num_classes - 1`` (the model's extra class, see
    ``null_label``) with that probability, so that one network learns both the conditional and
    the unconditional score. 0 draws nothing: the loss of a run without dropout is unchanged.
    """
    network = _network(model, param, sde)
    times = times or make_time_sampler(sde, "uniform_t", eps)

    def loss_fn(params: Params, x0: Images, y: Labels, key: Key) -> Array:
        t_key, z_key = jax.random.split(key)
        if label_dropout > 0:  # its own key: the times and noise are those of a run without
            dropped = jax.random.bernoulli(jax.random.fold_in(key, 1), label_dropout, y.shape)
            y = jnp.where(dropped, null_label(model), y)
        t = times(t_key, x0.shape[0])
        z = jax.random.normal(z_key, x0.shape)
        out, alpha, std = network(params, sde.perturb(x0, t, z), t, y)
        return jnp.mean(jnp.square(out - param.target(x0, z, alpha, std)))

    return loss_fn
