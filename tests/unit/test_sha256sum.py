"""Exactly what the one ``.sha256`` parser (``unisondb/sha256sum.py``) accepts and rejects,
and that the backup writer's check (``backup/checksum.parse_sidecar``) uses the same rules."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from unisondb import sha256sum
from unisondb.backup.checksum import parse_sidecar, sidecar_line

H = hashlib.sha256(b"x").hexdigest()
G = hashlib.sha256(b"y").hexdigest()


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (f"{H}  a.wal\n", [(H, "a.wal", False)]),  # sha256sum (text mode)
        (f"{H} *a.wal\n", [(H, "a.wal", True)]),  # sha256sum -b (binary mode)
        (f"{H}  a.wal", [(H, "a.wal", False)]),  # no final newline
        (f"{H}  a.wal\r\n", [(H, "a.wal", False)]),  # CRLF
        (f"{H}  a.wal  \t\n", [(H, "a.wal", False)]),  # trailing spaces/tabs
        (f"{H.upper()}  a.wal\n", [(H, "a.wal", False)]),  # upper-case hex
        (f"\n{H}  a.wal\n\n{G}  b.wal\n", [(H, "a.wal", False), (G, "b.wal", False)]),  # lines
        (f"{H}  dir/a.wal\n", [(H, "dir/a.wal", False)]),  # sha256sum dir/a.wal
        (f"\\{H}  a\\\\b\\nc\n", [(H, "a\\b\nc", False)]),  # GNU escaped name
        (f"SHA256 (a.wal) = {H}\n", [(H, "a.wal", False)]),  # sha256sum --tag
        (f"{H}\n", [(H, None, False)]),  # bare digest
        (f"{H}  \n", [(H, None, False)]),  # ... with trailing spaces
        (f"{H}  a b.wal\n", [(H, "a b.wal", False)]),  # spaces inside a name
    ],
)
def test_accepted(text: str, want: list[tuple[str, str | None, bool]]) -> None:
    got = sha256sum.parse(text)
    assert got is not None
    assert [(e.digest, e.name, e.binary) for e in got] == want


@pytest.mark.parametrize(
    "text",
    [
        "",  # empty
        "\n\n",  # only blank lines
        f"{H[:-1]}  a.wal\n",  # 63 hex digits
        f"{H}0  a.wal\n",  # 65 hex digits
        f"{H[:-1]}g  a.wal\n",  # not hex
        f"{H} a.wal\n",  # one space between digest and name
        f"{H}\ta.wal\n",  # tab separator
        f"{H}  a.wal\ngarbage\n",  # one bad line spoils the file
        f"\\{H}  a\\qb\n",  # bad escape
        f"{H}  a\0.wal\n",  # NUL byte
        f"MD5 (a.wal) = {H}\n",  # another algorithm's tag
        "not a checksum\n",
    ],
)
def test_rejected(text: str) -> None:
    assert sha256sum.parse(text) is None


def test_entry_for_picks_by_basename_and_refuses_ambiguity() -> None:
    entries = sha256sum.parse(f"{H}  dir/a.wal\n{G}  b.wal\n")
    assert entries is not None
    assert sha256sum.entry_for(entries, ("b.wal",)) == (entries[1], True)
    assert sha256sum.entry_for(entries, ("a.wal",)) == (entries[0], True)
    assert sha256sum.entry_for(entries, ("c.wal",)) is None
    one = sha256sum.parse(f"{H}  old-name.wal\n")
    assert one is not None and sha256sum.entry_for(one, ("new.wal",)) == (one[0], False)


def test_real_sha256sum_output_round_trips(tmp_path: Path) -> None:
    f = tmp_path / "000000001.wal"
    f.write_bytes(b"x")
    for flags in ([], ["-b"], ["--tag"]):
        out = subprocess.run(
            ["sha256sum", *flags, f.name], cwd=tmp_path, capture_output=True, text=True, check=True
        ).stdout
        got = sha256sum.parse(out)
        assert got is not None and got[0].digest == H and got[0].name == f.name
    assert parse_sidecar(sidecar_line(H, f.name)) == (H, f.name)
    assert parse_sidecar(f"{H} *{f.name}\r\n") == (H, f.name)  # same rules as restore
    assert parse_sidecar(f"{H}\n") is None  # the writer needs a name
    assert parse_sidecar(f"{H}  a\n{G}  b\n") is None  # and exactly one entry
