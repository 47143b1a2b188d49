"""Shared fixtures. The server-process helpers live in ``serverproc.py`` (a uniquely named
module: several directories have a ``conftest.py``, so ``from conftest import`` is ambiguous).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverproc import ServerProcess, start_server


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[object]:
    started: list[ServerProcess] = []

    def factory(
        data_dir: Path | None = None, *namespaces: str, extra_args: list[str] | None = None, wait: bool = True
    ) -> ServerProcess:
        srv = start_server(data_dir or tmp_path / "data", namespaces or ("default",), extra_args, wait)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.stop(signal.SIGKILL)


@pytest.fixture
def server(server_factory: object, tmp_path: Path) -> ServerProcess:
    """A server on a fresh data dir serving namespaces 'default' and 'users'."""
    srv: ServerProcess = server_factory(tmp_path / "data", "default", "users")  # type: ignore[operator]
    return srv
