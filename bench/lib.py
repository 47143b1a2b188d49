"""Shared helpers for the benchmarks: running bounded subprocesses (and remembering every
command for the report), parsing hey / wrk / redis-benchmark output, medians and ratios,
the machine's description, peak-RSS sampling, and a small Markdown writer.

Nothing here starts a server; see ``peers.py`` (etcd, Redis) and ``run.py`` (UnisonDB).
"""

from __future__ import annotations

import base64
import csv
import ctypes
import importlib.metadata
import io
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# --- every command the run executes, in order, for the report ---


@dataclass
class CommandLog:
    entries: list[str] = field(default_factory=list)
    #: Replaced by ``$WORK`` in the report, so paths read the same on every machine.
    scratch: str = ""
    #: Long literals (e.g. base64 bodies) shown as a variable: value → name.
    aliases: dict[str, str] = field(default_factory=dict)

    def add(self, text: str) -> None:
        if self.scratch:
            text = text.replace(self.scratch, "$WORK")
        for literal, name in self.aliases.items():
            text = text.replace(literal, name)
        self.entries.append(text)

    def unique(self) -> list[tuple[str, int]]:
        """Commands in first-seen order with how many times each ran."""
        counts: dict[str, int] = {}
        for e in self.entries:
            counts[e] = counts.get(e, 0) + 1
        return list(counts.items())


COMMANDS = CommandLog()


def note(text: str) -> None:
    """Record an in-process step or an HTTP call as a 'command' of the run."""
    COMMANDS.add(text)


def run(
    cmd: Sequence[str],
    timeout: float,
    *,
    check: bool = True,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    log: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with a hard timeout (the process is killed when it expires)."""
    if log:
        COMMANDS.add(shlex.join(cmd))
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"timed out after {timeout:.0f}s: {shlex.join(cmd)}") from exc
    if check and proc.returncode != 0:
        raise BenchError(
            f"exit {proc.returncode}: {shlex.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    return proc


class BenchError(RuntimeError):
    pass


# --- load generators ---


@dataclass(frozen=True)
class Load:
    """One load run: throughput and latency percentiles (milliseconds)."""

    rps: float
    p50: float
    p99: float


def parse_hey(out: str) -> Load:
    """Parse hey's summary; refuse a run with any non-2xx response or error."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"50%+ in ([\d.]+) secs", out)
    # With under ~100 responses hey prints "0% in 0.0000 secs" in place of its 99 % line;
    # the slowest response is then the p99.
    p99 = re.search(r"99%+ in ([\d.]+) secs", out) or re.search(r"Slowest:\s+([\d.]+) secs", out)
    if not (rps and p50 and p99):
        raise BenchError(f"cannot parse hey output:\n{out}")
    codes = re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)
    bad = [c for c in codes if not c[0].startswith("2")]
    if bad or not codes or "Error distribution" in out:
        raise BenchError(f"hey: non-2xx responses or errors under load: {bad}\n{out}")
    return Load(float(rps.group(1)), float(p50.group(1)) * 1000, float(p99.group(1)) * 1000)


_WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(out: str) -> Load:
    """Parse ``wrk --latency`` output; refuse a run with non-2xx responses or socket errors."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)

    def lat(pct: str) -> float:
        m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        if not m:
            raise BenchError(f"cannot parse wrk output:\n{out}")
        return float(m.group(1)) * _WRK_UNITS[m.group(2)]

    if not rps:
        raise BenchError(f"cannot parse wrk output:\n{out}")
    if "Non-2xx" in out or "Socket errors" in out:
        raise BenchError(f"wrk: non-2xx responses or socket errors under load:\n{out}")
    return Load(float(rps.group(1)), lat("50"), lat("99"))


def parse_redis_csv(out: str) -> dict[str, Load]:
    """``redis-benchmark --csv`` (7.x): test, rps, avg, min, p50, p95, p99, max (ms)."""
    rows = list(csv.reader(io.StringIO(out)))
    if not rows or rows[0][:2] != ["test", "rps"]:
        raise BenchError(f"cannot parse redis-benchmark --csv output:\n{out}")
    head = rows[0]
    res = {}
    for r in rows[1:]:
        if len(r) != len(head):
            continue
        d = dict(zip(head, r, strict=True))
        res[d["test"]] = Load(float(d["rps"]), float(d["p50_latency_ms"]), float(d["p99_latency_ms"]))
    return res


def hey(
    url: str,
    seconds: float,
    conns: int,
    *,
    method: str = "GET",
    body: str | None = None,
    content_type: str = "application/json",
    timeout: float | None = None,
) -> Load:
    cmd = ["hey", "-z", f"{seconds:g}s", "-c", str(conns), "-m", method]
    if body is not None:
        cmd += ["-T", content_type, "-d", body]
    cmd.append(url)
    return parse_hey(run(cmd, timeout or seconds + 60).stdout)


def wrk(url: str, seconds: float, conns: int, *, timeout: float | None = None) -> Load:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--latency", url]
    return parse_wrk(run(cmd, timeout or seconds + 60).stdout)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- statistics and formatting ---


def median(xs: Iterable[float]) -> float:
    """The median, NaN (a missing run) ignored; NaN when nothing is left."""
    vals = [x for x in xs if x == x]
    return statistics.median(vals) if vals else float("nan")


def paired_ratios(ours: Sequence[float], theirs: Sequence[float]) -> list[float]:
    """Run i of ours ÷ run i of theirs (both measured in the same round, so a load spike
    that hits one round hits both sides); a pair with a missing or zero side is dropped."""
    return [a / b for a, b in zip(ours, theirs, strict=False) if b and a == a and b == b]


def interleave(groups: Sequence[Sequence[T]], run: int) -> list[T]:
    """The order of round ``run``: the groups rotated by one per round, and each group's
    members reversed on odd rounds — the sides of one comparison run back to back, and no
    side always goes first or always follows the same neighbour."""
    if not groups:
        return []
    k = run % len(groups)
    out: list[T] = []
    for g in [*groups[k:], *groups[:k]]:
        out.extend(reversed(g) if run % 2 else g)
    return out


def median_load(loads: Sequence[Load]) -> Load:
    return Load(median(x.rps for x in loads), median(x.p50 for x in loads), median(x.p99 for x in loads))


def percentile(sorted_vals: Sequence[float], pct: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, round(pct / 100 * len(sorted_vals)) - 1))
    return sorted_vals[i]


def fmt_rate(x: float) -> str:
    if x != x:  # NaN
        return "—"
    return f"{x:,.0f}/s"


def fmt_ms(x: float) -> str:
    if x != x:
        return "—"
    if x < 0.1:
        return f"{x * 1000:.1f} µs"
    return f"{x:.2f} ms" if x < 10 else f"{x:.1f} ms"


def fmt_s(x: float) -> str:
    if x != x:
        return "—"
    return f"{x:.2f} s" if x < 100 else f"{x:.0f} s"


def fmt_mib(n_bytes: float) -> str:
    if n_bytes != n_bytes:
        return "—"
    return f"{n_bytes / 2**20:,.0f} MiB"


def ratio(ours: float, theirs: float) -> str:
    if not theirs or ours != ours or theirs != theirs:
        return "—"
    r = ours / theirs
    return f"{r:.2f}×" if r < 10 else f"{r:.1f}×"


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --- processes ---


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM if this process dies (PR_SET_PDEATHSIG), so
    even a SIGKILLed benchmark leaves no server behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS / RssAnon ... of a live process, in KiB (empty if it is gone)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        m = re.match(r"(\w+):\s+(\d+) kB", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


class RssSampler:
    """Samples /proc/<pid>/status every ``interval`` s; keeps the highest VmHWM and RssAnon."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.hwm_kib = 0
        self.anon_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        st = proc_status(self.pid)
        self.hwm_kib = max(self.hwm_kib, st.get("VmHWM", 0))
        self.anon_kib = max(self.anon_kib, st.get("RssAnon", 0))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


#: Runs argv[3:] as a grandchild of the harness and writes "<exit code> <wall s> <ru_maxrss KiB>"
#: to argv[1]. Why a launcher: a forked child starts with its parent's RSS as its peak, and
#: Linux carries that peak across exec into ru_maxrss — a child of the (large) harness would
#: report the harness's size. The launcher is a fresh interpreter (~10 MiB), which is then the
#: floor of the figure. argv[2] is the signal the grandchild gets if the launcher dies.
_MAXRSS_LAUNCHER = """
import ctypes, os, resource, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sys.argv[2]))
        os.execvp(sys.argv[3], sys.argv[3:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t
with open(sys.argv[1], "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {wall:.6f} {ru.ru_maxrss}")
"""


@dataclass(frozen=True)
class Measured:
    returncode: int
    stdout: str
    stderr: str
    wall: float
    #: ru_maxrss of the command itself (KiB): its peak resident set, file-backed pages included.
    maxrss_kib: int


def run_maxrss(cmd: Sequence[str], timeout: float, scratch: Path) -> Measured:
    """Run ``cmd`` with a hard timeout; return its output, wall time and peak RSS (ru_maxrss)."""
    COMMANDS.add(shlex.join(cmd))
    result = scratch / f"maxrss-{os.getpid()}-{time.monotonic_ns()}.txt"
    with tempfile.TemporaryFile(dir=scratch) as out, tempfile.TemporaryFile(dir=scratch) as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _MAXRSS_LAUNCHER, str(result), str(int(signal.SIGKILL)), *cmd],
            stdout=out,
            stderr=err,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # The launcher and the command are alone in the session this call created.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise BenchError(f"timed out after {timeout:.0f}s: {shlex.join(cmd)}") from None
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    try:
        code, wall, rss = result.read_text().split()
    except (OSError, ValueError):
        raise BenchError(
            f"launcher failed ({proc.returncode}) for {shlex.join(cmd)}:\n{stderr[-2000:]}"
        ) from None
    finally:
        result.unlink(missing_ok=True)
    return Measured(int(code), stdout, stderr, float(wall), int(rss))


# --- page cache and disk ---


def drop_from_page_cache(path: Path) -> None:
    """fsync ``path`` and ask the kernel to drop its pages (POSIX_FADV_DONTNEED).

    Not a cold cache: only this file's clean, unmapped pages go; inodes, directory entries,
    LMDB's lock file and the device's own cache stay warm."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(path: Path) -> int | None:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``), None if unknown."""
    if shutil.which("fincore") is None:
        return None
    p = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        return int(p.stdout.split()[0])
    except (IndexError, ValueError):
        return None


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def load1() -> float:
    """The 1-minute load average."""
    return float(Path("/proc/loadavg").read_text().split()[0])


# --- the machine ---


def _first(path: str, pattern: str) -> str:
    try:
        m = re.search(pattern, Path(path).read_text(), re.MULTILINE)
    except OSError:
        return "?"
    return m.group(1).strip() if m else "?"


def dpkg_version(pkg: str) -> str:
    if shutil.which("dpkg-query") is None:
        return "?"
    p = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True, timeout=30
    )
    return p.stdout.strip() if p.returncode == 0 and p.stdout.strip() else "not installed"


def py_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine(work_dir: Path, debs: Sequence[str], dists: Sequence[str]) -> list[tuple[str, str]]:
    """(field, value) rows describing this machine and the software under test."""
    du = shutil.disk_usage(work_dir)
    fs = subprocess.run(
        ["df", "--output=fstype,source", str(work_dir)], capture_output=True, text=True, timeout=30
    ).stdout.split("\n")[1:2]
    mem_kib = int(_first("/proc/meminfo", r"^MemTotal:\s+(\d+)") or 0)
    cpu = _first("/proc/cpuinfo", r"^model name\s*:\s*(.+)$")
    rows = [
        ("CPU", f"{cpu} × {os.cpu_count()} (nproc {len(os.sched_getaffinity(0))})"),
        ("memory", f"{mem_kib / 2**20:.1f} GiB"),
        (
            "disk (scratch dir)",
            f"{' '.join(fs[0].split()) if fs else '?'}, "
            f"{du.free / 2**30:.0f} GiB free of {du.total / 2**30:.0f} GiB",
        ),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("OS", _first("/etc/os-release", r'^PRETTY_NAME="?([^"\n]+)"?')),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
    ]
    rows.append(("Debian packages", ", ".join(f"{p} {dpkg_version(p)}" for p in debs)))
    rows.append(("Python packages", ", ".join(f"{d} {py_version(d)}" for d in dists)))
    return rows


# --- Markdown ---


class Markdown:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def h(self, level: int, text: str) -> None:
        self.parts.append(f"{'#' * level} {text}\n")

    def p(self, text: str) -> None:
        self.parts.append(text.rstrip() + "\n")

    def table(self, header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> None:
        lines = ["| " + " | ".join(header) + " |"]
        align = align or "l" + "r" * (len(header) - 1)
        lines.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
        for r in rows:
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
        self.parts.append("\n".join(lines) + "\n")

    def code(self, text: str, lang: str = "") -> None:
        self.parts.append(f"```{lang}\n{text.rstrip()}\n```\n")

    def render(self) -> str:
        return "\n".join(self.parts)
