"""Agents sharded over devices: the checks of tests/multidevice_checks.py, run on 4 virtual CPU
devices in a subprocess (this process has one device)."""

import re

from tests.conftest import MULTIDEVICE_COUNT


def test_sharded_agents_equal_one_device(multidevice_run):
    """Sharded training steps (K = 4, and 6 padded to 8), Orbax checkpoints restored onto another
    mesh, sharded sampling, the compiled program's collectives and the mesh errors: all pass on
    the virtual devices, none skipped."""
    summary = multidevice_run.strip().splitlines()[-1]
    assert re.fullmatch(r"=* ?\d+ passed(, \d+ warnings?)? in [\d.]+s.*", summary), summary
    assert f"needs {MULTIDEVICE_COUNT} devices" not in multidevice_run
