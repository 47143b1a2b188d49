"""Check an LMDB data file *before* LMDB maps it, by reading (never mapping) its meta pages.

LMDB maps the whole file and trusts its meta page. A file shorter than the meta page
claims (``head -c 131072 snap.db > data.mdb``, an interrupted copy, a full disk) is
mapped anyway, and the first touch of a page past the end of the file kills the
process with SIGBUS: no error, no log line, exit status 135. So every place that hands a
B-tree file to LMDB (the server's ``BTree``, restore, ``backup verify``/``list``) calls
:func:`check_file` first; it raises :class:`~unisondb.errors.BadBTreeFile` with one line
naming the file, what is wrong and what to do. Foreign files (gzip, zstd, tar, gpg, a
WAL segment, text) are named, with the command that turns them into what is needed.

On-disk layout relied on (LMDB 0.9, data version 1, as bundled with py-lmdb 3.0:
``lmdb.version() == (0, 9, 36)``; 64-bit build, integers in host byte order, which is
little-endian on every platform we run on). Pages 0 and 1 are the two meta pages; page 1
starts at byte ``page_size``. Each page begins with the page header::

    Offset  Size  Field
    0       8     mp_pgno      page number (0 and 1 for the meta pages)
    8       2     mp_pad
    10      2     mp_flags     P_BRANCH 0x01, P_LEAF 0x02, P_OVERFLOW 0x04, P_META 0x08
    12      2     mp_lower     (branch/leaf) end of the node-offset array
    14      2     mp_upper     (branch/leaf) start of the node data

followed on a meta page by ``MDB_meta`` (136 bytes; offsets from the page start)::

    Offset  Size  Field
    16      4     mm_magic     0xBEEFC0DE
    20      4     mm_version   1 (MDB_DATA_VERSION of LMDB 0.9)
    24      8     mm_address   fixed-map address (unused)
    32      8     mm_mapsize   map size of the last writer
    40      48    mm_dbs[0]    the free-page DB (MDB_db below); its md_pad is the page size
    88      48    mm_dbs[1]    the main DB, whose keys are the named sub-databases
    136     8     mm_last_pg   highest page number in use
    144     8     mm_txnid     transaction that wrote this meta page

``MDB_db`` (48 bytes)::

    0  4 md_pad   4  2 md_flags   6  2 md_depth   8  8 md_branch_pages   16 8 md_leaf_pages
    24 8 md_overflow_pages        32 8 md_entries 40 8 md_root (P_INVALID = 2**64-1: empty)

A leaf node of the main DB (at the offset the page's node-offset array names, offsets at
16 + 2*i for i < (mp_lower - 16) / 2): ``mn_lo u16, mn_hi u16, mn_flags u16, mn_ksize u16``,
then the key (the sub-database name), then, with ``F_SUBDATA`` (0x02), its ``MDB_db``.

What LMDB itself checks when it opens a file (``mdb_env_read_header``): both meta pages
carry P_META, the magic and the version, and the one with the higher txnid wins (meta 0
on a tie). On top of that this module checks what LMDB does not, and whose absence is
the SIGBUS: the file holds every page up to ``mm_last_pg``. The file may be *longer*: a
snapshot carries a self-verifying trailer after its LMDB bytes, and a live ``data.mdb``
never shrinks. A file may also be legitimately *shorter* by a few free pages: LMDB does
not write a page that was allocated and freed in the same transaction ("loose" pages),
yet counts it in ``mm_last_pg``; we measured this on a live environment under a
put/delete load (3 of ~1560 pages, once in 3000 commits). So a short file is not refused
on the meta page alone: every page LMDB can reach is then walked (by reading page
headers and node arrays: branch children, overflow runs, sub-database roots), and the
file is accepted only if none of them lies past its end. That walk reads each reachable
page once and runs only in this rare case.

The check and the later ``lmdb.open`` are two steps: a file replaced in between is not
covered (nobody should rewrite a B-tree file under a process that opens it).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Literal

from unisondb.errors import BadBTreeFile, from_os_error

MAGIC = 0xBEEFC0DE
DATA_VERSION = 1
PAGE_HEADER_SIZE = 16
META_SIZE = 136
P_BRANCH, P_LEAF, P_META, P_LEAF2 = 0x01, 0x02, 0x08, 0x20
F_BIGDATA, F_SUBDATA = 0x01, 0x02
P_INVALID = (1 << 64) - 1
MIN_PAGE_SIZE = 256
MAX_PAGE_SIZE = 0x8000  # MAX_PAGESIZE of LMDB 0.9 (PAGEBASE 0)
#: Page header + MDB_meta: the bytes ``mdb_env_read_header`` needs from each meta page.
META_PAGE_BYTES = PAGE_HEADER_SIZE + META_SIZE

_PAGE_HEADER = struct.Struct("=QHHHH")  # pgno, pad, flags, lower, upper
_META = struct.Struct("=IIQQ48s48sQQ")  # magic, version, address, mapsize, free, main, last, txn
_DB = struct.Struct("=IHHQQQQQ")  # pad, flags, depth, branch, leaf, overflow, entries, root
_NODE = struct.Struct("=HHHH")  # lo, hi, flags, ksize

#: Whose file this is, for the advice: a snapshot given to an offline command, or the
#: ``<ns>/db/data.mdb`` the server (or a restore's staging) opens.
Role = Literal["snapshot", "btree"]
#: ``bad(problem, hint)``: builds the error for this file (see ``_check``).
_Bad = Callable[[str, str], BadBTreeFile]


@dataclass(frozen=True, slots=True)
class DbRecord:
    """One ``MDB_db``: a B-tree's root and counts."""

    flags: int
    depth: int
    entries: int
    root: int

    @classmethod
    def decode(cls, raw: bytes) -> DbRecord:
        _pad, flags, depth, _b, _l, _o, entries, root = _DB.unpack(raw)
        return cls(flags, depth, entries, root)


@dataclass(frozen=True, slots=True)
class BTreeFileInfo:
    """What the current meta page of an LMDB file says, after it was checked."""

    path: Path
    file_size: int
    page_size: int
    last_page: int
    txnid: int
    map_size: int
    #: Which meta page (0 or 1) is current: the one with the higher txnid.
    meta_page: int
    #: Entries per named sub-database (``kv``, ``meta``), read from the main DB's root
    #: page when that page is a leaf (always, for a handful of sub-databases); else empty.
    subdb_entries: dict[str, int] = field(default_factory=dict)
    #: Pages the meta counts but the file does not hold, all of them free (see docstring).
    free_tail_pages: int = 0

    @property
    def btree_bytes(self) -> int:
        """Bytes of LMDB pages the meta page accounts for: ``(last_page + 1) * page_size``."""
        return (self.last_page + 1) * self.page_size

    @property
    def entries(self) -> int | None:
        """Keys in the ``kv`` sub-database (UnisonDB's user keys), if it was cheap to read."""
        return self.subdb_entries.get("kv")


@dataclass(frozen=True, slots=True)
class _Meta:
    page_no: int
    page_flags: int
    magic: int
    version: int
    map_size: int
    free: DbRecord
    main: DbRecord
    page_size: int
    last_page: int
    txnid: int


def check_if_present(path: Path, role: Role = "btree") -> BTreeFileInfo | None:
    """:func:`check_file` if ``path`` exists; None if it does not (LMDB will create it)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise from_os_error(exc, path) from exc
    return check_file(path, role)


def check_file(
    path: Path, role: Role = "snapshot", *, shown: Path | None = None, walk: bool = False
) -> BTreeFileInfo:
    """Check that LMDB can map ``path`` without touching a byte past its end.

    ``walk``: also walk every page LMDB can reach (page headers and node arrays, never a
    value) and refuse a damaged structure — the structural check of restore and verify,
    used instead of ``lmdb.verify``, which rejects valid files (see ``_page_past_end``).

    Raises ``BadBTreeFile`` for an empty, zero-filled, truncated or foreign file, and the
    error tree's ``StorageError`` family for an unreadable one. ``shown``: the name the
    operator gave, when ``path`` is a decompressed copy of it.
    """
    what = "snapshot" if role == "snapshot" else "B-tree file"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            info = _check(f, shown or path, size, what, role, walk=walk)
            return replace(info, path=path)
    except IsADirectoryError:
        raise BadBTreeFile(
            f"{what} {path} is a directory, expected an LMDB data file",
            path=path,
            hint="pass the file itself (a copy of data.mdb)",
        ) from None
    except OSError as exc:
        raise from_os_error(exc, path) from exc


def _check(f: BinaryIO, path: Path, size: int, what: str, role: Role, *, walk: bool = False) -> BTreeFileInfo:
    def bad(problem: str, hint: str) -> BadBTreeFile:
        return BadBTreeFile(f"{what} {path} {problem}", path=path, hint=hint)

    again = _copy_again_hint(path, role)
    if size == 0:
        raise bad(
            "is empty (0 bytes): not an LMDB data file",
            again
            + (
                "; if this namespace was created just before a crash and never held data, "
                f"delete {path} and start again (the WAL is replayed into a new one)"
                if role == "btree"
                else ""
            ),
        )
    head = _read_at(f, 0, min(size, 4096))
    if (
        size < META_PAGE_BYTES
        and describe_foreign(head) is None
        and (size < 20 or head[16:20] == struct.pack("=I", MAGIC))
    ):
        raise bad(
            f"is cut short: {size} byte{'s' * (size != 1)}, less than one LMDB meta page "
            f"({META_PAGE_BYTES} bytes)",
            again,
        )
    if head[16:20] != struct.pack("=I", MAGIC):
        raise _foreign(f, path, size, head, what, role)
    m0 = _decode_meta(head[:META_PAGE_BYTES])
    _check_meta(m0, 0, bad, again)
    psize = m0.page_size
    if psize == 0 or psize & (psize - 1) or not MIN_PAGE_SIZE <= psize <= MAX_PAGE_SIZE:
        raise bad(
            f"has an impossible page size {psize} in its first meta page (want a power "
            f"of two in {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}): damaged",
            again,
        )
    if size < psize + META_PAGE_BYTES:
        raise bad(
            f"is cut short: {size} bytes end inside the second LMDB meta page "
            f"(bytes {psize}..{2 * psize - 1})",
            again,
        )
    m1 = _decode_meta(_read_at(f, psize, META_PAGE_BYTES))
    _check_meta(m1, 1, bad, again)
    if m1.page_size != psize:
        raise bad(
            f"has meta pages that disagree on the page size ({psize} and {m1.page_size}): damaged", again
        )
    # mdb_env_read_header: the higher txnid wins, meta 0 on a tie.
    current, meta = (1, m1) if m1.txnid > m0.txnid else (0, m0)
    if meta.last_page < 1:
        raise bad(
            f"has last page {meta.last_page} in meta page {current}, below the two meta "
            "pages themselves: damaged",
            again,
        )
    for name, db in (("main", meta.main), ("free-page", meta.free)):
        if db.root != P_INVALID and not 2 <= db.root <= meta.last_page:
            raise bad(
                f"names page {db.root} as the root of its {name} B-tree, outside pages "
                f"2..{meta.last_page} (meta page {current}, txn {meta.txnid}): damaged",
                again,
            )
    need = (meta.last_page + 1) * psize
    free_tail = 0
    if size < need:
        free_tail = _short_file_pages(f, size, need, psize, meta, current, bad, again)
    elif walk and (problem := _page_past_end(f, size, psize, meta)) is not None:
        raise bad(f"is not a sound LMDB file: {problem}", again)
    return BTreeFileInfo(
        path,
        size,
        psize,
        meta.last_page,
        meta.txnid,
        meta.map_size,
        current,
        _subdb_entries(f, size, psize, meta.main),
        free_tail,
    )


def _check_meta(m: _Meta, index: int, bad: _Bad, again: str) -> None:
    if not m.page_flags & P_META:
        raise bad(
            f"has no LMDB meta page at page {index} (page flags 0x{m.page_flags:04x}, "
            f"P_META 0x{P_META:02x} not set): damaged",
            again,
        )
    if m.magic != MAGIC:
        raise bad(
            f"has a bad magic 0x{m.magic:08x} in LMDB meta page {index} (want 0x{MAGIC:08X}): damaged", again
        )
    if m.version != DATA_VERSION:
        raise bad(
            f"is LMDB data version {m.version} (meta page {index}); this build reads "
            f"version {DATA_VERSION} (LMDB 0.9)",
            "open it with the LMDB version that wrote it, or use another copy",
        )


def _short_file_pages(
    f: BinaryIO, size: int, need: int, psize: int, meta: _Meta, current: int, bad: _Bad, again: str
) -> int:
    """Accept a file short by free pages only (see the module docstring), else refuse."""
    missing = -(-(need - size) // psize)
    claim = (
        f"is truncated: {size} bytes, but its meta page {current} (txn {meta.txnid}) "
        f"says the B-tree spans {need} bytes (pages 0..{meta.last_page}, "
        f"{psize}-byte pages)"
    )
    # Loose pages are few, all from the last transaction; a gap wider than the file
    # itself is a cut copy, and walking it would only chase a fiction.
    if missing > max(size // psize, 64):
        raise bad(claim, again)
    problem = _page_past_end(f, size, psize, meta)
    if problem is not None:
        raise bad(f"{claim}; {problem}", again)
    return missing


def _page_past_end(f: BinaryIO, size: int, psize: int, meta: _Meta) -> str | None:
    """Walk every page LMDB can reach; describe the first one the file does not hold.

    Reads page headers and node arrays only (branch children, overflow runs, sub-database
    roots), never a value. Damage found on the way (a page reached twice, a bad page type)
    is reported too: a file this short must prove every reachable page is present.
    Deliberately not ``lmdb.verify``: that verifier also rejects valid files (a big value
    overwritten by a small one in the same transaction keeps its longer overflow run).
    """
    stack = [
        (db.root, name)
        for name, db in (("free-page", meta.free), ("main", meta.main))
        if db.root != P_INVALID
    ]
    # One bit per page of the file (a set of ints would grow with the file: ~70 B a page).
    seen = bytearray(size // psize // 8 + 1)
    reached = 0
    while stack:
        pgno, name = stack.pop()
        if (pgno + 1) * psize > size:
            return f"page {pgno} of the {name} B-tree is past the end of the file"
        if seen[pgno >> 3] & (1 << (pgno & 7)) or reached > meta.last_page:
            return f"page {pgno} of the {name} B-tree is reached twice: damaged"
        seen[pgno >> 3] |= 1 << (pgno & 7)
        reached += 1
        page = _read_at(f, pgno * psize, psize)
        _pgno, _pad, flags, lower, upper = _PAGE_HEADER.unpack_from(page)
        if not flags & (P_BRANCH | P_LEAF) or not PAGE_HEADER_SIZE <= lower <= upper <= psize:
            return f"page {pgno} of the {name} B-tree is not a B-tree page: damaged"
        if flags & P_LEAF2:  # fixed-size duplicate keys: no nodes, no page references
            continue
        n = (lower - PAGE_HEADER_SIZE) // 2
        for off in struct.unpack_from(f"={n}H", page, PAGE_HEADER_SIZE):  # the node-offset array
            if off + _NODE.size > psize:
                return f"page {pgno} of the {name} B-tree has a node past its end: damaged"
            lo, hi, nflags, ksize = _NODE.unpack_from(page, off)
            if flags & P_BRANCH:  # 0.9: the child's page number spans lo, hi and flags
                stack.append((lo | hi << 16 | nflags << 32, name))
                continue
            data_at = off + _NODE.size + ksize
            if nflags & F_BIGDATA:
                if data_at + 8 > psize:
                    return f"page {pgno} of the {name} B-tree has a node past its end: damaged"
                (ov,) = struct.unpack_from("=Q", page, data_at)
                if (ov + 1) * psize > size:
                    return f"overflow page {ov} of the {name} B-tree is past the end of the file"
                (run,) = struct.unpack_from("=I", _read_at(f, ov * psize + 12, 4))
                if (ov + max(run, 1)) * psize > size:
                    return (
                        f"overflow pages {ov}..{ov + run - 1} of the {name} B-tree end past "
                        "the end of the file"
                    )
            elif nflags & F_SUBDATA:  # a named sub-database or a key's duplicate tree
                if data_at + _DB.size > psize:
                    return f"page {pgno} of the {name} B-tree has a node past its end: damaged"
                sub = DbRecord.decode(page[data_at : data_at + _DB.size])
                if sub.root != P_INVALID:
                    label = page[off + _NODE.size : data_at].decode("utf-8", errors="replace")
                    stack.append((sub.root, f"{name}/{label}" if name == "main" else name))
    return None


def _subdb_entries(f: BinaryIO, size: int, psize: int, main: DbRecord) -> dict[str, int]:
    """Entries per named sub-database, from the main DB's root page if it is a leaf."""
    if main.root == P_INVALID or main.depth != 1 or (main.root + 1) * psize > size:
        return {}
    page = _read_at(f, main.root * psize, psize)
    if len(page) < psize:
        return {}
    _pgno, _pad, flags, lower, upper = _PAGE_HEADER.unpack_from(page)
    if not flags & P_LEAF or not PAGE_HEADER_SIZE <= lower <= upper <= psize:
        return {}
    out: dict[str, int] = {}
    for i in range((lower - PAGE_HEADER_SIZE) // 2):
        (off,) = struct.unpack_from("=H", page, PAGE_HEADER_SIZE + 2 * i)
        if off + _NODE.size > psize:
            return {}
        lo, hi, nflags, ksize = _NODE.unpack_from(page, off)
        key_at = off + _NODE.size
        dsize = lo | (hi << 16)
        if not nflags & F_SUBDATA or dsize != _DB.size or key_at + ksize + dsize > psize:
            continue
        name = page[key_at : key_at + ksize].decode("utf-8", errors="replace")
        out[name] = DbRecord.decode(page[key_at + ksize : key_at + ksize + dsize]).entries
    return out


# --- foreign files ---


def _foreign(f: BinaryIO, path: Path, size: int, head: bytes, what: str, role: Role) -> BadBTreeFile:
    """The error for a file without an LMDB meta page at its start: say what it is instead."""
    looks = describe_foreign(head)
    if looks is not None:
        kind, command = looks
        target = "the snapshot" if role == "snapshot" else f"the result to {path}"
        hint = (
            f"{command.format(path=path, out=_plain_name(path))}, then use {target}"
            if command
            else _copy_again_hint(path, role)
        )
        return BadBTreeFile(
            f"{what} {path} is not an LMDB data file: it looks like {kind}", path=path, hint=hint
        )
    if _all_zero(f, size):
        return BadBTreeFile(
            f"{what} {path} is not an LMDB data file: all {size} bytes are zero (space "
            "allocated but never written: an interrupted copy or a crash during the copy)",
            path=path,
            hint=_copy_again_hint(path, role),
        )
    if head[:META_PAGE_BYTES].count(0) == META_PAGE_BYTES:
        problem = "its first page is zero bytes where the LMDB meta page belongs"
    else:
        problem = f"no LMDB meta page at the start (first bytes {head[:16].hex(' ')})"
    return BadBTreeFile(
        f"{what} {path} is not an LMDB data file: {problem}", path=path, hint=_copy_again_hint(path, role)
    )


def describe_foreign(head: bytes) -> tuple[str, str] | None:
    """(what the file looks like, command template with ``{path}``/``{out}``) or None.

    ``head`` is the file's first bytes (at least 512 to recognise a tar archive).
    """
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "a zstd-compressed file", "decompress it first: zstd -d {path} -o {out}"
    if head.startswith(b"\x1f\x8b"):
        return (
            "a gzip-compressed file (a .tar.gz archive holds several files: list it with tar -tzf)",
            "decompress it first: gzip -dc {path} > {out}",
        )
    if head.startswith(b"BZh") and head[3:4].isdigit():
        return "a bzip2-compressed file", "decompress it first: bzip2 -dc {path} > {out}"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "an xz-compressed file", "decompress it first: xz -dc {path} > {out}"
    if head[257:262] == b"ustar":
        return "a tar archive", "extract it first (tar -xf {path}) and use the file inside"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive", "extract it first (unzip {path}) and use the file inside"
    if head.startswith(b"-----BEGIN PGP") or _looks_like_openpgp(head):
        return "a gpg-encrypted file", "decrypt it first: gpg --decrypt -o {out} {path}"
    if head.startswith(b"UDBW"):
        return (
            "a UnisonDB WAL segment, not a B-tree snapshot",
            "pass its directory with --wal DIR, and a snapshot file with --snapshot",
        )
    if head.startswith(b"SQLite format 3\x00"):
        return "an SQLite database", ""
    for off in (8, 12, 24):  # 32-bit page headers, LMDB 1.0's 24-byte page header
        if head[off : off + 4] == struct.pack("=I", MAGIC):
            return (f"an LMDB file of another LMDB version or a 32-bit build (page header {off} bytes)", "")
    if head[16:20] == struct.pack(">I" if struct.pack("=I", 1)[0] == 1 else "<I", MAGIC):
        return "an LMDB file from a machine of the other byte order", ""
    text = head[:256].rstrip(b"\0")
    if text and all(32 <= b < 127 or b in b"\t\r\n" for b in text):
        first = text.decode("ascii").strip().splitlines()[0][:48] if text.strip() else ""
        return f"a text file (begins {first!r})", ""
    return None


def _looks_like_openpgp(head: bytes) -> bool:
    """An OpenPGP message's first packet: encrypted session key, compressed or encrypted data.

    The packet header and the version byte after it must both fit (RFC 4880/9580), so
    random bytes match with a chance of about 1 in 10^4, not 1 in 50.
    """
    if len(head) < 8 or not head[0] & 0x80:
        return False
    b = head[0]
    if b & 0x40:  # new format: tag in 6 bits, length in 1, 2 or 5 octets
        tag, first = b & 0x3F, head[1]
        body = 2 if first < 192 else 3 if first < 224 else 6 if first == 255 else 2
    else:  # old format: tag in 4 bits, length type in 2
        tag, ltype = (b >> 2) & 0x0F, b & 0x03
        body = 1 + {0: 1, 1: 2, 2: 4, 3: 0}[ltype]
    version = head[body]
    return (
        (tag == 1 and version == 3)
        or (tag == 3 and version in (4, 5, 6))
        or (tag == 8 and version in (1, 2, 3))
        or (tag == 18 and version in (1, 2))
    )


# --- helpers ---


def _copy_again_hint(path: Path, role: Role) -> str:
    if role == "snapshot":
        return (
            "the copy is incomplete or damaged: fetch it again (compare it with its "
            ".sha256) or use another snapshot"
        )
    return (
        f"if {path.name} was copied from a snapshot, copy it again (compare it with the "
        "snapshot's .sha256) or rebuild the namespace with 'unisondb restore'"
    )


def _plain_name(path: Path) -> Path:
    for suffix in (".zst", ".gz", ".bz2", ".xz", ".gpg", ".asc", ".tar", ".tgz", ".zip"):
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path.with_name(path.name + ".raw")


def _decode_meta(raw: bytes) -> _Meta:
    pgno, _pad, flags, _lower, _upper = _PAGE_HEADER.unpack_from(raw)
    magic, version, _addr, mapsize, free, main, last, txnid = _META.unpack_from(raw, PAGE_HEADER_SIZE)
    free_db = DbRecord.decode(free)
    psize = _DB.unpack(free)[0]  # mm_psize aliases the free DB's md_pad
    return _Meta(pgno, flags, magic, version, mapsize, free_db, DbRecord.decode(main), psize, last, txnid)


def _read_at(f: BinaryIO, offset: int, n: int) -> bytes:
    # One pread of exactly n bytes: a seek and a buffered read cost two system calls and
    # fill a buffer twice the size of a page (the walk reads pages in tree order).
    return os.pread(f.fileno(), n, offset)


def _all_zero(f: BinaryIO, size: int) -> bool:
    f.seek(0)
    while chunk := f.read(1 << 20):
        if chunk.count(0) != len(chunk):
            return False
    return size > 0
