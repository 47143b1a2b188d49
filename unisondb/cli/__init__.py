"""The ``unisondb`` command. Errors from the UnisonDB tree become exit codes here, once.

``unisondb --data-dir DIR --http-addr HOST:PORT [--namespace NS]...`` starts the server
(the exact form the Backup and Restore document uses); subcommands are offline tools.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from unisondb import __version__
from unisondb.config import load_config
from unisondb.errors import UnisonDBError


@click.group(
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory holding every namespace (<dir>/<ns>/db, <dir>/<ns>/wal) and "
    "backups (<dir>/backups/<ns>). Default: ./data",
)
@click.option(
    "--http-addr",
    default=None,
    metavar="HOST:PORT",
    help="Address the HTTP API listens on. Default: 127.0.0.1:8080",
)
@click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    metavar="NS",
    help="Namespace to serve (repeatable). Namespaces found on disk are served too. Default: default",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="TOML config file; command-line flags override it.",
)
@click.option(
    "--wal-segment-size",
    default=None,
    metavar="SIZE",
    help="Seal a WAL segment when it would exceed SIZE (e.g. 16MiB). Default: 16MiB",
)
@click.option(
    "--wal-segment-max-age",
    default=None,
    metavar="DURATION",
    help="Seal a non-empty WAL segment older than DURATION (e.g. 1h; 0 = never). Default: 1h",
)
@click.option(
    "--wal-retention",
    default=None,
    metavar="DURATION",
    help="Keep sealed WAL segments at least this long after they are applied (e.g. 24h, 7d). Default: 24h",
)
@click.option(
    "--wal-preallocate",
    default=None,
    metavar="SIZE",
    help="Keep SIZE bytes after the WAL write position zero-filled in the background "
    "(cheaper fdatasync; 0 = off). Default: 2MiB",
)
@click.option(
    "--group-commit-window",
    default=None,
    metavar="DURATION",
    help="With other writers in flight, a group commit waits up to DURATION for more "
    "to join its fsync (never when a writer is alone; 0 = never). Default: 250us",
)
@click.option(
    "--ack",
    "ack",
    type=click.Choice(["lmdb", "wal"]),
    default=None,
    help="Acknowledge a write once it is in the WAL and the in-memory table, LMDB following "
    "from a separate thread (wal), or only once it is in the WAL and in LMDB (lmdb: two "
    "fsyncs per write). Default: wal",
)
@click.option(
    "--memtable-size",
    default=None,
    metavar="SIZE",
    help="With --ack wal: most bytes of acknowledged records not yet in LMDB; then "
    "writes wait for LMDB. Default: 8MiB",
)
@click.option(
    "--shutdown-timeout",
    default=None,
    metavar="DURATION",
    help="On SIGTERM/SIGINT exit within DURATION: in-flight writes finish, backups "
    "still running near the deadline are cancelled (503). Default: 30s",
)
@click.option(
    "--backup-rate-limit",
    default=None,
    metavar="BYTES/S",
    help="Hard cap on backup I/O of the whole server (e.g. 50MiB/s); backups are also paced "
    "by the WAL's fsync latency (docs/OPERATIONS.md). Default: 0 = no cap",
)
@click.option(
    "--disk-full-retry",
    default=None,
    metavar="DURATION",
    help="While the disk is full, retry the unfinished storage work this often; "
    "writes resume by themselves once space is freed. Default: 1s",
)
@click.option(
    "--disk-full-hold",
    default=None,
    metavar="DURATION",
    help="How long a write that is durable in the WAL but not yet in LMDB waits "
    "for that retry before it is answered 507. Default: 2s",
)
@click.option(
    "--log-format",
    type=click.Choice(["console", "json"]),
    default=None,
    help="Log format on stderr. Default: console",
)
@click.option(
    "--http-max-header-bytes",
    default=None,
    metavar="SIZE",
    help="Largest request line + headers; more gets 431. Default: 64KiB",
)
@click.option(
    "--http-max-headers",
    default=None,
    metavar="N",
    help="Most header fields in a request; more gets 431. Default: 100",
)
@click.option(
    "--http-max-request-line",
    default=None,
    metavar="SIZE",
    help="Longest request target (path + query); longer gets 414. Default: 8KiB",
)
@click.option(
    "--http-idle-timeout",
    default=None,
    metavar="DURATION",
    help="Close a connection idle this long (no request, or a client that stops reading). Default: 30s",
)
@click.option(
    "--http-header-timeout",
    default=None,
    metavar="DURATION",
    help="A request head must arrive within DURATION of its first byte (408). Default: 10s",
)
@click.option(
    "--http-body-timeout",
    default=None,
    metavar="DURATION",
    help="A request body must arrive within DURATION after its head (408). Default: 30s",
)
@click.option(
    "--http-max-connections",
    default=None,
    metavar="N",
    help="Connections served at once; beyond it 503 with Retry-After. Default: 1024",
)
@click.option(
    "--http-lean",
    type=click.Choice(["on", "off"]),
    default=None,
    help="Answer GET/PUT/DELETE of a key and /health in the HTTP protocol (docs/OPERATIONS.md). Default: on",
)
@click.option(
    "--auth-token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Require bearer tokens: a file of '<token> <role>' lines (read, write, admin), "
    "mode 0600. Default: no authentication",
)
@click.option(
    "--metrics-auth",
    type=click.Choice(["token", "none"]),
    default=None,
    help="Whether /metrics needs a read token when tokens are on. Default: token",
)
@click.option(
    "--insecure-no-auth",
    is_flag=True,
    default=None,
    help="Allow a non-loopback --http-addr without --auth-token-file.",
)
@click.option(
    "--tls-cert",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Serve HTTPS with this PEM certificate (chain); needs --tls-key.",
)
@click.option(
    "--tls-key",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="PEM private key of --tls-cert.",
)
@click.option(
    "--tls-client-ca",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Require client certificates signed by this PEM CA bundle.",
)
@click.option(
    "--tls-client-roles",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Give client certificates roles: lines 'cn:NAME ROLE' or 'sha256:HEX ROLE' "
    "(roles as for tokens; needs --tls-client-ca).",
)
@click.option(
    "--archive-url",
    default=None,
    metavar="s3://BUCKET/PREFIX",
    help="Archive every namespace continuously to this S3 prefix (docs/ARCHIVE.md). "
    "Credentials: the standard AWS variables and files. Default: off",
)
@click.option(
    "--archive-endpoint",
    default=None,
    metavar="URL",
    help="S3-compatible endpoint (SeaweedFS, MinIO, ...). Default: AWS",
)
@click.option(
    "--archive-path-style",
    is_flag=True,
    default=None,
    help="Path-style bucket addressing (most self-hosted S3 servers need it).",
)
@click.option(
    "--archive-key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Encrypt archive objects (AES-256-GCM) with this key (64 hex chars, mode 0600).",
)
@click.option(
    "--archive-interval",
    default=None,
    metavar="DURATION",
    help="Seal and archive the active WAL segment this long after new writes (the "
    "archive's RPO). Default: 1s",
)
@click.option(
    "--archive-snapshot-interval",
    default=None,
    metavar="DURATION",
    help="Publish a snapshot to the archive this often (0 = on demand only). Default: 24h",
)
@click.option(
    "--archive-retention-snapshots",
    default=None,
    metavar="N",
    help="Archive retention: keep the newest N snapshots (and the WAL they need). "
    "Default: 0 = keep everything (unless --archive-retention-age)",
)
@click.option(
    "--archive-retention-age",
    default=None,
    metavar="DURATION",
    help="Archive retention: keep every point of the last DURATION restorable (e.g. 7d). "
    "Default: 0 = keep everything (unless --archive-retention-snapshots)",
)
@click.option(
    "--archive-retention-interval",
    default=None,
    metavar="DURATION",
    help="How often archive retention prunes. Default: 1h",
)
@click.option(
    "--archive-rate-limit",
    default=None,
    metavar="BYTES/S",
    help="Bound the archive's upload bandwidth (e.g. 20MiB/s). Default: 0 = unlimited",
)
@click.version_option(__version__, prog_name="unisondb")
@click.pass_context
def cli(
    ctx: click.Context,
    /,
    data_dir: Path | None,
    http_addr: str | None,
    namespaces: tuple[str, ...],
    config_file: Path | None,
    wal_segment_size: str | None,
    wal_segment_max_age: str | None,
    wal_retention: str | None,
    wal_preallocate: str | None,
    group_commit_window: str | None,
    ack: str | None,
    memtable_size: str | None,
    shutdown_timeout: str | None,
    backup_rate_limit: str | None,
    disk_full_retry: str | None,
    disk_full_hold: str | None,
    log_format: str | None,
    **http_flags: Any,
) -> None:
    """UnisonDB: a log-native key-value database server.

    Without a subcommand, starts the server. It stops gracefully on SIGTERM or SIGINT:
    in-flight writes finish, the WAL is synced and LMDB is closed.
    """
    if ctx.invoked_subcommand is not None:
        return
    from unisondb.server import serve

    cfg = load_config(
        config_file,
        data_dir=data_dir,
        http_addr=http_addr,
        namespaces=namespaces,
        overrides={
            "segment_size": wal_segment_size,
            "segment_max_age": wal_segment_max_age,
            "retention": wal_retention,
            "preallocate": wal_preallocate,
            "group_commit_window": group_commit_window,
            "ack": ack,
            "memtable_size": memtable_size,
            "shutdown_timeout": shutdown_timeout,
            "backup_rate_limit": backup_rate_limit,
            "disk_full_retry": disk_full_retry,
            "disk_full_hold": disk_full_hold,
        },
        http_overrides={k[5:]: v for k, v in http_flags.items() if k.startswith("http_")},
        auth_overrides={
            "token_file": http_flags["auth_token_file"],
            "metrics": http_flags["metrics_auth"],
            "insecure_no_auth": http_flags["insecure_no_auth"],
        },
        tls_overrides={
            "cert": http_flags["tls_cert"],
            "key": http_flags["tls_key"],
            "client_ca": http_flags["tls_client_ca"],
            "client_roles": http_flags["tls_client_roles"],
        },
        archive_overrides={k[8:]: v for k, v in http_flags.items() if k.startswith("archive_")},
    )
    if log_format:
        from dataclasses import replace

        cfg = replace(cfg, log_format=log_format)
    ctx.exit(serve(cfg))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and translate UnisonDB errors into exit codes."""
    try:
        cli.main(args=argv, prog_name="unisondb", standalone_mode=False)
    except UnisonDBError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code or 0)
    except click.ClickException as exc:
        click.echo(usage_error_line(exc), err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    return 0


def usage_error_line(exc: click.ClickException) -> str:
    """Click's errors in the one documented form, ``error: <what> (hint: <what to do>)``.

    Click itself prints three lines (usage, "Try --help", "Error: ..."); scripts that grep
    stderr or log it line by line expect one, like every other UnisonDB error.
    """
    text = " ".join(exc.format_message().split()).rstrip(".")
    text = text[:1].lower() + text[1:]
    if isinstance(exc, click.UsageError):
        command = exc.ctx.command_path if exc.ctx is not None else "unisondb"
        return f"error: {text} (hint: see '{command} --help')"
    return f"error: {text}"


# Offline tools (restore, backup inspection, WAL inspection): see docs/RESTORE.md.
from unisondb.cli.backup_cmd import backup_group  # noqa: E402
from unisondb.cli.restore import restore_cmd  # noqa: E402
from unisondb.cli.wal_cmd import wal_group  # noqa: E402

cli.add_command(restore_cmd)
cli.add_command(backup_group)
cli.add_command(wal_group)

if __name__ == "__main__":
    sys.exit(main())
