"""The stacked-agent axis as an execution choice.

K agents' parameters are one pytree whose leaves carry a leading ``agents`` axis. A single-agent
function ``fn(params, *args)`` is lifted to all agents by ``over_agents(fn, strategy, in_axes)``;
every strategy computes the same numbers, only speed and compile time differ (measured in
``benchmarks/train_throughput.py`` and the README):

* ``vmap``: ``jax.vmap``; one batched program. Best on GPU/TPU. On XLA:CPU a vmapped convolution
  over stacked weights becomes a grouped convolution, about 5x slower than a loop.
* ``map``: ``jax.lax.map`` (a while loop over agents); compiles the body once. As fast as a loop for
  forward passes on CPU, but gradients through convolutions inside it are pathologically slow
  there.
* ``unroll``: a Python loop inside the traced function (K copies of the body in one program); about
  a loop's speed on CPU, compile time grows with K.

``auto`` resolves per backend and purpose (``resolve_strategy``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

STRATEGIES = ("vmap", "map", "unroll")
PURPOSES = ("train", "score")

# Defaults per (backend, purpose): measured on XLA:CPU (README, "Agent-axis strategies");
# accelerators batch the agents.
_AUTO = {
    ("cpu", "train"): "unroll",
    ("cpu", "score"): "map",
}


def resolve_strategy(name: str, purpose: str, backend: str | None = None) -> str:
    """Turns a configured strategy name (or ``auto``) into one of ``STRATEGIES``.

    Raises:
      ValueError: an unknown strategy or purpose (the message lists the valid ones).
    """
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}; valid: {list(PURPOSES)}")
    if name == "auto":
        backend = backend or jax.default_backend()
        return _AUTO.get((backend, purpose), "vmap")
    if name not in STRATEGIES:
        raise ValueError(f"unknown agent-axis strategy {name!r}; valid: {['auto', *STRATEGIES]}")
    return name


def num_agents_of(tree) -> int:
    """The size of the leading ``agents`` axis of a stacked pytree."""
    return jax.tree.leaves(tree)[0].shape[0]


def over_agents(fn: Callable, strategy: str, in_axes: int | Sequence[int | None] | None = 0):
    """Lifts ``fn(*args)`` to stacked agents, like ``jax.vmap(fn, in_axes)``.

    Args:
      fn: a single-agent function; its outputs may be any pytree of arrays.
      strategy: one of ``STRATEGIES``.
      in_axes: per positional argument, 0 (stacked on the leading ``agents`` axis) or None
        (shared by all agents); an int or None applies to all arguments.

    Returns:
      A function of the same arguments whose outputs gain a leading ``agents`` axis.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown agent-axis strategy {strategy!r}; valid: {list(STRATEGIES)}")
    if strategy == "vmap":
        return jax.vmap(fn, in_axes=in_axes)

    def lifted(*args):
        axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
        if len(axes) != len(args):
            raise ValueError(f"in_axes has {len(axes)} entries for {len(args)} arguments")
        if any(a not in (0, None) for a in axes):
            raise ValueError(f"in_axes entries must be 0 or None, got {axes}")
        stacked = [a for a, ax in zip(args, axes, strict=True) if ax == 0]
        if not stacked:
            raise ValueError("over_agents needs at least one argument stacked on axis 0")

        def call(agent_args):
            it = iter(agent_args)
            full = [next(it) if ax == 0 else a for a, ax in zip(args, axes, strict=True)]
            return fn(*full)

        if strategy == "map":
            return jax.lax.map(call, tuple(stacked))
        k = num_agents_of(stacked)
        return stack_agents([call(agent(tuple(stacked), i)) for i in range(k)])

    return lifted


def stack_agents(trees: Sequence) -> object:
    """Stacks K single-agent pytrees into one with a leading ``agents`` axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def agent(tree, i: int):
    """Agent ``i``'s slice of a stacked pytree."""
    return jax.tree.map(lambda leaf: leaf[i], tree)
