"""Schemathesis hooks (``SCHEMATHESIS_HOOKS=schemathesis_hooks``): the API's own ``format``s.

``/openapi.json`` states backup paths and keys as a ``pattern`` plus a ``format`` for what no
pattern can say (UTF-8 byte limits, a '..' hidden behind percent-encoding). Schemathesis
does not know those formats, so here they get generators: the document's pattern, filtered by
the validator's own format check (``paths.check_format``). The pattern rules are not
filtered, so a pattern looser than the handler still shows up as a rejected valid request.
"""

from __future__ import annotations

from collections.abc import Callable

import schemathesis
from hypothesis import strategies as st

from unisondb.api import openapi, parsing
from unisondb.backup import paths
from unisondb.errors import InvalidRequest
from unisondb.storage.record import MAX_KEY


def _format_holds(is_file: bool) -> Callable[[str], bool]:
    def check(value: str) -> bool:
        try:
            paths.check_format(value, "path", is_file=is_file)
        except InvalidRequest:
            return False
        return True

    return check


for _is_file, _name in ((False, openapi.BACKUP_DIR_FORMAT), (True, openapi.BACKUP_FILE_FORMAT)):
    schemathesis.openapi.format(
        _name,
        st.from_regex(paths.text_pattern(is_file=_is_file), fullmatch=True).filter(_format_holds(_is_file)),
    )
schemathesis.openapi.format(
    parsing.KEY_FORMAT, st.text(min_size=1).filter(lambda k: len(k.encode("utf-8")) <= MAX_KEY)
)
