"""Continuous archiving of WAL segments and snapshots to S3-compatible object storage (docs/ARCHIVE.md).

Lower layers first: ``store`` (the object-store client), ``objectfmt`` (the self-describing object
format), ``naming`` (object names = the catalog), ``lease`` (one writer per prefix), ``manifest``;
``archiver`` uploads sealed segments.
"""
