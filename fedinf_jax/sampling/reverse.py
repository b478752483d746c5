"""The reverse process as Diffrax terms, in tau = T - t so that every solver runs forward:

    dx/dtau = -f(x, t) + c g(t)^2 s(x, t, y)      (c = 1 reverse SDE, 1/2 probability-flow ODE)

with noise g dW_tau on the SDE, where s is the federated score (``FederatedScore``). The solution
is the pair ``(x, aggregator state)`` (``SolveState``); the state changes through the
aggregator's ``tendency``. Where the SDE's noise drives that state (or the aggregator brings its
own noise), drift and noise form one control term in (dtau, dW) (``StepOperator``), so each step
evaluates the K agents once; otherwise the terms are ``MultiTerm(ODETerm, ControlTerm)``. The
drift (``ReverseDrift``) also gives the denoiser E[x_0 | x_t], which the exponential integrators
step with (``fedinf_jax.sampling.exponential``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax

from fedinf_jax.core.types import Array, Key
from fedinf_jax.diffusion.sde import SDE, tweedie_denoise
from fedinf_jax.sampling.aggregators import Aggregator
from fedinf_jax.sampling.exponential import DenoiserField
from fedinf_jax.sampling.federated_score import FederatedScore
from fedinf_jax.sampling.solvers import SolverSpec, noise_drives_state


class SolveState(NamedTuple):
    """The solution Diffrax integrates: images and the aggregator's state."""

    x: Array
    aggregator: Any


class PerSampleBrownianPath(diffrax.AbstractBrownianPath):
    """Independent Brownian paths, one per sample (leading axis), each from its own key.

    Diffrax's paths draw one key's noise for the whole shape; under ``vmap`` a shared key gives
    every sample the same path (diffrax issue 531). Here sample i's increments depend only on its
    key, so a sample is the same whatever batch it is drawn in.
    """

    paths: diffrax.AbstractBrownianPath
    levy_area: type = eqx.field(static=True)
    _t0: float = eqx.field(static=True)
    _t1: float = eqx.field(static=True)

    def __init__(
        self,
        make_path: Callable[[Key], diffrax.AbstractBrownianPath],
        keys: Key,
        t0: float = -math.inf,
        t1: float = math.inf,
    ):
        self.paths = eqx.filter_vmap(make_path)(keys)
        self.levy_area = self.paths.levy_area
        self._t0, self._t1 = t0, t1

    @property
    def t0(self):
        return self._t0

    @property
    def t1(self):
        return self._t1

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        out = eqx.filter_vmap(lambda p: p.evaluate(t0, t1, left, use_levy))(self.paths)
        if use_levy:  # the increment's dt is shared, not per sample
            out = eqx.tree_at(lambda v: v.dt, out, out.dt[0])
        return out


class NoiseOperator(lineax.AbstractLinearOperator):
    """The reverse SDE's additive noise on the solution ``(x, aggregator state)``:
    dW (shaped like x) -> SolveState(g dW, 0), for aggregators whose state the noise does not
    drive.

    An operator with array fields (not a closure) so that Diffrax's additive-noise solvers can
    evaluate it at two times under ``vmap``; it holds nothing that depends on the solution, which
    those solvers check.
    """

    g: Array
    structure: Any = eqx.field(static=True)  # (x, aggregator state) as ShapeDtypeStructs

    def mv(self, vector):
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.structure.aggregator)
        return SolveState(self.g * vector, zeros)

    def as_matrix(self):
        raise NotImplementedError("NoiseOperator is matrix-free")

    def transpose(self):
        raise NotImplementedError("NoiseOperator is matrix-free")

    def in_structure(self):
        return self.structure.x

    def out_structure(self):
        return self.structure


class StepOperator(lineax.AbstractLinearOperator):
    """The whole reverse-SDE step from one evaluation, for aggregators whose state the noise
    drives (``tendency``) or whose noise is their own (``noise``):
    (dtau, dW) -> SolveState(dx, tendency(..., dx, dtau)), dx = b dtau + noise(g dW).

    Linear in its control (dtau, dW) (``TimeAndNoise``), so Euler-Maruyama's single product
    ``vf_prod`` takes the step with the scores evaluated once; splitting drift and noise into two
    Diffrax terms would evaluate the K agents twice per step.
    """

    b: Array
    g: Array
    structure: Any = eqx.field(static=True)  # (x, aggregator state) as ShapeDtypeStructs
    aggregator: Aggregator = eqx.field(static=True)
    evaluation: tuple  # (agent scores, t per sample, x, labels, aggregator state, extra)

    def mv(self, vector):
        dtau, dw = vector
        scores, t_batch, x, y, state, extra = self.evaluation
        noise = self.g * dw
        if self.aggregator.noise is not None:
            noise = self.aggregator.noise(scores, t_batch, x, y, state, noise)
        dx = self.b * dtau + noise
        if self.aggregator.tendency is None:
            return SolveState(dx, jax.tree.map(jnp.zeros_like, state))
        tendency = self.aggregator.tendency(scores, t_batch, x, y, state, dx, dtau, **extra)
        return SolveState(dx, tendency)

    def as_matrix(self):
        raise NotImplementedError("StepOperator is matrix-free")

    def transpose(self):
        raise NotImplementedError("StepOperator is matrix-free")

    def in_structure(self):
        return (jax.ShapeDtypeStruct((), self.structure.x.dtype), self.structure.x)

    def out_structure(self):
        return self.structure


class TimeAndNoise(diffrax.AbstractPath):
    """The control (dtau, dW) of ``StepOperator``: the time increment and the Brownian one."""

    brownian: diffrax.AbstractBrownianPath

    @property
    def t0(self):
        return self.brownian.t0

    @property
    def t1(self):
        return self.brownian.t1

    def evaluate(self, t0, t1=None, left=True):
        if t1 is None:
            raise ValueError("TimeAndNoise is an increment path: evaluate(t0, t1)")
        dtau = jnp.asarray(t1 - t0, jnp.float32)
        return dtau, self.brownian.evaluate(t0, t1, left)


for _tag in (lineax.is_symmetric, lineax.is_positive_semidefinite, lineax.is_negative_semidefinite):
    _tag.register(NoiseOperator)(lambda operator: False)
    _tag.register(StepOperator)(lambda operator: False)


def reverse_drift(sde: SDE, method: str, x: Array, t, score: Array) -> Array:
    """dx/dtau = -f(x, t) + c g(t)^2 s of the reverse process in tau = T - t; c = 1 for the
    reverse SDE (noise g dW added separately), 1/2 for the probability-flow ODE."""
    c = 1.0 if method == "sde" else 0.5
    return -sde.drift(x, t) + c * sde.diffusion(t) ** 2 * score


class ReverseDrift(DenoiserField):
    """The reverse process's drift in tau on the solution ``SolveState``: dx/dtau
    (``reverse_drift`` with the federated score) and, for an aggregator with a ``tendency``, its
    state's rate of change along dx; and the federated denoiser E[x_0 | x_t] (Tweedie's formula on
    the aggregated score)."""

    score: FederatedScore = eqx.field(static=True)
    sde: SDE = eqx.field(static=True)
    method: str = eqx.field(static=True)

    def __call__(self, tau, state: SolveState, args) -> SolveState:
        aggregator = self.score.aggregator
        t = self.sde.T - tau
        ev = self.score(*args, state.x, t, state.aggregator)
        b = reverse_drift(self.sde, self.method, state.x, t, ev.score)
        if aggregator.tendency is None:
            return SolveState(b, jax.tree.map(jnp.zeros_like, ev.state))
        labels = args[1]
        return SolveState(
            b, aggregator.tendency(ev.scores, ev.t, state.x, labels, ev.state, b, 1.0, **ev.extra)
        )

    def marginal(self, tau) -> tuple[Array, Array]:
        return self.sde.marginal(self.sde.T - tau)

    def denoised(self, tau, state: SolveState, args) -> Array:
        t = self.sde.T - tau
        return tweedie_denoise(
            self.sde, state.x, self.score(*args, state.x, t, state.aggregator).score, t
        )


def brownian_paths(spec: SolverSpec, keys: Key, tau1: float, image_shape) -> PerSampleBrownianPath:
    """One Brownian path per sample (``keys``) on [0, tau1]: ``UnsafeBrownianPath`` for constant
    steps (diffrax issue 489: far cheaper than a tree for fixed steps) unless ``spec.brownian``
    is "tree", else a ``VirtualBrownianTree`` resolved to tau1 / (4 max_steps), the same path
    whatever the steps; with space-time Levy area for the stochastic Runge-Kutta solvers, and
    always with "tree" (the tree's increments depend on it), so that every solver and every
    step grid integrates the same path."""
    shape = jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32)
    # The tree's path depends on what it carries: with "tree" every solver gets the same one.
    levy = (
        diffrax.SpaceTimeLevyArea
        if isinstance(spec.solver, diffrax.AbstractSRK) or spec.brownian == "tree"
        else diffrax.BrownianIncrement
    )
    if spec.adaptive or spec.brownian == "tree":
        tol = tau1 / (4.0 * spec.max_steps)
        return PerSampleBrownianPath(
            lambda k: diffrax.VirtualBrownianTree(0.0, tau1, tol, shape, k, levy_area=levy),
            keys,
            0.0,
            tau1,
        )
    return PerSampleBrownianPath(
        lambda k: diffrax.UnsafeBrownianPath(shape, k, levy_area=levy), keys
    )


def _structure(state: SolveState):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)


def reverse_terms(
    score: FederatedScore,
    sde: SDE,
    spec: SolverSpec,
    path_keys: Key,
    image_shape,
):
    """The Diffrax terms of the reverse process in tau, with ``args = (params, labels,
    probe_keys)`` and the solution a ``SolveState``; Brownian paths from ``path_keys``."""
    aggregator: Aggregator = score.aggregator
    tau1 = sde.T - spec.t_end
    drift = ReverseDrift(score, sde, spec.method)

    def diffusion(tau, state: SolveState, args) -> NoiseOperator:
        return NoiseOperator(sde.diffusion(sde.T - tau), _structure(state))

    def step(tau, state: SolveState, args) -> StepOperator:
        t = sde.T - tau
        ev = score(*args, state.x, t, state.aggregator)
        evaluation = (ev.scores, ev.t, state.x, args[1], ev.state, ev.extra)
        b = reverse_drift(sde, "sde", state.x, t, ev.score)
        return StepOperator(b, sde.diffusion(t), _structure(state), aggregator, evaluation)

    if spec.method == "ode":
        return diffrax.ODETerm(drift)
    paths = brownian_paths(spec, path_keys, tau1, image_shape)
    if noise_drives_state(aggregator, spec.method):
        return diffrax.ControlTerm(step, TimeAndNoise(paths))
    return diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, paths))
