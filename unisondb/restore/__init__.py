"""Offline restore and backup inspection.

Pipeline (each stage its own module, each testable alone)::

    sources.py    what an input file is (segment/snapshot/sidecar/archive/encrypted) and its
                  plain bytes (gzip, zstd and tar inputs are read directly)
    inventory.py  what is on disk: snapshot + checkpoint, segments (header/footer), sidecars,
                  the target namespace (read-only)
    timeline.py   which segments continue the snapshot's history (pure)
    plan.py       inventories + target → RestorePlan, refusing what cannot work (pure)
    verify.py     checksums, LMDB structure, record CRCs, exact time-target LSN (read-only)
    apply.py      stage + replay + atomic publish (the only stage that writes)

``restore()`` runs them in order; ``unisondb restore`` is a thin CLI over it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from unisondb.restore import sources
from unisondb.restore.apply import RestoreSummary, apply_plan
from unisondb.restore.inventory import collect_wal, inspect_snapshot, inspect_target
from unisondb.restore.plan import RestorePlan, Target, build_plan
from unisondb.restore.progress import Progress
from unisondb.restore.timefmt import parse_rfc3339
from unisondb.restore.verify import VerifiedPlan, verify_plan

__all__ = ["RestoreOutcome", "RestorePlan", "RestoreSummary", "Target", "VerifiedPlan", "prepare", "restore"]


@dataclass(slots=True)
class RestoreOutcome:
    verified: VerifiedPlan
    #: None for a dry run.
    summary: RestoreSummary | None
    prepare_seconds: float


def prepare(
    data_dir: Path,
    namespace: str,
    snapshot: Path,
    wal_dirs: Sequence[Path] = (),
    *,
    target: Target | None = None,
    history_choice: str | None = None,
    progress: Progress | None = None,
    check_namespace: bool = True,
    background_content: bool = False,
    deferred: bool = False,
) -> VerifiedPlan:
    """Inventory, plan and verify; raises if the restore cannot be done. Writes nothing.

    ``background_content``: see ``verify_plan`` (the caller then owns ``vp.content``).
    ``deferred``: a restore follows at once — only what planning needs is read here (the
    snapshot's meta pages, trailer and checkpoint; segment headers and footers), and
    ``apply_plan`` checks every byte as it reads it once to copy and replay."""
    progress = progress or Progress()
    snap = inspect_snapshot(snapshot, structural=not deferred)
    inv = collect_wal(wal_dirs)
    existing = inspect_target(data_dir, namespace)
    plan = build_plan(
        namespace,
        data_dir,
        snap,
        inv,
        target or Target(),
        history_choice=history_choice,
        existing=existing,
        check_namespace=check_namespace,
    )
    return verify_plan(plan, progress, background_content=background_content, deferred=deferred)


def restore(
    data_dir: Path,
    namespace: str,
    snapshot: Path,
    wal_dirs: Sequence[Path] = (),
    *,
    target_lsn: int | None = None,
    target_time: str | int | None = None,
    history_choice: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    check_namespace: bool = True,
) -> RestoreOutcome:
    """Restore ``namespace`` under ``data_dir`` from a snapshot plus WAL directories.

    ``target_time`` is RFC 3339 text or integer nanoseconds. Everything is verified before
    the target is touched; see ``apply.py`` for the publication protocol. Compressed
    inputs are decompressed into a private staging directory under the temp dir
    (``$TMPDIR``), removed before this returns.
    """
    with sources.staging():
        return _restore(
            data_dir,
            namespace,
            snapshot,
            wal_dirs,
            target_lsn=target_lsn,
            target_time=target_time,
            history_choice=history_choice,
            force=force,
            dry_run=dry_run,
            progress=progress,
            check_namespace=check_namespace,
        )


def _restore(
    data_dir: Path,
    namespace: str,
    snapshot: Path,
    wal_dirs: Sequence[Path],
    *,
    target_lsn: int | None,
    target_time: str | int | None,
    history_choice: str | None,
    force: bool,
    dry_run: bool,
    progress: Progress | None,
    check_namespace: bool,
) -> RestoreOutcome:
    started = time.perf_counter()
    progress = progress or Progress()
    data_dir, snapshot = data_dir.absolute(), snapshot.absolute()
    wal_dirs = [d.absolute() for d in wal_dirs]
    t_ns = parse_rfc3339(target_time) if isinstance(target_time, str) else target_time
    target = Target.from_options(target_lsn, t_ns)
    vp = prepare(
        data_dir,
        namespace,
        snapshot,
        wal_dirs,
        target=target,
        history_choice=history_choice,
        progress=progress,
        check_namespace=check_namespace,
        # A dry run verifies (and reports) everything here. A restore reads each input
        # byte once: apply_plan checks the snapshot while copying it and each segment
        # while replaying it, overlaps the content check with the replay, and publishes
        # nothing before every check passed.
        background_content=not dry_run,
        deferred=not dry_run,
    )
    prepare_seconds = time.perf_counter() - started
    vp.seconds = prepare_seconds
    if dry_run:
        progress.close()
        return RestoreOutcome(vp, None, prepare_seconds)
    try:
        summary = apply_plan(vp, force=force, progress=progress, started=started)
    finally:
        if vp.content is not None:
            vp.content.cancel()  # a no-op once it was waited for; stops workers on errors
        progress.close()
    return RestoreOutcome(vp, summary, prepare_seconds)
