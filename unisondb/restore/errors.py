"""Errors raised by restore and the backup/WAL inspection tools.

They extend the one error tree in ``unisondb/errors.py`` so the CLI maps them to exit
codes in one place (``cli.main``)::

    InvalidRequest (exit 2)
    ├── BadTarget            --target-* before the snapshot or past the available WAL
    ├── CompressedInput      a compressed file whose content is not a known input
    └── EncryptedInput       a .gpg file: decrypt it first (the hint gives the command)
    Conflict (exit 5)
    ├── DataExists           the namespace holds data and --force was not given
    └── BackupMismatch       files that do not belong together (namespace, duplicate ids,
                             snapshot vs. WAL history)
    StorageError (exit 6)
    └── BackupCorrupt        checksum mismatch, unsound LMDB file, damaged segment
    CorruptLog → LsnGap (exit 6)  missing LSN ranges (from unisondb.errors)
"""

from __future__ import annotations

from unisondb.errors import Conflict, InvalidRequest, StorageError


class BadTarget(InvalidRequest):
    """The requested target cannot be reached with the given backup set."""


class CompressedInput(InvalidRequest):
    """A compressed file was given where a raw snapshot or segment is needed."""


class EncryptedInput(InvalidRequest):
    """An OpenPGP-encrypted file was given; UnisonDB never holds decryption keys."""


class DataExists(Conflict):
    """The target namespace already holds data and ``--force`` was not given."""


class BackupMismatch(Conflict):
    """The backup files do not form one history of one namespace."""


class BackupCorrupt(StorageError):
    """A backup file fails its checksum or structural check."""
