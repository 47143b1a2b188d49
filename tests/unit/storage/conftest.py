"""Shared fixtures for the storage unit tests: real files, real LMDB, no mocks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _storage_helpers import NS, key_for, time_for, value_for

from unisondb.config import EngineConfig
from unisondb.storage import layout, record
from unisondb.storage.engine import Engine
from unisondb.storage.fingerprint import Fingerprint
from unisondb.storage.history import NO_HISTORY, Lineage
from unisondb.storage.record import Entry, EntryKind
from unisondb.storage.wal import Wal

#: The history of WALs built directly (a fixed id, so tests can compare it).
TEST_LINEAGE = Lineage(b"\x5a" * 16, NO_HISTORY, 0, 1)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def wal_dir(data_dir: Path) -> Path:
    return layout.wal_dir(data_dir, NS)


@pytest.fixture
def db_dir(data_dir: Path) -> Path:
    return layout.btree_dir(data_dir, NS)


@pytest.fixture
def open_engine(data_dir: Path) -> Iterator[Callable[..., Engine]]:
    """Factory that opens engines and closes every one of them at teardown."""
    engines: list[Engine] = []

    def _open(
        config: EngineConfig | None = None, *, directory: Path | None = None, namespace: str = NS
    ) -> Engine:
        eng = Engine.open(directory or data_dir, namespace, config or EngineConfig())
        engines.append(eng)
        return eng

    yield _open
    for eng in engines:
        eng.close()


@pytest.fixture
def build_wal() -> Callable[..., int]:
    """Write a WAL directly through ``Wal``: ``counts[i]`` records in segment ``i + 1``.

    Every segment but the last is sealed by rotation; the last one is left active
    (unsealed) unless ``seal_last``. Record ``lsn`` puts ``key_for(lsn)`` =
    ``value_for(lsn, value_size)`` at ``time_for(lsn)``. Returns the last LSN written.
    """

    def _build(
        directory: Path,
        counts: list[int],
        *,
        seal_last: bool = False,
        value_size: int = 16,
        namespace: str = NS,
    ) -> int:
        wal = Wal.open(directory, namespace)
        lsn = 1
        # Footers carry the true state fingerprint, as the engine's would (keys are unique).
        fp = Fingerprint()
        wal.start_segment(1, TEST_LINEAGE, 1, fp.digest())
        try:
            for i, n in enumerate(counts):
                for _ in range(n):
                    entries = [Entry(EntryKind.PUT, key_for(lsn), value_for(lsn, value_size))]
                    data = record.encode(lsn, time_for(lsn), entries)
                    wal.append(data, [(lsn, time_for(lsn), len(data))])
                    fp.add(entries[0].key, entries[0].value)
                    lsn += 1
                wal.sync()
                if i < len(counts) - 1:
                    assert wal.rotate(lsn, fp.digest()) is not None
            if seal_last:
                wal.seal_active_if_nonempty(fp.digest())
        finally:
            wal.close()
        return lsn - 1

    return _build
