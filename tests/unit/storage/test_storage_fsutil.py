"""fsutil.make_dirs: ``mkdir -p`` whose every new directory is fsynced into its parent.

That the fsyncs make the tree survive a power cut is checked on the power-cut filesystem
(tests/powercut); here, that it behaves as ``Path.mkdir(parents=True, exist_ok=True)``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from unisondb.storage import fsutil


def test_make_dirs_creates_every_missing_level_and_can_repeat(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c"
    fsutil.make_dirs(target)
    assert target.is_dir()
    fsutil.make_dirs(target)  # already there: nothing to do
    assert target.is_dir()


def test_make_dirs_refuses_a_file_in_the_way_naming_it(tmp_path: Path) -> None:
    (tmp_path / "data").write_bytes(b"")
    with pytest.raises(FileExistsError) as err:
        fsutil.make_dirs(tmp_path / "data")
    assert err.value.filename == str(tmp_path / "data")
