"""Timing shared by the benchmarks (``from benchmarks.common import timing``), and where their
results go."""

import os
import statistics
import time

import jax
import numpy as np

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
"""benchmarks/results: each benchmark's JSON, Markdown and logs."""


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


def markdown_table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    """A Markdown table; columns from ``numeric_from`` on are right-aligned."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines) + "\n"


def sgemm_gflops(n: int = 4096, repeats: int = 3) -> float:
    """This machine's fp32 matrix-product ceiling now: the best of ``repeats`` numpy ``n x n``
    float32 products, in GFLOP/s (2 n^3 flops each). It drifts within minutes on a shared
    machine, so benchmarks measure it in the same run as what they compare to it."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def write_results(path: str, record: dict, table: str) -> None:
    """Writes a benchmark's ``record`` to ``path`` (JSON) and its Markdown ``table`` beside it
    (``.md``), and prints the table."""
    from fedinf_jax.core import files

    files.write_json(path, record)
    files.write_text(path.replace(".json", ".md"), table)
    print(table)
