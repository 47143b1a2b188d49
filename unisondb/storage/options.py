"""The storage engine's options: one frozen dataclass the engine takes as it is.

It lives in ``storage/`` (not ``config.py``) so that the storage layer never imports the
configuration layer above it; ``config.py`` builds it from flags and TOML and re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineConfig:
    #: A segment is sealed once the next record would push it past this size.
    segment_size: int = 16 << 20
    #: A non-empty active segment older than this is sealed (0 disables).
    segment_max_age: float = 3600.0
    #: Sealed segments are deleted only when the checkpoint is durably past them AND they
    #: are older than this many seconds (so hourly backup loops never meet a hole).
    retention: float = 24 * 3600.0
    #: Initial LMDB map size; it doubles automatically when full.
    map_size: int = 1 << 30
    #: Most bytes of records one group commit writes before it fsyncs.
    max_group_bytes: int = 8 << 20
    #: While the disk is full (writes refused with 507), how often the engine retries what
    #: it could not finish (applying durable records to LMDB, creating the next segment).
    disk_full_retry: float = 1.0
    #: How long a write whose records are durable but not yet applied waits for a retry to
    #: succeed before it is answered 507 (counted in unisondb_writes_durable_but_failed).
    disk_full_hold: float = 2.0
    #: Bytes after the WAL write position kept zero-filled by a background thread (appending
    #: into existing zeros makes fdatasync skip the file-size update); 0 disables it.
    wal_preallocate: int = 2 << 20
    #: With other writers in flight, a group commit waits up to this many seconds for more
    #: to join before its fsync (never when a writer is alone); 0 disables the wait.
    group_commit_window: float = 250e-6
    #: When a write is acknowledged: "wal" (the default) once it is in the WAL and in the
    #: in-memory table, LMDB following from a separate thread (``storage/applier.py``);
    #: "lmdb" once it is in the WAL and in LMDB (one chain of two fsyncs). Equally durable:
    #: docs/ARCHITECTURE.md "Acknowledging at the WAL".
    ack: str = "wal"
    #: ``ack="wal"``: the in-memory table's bound in bytes of records and in records; when
    #: full, writes wait (backpressure) until LMDB has caught up.
    memtable_bytes: int = 8 << 20
    #: ``ack="wal"``: under load the applier commits LMDB at most this often (fewer, larger
    #: transactions: fewer LMDB fsyncs beside the WAL's, less applier CPU per write); sooner
    #: when the table is full, a seal or a snapshot waits for it, or the writes pause.
    #: 0: commit whenever records are waiting (docs/ARCHITECTURE.md, step 5).
    apply_interval: float = 0.05
    memtable_max_lag: int = 100_000
