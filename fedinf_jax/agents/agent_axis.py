"""The stacked-agent axis as an execution choice.

K agents' parameters are one pytree whose leaves carry a leading ``agents`` axis. A single-agent
function ``fn(params, *args)`` is lifted to all agents by ``over_agents(fn, strategy, in_axes)``;
every strategy computes the same numbers, only speed and compile time differ
(docs/performance.md, "The agent axis"):

* ``vmap``: ``jax.vmap``; one batched program. On XLA:CPU a vmapped convolution over stacked
  weights becomes a grouped convolution.
* ``map``: a ``jax.lax.scan`` over agents (``jax.lax.map``), ``map_unroll`` agents per iteration;
  compiles the body ``map_unroll`` times. With ``map_unroll`` > 1 the agents of one iteration are
  independent programs that XLA:CPU can run side by side on its threads.
* ``unroll``: a Python loop inside the traced function (K copies of the body in one program);
  compile time grows with K.
* ``loop``: a host-side loop: one jitted program, compiled once, is called K times with the
  agent's index; it reads agent i's slice of the stacked arguments, applies the single-agent
  function and writes the result into agent i's slot of the stacked outputs (a donated buffer,
  allocated once per call of the lifted function). The paper's execution model; compiles as fast as
  one agent. A function lifted this way must be called outside ``jit`` to get that behaviour
  (inside a trace it is the same as ``unroll``).

``auto`` resolves per backend and purpose (``resolve_strategy``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from fedinf_jax.core.registry import Registry, check_choice


class Strategy:
    """An agent-axis strategy: how ``over_agents`` runs a single-agent function over K stacked
    agents. ``traced(call, stacked, map_unroll)`` runs it inside a trace, ``call(agent_args)``
    being one agent's function of its slice of the stacked arguments. A host strategy
    (``host = True``) instead dispatches compiled programs from Python when the lifted function
    is called eagerly (``programs``, ``run_eagerly``), so it must not be wrapped in ``jit``."""

    host = False

    def traced(self, call: Callable, stacked: tuple, map_unroll: int):
        raise NotImplementedError


STRATEGIES: Registry[Strategy] = Registry("agent-axis strategy")
PURPOSES = ("train", "score")


class VMap(Strategy):
    def traced(self, call, stacked, map_unroll):
        del map_unroll
        return jax.vmap(call)(stacked)


class Map(Strategy):
    def traced(self, call, stacked, map_unroll):
        return jax.lax.scan(lambda _, a: (None, call(a)), None, stacked, unroll=map_unroll)[1]


class Unroll(Strategy):
    def traced(self, call, stacked, map_unroll):
        del map_unroll
        return stack_agents([call(agent(stacked, i)) for i in range(num_agents_of(stacked))])


class Loop(Unroll):
    """Called eagerly, one compiled program per (function, ``in_axes`` layout) called K times;
    inside a trace there is no host, and it unrolls (``Unroll``)."""

    host = True

    @staticmethod
    def programs(fn: Callable, axes: tuple) -> tuple[Callable, Callable]:
        """The two jitted programs of ``fn`` for one ``in_axes`` layout: one allocates the
        stacked outputs, the other writes agent i's result into its slot (donated)."""

        def apply(i, args):
            return fn(*_splice(args, axes, agent(_stacked(args, axes), i)))

        def allocate(args):
            k = num_agents_of(_stacked(args, axes))
            shapes = jax.eval_shape(apply, 0, args)
            return jax.tree.map(lambda s: jnp.zeros((k, *s.shape), s.dtype), shapes)

        def into_slot(i, args, out):
            return jax.tree.map(
                lambda o, r: jax.lax.dynamic_update_index_in_dim(o, r, i, 0), out, apply(i, args)
            )

        return jax.jit(allocate), jax.jit(into_slot, donate_argnums=2)

    @staticmethod
    def run_eagerly(programs: tuple[Callable, Callable], args: tuple, num_agents: int):
        allocate, into_slot = programs
        out = allocate(args)
        # into_slot's output is committed to a device when any input is: the slots start
        # committed like the inputs, so that every call has one signature (one compile).
        committed = next(
            (
                leaf
                for leaf in jax.tree.leaves(args)
                if isinstance(leaf, jax.Array) and leaf.committed
            ),
            None,
        )
        if committed is not None:
            out = jax.device_put(out, committed.sharding)
        for i in range(num_agents):
            out = into_slot(i, args, out)
        return out


for _name, _strategy in (("vmap", VMap), ("map", Map), ("unroll", Unroll), ("loop", Loop)):
    STRATEGIES.register(_name, _strategy())

# Defaults per (backend, purpose), chosen by measurement on XLA:CPU (docs/performance.md);
# accelerators batch the agents.
_AUTO = {
    ("cpu", "train"): "loop",
    ("cpu", "score"): "map",
}


def resolve_strategy(name: str, purpose: str, backend: str | None = None) -> str:
    """Turns a configured strategy name (or ``auto``) into one of ``STRATEGIES``.

    Raises:
      ValueError: an unknown strategy or purpose (the message lists the valid ones).
    """
    check_choice("purpose", purpose, PURPOSES)
    if name == "auto":
        backend = backend or jax.default_backend()
        return _AUTO.get((backend, purpose), "vmap")
    check_choice("agent-axis strategy", name, ("auto", *STRATEGIES))
    return name


def num_agents_of(tree) -> int:
    """The size of the leading ``agents`` axis of a stacked pytree."""
    return jax.tree.leaves(tree)[0].shape[0]


def over_agents(
    fn: Callable,
    strategy: str,
    in_axes: int | Sequence[int | None] | None = 0,
    map_unroll: int = 1,
):
    """Lifts ``fn(*args)`` to stacked agents, like ``jax.vmap(fn, in_axes)``.

    Args:
      fn: a single-agent function; its outputs may be any pytree of arrays.
      strategy: one of ``STRATEGIES``.
      in_axes: per positional argument, 0 (stacked on the leading ``agents`` axis) or None
        (shared by all agents); an int or None applies to all arguments.
      map_unroll: agents per iteration of ``map``'s loop (``jax.lax.scan``'s ``unroll``).

    Returns:
      A function of the same arguments whose outputs gain a leading ``agents`` axis.
    """
    chosen = STRATEGIES.get(strategy)
    if map_unroll < 1:
        raise ValueError(f"map_unroll must be >= 1, got {map_unroll}")
    # A host strategy's programs, compiled once per ``in_axes`` layout.
    programs = functools.cache(lambda axes: chosen.programs(fn, axes))

    def lifted(*args):
        axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
        if len(axes) != len(args):
            raise ValueError(f"in_axes has {len(axes)} entries for {len(args)} arguments")
        if any(a not in (0, None) for a in axes):
            raise ValueError(f"in_axes entries must be 0 or None, got {axes}")
        stacked = _stacked(args, axes)
        if not stacked:
            raise ValueError("over_agents needs at least one argument stacked on axis 0")
        k = num_agents_of(stacked)
        traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(stacked))
        if chosen.host and not traced:
            return chosen.run_eagerly(programs(tuple(axes)), args, k)
        return chosen.traced(
            lambda agent_args: fn(*_splice(args, axes, agent_args)), stacked, map_unroll
        )

    return lifted


def _stacked(args, axes) -> tuple:
    """The arguments stacked on the agent axis (``in_axes`` 0), in order."""
    return tuple(a for a, ax in zip(args, axes, strict=True) if ax == 0)


def _splice(args, axes, agent_args) -> list:
    """``args`` with the stacked ones replaced, in order, by one agent's ``agent_args``."""
    it = iter(agent_args)
    return [next(it) if ax == 0 else a for a, ax in zip(args, axes, strict=True)]


def maybe_jit(lifted: Callable, strategy: str, **jit_kwargs) -> Callable:
    """``jax.jit(lifted, **jit_kwargs)``, except for host strategies, which dispatch per agent."""
    return lifted if STRATEGIES.get(strategy).host else jax.jit(lifted, **jit_kwargs)


def stack_agents(trees: Sequence) -> object:
    """Stacks K single-agent pytrees into one with a leading ``agents`` axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def agent(tree, i: int):
    """Agent ``i``'s slice of a stacked pytree."""
    return jax.tree.map(lambda leaf: leaf[i], tree)
