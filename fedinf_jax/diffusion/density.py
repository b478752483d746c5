"""Each agent's log-density along the reverse process, at no extra network cost on the SDE path.

For a forward SDE dx = f dt + g dW the diffused density q_t of an agent solves the Fokker-Planck
equation, so along any path x(tau) run in tau = T - t with noise h dW (h = g for the reverse SDE,
h = 0 for the probability-flow ODE), Ito's formula gives

    d log q(x, t) = <s, dx> + dtau [div f + <f, s> - (g^2 / 2) ||s||^2 + ((h^2 - g^2) / 2) div s]

with s = grad log q the agent's score and dx the step actually taken (whatever score drove it).
On the reverse SDE the Laplacian term cancels: this is SuperDiff's Ito density estimator (Skreta
et al., ICLR 2025, "The Superposition of Diffusion Models"), which needs only the scores
already evaluated. On the ODE the divergence of the score stays; it is estimated with
Hutchinson's estimator v^T (ds/dx) v over Rademacher probes v, from one linearisation of the
agents' scores.

Every agent shares the prior at t = T, so every log q_i starts at log N(x_T; 0, prior_std^2 I) and
the tracked value is the agent's log-density itself, up to the solver's error and the agent's
own error as a score model. Worked forms (D = data dimension): VP,
    d log q = <dx, s> - (beta / 2) dtau (D + <x, s> + ||s||^2);
VE, d log q = <dx, s> - (g^2 / 2) dtau ||s||^2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedinf_jax.core.registry import check_choice
from fedinf_jax.core.types import Array, Key
from fedinf_jax.diffusion.sde import SDE

METHODS = ("sde", "ode")


def _flat(a: Array, lead: int) -> Array:
    return a.reshape((*a.shape[:lead], -1))


def log_density_rate(
    sde: SDE, method: str, scores: Array, t: Array, x: Array, divergence: Array | None = None
) -> Array:
    """The dtau coefficient of d log q_i, shape (agents, batch): everything but <s_i, dx>.

    Args:
      sde: the forward SDE.
      method: "sde" (the path has noise g dW) or "ode" (no noise; needs ``divergence``).
      scores: (agents, batch, ...) each agent's score at (x, t).
      t: (batch,) diffusion times.
      x: (batch, ...) the current point.
      divergence: (agents, batch) div_x s_i (an estimate), for the ODE.

    Raises:
      ValueError: an unknown method, or the ODE without a divergence.
    """
    check_choice("sampler method", method, METHODS)
    s, f = _flat(scores, 2), _flat(sde.drift(x, t), 1)
    g2 = sde.diffusion(t) ** 2
    rate = (
        sde.drift_divergence(x, t) + jnp.einsum("kbd,bd->kb", s, f) - 0.5 * g2 * jnp.sum(s**2, -1)
    )
    if method == "ode":
        if divergence is None:
            raise ValueError("the probability-flow ODE needs the scores' divergence")
        rate = rate - 0.5 * g2 * divergence
    return rate


def log_density_increment(
    sde: SDE,
    method: str,
    scores: Array,
    t: Array,
    x: Array,
    dx: Array,
    dtau,
    divergence: Array | None = None,
) -> Array:
    """d log q_i = <s_i, dx> + dtau * ``log_density_rate`` (agents, batch); linear in (dx, dtau),
    so it serves both as a rate (dx = drift, dtau = 1) and for the noise part (dx = g dW,
    dtau = 0)."""
    inner = jnp.einsum("kbd,bd->kb", _flat(scores, 2), _flat(dx, 1))
    return inner + dtau * log_density_rate(sde, method, scores, t, x, divergence)


def rademacher_probes(keys: Key, num_probes: int, shape: tuple[int, ...]) -> Array:
    """(batch, probes, *shape) entries +-1, each sample's from its own key."""
    draw = lambda k: jax.random.rademacher(k, (num_probes, *shape), jnp.float32)  # noqa: E731
    return jax.vmap(draw)(keys)


def scores_and_divergence(score_fn, x: Array, probes: Array) -> tuple[Array, Array]:
    """The agents' scores at x and Hutchinson estimates of their divergences.

    Args:
      score_fn: ``x -> (agents, batch, ...)`` scores, each sample's depending on its own x only.
      x: (batch, ...).
      probes: (batch, probes, ...) Rademacher vectors.

    Returns:
      scores (agents, batch, ...) and div_x s_i ~ mean_p v_p^T (ds_i/dx) v_p, (agents, batch).
      One forward linearisation, then one Jacobian-vector product per probe.
    """
    scores, jvp = jax.linearize(score_fn, x)
    v = jnp.moveaxis(probes, 1, 0)  # (probes, batch, ...)
    jv = jax.lax.map(jvp, v)  # (probes, agents, batch, ...)
    quad = jnp.einsum("pkbd,pbd->kb", _flat(jv, 3), _flat(v, 2))
    return scores, quad / probes.shape[1]
