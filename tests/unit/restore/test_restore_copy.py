"""The snapshot copy of a restore (``restore/apply.py``): the kernel copy and its hash.

``_copy_in_kernel`` copies with ``copy_file_range`` and hashes the staged bytes from a map
behind the copy; the digest must be exactly the sha256 of the bytes staged, the staged file
exactly the input's first ``data_len`` bytes, and an input that ends early is reported
(the restore then refuses it) — never a short file hashed as if whole.
"""

from __future__ import annotations

import errno
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from unisondb.restore import apply
from unisondb.restore.progress import Progress


def _input(tmp_path: Path, size: int) -> Path:
    src = tmp_path / "in.db"
    src.write_bytes(os.urandom(size))
    return src


@pytest.mark.parametrize("extra", [0, 1, 4096 + 7])
def test_kernel_copy_stages_and_hashes_exactly_the_data_bytes(tmp_path: Path, extra: int) -> None:
    data_len = 2 * apply._COPY_CHUNK + 12345  # several chunks, the last one short
    src = _input(tmp_path, data_len + extra)  # ``extra``: a trailer after the data
    h = hashlib.sha256()
    with ThreadPoolExecutor(1) as pool, open(src, "rb") as fin, open(tmp_path / "out", "x+b") as fout:
        left = apply._copy_in_kernel(fin, fout, data_len, h, pool, Progress())
    want = src.read_bytes()[:data_len]
    assert left == 0
    assert (tmp_path / "out").read_bytes() == want
    assert h.digest() == hashlib.sha256(want).digest()


def test_an_input_that_ends_early_is_reported_and_not_hashed_as_whole(tmp_path: Path) -> None:
    src = _input(tmp_path, apply._COPY_CHUNK + 100)
    data_len = 3 * apply._COPY_CHUNK
    h = hashlib.sha256()
    with ThreadPoolExecutor(1) as pool, open(src, "rb") as fin, open(tmp_path / "out", "x+b") as fout:
        left = apply._copy_in_kernel(fin, fout, data_len, h, pool, Progress())
    assert left == data_len - src.stat().st_size
    # The staged file holds what was copied, no zero-filled rest.
    assert (tmp_path / "out").read_bytes() == src.read_bytes()
    assert h.digest() == hashlib.sha256(src.read_bytes()).digest()


def test_no_kernel_copy_leaves_the_copy_to_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    src = _input(tmp_path, 2 * apply._COPY_CHUNK)
    h = hashlib.sha256()
    with ThreadPoolExecutor(1) as pool, open(src, "rb") as fin, open(tmp_path / "out", "x+b") as fout:
        assert apply._copy_in_kernel(fin, fout, src.stat().st_size, h, pool, Progress()) is None
        assert os.fstat(fout.fileno()).st_size == 0
        assert apply._copy_through(fin, fout, src.stat().st_size, h, pool, Progress()) == 0
    assert (tmp_path / "out").read_bytes() == src.read_bytes()
    assert h.digest() == hashlib.sha256(src.read_bytes()).digest()
