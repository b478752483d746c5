"""Compile once: what a repeated, identical ``sample.py`` run spends compiling.

Runs ``sample.py`` on a shipped federation ``--repeats`` times in fresh processes that share one
fresh compilation cache, twice over: with the solver's progress bar (Diffrax's
``TqdmProgressMeter``, whose host callbacks keep the solve out of the persistent cache, as every
solve was before the sampler tallied its evaluations as values) and without it (the default).
Each process reports JAX's own timers (``jax.monitoring``): the seconds spent tracing, the
seconds in XLA compilation or persistent-cache reads, and how many programs were read from the
cache and the compile time they saved.

    python -m benchmarks.speed.compile_once --federation=pretrained/cpu/heterogeneous

Results: ``benchmarks/results/compile_once_<preset>.{json,md}``.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks.common import timing

FLAGS = flags.FLAGS
flags.DEFINE_string("federation", "pretrained/cpu/heterogeneous", "The run sampled (its folder).")
flags.DEFINE_string("preset", "cpu", "The config preset (configs/hetero.py:PRESET).")
flags.DEFINE_integer("num_per_class", 2, "Images per digit (20 in all by default).")
flags.DEFINE_integer("repeats", 2, "Identical runs per setting, each in a fresh process.")
flags.DEFINE_string("child", None, "(internal) write this process's timers to this JSON file.")

EVENTS = {
    "trace_s": "/jax/core/compile/jaxpr_trace_duration",
    "compile_or_read_s": "/jax/core/compile/backend_compile_duration",
    "saved_by_cache_s": "/jax/compilation_cache/compile_time_saved_sec",
}


def _child(out: str, argv: list[str]) -> None:
    """Runs ``sample.py`` with ``argv`` in this process, JAX's timers recorded into ``out``."""
    import jax

    totals, counts = collections.defaultdict(float), collections.defaultdict(int)

    def listen(name, duration, **kwargs):
        for key, event in EVENTS.items():
            if name == event:
                totals[key] += duration
                counts[key] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    start = time.perf_counter()

    def write():
        record = {k: round(totals[k], 2) for k in EVENTS}
        record["cache_reads"] = counts["saved_by_cache_s"]
        record["programs"] = counts["compile_or_read_s"]
        record["wall_s"] = round(time.perf_counter() - start, 1)
        with open(out, "w") as f:
            json.dump(record, f)

    atexit.register(write)
    sys.argv = ["sample.py", *argv]
    import sample

    app.run(sample.main)


def _run(argv: list[str], cache: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "timers.json")
        env = dict(os.environ, FEDINF_JAX_CACHE=cache)
        command = [sys.executable, "-m", "benchmarks.speed.compile_once", f"--child={out}", "--"]
        subprocess.run([*command, *argv], env=env, check=True, capture_output=True)
        with open(out) as f:
            return json.load(f)


def main(argv):
    if FLAGS.child:
        return _child(FLAGS.child, argv[1:])
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for progress in (True, False):
            cache = os.path.join(tmp, f"cache_progress_{progress}")
            for repeat in range(FLAGS.repeats):
                sample_argv = [
                    f"--config=configs/hetero.py:{FLAGS.preset}",
                    f"--workdir={FLAGS.federation}",
                    f"--outdir={os.path.join(tmp, 'samples')}",
                    f"--config.sampler.num_per_class={FLAGS.num_per_class}",
                    f"--config.sampler.progress={progress}",
                ]
                row = {"progress_bar": progress, "run": repeat + 1, **_run(sample_argv, cache)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    record = {
        "command": " ".join(["python -m benchmarks.speed.compile_once", *sys.argv[1:]]),
        "sgemm_gflops": round(timing.sgemm_gflops(), 1),
        "federation": FLAGS.federation,
        "images": 10 * FLAGS.num_per_class,
        "rows": rows,
    }
    header = ["progress bar", "run", "trace s", "XLA compile or cache read s", "cache reads"]
    header += ["compile s saved by the cache", "wall s"]
    table = timing.markdown_table(
        header,
        [
            [
                "on" if r["progress_bar"] else "off",
                r["run"],
                r["trace_s"],
                r["compile_or_read_s"],
                f"{r['cache_reads']} of {r['programs']}",
                r["saved_by_cache_s"],
                r["wall_s"],
            ]
            for r in rows
        ],
        numeric_from=1,
    )
    path = os.path.join(timing.RESULTS_DIR, f"compile_once_{FLAGS.preset}.json")
    timing.write_results(path, record, f"`{record['command']}`\n\n{table}")


if __name__ == "__main__":
    app.run(main)
