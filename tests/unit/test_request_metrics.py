"""``RequestStats`` exposes exactly what prometheus_client's own ``Counter`` and
``Histogram`` would for the same requests (the exposition dashboards and the alert rules
read), including bucket edges: a latency equal to a bound counts in that bound's bucket.
"""

from __future__ import annotations

import random
import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from unisondb.metrics import LATENCY_BUCKETS, Metrics, RequestStats


def _reference(samples: list[tuple[str, str, int, float]]) -> bytes:
    r = CollectorRegistry()
    c = Counter(
        "unisondb_http_requests_total",
        "HTTP requests by route, method and status",
        ["route", "method", "status"],
        registry=r,
    )
    h = Histogram(
        "unisondb_http_request_duration_seconds",
        "HTTP request latency by route",
        ["route"],
        buckets=LATENCY_BUCKETS,
        registry=r,
    )
    for route, method, status, seconds in samples:
        c.labels(route, method, str(status)).inc()
        h.labels(route).observe(seconds)
    return generate_latest(r)


def _ours(samples: list[tuple[str, str, int, float]]) -> bytes:
    r = CollectorRegistry()
    stats = RequestStats(LATENCY_BUCKETS)
    r.register(stats)
    for route, method, status, seconds in samples:
        stats.record(route, method, status, seconds)
    return generate_latest(r)


def _lines(text: bytes) -> list[str]:
    return sorted(
        line for line in text.decode().splitlines() if not line.startswith("# ") and "_created" not in line
    )


def test_exposition_equals_prometheus_clients_counter_and_histogram() -> None:
    rng = random.Random(7)
    routes = [
        ("kv_get", "GET", 200),
        ("kv_get", "GET", 404),
        ("kv_put", "PUT", 200),
        ("unmatched", "POST", 405),
    ]
    samples = [
        (*rng.choice(routes), rng.choice([*LATENCY_BUCKETS, rng.expovariate(200.0), 20.0]))
        for _ in range(2000)
    ]
    assert _lines(_ours(samples)) == _lines(_reference(samples))


def test_the_server_registry_has_the_request_series() -> None:
    m = Metrics()
    m.requests.record("kv_get", "GET", 200, 0.0001)
    text = generate_latest(m.registry).decode()
    assert 'unisondb_http_requests_total{method="GET",route="kv_get",status="200"} 1.0' in text
    assert 'unisondb_http_request_duration_seconds_bucket{le="0.0005",route="kv_get"} 1.0' in text


def test_records_from_several_threads_are_all_counted() -> None:
    stats = RequestStats(LATENCY_BUCKETS)

    def work() -> None:
        for _ in range(5000):
            stats.record("kv_get", "GET", 200, 0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (total,) = [m for m in stats.collect() if m.name == "unisondb_http_requests"]
    assert total.samples[0].value == 20000
