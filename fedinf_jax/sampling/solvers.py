"""How the reverse process is integrated: Diffrax solvers by name, where constant steps lie, and
the sampler's settings resolved and checked (``SolverSpec``).

The reverse process runs in tau = T - t (``fedinf_jax.sampling.federated_sampler``), so solver times
are tau: 0 at t = T (noise), T - t_end at the end of the solve.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp
import lineax
import numpy as np
import optimistix

from fedinf_jax.core.registry import Registry, check_choice
from fedinf_jax.core.types import Array
from fedinf_jax.diffusion import density
from fedinf_jax.diffusion.sde import SDE
from fedinf_jax.sampling.aggregators import Aggregator
from fedinf_jax.sampling.exponential import DPMSolverPP

METHODS = density.METHODS
ODE_SOLVERS: Registry[Callable[[], diffrax.AbstractSolver]] = Registry("ode solver").register_all(
    {
        "euler": diffrax.Euler,
        "heun": diffrax.Heun,
        "midpoint": diffrax.Midpoint,
        "ralston": diffrax.Ralston,
        "bosh3": diffrax.Bosh3,
        "tsit5": diffrax.Tsit5,
        "dopri5": diffrax.Dopri5,
        "dopri8": diffrax.Dopri8,
    }
)


@dataclasses.dataclass(frozen=True)
class RootFinder:
    """The implicit solvers' stage equations, solved by Newton's method whose linear systems
    GMRES solves matrix-free (Jacobian-vector products of the drift only: the Jacobian over the
    batched state would be (batch x 784)^2 numbers, Diffrax's default chord method factorises
    it). Newton stops when a step changes the state by less than ``atol + rtol |x|`` (max norm),
    or after ``max_steps`` iterations, when the step fails; GMRES solves each system to the same
    tolerances in at most ``gmres_max_steps`` iterations."""

    rtol: float = 1e-5
    atol: float = 1e-5
    max_steps: int = 10
    gmres_max_steps: int = 50

    def check(self) -> None:
        if not (
            self.rtol > 0 and self.atol > 0 and self.max_steps >= 1 and self.gmres_max_steps >= 1
        ):
            raise ValueError(
                "sampler.root_finder needs rtol > 0, atol > 0, max_steps >= 1 and "
                f"gmres_max_steps >= 1; got {self.rtol}, {self.atol}, {self.max_steps}, "
                f"{self.gmres_max_steps}"
            )

    def apply(self, solver: diffrax.AbstractSolver) -> diffrax.AbstractSolver:
        """``solver`` with this root finder if it is implicit, else ``solver``."""
        if not isinstance(solver, diffrax.AbstractImplicitSolver):
            return solver
        gmres = lineax.GMRES(rtol=self.rtol, atol=self.atol, max_steps=self.gmres_max_steps)
        newton = optimistix.Newton(rtol=self.rtol, atol=self.atol, linear_solver=gmres)
        return dataclasses.replace(solver, root_finder=newton, root_find_max_steps=self.max_steps)


# The implicit solvers, for the stiff end of the reverse process (the score grows like 1/std as
# t -> 0): ImplicitEuler (order 1) and Kvaerno3 (ESDIRK, order 3), each with an error estimate,
# their stage equations solved by ``RootFinder``. Not registered: Kvaerno4 and Kvaerno5, whose
# stages reach past a step's end (abscissae c = 1.15 and 1.23): on the last step below t_end,
# and below t = 0, where the VP marginals are undefined (std^2 < 0), once the step exceeds
# about 4 t_end. Freezing the drift there kept them finite but cut their convergence order below
# Kvaerno3's (measured in docs/usage.md).
ODE_SOLVERS.register_all({"implicit_euler": diffrax.ImplicitEuler, "kvaerno3": diffrax.Kvaerno3})
# The reverse SDE's noise is additive (it does not depend on x), so the Ito and Stratonovich
# readings agree and every solver below converges to the same process; only Euler-Maruyama is an
# Ito solver, which the aggregators whose state the noise drives require (``check_solver_for``).
# Not registered: ItoMilstein (its Levy-area term materialises the diffusion's Jacobian over the
# whole batched state: hundreds of GB for a batch of images).
SDE_SOLVERS: Registry[Callable[[], diffrax.AbstractSolver]] = Registry("sde solver").register_all(
    {
        "euler": diffrax.Euler,  # Euler-Maruyama
        "heun": diffrax.Heun,
        "euler_heun": diffrax.EulerHeun,
        "milstein": diffrax.StratonovichMilstein,  # = Heun-like for additive noise
        "reversible_heun": diffrax.ReversibleHeun,
        "sea": diffrax.SEA,  # the stochastic Runge-Kutta solvers for additive noise
        "shark": diffrax.ShARK,
        "sra1": diffrax.SRA1,
        "spark": diffrax.SPaRK,
        "general_shark": diffrax.GeneralShARK,
        "slow_rk": diffrax.SlowRK,
    }
)
# The exponential integrators (``fedinf_jax.sampling.exponential``), on either process: DDIM on
# the ODE and DDPM's ancestral step on the SDE (dpmpp_1), DPM-Solver++(2M) and
# SDE-DPM-Solver++(2M) (dpmpp_2m). They integrate the linear part of the reverse process exactly
# and step with the denoiser, so a coarse grid adds no more noise than the marginals hold.
_EXPONENTIAL = {
    "dpmpp_1": DPMSolverPP,
    "dpmpp_2m": lambda: DPMSolverPP(second_order=True),
}
ODE_SOLVERS.register_all(_EXPONENTIAL)
SDE_SOLVERS.register_all(_EXPONENTIAL)
SOLVERS = {"ode": ODE_SOLVERS, "sde": SDE_SOLVERS}


def solver_nature(method: str, solver: diffrax.AbstractSolver) -> dict[str, str | bool]:
    """What a study records of a solver: the stochastic calculus it integrates ("ito" or
    "stratonovich"; "" for the ODE) and whether it has an error estimate (so that it can take
    adaptive steps)."""
    calculus = ""
    if method == "sde":
        calculus = "ito" if isinstance(solver, diffrax.AbstractItoSolver) else "stratonovich"
    return {
        "calculus": calculus,
        "error_estimate": isinstance(solver, diffrax.AbstractAdaptiveSolver),
    }


# The SDE's Brownian paths: "auto", Diffrax's UnsafeBrownianPath for constant steps (cheapest;
# its increments are drawn per step, so another step grid walks another path) and a
# VirtualBrownianTree for adaptive ones; "tree", a VirtualBrownianTree always, so every step grid
# (and every solver) integrates the same path of each sample: what a convergence study compares.
BROWNIAN = ("auto", "tree")

# Where constant steps are placed: (sde, num_steps, t_end) -> the num_steps + 1 solver times
# tau = T - t from 0 (t = T) to T - t_end (``tau_grid``).
SCHEDULES: Registry[Callable[[SDE, int, float], Array]] = Registry("step schedule")
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5


@SCHEDULES.register("uniform")
def uniform_steps(sde: SDE, num_steps: int, t_end: float) -> Array:
    """Equal steps in t."""
    return jnp.linspace(0.0, sde.T - t_end, num_steps + 1)


def _noise_level_steps(sigmas: Callable[[Array, Array, Array], Array]):
    """A schedule placing steps at noise levels sigma = ``sigmas(u, sigma(T), sigma(t_end))``
    for u uniform on [0, 1], mapped back to t."""

    def grid(sde: SDE, num_steps: int, t_end: float) -> Array:
        s_max, s_min = sde.noise_level(jnp.float32(sde.T)), sde.noise_level(jnp.float32(t_end))
        sigma = sigmas(jnp.linspace(0.0, 1.0, num_steps + 1), s_max, s_min)
        tau = sde.T - sde.time_at_noise_level(sigma, t_min=t_end)
        return tau.at[0].set(0.0).at[-1].set(sde.T - t_end)  # the ends exactly

    return grid


def _karras_sigmas(u: Array, s_max: Array, s_min: Array) -> Array:
    inv = 1.0 / KARRAS_RHO
    return (s_max**inv + u * (s_min**inv - s_max**inv)) ** KARRAS_RHO


def _log_uniform_sigmas(u: Array, s_max: Array, s_min: Array) -> Array:
    return jnp.exp(jnp.log(s_max) + u * (jnp.log(s_min) - jnp.log(s_max)))


SCHEDULES.register("karras", _noise_level_steps(_karras_sigmas))
SCHEDULES.register("log_snr", _noise_level_steps(_log_uniform_sigmas))


def tau_grid(sde: SDE, schedule: str, num_steps: int, t_end: float) -> Array:
    """The ``num_steps + 1`` solver times tau = T - t, from 0 (t = T) to T - ``t_end``, that
    constant steps visit:

    * ``uniform``: equal steps in t;
    * ``karras``: Karras et al.'s sigma schedule, sigma_i = (sigma_max^(1/rho) + i / N
      (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho with rho = 7 between the noise levels
      sigma = std / alpha at T and at t_end, mapped back to t (steps shrink towards the data);
    * ``log_snr``: equal steps in log sigma (in the log signal-to-noise ratio).

    Raises:
      ValueError: an unknown schedule (the valid ones listed).
    """
    return SCHEDULES.get(schedule)(sde, num_steps, t_end)


def make_solver(
    method: str, name: str, root_finder: RootFinder | None = None
) -> diffrax.AbstractSolver:
    """The Diffrax solver called ``name`` for ``method`` ("sde" or "ode"); an implicit one
    solves its stages with ``root_finder`` (default ``RootFinder()``: Newton with matrix-free
    GMRES, in place of Diffrax's default chord method, which factorises the batched Jacobian).

    Raises:
      ValueError: an unknown method or solver (the message lists the valid ones).
    """
    check_choice("sampler method", method, METHODS)
    return (root_finder or RootFinder()).apply(SOLVERS[method].get(name)())


@dataclasses.dataclass(frozen=True)
class SolverSpec:
    """How to integrate: a config's ``sampler`` section resolved and checked (see
    ``configs/base.py`` for the fields). ``solver`` may be any Diffrax solver object."""

    method: str
    solver: diffrax.AbstractSolver
    num_steps: int = 100
    adaptive: bool = False
    rtol: float = 1e-3
    atol: float = 1e-3
    max_steps: int = 4096
    t_end: float = 1e-3
    schedule: str = "uniform"  # constant steps: where they lie (``tau_grid``)
    brownian: str = "auto"  # the SDE's Brownian paths (``BROWNIAN``)
    denoise: bool = True
    save_trajectory: int = 0
    save_steps: bool = False  # keep each accepted step's time (``Samples.step_t``)
    progress: bool = False
    # What ``solver`` was built with if implicit, and what a study builds its implicit cells with.
    root_finder: RootFinder = RootFinder()

    @classmethod
    def from_config(cls, sampler_config, sde: SDE) -> SolverSpec:
        c = sampler_config
        root_finder = RootFinder(**c.get("root_finder", {}))
        spec = cls(
            method=c.method,
            solver=make_solver(c.method, c.solver, root_finder),
            num_steps=c.num_steps,
            adaptive=c.adaptive,
            rtol=c.rtol,
            atol=c.atol,
            max_steps=c.max_steps,
            t_end=c.t_end,
            # Adaptive steps are placed by the controller: the constant steps' grid is unused.
            schedule="uniform" if c.adaptive else c.get("schedule", "uniform"),
            brownian=c.get("brownian", "auto"),
            denoise=c.denoise,
            save_trajectory=c.save_trajectory,
            progress=c.progress,
            root_finder=root_finder,
        )
        spec.check(sde)
        return spec

    def check(self, sde: SDE) -> None:
        """Raises ValueError naming the first invalid setting and what is valid."""
        check_choice("sampler method", self.method, METHODS)
        self.root_finder.check()
        if not 0.0 < self.t_end < sde.T:
            raise ValueError(f"sampler.t_end must lie in (0, T = {sde.T}), got {self.t_end}")
        if self.num_steps < 1:
            raise ValueError(f"sampler.num_steps must be >= 1, got {self.num_steps}")
        SCHEDULES.check(self.schedule)
        check_choice("sampler.brownian", self.brownian, BROWNIAN)
        if self.max_steps < (1 if self.adaptive else self.num_steps):
            raise ValueError(
                f"sampler.max_steps must be >= 1 and, for constant steps, >= sampler.num_steps "
                f"(every step grid is padded to max_steps); got max_steps={self.max_steps}, "
                f"num_steps={self.num_steps}"
            )
        if self.adaptive and self.schedule != "uniform":
            raise ValueError(
                f"sampler.schedule={self.schedule!r} places constant steps; adaptive steps are "
                "placed by the controller: use sampler.adaptive=False or schedule='uniform'"
            )
        if self.adaptive:
            if not isinstance(self.solver, diffrax.AbstractAdaptiveSolver):
                adaptive = sorted(
                    name
                    for name, make in SOLVERS[self.method].items()
                    if solver_nature(self.method, make())["error_estimate"]
                )
                raise ValueError(
                    f"solver {type(self.solver).__name__} has no error estimate, so it cannot take "
                    "adaptive steps; use constant steps (sampler.adaptive=False) or an adaptive "
                    f"{self.method} solver: {adaptive}"
                )
            if not (self.rtol > 0 and self.atol > 0):
                raise ValueError(
                    f"adaptive steps need rtol > 0 and atol > 0; got {self.rtol}, {self.atol}"
                )
        if self.save_trajectory == 1 or self.save_trajectory < 0:
            raise ValueError(
                f"sampler.save_trajectory must be 0 (off) or >= 2 times, got {self.save_trajectory}"
            )


def noise_drives_state(aggregator: Aggregator, method: str) -> bool:
    """Whether the aggregator's state or noise depends on the Brownian increments (then the
    SDE is solved as one control term, and only Ito solvers are valid)."""
    return method == "sde" and (aggregator.tendency is not None or aggregator.noise is not None)


def check_solver_for(aggregator: Aggregator, spec: SolverSpec) -> None:
    """Refuses a Stratonovich solver where the aggregator's state is an Ito integral, and an
    exponential integrator (which steps the images alone) for an aggregator whose state moves
    with the path.

    Raises:
      ValueError: naming the solver and the valid ones.
    """
    if isinstance(spec.solver, DPMSolverPP) and (
        aggregator.tendency is not None or aggregator.noise is not None
    ):
        others = [n for n, m in SOLVERS[spec.method].items() if not isinstance(m(), DPMSolverPP)]
        raise ValueError(
            "the DPM-Solver++ solvers (dpmpp_1, dpmpp_2m) step the images with the denoiser "
            "alone, and this aggregator's state (its tracked densities) moves with the path; "
            f"use a {spec.method} solver that steps it too: {others}"
        )
    if noise_drives_state(aggregator, spec.method) and not isinstance(
        spec.solver, diffrax.AbstractItoSolver
    ):
        ito = [
            n
            for n, m in SDE_SOLVERS.items()
            if solver_nature("sde", m())["calculus"] == "ito" and not isinstance(m(), DPMSolverPP)
        ]
        raise ValueError(
            "this aggregator's state is driven by the SDE's noise (an Ito integral), which "
            f"{type(spec.solver).__name__} (a Stratonovich solver) would integrate with a "
            f"bias; use an Ito solver: {ito}"
        )


class GridStepTo(diffrax.AbstractStepSizeController):
    """Steps to the times ``ts`` (as ``diffrax.StepTo``) on a grid that runs on past the solve's
    end: ``ts`` starts at t0 and holds t1; the times after t1 are never reached (Diffrax clips
    the step to t1 and the solve ends there). ``step_inputs`` pads every constant-step grid so to
    ``max_steps + 1`` times, and the sampler takes it as an input of the compiled solve rather
    than a constant in it: one compiled solve serves every number of steps up to ``max_steps``
    and every schedule. (Not a ``StepTo`` subclass: Diffrax ends a ``StepTo`` solve after
    ``len(ts) - 1`` steps.) The grid is checked where it is made (``step_inputs``), on the host:
    a check inside the solve would be a host callback, which keeps the program out of the
    persistent compilation cache."""

    ts: Array

    def wrap(self, direction):
        return type(self)(self.ts * direction)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        del terms, t0, t1, y0, args, func, error_order
        if dt0 is not None:
            raise ValueError("GridStepTo places the steps itself: dt0 must be None")
        return self.ts[1], 2

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, state):
        del t0, y0, y1_candidate, args, y_error, error_order
        return True, t1, self.ts[state], False, state + 1, diffrax.RESULTS.successful


# The settings a solve's steps depend on: ``step_inputs`` carries them into the compiled solve.
BUDGET_FIELDS = ("num_steps", "schedule", "rtol", "atol")


def step_inputs(spec: SolverSpec, sde: SDE) -> Array | tuple[Array, Array, Array]:
    """What the solve's steps depend on (``BUDGET_FIELDS``), as inputs of the compiled solve
    rather than constants in it, so that one compilation serves every budget: for constant
    steps, their solver times (``tau_grid``) padded past T - t_end to ``max_steps + 1`` times
    for ``GridStepTo``; for adaptive steps, (rtol, atol, dt0 = (T - t_end) / num_steps)."""
    if spec.adaptive:
        dt0 = (sde.T - spec.t_end) / spec.num_steps
        return tuple(jnp.asarray(v, jnp.float32) for v in (spec.rtol, spec.atol, dt0))
    ts = _padded_grid(sde, spec.schedule, spec.num_steps, spec.t_end, spec.max_steps)
    host = np.asarray(ts)  # checked in numpy: no program to compile for it at start-up
    if host[0] != 0.0 or np.any(np.diff(host) <= 0):
        raise ValueError(
            f"the {spec.schedule} grid of {spec.num_steps} steps must increase from tau = 0"
        )
    return ts


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _padded_grid(sde: SDE, schedule: str, num_steps: int, t_end: float, max_steps: int) -> Array:
    """``tau_grid`` padded to ``max_steps + 1`` times, as one program per budget (its dozen
    operations one by one would each compile a program of their own)."""
    grid = tau_grid(sde, schedule, num_steps, t_end)
    beyond = grid[-1] + jnp.arange(1, max_steps - num_steps + 1, dtype=grid.dtype)
    return jnp.concatenate([grid, beyond])


def stepping(
    spec: SolverSpec, sde: SDE, inputs=None
) -> tuple[diffrax.AbstractStepSizeController, Array | None, int]:
    """(step-size controller, dt0, max_steps) of a solve from tau = 0 to T - t_end, from
    ``inputs`` (default ``step_inputs(spec, sde)``): a ``PIDController`` on the images' RMS
    error for adaptive steps (the aggregator's state rides along: its divergence estimates are
    noisy by design and would force tiny steps), else ``GridStepTo`` on the schedule's exact
    grid."""
    inputs = step_inputs(spec, sde) if inputs is None else inputs
    if spec.adaptive:
        rtol, atol, dt0 = inputs
        controller = diffrax.PIDController(
            rtol=rtol, atol=atol, norm=lambda err: jnp.sqrt(jnp.mean(err.x**2))
        )
        return controller, dt0, spec.max_steps
    return GridStepTo(ts=inputs), None, spec.max_steps


def save_at(spec: SolverSpec, sde: SDE) -> diffrax.SaveAt:
    """The end of the solve, or ``save_trajectory`` equally spaced times from T to t_end; with
    ``save_steps``, a second ``SubSaveAt`` that keeps the solver time of every accepted step
    (nothing of the state: ``max_steps`` scalars)."""
    if spec.save_trajectory:
        main = diffrax.SubSaveAt(ts=jnp.linspace(0.0, sde.T - spec.t_end, spec.save_trajectory))
    else:
        main = diffrax.SubSaveAt(t1=True)
    if not spec.save_steps:
        return diffrax.SaveAt(subs=main)
    return diffrax.SaveAt(subs=[main, diffrax.SubSaveAt(steps=True, fn=lambda t, y, args: t)])
