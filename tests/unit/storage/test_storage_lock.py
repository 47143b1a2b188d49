"""The namespace LOCK: one engine per namespace (DESIGN §1)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from unisondb.errors import LockedError
from unisondb.storage.engine import Engine


def test_second_engine_on_same_namespace_is_refused(
    data_dir: Path, open_engine: Callable[..., Engine]
) -> None:
    first = open_engine()
    first.put(b"k", b"v")
    with pytest.raises(LockedError) as info:
        open_engine()
    assert str(data_dir / "default" / "LOCK") in str(info.value)
    # The refused open did not disturb the running engine.
    assert first.put(b"k2", b"v2") == 2
    # Another namespace in the same data dir is independent.
    other = open_engine(namespace="other")
    assert other.put(b"k", b"x") == 1
    first.close()

    second = open_engine()
    assert second.get(b"k2") == b"v2"
    assert second.put(b"k3", b"v3") == 3
