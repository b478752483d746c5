"""Data partitions: which training examples each agent sees.

Every partition is a pure function ``(labels, num_agents, seed, ...) -> Partition`` of the label
array: the same arguments give the same shards. Shards are disjoint index arrays into the training
set; ``counts[agent, class]`` is the number of examples of ``class`` held by ``agent`` (the
sampler's label prior rho_i(y) = n_{i,y} / n_y is built from it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from fedinf_jax.core.registry import Registry, check_choice
from fedinf_jax.data.digits import NUM_CLASSES, TRAIN_CLASS_COUNTS


class Partition(NamedTuple):
    """Per-agent index arrays into the training set and the count matrix n[agent, class]."""

    indices: tuple[np.ndarray, ...]
    counts: np.ndarray

    @property
    def num_agents(self) -> int:
        return len(self.indices)


PARTITIONS: Registry[Callable[..., Partition]] = Registry(
    "partition", context={"labels": "the training labels"}
)


def _finish(labels: np.ndarray, shards: list[np.ndarray], num_classes: int) -> Partition:
    shards = [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
    counts = np.stack([np.bincount(labels[s], minlength=num_classes) for s in shards])
    return Partition(indices=tuple(shards), counts=counts.astype(np.int64))


def _check(labels: np.ndarray, num_agents: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if num_agents < 1:
        raise ValueError(f"num_agents must be >= 1, got {num_agents}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )
    return labels


def _class_indices(labels: np.ndarray, num_classes: int, rng: np.random.Generator):
    """Shuffled example indices of each class."""
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


@PARTITIONS.register("control")
def control(labels, num_agents: int = 1, seed: int = 0, num_classes: int = NUM_CLASSES):
    """One agent holding the whole training set (the centralized baseline).

    Raises:
      ValueError: ``num_agents`` is not 1.
    """
    labels = _check(labels, num_agents, num_classes)
    if num_agents != 1:
        raise ValueError(
            f"the control partition has exactly one agent, got num_agents={num_agents}"
        )
    return _finish(labels, [np.arange(labels.size)], num_classes)


@PARTITIONS.register("homogeneous")
def homogeneous(labels, num_agents: int, seed: int = 0, num_classes: int = NUM_CLASSES):
    """IID split: every agent gets 1/K of every class.

    Each class's examples are shuffled and cut into K parts whose sizes differ by at most one
    (``np.array_split``); the shards are disjoint and cover the training set.
    """
    labels = _check(labels, num_agents, num_classes)
    rng = np.random.default_rng(seed)
    shards = [[] for _ in range(num_agents)]
    for idx in _class_indices(labels, num_classes, rng):
        for k, part in enumerate(np.array_split(idx, num_agents)):
            shards[k].append(part)
    return _finish(labels, [np.concatenate(s) for s in shards], num_classes)


def heterogeneous_fractions(
    num_agents: int, num_classes: int = NUM_CLASSES, owner_fraction: float = 0.5
) -> np.ndarray:
    """F[agent, class]: agent k's share of its data from each class (rows sum to one).

    Agent k owns class k mod C: ``owner_fraction`` of its data, the rest split equally over the
    other C - 1 classes (paper regime: 0.5 and 0.5 / 9 = 1/18 each).
    """
    rest = (1.0 - owner_fraction) / (num_classes - 1)
    fractions = np.full((num_agents, num_classes), rest)
    fractions[np.arange(num_agents), np.arange(num_agents) % num_classes] = owner_fraction
    return fractions


@PARTITIONS.register("heterogeneous")
def heterogeneous(
    labels,
    num_agents: int,
    seed: int = 0,
    num_classes: int = NUM_CLASSES,
    owner_fraction: float = 0.5,
):
    """The paper's skewed split: 50% from one digit, 50% spread equally over the other nine.

    Agent k owns class c_k = k mod C. With fractions F (``heterogeneous_fractions``: F[k, c_k] = b
    = 1/2 and F[k, c] = a = (1 - b) / (C - 1) = 1/18 otherwise), agent k's shard has size m_k and
    holds floor(m_k F[k, c]) examples of class c, drawn without replacement: the shards are disjoint
    and each agent's class fractions are exactly F up to that rounding (under 1/m_k per class).
    Agents owning the same class get the same size. The sizes are the largest the class counts n_c
    allow: with u_c the total size of class c's owners and M = sum_c u_c, every owned class is used
    up exactly,

        u_c (b - a) + a M = n_c   =>   M = (sum over owned c of n_c) / ((b - a) + a |owned|).

    For K = 10 on MNIST, u_c = (9/4)(n_c - N/18) and M = N: the shards cover the whole training set
    but for at most K rounding leftovers per class. With fewer agents than classes, unowned classes
    are used only at fraction a (the rest of them stays unused), and all sizes shrink if an unowned
    class is too small for that.

    Raises:
      ValueError: a class is missing from ``labels`` or too rare to satisfy the fractions.
    """
    labels = _check(labels, num_agents, num_classes)
    class_counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    missing = np.flatnonzero(class_counts == 0)
    if missing.size:
        raise ValueError(
            f"heterogeneous partition needs every class present; classes {missing.tolist()} have "
            "no examples"
        )
    fractions = heterogeneous_fractions(num_agents, num_classes, owner_fraction)
    owners = np.arange(num_agents) % num_classes
    num_owners = np.bincount(owners, minlength=num_classes)
    owned = num_owners > 0
    a = (1.0 - owner_fraction) / (num_classes - 1)
    # u_c (b - a) + a M = n_c on owned classes with M = sum u_c, b = owner_fraction.
    b_minus_a = owner_fraction - a
    total = class_counts[owned].sum() / (b_minus_a + a * owned.sum()) if b_minus_a > 0 else None
    if total is None:
        raise ValueError(f"owner_fraction must exceed the others' share {a:.4f}")
    owner_total = np.where(owned, (class_counts - a * total) / b_minus_a, 0.0)
    if np.any(owner_total[owned] <= 0):
        rare = np.flatnonzero(owned & (owner_total <= 0)).tolist()
        raise ValueError(f"classes {rare} are too rare for the heterogeneous fractions")
    sizes = owner_total[owners] / num_owners[owners]
    usage = fractions.T @ sizes
    sizes *= min(1.0, float(np.min(class_counts / usage)))

    rng = np.random.default_rng(seed)
    pools = _class_indices(labels, num_classes, rng)
    take = np.floor(sizes[:, None] * fractions + 1e-9).astype(np.int64)
    shards = [[] for _ in range(num_agents)]
    for c in range(num_classes):
        bounds = np.concatenate([[0], np.cumsum(take[:, c])])
        for k in range(num_agents):
            shards[k].append(pools[c][bounds[k] : bounds[k + 1]])
    return _finish(labels, [np.concatenate(s) for s in shards], num_classes)


@PARTITIONS.register("dirichlet")
def dirichlet(
    labels,
    num_agents: int,
    seed: int = 0,
    num_classes: int = NUM_CLASSES,
    alpha: float = 0.5,
    min_partition_size: int = 10,
    self_balancing: bool = False,
    max_tries: int = 100,
):
    """Label skew by a symmetric Dirichlet (Yurochkin et al. 2019; Flower's DirichletPartitioner).

    For each class, proportions p ~ Dir(alpha 1_K) split that class's shuffled examples across
    agents. With ``self_balancing``, agents already holding more than N / K examples get
    proportion 0 for the remaining classes. The draw is repeated (up to ``max_tries``) until every
    agent holds at least ``min_partition_size`` examples. Shards are disjoint and cover the data.

    Raises:
      ValueError: alpha <= 0, or no draw met ``min_partition_size``.
    """
    labels = _check(labels, num_agents, num_classes)
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    avg = labels.size / num_agents
    for _ in range(max_tries):
        shards = [[] for _ in range(num_agents)]
        sizes = np.zeros(num_agents, dtype=np.int64)
        for idx in _class_indices(labels, num_classes, rng):
            p = rng.dirichlet(np.full(num_agents, alpha))
            if self_balancing:
                p = np.where(sizes > avg, 0.0, p)
                p = p / p.sum() if p.sum() > 0 else np.full(num_agents, 1.0 / num_agents)
            cuts = (np.cumsum(p) * idx.size).astype(np.int64)[:-1]
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].append(part)
                sizes[k] += part.size
        if sizes.min() >= min_partition_size:
            return _finish(labels, [np.concatenate(s) for s in shards], num_classes)
    raise ValueError(
        f"dirichlet(alpha={alpha}) gave an agent fewer than {min_partition_size} examples in "
        f"{max_tries} draws; raise alpha or lower min_partition_size"
    )


@PARTITIONS.register("pathological")
def pathological(
    labels,
    num_agents: int,
    seed: int = 0,
    num_classes: int = NUM_CLASSES,
    classes_per_agent: int = 2,
    class_assignment_mode: str = "first-deterministic",
):
    """Each agent holds only ``classes_per_agent`` classes (Flower's PathologicalPartitioner).

    Class assignment: ``first-deterministic`` gives agent k classes k, k+1, ... (mod C), so every
    class is used when K >= C / classes_per_agent; ``deterministic`` the same without the wrap
    guarantee (identical here); ``random`` draws each agent's classes uniformly without
    replacement. Each class's examples are then split equally among the agents holding it; classes
    held by nobody stay unused.

    Raises:
      ValueError: classes_per_agent outside [1, C] or an unknown assignment mode.
    """
    labels = _check(labels, num_agents, num_classes)
    if not 1 <= classes_per_agent <= num_classes:
        raise ValueError(
            f"classes_per_agent must be in [1, {num_classes}], got {classes_per_agent}"
        )
    rng = np.random.default_rng(seed)
    if class_assignment_mode in ("first-deterministic", "deterministic"):
        held = [
            [(k + j) % num_classes for j in range(classes_per_agent)] for k in range(num_agents)
        ]
    elif class_assignment_mode == "random":
        held = [
            sorted(rng.choice(num_classes, classes_per_agent, replace=False).tolist())
            for _ in range(num_agents)
        ]
    else:
        valid = ("first-deterministic", "deterministic", "random")
        check_choice("class_assignment_mode", class_assignment_mode, valid)
    shards = [[] for _ in range(num_agents)]
    for c, idx in enumerate(_class_indices(labels, num_classes, rng)):
        holders = [k for k in range(num_agents) if c in held[k]]
        for k, part in zip(holders, np.array_split(idx, max(len(holders), 1)), strict=False):
            shards[k].append(part)
    return _finish(
        labels, [np.concatenate(s) if s else np.zeros(0, np.int64) for s in shards], num_classes
    )


def make_partition(name: str, labels, num_agents: int, seed: int = 0, **kwargs) -> Partition:
    """Looks a partition up by name and applies it.

    Raises:
      ValueError: an unknown name (the message lists the valid ones) or invalid arguments.
    """
    return PARTITIONS.get(name)(labels, num_agents=num_agents, seed=seed, **kwargs)


def from_config(section, labels) -> Partition:
    """The partition a config's ``partition`` section names, applied to ``labels``: ``name``,
    ``num_agents``, ``seed`` and, of the other fields, those that are parameters of that
    partition (``owner_fraction`` for ``heterogeneous``, ``alpha`` for ``dirichlet``, ...).

    Raises:
      ValueError: an unknown name or invalid arguments.
    """
    return PARTITIONS.build(section.name, section, labels=labels)


def expected_counts(section) -> np.ndarray:
    """The count matrix n[agent, class] that ``from_config(section, labels)`` gives on MNIST's
    training labels, computed from the class sizes alone (``data.TRAIN_CLASS_COUNTS``; a
    partition sees the labels only through each class's examples): the config's partition,
    checked before any data is read.

    Raises:
      ValueError: as ``from_config``.
    """
    labels = np.repeat(np.arange(NUM_CLASSES), TRAIN_CLASS_COUNTS)
    return from_config(section, labels).counts
