"""Process set-up shared by the entry points."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys

from fedinf_jax.core import files
from fedinf_jax.core.errors import UserError

CACHE_ENV = "FEDINF_JAX_CACHE"


def exit_on_user_error(main):
    """Wraps an absl ``main``: a ``fedinf_jax.core.errors.UserError`` (a bad setting, a missing run)
    prints one line, ``error: <message>``, on stderr and exits with status 2; other exceptions
    (bugs) keep their tracebacks."""

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapped


def run_entry_point(main) -> None:
    """``absl.app.run(main)`` with the entry points' contract for bad input: a flag that does not
    parse (``--config.sampler.num_steps=abc``), names no config field
    (``--config.sampler.num_stepps=20``) or is missing, and a ``UserError`` from ``main``
    (``exit_on_user_error``), each print one line, ``error: <message>``, and exit with status
    2."""
    from absl import app

    app.run(exit_on_user_error(main), flags_parser=_parse_flags_or_exit)


def _parse_flags_or_exit(argv: list[str]) -> list[str]:
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except (AttributeError, KeyError) as e:  # ml_collections: an override naming no field
        message = _unknown_field_message(argv, str(e.args[0] if e.args else e))
    print(f"error: {message} (--helpfull lists the flags)", file=sys.stderr)
    sys.exit(2)


def _unknown_field_message(argv: list[str], raw: str) -> str:
    """ml_collections' ``'\'num_stepps\'\nDid you mean "num_steps" instead of ...'`` as
    ``--config.sampler.num_stepps=20: no such config field; did you mean num_steps?``"""
    import re

    field = re.search(r"'(\w+)\\?'", raw) or re.search(r"(\w+)", raw)
    name = field.group(1) if field else raw
    hint = re.search(r'Did you mean "(\w+)"', raw)
    given = next((a for a in argv if re.search(rf"\.{re.escape(name)}([.=]|$)", a)), name)
    return f"{given}: no such config field" + (f"; did you mean {hint.group(1)}?" if hint else "")


def define_distributed_flags() -> None:
    """The ``jax.distributed`` flags of ``train.py`` and ``sample.py`` (one process per host, or
    per GPU; see docs/multi_device.md)."""
    from absl import flags

    flags.DEFINE_string(
        "coordinator_address",
        None,
        "host:port of process 0 of a multi-process run (jax.distributed); every process gets "
        "the same address and --num_processes, and its own --process_id.",
    )
    flags.DEFINE_integer(
        "num_processes", None, "Processes in the run (with --coordinator_address)."
    )
    flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
    flags.DEFINE_bool(
        "distributed",
        False,
        "Initialise jax.distributed from the platform's own settings (Cloud TPU, SLURM, Open "
        "MPI, ...) instead of --coordinator_address.",
    )


def start_distributed_entry_point(argv) -> None:
    """The start of ``train.py``'s and ``sample.py``'s ``main``: refuses stray arguments, joins a
    multi-process run when ``define_distributed_flags``' flags ask for one, then ``setup``."""
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    initialize_distributed(f.coordinator_address, f.num_processes, f.process_id, f.distributed)
    setup()


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
) -> None:
    """Joins a multi-process JAX run before any computation (nothing to do for one process).

    Raises:
      ValueError: a coordinator address without the process count and id, or the reverse.
    """
    given = (coordinator_address, num_processes, process_id)
    if all(v is None for v in given) and not auto:
        return
    if not auto:
        if any(v is None for v in given):
            raise ValueError(
                "a multi-process run needs --coordinator_address, --num_processes and "
                f"--process_id together (got {coordinator_address!r}, {num_processes!r}, "
                f"{process_id!r}); or --distributed for the platform's auto-detection"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id must be in [0, {num_processes}), got {process_id}")
    import jax

    # XLA:CPU's cross-process collectives (harmless on GPU/TPU, whose own are used there).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)


def setup() -> None:
    """Makes ``kill`` (SIGTERM) save a checkpoint like Ctrl-C does, turns on JAX's persistent
    compilation cache (``$FEDINF_JAX_CACHE``, default ``xla`` in the user's cache folder,
    ``files.cache_dir``; ``none``
    disables it: a resumed or repeated run skips the minutes of XLA:CPU compilation a K-agent
    step can take), and keeps TensorFlow off any accelerator if it is already imported (the
    library imports it through ``tensorflow()`` only where it is used, so that a run refused for
    a bad setting never pays for its import).
    """
    if "tensorflow" in sys.modules:
        tensorflow()
    quiet_orbax()
    signal.signal(signal.SIGTERM, _interrupt)
    cache = os.environ.get(CACHE_ENV) or files.cache_dir("xla")
    if cache.lower() != "none":
        enable_compilation_cache(cache)


@functools.cache
def tensorflow():
    """TensorFlow (used only for TFDS and summaries), imported on first use and kept off any
    accelerator, so that JAX owns it. Called before any TensorFlow op runs: TFDS's readers and
    writers, clu's summary writer."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    return tf


def _interrupt(signum, frame):
    """SIGTERM (``kill``) takes the Ctrl-C path: the trainer saves the current step, then exits."""
    raise KeyboardInterrupt(f"signal {signum}")


def enable_compilation_cache(directory: str) -> None:
    """Caches every compiled XLA program that took over a second under ``directory``."""
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class _DropBelowWarning(logging.Filter):
    def __init__(self, package: str):
        super().__init__()
        self._marker = f"{os.sep}{package}{os.sep}"

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or self._marker not in record.pathname


def quiet_orbax() -> None:
    """Drops Orbax's per-save INFO lines (dozens per checkpoint) from the console log."""
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().addFilter(_DropBelowWarning("orbax"))


def code_version() -> str:
    """``git describe --always --dirty`` of the checkout this package runs from, or "unknown"
    outside a git checkout."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"
