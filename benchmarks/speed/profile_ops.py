"""Where a federated score evaluation spends its time, by JAX operation, on XLA:CPU.

    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true \\
        python -m benchmarks.speed.profile_ops --preset=cpu

Traces three calls of the K-agent score evaluation (``sample_lib.agent_score_fn`` and the mean)
with ``jax.profiler`` and sums the executed thunks' durations by the JAX operation their HLO
instruction came from (its ``op_name`` metadata: ``conv_general_dilated``, ``reduce_sum``, ...).
Thunks on XLA:CPU's threads overlap, so the sums exceed the wall time; their shares are what to
read. Without ``--xla_cpu_enable_xprof_traceme`` XLA:CPU records no per-thunk events.
"""

import collections
import glob
import gzip
import json
import re
import tempfile

from absl import app, flags

flags.DEFINE_enum("preset", "cpu", ["smoke", "demo", "cpu", "paper"], "model preset")
flags.DEFINE_integer("num_agents", 10, "K")
flags.DEFINE_integer("batch", 20, "images per evaluation")
flags.DEFINE_integer("top", 12, "operations listed")
FLAGS = flags.FLAGS


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the JAX operation in its ``op_name`` metadata."""
    names = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        op = re.search(r'op_name="([^"]+)"', line)
        if m and op:
            names[m.group(1)] = op.group(1).split("/")[-1]
    return names


def main(argv):
    del argv
    import jax

    from benchmarks.common import federated_score
    from configs import base
    from fedinf_jax.agents import runs

    comp = runs.resolve(base.get_config(FLAGS.preset))
    k, b = FLAGS.num_agents, FLAGS.batch
    score = federated_score.build(comp, k, b)
    names = op_names(score.federated.lower(score.params, *score.args).compile().as_text())
    score().block_until_ready()
    calls = 3
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                score().block_until_ready()
        (path,) = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    by_op = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in names:
            by_op[names[event["name"]]] += event.get("dur", 0) / calls / 1e3
    total = sum(by_op.values())
    if not total:
        raise SystemExit("no thunk events: set XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true")
    print(f"preset {FLAGS.preset}, K = {k}, batch {b}, strategy {comp.score_strategy}")
    print("| JAX operation | thunk ms per call | share |")
    print("| --- | --- | --- |")
    for name, ms in by_op.most_common(FLAGS.top):
        print(f"| {name} | {ms:.1f} | {ms / total:.0%} |")


if __name__ == "__main__":
    app.run(main)
