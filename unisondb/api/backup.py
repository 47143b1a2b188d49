"""Backup endpoints (see issue: backup API). Routes are added here as they are built."""

from __future__ import annotations

from starlette.routing import Route


def routes(prefix: str) -> list[Route]:
    return []
