"""Online backups of one namespace: sealed WAL segments and consistent B-tree snapshots.

Everything here writes only below ``<dataDir>/backups/<namespace>/`` (``layout.backup_root``):

* ``paths``      turns a client-supplied relative path into a location that is provably
                 inside that root (or a 400 naming the rule it broke) and opens/creates its
                 directory one component at a time, never through a symbolic link;
* ``files``      ``TargetDir``: durable, fd-relative file publishing (``<name>.tmp`` →
                 fsync → rename → directory fsync), streaming copies and hashing;
* ``checksum``   the ``<file>.sha256`` sidecars, in the format ``sha256sum -c`` reads;
* ``wal_backup`` copies sealed WAL segments (byte-identical, verified header/footer);
* ``snapshot``   copies the LMDB environment from one read transaction, with its checkpoint.

The HTTP edge (``unisondb.api.backup``) parses requests, runs these in worker threads and
records metrics. Nothing here knows about HTTP or Prometheus.
"""
