"""Process set-up shared by the entry points."""

from __future__ import annotations

import logging
import os
import signal

CACHE_ENV = "FEDINF_JAX_CACHE"


def setup() -> None:
    """Keeps TensorFlow (used only for TFDS and summaries) off any accelerator, so JAX owns it,
    makes ``kill`` (SIGTERM) save a checkpoint like Ctrl-C does, and turns on JAX's persistent
    compilation cache (``$FEDINF_JAX_CACHE``, default ``~/.cache/fedinf_jax/xla``; ``none``
    disables it): a resumed or repeated run skips the minutes of XLA:CPU compilation a K-agent
    step can take.
    """
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    quiet_orbax()
    signal.signal(signal.SIGTERM, _interrupt)
    cache = os.environ.get(CACHE_ENV, os.path.expanduser("~/.cache/fedinf_jax/xla"))
    if cache.lower() != "none":
        enable_compilation_cache(cache)


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
