"""Mount, cut and unmount the power-cut filesystem (``lazyfs.py``) from a test.

``PowerCutMount(workdir)`` owns one mount point. ``mount()`` starts a filesystem
process on an empty tree or on the image the last ``cut()`` left; ``cut()`` loses
every change not made durable and returns that image (``cut_at_sync(n)`` arms the same cut
at the n-th sync to come); ``unmount()`` lazily unmounts
and ends the filesystem process (by its PID). Each generation keeps its own
``live``/``state`` directories so a failure can be looked at afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LAZYFS = Path(__file__).with_name("lazyfs.py")
CONTROL = ".powercut"

#: Words in a failed mount's output that mean this machine forbids FUSE mounts.
_NOT_PERMITTED = (
    "Operation not permitted",
    "Permission denied",
    "fuse: device not found",
    "No such device",
    "fusermount3: not found",
    "failed to exec fusermount3",
)


class MountNotPermitted(RuntimeError):
    """FUSE cannot be mounted here (no /dev/fuse access, no mount privilege)."""


class PowerCutMount:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.mountpoint = workdir / "mnt"
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.generation = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.image: Path | None = None  # what the last cut left (None: nothing yet)

    @property
    def log_path(self) -> Path:
        return self.workdir / f"gen{self.generation}" / "fs.log"

    def mount(self, timeout: float = 20.0) -> Path:
        """Mount on what the last cut left (or an empty tree); return the mount point."""
        assert self.proc is None, "already mounted"
        self.generation += 1
        gen = self.workdir / f"gen{self.generation}"
        gen.mkdir()
        live, state = gen / "live", gen / "state"
        state.mkdir()
        if self.image is None:
            live.mkdir()
        else:
            os.rename(self.image, live)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(LAZYFS),
                "--backing",
                str(live),
                "--state",
                str(state),
                "--image",
                str(gen / "image"),
                str(self.mountpoint),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self.is_mounted():
            if self.proc.poll() is not None:
                out = self.log_path.read_text(errors="replace")
                self.proc = None
                if any(w in out for w in _NOT_PERMITTED):
                    raise MountNotPermitted(out.strip().splitlines()[-1] if out.strip() else "mount failed")
                raise RuntimeError(f"powercut filesystem exited while mounting:\n{out}")
            if time.monotonic() > deadline:
                self.unmount()
                raise RuntimeError(f"powercut filesystem not mounted after {timeout}s")
            time.sleep(0.02)
        return self.mountpoint

    def stats(self) -> dict[str, Any]:
        report: dict[str, Any] = json.loads((self.mountpoint / CONTROL).read_bytes())
        return report

    def sync_all(self) -> None:
        """Make everything durable now (the kernel's write-back after a quiet spell)."""
        with open(self.mountpoint / CONTROL, "wb", buffering=0) as f:
            f.write(b"sync")

    def cut(self) -> Path:
        """Power cut: forget every non-durable change now; later operations fail with EIO."""
        with open(self.mountpoint / CONTROL, "wb", buffering=0) as f:
            f.write(b"cut")
        self.image = self.workdir / f"gen{self.generation}" / "image"
        return self.image

    def cut_at_sync(self, n: int) -> None:
        """Arm a cut just before the ``n``-th fsync/fdatasync/directory fsync from now."""
        with open(self.mountpoint / CONTROL, "wb", buffering=0) as f:
            f.write(b"cut-at-sync %d" % n)

    def hold_write(self, start: int, end: int) -> None:
        """Hold the next write that overlaps bytes [start, end) of any file, before the
        filesystem handles it, until ``release()``: the writer's system call is then in
        flight, its data already in the kernel's page cache (a seam for races)."""
        self._control(b"hold-write %d %d" % (start, end))

    def wait_held(self, timeout: float = 10.0) -> None:
        """Return once the write ``hold_write`` armed is being held."""
        deadline = time.monotonic() + timeout
        while not self.stats()["held"]:
            if time.monotonic() > deadline:
                raise AssertionError(f"no write was held within {timeout}s")
            time.sleep(0.005)

    def release(self) -> None:
        """Let a held write go on (and disarm ``hold_write``)."""
        self._control(b"release")

    def _control(self, command: bytes) -> None:
        with open(self.mountpoint / CONTROL, "wb", buffering=0) as f:
            f.write(command)

    def cut_if_not_yet(self) -> bool:
        """After an armed cut: take its image, or cut now if it did not fire; True if it fired."""
        fired = bool(self.stats()["frozen"])
        if fired:
            self.image = self.workdir / f"gen{self.generation}" / "image"
        else:
            self.cut()
        return fired

    def unmount(self, timeout: float = 10.0) -> None:
        """Lazy unmount, then wait for (or end) our filesystem process. Safe to repeat."""
        if self.is_mounted():
            subprocess.run(
                ["fusermount3", "-u", "-z", str(self.mountpoint)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def is_mounted(self) -> bool:
        # Not os.path.ismount: after a cut even stat() of the root fails with EIO.
        target = os.fsencode(self.mountpoint).replace(b" ", b"\\040")
        with open("/proc/self/mounts", "rb") as f:
            return any(line.split()[1] == target for line in f)

    def remove_old_generations(self) -> None:
        """Free the disk space of finished generations, keeping the current and the last."""
        for gen in range(1, self.generation - 1):
            shutil.rmtree(self.workdir / f"gen{gen}", ignore_errors=True)
