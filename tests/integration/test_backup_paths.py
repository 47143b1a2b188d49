"""Hostile paths against a real server: every one is a 400 naming the rule, for both
endpoints, and afterwards nothing at all was created — outside the backup root or in it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import httpx
from test_backup_helpers import NS, Server, backup_root, fill_segments, metric_samples, tree

# (name, raw JSON string literal for the path — exactly as sent on the wire, expected words)
HOSTILE: list[tuple[str, str, str]] = [
    ("absolute", '"/etc/unisondb-pwned"', "absolute paths are rejected"),
    ("absolute-into-root", '"{root}/x"', "absolute paths are rejected"),
    ("dotdot", '"../x"', "'..' components"),
    ("dotdot-deep", '"a/../../x"', "'..' components"),
    ("dotdot-inside", '"a/../b"', "'a/../b' is rejected too"),
    ("dotdot-to-other-ns", '"../default/x"', "'..' components"),
    ("dotdot-trailing", '"a/.."', "'..' components"),
    ("percent-encoded", '"%2e%2e/x"', "percent-encoded '..'"),
    ("percent-encoded-upper", '"a/%2E%2E/%2E%2E/x"', "percent-encoded '..'"),
    ("json-escaped-dots", '"\\u002e\\u002e/x"', "'..' components"),
    ("nul", '"a\\u0000b"', "NUL byte"),
    ("newline", '"a\\nb"', "control characters"),
    ("empty", '""', "must not be empty"),
    ("blank", '"   "', "must not be empty"),
    ("long-component", '"' + "a" * 256 + '/x"', "path component too long"),
    ("long-component-utf8", '"' + "\u00e9" * 128 + '"', "path component too long"),
    ("long-total", '"' + "a/" * 2049 + 'x"', "too long"),
    ("symlink-outside", '"evil/x"', "leaves the backup root"),
    ("symlink-dangling-outside", '"dangling/x"', "leaves the backup root"),
    ("symlink-other-namespace", '"other-ns/x"', "leaves the backup root"),
    ("symlink-chain", '"inside/out/x"', "leaves the backup root"),
    ("symlink-to-parent", '"up/x"', "leaves the backup root"),
    ("not-a-string", "42", "must be a string"),
    ("array", '["a"]', "must be a string"),
]
FILE_ONLY: list[tuple[str, ...] | tuple[str, str, str, int]] = [
    ("dot", '"."', "backup root itself"),
    ("dot-slash", '"./"', "backup root itself"),
    ("dot-slash-dot", '"./."', "backup root itself"),
    ("trailing-slash", '"snaps/"', "must name a file"),
    ("tmp-suffix", '"snaps/x.tmp"', "must not end with '.tmp'"),
    ("sha256-suffix", '"snaps/x.sha256"', "must not end with '.sha256'"),
    ("symlink-file-outside", '"link.db"', "leaves the backup root"),
    ("symlink-to-root", '"rootlink"', "resolves to the backup root itself"),
    ("existing-dir", '"adir"', "is a directory", 409),
    ("long-file-name", '"' + "f" * 245 + '"', "path component too long"),
    ("null", "null", "missing field 'path'"),
]
DIR_ONLY: list[tuple[str, ...] | tuple[str, str, str, int]] = [
    ("file-as-dir", '"afile"', "is not a directory", 409),
    ("file-in-the-middle", '"afile/sub"', "is not a directory", 409),
]


def backup_series(c: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {k: v for k, v in metric_samples(c).items() if k[0].startswith("unisondb_backup")}


def _prepare(tmp_path: Path, data: Path) -> Path:
    root = backup_root(data)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file.db").write_bytes(b"precious")
    (root / "evil").symlink_to(outside)
    (root / "dangling").symlink_to(outside / "not-yet")
    (root / "other-ns").symlink_to(data / "backups" / "default")
    (root / "sub").mkdir()
    (root / "sub" / "out").symlink_to(outside)
    (root / "inside").symlink_to(root / "sub")
    (root / "up").symlink_to("..")
    (root / "link.db").symlink_to(outside / "file.db")
    (root / "rootlink").symlink_to(".")
    (root / "adir").mkdir()
    (root / "afile").write_bytes(b"x")
    return root


def test_hostile_paths_are_rejected_and_nothing_is_written(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    srv = server_factory(tmp_path / "data", "default", "users", extra_args=["--wal-segment-size", "64KiB"])
    root = _prepare(tmp_path, srv.data_dir)
    with srv.client() as c:
        fill_segments(c, 150_000, "x")  # so a WAL backup would have sealed segments to copy
        engine_dirs = (srv.data_dir / NS, srv.data_dir / "default")
        logs = tuple(tmp_path.glob("server-*.log"))
        before = tree(tmp_path, exclude=engine_dirs + logs)
        metrics_before = backup_series(c)
        failures: list[str] = []
        cases = [("btree", *case) for case in HOSTILE + FILE_ONLY] + [
            ("wal", *case) for case in HOSTILE + DIR_ONLY
        ]
        for kind, name, literal, words, *status in cases:
            want = status[0] if status else 400  # a clash with what exists is a 409
            literal = literal.replace("{root}", str(root))
            if kind == "btree":
                url, body = f"/api/v1/{NS}/btree/backup", '{"path": ' + literal + "}"
            else:
                url = f"/api/v1/{NS}/wal/backup"
                body = '{"afterSegmentId": 0, "rotate": true, "backupDir": ' + literal + "}"
            # No Content-Type, as the document's curl -d sends it.
            r = c.post(url, content=body.encode())
            if r.status_code != want or words not in r.json().get("error", ""):
                failures.append(f"{kind}/{name}: {r.status_code} {r.text[:300]}")
        assert not failures, "\n".join(failures)
        after = tree(tmp_path, exclude=engine_dirs + logs)
        assert after == before
        assert (tmp_path / "outside" / "file.db").read_bytes() == b"precious"
        assert not (tmp_path / "outside" / "not-yet").exists()
        assert list((srv.data_dir / "backups" / "default").iterdir()) == []
        # Validation errors are the client's, not backup failures: nothing counted.
        assert backup_series(c) == metrics_before


def test_unusual_but_safe_paths_are_accepted(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    srv = server_factory(tmp_path / "data", "default", "users")
    root = backup_root(srv.data_dir)
    (root / "real").mkdir()
    (root / "alias").symlink_to("real")  # a link that stays inside the root is fine
    with srv.client() as c:
        c.put(f"/api/v1/{NS}/kv/k", json={"value": "dg=="})
        for rel, expected in [
            ("./a//b/./c.db", "a/b/c.db"),
            ("alias/s.db", "real/s.db"),  # reported where it really is
            ("back\\slash.db", "back\\slash.db"),  # a backslash is an ordinary character
            ("%2e/dot.db", "%2e/dot.db"),  # percent signs are literal, not decoded
            ("sp ace/ü.db", "sp ace/ü.db"),
            ("x" * 244, "x" * 244),
            ("y" * 255 + "/z.db", "y" * 255 + "/z.db"),
        ]:
            r = c.post(f"/api/v1/{NS}/btree/backup", json={"path": rel})
            assert r.status_code == 200, (rel, r.text)
            assert r.json()["path"] == str(root / expected)
            assert (root / expected).is_file() and not os.path.islink(root / expected)
            assert (root / (expected + ".sha256")).is_file()
        r = c.post(f"/api/v1/{NS}/wal/backup", json={"backupDir": ".", "rotate": True})
        assert r.status_code == 200, r.text
        assert [b["path"] for b in r.json()["backups"]] == [str(root / "000000001.wal")]
