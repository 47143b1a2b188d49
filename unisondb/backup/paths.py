r"""Path safety for the backup API: client paths are relative to ``backups/<namespace>/``.

Two steps, both raising ``InvalidRequest`` (400) with the rule that was broken:

1. ``parse_relative`` checks the string alone, *before* any normalisation: not empty or
   blank, no NUL or other control character, not absolute, no ``..`` component (so
   ``a/../b`` is refused even though it would stay inside), no percent-encoded ``..``,
   components of at most 255 bytes (a file name at most 244, so ``.sha256.tmp`` still fits)
   and at most 4096 bytes in all. A file path must name
   a file: not the root itself (``.``, ``./``), no trailing ``/``, and not a name ending in
   ``.tmp`` (reserved for files being written, deleted at startup), ``.sha256`` (reserved
   for checksum sidecars) or a WAL segment's ``.wal``/``.wal.gz``/``.wal.zst`` (a snapshot
   under such a name would be read as a segment by ``verify`` and ``restore``).

   The one rule for encoded separators and dot segments: a component is refused when any
   piece of it, after percent-decoding until it no longer changes and splitting at ``/``
   and ``\``, is ``..`` — so ``%2e%2e``, ``..%2f``, ``%2e%2e%2fx``, ``..\x`` and
   ``%252e%252e`` are all refused. Everything else is literal: the server never decodes a
   backup path, so ``%2e``, ``a%2fb`` and ``back\slash`` are ordinary names. The reason:
   a tool further down (a proxy, an upload script mapping paths to object keys, a Windows
   copy) may decode or split where we do not, and must not find a ``..`` there.

   The rules come in two groups, each implemented once. ``_check_text`` holds those a
   regular expression can state, and ``text_pattern`` spells them as the one pattern
   ``/openapi.json`` serves (so a client can check a path before sending it); a literal
   ``..`` piece (after ``/`` or ``\``) is one of them. ``check_format`` holds the rest, the
   schema's ``format`` (``FORMAT_RULES``): the byte limits and a ``..`` that only appears
   after percent-decoding. ``tests/unit/api/test_spec_agreement.py`` checks that the
   validator accepts exactly what the pattern matches and ``check_format`` allows.
2. ``resolve`` looks at the file system: every prefix of the path, with symbolic links
   followed (``os.path.realpath``), must stay inside the root's real location. That covers a
   link to ``/etc`` as much as a link to another namespace's backup root.

``open_dir`` then walks the *resolved* location from the root one component at a time with
``O_NOFOLLOW``, creating what is missing. Since ``resolve`` already replaced every link by
its target, a link met during the walk was put there after validation; the walk refuses it
(409) instead of following it. Files are then created relative to the opened directory's
descriptor (see ``files.TargetDir``), so no later path lookup can be redirected either.

Residual race (documented in docs/OPERATIONS.md): a process that can write inside the
backup root can *rename* an already opened directory to somewhere outside it; the backup
then lands there. Such a process could write there itself, so this gives it nothing new.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from unisondb.errors import Conflict, InvalidRequest, from_os_error
from unisondb.storage import fsutil

MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096
#: A backup file gets ``.sha256`` and ``.tmp`` appended while it is written; each must fit.
MAX_FILE_NAME_BYTES = MAX_COMPONENT_BYTES - len(".sha256.tmp")
#: Suffixes a backup file name may not end with, and why.
RESERVED_SUFFIXES = {
    ".tmp": "reserved for files being written; leftovers are deleted at server start",
    ".sha256": "reserved for the checksum sidecar written next to every backup file",
    ".wal": "reserved for WAL segments: verify and restore would read it as one",
    ".wal.gz": "reserved for compressed WAL segments: verify and restore would read it as one",
    ".wal.zst": "reserved for compressed WAL segments: verify and restore would read it as one",
}
#: What ``str.isspace`` calls whitespace: a path made only of these is blank (refused).
#: Spelled out so that ``text_pattern`` uses the very same set (a unit test compares it with
#: ``str.isspace`` over all of Unicode).
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
#: Control characters (refused anywhere): a regex class body, used by the check and the pattern.
_CONTROL_CLASS = "\\u0000-\\u001f\\u007f"
_CONTROL = re.compile(f"[{_CONTROL_CLASS}]")
#: The rules ``text_pattern`` cannot state; the schema names them as its ``format``.
FORMAT_RULES = (
    f"components at most {MAX_COMPONENT_BYTES} UTF-8 bytes, a file name at most "
    f"{MAX_FILE_NAME_BYTES}, the whole path at most {MAX_PATH_BYTES}; no component that, "
    "percent-decoded until it stops changing and split at '/' and '\\', has a '..' piece"
)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class Resolved:
    """A validated location inside a namespace's backup root.

    ``parts`` are the components below the root's real location after every symbolic link
    was resolved; ``path`` is that location spelled under the root as the server names it
    (``<dataDir>/backups/<ns>/...``), which is what responses and errors show.
    """

    root: Path
    root_real: Path
    parts: tuple[str, ...]
    is_file: bool

    @property
    def path(self) -> Path:
        return self.root.joinpath(*self.parts)

    @property
    def dir_parts(self) -> tuple[str, ...]:
        return self.parts[:-1] if self.is_file else self.parts

    @property
    def name(self) -> str:
        assert self.is_file
        return self.parts[-1]


def parse_relative(value: Any, field: str, *, is_file: bool) -> tuple[str, ...]:
    """Validate a client path string; return its components without ``.`` and empty ones.

    Two groups of rules, each stated once: ``_check_text`` holds those ``text_pattern``
    spells as a regular expression, ``check_format`` the rest (the schema's ``format``).
    """
    if value is None:
        raise InvalidRequest(f"missing field '{field}': a relative path inside backups/<namespace>/")
    if not isinstance(value, str):
        raise InvalidRequest(
            f"{field} must be a string (a relative path inside backups/<namespace>/), got {_json_type(value)}"
        )
    _check_text(value, field, is_file=is_file)
    check_format(value, field, is_file=is_file)
    return tuple(c for c in value.split("/") if c not in ("", "."))


def _check_text(value: str, field: str, *, is_file: bool) -> None:
    """The rules ``text_pattern`` states (keep the two in step; a unit test compares them)."""
    if not value.strip(WHITESPACE):
        raise InvalidRequest(f"{field} must not be empty")
    if "\x00" in value:
        raise InvalidRequest(f"{field} must not contain a NUL byte")
    if _CONTROL.search(value):
        raise InvalidRequest(
            f"{field} must not contain control characters (newline, tab, ...): they break "
            "sha256sum sidecars and shell scripts"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{field} must be valid UTF-8") from None
    if value.startswith("/"):
        raise InvalidRequest(
            f"{field} must be a relative path inside backups/<namespace>/; absolute paths "
            f"are rejected: {value!r}"
        )
    components = value.split("/")
    for comp in components:
        if comp == "..":
            raise InvalidRequest(
                f"{field} must not contain '..' components (checked before normalisation, "
                f"so 'a/../b' is rejected too): {value!r}"
            )
        if ".." in comp.split("\\"):
            raise InvalidRequest(
                f"{field} must not contain a '..' between backslash separators ({comp!r}: a "
                f"Windows copy would read it as the parent directory): {value!r}"
            )
    if not is_file:
        return
    if all(c in ("", ".") for c in components):
        raise InvalidRequest(
            f"{field} names the backup root itself; give a file name such as 'snapshots/users.db': {value!r}"
        )
    if components[-1] in ("", "."):
        raise InvalidRequest(
            f"{field} must name a file, not a directory (it ends with '/' or '/.'): {value!r}"
        )
    for suffix, why in RESERVED_SUFFIXES.items():
        if components[-1].endswith(suffix):
            raise InvalidRequest(f"{field} must not end with '{suffix}' ({why}): {value!r}")


def check_format(value: str, field: str, *, is_file: bool) -> None:
    """The rules no pattern states (``FORMAT_RULES``): byte limits, a '..' behind encoding."""
    size = len(value.encode("utf-8", errors="surrogatepass"))
    if size > MAX_PATH_BYTES:
        raise InvalidRequest(f"{field} is too long: {size} bytes (max {MAX_PATH_BYTES})")
    components = value.split("/")
    for comp in components:
        if _hides_dot_dot(comp):
            raise InvalidRequest(
                f"{field} must not contain a percent-encoded '..' component or a '..' behind "
                f"an encoded separator ({comp!r}): {value!r}"
            )
        nbytes = len(comp.encode("utf-8", errors="surrogatepass"))
        if nbytes > MAX_COMPONENT_BYTES:
            raise InvalidRequest(
                f"{field}: path component too long: {nbytes} bytes "
                f"(max {MAX_COMPONENT_BYTES}): {comp[:40]!r}..."
            )
    nbytes = len(components[-1].encode("utf-8", errors="surrogatepass"))
    if is_file and nbytes > MAX_FILE_NAME_BYTES:
        raise InvalidRequest(
            f"{field}: path component too long: the file name is {nbytes} bytes (max "
            f"{MAX_FILE_NAME_BYTES}, leaving room for the '.sha256.tmp' the server appends)"
        )


def text_pattern(*, is_file: bool) -> str:
    """The rules of ``parse_relative`` that a regular expression can state, as one pattern.

    Written in the common subset of ECMA-262 (JSON Schema's dialect) and Python ``re``:
    ``\\uXXXX`` escapes, character classes, lookaheads. A string that passes
    ``parse_relative`` matches it; one that matches it passes unless it breaks one of
    ``FORMAT_RULES``.
    """

    def esc(chars: str) -> str:
        return "".join(f"\\u{ord(c):04x}" for c in chars)

    # Lone surrogates (not UTF-8 either) need no rule here: they are not Unicode scalar
    # values, so no JSON Schema validator can hold one, and the JSON parser refuses them.
    bad = _CONTROL_CLASS
    text = f"[^{bad}]"
    blank = esc("".join(c for c in WHITESPACE if not _CONTROL.match(c)))
    rules = [
        "(?!/)",  # relative
        # no '..' piece of a component split at '/' and '\\' (literal or behind a backslash)
        f"(?!(?:{text}*[/\\\\])?\\.\\.(?:[/\\\\]|$))",
    ]
    if is_file:
        rules.append(f"(?!(?:{text}*/)?\\.?$)")  # names a file: no trailing '/' or '/.', not '.'
        suffixes = "|".join(re.escape(s) for s in RESERVED_SUFFIXES)
        rules.append(f"(?!{text}*(?:{suffixes})$)")
    # Not blank: optional whitespace, then one character that is not, then anything allowed.
    return "^" + "".join(rules) + f"[{blank}]*[^{bad}{blank}]{text}*$"


def _hides_dot_dot(comp: str) -> bool:
    """True if ``comp`` decodes (repeatedly) to something with a ``..`` piece (see module doc).

    Only what percent-decoding changes: a literal ``..`` (after ``/`` or ``\\``) is
    ``_check_text``'s rule, so this one is exactly what the pattern cannot see.
    """
    decoded = comp
    for _ in range(8):  # %25 nesting deeper than this is refused outright below
        once = unquote(decoded)
        if once == decoded:
            break
        decoded = once
    else:
        return True
    return decoded != comp and ".." in decoded.replace("\\", "/").split("/")


def resolve(root: Path, parts: tuple[str, ...], field: str, *, is_file: bool) -> Resolved:
    """Check the on-disk meaning of ``parts`` below ``root`` (symlinks followed)."""
    root_abs = Path(os.path.abspath(root))
    root_real = Path(os.path.realpath(root_abs))
    shown = "/".join(parts) or "."
    for i in range(1, len(parts) + 1):
        real = os.path.realpath(root_abs.joinpath(*parts[:i]))
        if not _inside(real, root_real):
            via = "/".join(parts[:i])
            raise InvalidRequest(
                f"{field} {shown!r} leaves the backup root {root_abs}: {via!r} resolves to "
                f"{real} (symbolic links are followed; only paths inside "
                "backups/<namespace>/ are allowed)"
            )
    final = Path(os.path.realpath(root_abs.joinpath(*parts)))
    if not _inside(final, root_real):
        # Every prefix was inside a moment ago: a link was swapped in while we looked.
        raise Conflict(
            f"{field} {shown!r} changed while it was being checked (a path "
            "component was replaced, e.g. by a symbolic link); nothing was written"
        )
    rel = final.relative_to(root_real).parts
    if len(str(root_abs.joinpath(*rel)).encode("utf-8")) >= MAX_PATH_BYTES:
        raise InvalidRequest(f"{field} is too long once placed under {root_abs}")
    res = Resolved(root_abs, root_real, rel, is_file)
    if is_file and not rel:
        raise InvalidRequest(f"{field} {shown!r} resolves to the backup root itself")
    # Every existing directory component must be a directory (a file there is named now,
    # rather than an ENOTDIR later). A well-formed path that collides with what is already
    # on disk is a conflict with the current state (409), not a malformed request (400).
    for i in range(1, len(res.dir_parts) + 1):
        st = _lstat(root_real.joinpath(*rel[:i]))
        if st is None:
            break
        if not stat.S_ISDIR(st.st_mode):
            raise Conflict(f"{field} {shown!r}: {root_abs.joinpath(*rel[:i])} exists and is not a directory")
    if is_file:
        st = _lstat(final)
        if st is not None and not stat.S_ISREG(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise Conflict(f"{field} {shown!r}: {res.path} exists and is {what}")
    return res


def open_dir(res: Resolved) -> int:
    """Open (creating what is missing) the directory of ``res``; return its descriptor.

    Creation happens one component at a time relative to the parent's descriptor, each new
    directory made durable by fsyncing its parent. Errors name the directory that refused
    the write, e.g. ``permission denied: <dataDir>/backups/users/wal``.
    """
    try:
        os.makedirs(res.root, mode=0o700, exist_ok=True)
        fd = os.open(res.root_real, _DIR_FLAGS)
    except OSError as exc:
        raise _changed(exc, res.root) from exc
    here = res.root
    try:
        for comp in res.dir_parts:
            created = False
            try:
                os.mkdir(comp, 0o700, dir_fd=fd)
                created = True
            except FileExistsError:
                pass
            except OSError as exc:
                raise _changed(exc, here) from exc
            child = here / comp
            try:
                nfd = os.open(comp, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise Conflict(
                        f"{child} changed while the backup was being prepared (it is now a "
                        "symbolic link or not a directory); refusing to follow it"
                    ) from exc
                raise _changed(exc, child) from exc
            if created:
                try:
                    # 0700 whatever the umask: backups hold every value in the namespace.
                    os.fchmod(nfd, 0o700)
                    fsutil.fsync(fd)
                except OSError as exc:
                    os.close(nfd)
                    raise from_os_error(exc, here) from exc
            os.close(fd)
            fd, here = nfd, child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _changed(exc: OSError, path: Path) -> Exception:
    """A directory that vanished or stopped being one since ``resolve`` is a race: 409."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
        return Conflict(
            f"{path} changed while the backup was being prepared (removed, or "
            f"replaced by a file or link): {exc.strerror}; nothing was written"
        )
    return from_os_error(exc, path)


def _inside(real: str | Path, root_real: Path) -> bool:
    r = str(real)
    base = str(root_real)
    return r == base or r.startswith(base.rstrip(os.sep) + os.sep)


def _lstat(p: Path) -> os.stat_result | None:
    try:
        return os.lstat(p)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise from_os_error(exc, p) from exc


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
