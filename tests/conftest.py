"""Shared fixtures: the suite's MNIST data, a persistent compilation cache, tiny configs."""

import concurrent.futures
import contextlib
import functools
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from configs import base
from fedinf_jax.core import runtime
from fedinf_jax.data import digits

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The suite checks this project's equations, equivalences and invariants, not XLA's code
# generation: its programs, in-process and in the entry-point runs it starts, compile with LLVM's
# optimisation off, a quarter to a third less compile time (docs/performance.md). Users' runs and
# the benchmarks compile at XLA's defaults.
SUITE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def suite_xla_flags(*flags: str) -> str:
    """``XLA_FLAGS`` for a process of the suite: ``flags`` and the suite's own."""
    return " ".join((*flags, SUITE_XLA_FLAGS))


os.environ["XLA_FLAGS"] = suite_xla_flags(*filter(None, [os.environ.get("XLA_FLAGS")]))


# The suite's MNIST (data/README.md): MNIST's first 6,000 training and 1,000 test examples,
# and the full label files; nothing outside the repository is read.
MNIST_DIR = ROOT / "data" / "mnist_subset"
MNIST_LABELS_DIR = ROOT / "data" / "mnist_labels"


def micro_config():
    """A one-level U-Net without attention (labels enter through the class embedding): every code
    path of the agent axis, the trainer and the sampler, with far fewer ops to compile."""
    c = base.get_config("smoke")
    c.model.block_out_channels = (4,)
    c.model.attention_levels = (False,)
    c.model.up_attention_levels = (False,)
    c.model.norm_groups = 2
    c.train.batch_size = 4  # the tests' synthetic batches
    return c


@functools.cache
def micro_train_step(strategy: str, agent_mesh=None):
    """``micro_config()``'s train step through ``strategy``, on ``agent_mesh`` when given, as the
    trainer builds it (``train_lib.components_train_step``) but without donating its input;
    cached, so that one compilation serves every test of a process."""
    from fedinf_jax.agents import runs
    from fedinf_jax.workflows import train_lib

    config = micro_config()
    return train_lib.components_train_step(config, runs.resolve(config), strategy, agent_mesh)


def zero_fill_data_files(step: pathlib.Path) -> list[pathlib.Path]:
    """Overwrites every TensorStore data file of checkpoint ``step`` (``.../d/<hash>``) with zeros
    of the same length, what a full disk or an interrupted copy leaves: whichever arrays a reader
    restores (sampling reads only the parameters, spread over these files in an order that
    differs between runs), it meets a damaged file. Returns them."""
    damaged = [p for p in step.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert damaged, f"no data files under {step}"
    for path in damaged:
        path.write_bytes(bytes(path.stat().st_size))
    return damaged


@contextlib.contextmanager
def count_events(event: str):
    """Yields the list of ``jax.monitoring`` duration events named ``event`` recorded inside the
    block, each as the name of the function it is about (a trace's or a compilation's), else as
    the event's name."""
    import jax

    events = []

    def listen(name, duration, **kwargs):
        if name == event:
            events.append(kwargs.get("fun_name", name))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


# JAX traces (each a compilation or a persistent-cache lookup); XLA compilations, each compiled
# or read from the persistent cache; the reads.
count_traces = functools.partial(count_events, "/jax/core/compile/jaxpr_trace_duration")
count_compiles = functools.partial(count_events, "/jax/core/compile/backend_compile_duration")
count_cache_reads = functools.partial(count_events, "/jax/compilation_cache/compile_time_saved_sec")


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One XLA cache for the session, shared with subprocesses: each program compiles once."""
    cache = tmp_path_factory.mktemp("xla_cache")
    runtime.enable_compilation_cache(str(cache))
    os.environ[runtime.CACHE_ENV] = str(cache)
    return cache


@pytest.fixture(scope="session")
def mnist_dir() -> pathlib.Path:
    """The suite's MNIST subset: the four IDX files of MNIST's first 6,000 training and first
    1,000 test examples."""
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist(mnist_dir) -> digits.Mnist:
    return digits.load_mnist_idx(mnist_dir)


@pytest.fixture(scope="session")
def mnist_train_labels() -> np.ndarray:
    """MNIST's 60,000 training labels, the full canonical file (partitions see only labels)."""
    return digits.read_idx(MNIST_LABELS_DIR / digits.IDX_FILES["train_labels"]).astype(np.int32)


@pytest.fixture(scope="session", autouse=True)
def mnist_env(mnist_dir):
    """The code under test, in this process and in the entry points run in subprocesses, reads
    the suite's subset through the environment, whatever the caller's shell set."""
    os.environ[digits.MNIST_DIR_ENV] = str(mnist_dir)


_NICE = shutil.which("nice")


class EntryPoints:
    """Runs ``python ENTRY_POINT ARGS`` in the repository root, at niceness ``nice`` (plain
    priority where there is no ``nice``), in subprocesses that ``kill_running`` can stop, with the
    environment as it was when this was made (tests that run meanwhile may change
    ``os.environ`` through monkeypatch)."""

    def __init__(self, nice: int = 0):
        self.env = dict(os.environ)
        self.nice = [_NICE, "-n", str(nice)] if _NICE and nice else []
        self.processes: list[subprocess.Popen] = []

    def run(self, args: list[str], timeout: float, extra_env: dict | None = None) -> str:
        """Asserts the run succeeded; returns its log (stderr, then stdout)."""
        return self.finish(self.start(args, extra_env), timeout)

    def start(self, args: list[str], extra_env: dict | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            [*self.nice, sys.executable, *args],
            cwd=ROOT,
            env={**self.env, **(extra_env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.processes.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen, timeout: float) -> str:
        """Waits for ``proc``; asserts it succeeded; returns its log (stderr, then stdout)."""
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert proc.returncode == 0, stderr[-4000:] + stdout[-4000:]
        return stderr + stdout

    def kill_running(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()


# superdiff_or's tracked densities move with the path: Euler-Maruyama steps them.
SUPERDIFF_OR = "superdiff_or:solver=euler"
REPRODUCE_PROCEDURES = ("paper", SUPERDIFF_OR)


def run_reproduce(outdir, entry_points: EntryPoints | None = None) -> str:
    """``reproduce.py`` on the smoke preset, the heterogeneous regime only, two procedures, in a
    subprocess; returns its log."""
    return (entry_points or EntryPoints()).run(
        [
            "reproduce.py",
            "--config=configs/reproduce.py:smoke",
            f"--outdir={outdir}",
            "--config.regimes=('heterogeneous',)",
            f"--config.procedures={REPRODUCE_PROCEDURES!r}",
        ],
        timeout=900,
    )


# The session's entry-point runs (fixtures of the same names). They run in subprocesses on
# background threads, started when the session starts, so that they overlap the in-process tests
# (on 2 cores, XLA compiles here and there at once); the tests that read them run last, in the
# order the runs finish on this machine (so that the readers of early runs work while later runs
# still compile). What each piece buys, pytest in a fresh clone on the quiet 2-core machine,
# 444 tests (docs/performance.md, "The test suite"): all of it 476 and 483 s; every run finished
# before the first test instead of overlapping them, 586 s (the overlap: about 105 s); the tests
# in file order instead of readers last, 560 s (the order: about 80 s); every run at plain
# priority, 556 s (nice 10 for the runs off the critical chain: about 75 s).
SESSION_RUNS = (
    "tfds_data_dir",
    "bad_input_runs",
    "smoke_run",
    "multidevice_run",
    "sample_cli_run",
    "multiprocess_run",
    "accelerator_dry_run",
    "reproduced",
)
# The entry points run with a bad setting: (arguments, the error line they must print).
BAD_INPUTS = {
    "train": (
        ["train.py", "--config=configs/hetero.py:smoke", "--config.train.batch_size=0"],
        "error: train.batch_size must be >= 1, got 0",
    ),
    "sample": (
        ["sample.py", "--config=configs/hetero.py:smoke", "--config.aggregator.name=avg"],
        "error: unknown aggregator 'avg'; valid: ['mean', 'weighted'",
    ),
    "sample_typo": (
        ["sample.py", "--config=configs/hetero.py:smoke", "--config.sampler.num_stepps=20"],
        "error: --config.sampler.num_stepps=20: no such config field; did you mean num_steps?",
    ),
    "sample_type": (
        ["sample.py", "--config=configs/hetero.py:smoke", "--config.sampler.num_steps=abc"],
        "error: flag --config.sampler.num_steps=abc: invalid literal for int()",
    ),
}
MULTIDEVICE_COUNT = 4
_NEEDED = pytest.StashKey[set]()


def _run_order(fixture: str) -> int:
    """0 for a fixture that is no session run, else 1 + its place in ``SESSION_RUNS``."""
    return SESSION_RUNS.index(fixture) + 1 if fixture in SESSION_RUNS else 0


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(config, items):
    needed = {name for item in items for name in item.fixturenames if name in SESSION_RUNS}
    config.stash[_NEEDED] = needed
    items.sort(key=lambda item: max(_run_order(name) for name in ("", *item.fixturenames)))


@pytest.fixture(scope="session", autouse=True)
def session_runs(request, tmp_path_factory, compilation_cache, mnist_env):
    """Starts the entry-point runs the collected tests need; returns {name: Future}."""
    needed = request.config.stash.get(_NEEDED, set())
    # The smoke training and the pipeline after it are the longest chain (their readers run
    # last) and keep plain priority; the other runs yield the CPU to the in-process tests and
    # to that chain.
    chain, entry_points = EntryPoints(), EntryPoints(nice=10)
    runs: dict[str, concurrent.futures.Future] = {}
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    multidevice = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    small = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    if "tfds_data_dir" in needed:
        outdir = tmp_path_factory.mktemp("tfds")
        runs["tfds_data_dir"] = small.submit(_prepare_tfds, entry_points, outdir)
    if "bad_input_runs" in needed:
        outdir = tmp_path_factory.mktemp("bad_inputs")
        runs["bad_input_runs"] = small.submit(_bad_inputs, entry_points, outdir)
    if "multidevice_run" in needed:
        runs["multidevice_run"] = multidevice.submit(_multidevice_checks, entry_points)
    if "multiprocess_run" in needed:
        outdir = tmp_path_factory.mktemp("two_processes")
        runs["multiprocess_run"] = multidevice.submit(_two_processes, entry_points, outdir)
    if "accelerator_dry_run" in needed:  # after the sharding checks, on their thread
        outdir = tmp_path_factory.mktemp("accelerator")
        runs["accelerator_dry_run"] = multidevice.submit(_accelerator_dry_run, entry_points, outdir)
    if needed & {"smoke_run", "sample_cli_run", "reproduced"}:
        workdir = tmp_path_factory.mktemp("cli_run")
        runs["smoke_run"] = executor.submit(_train_smoke, chain, workdir)
    if "sample_cli_run" in needed:  # beside the pipeline, once the smoke run is trained
        outdir = tmp_path_factory.mktemp("sample_cli") / "out"
        runs["sample_cli_run"] = small.submit(
            _sample_smoke, entry_points, runs["smoke_run"], outdir
        )
    if "reproduced" in needed:
        outdir = tmp_path_factory.mktemp("reproduce")
        runs["reproduced"] = executor.submit(_reproduce_smoke, chain, runs["smoke_run"], outdir)
    yield runs
    for runner in (chain, entry_points):  # an interrupted session
        runner.kill_running()
    for pool in (executor, multidevice, small):
        pool.shutdown(wait=True, cancel_futures=True)


def _prepare_tfds(entry_points, outdir) -> pathlib.Path:
    """``python -m fedinf_jax.data``: TFDS's preparation of 'mnist' from the suite's IDX subset,
    offline."""
    entry_points.run(
        [
            "-m",
            "fedinf_jax.data",
            f"--mnist_dir={MNIST_DIR}",
            f"--tfds_data_dir={outdir}",
            "--nocanonical",
        ],
        timeout=600,
    )
    return outdir


def _bad_inputs(entry_points, outdir) -> dict:
    """Each of ``BAD_INPUTS`` run: {name: (exit status, stderr with Python's import times,
    whether its workdir exists)}."""
    results = {}
    for name, (args, _) in BAD_INPUTS.items():
        workdir = outdir / name
        proc = entry_points.start(["-X", "importtime", *args, f"--workdir={workdir}"])
        _, stderr = proc.communicate(timeout=300)
        results[name] = (proc.returncode, stderr, workdir.exists())
    return results


def _train_smoke(entry_points, workdir) -> pathlib.Path:
    log = entry_points.run(
        ["train.py", "--config=configs/hetero.py:smoke", f"--workdir={workdir}"], timeout=600
    )
    assert "ETA" in log and "parameters per agent" in log
    return workdir


def _sample_smoke(entry_points, trained, outdir) -> pathlib.Path:
    entry_points.run(
        [
            "sample.py",
            "--config=configs/hetero.py:smoke",
            f"--workdir={trained.result()}",
            f"--outdir={outdir}",
            "--config.aggregator.name=label_prior",
            "--config.sampler.save_trajectory=3",
        ],
        timeout=600,
    )
    return outdir


def _accelerator_dry_run(entry_points, outdir) -> tuple[dict, str]:
    """``benchmarks/accelerator/check.py --dry_run`` on 2 virtual CPU devices (so that its
    sharded part runs): (its JSON record, its log)."""
    path = outdir / "accelerator.json"
    log = entry_points.run(
        ["-m", "benchmarks.accelerator.check", "--dry_run", f"--output={path}"],
        timeout=600,
        extra_env={"XLA_FLAGS": suite_xla_flags("--xla_force_host_platform_device_count=2")},
    )
    return json.loads(path.read_text()), log


def _multidevice_checks(entry_points) -> str:
    return entry_points.run(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/multidevice_checks.py"],
        timeout=900,
        extra_env={
            "XLA_FLAGS": suite_xla_flags(
                f"--xla_force_host_platform_device_count={MULTIDEVICE_COUNT}"
            )
        },
    )


def _two_processes(entry_points, outdir) -> pathlib.Path:
    """``tests/multiprocess_worker.py`` as processes 0 and 1 of one run on localhost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = lambda i: ["-m", "tests.multiprocess_worker", str(i), str(port), str(outdir)]  # noqa: E731
    first = entry_points.start(args(0))
    entry_points.run(args(1), timeout=600)
    entry_points.finish(first, timeout=600)
    return outdir


def _reproduce_smoke(entry_points, trained, outdir) -> tuple[pathlib.Path, str]:
    shutil.copytree(trained.result(), outdir / "heterogeneous")
    return outdir, run_reproduce(outdir, entry_points)


@pytest.fixture(scope="session")
def accelerator_dry_run(session_runs) -> tuple[dict, str]:
    return session_runs["accelerator_dry_run"].result()


@pytest.fixture(scope="session")
def smoke_run(session_runs) -> pathlib.Path:
    """``python train.py --config=configs/hetero.py:smoke`` in a subprocess: 2 agents, 30 steps,
    checkpoints at 10, 20, 30. Tests read it; none may write into it."""
    return session_runs["smoke_run"].result()


@pytest.fixture(scope="session")
def sample_cli_run(session_runs) -> pathlib.Path:
    """``python sample.py`` on the smoke run with ``label_prior`` and a 3-time trajectory: its
    output folder."""
    return session_runs["sample_cli_run"].result()


@pytest.fixture(scope="session")
def reproduced(session_runs) -> tuple[pathlib.Path, str]:
    """The smoke pipeline: the session's smoke training run copied in as the heterogeneous regime
    (reused), the smoke classifier trained, samples, metrics, agreement, report. Returns (outdir,
    log). Tests read it; only test_pipeline's rerun runs in it again."""
    return session_runs["reproduced"].result()


@pytest.fixture(scope="session")
def multidevice_run(session_runs) -> str:
    """``pytest tests/multidevice_checks.py`` on 4 virtual CPU devices: its output."""
    return session_runs["multidevice_run"].result()


@pytest.fixture(scope="session")
def tfds_data_dir(session_runs) -> pathlib.Path:
    """A TFDS data_dir with 'mnist' prepared by ``python -m fedinf_jax.data`` from the suite's
    IDX subset, offline."""
    return session_runs["tfds_data_dir"].result()


@pytest.fixture(scope="session")
def bad_input_runs(session_runs) -> dict:
    """``BAD_INPUTS``' runs: {name: (exit status, stderr, whether its workdir exists)}."""
    return session_runs["bad_input_runs"].result()


@pytest.fixture(scope="session")
def multiprocess_run(session_runs) -> pathlib.Path:
    """``tests/multiprocess_worker.py`` in two processes on localhost: its output folder."""
    return session_runs["multiprocess_run"].result()
