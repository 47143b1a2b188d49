"""The ``unisondb`` process: restarts, signals, the namespace lock, CLI flags and config.

Every server here is a real ``python -m unisondb`` subprocess; every one a test starts is
stopped by its own PID at teardown.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverproc import ServerProcess, free_port, start_server, wait_healthy

import unisondb

FLAGS = (
    "--data-dir",
    "--http-addr",
    "--namespace",
    "--config",
    "--wal-segment-size",
    "--wal-segment-max-age",
    "--wal-retention",
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Servers started by a test; killed (by PID) at teardown if still running."""
    started: list[Any] = []
    yield started
    for srv in started:
        srv.kill9()


def launch(
    procs: list[Any], args: list[str], port: int, log_path: Path, cwd: Path | None = None, wait: bool = True
) -> Any:
    """Start ``python -m unisondb ARGS`` exactly as given (no flags added)."""
    cmd = [sys.executable, "-m", "unisondb", *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    srv = ServerProcess(Path(cwd or "."), port, proc, log_path, cmd)
    procs.append(srv)
    if wait:
        wait_healthy(srv)
    return srv


def start(procs: list[Any], data_dir: Path, *namespaces: str, extra: list[str] | None = None) -> Any:
    srv = start_server(data_dir, namespaces, extra)
    procs.append(srv)
    return srv


def cli(*args: str, cwd: Path | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unisondb", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def tmp_files(data_dir: Path) -> list[Path]:
    return sorted(data_dir.rglob("*.tmp"))


class Writers:
    """Threads that PUT distinct keys as fast as they can and remember what was acknowledged."""

    def __init__(self, url: str, ns: str, threads: int = 4) -> None:
        self.base = f"{url}/api/v1/{ns}"
        self.acked: dict[str, str] = {}
        self.unexpected: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]

    def __enter__(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.join()

    def _run(self, t: int) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as c:
            i = 0
            while not self._stop.is_set():
                key, val = f"w{t}-{i}", b64(f"value {t} {i}".encode())
                try:
                    resp = c.put(f"/kv/{key}", json={"value": val})
                except httpx.TransportError:
                    return  # the server went away
                if resp.status_code == 200:
                    with self._lock:
                        self.acked[key] = val
                elif resp.status_code != 503:  # only "shutting down" is acceptable
                    self.unexpected.append(f"{resp.status_code} {resp.text}")
                i += 1

    def wait_for(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < n:
            assert time.monotonic() < deadline, f"only {len(self.acked)} writes acknowledged"
            time.sleep(0.01)

    def join(self) -> None:
        for t in self._threads:
            t.join(timeout=30)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        assert self.unexpected == []


def assert_all_present(srv: Any, ns: str, expected: dict[str, str]) -> None:
    with httpx.Client(base_url=f"{srv.url}/api/v1/{ns}") as c:
        missing = [k for k, v in expected.items() if c.get(f"/kv/{k}").json() != {"value": v, "found": True}]
    assert missing == [], f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"


def write_fixture_data(srv: Any) -> dict[str, str]:
    """A few single puts, a delete and a batch; returns what must be there afterwards."""
    expected = {}
    with httpx.Client(base_url=f"{srv.url}/api/v1/users") as c:
        for i in range(5):
            val = b64(os.urandom(100))
            assert c.put(f"/kv/single-{i}", json={"value": val}).status_code == 200
            expected[f"single-{i}"] = val
        assert c.delete("/kv/single-4").status_code == 200
        del expected["single-4"]
        items = [{"key": f"batch-{i}", "value": b64(f"b{i}".encode())} for i in range(20)]
        assert c.post("/kv/batch", json={"operation": "put", "items": items}).json() == {
            "success": True,
            "count": 20,
        }
        expected.update({it["key"]: it["value"] for it in items})
    return expected


# --- restarts ---------------------------------------------------------------------------


def test_sigterm_is_graceful_and_restart_preserves_data(tmp_path: Path, procs: list[Any]) -> None:
    data = tmp_path / "data"
    srv = start(procs, data, "default", "users")
    expected = write_fixture_data(srv)
    with Writers(srv.url, "users") as writers:
        writers.wait_for(100)
        assert srv.stop(signal.SIGTERM) == 0, srv.log()  # while writes are in flight
    assert "server.stopped" in srv.log()
    assert "Traceback" not in srv.log()
    assert tmp_files(data) == []

    again = start(procs, data, "default", "users")
    assert_all_present(again, "users", expected | writers.acked)
    with httpx.Client(base_url=f"{again.url}/api/v1/users") as c:
        assert c.get("/kv/single-4").json() == {"value": "", "found": False}
        stats, cp = c.get("/stats").json(), c.get("/checkpoint").json()
    # 5 puts + 1 delete + 1 batch + one record per acknowledged write.
    assert cp["recordProcessed"] == stats["lastLsn"] >= 7 + len(writers.acked)


def test_sigkill_then_restart_keeps_every_acknowledged_write(tmp_path: Path, procs: list[Any]) -> None:
    data = tmp_path / "data"
    srv = start(procs, data, "default", "users")
    expected = write_fixture_data(srv)
    with Writers(srv.url, "users") as writers:
        writers.wait_for(100)
        srv.kill9()  # mid-stream
    assert srv.proc.returncode == -signal.SIGKILL

    again = start(procs, data, "default", "users")
    assert_all_present(again, "users", expected | writers.acked)
    metrics = httpx.get(again.url + "/metrics").text
    assert re.search(r'^unisondb_recovery_records_replayed\{namespace="users"\} \d', metrics, re.M)
    # The log continues where it stopped: new writes work and survive another restart.
    assert (
        httpx.put(f"{again.url}/api/v1/users/kv/after-crash", json={"value": b64(b"ok")}).status_code == 200
    )
    again.stop()
    third = start(procs, data, "users")
    assert_all_present(third, "users", {"after-crash": b64(b"ok")})


def test_namespaces_on_disk_are_served_after_restart_without_namespace_flags(
    tmp_path: Path, procs: list[Any]
) -> None:
    data = tmp_path / "data"
    srv = start(procs, data, "users", "orders")
    for ns in ("users", "orders"):
        resp = httpx.put(f"{srv.url}/api/v1/{ns}/kv/k", json={"value": b64(ns.encode())})
        assert resp.status_code == 200
    assert srv.stop(signal.SIGINT) == 0
    assert tmp_files(data) == []

    again = start(procs, data)  # no --namespace at all
    health = httpx.get(again.url + "/healthz").json()
    assert health == {"status": "ok", "namespaces": ["default", "orders", "users"]}
    for ns in ("users", "orders"):
        assert httpx.get(f"{again.url}/api/v1/{ns}/kv/k").json() == {"value": b64(ns.encode()), "found": True}


# --- the namespace lock -----------------------------------------------------------------


def test_second_server_on_the_same_data_dir_fails_fast(tmp_path: Path, procs: list[Any]) -> None:
    data = tmp_path / "data"
    first = start(procs, data, "default", "users")
    assert httpx.put(f"{first.url}/api/v1/users/kv/k", json={"value": "eA=="}).status_code == 200

    began = time.monotonic()
    second = cli("--data-dir", str(data), "--http-addr", f"127.0.0.1:{free_port()}", "--namespace", "users")
    assert time.monotonic() - began < 10
    assert second.returncode != 0
    assert "Traceback" not in second.stderr
    assert re.search(r"^error: namespace is locked: .*/(default|users)/LOCK ", second.stderr), second.stderr
    assert f"pid {first.proc.pid}" in second.stderr
    assert "stop the other process" in second.stderr

    # Also when the namespace is only discovered on disk, not named.
    third = cli("--data-dir", str(data), "--http-addr", f"127.0.0.1:{free_port()}", "--namespace", "other")
    assert third.returncode != 0 and "locked" in third.stderr
    assert not (data / "other").exists(), "a failed start must not leave a new namespace behind"

    # The first server never noticed.
    assert first.proc.poll() is None
    with httpx.Client(base_url=f"{first.url}/api/v1/users") as c:
        assert c.get("/kv/k").json() == {"value": "eA==", "found": True}
        assert c.put("/kv/k2", json={"value": "eQ=="}).status_code == 200
        assert c.get("/kv/k2").json() == {"value": "eQ==", "found": True}


# --- the command line -------------------------------------------------------------------


def test_help_documents_every_flag() -> None:
    script = Path(sys.executable).parent / "unisondb"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "unisondb"]
    for flag in ("--help", "-h"):
        res = subprocess.run([*cmd, flag], capture_output=True, text=True, timeout=20)
        assert res.returncode == 0, res.stderr
        for documented in FLAGS:
            assert documented in res.stdout, f"{documented} missing from --help"
        text = " ".join(res.stdout.split())
        assert "SIGTERM" in text
        assert "Default: ./data" in text and "Default: 127.0.0.1:8080" in text


def test_version() -> None:
    res = cli("--version")
    assert res.returncode == 0
    assert res.stdout.strip() == f"unisondb, version {unisondb.__version__}"


def test_document_verification_step_with_curl(tmp_path: Path, procs: list[Any]) -> None:
    """`unisondb --data-dir DIR --http-addr localhost:PORT --namespace users`, then curl."""
    port = free_port()
    data = tmp_path / "data"
    srv = launch(
        procs,
        ["--data-dir", str(data), "--http-addr", f"localhost:{port}", "--namespace", "users"],
        port,
        tmp_path / "server.log",
        wait=False,
    )
    url = f"http://localhost:{port}/api/v1/users/kv/test-key"

    def curl(*args: str) -> tuple[str, str]:
        res = subprocess.run(
            ["curl", "-sS", "-w", "\n%{http_code}", *args, url], capture_output=True, text=True, timeout=20
        )
        assert res.returncode == 0, res.stderr
        body, _, code = res.stdout.rpartition("\n")
        # Every JSON body ends with a newline (one line per entry in `| tee -a` logs).
        assert body.endswith("\n"), body
        return code, body[:-1]

    deadline = time.monotonic() + 30
    while True:
        assert srv.proc.poll() is None, srv.log()
        res = subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://localhost:{port}/health"])
        if res.returncode == 0:
            break
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.05)

    assert curl() == ("200", '{"value":"","found":false}')
    # curl -d sends application/x-www-form-urlencoded: the JSON body is still accepted.
    assert curl("-X", "PUT", "-d", '{"value":"aGVsbG8="}') == ("200", '{"success":true}')
    assert curl() == ("200", '{"value":"aGVsbG8=","found":true}')
    assert srv.stop() == 0
    assert (data / "users" / "wal").is_dir() and (data / "users" / "db").is_dir()


def test_toml_config_file_and_flags_override_it(tmp_path: Path, procs: list[Any]) -> None:
    p1, p2 = free_port(), free_port()
    config = tmp_path / "unisondb.toml"
    config.write_text(f'''
data_dir = "{tmp_path / "from-config"}"
http_addr = "127.0.0.1:{p1}"
namespaces = ["alpha", "beta"]
max_body_bytes = "2MiB"

[wal]
segment_size = "64KiB"
segment_max_age = "1h"
retention = "24h"

[btree]
map_size = "64MiB"
''')
    srv = launch(procs, ["--config", str(config)], p1, tmp_path / "a.log", cwd=tmp_path)
    assert httpx.get(srv.url + "/health").json()["namespaces"] == ["alpha", "beta"]
    big = b64(b"x" * 1_200_000)  # over the default 1 MiB body, under the configured 2 MiB
    assert httpx.put(f"{srv.url}/api/v1/alpha/kv/big", json={"value": big}).status_code == 200
    assert httpx.put(f"{srv.url}/api/v1/alpha/kv/small", json={"value": "eA=="}).status_code == 200
    # 64 KiB segments: the big record forced a rotation.
    assert len(list((tmp_path / "from-config" / "alpha" / "wal").glob("*.wal"))) >= 2
    assert srv.stop() == 0

    over = launch(
        procs,
        [
            "--config",
            str(config),
            "--http-addr",
            f"127.0.0.1:{p2}",
            "--namespace",
            "gamma",
            "--data-dir",
            str(tmp_path / "from-flag"),
        ],
        p2,
        tmp_path / "b.log",
        cwd=tmp_path,
    )
    assert httpx.get(over.url + "/health").json()["namespaces"] == ["gamma"]
    assert (tmp_path / "from-flag" / "gamma").is_dir()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{p1}/health", timeout=2)
    assert over.stop() == 0


BAD_FLAGS = [
    (["--wal-segment-size", "lots"], r"error: invalid size 'lots'"),
    (["--wal-segment-size", "1KiB"], r"error: wal segment_size must be at least 4KiB"),
    (["--wal-segment-max-age", "soon"], r"error: invalid duration 'soon'"),
    (["--wal-retention", "-1h"], r"error: invalid duration '-1h'"),
    (["--http-addr", "localhost"], r"error: invalid --http-addr 'localhost': expected HOST:PORT"),
    (["--http-addr", "127.0.0.1:70000"], r"error: invalid port 70000"),
    (["--namespace", "bad/name"], r"error: invalid namespace name 'bad/name'"),
    (["--namespace", "backups"], r"error: invalid namespace name 'backups'.*must not be 'backups'"),
    (["--namespace", "-x"], r"error: invalid namespace name '-x'"),
    (
        ["--log-format", "xml"],
        r"^error: invalid value for '--log-format'.*"
        r"\(hint: see 'unisondb --help'\)\n$",
    ),
    (["--no-such-flag"], r"^error: no such option '--no-such-flag'.*\(hint: see 'unisondb --help'\)\n$"),
    (["--config", "missing.toml"], r"error: cannot read config file missing.toml"),
]

BAD_CONFIGS = [
    ("namespaces = [", r"error: invalid TOML in .*unisondb.toml"),
    ("bogus = 1", r"error: unknown config keys in .*: bogus"),
    ("[wal]\nsegment_sise = '1MiB'", r"error: unknown config keys in .*: wal.segment_sise"),
    ("[btree]\nmapsize = 1", r"error: unknown config keys in .*: btree.mapsize"),
    ('namespaces = "users"', r"error: invalid config in .*: namespaces must be a list of strings"),
    ("namespaces = [1]", r"error: invalid config in .*: namespaces must be a list of strings"),
    ('namespaces = ["ok", "no way"]', r"error: invalid namespace name 'no way'"),
    ("wal = 3", r"error: invalid config in .*: \[wal\] must be a table"),
    ("http_addr = 8080", r"error: invalid config in .*: http_addr must be a string"),
    ('http_addr = "nope"', r"error: invalid --http-addr 'nope'"),
    ("data_dir = 5", r"error: invalid config in .*: data_dir must be a string"),
    ('log_format = "xml"', r"error: invalid config in .*: log_format must be"),
    ("max_body_bytes = -1", r"error: invalid size -1"),
    ("max_body_bytes = 10", r"error: max_body_bytes must be at least 1KiB"),
    ("[wal]\nsegment_size = true", r"error: invalid size True"),
    ("[wal]\nretention = '-5h'", r"error: invalid duration '-5h'"),
    ("[btree]\nmap_size = 'huge'", r"error: invalid size 'huge'"),
]


def assert_clean_failure(code: int | None, stderr: str, pattern: str) -> None:
    assert code not in (0, None), stderr
    assert "Traceback" not in stderr, stderr
    assert re.search(pattern, stderr), (pattern, stderr)
    assert len(stderr.strip().splitlines()) <= 5, stderr


def run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str]:
    """``unisondb ARGS`` in this process (fast), with ``serve`` replaced by a tripwire:
    these arguments must be refused before a server would start."""
    import unisondb.server
    from unisondb.cli import main

    def tripwire(cfg: object) -> int:
        raise AssertionError(f"the server would have started with {cfg}")

    monkeypatch.setattr(unisondb.server, "serve", tripwire)
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("args", "pattern"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_invalid_flag_is_refused_with_a_clear_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    pattern: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run_main(monkeypatch, capsys, "--data-dir", "data", "--http-addr", "127.0.0.1:8080", *args)
    assert_clean_failure(code, err, pattern)
    assert not (tmp_path / "data").exists(), "nothing may be created before the arguments are valid"


@pytest.mark.parametrize(("text", "pattern"), BAD_CONFIGS, ids=[t for t, _ in BAD_CONFIGS])
def test_invalid_config_is_refused_with_a_clear_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    pattern: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "unisondb.toml").write_text(text + "\n")
    code, err = run_main(monkeypatch, capsys, "--config", "unisondb.toml")
    assert_clean_failure(code, err, pattern)
    assert not (tmp_path / "data").exists(), "nothing may be created before the config is valid"


@pytest.mark.parametrize(
    ("args", "config", "pattern"),
    [
        (["--wal-segment-size", "lots"], None, r"^error: invalid size 'lots'"),
        (["--log-format", "xml"], None, r"^error: invalid value for '--log-format'.*\(hint: .*\)\n$"),
        ([], "namespaces = [", r"^error: invalid TOML in unisondb.toml"),
        ([], 'namespaces = "users"', r"^error: invalid config in .*: namespaces must be a list"),
    ],
)
def test_invalid_settings_exit_the_real_process_nonzero(
    tmp_path: Path, args: list[str], config: str | None, pattern: str
) -> None:
    """The same, as a real process: a non-zero exit status, one clear line, no traceback."""
    if config is not None:
        (tmp_path / "unisondb.toml").write_text(config + "\n")
        args = [*args, "--config", "unisondb.toml"]
    res = cli("--data-dir", "data", "--http-addr", f"127.0.0.1:{free_port()}", *args, cwd=tmp_path)
    assert_clean_failure(res.returncode, res.stderr, pattern)
    assert res.returncode == 2  # bad input (InvalidRequest, or a click usage error)
    assert not (tmp_path / "data").exists()


def test_data_dir_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    for data in (not_a_dir, not_a_dir / "sub"):
        res = cli("--data-dir", str(data), "--http-addr", f"127.0.0.1:{free_port()}")
        assert_clean_failure(res.returncode, res.stderr, rf"^error: .*{re.escape(str(data))}")


def test_port_in_use_exits_nonzero_and_releases_the_namespace(tmp_path: Path, procs: list[Any]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = cli("--data-dir", str(tmp_path / "data"), "--http-addr", f"127.0.0.1:{port}")
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert "address already in use" in res.stderr
    # It closed its engines: the namespace is not left locked.
    srv = start(procs, tmp_path / "data", "default")
    assert httpx.get(srv.url + "/health").status_code == 200


def _labelled_snapshot(tmp_path: Path, ns: str) -> bytes:
    """The bytes of a real snapshot of namespace ``ns`` (an in-process engine writes it)."""
    from unisondb.storage.engine import Engine
    from unisondb.storage.record import Entry, EntryKind

    eng = Engine.open(tmp_path / "src", ns)
    try:
        eng.write([Entry(EntryKind.PUT, b"k", b"v")])
        with open(tmp_path / "snap.db", "wb") as f:
            eng.btree.snapshot_to(f)
    finally:
        eng.close()
    return (tmp_path / "snap.db").read_bytes()


@pytest.mark.parametrize("where", ["db/data.mdb", "data.mdb"])
def test_misplaced_snapshot_hint_names_the_namespace_of_the_file(tmp_path: Path, where: str) -> None:
    # A snapshot of 'users' at <data-dir>/db/data.mdb (the document's drill): the server
    # serves 'default' by default, but the hint must say where *this* file belongs.
    data = tmp_path / "data"
    misplaced = data / where
    misplaced.parent.mkdir(parents=True)
    misplaced.write_bytes(_labelled_snapshot(tmp_path, "users"))
    before = sorted(p.name for p in misplaced.parent.iterdir())
    res = cli("--data-dir", str(data), "--http-addr", f"127.0.0.1:{free_port()}")
    assert_clean_failure(res.returncode, res.stderr, r"belongs to no namespace")
    assert f"move it to {data / 'users' / 'db' / 'data.mdb'}" in res.stderr, res.stderr
    assert "default" not in res.stderr
    assert sorted(p.name for p in misplaced.parent.iterdir()) == before  # read-only: no lock.mdb


@pytest.mark.parametrize("cut", [0, 4096, 8192, -1])
def test_misplaced_cut_snapshot_gets_the_generic_hint_not_a_signal(tmp_path: Path, cut: int) -> None:
    # A partial copy: the label cannot be read safely (liblmdb would die of SIGBUS on the
    # missing pages), so the hint falls back to <namespace>; the exit is an error, not a signal.
    data = tmp_path / "data"
    (data / "db").mkdir(parents=True)
    raw = _labelled_snapshot(tmp_path, "users")
    (data / "db" / "data.mdb").write_bytes(raw[:cut] if cut >= 0 else raw[: len(raw) // 2])
    res = cli("--data-dir", str(data), "--http-addr", f"127.0.0.1:{free_port()}")
    assert res.returncode > 0, res
    assert_clean_failure(res.returncode, res.stderr, r"belongs to no namespace")
    assert f"move it to {data / '<namespace>' / 'db' / 'data.mdb'}" in res.stderr, res.stderr
