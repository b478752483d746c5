"""Exponential integrators of the reverse process: DPM-Solver++ (Lu et al. 2022, "DPM-Solver++:
Fast Solver for Guided Sampling of Diffusion Probabilistic Models") as a Diffrax solver.

Every SDE here perturbs data as x_t = alpha(t) x_0 + std(t) z. Written in the log
signal-to-noise ratio lambda = log(alpha / std) and the denoiser D(x, t) = E[x_0 | x_t] (Tweedie's
formula on the aggregated score, D = (x + std^2 s) / alpha), the reverse process is linear in x
but for D, and its linear part integrates exactly. One step from t to s < t, h = lambda_s -
lambda_t > 0, with D frozen at its value at t (eta = 0: the probability-flow ODE; eta = 1: the
reverse SDE):

    x_s = (std_s / std_t) e^(-eta h) x_t + alpha_s (1 - e^(-(1 + eta) h)) D
          + eta std_s sqrt(1 - e^(-2 h)) z,

with z ~ N(0, I) from the step's Brownian increment, z = dW / sqrt(dtau). On the ODE this is
DDIM (Song et al. 2021); on the SDE it is DDPM's ancestral step (Ho et al. 2020), whose noise is
the posterior's, std_s^2 (1 - e^(-2 h)) <= std_s^2: never more than the marginal at s holds, where
an Euler-Maruyama step adds g^2 dtau whatever the denoiser removed (several times std_s^2 for the
last steps of a coarse grid: the residual noise that a final Tweedie step at t_end, which expects
std(t_end), leaves in the image). The second-order multistep solver (DPM-Solver++(2M), its
midpoint form) replaces D by D + (D - D_prev) h / (2 h_prev) with the previous step's denoiser
D_prev and log-SNR step h_prev (the first step is first order); on the SDE, the same with
eta = 1 (SDE-DPM-Solver++(2M)).

The solver asks the drift term for D: the drift's vector field is a ``DenoiserField``
(``fedinf_jax.sampling.reverse.ReverseDrift``). It steps the solution's images, its ``x``, and
carries the rest of the solution (an aggregator's state that the path does not drive) unchanged.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import diffrax
import equinox as eqx
import jax.numpy as jnp

from fedinf_jax.core.types import Array


class DenoiserField(eqx.Module):
    """A reverse process's drift in tau = T - t (what ``diffrax.ODETerm`` integrates) that
    also gives the process's marginal scales and its denoiser, for ``DPMSolverPP``."""

    @abc.abstractmethod
    def __call__(self, tau, y, args):
        """The drift dy/dtau."""

    @abc.abstractmethod
    def marginal(self, tau) -> tuple[Array, Array]:
        """(alpha, std) of the forward process at t = T - tau."""

    @abc.abstractmethod
    def denoised(self, tau, y, args) -> Array:
        """E[x_0 | x_t] at t = T - tau for the images ``y.x``."""


class _Field(eqx.Module):
    """The drift's ``DenoiserField`` at Diffrax's normalised times (``diffeqsolve`` wraps each
    term in ``WrapTerm(term, direction)``: the field's time is the solver's times direction)."""

    field: DenoiserField
    direction: Array

    def marginal(self, tau):
        return self.field.marginal(tau * self.direction)

    def denoised(self, tau, y, args):
        return self.field.denoised(tau * self.direction, y, args)

    def log_snr(self, tau) -> Array:
        alpha, std = self.marginal(tau)
        return jnp.log(alpha) - jnp.log(std)


def _unwrapped(term: diffrax.AbstractTerm) -> tuple[diffrax.AbstractTerm, Array]:
    """(the term given to ``diffeqsolve``, the direction of time) of a term as the solver
    receives it: ``diffeqsolve`` wraps each term to normalise time's direction (Diffrax's
    ``WrapTerm``, which it does not export: its ``term`` and ``direction``)."""
    direction = jnp.asarray(1)
    while not isinstance(term, diffrax.ODETerm | diffrax.ControlTerm) and hasattr(term, "term"):
        direction, term = direction * getattr(term, "direction", 1), term.term
    return term, direction


def _split(terms) -> tuple[_Field, diffrax.AbstractTerm | None]:
    """(the drift's ``DenoiserField``, the noise term or None) of the reverse process's terms:
    ``ODETerm(drift)``, or ``MultiTerm(ODETerm(drift), ControlTerm(diffusion, Brownian path))``,
    each as ``diffeqsolve`` wrapped it."""
    drift, noise = terms.terms if isinstance(terms, diffrax.MultiTerm) else (terms, None)
    drift, direction = _unwrapped(drift)
    field = getattr(drift, "vector_field", None)
    if not isinstance(field, DenoiserField) or not (
        noise is None or isinstance(_unwrapped(noise)[0], diffrax.ControlTerm)
    ):
        raise TypeError(
            "DPMSolverPP integrates fedinf_jax's reverse process: ODETerm(drift) or "
            "MultiTerm(ODETerm(drift), ControlTerm(...)) whose drift is a DenoiserField"
        )
    return _Field(field, direction), noise


class DPMSolverPP(diffrax.AbstractItoSolver):
    """DPM-Solver++ with data prediction (module docstring): first order (``second_order``
    False: DDIM on the ODE, DDPM's ancestral step on the SDE) or the second-order multistep
    2M. Deterministic on ``ODETerm(drift)``, stochastic (eta = 1) on ``MultiTerm(ODETerm(drift),
    ControlTerm(diffusion, Brownian path))``. Does not support adaptive step sizing. Uses 1
    evaluation of the denoiser per step. Uses local linear interpolation for ``SaveAt(ts=...)``.
    """

    second_order: bool = eqx.field(default=False, static=True)

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

    def order(self, terms):
        return 2 if self.second_order else 1

    def strong_order(self, terms):
        return 0.5

    def init(self, terms, t0, t1, y0, args):
        del t1, args
        field, _ = _split(terms)
        # (the previous step's denoiser, its lambda; whether there was one)
        return jnp.zeros_like(y0.x), field.log_snr(t0), jnp.asarray(False)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump
        field, noise = _split(terms)
        d_prev, lam_prev, has_prev = solver_state
        (_, std_t), (alpha_s, std_s) = field.marginal(t0), field.marginal(t1)
        lam_t, lam_s = field.log_snr(t0), field.log_snr(t1)
        h = lam_s - lam_t
        d = field.denoised(t0, y0, args)
        d_eff = d
        if self.second_order:
            step_ratio = h / jnp.where(has_prev, lam_t - lam_prev, 1.0)
            d_eff = jnp.where(has_prev, d + 0.5 * step_ratio * (d - d_prev), d)
        eta = 0.0 if noise is None else 1.0
        x1 = (std_s / std_t) * jnp.exp(-eta * h) * y0.x - alpha_s * jnp.expm1(
            -(1 + eta) * h
        ) * d_eff
        if noise is not None:
            z = noise.contr(t0, t1) / jnp.sqrt(t1 - t0)
            x1 = x1 + std_s * jnp.sqrt(-jnp.expm1(-2.0 * h)) * z
        y1 = eqx.tree_at(lambda y: y.x, y0, x1)
        state = (d, lam_t, jnp.asarray(True))
        return y1, None, dict(y0=y0, y1=y1), state, diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)
