"""Fixtures for the power-cut tests: a mounted ``lazyfs`` and servers started on it.

The tests skip (with the reason) only when this machine cannot mount FUSE at all:
no ``/dev/fuse`` or a mount that is not permitted. A missing ``mfusepy``/libfuse3 or
``fusermount3`` is an install error and fails loudly (``scripts/test`` installs them).
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from powercut_mount import MountNotPermitted, PowerCutMount
from serverproc import ServerProcess


def _require_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("power-cut tests need FUSE: /dev/fuse is absent on this machine")
    if shutil.which("fusermount3") is None:
        pytest.fail("fusermount3 not found: install Debian's fuse3 (scripts/test does)")


@pytest.fixture
def pcfs(tmp_path: Path) -> Iterator[PowerCutMount]:
    """A ``PowerCutMount`` under tmp_path, unmounted at teardown even if the test failed."""
    _require_fuse()
    fs = PowerCutMount(tmp_path / "powercut")
    try:
        fs.mount()
    except MountNotPermitted as exc:
        pytest.skip(f"power-cut tests need a FUSE mount, which is not permitted here: {exc}")
    try:
        yield fs
    finally:
        fs.unmount()


@pytest.fixture
def servers(pcfs: PowerCutMount) -> Iterator[list[ServerProcess]]:
    """Servers a test started; SIGKILLed by PID at teardown, before the mount goes away."""
    started: list[ServerProcess] = []
    yield started
    for srv in started:
        srv.stop(signal.SIGKILL)
