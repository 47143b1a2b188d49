"""Schemathesis over ``/openapi.json`` of a real server process: every check, 0 failures.

The CLI (``schemathesis run``, pinned in the test extra) runs as a subprocess against a
server on loopback, with ``--checks all``: no 5xx, documented statuses, content types and
response schemas, *and* that every schema-valid request is accepted and every
schema-invalid one refused — so a rule the validators have and the document does not (or
the reverse) fails here. ``schemathesis_hooks.py`` gives it generators for the document's
own ``format``s, built from the validators.

Bounded and deterministic: ``--generation-deterministic`` (fixed Hypothesis seeds, no
example database), a few examples per operation, one worker. Run from a temporary
directory so schemathesis's crash cache (``.schemathesis/``) never replays an old run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverproc import ServerProcess, start_server

HERE = Path(__file__).resolve().parent
#: Hypothesis examples per operation and phase: the run stays near 30 s on two idle cores
#: (a few minutes on a loaded one). More for a hand run (docs/TESTING.md).
EXAMPLES = int(os.environ.get("UNISONDB_SCHEMATHESIS_EXAMPLES", "15"))
#: The token variant checks auth on every operation; the inputs were covered above.
EXAMPLES_WITH_AUTH = max(1, EXAMPLES // 4)
TOKEN = "schemathesis-admin-token-0123456789"
#: Warnings that mean the run tested less than the document says (a pattern it could not
#: use, every request refused for auth, a namespace never reached): failures too.
CONFIG = """
[warnings]
fail-on = ["unsupported_regex", "missing_auth", "validation_mismatch", "unused_openapi_auth",
           "unresolvable_reference", "missing_deserializer", "unmatched_filter"]
"""


def run_schemathesis(srv: ServerProcess, workdir: Path, examples: int, *extra: str) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "schemathesis.toml"
    config.write_text(CONFIG)
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        "NO_COLOR": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{srv.url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(examples),
        "--generation-deterministic",
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--no-color",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f"schemathesis failed (exit {proc.returncode}):\n{out}\n--- server log ---\n{srv.log()}"
    )
    assert "No issues found" in out, out
    return out


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_server(tmp_path / "data", ("default", "users"))
    yield server
    server.stop()


def test_schemathesis_all_checks_pass(srv: ServerProcess, tmp_path: Path) -> None:
    out = run_schemathesis(srv, tmp_path / "st", EXAMPLES)
    assert "17 selected / 17 total" in out, out  # every documented operation was tested
    assert "Tested: 17" in out, out


def test_schemathesis_with_a_token_file(tmp_path: Path) -> None:
    """With tokens the document declares the bearer scheme; schemathesis sends the admin
    token, and its ``ignored_auth`` check also sends none and a wrong one (must be 401)."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} admin\n")
    tokens.chmod(0o600)
    server = start_server(tmp_path / "data", ("default",), extra_args=["--auth-token-file", str(tokens)])
    try:
        with server.client() as http:
            assert http.get("/openapi.json").status_code == 401
            spec = http.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert spec["security"] == [{"bearer": []}]
        out = run_schemathesis(
            server,
            tmp_path / "st",
            EXAMPLES_WITH_AUTH,
            "--phases",
            "coverage,fuzzing",
            "--header",
            f"Authorization: Bearer {TOKEN}",
        )
    finally:
        server.stop()
    assert "Tested: 17" in out, out
