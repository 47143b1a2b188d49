"""The document's compressed backups as direct inputs to restore / verify / list / wal list.

One real server writes known keys; the Backup and Restore document's own scripts (run with
bash + curl + jq through ``test_backup_document``'s ``adapt``) take the snapshot and WAL
backups and compress them the way the document does: ``zstd -q --rm`` of the snapshot,
``tar -czf wal-DATE.tar.gz`` of the hourly WAL directory, ``gzip`` of every archived
``*.wal``. A last ``rotate`` backup is compressed with ``zstd --rm`` (what ``contrib/``
produces). Then every plain ``.wal``/``.db`` is deleted and the CLI (a real subprocess, so
exit codes and tracebacks are the real ones) runs over what is left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_backup_document import DOC_CONTINUOUS, DOC_SYSTEMD_SCRIPT, adapt
from test_backup_helpers import NS, OwnServer, b64, backup_root, read_snapshot

from unisondb.restore import sources

SMALL_SEGMENTS = ["--wal-segment-size", "64KiB"]


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unisondb", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def _write(client: Any, model: dict[bytes, bytes], tag: str, n: int) -> None:
    """n batches of 4 puts (4 KiB values), then overwrite and delete a few earlier keys."""
    for i in range(n):
        items = {f"{tag}-{i}-{j}": os.urandom(4096) for j in range(4)}
        r = client.post(
            f"/api/v1/{NS}/kv/batch",
            json={"operation": "put", "items": [{"key": k, "value": b64(v)} for k, v in items.items()]},
        )
        assert r.status_code == 200, r.text
        model.update({k.encode(): v for k, v in items.items()})
    for i in range(0, n, 7):
        key = f"{tag}-{i}-0"
        r = client.put(f"/api/v1/{NS}/kv/{key}", json={"value": b64(b"overwritten")})
        assert r.status_code == 200
        model[key.encode()] = b"overwritten"
        r = client.delete(f"/api/v1/{NS}/kv/{tag}-{i}-1")
        assert r.status_code == 200
        model.pop(f"{tag}-{i}-1".encode(), None)


def _bash(script: str, url: str, data_dir: Path, state: Path) -> None:
    r = subprocess.run(
        ["bash", "-c", adapt(script, url, data_dir, state)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LC_ALL": "C"},
    )
    assert r.returncode == 0, r.stdout + r.stderr


class BackupSet:
    def __init__(self, root: Path, model: dict[bytes, bytes], last_lsn: int, hourly_plain: Path) -> None:
        self.root = root
        self.model = model
        self.last_lsn = last_lsn
        #: A plain copy of the directory the document's script tarred (for the tar-only case).
        self.hourly_plain = hourly_plain

    @property
    def snapshot(self) -> Path:
        (snap,) = (self.root / "snapshots").glob("btree-*.db.zst")
        return snap

    @property
    def tarball(self) -> Path:
        (tgz,) = self.root.glob("wal-*.tar.gz")
        return tgz


@pytest.fixture(scope="module")
def backup_set(tmp_path_factory: pytest.TempPathFactory) -> BackupSet:
    base = tmp_path_factory.mktemp("compressed")
    srv = OwnServer(base / "data", NS, extra_args=SMALL_SEGMENTS)
    state = base / "state"
    state.mkdir()
    root = backup_root(srv.data_dir)
    model: dict[bytes, bytes] = {}
    try:
        with srv.client() as c:
            _write(c, model, "a", 40)
            # Backup Automation: snapshot → zstd -q --rm; WAL → wal/DATE → tar -czf.
            _bash(DOC_SYSTEMD_SCRIPT, srv.url, srv.data_dir, state)
            _write(c, model, "b", 30)
            # Continuous archival: every sealed segment into wal/archive, then gzip each.
            _bash(DOC_CONTINUOUS, srv.url, srv.data_dir, state)
            _write(c, model, "c", 20)
            last = json.loads((state / "wal-archive-state.json").read_text())["lastSegmentId"]
            r = c.post(
                f"/api/v1/{NS}/wal/backup",
                json={"afterSegmentId": last, "backupDir": "wal/final", "rotate": True},
            )
            assert r.status_code == 200, r.text
            assert r.json()["backups"]
            last_lsn = c.get(f"/api/v1/{NS}/checkpoint").json()["lsn"]
    finally:
        srv.stop()
    final = root / "wal" / "final"
    subprocess.run(["zstd", "-q", "--rm", *sorted(map(str, final.glob("*.wal")))], check=True)
    (hourly,) = [d for d in (root / "wal").iterdir() if d.name not in ("archive", "final")]
    hourly_plain = base / "hourly-plain"
    shutil.copytree(hourly, hourly_plain)
    # Delete every plain file the compressed ones replace: only the document's outputs stay.
    shutil.rmtree(hourly)
    assert not list(root.rglob("*.wal")) and not list(root.rglob("*.db"))
    assert list((root / "wal" / "archive").glob("*.wal.gz"))
    assert list(final.glob("*.wal.zst"))
    return BackupSet(root, model, last_lsn, hourly_plain)


def _restored(target: Path) -> dict[bytes, bytes]:
    data, _cp = read_snapshot(target / NS / "db" / "data.mdb")
    return data


def _restore_json(target: Path, snap: Path, *wal: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    args: list[str | Path] = ["restore", "--data-dir", target, "-n", NS, "--snapshot", snap]
    for w in wal:
        args += ["--wal", w]
    r = cli(*args, *extra, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_restore_from_only_compressed_files(backup_set: BackupSet, tmp_path: Path) -> None:
    out = _restore_json(tmp_path / "t", backup_set.snapshot, backup_set.root)
    assert _restored(tmp_path / "t") == backup_set.model  # every key, every value
    text = json.dumps(out)
    assert f'"endLsn": {backup_set.last_lsn}' in text or str(backup_set.last_lsn) in text
    assert "decompressed content" in text  # the plain .db.sha256 checked the .db.zst


def test_restore_from_gz_and_zst_segments_alone(backup_set: BackupSet, tmp_path: Path) -> None:
    wal = backup_set.root / "wal"
    _restore_json(tmp_path / "t", backup_set.snapshot, wal / "archive", wal / "final")
    assert _restored(tmp_path / "t") == backup_set.model


def test_restore_from_the_tarball_equals_the_plain_directory(backup_set: BackupSet, tmp_path: Path) -> None:
    _restore_json(tmp_path / "plain", backup_set.snapshot, backup_set.hourly_plain)
    _restore_json(tmp_path / "tar", backup_set.snapshot, backup_set.tarball)
    plain = _restored(tmp_path / "plain")
    assert _restored(tmp_path / "tar") == plain
    assert len(plain) > 100


def test_verify_list_and_wal_list_read_compressed_inputs(backup_set: BackupSet) -> None:
    root = backup_set.root
    r = cli("backup", "verify", "--snapshot", backup_set.snapshot, "--wal", root, "-n", NS, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["ok"] and rep["snapshot"]["sidecar"] == "ok"
    assert rep["snapshot"]["stored"]["compression"] == "zstd"
    assert "btree-" in rep["snapshot"]["checked"] and "decompressed" in rep["snapshot"]["checked"]
    assert rep["restorable"]["toLsn"] == backup_set.last_lsn
    codecs = {
        sources.stored_codec(Path(s["path"])) if Path(s["path"]).exists() else "tar" for s in rep["segments"]
    }
    assert codecs == {"gzip", "zstd", "tar"}
    assert all(s["crc"] == "ok" for s in rep["segments"])

    r = cli("backup", "list", "--backup-dir", root, "--json")
    assert r.returncode == 0, r.stderr
    listing = json.loads(r.stdout)
    assert [s["path"] for s in listing["snapshots"]] == [str(backup_set.snapshot)]
    assert listing["snapshots"][0]["restorableTo"]["lsn"] == backup_set.last_lsn
    assert listing["compressed"] == [] and listing["problems"] == []
    (tl,) = listing["wal"]["histories"]
    assert tl["latestLsn"] == backup_set.last_lsn and tl["holes"] == []
    text = cli("backup", "list", "--backup-dir", root).stdout
    snapshots_section = text.split("Snapshots:")[1].split("Histories")[0]
    assert ".wal" not in snapshots_section and ".tar.gz" not in snapshots_section

    r = cli("wal", "list", "--wal-dir", root / "wal" / "archive", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows and all(
        x["compression"] == "gzip" and x["crc"] == "ok" and x["status"] == "sealed" for x in rows
    )
    r = cli("wal", "list", "--wal-dir", root, "--json")  # the tarball's members
    rows = json.loads(r.stdout)
    assert rows and all(".tar.gz/" in x["path"] and x["crc"] == "ok" for x in rows)
    seg_id = rows[0]["segmentId"]
    r = cli("wal", "inspect", "--wal-dir", root / "wal" / "final", "--records", "--json")
    assert r.returncode == 0, r.stderr
    assert all(x["compression"] == "zstd" and x["recordList"] for x in json.loads(r.stdout))
    r = cli("wal", "inspect", "--wal-dir", root, "-s", str(seg_id))
    assert r.returncode == 0 and f"segmentId         {seg_id}" in r.stdout


def test_sidecar_of_the_compressed_file_is_checked(backup_set: BackupSet, tmp_path: Path) -> None:
    root = tmp_path / "b"
    shutil.copytree(backup_set.root / "wal" / "archive", root)
    gz = sorted(root.glob("*.wal.gz"))[0]
    for side in root.glob("*.wal.sha256"):
        side.unlink()  # only the compressed file's own sidecar remains
    subprocess.run(f"sha256sum {gz.name} > {gz.name}.sha256", shell=True, cwd=root, check=True)
    r = cli("backup", "verify", "--wal", root, "--json")
    seg = next(s for s in json.loads(r.stdout)["segments"] if s["path"] == str(gz))
    assert seg["sidecar"] == "ok" and seg["checked"] == f"{gz.name}.sha256 (compressed file)"
    (root / f"{gz.name}.sha256").write_text("0" * 64 + f"  {gz.name}\n")
    r = cli("backup", "verify", "--wal", root)
    assert r.returncode != 0 and f"{gz}: sha256 does not match" in r.stdout


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


@pytest.mark.parametrize(
    "damage", ["snapshot-cut", "snapshot-flip", "gz-flip", "gz-cut", "zst-cut", "tar-cut", "tar-flip"]
)
def test_damaged_compressed_input_is_a_clear_error(
    backup_set: BackupSet, tmp_path: Path, damage: str
) -> None:
    root = tmp_path / "b"
    shutil.copytree(backup_set.root, root)
    snap = root / backup_set.snapshot.relative_to(backup_set.root)
    what, how = damage.split("-")
    victim = {
        "snapshot": snap,
        "gz": sorted((root / "wal" / "archive").glob("*.wal.gz"))[-1],
        "zst": sorted((root / "wal" / "final").glob("*.wal.zst"))[-1],
        "tar": root / backup_set.tarball.name,
    }[what]
    # Drop the plain sidecars so the compressed stream's own check is what catches it.
    for side in root.rglob("*.sha256"):
        side.unlink()
    if how == "cut":
        _cut(victim)
    else:
        _flip(victim, victim.stat().st_size // 2)
    target = tmp_path / "t"
    wal = [root] if what != "tar" else [root / victim.name]
    args: list[str | Path] = ["restore", "--data-dir", target, "-n", NS, "--snapshot", snap]
    for w in wal:
        args += ["--wal", w]
    r = cli(*args)
    assert r.returncode in (2, 5, 6), (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and str(victim) in r.stderr, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1, r.stderr
    assert not (target / NS).exists()  # nothing partial in the target
    assert not [p for p in target.iterdir() if p.name.startswith(".restore-")] if target.exists() else True
    r = cli("backup", "verify", "--snapshot", snap, "--wal", *wal)
    assert r.returncode == 6 and str(victim) in r.stdout and "Traceback" not in r.stderr


def test_encrypted_inputs_name_the_gpg_command(backup_set: BackupSet, tmp_path: Path) -> None:
    gpg_home = tmp_path / "gnupg"
    gpg_home.mkdir(mode=0o700)
    enc = tmp_path / (backup_set.snapshot.name + ".gpg")
    r = subprocess.run(
        [
            "gpg",
            "--homedir",
            str(gpg_home),
            "--batch",
            "--yes",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "test",
            "--symmetric",
            "--output",
            str(enc),
            str(backup_set.snapshot),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    r = cli("restore", "--data-dir", tmp_path / "t", "-n", NS, "--snapshot", enc)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"gpg --decrypt --output {enc.with_suffix('')} {enc}" in r.stderr
    wal = tmp_path / "wal"
    wal.mkdir()
    seg = sorted((backup_set.root / "wal" / "archive").glob("*.wal.gz"))[0]
    shutil.copy(enc, wal / (seg.name + ".gpg"))
    r = cli("backup", "list", "--backup-dir", wal, "--json")
    assert r.returncode == 0
    assert "gpg --decrypt" in r.stdout and json.loads(r.stdout)["snapshots"] == []
    r = cli("backup", "verify", "--wal", wal)
    assert r.returncode == 6 and "gpg --decrypt --output" in r.stdout
