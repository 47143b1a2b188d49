"""Helpers shared by the backup integration tests (``test_backup_*.py``), plus their self-tests.

Kept in a ``test_backup_*`` module so the backup tests stay within the files their owner
may touch; the other modules import it as ``test_backup_helpers`` (pytest puts this
directory on ``sys.path``).
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import lmdb
from prometheus_client.parser import text_string_to_metric_families
from serverproc import ServerProcess, start_server

from unisondb.storage import segment
from unisondb.storage.btree import CHECKPOINT_KEY, Checkpoint
from unisondb.storage.record import EntryKind, Record

NS = "users"


#: The server-process type the fixtures in tests/conftest.py hand out.
Server = ServerProcess


def OwnServer(data_dir: Path, *namespaces: str, extra_args: list[str] | None = None) -> ServerProcess:
    """A server for module-scoped fixtures (conftest's factory is per-test); stop it yourself."""
    return start_server(data_dir, namespaces or (NS,), extra_args)


# --- HTTP helpers ---


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def put(client: httpx.Client, key: str, value: bytes, ns: str = NS) -> None:
    r = client.put(f"/api/v1/{ns}/kv/{key}", json={"value": b64(value)})
    assert r.status_code == 200, r.text


def get(client: httpx.Client, key: str, ns: str = NS) -> bytes | None:
    r = client.get(f"/api/v1/{ns}/kv/{key}")
    assert r.status_code == 200, r.text
    body = r.json()
    return base64.b64decode(body["value"]) if body["found"] else None


def batch_put(client: httpx.Client, items: dict[str, bytes], ns: str = NS) -> None:
    r = client.post(
        f"/api/v1/{ns}/kv/batch",
        json={"operation": "put", "items": [{"key": k, "value": b64(v)} for k, v in items.items()]},
    )
    assert r.status_code == 200, r.text


def fill_segments(client: httpx.Client, nbytes: int, tag: str, ns: str = NS) -> None:
    """Write about ``nbytes`` of values (in 16 KiB batches) so small segments seal by size."""
    i = 0
    while i * 16384 < nbytes:
        batch_put(client, {f"{tag}-{i}-{j}": os.urandom(4096) for j in range(4)}, ns)
        i += 1


def wal_backup(client: httpx.Client, body: dict[str, Any], ns: str = NS) -> httpx.Response:
    return client.post(f"/api/v1/{ns}/wal/backup", json=body)


def btree_backup(client: httpx.Client, path: str, ns: str = NS) -> httpx.Response:
    return client.post(f"/api/v1/{ns}/btree/backup", json={"path": path})


def metric_samples(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    r = client.get("/metrics")
    assert r.status_code == 200
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# --- file system helpers ---


def backup_root(data_dir: Path, ns: str = NS) -> Path:
    return data_dir / "backups" / ns


def tree(root: Path, exclude: tuple[Path, ...] = ()) -> dict[str, tuple[str, str]]:
    """{relative path: (kind, size or link target)} of everything under ``root``."""
    out: dict[str, tuple[str, str]] = {}
    for dirpath, dirs, files in os.walk(root):
        here = Path(dirpath)
        dirs[:] = [d for d in dirs if here / d not in exclude]
        for name in dirs + files:
            p = here / name
            if p in exclude:
                continue
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[str(p.relative_to(root))] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[str(p.relative_to(root))] = ("dir", "")
            else:
                out[str(p.relative_to(root))] = ("file", str(st.st_size))
    return out


def tmp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.tmp"))


def sha256sum_check(directory: Path) -> None:
    """Run the real ``sha256sum -c`` on every sidecar in ``directory``."""
    sidecars = sorted(p.name for p in directory.glob("*.sha256"))
    assert sidecars, f"no sidecars in {directory}"
    r = subprocess.run(["sha256sum", "-c", *sidecars], cwd=directory, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def read_snapshot(path: Path) -> tuple[dict[bytes, bytes], Checkpoint]:
    """Open a snapshot file read-only with py-lmdb; (all user key/values, its checkpoint)."""
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_dbs=4)
    try:
        kv = env.open_db(b"kv", create=False)
        meta = env.open_db(b"meta", create=False)
        with env.begin() as txn:
            data = dict(txn.cursor(db=kv).iternext(keys=True, values=True))
            raw = txn.get(CHECKPOINT_KEY, db=meta)
    finally:
        env.close()
    return data, (Checkpoint() if raw is None else Checkpoint.decode(raw))


def wal_records(wal_dir: Path) -> list[Record]:
    """Every record of every segment in ``wal_dir``, in LSN order (checked contiguous)."""
    recs: list[Record] = []
    for _seg_id, path in segment.iter_segment_files(wal_dir):
        recs.extend(r for r, _s, _e in segment.scan(path).records)
    for i, r in enumerate(recs):
        assert r.lsn == i + 1, f"LSN {r.lsn} at position {i}"
    return recs


def apply_records(state: dict[bytes, bytes], recs: list[Record]) -> None:
    for rec in recs:
        for e in rec.entries:
            if e.kind == EntryKind.PUT:
                state[e.key] = e.value
            else:
                state.pop(e.key, None)


@contextmanager
def immutable(path: Path) -> Iterator[None]:
    """Make a directory unwritable even for root (``chattr +i``), or skip the test."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        import pytest

        pytest.skip(
            "tests run as root, where chmod 0555 does not stop writes, and "
            f"'chattr +i' is not available here: {r.stderr.strip()}"
        )
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


# --- self-tests of the helpers ---


def test_tree_sees_links_and_sizes(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"abc")
    (tmp_path / "l").symlink_to("/nonexistent")
    assert tree(tmp_path) == {"d": ("dir", ""), "d/f": ("file", "3"), "l": ("link", "/nonexistent")}
    assert tree(tmp_path, exclude=(tmp_path / "d",)) == {"l": ("link", "/nonexistent")}
