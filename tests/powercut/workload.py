"""Power-cut rounds against a real server whose ``--data-dir`` is on the power-cut filesystem.

One **round**: mount (on what the previous cut left), start ``python -m unisondb``,
check everything earlier rounds had acknowledged, run concurrent PUT load (plus, per
workload, WAL backups with rotation or snapshots in a loop), cut power once a seeded
random number of writes has been acknowledged, SIGKILL the server, unmount. After the
last round the server is started once more and checked.

The checks after a cut:

* every acknowledged PUT is present with its acknowledged value;
* each writer's counter key holds a version between its last acknowledged one and the
  last one it sent (an acknowledged overwrite is never undone);
* every acknowledged backup (WAL segment or snapshot) exists with its ``.sha256``;
* every published backup file (final name and ``.sha256`` sidecar both present) passes
  ``sha256sum -c``; a sidecar without its file is a problem too.

The cut point is a count of acknowledged writes, not a delay, so a seed picks it.

The server runs with its defaults unless ``extra_args`` say otherwise: ``--ack wal`` (a
write is answered at its WAL fsync, LMDB follows) and WAL preallocation (segments
zero-filled ahead of the writer). Before each start the newest segment of what survived
is scanned: ``zero_tails`` counts the cuts that left zero-filled space after the last
record, which recovery must take for the clean end of the log.
"""

from __future__ import annotations

import base64
import random
import re
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from powercut_mount import PowerCutMount
from serverproc import ServerProcess, start_server

from unisondb.storage import segment

NS = "default"
WRITERS = 4
SEGMENT_SIZE = "16KiB"  # small: rotations happen every few dozen writes
CHECK_OLD_KEYS = 200  # keys of earlier rounds re-read per check


@dataclass
class Model:
    """Everything acknowledged so far, over all rounds."""

    acked: dict[str, str] = field(default_factory=dict)  # key -> base64 value
    new_keys: list[str] = field(default_factory=list)  # acknowledged since the last check
    counter_acked: dict[str, int] = field(default_factory=dict)
    counter_sent: dict[str, int] = field(default_factory=dict)
    backups: set[str] = field(default_factory=set)  # acknowledged, relative to backups/<ns>/
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class RoundResult:
    acked: int = 0
    backups_acked: int = 0
    problems: list[str] = field(default_factory=list)
    summary: str = ""


class Rounds:
    """Runs power-cut rounds of one workload ("put", "wal-backup" or "snapshot")."""

    def __init__(
        self,
        fs: PowerCutMount,
        servers: list[ServerProcess],
        logs: Path,
        workload: str,
        seed: int,
        *,
        sync_first_start: bool = True,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.sync_first_start = sync_first_start
        self.extra_args = list(extra_args)
        #: Cuts after which the newest segment ended in zero-filled (preallocated) space,
        #: and starts whose recovery replayed WAL records LMDB had lost or never had.
        self.zero_tails = 0
        self.replays = 0
        self.fs, self.servers, self.logs = fs, servers, logs
        self.workload = workload
        self.rng = random.Random(seed)
        self.model = Model()
        self.round = 0
        self.lines: list[str] = []
        self.cut_mid_backup = False
        self.in_backup = threading.Event()
        self.after_cut = threading.Event()
        self.verified = 0  # published backup files that passed sha256sum -c, over all checks
        logs.mkdir(parents=True, exist_ok=True)

    @property
    def data_dir(self) -> Path:
        return self.fs.mountpoint / "data"

    @property
    def backup_root(self) -> Path:
        return self.data_dir / "backups" / NS

    def start(self) -> ServerProcess | str:
        """Start the server on the mount; a server that does not come up is a finding."""
        n = len(self.servers)
        try:
            srv = start_server(
                self.data_dir,
                (NS,),
                ["--wal-segment-size", SEGMENT_SIZE, *self.extra_args],
                log_path=self.logs / f"server-{n}.log",
            )
        except RuntimeError as exc:
            return f"server did not start on what survived: {str(exc)[-1500:]}"
        self.servers.append(srv)
        return srv

    # --- load ---

    def _writer(
        self,
        srv: ServerProcess,
        t: int,
        stop: threading.Event,
        acked_now: list[int],
        target: int,
        reached: threading.Event,
    ) -> None:
        rng = random.Random(self.rng.random() + t)
        m = self.model
        counter = f"counter-{t}"
        with srv.client(timeout=10.0) as c:
            i = 0
            while not stop.is_set():
                i += 1
                if i % 4 == 0:
                    with m.lock:
                        version = m.counter_sent.get(counter, 0) + 1
                        m.counter_sent[counter] = version
                    key, value = counter, base64.b64encode(str(version).encode()).decode()
                else:
                    key = f"r{self.round}-w{t}-{i}"
                    value = base64.b64encode(rng.randbytes(rng.randint(20, 400))).decode()
                try:
                    r = c.put(f"/api/v1/{NS}/kv/{key}", json={"value": value})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if not ok:
                    if self.after_cut.is_set():
                        return  # every answer sent before this failure has been read
                    continue
                with m.lock:
                    if key == counter:
                        m.counter_acked[counter] = max(m.counter_acked.get(counter, 0), version)
                    else:
                        m.acked[key] = value
                        m.new_keys.append(key)
                    acked_now[0] += 1
                    if acked_now[0] >= target and (not self.cut_mid_backup or self.in_backup.is_set()):
                        reached.set()

    def _backups(self, srv: ServerProcess, stop: threading.Event, counts: list[int]) -> None:
        root = str(self.backup_root.resolve())
        with srv.client(timeout=30.0) as c:
            n = 0
            while not stop.is_set():
                n += 1
                self.in_backup.set()
                try:
                    if self.workload == "wal-backup":
                        r = c.post(f"/api/v1/{NS}/wal/backup", json={"backupDir": "w", "rotate": True})
                        ok = r.status_code == 200
                        paths = [b["path"] for b in r.json().get("backups", [])] if ok else []
                    else:
                        r = c.post(f"/api/v1/{NS}/btree/backup", json={"path": f"s{self.round}-{n}.db"})
                        ok = r.status_code == 200
                        paths = [r.json()["path"]] if ok else []
                except (httpx.HTTPError, ValueError):
                    paths, ok = [], False
                finally:
                    self.in_backup.clear()
                if not ok and self.after_cut.is_set():
                    return
                with self.model.lock:
                    for p in paths:
                        assert p.startswith(root + "/"), p
                        self.model.backups.add(p[len(root) + 1 :])
                    counts[0] += len(paths)

    def load_and_cut(self, srv: ServerProcess) -> RoundResult:
        target = self.rng.randint(5, 150 if self.workload == "put" else 400)
        # Half the backup rounds cut while a backup request is being served.
        self.cut_mid_backup = self.workload != "put" and self.rng.random() < 0.5
        self.in_backup, self.after_cut = threading.Event(), threading.Event()
        stop, reached = threading.Event(), threading.Event()
        acked_now, backups_now = [0], [0]
        threads = [
            threading.Thread(target=self._writer, args=(srv, t, stop, acked_now, target, reached))
            for t in range(WRITERS)
        ]
        if self.workload != "put":
            threads.append(threading.Thread(target=self._backups, args=(srv, stop, backups_now)))
        for th in threads:
            th.start()
        try:
            if not reached.wait(timeout=60):
                raise AssertionError(
                    f"round {self.round}: {acked_now[0]} of {target} writes "
                    f"acknowledged in 60 s\n{srv.log()[-2000:]}"
                )
            self.fs.cut()
            # Writes fail from now on. Each client stops at its first failure, so every
            # answer the server sent before dying has been read: the acknowledged set is whole.
            self.after_cut.set()
            for th in threads:
                th.join(timeout=30)
        finally:
            srv.kill9()  # by PID
            stop.set()
            for th in threads:
                th.join()
        return RoundResult(acked=acked_now[0], backups_acked=backups_now[0])

    # --- checks ---

    def check(self, srv: ServerProcess) -> list[str]:
        m, problems = self.model, []
        fresh = set(m.new_keys)
        old = [k for k in m.acked if k not in fresh]
        keys = m.new_keys + self.rng.sample(old, min(CHECK_OLD_KEYS, len(old)))
        with srv.client() as c:
            metric = rf'^unisondb_recovery_records_replayed{{namespace="{NS}"}} (\S+)$'
            replayed = re.search(metric, c.get("/metrics").text, re.M)
            self.replays += bool(replayed and float(replayed.group(1)) > 0)
            for key in keys:
                r = c.get(f"/api/v1/{NS}/kv/{key}")
                body = r.json()
                if r.status_code != 200 or not body.get("found"):
                    problems.append(f"lost acknowledged write: {key} ({r.status_code} {body})")
                elif body["value"] != m.acked[key]:
                    problems.append(f"acknowledged write {key} has another value")
            for counter, sent in m.counter_sent.items():
                body = c.get(f"/api/v1/{NS}/kv/{counter}").json()
                got = int(base64.b64decode(body["value"])) if body.get("found") else 0
                if not m.counter_acked.get(counter, 0) <= got <= sent:
                    problems.append(
                        f"lost acknowledged write: {counter} holds version {got}, "
                        f"acknowledged {m.counter_acked.get(counter, 0)}, sent {sent}"
                    )
        m.new_keys.clear()
        problems += self.check_backups()
        return problems

    def check_backups(self) -> list[str]:
        problems = []
        root = self.backup_root
        for rel in sorted(self.model.backups):
            p = root / rel
            if not p.is_file() or not p.with_name(p.name + ".sha256").is_file():
                problems.append(f"acknowledged backup {rel} is missing or has no .sha256")
        if not root.is_dir():
            return problems
        for sidecar in sorted(root.rglob("*.sha256")):
            target = sidecar.with_name(sidecar.name[: -len(".sha256")])
            if not target.is_file():
                problems.append(f"{sidecar.relative_to(root)} has no file beside it")
                continue
            res = subprocess.run(
                ["sha256sum", "--quiet", "-c", sidecar.name],
                cwd=sidecar.parent,
                capture_output=True,
                text=True,
                check=False,
            )
            self.verified += res.returncode == 0
            if res.returncode != 0:
                problems.append(
                    f"published backup {target.relative_to(root)} fails sha256sum -c: "
                    f"{(res.stdout + res.stderr).strip()}"
                )
        return problems

    # --- rounds ---

    def zero_tail(self) -> int:
        """Bytes of zeros after the last record of the newest segment on the mount (0: none)."""
        wal_dir = self.data_dir / NS / "wal"
        if not wal_dir.is_dir():
            return 0
        files = list(segment.iter_segment_files(wal_dir))
        if not files:
            return 0
        scan = segment.scan(files[-1][1])
        return 0 if scan.sealed or scan.tail_error is not None else scan.file_size - scan.data_end

    def run(self, rounds: int, *, stop_at_first_problem: bool = False) -> list[str]:
        """Run ``rounds`` cuts and a final check; return every problem found (empty: none)."""
        problems: list[str] = []
        for self.round in range(1, rounds + 1):
            if self.fs.proc is None:
                self.fs.mount()
            self.fs.remove_old_generations()  # the soak would otherwise keep a copy per cut
            if self.round > 1 and self.zero_tail():
                self.zero_tails += 1
            srv = self.start()
            if isinstance(srv, str):
                # A server that cannot start on what the cut left is a problem found; the
                # mount stays up for the final start below (or goes now, when stopping).
                problems.append(f"round {self.round}: {srv}")
                if stop_at_first_problem:
                    self.fs.unmount()
                    return problems
                break
            if self.round == 1 and self.sync_first_start:
                # The first start creates the namespace's directories; a kernel would write
                # them back within half a minute. (That they are never fsynced is pinned
                # separately, see test_powercut_server.py.)
                self.fs.sync_all()
            elif self.round > 1:
                found = self.check(srv)
                problems += [f"after round {self.round - 1}: {p}" for p in found]
                if found and stop_at_first_problem:
                    srv.kill9()
                    self.fs.unmount()
                    return problems
            res = self.load_and_cut(srv)
            stats = self.fs.stats()
            self.fs.unmount()
            self.lines.append(
                f"round {self.round} [{self.workload}]: cut after {res.acked} acknowledged writes, "
                f"{res.backups_acked} acknowledged backups"
                f"{' (cut mid-backup)' if self.cut_mid_backup else ''}; {stats['fsync']} file and "
                f"{stats['fsyncdir']} directory syncs this mount"
            )
        if self.fs.proc is None:
            self.fs.mount()
        if self.zero_tail():
            self.zero_tails += 1
        srv = self.start()
        if isinstance(srv, str):
            problems.append(f"final start: {srv}")
        else:
            problems += [f"after round {self.round}: {p}" for p in self.check(srv)]
            srv.stop()
        self.lines.append(
            f"{len(self.model.acked)} acknowledged writes checked, "
            f"{self.verified} published backup files passed sha256sum -c, "
            f"{self.zero_tails} of {self.round} cuts left zero-filled space after the last record, "
            f"{self.replays} restarts replayed records LMDB did not hold"
        )
        self.fs.unmount()
        return problems
