"""The KV HTTP API against a real ``python -m unisondb`` process, over HTTP.

One server per module (namespaces ``default``, ``users`` and ``fresh``; ``fresh`` is never
written to). Its WAL segments are 64 KiB so a single large write rotates one.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serverproc import start_server, wait_applied

NAMESPACES = ("default", "users", "fresh")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    data_dir = tmp_path_factory.mktemp("kv") / "data"
    server = start_server(data_dir, NAMESPACES, ["--wal-segment-size", "64KiB"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(srv: Any) -> Iterator[httpx.Client]:
    with srv.client() as client:
        yield client


@pytest.fixture(scope="module")
def users(srv: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url + "/api/v1/users", timeout=30) as client:
        yield client


def ok_json(resp: httpx.Response) -> Any:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    return resp.json()


def last_lsn(client: httpx.Client) -> int:
    lsn: int = ok_json(client.get("/stats"))["lastLsn"]
    return lsn


# --- health, namespaces ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/healthz"])
def test_health(http: httpx.Client, path: str) -> None:
    assert ok_json(http.get(path)) == {"status": "ok", "namespaces": sorted(NAMESPACES)}


# --- single keys ----------------------------------------------------------------------


def test_put_get_delete_roundtrip(users: httpx.Client) -> None:
    value = bytes(range(256)) * 3
    assert ok_json(users.put("/kv/roundtrip", json={"value": b64(value)})) == {"success": True}
    assert ok_json(users.get("/kv/roundtrip")) == {"value": b64(value), "found": True}
    assert ok_json(users.delete("/kv/roundtrip")) == {"success": True}
    assert ok_json(users.get("/kv/roundtrip")) == {"value": "", "found": False}


def test_missing_key_is_200_not_found(users: httpx.Client) -> None:
    assert ok_json(users.get("/kv/never-written")) == {"value": "", "found": False}


def test_delete_absent_key_succeeds_and_is_logged(users: httpx.Client) -> None:
    before = last_lsn(users)
    assert ok_json(users.delete("/kv/absent-delete")) == {"success": True}
    assert last_lsn(users) == before + 1


def test_put_overwrites(users: httpx.Client) -> None:
    users.put("/kv/over", json={"value": b64(b"one")})
    users.put("/kv/over", json={"value": b64(b"two")})
    assert ok_json(users.get("/kv/over"))["value"] == b64(b"two")


def test_empty_value_is_found(users: httpx.Client) -> None:
    ok_json(users.put("/kv/empty-value", json={"value": ""}))
    assert ok_json(users.get("/kv/empty-value")) == {"value": "", "found": True}


def test_unknown_fields_are_ignored(users: httpx.Client) -> None:
    ok_json(users.put("/kv/extra", json={"value": b64(b"x"), "ttl": 5, "meta": {"a": [1]}}))
    assert ok_json(users.get("/kv/extra"))["value"] == b64(b"x")


def test_namespaces_are_isolated(http: httpx.Client) -> None:
    base = "/api/v1"
    ok_json(http.put(f"{base}/users/kv/iso", json={"value": b64(b"users")}))
    assert ok_json(http.get(f"{base}/default/kv/iso"))["found"] is False
    ok_json(http.put(f"{base}/default/kv/iso", json={"value": b64(b"default")}))
    assert ok_json(http.get(f"{base}/users/kv/iso"))["value"] == b64(b"users")
    assert ok_json(http.get(f"{base}/default/kv/iso"))["value"] == b64(b"default")


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/json; charset=utf-8"],
)
def test_json_body_accepted_whatever_the_content_type(users: httpx.Client, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    body = b'{"value":"' + b64(b"ct").encode() + b'"}'
    ok_json(users.put("/kv/ctype", content=body, headers=headers))
    assert ok_json(users.get("/kv/ctype"))["value"] == b64(b"ct")
    batch = b'{"operation":"put","items":[{"key":"ctype-b","value":"eA=="}]}'
    assert ok_json(users.post("/kv/batch", content=batch, headers=headers))["count"] == 1


def test_concurrent_writes_all_acknowledged_and_visible(srv: Any) -> None:
    errors: list[str] = []

    def writer(w: int) -> None:
        with httpx.Client(base_url=srv.url + "/api/v1/default", timeout=30) as c:
            for i in range(10):
                r = c.put(f"/kv/conc-{w}-{i}", json={"value": b64(f"{w}:{i}".encode())})
                if r.status_code != 200:
                    errors.append(r.text)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with httpx.Client(base_url=srv.url + "/api/v1/default") as c:
        for w in range(16):
            for i in range(10):
                assert ok_json(c.get(f"/kv/conc-{w}-{i}"))["value"] == b64(f"{w}:{i}".encode())


# --- batch ----------------------------------------------------------------------------


def test_batch_put_is_one_record(users: httpx.Client) -> None:
    items = [{"key": f"bp-{i}", "value": b64(f"v{i}".encode())} for i in range(50)]
    before = last_lsn(users)
    body = ok_json(users.post("/kv/batch", json={"operation": "put", "items": items}))
    assert body == {"success": True, "count": 50}
    assert last_lsn(users) == before + 1, "a batch must be exactly one WAL record"
    assert wait_applied(users, "/stats") == before + 1  # /checkpoint is LMDB's (ack=wal: it follows)
    cp = ok_json(users.get("/checkpoint"))
    assert cp["recordProcessed"] == before + 1
    for i in range(50):
        assert ok_json(users.get(f"/kv/bp-{i}")) == {"value": b64(f"v{i}".encode()), "found": True}


def test_batch_delete_is_one_record(users: httpx.Client) -> None:
    keys = [f"bd-{i}" for i in range(20)]
    users.post(
        "/kv/batch", json={"operation": "put", "items": [{"key": k, "value": b64(b"x")} for k in keys]}
    )
    before = last_lsn(users)
    body = ok_json(users.post("/kv/batch", json={"operation": "delete", "keys": keys + ["bd-none"]}))
    assert body == {"success": True, "count": 21}
    assert last_lsn(users) == before + 1
    for k in keys:
        assert ok_json(users.get(f"/kv/{k}")) == {"value": "", "found": False}


def test_batch_later_item_wins_for_a_repeated_key(users: httpx.Client) -> None:
    items = [{"key": "dup", "value": b64(b"first")}, {"key": "dup", "value": b64(b"second")}]
    assert ok_json(users.post("/kv/batch", json={"operation": "put", "items": items}))["count"] == 2
    assert ok_json(users.get("/kv/dup"))["value"] == b64(b"second")


def test_batch_keys_are_the_same_keys_as_in_the_path(users: httpx.Client) -> None:
    """A key written in a batch body is read back at its percent-encoded path and vice versa."""
    items = [{"key": "a/b c", "value": b64(b"slash")}, {"key": "ключ", "value": b64(b"ru")}]
    ok_json(users.post("/kv/batch", json={"operation": "put", "items": items}))
    assert ok_json(users.get("/kv/a%2Fb%20c"))["value"] == b64(b"slash")
    assert ok_json(users.get("/kv/ключ"))["value"] == b64(b"ru")
    ok_json(users.post("/kv/batch", json={"operation": "delete", "keys": ["a/b c"]}))
    assert ok_json(users.get("/kv/a%2Fb%20c"))["found"] is False


def test_key_named_batch(users: httpx.Client) -> None:
    """GET/PUT/DELETE /kv/batch address the key "batch"; only POST is the batch endpoint."""
    assert ok_json(users.get("/kv/batch")) == {"value": "", "found": False}
    assert ok_json(users.put("/kv/batch", json={"value": b64(b"the key")})) == {"success": True}
    assert ok_json(users.get("/kv/batch")) == {"value": b64(b"the key"), "found": True}
    body = ok_json(users.post("/kv/batch", json={"operation": "delete", "keys": ["batch"]}))
    assert body == {"success": True, "count": 1}
    assert ok_json(users.get("/kv/batch"))["found"] is False
    users.put("/kv/batch", json={"value": b64(b"again")})
    assert ok_json(users.delete("/kv/batch")) == {"success": True}
    assert ok_json(users.get("/kv/batch"))["found"] is False


# --- offset, stats, checkpoint ----------------------------------------------------------


def test_fresh_namespace_metadata_is_zero_and_never_drops_the_connection(srv: Any) -> None:
    """Upstream panics (dropped connection) here; we answer zeros."""
    with httpx.Client(base_url=srv.url + "/api/v1/fresh") as c:  # a new connection
        assert ok_json(c.get("/offset")) == {"segmentId": 0, "offset": 0}
        cp = ok_json(c.get("/checkpoint"))
        assert {k: cp[k] for k in ("recordProcessed", "segmentId", "offset", "lsn")} == {
            "recordProcessed": 0,
            "segmentId": 0,
            "offset": 0,
            "lsn": 0,
        }
        stats = ok_json(c.get("/stats"))
        assert stats["namespace"] == "fresh"
        assert stats["opsReceived"] == stats["opsFlushed"] == stats["lastLsn"] == 0
        assert stats["keys"] == 0
        assert {"currentSegment", "currentOffset"} <= stats.keys()
        # The same connection keeps working.
        assert ok_json(c.get("/offset")) == {"segmentId": 0, "offset": 0}


def test_metadata_after_writes(http: httpx.Client) -> None:
    ns = "/api/v1/default"
    ok_json(http.put(f"{ns}/kv/meta", json={"value": b64(b"m")}))
    wait_applied(http, f"{ns}/stats")  # /checkpoint is LMDB's (ack=wal: it follows the WAL)
    off = ok_json(http.get(f"{ns}/offset"))
    stats = ok_json(http.get(f"{ns}/stats"))
    cp = ok_json(http.get(f"{ns}/checkpoint"))
    assert off["segmentId"] >= 1 and off["offset"] >= 0
    assert stats["namespace"] == "default"
    assert stats["opsReceived"] >= stats["opsFlushed"] >= 1
    assert stats["currentSegment"] == off["segmentId"]
    assert stats["currentOffset"] > off["offset"], "the last record starts before the end"
    assert cp["recordProcessed"] == cp["lsn"] == stats["lastLsn"]
    assert cp["segmentId"] == off["segmentId"]
    assert cp["timeline"] >= 1


def test_offset_moves_with_each_write(users: httpx.Client) -> None:
    ok_json(users.put("/kv/off-1", json={"value": b64(b"1")}))
    first = ok_json(users.get("/offset"))
    ok_json(users.put("/kv/off-2", json={"value": b64(b"2")}))
    second = ok_json(users.get("/offset"))
    assert (second["segmentId"], second["offset"]) > (first["segmentId"], first["offset"])


# --- metrics ----------------------------------------------------------------------------


def scrape(http: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = http.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_exist_and_move_after_writes(http: httpx.Client) -> None:
    before = scrape(http)
    for ns in NAMESPACES:
        for name in (
            "unisondb_wal_bytes_written_total",
            "unisondb_wal_fsyncs_total",
            "unisondb_wal_rotations_total",
            "unisondb_recovery_records_replayed",
            "unisondb_recovery_duration_seconds",
            "unisondb_recovery_torn_bytes_truncated",
        ):
            assert (name, (("namespace", ns),)) in before, f"{name} missing for {ns}"

    base = "/api/v1/default"
    for i in range(3):
        ok_json(http.put(f"{base}/kv/metric-{i}", json={"value": b64(b"small")}))
    # One value larger than a 64 KiB segment: the next write needs a new segment.
    ok_json(http.put(f"{base}/kv/metric-big", json={"value": b64(b"B" * 100_000)}))
    ok_json(http.put(f"{base}/kv/metric-after", json={"value": b64(b"after")}))
    assert http.get(f"{base}/kv/metric-0").status_code == 200
    after = scrape(http)

    put = {"route": "put_kv", "method": "PUT", "status": "200"}
    assert (
        value(after, "unisondb_http_requests_total", **put)
        >= value(before, "unisondb_http_requests_total", **put) + 5
    )
    get = {"route": "get_kv", "method": "GET", "status": "200"}
    assert value(after, "unisondb_http_requests_total", **get) > value(
        before, "unisondb_http_requests_total", **get
    )
    assert (
        value(after, "unisondb_http_request_duration_seconds_count", route="put_kv")
        >= value(before, "unisondb_http_request_duration_seconds_count", route="put_kv") + 5
    )
    ns = {"namespace": "default"}
    assert (
        value(after, "unisondb_wal_bytes_written_total", **ns)
        >= value(before, "unisondb_wal_bytes_written_total", **ns) + 100_000
    )
    assert value(after, "unisondb_wal_fsyncs_total", **ns) > value(before, "unisondb_wal_fsyncs_total", **ns)
    assert value(after, "unisondb_wal_rotations_total", **ns) > value(
        before, "unisondb_wal_rotations_total", **ns
    )
    assert value(after, "unisondb_recovery_duration_seconds", **ns) >= 0


def test_error_requests_are_counted_by_status(http: httpx.Client) -> None:
    labels = {"route": "put_kv", "method": "PUT", "status": "400"}
    before = value(scrape(http), "unisondb_http_requests_total", **labels)
    assert http.put("/api/v1/users/kv/x", content=b"{").status_code == 400
    assert value(scrape(http), "unisondb_http_requests_total", **labels) == before + 1
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    before = value(scrape(http), "unisondb_http_requests_total", **unmatched)
    assert http.get("/no/such/route").status_code == 404
    assert value(scrape(http), "unisondb_http_requests_total", **unmatched) == before + 1


def test_openapi_is_served(http: httpx.Client) -> None:
    spec = ok_json(http.get("/openapi.json"))
    assert spec["openapi"].startswith("3.")
    assert "/api/v1/{namespace}/kv/{key}" in spec["paths"]


def test_server_still_alive(srv: Any, http: httpx.Client) -> None:
    assert srv.proc.poll() is None
    assert http.get("/health").status_code == 200
