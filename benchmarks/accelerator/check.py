"""The accelerator check: one command that measures what this project claims for GPUs and TPUs,
written as it goes, for a device lent for minutes.

    python -m benchmarks.accelerator.check                # about 8 minutes on one H100/H200
    python -m benchmarks.accelerator.check --dry_run      # the same code paths, tiny, on CPU

Parts, in order, each time-boxed (a part starts only while the total is under ``--budget_s``;
within a part, a measurement starts only while the part is under its share), each written to
the JSON file (``--output``, default ``benchmarks/results/accelerator_<device>.json``) as soon
as it ends, then printed as a Markdown table:

1. ``device``: the devices, and the chip's dense bf16 / fp32 peak from its name (``PEAKS``);
2. ``train_step``: the ``paper`` preset's K = 10 train step (``vmap`` over agents), fp32 and
   bf16: first call (compile), step time, peak device memory, FLOPs from XLA's cost analysis,
   achieved TFLOP/s and its share of the peak;
3. ``agent_axis``: the federated score and a 250-step probability-flow Euler sample of 100
   images under the uniform mean, with ``vmap`` and with ``map`` on the agent axis (images/s);
4. ``cpu_preset_batch``: the ``cpu`` preset's K = 10 sampling at a batch of 1000 images;
5. ``diffusers_peer``: the paper's stack (PyTorch + diffusers, ``benchmarks/common/peer.py``)
   on the same device and work beside fedinf_jax (skipped, with the reason, without the
   ``bench`` extra);
6. ``sharded``: with more than one device, the agents sharded over all of them sample the same
   images as one device (the largest difference);

Random weights and synthetic inputs throughout: nothing is read or downloaded. ``--dry_run``
runs every part on the tiny micro U-Net (one level, no attention, K = 2, batch 8, 4 steps).
"""

import os
import platform
import time

from absl import app, flags

flags.DEFINE_bool("dry_run", False, "every part at tiny sizes (CPU, under 2 minutes)")
flags.DEFINE_float("budget_s", 480.0, "start no part after this many seconds")
flags.DEFINE_string("output", "", "JSON path; default benchmarks/results/accelerator_<device>.json")
flags.DEFINE_integer("repeats", 3, "timed calls per measurement (median)")
FLAGS = flags.FLAGS

# Dense peak TFLOP/s (bf16 tensor cores / fp32 without tensor cores) by a substring of the
# device kind, from the vendors' data sheets (SXM parts; sparsity not counted).
PEAKS = {
    "H200": (989.0, 67.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "L4": (121.0, 30.3),
    "TPU v5 lite": (197.0, None),
    "TPU v5p": (459.0, None),
    "TPU v4": (275.0, None),
    "TPU v6": (918.0, None),
}

# (preset, K, batch or images, steps) per part; the dry run's are tiny.
SIZES = {
    "full": {
        "train": ("paper", 10, None),
        "agent_axis": ("paper", 10, 100, 250),
        "cpu_preset_batch": ("cpu", 10, 1000, 100),
        "diffusers_peer": ("paper", 10, 20, 10),
        "sharded": ("cpu", 8, 64, 10),
    },
    "dry_run": {
        "train": ("micro", 2, 4),
        "agent_axis": ("micro", 2, 8, 4),
        "cpu_preset_batch": ("micro", 2, 16, 4),
        "diffusers_peer": ("micro", 2, 4, 2),
        "sharded": ("micro", 2, 8, 4),
    },
}


def model_config(preset: str):
    """The preset's config; ``micro``: a one-level U-Net without attention (the tests' own)."""
    from configs import base

    if preset != "micro":
        return base.get_config(preset)
    config = base.get_config("smoke")
    config.model.block_out_channels = (4,)
    config.model.attention_levels = config.model.up_attention_levels = (False,)
    config.model.norm_groups = 2
    return config


def peak_tflops(kind: str) -> tuple[float | None, float | None, str]:
    """(dense bf16, fp32 peak TFLOP/s, the matched name) for a device kind; Nones if unknown."""
    for name, (bf16, fp32) in PEAKS.items():
        if name.lower() in kind.lower():
            return bf16, fp32, name
    return None, None, ""


def _device_part() -> dict:
    import jax

    devices = jax.devices()
    kind = devices[0].device_kind
    bf16, fp32, matched = peak_tflops(kind)
    return {
        "backend": jax.default_backend(),
        "device_kind": kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "jax": jax.__version__,
        "host": platform.processor() or platform.machine(),
        "peak_bf16_tflops": bf16,
        "peak_fp32_tflops": fp32,
        "peak_from": matched or "unknown device: no peak",
    }


def _peak_memory() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops else None


def _train_part(sizes, within, peaks) -> dict:
    import jax

    from benchmarks.common import timing
    from fedinf_jax.agents import runs
    from fedinf_jax.data.input_pipeline import synthetic_batch
    from fedinf_jax.workflows import train_lib

    preset, k, batch = sizes
    out = {}
    for dtype in ("float32", "bfloat16"):
        if not within():
            out[dtype] = {"status": "skipped: the part's time is up"}
            continue
        config = model_config(preset)
        config.model.dtype = dtype
        comp = runs.resolve(config)
        b = batch or config.train.batch_size
        params = runs.init_agents(comp.model, k, runs.make_key(0))
        state = train_lib.create_train_state(params, comp.tx)
        data = synthetic_batch(k, b)
        key = jax.random.key(0)
        step = train_lib.components_train_step(config, comp, "vmap")
        start = time.perf_counter()
        compiled = step.lower(state, data, key).compile()
        compile_s = time.perf_counter() - start
        first_s, step_s = timing.time_calls(
            lambda c=compiled, s=state, d=data, k=key: c(s, d, k)[1]["loss"], FLAGS.repeats
        )
        flops = _flops(compiled)
        achieved = flops / step_s / 1e12 if flops else None
        peak = peaks[0] if dtype == "bfloat16" else peaks[1]
        out[dtype] = {
            "preset": preset,
            "num_agents": k,
            "batch_per_agent": b,
            "compile_s": round(compile_s, 2),
            "first_call_s": round(first_s, 3),
            "step_s": round(step_s, 5),
            "flops_per_step": flops,
            "achieved_tflops": None if achieved is None else float(f"{achieved:.4g}"),
            "share_of_peak": None if not (achieved and peak) else round(achieved / peak, 4),
            "peak_memory_bytes": _peak_memory(),
        }
    return out


def _sampler(comp, strategy: str, steps: int, agent_mesh=None, k=None):
    """``peer.euler_mean_sampler`` over the agents lifted by ``strategy`` (on ``agent_mesh``)."""
    from benchmarks.common import peer
    from fedinf_jax.workflows import sample_lib

    lifted = sample_lib.agent_score_fn(comp, strategy, agent_mesh)
    return peer.euler_mean_sampler(lifted, comp, steps, k)


def _sample_rate(preset, k, n, steps, strategy, repeats) -> dict:
    """First call and steady images/s of an ``steps``-step sample of ``n`` images."""
    import jax.numpy as jnp

    from benchmarks.common import timing
    from fedinf_jax.agents import runs
    from fedinf_jax.sampling import federated_sampler

    config = model_config(preset)
    comp = runs.resolve(config)
    params = runs.init_agents(comp.model, k, runs.make_key(0))
    sampler = _sampler(comp, strategy, steps)
    keys, labels = federated_sampler.sample_keys(0, n), jnp.arange(n, dtype=jnp.int32) % 10
    first_s, sample_s = timing.time_calls(
        lambda: sampler.solve(params, keys, labels).images, repeats
    )
    return {
        "strategy": strategy,
        "num_agents": k,
        "images": n,
        "steps": steps,
        "first_call_s": round(first_s, 2),
        "sample_s": round(sample_s, 4),
        "images_per_s": round(n / sample_s, 2),
    }


def _agent_axis_part(sizes, within) -> dict:
    from benchmarks.common import federated_score, timing
    from fedinf_jax.agents import runs

    preset, k, n, steps = sizes
    out = {}
    for strategy in ("vmap", "map"):
        if not within():
            out[strategy] = {"status": "skipped: the part's time is up"}
            continue
        config = model_config(preset)
        config.agent_axis.score = strategy
        score = federated_score.build(runs.resolve(config), k, n)
        first_s, score_s = timing.time_calls(score, FLAGS.repeats)
        out[strategy] = {
            "score_first_call_s": round(first_s, 2),
            "score_s": round(score_s, 5),
            **_sample_rate(preset, k, n, steps, strategy, 1),
        }
    return out


def _cpu_preset_part(sizes, within) -> dict:
    preset, k, n, steps = sizes
    return _sample_rate(preset, k, n, steps, "vmap", 1)


def _diffusers_part(sizes, within) -> dict:
    try:
        import diffusers  # noqa: F401
        import torch
    except ImportError as err:
        return {"status": f"skipped: {err} (pip install -e '.[bench]')"}
    from benchmarks.common import peer

    preset, k, b, steps = sizes
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_result = peer.torch_side(model_config(preset), k, b, steps, FLAGS.repeats, device)
    jax_result = peer.jax_side(model_config(preset), k, b, steps, FLAGS.repeats)
    ratios = {
        key: round(torch_result[key] / jax_result[key], 3)
        for key in ("score_s", "sample_s")
        if key in torch_result and key in jax_result
    }
    return {"torch_device": device, "torch": torch_result, "jax": jax_result, "ratios": ratios}


def _sharded_part(sizes, within) -> dict:
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from fedinf_jax.agents import runs, sharding
    from fedinf_jax.sampling import federated_sampler

    if jax.device_count() < 2:
        return {"status": f"skipped: {jax.device_count()} device"}
    preset, k, n, steps = sizes
    comp = runs.resolve(model_config(preset))
    params = runs.init_agents(comp.model, k, runs.make_key(0))
    keys, labels = federated_sampler.sample_keys(0, n), jnp.arange(n, dtype=jnp.int32) % 10
    single = _sampler(comp, "vmap", steps).solve(params, keys, labels).images
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"agents": 0, "batch": 1}), k)
    sharded = _sampler(comp, "vmap", steps, mesh, k)
    images = sharded.solve(sharding.to_mesh(params, mesh), keys, labels).images
    diff = float(np.max(np.abs(np.asarray(images) - np.asarray(single))))
    return {"devices": jax.device_count(), "num_agents": k, "max_abs_difference": diff}


def markdown(record: dict) -> str:
    """The record as a Markdown table: a row per measurement (a part's sub-results), then the
    part's own values."""

    def items(values: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in values.items() if not isinstance(v, dict))

    rows = []
    for part, result in record["parts"].items():
        for name, value in result.items():
            if isinstance(value, dict):
                rows.append(f"| {part}/{name} | {items(value)} |")
        if items(result):
            rows.append(f"| {part} | {items(result)} |")
    return "\n".join(["| part | results |", "| --- | --- |", *rows]) + "\n"


def main(argv):
    del argv
    import jax

    from benchmarks.common import timing
    from fedinf_jax.core import files, runtime

    runtime.setup()
    start = time.perf_counter()
    sizes = SIZES["dry_run" if FLAGS.dry_run else "full"]
    device = _device_part()
    name = "dry_run" if FLAGS.dry_run else device["device_kind"].replace(" ", "_").lower()
    path = FLAGS.output or os.path.join(timing.RESULTS_DIR, f"accelerator_{name}.json")
    record = {
        "dry_run": FLAGS.dry_run,
        "budget_s": FLAGS.budget_s,
        "code_version": runtime.code_version(),
        "parts": {"device": device},
    }
    peaks = (device["peak_bf16_tflops"], device["peak_fp32_tflops"])
    parts = [
        ("train_step", lambda w: _train_part(sizes["train"], w, peaks), 0.3),
        ("agent_axis", lambda w: _agent_axis_part(sizes["agent_axis"], w), 0.3),
        ("cpu_preset_batch", lambda w: _cpu_preset_part(sizes["cpu_preset_batch"], w), 0.1),
        ("diffusers_peer", lambda w: _diffusers_part(sizes["diffusers_peer"], w), 0.2),
        ("sharded", lambda w: _sharded_part(sizes["sharded"], w), 0.1),
    ]
    files.write_json(path, record)
    for part, run_part, share in parts:
        elapsed = time.perf_counter() - start
        if elapsed > FLAGS.budget_s:
            record["parts"][part] = {"status": f"skipped: {elapsed:.0f} s of the budget used"}
            continue
        part_start = time.perf_counter()
        part_budget = share * FLAGS.budget_s

        def within(part_start=part_start, part_budget=part_budget):
            return time.perf_counter() - part_start < part_budget

        print(f"{part}: running ({elapsed:.0f} s so far)", flush=True)
        try:
            result = run_part(within)
        except Exception as err:  # a part's failure is a result; the next part still runs
            result = {"status": f"error: {type(err).__name__}: {err}"}
        result = dict(result, part_s=round(time.perf_counter() - part_start, 1))
        record["parts"][part] = result
        files.write_json(path, record)
    record["total_s"] = round(time.perf_counter() - start, 1)
    files.write_json(path, record)
    print(markdown(record))
    print(f"{path} ({record['total_s']} s; backend {jax.default_backend()})")


if __name__ == "__main__":
    app.run(main)
