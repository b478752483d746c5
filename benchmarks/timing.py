"""Timing shared by the benchmarks (imported as ``timing``: a script's folder is on its path)."""

import statistics
import time

import jax


def time_calls(fn, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of ``repeats`` further calls) of ``fn()``.

    Each call is waited for (``jax.block_until_ready`` of its result; results that are not JAX
    arrays, e.g. PyTorch tensors, pass through), so the first call includes JAX's compilation.
    """
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)
