"""Same-run A/B of bearer-token authentication: PUT and GET req/s with and without tokens.

Run by hand (needs Debian's `hey`):

    .venv/bin/python bench/bench_auth.py [--seconds 4] [--connections 16] [--runs 3]

Starts two servers on scratch data dirs on 127.0.0.1 — one plain, one with
``--auth-token-file`` (3 tokens) — and alternates hey runs between them (A B A B ...) so
drift on the shared machine hits both alike. Prints the median req/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lib
from serverproc import start_server

TOKEN = "bench-write-token-0123456789abcdef"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-auth-") as tmp:
        work = Path(tmp)
        tokens = work / "tokens"
        tokens.write_text(
            f"bench-read-token-0123456789abcdef read\n{TOKEN} write\n"
            "bench-admin-token-0123456789abcdef admin\n"
        )
        tokens.chmod(0o600)
        plain = start_server(work / "a", ("default",))
        authed = start_server(work / "b", ("default",), ["--auth-token-file", str(tokens)])
        body = json.dumps({"value": lib.b64(b"v" * 100)})
        rates: dict[tuple[str, str], list[float]] = {}
        try:
            for _ in range(args.runs):
                for name, srv in (("off", plain), ("on", authed)):
                    url = f"{srv.url}/api/v1/default/kv/bench-key"
                    extra = ["-H", f"Authorization: Bearer {TOKEN}"] if name == "on" else []
                    for method in ("PUT", "GET"):
                        cmd = [
                            "hey",
                            "-z",
                            f"{args.seconds:g}s",
                            "-c",
                            str(args.connections),
                            "-m",
                            method,
                            *extra,
                        ]
                        if method == "PUT":
                            cmd += ["-T", "application/json", "-d", body]
                        out = lib.run([*cmd, url], args.seconds + 60).stdout
                        rates.setdefault((method, name), []).append(lib.parse_hey(out).rps)
        finally:
            plain.stop()
            authed.stop()
    print(
        f"| route | auth off req/s | auth on req/s | on/off | runs ({args.seconds:g} s, "
        f"{args.connections} conns) |"
    )
    print("|---|---:|---:|---:|---|")
    for method in ("PUT", "GET"):
        off = statistics.median(rates[(method, "off")])
        on = statistics.median(rates[(method, "on")])
        runs = " / ".join(
            f"{a:.0f}:{b:.0f}" for a, b in zip(rates[(method, "off")], rates[(method, "on")], strict=True)
        )
        print(f"| {method} | {off:.0f} | {on:.0f} | {on / off:.3f} | {runs} |")


if __name__ == "__main__":
    main()
