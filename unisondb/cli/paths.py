"""Path options of the offline commands: local files only, and where the data dir defaults.

A ``scheme://`` argument (``s3://bucket/x.db``, ``https://…``) is refused with the command
that downloads it: click's ``Path`` would otherwise collapse ``//`` and look for a local
file ``s3:/bucket/x.db``, which fails with a misleading "not found".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from unisondb.config import ServerConfig
from unisondb.errors import InvalidRequest

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

#: The server's default ``--data-dir`` (``./data``); the offline tools use the same one.
DEFAULT_DATA_DIR = ServerConfig().data_dir


def _download_hint(url: str, scheme: str) -> str:
    tree = url.endswith("/")
    name = url.rstrip("/").rsplit("/", 1)[-1] or "download"
    if scheme == "s3":
        return f"download with aws s3 cp first: aws s3 cp {'--recursive ' if tree else ''}{url} ./{name}"
    if scheme == "gs":
        return f"download with gsutil cp first: gsutil cp {'-r ' if tree else ''}{url} ./{name}"
    if scheme in ("http", "https") and not tree:
        return f"download with curl first: curl -fLo ./{name} {url}"
    return "download it to a local path first and pass that path"


class LocalPath(click.Path):
    """``click.Path`` that refuses URLs with a one-line error naming the download command."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and (m := _URL.match(value)):
            scheme = m.group(1).lower()
            hint = _download_hint(value, scheme)
            opt = f"{param.opts[0]} " if param is not None and param.opts else ""
            raise InvalidRequest(f"{opt}{value}: remote URLs are not supported yet", hint=hint)
        return super().convert(value, param, ctx)


def data_dir_option(ctx: click.Context, value: Path | None) -> Path:
    """``--data-dir`` of the subcommand, else the one given to ``unisondb`` itself, else the
    server's default ``./data`` (so ``unisondb restore`` finds what ``unisondb`` serves)."""
    if value is not None:
        return value
    parent = ctx.parent.params.get("data_dir") if ctx.parent is not None else None
    return DEFAULT_DATA_DIR if parent is None else Path(parent)
