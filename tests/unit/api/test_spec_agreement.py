"""The OpenAPI document and the handlers' validators agree, input by input.

``/openapi.json`` states each input rule as a JSON Schema ``pattern`` generated from the
validator's own constants (``backup/paths.py`` ``text_pattern``, ``api/parsing.py``
``KEY_PATTERN``), plus a ``format`` for what no pattern can say (UTF-8 byte limits, a ``..``
hidden behind percent-encoding). For a table of good and bad inputs, and for generated
ones, this checks both directions:

* whatever the validator accepts, the pattern matches (the spec is never stricter), and
* whatever the pattern matches but the validator refuses breaks a ``format`` rule
  (``paths.check_format``, the one implementation of those; the spec is never looser
  except where its ``format`` text says so).

Patterns are JSON Schema's ECMA-262 dialect, where ``$`` is the end of the input; Python's
``$`` also matches before a final newline, so it is read as ``\\Z`` here.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unisondb.api import openapi, parsing
from unisondb.backup import paths
from unisondb.errors import InvalidRequest
from unisondb.storage.record import MAX_KEY

SPEC = openapi.build_openapi(1 << 20, namespaces=["default"])
OPS = SPEC["paths"]


def _body_schema(route: str, method: str = "post") -> dict[str, Any]:
    schema: dict[str, Any] = OPS[route][method]["requestBody"]["content"]["application/json"]["schema"]
    return schema


def _matches(rule: dict[str, Any], value: str) -> bool:
    """``minLength`` and ``pattern`` of a string schema, with ECMA-262 semantics."""
    if len(value) < rule.get("minLength", 0):
        return False
    pattern = rule.get("pattern")
    return pattern is None or re.search(pattern.replace("$", r"\Z"), value) is not None


WAL_DIR = _body_schema("/api/v1/{namespace}/wal/backup")["properties"]["backupDir"]
SNAPSHOT = _body_schema("/api/v1/{namespace}/btree/backup")["properties"]["path"]


def _path_verdict(value: str, is_file: bool) -> str | None:
    """None if the handler's validator accepts ``value``, else its message."""
    try:
        paths.parse_relative(value, "path", is_file=is_file)
    except InvalidRequest as exc:
        return exc.message
    return None


def _format_holds(value: str, is_file: bool) -> bool:
    try:
        paths.check_format(value, "path", is_file=is_file)
    except InvalidRequest:
        return False
    return True


def _check_path(value: str, is_file: bool) -> tuple[bool, str | None]:
    """The validator accepts exactly what the pattern matches and the format allows."""
    rule = SNAPSHOT if is_file else WAL_DIR
    allowed, refusal = _matches(rule, value), _path_verdict(value, is_file)
    if refusal is None:
        assert allowed, f"spec refuses what the server accepts: {value!r} (is_file={is_file})"
    elif allowed:
        assert not _format_holds(value, is_file), (
            f"spec allows {value!r} (is_file={is_file}) but the server refuses it for a rule the "
            f"pattern should state: {refusal}"
        )
    return allowed, refusal


# (value, is_file, pattern allows, server accepts)
PATH_TABLE = [
    ("a", False, True, True),
    ("a/b", True, True, True),
    ("./a//b/.", False, True, True),
    (".", False, True, True),  # the root itself is a valid WAL backup directory
    (" a", True, True, True),  # only a blank path is refused, not a leading space
    ("a ", True, True, True),
    ("a\u00a0b", True, True, True),
    ("ünïcødé/日本.db", True, True, True),
    ("back\\slash.db", True, True, True),
    ("%2e", True, True, True),
    ("a%2fb", True, True, True),
    ("%2e%2fx", True, True, True),
    ("...", True, True, True),
    ("..a/a..", True, True, True),
    ("x.wal.db", True, True, True),
    ("seg.wal", False, True, True),  # a directory may take a WAL name; only files are reserved
    ("x.tmp/y", True, True, True),
    ("x" * 244, True, True, True),
    ("y" * 255 + "/z", True, True, True),
    # refused, and the pattern says so
    ("", False, False, False),
    ("   ", False, False, False),
    (" \t", True, False, False),
    ("\u3000\u2028", False, False, False),
    ("a\x00b", True, False, False),
    ("a\nb", False, False, False),
    ("a\n", False, False, False),
    ("a\x7f", True, False, False),
    ("a\x1fb", True, False, False),
    ("/abs", False, False, False),
    ("//double", True, False, False),
    ("..", False, False, False),
    ("a/..", False, False, False),
    ("a/../b", True, False, False),
    ("../x", True, False, False),
    ("..\\x", True, False, False),
    ("x\\..", False, False, False),
    ("a/b\\..\\c", True, False, False),
    ("a/", True, False, False),
    ("a/.", True, False, False),
    (".", True, False, False),
    ("./", True, False, False),
    ("a//", True, False, False),
    ("s.db.tmp", True, False, False),
    ("s.db.sha256", True, False, False),
    ("wal/000000099.wal", True, False, False),
    ("x.wal.gz", True, False, False),
    ("x.wal.zst", True, False, False),
    (".tmp", True, False, False),
    # refused for a rule the spec leaves to its format: the pattern allows them
    ("%2e%2e", False, True, False),
    ("x/%2E%2e/y", True, True, False),
    ("..%2f", False, True, False),
    ("%2e%2e%2f", False, True, False),
    ("a/x%2f..%2f..%2fetc", False, True, False),
    ("..%5cx", True, True, False),
    ("%252e%252e", False, True, False),
    ("%2525252525252525252e", False, True, False),
    ("a" * 256, False, True, False),
    ("d/" + "f" * 245, True, True, False),
    ("é" * 128, False, True, False),  # 128 characters, 256 bytes
    ("a/" * 2049, False, True, False),
]


@pytest.mark.parametrize(("value", "is_file", "allowed", "accepted"), PATH_TABLE)
def test_backup_path_pattern_agrees_with_the_validator(
    value: str, is_file: bool, allowed: bool, accepted: bool
) -> None:
    spec_allows, refusal = _check_path(value, is_file)
    assert spec_allows == allowed, value
    assert (refusal is None) == accepted, (value, refusal)


_PATH_CHARS = st.sampled_from(
    list("./\\%2eEf5cF ab\t\n\x00\x7f\u00a0\u2028\u3000é日") + [".tmp", ".wal", ".sha256"]
)
_PATHS = st.one_of(st.lists(_PATH_CHARS, max_size=12).map("".join), st.text(max_size=20))


@settings(max_examples=400, deadline=None)
@given(_PATHS, st.booleans())
def test_generated_backup_paths_agree(value: str, is_file: bool) -> None:
    _check_path(value, is_file)


def test_the_spec_serves_the_generated_patterns() -> None:
    for rule, is_file in ((WAL_DIR, False), (SNAPSHOT, True)):
        assert rule["pattern"] == paths.text_pattern(is_file=is_file)
        assert rule["format"] == (openapi.BACKUP_FILE_FORMAT if is_file else openapi.BACKUP_DIR_FORMAT)
        assert paths.FORMAT_RULES in rule["description"]
    # The pattern is plain ECMA-262 as well as Python: only \uXXXX escapes, no raw
    # control characters or surrogates in the document.
    text = json.dumps(SPEC, ensure_ascii=False)
    assert not re.search("[\x00-\x1f\x7f\ud800-\udfff]", text)


def test_whitespace_is_what_str_isspace_says() -> None:
    """``paths.WHITESPACE`` (used by the validator and the pattern) is Python's whole set."""
    expected = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())
    assert paths.WHITESPACE == expected


def _key_verdict(value: str) -> bool:
    """Does the handler take ``value`` as a key in a JSON body (batch) — JSON decoding included?"""
    try:
        parsing.key_from_text(orjson.loads(json.dumps(value)))
    except (InvalidRequest, orjson.JSONDecodeError):
        return False
    return True


def _segment_verdict(value: str) -> bool:
    """… and as the percent-encoded last path segment (how a client sends it)."""
    from urllib.parse import quote

    try:
        parsing.decode_key_segment(quote(value, safe="", errors="surrogatepass").encode())
    except InvalidRequest:
        return False
    return True


KEYS = ["k", "a/b", "%2F", " ", "\n", "日本", "x" * MAX_KEY, "é" * (MAX_KEY // 2), ""]
OVER = ["x" * (MAX_KEY + 1), "é" * (MAX_KEY // 2 + 1)]  # refused for the format's byte limit


@pytest.mark.parametrize("value", [*KEYS, *OVER])
def test_key_pattern_agrees_with_the_validators(value: str) -> None:
    path_rule = next(
        p for p in OPS["/api/v1/{namespace}/kv/{key}"]["get"]["parameters"] if p["name"] == "key"
    )
    batch = _body_schema("/api/v1/{namespace}/kv/batch")["oneOf"]
    for rule in (
        path_rule["schema"],
        batch[0]["properties"]["items"]["items"]["properties"]["key"],
        batch[1]["properties"]["keys"]["items"],
    ):
        assert rule["format"] == parsing.KEY_FORMAT
        allowed = _matches(rule, value)
        for accepted in (_key_verdict(value), _segment_verdict(value)):
            if value in OVER:
                assert allowed and not accepted, value
            else:
                assert allowed == accepted, value


@pytest.mark.parametrize("value", ["\ud800", "a\udfffb", "x/\udc00.db"])
def test_lone_surrogates_never_reach_a_validator(value: str) -> None:
    """No rule in the spec for them: they are not Unicode scalar values (no JSON Schema
    validator can hold one), and the server's JSON parser refuses them as malformed."""
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(json.dumps({"path": value, "keys": [value]}))
    assert _path_verdict(value, True) is not None  # and the validator would refuse them too
    assert not _segment_verdict(value)


B64_VALUES = [
    "",
    "dg==",
    "aGk=",
    "aGVsbG8=",
    "AAAA",
    "dg",
    "dg=",
    "d===",
    "!!!!",
    "dg==dg==",
    " dg==",
    "aGk=\n",
    "a-b_",
    "YQ",
]


@pytest.mark.parametrize("value", [*B64_VALUES, base64.b64encode(bytes(range(256))).decode()])
def test_base64_pattern_agrees_with_the_decoder(value: str) -> None:
    rule = _body_schema("/api/v1/{namespace}/kv/{key}", "put")["properties"]["value"]
    try:
        parsing.decode_b64(value)
        accepted = True
    except InvalidRequest:
        accepted = False
    assert _matches(rule, value) == accepted


def test_security_is_declared_only_with_tokens_and_not_on_public_routes() -> None:
    """The bearer scheme matches api/auth.py: every route but /health and /healthz (and
    /metrics with --metrics-auth none) needs a token, and only when tokens are on."""
    assert "security" not in SPEC
    for metrics_open in (False, True):
        spec = openapi.build_openapi(1 << 20, auth=True, metrics_open=metrics_open)
        assert spec["security"] == [{"bearer": []}]
        assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
        public = {
            path
            for path, ops in spec["paths"].items()
            if any(op.get("security") == [] for op in ops.values())
        }
        assert public == {"/health", "/healthz", *(["/metrics"] if metrics_open else [])}
        assert all(
            "401" in op["responses"]
            for path, ops in spec["paths"].items()
            if path not in public
            for op in ops.values()
        )


def test_every_namespace_parameter_is_the_enum_of_served_namespaces() -> None:
    spec = openapi.build_openapi(1 << 20, namespaces=["users", "default"])
    found = 0
    for ops in spec["paths"].values():
        for op in ops.values():
            for param in op["parameters"]:
                if param["name"] == "namespace":
                    assert param["schema"] == {"type": "string", "enum": ["default", "users"]}
                    found += 1
    assert found == 14  # every operation under /api/v1/{namespace}/
    assert openapi.build_openapi(1 << 20)["paths"]["/api/v1/{namespace}/stats"]["get"]["parameters"][0][
        "schema"
    ] == {"type": "string"}
