"""The ``--from s3://…`` options shared by ``restore``, ``backup list`` and ``backup verify``.

One definition, so the three commands take the same endpoint, addressing and key options and open
the archive the same way. Credentials are never options: boto3 reads the standard AWS environment
variables and files (docs/ARCHIVE.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from unisondb.cli.paths import LocalPath

if TYPE_CHECKING:  # boto3 is slow to import: only when --from is given
    from unisondb.archive.objectfmt import ArchiveKey
    from unisondb.archive.store import ArchiveURL, ObjectStore

F = TypeVar("F", bound=Callable[..., Any])


def archive_options(func: F) -> F:
    """``--from``, ``--archive-endpoint``, ``--archive-path-style``, ``--archive-key-file``."""
    for option in reversed(
        [
            click.option(
                "--from",
                "from_url",
                metavar="s3://BUCKET/PREFIX",
                default=None,
                help="Read from this archive (docs/ARCHIVE.md): the --archive-url a server archived to.",
            ),
            click.option(
                "--archive-endpoint",
                metavar="URL",
                default=None,
                help="With --from: S3-compatible endpoint. Default: AWS",
            ),
            click.option("--archive-path-style", is_flag=True, help="With --from: path-style addressing."),
            click.option(
                "--archive-key-file",
                type=LocalPath(path_type=Path, dir_okay=False),
                default=None,
                help="With --from: the key an encrypted archive was written with.",
            ),
        ]
    ):
        func = option(func)
    return func


@dataclass(frozen=True)
class ArchiveSource:
    """An opened ``--from``: the store, the parsed URL and the key (None: unencrypted)."""

    store: ObjectStore
    url: ArchiveURL
    key: ArchiveKey | None


def open_archive(url: str, endpoint: str | None, path_style: bool, key_file: Path | None) -> ArchiveSource:
    """Parse the URL and load the key first, so a typo fails before any request is made."""
    from unisondb.archive.objectfmt import load_key
    from unisondb.archive.store import ObjectStore, parse_url

    parsed = parse_url(url)
    key = load_key(key_file) if key_file is not None else None
    store = ObjectStore(parsed.bucket, endpoint_url=endpoint, path_style=path_style)
    return ArchiveSource(store, parsed, key)
