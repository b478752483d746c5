"""Per-agent training batches, a pure function of the step.

Agent k's shard of n_k examples is read in epochs of ``max(1, n_k // batch_size)`` steps; each
epoch's order is a permutation drawn from ``np.random.default_rng((seed, k, epoch))``. Because the
batch at step s depends only on (seed, k, s), a resumed run sees exactly the data an uninterrupted
run would, with no iterator state to checkpoint. A shard smaller than the batch wraps around its
permutation.
"""

from __future__ import annotations

import numpy as np

from fedinf_jax.data.digits import to_model_input
from fedinf_jax.data.partitions import Partition


class AgentBatcher:
    """``batcher(step) -> {"images": (K, B, 28, 28, 1) float32, "labels": (K, B) int32}``."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        partition: Partition,
        batch_size: int,
        seed: int = 0,
        centered: bool = True,
    ):
        empty = [k for k, idx in enumerate(partition.indices) if idx.size == 0]
        if empty:
            raise ValueError(f"agents {empty} received no training data from the partition")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._images, self._labels = images, labels
        self._shards = partition.indices
        self._batch_size = batch_size
        self._seed = seed
        self._centered = centered
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def _order(self, agent: int, epoch: int) -> np.ndarray:
        key = (agent, epoch)
        if key not in self._cache:
            if len(self._cache) > 4 * len(self._shards):
                self._cache.clear()
            rng = np.random.default_rng((self._seed, agent, epoch))
            self._cache[key] = rng.permutation(self._shards[agent])
        return self._cache[key]

    def indices(self, step: int) -> np.ndarray:
        """(K, B) training-set indices of the batch at ``step``."""
        rows = []
        for k, shard in enumerate(self._shards):
            steps_per_epoch = max(1, shard.size // self._batch_size)
            epoch, pos = divmod(step, steps_per_epoch)
            order = self._order(k, epoch)
            rows.append(order[(pos * self._batch_size + np.arange(self._batch_size)) % order.size])
        return np.stack(rows)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        idx = self.indices(step)
        return {
            "images": to_model_input(self._images[idx], self._centered),
            "labels": self._labels[idx].astype(np.int32),
        }


def synthetic_batch(num_agents: int, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A random batch of the training layout (uniform pixels in [-1, 1], random labels), for
    benchmarks and tests that exercise the computation rather than the data."""
    rng = np.random.default_rng(seed)
    return {
        "images": rng.uniform(-1, 1, (num_agents, batch_size, 28, 28, 1)).astype(np.float32),
        "labels": rng.integers(0, 10, (num_agents, batch_size)).astype(np.int32),
    }
