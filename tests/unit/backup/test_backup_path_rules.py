"""Unit tests of the backup path rules (``unisondb.backup.paths``) on real directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unisondb.backup import paths
from unisondb.errors import Conflict, InvalidRequest


@pytest.mark.parametrize(
    ("value", "is_file", "words"),
    [
        (None, True, "missing field 'path'"),
        (3, False, "must be a string"),
        (True, False, "got a boolean"),
        ("", False, "must not be empty"),
        (" \t", False, "must not be empty"),
        ("a\x00b", True, "NUL byte"),
        ("a\nb", True, "control characters"),
        ("a\x7fb", True, "control characters"),
        ("/abs", False, "absolute paths are rejected"),
        ("//double", False, "absolute paths are rejected"),
        ("..", False, "'..' components"),
        ("a/../b", False, "'a/../b' is rejected too"),
        ("a/..", True, "'..' components"),
        ("%2e%2e", False, "percent-encoded '..'"),
        ("x/%2E%2e/y", False, "percent-encoded '..'"),
        ("a" * 256, False, "path component too long"),
        ("d/" + "f" * 245, True, "path component too long"),
        ("a/" * 2049, False, "too long"),
        (".", True, "backup root itself"),
        ("./", True, "backup root itself"),
        ("a/", True, "must name a file"),
        ("a/.", True, "must name a file"),
        ("s.db.tmp", True, "must not end with '.tmp'"),
        ("s.db.sha256", True, "must not end with '.sha256'"),
        ("\ud800", True, "valid UTF-8"),
        # One rule for encoded separators and dot segments (issue 12): a '..' piece after
        # decoding and splitting at / and \ anywhere inside one component.
        ("..%2f", False, "percent-encoded '..'"),
        ("%2e%2e%2f", False, "percent-encoded '..'"),
        ("a/x%2f..%2f..%2fetc", False, "percent-encoded '..'"),
        ("..%5cx", True, "percent-encoded '..'"),
        ("..\\x", True, "backslash separator"),
        ("x\\..", True, "backslash separator"),
        ("%252e%252e", False, "percent-encoded '..'"),
        ("%2525252525252525252e", False, "percent-encoded '..'"),
        # Names the WAL formats own: a snapshot there would be read as a segment.
        ("wal/000000099.wal", True, "must not end with '.wal'"),
        ("x.wal.gz", True, "must not end with '.wal.gz'"),
        ("x.wal.zst", True, "must not end with '.wal.zst'"),
    ],
)
def test_parse_relative_rejects(value: object, is_file: bool, words: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        paths.parse_relative(value, "path", is_file=is_file)
    assert words in err.value.message


@pytest.mark.parametrize(
    ("value", "is_file", "parts"),
    [
        ("a/b", False, ("a", "b")),
        ("./a//b/.", False, ("a", "b")),
        (".", False, ()),
        ("./", False, ()),
        ("a\\b", True, ("a\\b",)),
        ("...", True, ("...",)),
        ("..a", True, ("..a",)),
        ("%2e", True, ("%2e",)),
        ("a%2fb", True, ("a%2fb",)),
        ("%2e%2fx", True, ("%2e%2fx",)),
        ("x.wal.db", True, ("x.wal.db",)),
        ("seg.wal", False, ("seg.wal",)),  # a directory may be named so; only files are reserved
        ("x" * 244, True, ("x" * 244,)),
        ("y" * 255 + "/z", True, ("y" * 255, "z")),
    ],
)
def test_parse_relative_accepts(value: str, is_file: bool, parts: tuple[str, ...]) -> None:
    assert paths.parse_relative(value, "path", is_file=is_file) == parts


@given(st.text(min_size=1, max_size=60))
def test_parse_relative_never_yields_an_escape(value: str) -> None:
    """Whatever string comes in, what comes out has no '..', no '/', no empty part."""
    try:
        parts = paths.parse_relative(value, "backupDir", is_file=False)
    except InvalidRequest:
        return
    for p in parts:
        assert p not in ("", ".", "..") and "/" not in p and "\x00" not in p


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "data" / "backups" / "users"
    r.mkdir(parents=True)
    (tmp_path / "data" / "backups" / "default").mkdir()
    return r


def test_resolve_follows_links_inside_and_refuses_outside(root: Path, tmp_path: Path) -> None:
    (root / "real").mkdir()
    (root / "alias").symlink_to("real")
    (root / "out").symlink_to(tmp_path)
    (root / "ns").symlink_to("../default")
    res = paths.resolve(root, ("alias", "x.db"), "path", is_file=True)
    assert res.parts == ("real", "x.db") and res.path == root / "real" / "x.db"
    for parts in (("out", "x"), ("ns", "x"), ("ns",)):
        with pytest.raises(InvalidRequest, match="leaves the backup root"):
            paths.resolve(root, parts, "backupDir", is_file=False)


def test_resolve_checks_every_prefix(root: Path, tmp_path: Path) -> None:
    """A link that leaves the root and one that comes back: the detour is refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "back").symlink_to(root / "real")
    (root / "real").mkdir()
    (root / "detour").symlink_to(outside)
    with pytest.raises(InvalidRequest, match="'detour' resolves to"):
        paths.resolve(root, ("detour", "back", "x.db"), "path", is_file=True)


def test_resolve_existing_non_directories(root: Path) -> None:
    (root / "f").write_text("x")
    (root / "d").mkdir()
    with pytest.raises(Conflict, match="is not a directory"):
        paths.resolve(root, ("f", "x.db"), "path", is_file=True)
    with pytest.raises(Conflict, match="exists and is a directory"):
        paths.resolve(root, ("d",), "path", is_file=True)
    with pytest.raises(Conflict, match="is not a directory"):
        paths.resolve(root, ("f",), "backupDir", is_file=False)


def test_open_dir_creates_components_inside_only(root: Path) -> None:
    res = paths.resolve(root, ("a", "b", "c"), "backupDir", is_file=False)
    fd = paths.open_dir(res)
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(root / "a" / "b" / "c"))
    finally:
        os.close(fd)


def test_open_dir_refuses_a_link_swapped_in_after_validation(root: Path, tmp_path: Path) -> None:
    """TOCTOU: validated as a plain directory, replaced by a link before it is opened."""
    (root / "a").mkdir()
    res = paths.resolve(root, ("a", "new"), "backupDir", is_file=False)
    (root / "a").rmdir()
    (root / "a").symlink_to(tmp_path)
    with pytest.raises(Conflict, match="refusing to follow it"):
        paths.open_dir(res)
    assert not (tmp_path / "new").exists()


def test_open_dir_recreates_a_missing_root(root: Path) -> None:
    res = paths.resolve(root, ("x",), "backupDir", is_file=False)
    root.rmdir()
    os.close(paths.open_dir(res))
    assert (root / "x").is_dir()


@pytest.mark.parametrize("bits", [0o000, 0o022, 0o002])
def test_backup_dirs_0700_and_files_0600_whatever_the_umask(root: Path, bits: int) -> None:
    from unisondb.backup.files import TargetDir

    old = os.umask(bits)
    try:
        res = paths.resolve(root, ("deep", "er", "f.db"), "path", is_file=True)
        with TargetDir(paths.open_dir(res), res.path.parent) as tdir:
            tdir.publish("f.db", lambda fd: os.write(fd, b"x"))
    finally:
        os.umask(old)
    for d in (root / "deep", root / "deep" / "er"):
        assert os.stat(d).st_mode & 0o777 == 0o700, d
    assert os.stat(root / "deep" / "er" / "f.db").st_mode & 0o777 == 0o600


def test_a_link_swapped_in_during_resolve_is_409_not_valueerror(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fake: the swap is injected between resolve's prefix checks and its final lookup (a
    real race cannot be timed); what must hold is the 409 with a reason, not a ValueError."""
    outside = tmp_path / "outside"
    outside.mkdir()
    real_realpath = os.path.realpath
    calls = {"n": 0}

    def swapping(p: object) -> str:
        calls["n"] += 1
        if calls["n"] == 3:  # the final lookup, after both prefixes were checked
            os.rmdir(root / "a")
            os.symlink(outside, root / "a")
        return real_realpath(p)  # type: ignore[arg-type]

    (root / "a").mkdir()
    monkeypatch.setattr(paths.os.path, "realpath", swapping)
    with pytest.raises(Conflict, match="changed while it was being checked"):
        paths.resolve(root, ("a",), "backupDir", is_file=False)


def test_open_dir_on_a_vanished_directory_is_409(root: Path) -> None:
    res = paths.resolve(root, ("gone", "x.db"), "path", is_file=True)
    (root / "gone").mkdir()
    os.rmdir(root / "gone")
    os.symlink("/nonexistent-target", root / "gone")
    with pytest.raises(Conflict, match="changed while the backup was being prepared"):
        paths.open_dir(res)
