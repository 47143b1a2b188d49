"""Same-run A/B of bearer-token authentication: PUT and GET req/s with and without tokens.

Run by hand (needs Debian's `hey`):

    .venv/bin/python bench/bench_auth.py [--seconds 3] [--connections 16] [--runs 9]

Two parts:

1. **HTTP A/B.** Two servers on scratch data dirs on 127.0.0.1 — one plain, one with
   ``--auth-token-file`` (3 tokens) — measured in pairs with hey, the order inside each
   pair alternating (off,on / on,off / ...) so drift on the shared machine hits both
   alike. Each pair gives one ratio on/off; the report has the median req/s of each
   side, the median ratio, and a 95 % confidence interval of the mean ratio over pairs
   (Student's t). With one run per side (the earlier version of this script: 3 runs),
   run-to-run noise on this 2-core, shared machine is ±5-10 %, several times the effect.
   For each run the server's CPU time (all threads, from /proc) is divided by the
   requests it answered: CPU µs per request, which other processes competing for the
   cores move far less than req/s. Its pairs give a difference on − off with a CI too.
2. **In-process cost.** (a) The whole ASGI app in-process, GET auth off vs on (thread
   CPU, shuffled rounds) — the guard's cost amid the rest of a request, where caches are
   colder than in a loop of the guard alone. (b) ``BearerAuth.check`` on the scope hey's
   requests produce, timed with ``timeit`` on the thread's CPU time (best of 7 repeats): the whole middleware
   layer, the check alone, and the route lookup alone. Divided by the plain server's
   CPU time per request (part 1), it is the share of a request's CPU that token
   checking costs — a figure the HTTP A/B cannot resolve on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lib
from serverproc import start_server

from unisondb.api.auth import BearerAuth, load_tokens, required_role

TOKEN = "bench-write-token-0123456789abcdef"
TOKEN_FILE = (
    f"bench-read-token-0123456789abcdef read\n{TOKEN} write\nbench-admin-token-0123456789abcdef admin\n"
)
# t(0.975, df) for the confidence interval of the mean over pairs.
_T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95 % confidence interval."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, math.nan
    t = _T975.get(len(xs) - 1, 2.0)
    return m, t * statistics.stdev(xs) / math.sqrt(len(xs))


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far (schedstat: nanoseconds on a CPU)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            pass  # a thread that just ended
    return total


def http_ab(
    args: argparse.Namespace, tokens: Path, work: Path
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, list[float]]]]:
    plain = start_server(work / "a", ("default",))
    authed = start_server(work / "b", ("default",), ["--auth-token-file", str(tokens)])
    body = json.dumps({"value": lib.b64(b"v" * 100)})
    rates: dict[str, dict[str, list[float]]] = {m: {"off": [], "on": []} for m in ("PUT", "GET")}
    # Server CPU per request: hardly moved by other processes competing for the cores,
    # unlike req/s on a shared machine.
    cpu_us: dict[str, dict[str, list[float]]] = {m: {"off": [], "on": []} for m in ("PUT", "GET")}
    try:
        for i in range(args.runs):
            order = (("off", plain), ("on", authed))
            if i % 2:
                order = order[::-1]
            for method in ("PUT", "GET"):
                for name, srv in order:
                    url = f"{srv.url}/api/v1/default/kv/bench-key"
                    cmd = ["hey", "-z", f"{args.seconds:g}s", "-c", str(args.connections), "-m", method]
                    if name == "on":
                        cmd += ["-H", f"Authorization: Bearer {TOKEN}"]
                    if method == "PUT":
                        cmd += ["-T", "application/json", "-d", body]
                    before = cpu_ns(srv.proc.pid)
                    out = lib.run([*cmd, url], args.seconds + 60).stdout
                    used = cpu_ns(srv.proc.pid) - before
                    rates[method][name].append(lib.parse_hey(out).rps)
                    done = sum(int(n) for n in re.findall(r"\[2\d\d\]\s+(\d+) responses", out))
                    cpu_us[method][name].append(used / 1000 / max(done, 1))
            print(
                f"pair {i + 1}/{args.runs}: "
                + ", ".join(f"{m} {r['off'][-1]:.0f}:{r['on'][-1]:.0f}" for m, r in rates.items()),
                file=sys.stderr,
            )
    finally:
        plain.stop()
        authed.stop()
    return rates, cpu_us


def micro(tokens: Path) -> dict[str, float]:
    """Microseconds per call of the guard's check (best of 7 repeats)."""

    async def inner(scope: object, receive: object, send: object) -> None:
        return None

    guard = BearerAuth(inner, load_tokens(tokens), metrics_open=False)  # type: ignore[arg-type]
    headers = [
        (b"host", b"127.0.0.1:8080"),
        (b"user-agent", b"hey/0.0.1"),
        (b"content-type", b"application/json"),
        (b"authorization", f"Bearer {TOKEN}".encode()),
        (b"accept-encoding", b"gzip"),
    ]
    scope = {
        "type": "http",
        "method": "PUT",
        "path": "/api/v1/default/kv/bench-key",
        "raw_path": b"/api/v1/default/kv/bench-key",
        "headers": headers,
    }
    assert guard.check(scope) is None  # a good token passes

    def per_call(fn: object, n: int = 200_000) -> float:
        # Thread CPU time, not wall time: on a shared machine preemption inflates the latter.
        times = timeit.repeat(fn, number=n, repeat=7, timer=time.thread_time)  # type: ignore[arg-type]
        return min(times) / n * 1e6

    def drive(app: object) -> None:
        # One ASGI call run to completion without an event loop: nothing in it awaits.
        coro = app(scope, None, None)  # type: ignore[operator]
        try:
            coro.send(None)
        except StopIteration:
            pass

    return {
        "check": per_call(lambda: guard.check(scope)),
        "route only": per_call(lambda: required_role("PUT", b"/api/v1/default/kv/bench-key", False)),
        "layer": per_call(lambda: drive(guard)) - per_call(lambda: drive(inner)),
    }


def in_app(tokens: Path, work: Path, rounds: int = 15, n: int = 4000) -> dict[str, float]:
    """Thread CPU µs per GET through the whole ASGI app in-process (no HTTP, no kernel),
    auth off vs on, in shuffled rounds; the minimum over rounds of each."""
    import asyncio
    import random

    from unisondb.api.app import build_app
    from unisondb.metrics import Metrics
    from unisondb.storage.engine import Engine
    from unisondb.storage.record import Entry, EntryKind

    eng = Engine.open(work / "inproc", "default")
    try:
        eng.submit((Entry(EntryKind.PUT, b"bench-key", b"v" * 100),)).result()
        metrics = Metrics()
        apps = {
            "off": build_app({"default": eng}, metrics),
            "on": build_app({"default": eng}, metrics, tokens=load_tokens(tokens)),
        }
        headers = [
            (b"host", b"127.0.0.1:8080"),
            (b"user-agent", b"hey/0.0.1"),
            (b"authorization", f"Bearer {TOKEN}".encode()),  # sent to both: same parsing
            (b"accept-encoding", b"gzip"),
        ]
        scope = {
            "type": "http",
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/api/v1/default/kv/bench-key",
            "raw_path": b"/api/v1/default/kv/bench-key",
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 2),
        }
        statuses: set[int] = set()

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(msg: dict[str, object]) -> None:
            if msg["type"] == "http.response.start":
                statuses.add(int(msg["status"]))  # type: ignore[call-overload]

        async def loop(app: object) -> None:
            for _ in range(n):
                await app(dict(scope), receive, send)  # type: ignore[operator]

        best = {"off": math.inf, "on": math.inf}
        for _ in range(rounds):
            names = list(best)
            random.shuffle(names)
            for name in names:
                t0 = time.thread_time()
                asyncio.run(loop(apps[name]))
                best[name] = min(best[name], (time.thread_time() - t0) / n * 1e6)
        assert statuses == {200}, statuses
        return best
    finally:
        eng.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--runs", type=int, default=9, help="pairs (off, on) per route")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-auth-") as tmp:
        work = Path(tmp)
        tokens = work / "tokens"
        tokens.write_text(TOKEN_FILE)
        tokens.chmod(0o600)
        us = micro(tokens)
        app_us = in_app(tokens, work)
        rates, cpu_us = http_ab(args, tokens, work)
    print(
        f"HTTP A/B: {args.runs} pairs per route, hey -z {args.seconds:g}s -c {args.connections}, "
        "order alternating inside the pairs\n"
    )
    print(
        "| route | auth off req/s (median) | auth on req/s (median) | on/off of medians "
        "| on/off per pair: median | mean ± 95 % CI |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for method, r in rates.items():
        off, on = statistics.median(r["off"]), statistics.median(r["on"])
        ratios = [b / a for a, b in zip(r["off"], r["on"], strict=True)]
        m, hw = mean_ci(ratios)
        print(
            f"| {method} | {off:.0f} | {on:.0f} | {on / off:.3f} | {statistics.median(ratios):.3f} "
            f"| {m:.3f} ± {hw:.3f} |"
        )
    print("\nServer CPU time per request (all threads, /proc/<pid>/task/*/schedstat):\n")
    print(
        "| route | auth off µs (median) | auth on µs (median) | on − off per pair: median | mean ± 95 % CI "
        "| as % of off |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for method, c in cpu_us.items():
        off, on = statistics.median(c["off"]), statistics.median(c["on"])
        diffs = [b - a for a, b in zip(c["off"], c["on"], strict=True)]
        m, hw = mean_ci(diffs)
        print(
            f"| {method} | {off:.1f} | {on:.1f} | {statistics.median(diffs):+.2f} | {m:+.2f} ± {hw:.2f} "
            f"| {m / off * 100:+.1f} % ± {hw / off * 100:.1f} |"
        )
    print("\nEvery pair (off:on req/s; off:on server CPU µs per request):\n")
    for method, r in rates.items():
        pairs = " / ".join(f"{a:.0f}:{b:.0f}" for a, b in zip(r["off"], r["on"], strict=True))
        print(f"- {method} req/s: {pairs}")
        c = cpu_us[method]
        pairs = " / ".join(f"{a:.1f}:{b:.1f}" for a, b in zip(c["off"], c["on"], strict=True))
        print(f"- {method} CPU µs: {pairs}")
    print("\nIn-process cost of the guard (timeit on thread CPU time, best of 7 × 200,000 calls):\n")
    print("| what | CPU µs per request | share of the plain server's CPU per request (median) |")
    print("|---|---:|---:|")
    for method, c in cpu_us.items():
        off = statistics.median(c["off"])
        for what, key in (
            ("the whole middleware layer (__call__ + check)", "layer"),
            ("BearerAuth.check with a token (3 tokens configured)", "check"),
            ("of which the route lookup", "route only"),
        ):
            print(f"| {method}: {what} | {us[key]:.2f} | {us[key] / off * 100:.2f} % |")

    extra = app_us["on"] - app_us["off"]
    print(
        "\nIn-process GET through the whole ASGI app (metrics, guard, fast path, LMDB; no HTTP "
        f"parsing, no kernel), thread CPU, min of 15 shuffled rounds of 4,000: off {app_us['off']:.2f} µs, "
        f"on {app_us['on']:.2f} µs: +{extra:.2f} µs = {extra / app_us['off'] * 100:+.1f} % of the app's "
        f"own cost; +{extra / statistics.median(cpu_us['GET']['off']) * 100:.1f} % of the server's "
        "CPU per GET measured above."
    )


if __name__ == "__main__":
    main()
