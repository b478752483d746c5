"""Agents sharded across devices (and hosts): parameters stay where they live, scores cross.

A ``jax.sharding.Mesh`` with two axes, ``agents`` and ``batch``, lays out the federation: the
stacked agent parameters (and optimizer state and EMA) are split along ``agents``, and the
sampler's batch of images along ``batch``. The agents' network runs under ``jax.shard_map``:
each device evaluates its own agents (through the configured agent-axis strategy, e.g. a
``lax.map``) on its slice of the batch, so parameters never move; the aggregation over agents
that follows is an ordinary jitted reduction over the sharded agent axis, which XLA turns into a
cross-device reduction of scores (an all-reduce of the weighted sum for ``mean``, ``weighted``,
``label_prior``, ``schedule`` and ``superdiff_or``; an all-gather of the scores for the
element-wise ``median`` and ``trimmed_mean`` and for ``superdiff_and``'s K x K system).

Why ``shard_map`` and not automatic partitioning of a vmapped U-Net: with jax 0.10.2 on XLA:CPU,
``jit(vmap(conv3x3 -> concatenate -> conv1x1))`` with the stacked weights sharded over the agent
axis returns wrong numbers (jax 0.10.2 on XLA:CPU; docs/multi_device.md, and
``tests/multidevice_checks.py`` keeps the pattern).
Inside ``shard_map`` each device's program is the single-device one, which is exact.

Padding: when K is not a multiple of the ``agents`` axis (K = 10 over 4 devices), the agent axis
is padded with zero agents to the next multiple (12): all-zero parameters give finite scores and
finite updates, the padded agents' scores are sliced off before aggregation (so they never enter
an aggregate, a loss or a metric), and their updates are discarded with them. Checkpoints hold
the padded axis; ``num_agents`` in the run record says how many are real, and a checkpoint
restores onto any other mesh (Orbax truncates or zero-pads the agent axis).

Multi-process (``jax.distributed``): the mesh spans every process's devices; host values that
every process computes identically (a batch of all agents' images, the sampler's keys) become
global arrays of which each process transfers only its own shards (``put``), and Orbax writes and
reads each process's own shards of a checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedinf_jax.agents import agent_axis

AGENTS, BATCH = "agents", "batch"


@dataclasses.dataclass(frozen=True)
class AgentMesh:
    """K agents on an (``agents``, ``batch``) device mesh; the agent axis padded to a multiple of
    the ``agents`` axis size."""

    mesh: Mesh
    num_agents: int

    @property
    def agent_shards(self) -> int:
        return self.mesh.shape[AGENTS]

    @property
    def batch_shards(self) -> int:
        return self.mesh.shape[BATCH]

    @property
    def padded_agents(self) -> int:
        """K rounded up to a multiple of the ``agents`` axis."""
        return -(-self.num_agents // self.agent_shards) * self.agent_shards

    def sharding(self, *spec) -> NamedSharding:
        """``NamedSharding(mesh, PartitionSpec(*spec))``."""
        return NamedSharding(self.mesh, P(*spec))

    def describe(self) -> str:
        pad = self.padded_agents - self.num_agents
        padding = f", padded with {pad} zero agent(s)" if pad else ""
        return (
            f"mesh agents={self.agent_shards} x batch={self.batch_shards} over "
            f"{self.mesh.devices.size} {self.mesh.devices.flat[0].platform} device(s) in "
            f"{jax.process_count()} process(es): {self.num_agents} agents, "
            f"{self.padded_agents // self.agent_shards} per device{padding}"
        )


def make_mesh(
    mesh_config: ml_collections.ConfigDict,
    num_agents: int,
    devices: Sequence[jax.Device] | None = None,
) -> AgentMesh | None:
    """The config's mesh over ``devices`` (default: every device of every process).

    ``mesh.agents`` x ``mesh.batch`` must equal the number of devices; ``mesh.agents = 0`` means
    all devices not on the batch axis. Returns None on a single device (the unsharded path).

    Raises:
      ValueError: the axis sizes do not multiply to the number of devices, or a size is invalid.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    batch = int(mesh_config.batch)
    if batch < 1 or n % batch:
        raise ValueError(
            f"mesh.batch = {batch} must be >= 1 and divide the number of devices ({n})"
        )
    agent_shards = int(mesh_config.agents) or n // batch
    if agent_shards < 1 or agent_shards * batch != n:
        raise ValueError(
            f"mesh.agents x mesh.batch = {agent_shards} x {batch} must equal the number of "
            f"devices ({n}); mesh.agents = 0 uses all devices not on the batch axis"
        )
    if n == 1:
        return None
    grid = np.asarray(devices, dtype=object).reshape(agent_shards, batch)
    return AgentMesh(Mesh(grid, (AGENTS, BATCH)), num_agents)


def pad_agents(tree, padded: int):
    """Appends zero agents to every stacked leaf's leading axis up to ``padded`` (host or
    traced; scalars such as the step counter are kept)."""

    def pad(leaf):
        if not leaf.ndim:
            return leaf
        extra = padded - leaf.shape[0]
        if extra < 0:
            raise ValueError(f"cannot pad {leaf.shape[0]} agents to {padded}")
        if extra == 0:
            return leaf
        xp = np if isinstance(leaf, np.ndarray) else jnp
        return xp.concatenate([leaf, xp.zeros((extra, *leaf.shape[1:]), leaf.dtype)])

    return jax.tree.map(pad, tree)


def first_agents(tree, num_agents: int):
    """The first ``num_agents`` agents of every stacked leaf (drops the padding; scalars such as
    the step counter are kept)."""
    return jax.tree.map(lambda leaf: leaf[:num_agents] if leaf.ndim else leaf, tree)


def without_padding(lifted: Callable, agent_mesh: AgentMesh) -> Callable:
    """``lifted`` (a function whose output is stacked on the mesh's padded agents) with the
    padding agents dropped from its output."""
    return lambda *args: first_agents(lifted(*args), agent_mesh.num_agents)


def put(tree, sharding: NamedSharding):
    """Host arrays (equal on every process) as global arrays laid out by ``sharding``; each
    process transfers only the shards its devices hold."""

    def one(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)


def put_batch(tree, agent_mesh: AgentMesh):
    """Per-image arrays (labels, typed PRNG keys; equal on every process) split along the mesh's
    ``batch`` axis."""
    sharded = agent_mesh.sharding(BATCH)

    def one(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(leaf)
            return jax.random.wrap_key_data(put(jax.random.key_data(leaf), sharded), impl=impl)
        return put(leaf, sharded)

    return jax.tree.map(one, tree)


def to_host(leaf):
    """A (possibly multi-process) array as a NumPy array on every process; other leaves as they
    are."""
    if not isinstance(leaf, jax.Array):
        return leaf
    if leaf.is_fully_addressable:
        return np.asarray(leaf)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))


def over_sharded_agents(
    fn: Callable,
    agent_mesh: AgentMesh,
    strategy: str,
    in_axes: Sequence[int | None],
    batch_args: Sequence[int] = (),
    map_unroll: int = 1,
) -> Callable:
    """Lifts ``fn(*args)`` to the mesh's padded agents, like ``agent_axis.over_agents``.

    Each device applies ``agent_axis.over_agents(fn, strategy, in_axes, map_unroll)`` to its own
    agents (the arguments with ``in_axes`` 0, split along ``agents``) and, for the arguments
    listed in ``batch_args``, to its slice of their leading (batch) axis; the rest are
    replicated. Outputs are stacked on ``agents`` and, when ``batch_args`` is not empty, split
    along ``batch`` on their second axis. Call it inside ``jit``; its stacked arguments hold
    ``padded_agents``.
    """
    local = agent_axis.over_agents(fn, strategy, tuple(in_axes), map_unroll)
    in_specs = tuple(
        P(AGENTS) if ax == 0 else P(BATCH) if i in batch_args else P()
        for i, ax in enumerate(in_axes)
    )
    out_specs = P(AGENTS, BATCH) if batch_args else P(AGENTS)
    return jax.shard_map(local, mesh=agent_mesh.mesh, in_specs=in_specs, out_specs=out_specs)


def over_sharded_pairs(grouped_fn: Callable, agent_mesh: AgentMesh) -> Callable:
    """Lifts ``dispatch.grouped``'s ``(params, x, t, y, agent_index, offset, total_agents)`` to
    the mesh: ``(params, x, t, y, agent_index) -> (padded agents, batch, ...)``, each device
    evaluating only the pairs that name its own agents, on its slice of the batch (and of
    ``agent_index``'s (m, batch) columns), so that parameters never move and only scores leave a
    device. Call it inside ``jit``; ``params`` hold ``padded_agents``."""
    per_device = agent_mesh.padded_agents // agent_mesh.agent_shards

    def local(params, x, t, y, agent_index):
        offset = jax.lax.axis_index(AGENTS) * per_device
        return grouped_fn(params, x, t, y, agent_index, offset, agent_mesh.num_agents)

    in_specs = (P(AGENTS), P(BATCH), P(BATCH), P(BATCH), P(None, BATCH))
    # check_vma=False: a skipped tile's zeros (``lax.cond``'s other branch) are the same on
    # every device, the evaluated tile's scores vary; the output is device-varying either way.
    return jax.shard_map(
        local,
        mesh=agent_mesh.mesh,
        in_specs=in_specs,
        out_specs=P(AGENTS, BATCH),
        check_vma=False,
    )


def _leaf_sharding(leaf, agent_mesh: AgentMesh) -> NamedSharding:
    """Stacked leaves split along ``agents``; scalars (the step counter) replicated."""
    return agent_mesh.sharding(AGENTS) if len(leaf.shape) else agent_mesh.sharding()


def abstract_on_mesh(abstract, agent_mesh: AgentMesh):
    """An abstract K-agent pytree (``jax.eval_shape``'s) padded to the mesh's agents and laid
    out on it: the target a checkpoint is restored into, each device reading its own agents."""

    def one(leaf):
        shape = (agent_mesh.padded_agents, *leaf.shape[1:]) if len(leaf.shape) else ()
        return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=_leaf_sharding(leaf, agent_mesh))

    return jax.tree.map(one, abstract)


def to_mesh(tree, agent_mesh: AgentMesh):
    """A K-agent pytree (equal on every process) padded and laid out on the mesh."""
    padded = pad_agents(jax.device_get(tree), agent_mesh.padded_agents)
    return jax.tree.map(lambda leaf: put(leaf, _leaf_sharding(leaf, agent_mesh)), padded)
