"""The ``sha256sum`` checksum-file format: the one parser of ``.sha256`` sidecars.

Writers (``backup/checksum.py``) emit GNU text mode, one line::

    <64 hex digits><space><space><file name>\\n

Readers accept exactly the following, one entry per line:

* GNU text mode ``<hex>  <name>`` and binary mode ``<hex> *<name>`` (what ``sha256sum`` and
  ``sha256sum -b`` print);
* GNU's escaped form for names holding ``\\`` or a newline: the line starts with ``\\`` and
  the name uses ``\\\\`` and ``\\n`` (``sha256sum`` prints this itself);
* BSD tag form ``SHA256 (<name>) = <hex>`` (``sha256sum --tag``);
* a bare digest ``<hex>`` (``sha256sum f | cut -d' ' -f1 > f.sha256``); it names no file;
* hex in either case (normalised to lower case); ``\\n`` or ``\\r\\n`` line ends; trailing
  spaces and tabs after a line; blank lines anywhere; one or more entries.

Everything else is rejected as a whole (``None``): an empty file, a digest that is not 64
hex digits, a single space between digest and name, any line that is none of the above
(one bad line spoils the file: someone meant it to be checked and it cannot be), NUL bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_GNU = re.compile(r"^(\\?)([0-9a-fA-F]{64}) ([ *])(.+)$")
_BSD = re.compile(r"^SHA256 \((.+)\) = ([0-9a-fA-F]{64})$")
_BARE = re.compile(r"^([0-9a-fA-F]{64})$")


@dataclass(frozen=True, slots=True)
class Entry:
    """One checksum line: a lower-case hex digest and the file name it is for (if any)."""

    digest: str
    name: str | None
    binary: bool = False


def _unescape(name: str) -> str | None:
    out, i = [], 0
    while i < len(name):
        c = name[i]
        if c == "\\":
            nxt = name[i + 1 : i + 2]
            if nxt == "\\":
                out.append("\\")
            elif nxt == "n":
                out.append("\n")
            else:
                return None
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def parse(text: str) -> list[Entry] | None:
    """Every entry of a checksum file, or None if the text is not a valid one (see above)."""
    if "\0" in text:
        return None
    entries: list[Entry] = []
    for raw in text.split("\n"):
        line = raw.rstrip("\r").rstrip(" \t")
        if not line:
            continue
        if m := _GNU.match(line):
            escaped, digest, mode, name = m.groups()
            if escaped:
                unescaped = _unescape(name)
                if unescaped is None:
                    return None
                name = unescaped
            entries.append(Entry(digest.lower(), name, mode == "*"))
        elif m := _BSD.match(line):
            entries.append(Entry(m.group(2).lower(), m.group(1)))
        elif m := _BARE.match(line):
            entries.append(Entry(m.group(1).lower(), None))
        else:
            return None
    return entries or None


def line(digest: str, name: str) -> str:
    """The GNU text-mode line ``sha256sum`` prints for ``name`` (no escaping needed: the
    backup path rules reject control characters and backslashes are not special here)."""
    return f"{digest}  {name}\n"


def entry_for(entries: list[Entry], names: tuple[str, ...]) -> tuple[Entry, bool] | None:
    """The entry for a file known by any of ``names``; (entry, True) if one names it.

    Names compare by basename (``sha256sum dir/f`` writes the path given). A single entry
    that names another file (or none) is returned with False — the file was renamed, or
    the sidecar is a bare digest; the caller says so. Several entries none of which names
    the file cannot be told apart: None.
    """
    for e in entries:
        if e.name is not None and e.name.rsplit("/", 1)[-1] in names:
            return e, True
    if len(entries) == 1:
        return entries[0], False
    return None
