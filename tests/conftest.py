"""Shared fixtures: the local MNIST copy, a persistent compilation cache, tiny configs."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from configs import base
from fedinf_jax import data, runtime

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _mnist_dir() -> pathlib.Path | None:
    for candidate in (
        os.environ.get(data.MNIST_DIR_ENV),
        ROOT.parent / "shared" / "data" / "mnist",
    ):
        if candidate and (pathlib.Path(candidate) / data.IDX_FILES["train_labels"]).is_file():
            return pathlib.Path(candidate)
    return None


MNIST_DIR = _mnist_dir()


def micro_config():
    """A one-level U-Net without attention (labels enter through the class embedding): every code
    path of the agent axis, the trainer and the sampler, with far fewer ops to compile."""
    c = base.get_config("smoke")
    c.model.block_out_channels = (4,)
    c.model.attention_levels = (False,)
    c.model.up_attention_levels = (False,)
    c.model.norm_groups = 2
    return c


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One XLA cache for the session, shared with subprocesses: each program compiles once."""
    cache = tmp_path_factory.mktemp("xla_cache")
    runtime.enable_compilation_cache(str(cache))
    os.environ[runtime.CACHE_ENV] = str(cache)
    return cache


@pytest.fixture(scope="session")
def mnist_dir() -> pathlib.Path:
    if MNIST_DIR is None:
        pytest.fail(
            "the local MNIST copy is missing: set FEDINF_MNIST_DIR to a directory with the four "
            "IDX .gz files (../shared/data/mnist in this project's workspace)"
        )
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist(mnist_dir) -> data.Mnist:
    return data.load_mnist_idx(mnist_dir)


@pytest.fixture(scope="session", autouse=True)
def mnist_env(mnist_dir):
    """Entry points run in subprocesses read the local copy through the environment."""
    os.environ[data.MNIST_DIR_ENV] = str(mnist_dir)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> pathlib.Path:
    """``python train.py --config=configs/hetero.py:smoke`` in a subprocess: 2 agents, 30 steps,
    checkpoints at 10, 20, 30. Tests read it; none may write into it."""
    workdir = tmp_path_factory.mktemp("cli_run")
    result = subprocess.run(
        [sys.executable, "train.py", "--config=configs/hetero.py:smoke", f"--workdir={workdir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ETA" in result.stderr and "parameters per agent" in result.stderr
    return workdir


REPRODUCE_PROCEDURES = ("paper", "superdiff_or")


def run_reproduce(outdir) -> str:
    """``reproduce.py`` on the smoke preset, the heterogeneous regime only, two procedures, in a
    subprocess; returns its log."""
    result = subprocess.run(
        [
            sys.executable,
            "reproduce.py",
            "--config=configs/reproduce.py:smoke",
            f"--outdir={outdir}",
            "--config.regimes=('heterogeneous',)",
            f"--config.procedures={REPRODUCE_PROCEDURES!r}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


@pytest.fixture(scope="session")
def reproduced(smoke_run, tmp_path_factory) -> tuple[pathlib.Path, str]:
    """The smoke pipeline: the session's smoke training run copied in as the heterogeneous regime
    (reused), the smoke classifier trained, samples, metrics, agreement, report. Returns (outdir,
    log). Tests read it; only test_pipeline's rerun runs in it again."""
    outdir = tmp_path_factory.mktemp("reproduce")
    shutil.copytree(smoke_run, outdir / "heterogeneous")
    return outdir, run_reproduce(outdir)
