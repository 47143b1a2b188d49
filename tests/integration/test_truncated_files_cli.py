"""No command dies of a signal on a cut, zeroed, garbage or compressed file (issue 8, item 4).

Every file kind below (a snapshot cut at 0, 1, 4095, 4096, 8191, 8192 bytes, at half and
at size-1; zero-filled; seeded random garbage; a gzip or zstd file holding a snapshot cut
at half, which restore/verify/list decompress and then refuse) goes through every command an
operator runs on it, as a real process of the installed ``unisondb`` CLI:

* the server started on it by the document's manual procedure (``<ns>/db/data.mdb``; a
  compressed file there is named as such, the server does not decompress);
* ``restore --dry-run``, ``restore --force`` over an existing namespace, ``backup verify``
  and ``backup list``;

and a WAL segment cut at the same lengths goes through ``wal list``, ``wal inspect`` and
``restore --wal``. Each must end with a clear one-line error naming the file (``backup
list``/``wal list`` report it in their listing), exit with the error tree's code (never a
signal: ``returncode >= 0`` and not ``128 + n``), and leave nothing behind: no lock file
next to the data.mdb, the existing namespace byte-for-byte as it was.

``test_the_hazard_is_real`` shows that the files used here do kill a process that maps
them without the check, so these tests would catch the check going missing.
"""

from __future__ import annotations

import gzip
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from serverproc import free_port
from test_restore_support import NS, REPO, History, tree_digest

_CLI = Path(sys.executable).with_name("unisondb")
UNISONDB = [str(_CLI)] if _CLI.exists() else [sys.executable, "-m", "unisondb"]
KINDS = [
    "cut0",
    "cut1",
    "cut4095",
    "cut4096",
    "cut8191",
    "cut8192",
    "half",
    "size-1",
    "zeros",
    "garbage",
    "gzip",
    "zstd",
]


def run(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*UNISONDB, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def assert_no_signal(proc: subprocess.CompletedProcess[str]) -> None:
    """A clean exit: not killed (negative) and not a shell's 128+n report of a signal."""
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {proc.stderr}"
    assert proc.returncode < 128, proc


def error_line(proc: subprocess.CompletedProcess[str], path: Path) -> str:
    """The single ``error:`` line a failing command prints, naming ``path``."""
    assert_no_signal(proc)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, lines
    assert str(path) in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(snapshot at LSN 300 of a 400-LSN history, its WAL backup, a restored data dir)."""
    h = History(tmp_path_factory.mktemp("trunc"))
    h.open()
    h.write_random(300)
    snap, _ = h.snapshot("s.db")
    h.write_random(100)
    wal = h.backup_wal("wal/a")
    h.close()
    assert snap.stat().st_size > 16384, "the snapshot must be longer than every fixed cut"
    restored = h.root / "restored"
    proc = run("restore", "--data-dir", restored, "-n", NS, "--snapshot", snap, "--wal", wal)
    assert proc.returncode == 0, proc.stderr
    return snap, wal, restored


def make_kind(kind: str, snap: Path, dest_dir: Path) -> Path:
    data = snap.read_bytes()
    dest_dir.mkdir(parents=True, exist_ok=True)
    cuts = {"half": len(data) // 2, "size-1": len(data) - 1}
    if kind.startswith("cut") or kind in cuts:
        n = cuts.get(kind) or int(kind[3:])
        out = dest_dir / "s.db"
        out.write_bytes(data[:n])
    elif kind == "zeros":
        out = dest_dir / "s.db"
        out.write_bytes(bytes(len(data)))
    elif kind == "garbage":
        out = dest_dir / "s.db"
        out.write_bytes(random.Random(8).randbytes(len(data)))
    elif kind == "gzip":  # compressed inputs are read directly: compress a cut snapshot
        out = dest_dir / "s.db.gz"
        out.write_bytes(gzip.compress(data[: len(data) // 2]))
    else:
        if shutil.which("zstd") is None:
            pytest.skip("zstd CLI not installed (scripts/test installs it)")
        raw = dest_dir / "s.db"
        raw.write_bytes(data[: len(data) // 2])
        subprocess.run(["zstd", "-q", "--rm", str(raw)], check=True)
        out = dest_dir / "s.db.zst"
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_server_start_refuses_with_one_line(made: tuple[Path, Path, Path], tmp_path: Path, kind: str) -> None:
    snap, _wal, _restored = made
    src = make_kind(kind, snap, tmp_path / "src")
    db = tmp_path / "data" / NS / "db"
    db.mkdir(parents=True)
    shutil.copyfile(src, db / "data.mdb")  # the document's manual procedure
    before = (db / "data.mdb").read_bytes()
    proc = run("--data-dir", tmp_path / "data", "--namespace", NS, "--http-addr", f"127.0.0.1:{free_port()}")
    line = error_line(proc, db / "data.mdb")
    assert proc.returncode == 6, proc
    assert "B-tree file" in line and "(hint: " in line, line
    assert sorted(p.name for p in db.iterdir()) == ["data.mdb"]  # LMDB never opened it
    assert (db / "data.mdb").read_bytes() == before
    assert not any((tmp_path / "data" / NS / "wal").glob("*.wal"))


@pytest.mark.parametrize("kind", KINDS)
def test_offline_commands_refuse(made: tuple[Path, Path, Path], tmp_path: Path, kind: str) -> None:
    snap, wal, restored = made
    bad = make_kind(kind, snap, tmp_path / "backups" / "snapshots")
    compressed = kind in ("gzip", "zstd")

    # restore --dry-run into a data dir that does not exist: an error, nothing created
    target = tmp_path / "new"
    proc = run("restore", "--data-dir", target, "-n", NS, "--snapshot", bad, "--wal", wal, "--dry-run")
    error_line(proc, bad)
    assert proc.returncode == 6, proc
    assert not target.exists() or not any(target.iterdir())

    # restore --force over a namespace that holds data: refused before anything is touched
    existing = tmp_path / "existing"
    shutil.copytree(restored, existing)
    digest = tree_digest(existing)
    proc = run("restore", "--data-dir", existing, "-n", NS, "--snapshot", bad, "--wal", wal, "--force")
    error_line(proc, bad)
    assert proc.returncode == 6, proc
    assert tree_digest(existing) == digest
    assert sorted(p.name for p in existing.iterdir()) == sorted(
        p.name for p in restored.iterdir()
    )  # no staging directory left

    # backup verify: the report names the file and says what is wrong
    proc = run("backup", "verify", "--snapshot", bad, "--wal", wal)
    assert_no_signal(proc)
    assert proc.returncode == 6, proc
    assert f"snapshot: snapshot {bad} " in proc.stdout or f"{bad} is" in proc.stdout, proc.stdout

    # backup list: the triage command lists the file with its error and keeps going
    shutil.copytree(wal, tmp_path / "backups" / "wal")
    proc = run("backup", "list", "--backup-dir", tmp_path / "backups")
    assert_no_signal(proc)
    assert proc.returncode == 0, proc
    if compressed:  # named by the file the operator has, not the decompressed copy
        assert f"-compressed, ERROR: snapshot {bad} is truncated" in proc.stdout, proc.stdout
    else:
        assert f"{bad}  ERROR: snapshot {bad} " in proc.stdout, proc.stdout
    assert f"PROBLEM {bad}: snapshot {bad} " in proc.stdout, proc.stdout
    assert "WAL: LSN 1..400" in proc.stdout, proc.stdout


# --- WAL segments cut at the same lengths ---


@pytest.fixture(scope="module")
def wal_made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(snapshot at LSN 0, WAL backup whose first segment is ~64 KiB)."""
    h = History(tmp_path_factory.mktemp("walcut"), segment_size=1 << 16, value_size=64)
    h.open()
    snap, _ = h.snapshot("s0.db")
    h.write_random(700)
    wal = h.backup_wal("wal/a")
    h.close()
    assert (wal / "000000001.wal").stat().st_size > 16384
    return snap, wal


@pytest.mark.parametrize("cut", ["0", "1", "4095", "4096", "8191", "8192", "half", "size-1"])
def test_cut_wal_segment(wal_made: tuple[Path, Path], tmp_path: Path, cut: str) -> None:
    snap, wal = wal_made
    victim_src = wal / "000000001.wal"
    data = victim_src.read_bytes()
    n = {"half": len(data) // 2, "size-1": len(data) - 1}.get(cut) or int(cut)
    d = tmp_path / "wal"
    shutil.copytree(wal, d, ignore=shutil.ignore_patterns("*.sha256"))
    victim = d / victim_src.name
    victim.write_bytes(data[:n])

    for cmd in (["wal", "list"], ["wal", "inspect"]):
        proc = run(*cmd, "--wal-dir", d)
        assert_no_signal(proc)
        assert proc.returncode in (0, 6), proc
        out = proc.stdout + proc.stderr
        # list: the row of segment 000000001 (by id, or by path if its header is unreadable);
        # inspect: the block that starts with its path
        part = (
            next(ln for ln in out.splitlines() if victim.stem in ln)
            if cmd[1] == "list"
            else out[out.index(str(victim)) :].split("\n\n")[0]
        )
        assert any(w in part for w in ("bad header", "damaged", "truncated")), out

    target = tmp_path / "target"
    proc = run("restore", "--data-dir", target, "-n", NS, "--snapshot", snap, "--wal", d)
    line = error_line(proc, victim)
    assert proc.returncode == 6, proc
    assert "truncated" in line or "damaged" in line, line
    assert not target.exists() or not any(target.iterdir())


def test_the_hazard_is_real(made: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Without the check, LMDB maps a cut snapshot and reading it is a SIGBUS."""
    snap, _wal, _restored = made
    cut = make_kind("cut8192", snap, tmp_path)
    script = (
        "import lmdb, sys\n"
        "env = lmdb.open(sys.argv[1], subdir=False, readonly=True, lock=False, "
        "max_dbs=4)\n"
        "kv = env.open_db(b'kv', create=False)\n"
        "with env.begin() as txn:\n"
        "    print(sum(1 for _ in txn.cursor(db=kv)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(cut)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -signal.SIGBUS, proc
