"""Agents sharded over devices and processes: tests/multidevice_checks.py on 4 virtual CPU devices
in a subprocess (this process has one device), and tests/multiprocess_worker.py as two processes
on localhost."""

import json
import re

import jax
import numpy as np
import pytest

from fedinf_jax.agents import checkpoint
from fedinf_jax.core import runtime
from fedinf_jax.data.input_pipeline import synthetic_batch
from fedinf_jax.workflows import sample_lib, train_lib
from tests import multiprocess_worker
from tests.conftest import MULTIDEVICE_COUNT, micro_train_step


def test_sharded_agents_equal_one_device(multidevice_run):
    """Sharded training steps (K = 4, and 6 padded to 8), Orbax checkpoints restored onto another
    mesh, sharded sampling, the compiled program's collectives and the mesh errors: all pass on
    the virtual devices, none skipped."""
    summary = multidevice_run.strip().splitlines()[-1]
    assert re.fullmatch(r"=* ?\d+ passed(, \d+ warnings?)? in [\d.]+s.*", summary), summary
    assert f"needs {MULTIDEVICE_COUNT} devices" not in multidevice_run


def test_two_processes_hold_half_the_agents_each(multiprocess_run):
    """Two processes (jax.distributed on localhost, 2 CPU devices each), K = 4: each process's
    devices hold two agents; the checkpoint they wrote together restores on one device to the
    state they started from; two training steps and the federation's samples equal the
    single-process ones."""
    outdir = multiprocess_run
    held = [json.loads((outdir / f"agents_{p}.json").read_text()) for p in (0, 1)]
    assert held == [{"agents": [0, 1], "devices": 4}, {"agents": [2, 3], "devices": 4}]

    config, comp, params, counts, labels = multiprocess_worker.case()
    k = multiprocess_worker.NUM_AGENTS
    manager = checkpoint.make_manager(outdir / "run", create=False)
    state, _ = checkpoint.restore(manager, train_lib.abstract_train_state(comp, k), num_agents=k)
    manager.close()
    start = train_lib.create_train_state(params, comp.tx)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(start), strict=True):
        np.testing.assert_array_equal(a, b)

    step = micro_train_step("loop")
    batch = synthetic_batch(k, 4)
    trained, metrics = step(step(start, batch, jax.random.key(3))[0], batch, jax.random.key(3))
    with np.load(outdir / "trained.npz") as f:
        np.testing.assert_allclose(f["loss"], metrics["loss"], rtol=1e-5)
        kernel = trained.params["params"]["conv_in"]["kernel"]
        np.testing.assert_allclose(f["kernel"], kernel, rtol=1e-4, atol=1e-6)

    federation = sample_lib.Restored(config, params, counts, 1, comp)
    reference = sample_lib.sample_in_batches(
        sample_lib.build_sampler(federation),
        params,
        labels,
        config.sampler.batch_size,
        config.sampler.seed,
    )
    images = np.load(outdir / "images.npy")
    np.testing.assert_allclose(images, reference.images, rtol=1e-5, atol=1e-5)


def test_distributed_settings_come_together():
    runtime.initialize_distributed()  # none given: one process, nothing to do
    with pytest.raises(ValueError, match="--num_processes and --process_id together"):
        runtime.initialize_distributed("127.0.0.1:1234")
    with pytest.raises(ValueError, match=r"--process_id must be in \[0, 2\), got 2"):
        runtime.initialize_distributed("127.0.0.1:1234", 2, 2)
