"""``parsing.decode_b64`` (every PUT's value, lean or not) calls ``binascii`` directly: it
must accept and refuse exactly what ``base64.b64decode(..., validate=True)`` does, with the
same messages, since those reach clients in the 400 body."""

from __future__ import annotations

import base64
import binascii

import pytest

from unisondb.api.parsing import decode_b64
from unisondb.errors import InvalidRequest

VALUES = [
    "",
    "a",
    "ab",
    "abc",
    "abcd",
    "ab==",
    "a===",
    "ab=c",
    "abc=d",
    "====",
    "ab==ab==",
    "AAA=",
    "AA==",
    "A=A=",
    "-_-_",
    "ab+/",
    "ab cd",
    "ab\ncd",
    "YWJj\r\n",
    "\x00",
    "a\x00bc",
    "é",
    "ab\u00e9=",
    "\ud800",
    "aGVsbG8",
    "aGVsbG8==",
    base64.b64encode(bytes(range(256))).decode(),
]


@pytest.mark.parametrize("value", VALUES)
def test_decode_b64_is_base64_b64decode_validate(value: str) -> None:
    try:
        want: bytes | str = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        want = f"invalid base64 value: {exc}"
    try:
        got: bytes | str = decode_b64(value)
    except InvalidRequest as exc:
        got = exc.message
    assert got == want
