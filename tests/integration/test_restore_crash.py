"""``kill -9`` of ``unisondb restore`` leaves the old namespace or the complete new one.

Two tests:

* at every step boundary of the publication protocol (deterministic: a hook in
  ``restore.apply`` SIGKILLs the process there), and
* at random delays while a restore of ~20k records runs as a real ``unisondb restore``
  subprocess (12 rounds).

After each kill: the namespace is byte-identical to the old tree or holds exactly the new
state (compared with both models), a server engine opens on it, and a rerun succeeds and
leaves no ``.restore-*`` directory behind.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_restore_support import (
    NS,
    REPO,
    UNISONDB,
    History,
    read_checkpoint,
    read_keyspace,
    tree_digest,
)

from unisondb.restore import restore
from unisondb.restore.apply import staging_dirs
from unisondb.storage.engine import Engine
from unisondb.storage.record import Entry, EntryKind

OLD_LSN = 1500
KILLER = """
import os, signal, sys
from unisondb.restore import apply
point = sys.argv[1]
def hook(name):
    if name == point:
        os.kill(os.getpid(), signal.SIGKILL)
apply.crash_hook = hook
from unisondb.cli import main
sys.exit(main(sys.argv[2:]))
"""
STEPS = ["locked", "staging-created", "snapshot-copied", "replayed", "synced", "exchanged", "published"]


class Setup:
    def __init__(self, root: Path) -> None:
        h = History(root / "src", segment_size=1 << 20, keys=1500, value_size=48)
        h.open()
        self._burst(h, 1000)
        self.snap, _cp = h.snapshot("s.db")
        for _ in range(5):
            self._burst(h, 4000)
        self.wal = h.backup_wal("wal/a")
        h.close()
        self.history = h
        self.new_lsn = h.last_lsn
        self.new_state = h.state_at(self.new_lsn)
        # The "old" namespace: a restore to an earlier LSN, kept as a template.
        self.template = root / "template"
        restore(self.template, NS, self.snap, [self.wal], target_lsn=OLD_LSN)
        self.old_state = h.state_at(OLD_LSN)
        self.old_digest = tree_digest(self.template / NS)

    @staticmethod
    def _burst(h: History, n: int) -> None:
        futures = []
        for _ in range(n):
            entries = (
                Entry(EntryKind.PUT, b"key-%05d" % h.rng.randrange(1500), os.urandom(24).hex().encode()),
            )
            futures.append((h.eng.submit(entries), entries))
        for fut, entries in futures:
            h.ops[fut.result()] = entries

    def fresh_target(self, root: Path) -> Path:
        data = root / "data"
        if data.exists():
            shutil.rmtree(data)
        shutil.copytree(self.template, data)
        return data

    def args(self, data: Path) -> list[str]:
        return [
            "restore",
            "--data-dir",
            str(data),
            "--namespace",
            NS,
            "--snapshot",
            str(self.snap),
            "--wal",
            str(self.wal),
            "--force",
        ]

    def check_old_or_new(self, data: Path) -> str:
        """Which state the namespace is in; fails on anything else."""
        if tree_digest(data / NS) == self.old_digest:
            state = "old"
        else:
            assert read_keyspace(data) == self.new_state, "neither the old nor the new state"
            cp = read_checkpoint(data)
            # Timeline 3: the template (a restore itself) already uses timeline 2.
            assert (cp.applied_lsn, cp.timeline) == (self.new_lsn, 3)
            state = "new"
        eng = Engine.open(data, NS, self.history.config)  # what the server does on start
        try:
            expected = self.old_state if state == "old" else self.new_state
            assert dict(eng.btree.items()) == expected
        finally:
            eng.close()
        return state

    def rerun_succeeds(self, data: Path) -> None:
        proc = subprocess.run(
            [*UNISONDB, *self.args(data)], capture_output=True, text=True, cwd=REPO, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        assert read_keyspace(data) == self.new_state
        assert staging_dirs(data, NS) == []


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(tmp_path_factory.mktemp("crash"))


@pytest.mark.parametrize("step", STEPS)
def test_kill_at_every_step(setup: Setup, tmp_path: Path, step: str) -> None:
    data = setup.fresh_target(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, step, *setup.args(data)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    state = setup.check_old_or_new(data)
    assert state == ("new" if STEPS.index(step) >= STEPS.index("exchanged") else "old")
    if step in ("staging-created", "snapshot-copied", "replayed", "synced", "exchanged"):
        assert len(staging_dirs(data, NS)) == 1  # cleaned by the next run
    setup.rerun_succeeds(data)


def test_kill_when_the_namespace_did_not_exist(setup: Setup, tmp_path: Path) -> None:
    data = tmp_path / "empty"
    for step in ("synced", "renamed"):
        proc = subprocess.run(
            [sys.executable, "-c", KILLER, step, *setup.args(data)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        if step == "synced":
            assert not (data / NS).exists()
        else:
            assert read_keyspace(data) == setup.new_state
    shutil.rmtree(data / NS)
    setup.rerun_succeeds(data)


def test_kill_at_random_points(setup: Setup, tmp_path: Path) -> None:
    rng = random.Random(20250108)
    # How long an undisturbed run takes, to spread the kills over all of it.
    data = setup.fresh_target(tmp_path)
    started = time.monotonic()
    setup.rerun_succeeds(data)
    duration = time.monotonic() - started
    seen = {"old": 0, "new": 0}
    for _round in range(12):
        data = setup.fresh_target(tmp_path)
        proc = subprocess.Popen(
            [*UNISONDB, *setup.args(data)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(0.05, duration * 1.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen[setup.check_old_or_new(data)] += 1
        setup.rerun_succeeds(data)
    print("kill outcomes", seen, "undisturbed run", round(duration, 2))
    assert seen["old"] > 0, seen  # the kills really hit a restore in progress
