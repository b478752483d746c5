"""Sparse dispatch: evaluate only the (agent, sample) pairs an aggregator can weight.

A member whose non-zero weights are known before any score is computed declares them
(``Aggregator.dispatch``): ``route`` (each sample's drawn agent, fixed for the solve) and
``label_prior`` with ``top_k`` (each class's k agents). The sampler then asks agent i only for
the samples that name it, instead of every agent for every sample and a weight of zero for most.

``grouped`` does it in one traced program with static shapes. The P = m x B pairs (m agents per
sample, B samples) are sorted by agent and laid out in tiles of ``tile`` slots, each tile
holding one agent's pairs (an agent's group takes as many tiles as it needs; its last tile is
padded). Since sum_i ceil(n_i / tile) <= (P + K (tile - 1)) / tile for any group sizes n_i, that
many tiles hold every assignment: a group larger than the tile (every sample naming one agent)
takes more tiles, and nothing is ever dropped. The tiles are evaluated in order, each by its
agent's parameters on its samples; a tile past the last one in use is skipped (``lax.cond``).
The scores are scattered back to the dense (agents, batch, ...) layout with zeros for the pairs
not asked, which the member weights by zero, so ``aggregate`` is unchanged.

The layout (measured on the 2-core CPU, docs/performance.md "Sparse dispatch"): tiles of half
the mean group, ceil(P / 2K), evaluated two per step of the loop. Two independent tiles per step
run side by side on the CPU's threads, as the dense path's unrolled agents do (one small tile at
a time leaves a core idle); half tiles waste less on unequal groups (``route``'s draws give
groups of 7-14 for a mean of 10: about 125 slots for 100 pairs against 150 with whole-mean
tiles). With balanced groups (each digit's owner under ``label_prior:top_k=1`` on the
heterogeneous split) every agent fills its two tiles, and the solve costs P network evaluations
instead of K x B.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedinf_jax.agents.agent_axis import num_agents_of
from fedinf_jax.core.types import AgentParams, Array


def tile_size(num_pairs: int, num_groups: int) -> int:
    """Slots per tile: the mean of ``num_groups`` groups, ceil(P / groups), at least 1."""
    return max(1, -(-num_pairs // num_groups))


def num_tiles(num_pairs: int, num_agents: int, tile: int) -> int:
    """Tiles enough for any assignment of ``num_pairs`` pairs to ``num_agents`` groups."""
    return -(-(num_pairs + num_agents * (tile - 1)) // tile)


def grouped(score_fn: Callable, tiles_per_group: int = 2, side_by_side: int = 2) -> Callable:
    """Lifts a single-agent ``score_fn(params, x, t, y) -> (batch, ...)`` to
    ``(stacked params, x, t, y, agent_index, offset=0) -> (agents, batch, ...)``, evaluating
    agent i only on the samples whose column of ``agent_index`` (m, batch) names it, in tiles
    of 1 / ``tiles_per_group`` of the mean group, ``side_by_side`` tiles per step of the loop
    (the tile count rounded up to a multiple of it).

    ``agent_index`` holds agent numbers; ``offset`` is the number of the params' first agent (a
    device's share of a mesh), so that entries outside [offset, offset + K) are other devices'
    pairs and are not evaluated here, and ``total_agents`` the federation's K when the params
    hold a share of it (the tile is the federation's mean group; default: the params' K).
    Entries not asked come back as zeros.
    """

    def scores(
        params: AgentParams,
        x: Array,
        t: Array,
        y: Array,
        agent_index,
        offset=0,
        total_agents: int | None = None,
    ):
        k = num_agents_of(params)
        m, b = agent_index.shape
        g = side_by_side
        tile = tile_size(m * b, (total_agents or k) * tiles_per_group)
        tiles = -(-num_tiles(m * b, k, tile) // g) * g
        slots = tiles * tile
        lay = _layout(agent_index, offset, k, tile, tiles)

        def one_tile(i):
            members = jax.lax.dynamic_slice(lay.slot_pair, (i * tile,), (tile,))
            s = lay.sample[jnp.maximum(members, 0)]
            own = jax.tree.map(lambda leaf: leaf[jnp.minimum(lay.tile_agent[i], k - 1)], params)
            return score_fn(own, x[s], t[s], y[s])

        def one_step(j):  # g tiles, independent, so that they run side by side
            return jnp.stack([one_tile(j * g + r) for r in range(g)])

        shape = jax.eval_shape(one_step, 0)
        out = jax.lax.map(
            lambda j: jax.lax.cond(
                j * g < lay.used, one_step, lambda _: jnp.zeros(shape.shape, shape.dtype), j
            ),
            jnp.arange(tiles // g),
        ).reshape(slots, *shape.shape[2:])
        slot_of_pair = (
            jnp.zeros((m * b,), jnp.int32).at[lay.order].set(jnp.minimum(lay.slot, slots - 1))
        )
        dense = jnp.zeros((k, b, *shape.shape[2:]), shape.dtype)
        return dense.at[lay.agent, lay.sample].set(out[slot_of_pair], mode="drop")

    return scores


class _Layout(NamedTuple):
    """Where each (agent, sample) pair of an ``agent_index`` is evaluated: the pairs sorted by
    agent, each agent's pairs filling whole tiles of ``tile`` slots, one agent per tile."""

    agent: Array  # (P,) each pair's agent on this device, K for another device's
    sample: Array  # (P,) each pair's sample
    order: Array  # (P,) the pairs sorted by agent (stable)
    slot: Array  # (P,) the slot of each sorted pair; slots (out of range) for another device's
    slot_pair: Array  # (slots,) the pair in each slot, -1 for an empty one
    used: Array  # how many tiles hold a pair (the first ones)
    tile_agent: Array  # (tiles,) each tile's agent


def _layout(agent_index: Array, offset, k: int, tile: int, tiles: int) -> _Layout:
    """``grouped``'s layout of the (m, batch) ``agent_index`` for K = ``k`` local agents
    numbered from ``offset``, in ``tiles`` tiles of ``tile`` slots."""
    m, b = agent_index.shape
    pairs, slots = m * b, tiles * tile
    agent = agent_index.reshape(-1).astype(jnp.int32) - offset  # (P,) local numbers
    sample = jnp.tile(jnp.arange(b), m)
    agent = jnp.where((agent >= 0) & (agent < k), agent, k)  # k: not here
    count = jnp.bincount(agent, length=k + 1)[:k]
    tiles_of = -(-count // tile)
    first_tile = jnp.cumsum(tiles_of) - tiles_of
    first_pair = jnp.cumsum(count) - count
    order = jnp.argsort(agent, stable=True)
    sorted_agent = agent[order]
    here = sorted_agent < k
    a = jnp.minimum(sorted_agent, k - 1)
    slot = jnp.where(here, first_tile[a] * tile + jnp.arange(pairs) - first_pair[a], slots)
    slot_pair = jnp.full((slots,), -1, jnp.int32).at[slot].set(order, mode="drop")
    tile_agent = jnp.searchsorted(jnp.cumsum(tiles_of), jnp.arange(tiles), side="right")
    return _Layout(agent, sample, order, slot, slot_pair, jnp.sum(tiles_of), tile_agent)
