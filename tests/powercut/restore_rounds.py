"""Power cuts during ``unisondb restore`` into a data dir on the power-cut filesystem.

The backup set (a snapshot, then more writes, then a WAL backup with rotation) is made
once by a real server on an ordinary directory; its ``/checkpoint`` at the end gives the
**planned** state: LSN and state fingerprint. A restore into the mount changes the
durable state only at its fsyncs, so ``calibrate()`` counts the syncs of one undisturbed
restore (S) and a round cuts power just before sync number ``n`` (1 <= n <= S), or after
the restore has ended (n = S + 1): together these are every state a power cut can leave.

Two scenarios: ``fresh`` (``<ns>`` absent: publish is ``renameat2(RENAME_NOREPLACE)``)
and ``replace`` (``<ns>`` holds an older state: ``RENAME_EXCHANGE``, then the old tree is
deleted). Every round starts from a copy of the scenario's template tree.

The checks after a cut (remounted on what survived):

* the restore ended with an ``error: ...`` line and an exit code from the error tree, or
  with 0 if it had finished before the cut — never a signal death or a traceback; a
  restore that exited 0 must find its result published after the cut;
* ``<ns>`` is either not published — absent (fresh) or the old state, i.e. a server
  starts on it and reports the old LSN and fingerprint and holds the old keys (replace) —
  or whole: a server starts on it, reports the planned LSN and fingerprint, and holds
  exactly the planned keys (the count, and every value read back);
* then a second, undisturbed restore succeeds, removes any ``.restore-<ns>-*`` staging
  debris the cut left, and the server on its result reports the planned state.
"""

from __future__ import annotations

import base64
import random
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from powercut_mount import PowerCutMount
from serverproc import ServerProcess, start_server

NS = "default"
REPO = Path(__file__).resolve().parents[2]
SCENARIOS = ("fresh", "replace")


@dataclass
class State:
    lsn: int
    fingerprint: str


@dataclass
class BackupSet:
    snapshot: Path
    wal_dir: Path
    planned: State
    keys: dict[str, str]  # key -> base64 value, at the planned state
    templates: dict[str, Path]  # scenario -> a tree holding data/ as a round starts
    old: State  # the replace scenario's existing namespace
    old_keys: dict[str, str]


def _checkpoint(srv: ServerProcess) -> State:
    with srv.client() as c:
        body = c.get(f"/api/v1/{NS}/checkpoint").json()
    return State(int(body["lsn"]), str(body["fingerprint"]))


def _put_many(srv: ServerProcess, rng: random.Random, keys: dict[str, str], n: int, space: int) -> None:
    with srv.client() as c:
        for _ in range(n):
            key = f"k{rng.randrange(space):04d}"
            if keys and rng.random() < 0.1:
                key = rng.choice(sorted(keys))
                assert c.delete(f"/api/v1/{NS}/kv/{key}").status_code == 200
                del keys[key]
                continue
            value = base64.b64encode(rng.randbytes(rng.randint(10, 300))).decode()
            assert c.put(f"/api/v1/{NS}/kv/{key}", json={"value": value}).status_code == 200
            keys[key] = value


def make_backup_set(root: Path, seed: int) -> BackupSet:
    """Snapshot + WAL backup from a real server, and the two scenarios' start trees."""
    rng = random.Random(seed)
    logs = root / "logs"
    logs.mkdir(parents=True)
    keys: dict[str, str] = {}
    src = start_server(
        root / "src" / "data", (NS,), ["--wal-segment-size", "16KiB"], log_path=logs / "src.log"
    )
    try:
        _put_many(src, rng, keys, 300, 400)
        with src.client() as c:
            r = c.post(f"/api/v1/{NS}/btree/backup", json={"path": "s.db"})
            assert r.status_code == 200, r.text
            snapshot = Path(r.json()["path"])
        _put_many(src, rng, keys, 400, 400)  # several 16 KiB segments after the snapshot
        with src.client() as c:
            r = c.post(f"/api/v1/{NS}/wal/backup", json={"backupDir": "w", "rotate": True})
            assert r.status_code == 200, r.text
        planned = _checkpoint(src)
    finally:
        assert src.stop() == 0, src.log()[-2000:]
    fresh = root / "tmpl-fresh"
    (fresh / "data").mkdir(parents=True)
    replace = root / "tmpl-replace"
    old = start_server(replace / "data", (NS,), log_path=logs / "old.log")
    old_keys: dict[str, str] = {}
    try:
        _put_many(old, random.Random(seed + 1), old_keys, 30, 50)
        old_state = _checkpoint(old)
    finally:
        assert old.stop() == 0, old.log()[-2000:]
    assert old_state.fingerprint != planned.fingerprint
    return BackupSet(
        snapshot,
        snapshot.parent / "w",
        planned,
        keys,
        {"fresh": fresh, "replace": replace},
        old_state,
        old_keys,
    )


@dataclass
class RestoreRounds:
    fs: PowerCutMount
    bs: BackupSet
    scenario: str
    logs: Path
    servers: list[ServerProcess]
    lines: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def data_dir(self) -> Path:
        return self.fs.mountpoint / "data"

    def restore_cmd(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "unisondb",
            "restore",
            "--data-dir",
            str(self.data_dir),
            "--namespace",
            NS,
            "--snapshot",
            str(self.bs.snapshot),
            "--wal",
            str(self.bs.wal_dir),
            "--force",
        ]

    def _restore(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.restore_cmd(), capture_output=True, text=True, cwd=REPO, timeout=300, check=False
        )

    def _mount_template(self) -> None:
        """Mount a fresh generation on a copy of the scenario's start tree."""
        start = self.fs.workdir / f"start{self.fs.generation + 1}"
        shutil.copytree(self.bs.templates[self.scenario], start, symlinks=True)
        self.fs.image = start
        self.fs.mount()
        self.fs.remove_old_generations()

    def _start(self, tag: str) -> ServerProcess | str:
        try:
            srv = start_server(self.data_dir, (NS,), log_path=self.logs / f"{tag}.log")
        except RuntimeError as exc:
            return f"server did not start: {str(exc)[-1500:]}"
        self.servers.append(srv)
        return srv

    def _staging(self) -> list[str]:
        return sorted(p.name for p in self.data_dir.glob(f".restore-{NS}-*"))

    def _check_state(self, srv: ServerProcess, want: State, keys: dict[str, str], where: str) -> list[str]:
        """The server reports ``want`` and holds exactly ``keys`` (count and every value)."""
        got = _checkpoint(srv)
        if (got.lsn, got.fingerprint) != (want.lsn, want.fingerprint):
            return [
                f"{where}: state is lsn {got.lsn} fingerprint {got.fingerprint[:16]}, expected "
                f"lsn {want.lsn} fingerprint {want.fingerprint[:16]}"
            ]
        with srv.client() as c:
            count = c.get(f"/api/v1/{NS}/stats").json()["keys"]
            if count != len(keys):
                return [f"{where}: {count} keys, expected {len(keys)}"]
            for key, value in keys.items():
                body = c.get(f"/api/v1/{NS}/kv/{key}").json()
                if body.get("value") != value:
                    return [f"{where}: key {key} does not hold its expected value"]
        return []

    def _check_planned(self, srv: ServerProcess, where: str) -> list[str]:
        return self._check_state(srv, self.bs.planned, self.bs.keys, where)

    def calibrate(self) -> int:
        """Syncs of one undisturbed restore on the mount (also: it must succeed there)."""
        self._mount_template()
        before = self.fs.stats()
        proc = self._restore()
        after = self.fs.stats()
        self.fs.cut()
        self.fs.unmount()
        assert proc.returncode == 0, f"undisturbed restore on the power-cut filesystem failed:\n{proc.stderr}"
        return int(after["fsync"] + after["fsyncdir"] - before["fsync"] - before["fsyncdir"])

    def round(self, n: int, total: int) -> list[str]:
        """Cut before sync ``n`` of the restore (``n > total``: after it ended); check."""
        where = f"{self.scenario} cut at sync {n}/{total}"
        self._mount_template()
        if n <= total:
            self.fs.cut_at_sync(n)
        proc = self._restore()
        fired = self.fs.cut_if_not_yet()
        self.fs.unmount()
        problems: list[str] = []
        err = proc.stderr.strip()
        if proc.returncode < 0:
            problems.append(f"{where}: restore died of signal {signal.Signals(-proc.returncode).name}")
        elif "Traceback" in proc.stderr:
            problems.append(f"{where}: restore printed a traceback:\n{err[-1500:]}")
        elif fired and proc.returncode == 0:
            problems.append(f"{where}: the cut fired, yet restore exited 0")
        elif fired and not any(ln.startswith("error: ") for ln in err.splitlines()):
            problems.append(f"{where}: restore failed without an 'error: ...' line: {err[-500:]}")
        elif not fired and proc.returncode != 0:
            problems.append(f"{where}: restore failed without a cut (exit {proc.returncode}): {err[-500:]}")
        self.fs.mount()
        try:
            problems += self._check_after_cut(where, finished=not fired and proc.returncode == 0)
        finally:
            for srv in self.servers:
                srv.kill9()
            self.fs.unmount()
        return problems

    def _check_after_cut(self, where: str, *, finished: bool) -> list[str]:
        """``finished``: the restore exited 0 before the cut, so its result must have survived."""
        problems: list[str] = []
        debris = self._staging()
        ns_dir = self.data_dir / NS
        if not ns_dir.exists():
            outcome = "absent"
            if self.scenario == "replace":
                problems.append(f"{where}: the existing namespace vanished")
        else:
            srv = self._start(f"after-{self.fs.generation}")
            if isinstance(srv, str):
                return [f"{where}: {srv}"]
            got = _checkpoint(srv)
            if self.scenario == "replace" and got.fingerprint == self.bs.old.fingerprint:
                outcome = "old"
                problems += self._check_state(srv, self.bs.old, self.bs.old_keys, where)
            else:
                outcome = "published"
                problems += self._check_planned(srv, where)
            if srv.stop() != 0:
                problems.append(f"{where}: server on what survived did not stop cleanly")
        if finished and outcome != "published":
            problems.append(f"{where}: restore exited 0, yet after the cut the namespace is {outcome}")
        self.outcomes[outcome] += 1
        if debris:
            self.outcomes["staging debris"] += 1
        # The next restore must clean up whatever the cut left and publish the planned state.
        proc = self._restore()
        if proc.returncode != 0:
            problems.append(
                f"{where}: the next restore failed (exit {proc.returncode}): {proc.stderr[-800:]}"
            )
            return problems
        left = self._staging()
        if left:
            problems.append(f"{where}: staging debris left after the next restore: {left}")
        srv = self._start(f"rerun-{self.fs.generation}")
        if isinstance(srv, str):
            return [*problems, f"{where}, after the next restore: {srv}"]
        problems += self._check_planned(srv, f"{where}, after the next restore")
        srv.stop()
        self.lines.append(f"{where}: {outcome}{' + staging debris' if debris else ''}")
        return problems
