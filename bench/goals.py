"""The goal rows of issues 10 and 11, the report's goals table, and the reader of a previous report.

Every goal has a stable id (``10.snapshot``, ``11.put_vs_etcd``, ...) written in the first column of
the report's "Goals" table, so the next run can find the same row in the newest committed full report
and show the change. Reports written before the goals table existed (``2026-11-24*.md``) are read
through ``LEGACY``: which cell of their "Results"/"Context" tables holds the same quantity. A row
absent from the previous report says "new".

Quantities are stored in base units (seconds, bytes, req/s, plain ratios) and written with units
(``1.80 ms``, ``63 MiB``, ``1.29×``); ``parse_quantity`` reads them back.
"""

from __future__ import annotations

import math
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lib import median

# --- the goals ---


@dataclass(frozen=True)
class Goal:
    id: str
    issue: int
    measurement: str
    #: "×" ratio, "s"/"ms" time, "MiB"/"B" memory, "n" a plain number.
    unit: str
    #: The bound, or None for a row the issue only asks to report.
    bound: float | None = None
    higher_better: bool = False

    @property
    def goal_text(self) -> str:
        if self.bound is None:
            return "report"
        return ("≥ " if self.higher_better else "≤ ") + fmt_quantity(self.bound, self.unit)


MIB = float(1 << 20)

GOALS: tuple[Goal, ...] = (
    Goal(
        "10.snapshot",
        10,
        "snapshot of ≥ 2 GiB data.mdb (HTTP, hash included) ÷ `cp` + `sync`",
        "×",
        1.3,
    ),
    Goal(
        "10.snapshot_cold",
        10,
        "first snapshot after a server start (data.mdb dropped from the page cache with "
        "POSIX_FADV_DONTNEED; not a full cold cache) ÷ the next, warm, snapshot",
        "×",
    ),
    Goal("10.wal_backup", 10, "WAL backup of 100 sealed segments ÷ `cp` + `sync`", "×", 1.1),
    Goal(
        "10.restore",
        10,
        "restore of ≥ 2 GiB snapshot + 1 M WAL records ÷ `cp` + `sync` + raw py-lmdb insert",
        "×",
        2.0,
    ),
    Goal(
        "10.restore_snapshot_only",
        10,
        "restore of a snapshot, no WAL (full restore) ÷ `cp` + `sync`",
        "×",
    ),
    Goal("10.put_during_snapshots", 10, "PUT req/s during back-to-back snapshots ÷ without", "×", 0.8, True),
    Goal("10.put_p99_during_snapshots", 10, "PUT p99 during back-to-back snapshots ÷ without", "×", 3.0),
    Goal("10.restore_rss", 10, "peak RSS of `unisondb restore` (ru_maxrss of the child)", "MiB", 150 * MIB),
    Goal("11.put_vs_etcd", 11, "durable PUT req/s, HTTP, 16 conns, 100 B (hey) ÷ etcd 3.4", "×", 2.0, True),
    Goal("11.put_p99_vs_etcd", 11, "durable PUT p99, 16 conns ÷ etcd 3.4's", "×", 1.0),
    Goal("11.get_vs_redis", 11, "GET req/s, HTTP, 16 conns (hey) ÷ Redis 7 GET", "×", 0.4, True),
    Goal("11.single_client_p50", 11, "single-client PUT p50 (hey -c 1) ÷ the previous report's", "×", 1.0),
    Goal("11.writes_per_fsync", 11, "writes per WAL fsync under the 16-conn PUT load (/metrics)", "n"),
    Goal("11.memtable_bytes", 11, "in-memory table peak under the PUT load (`unisondb_memtable_bytes`)", "B"),
    Goal("11.lmdb_lag", 11, "LMDB lag, peak under the PUT load (`unisondb_lmdb_lag_records`)", "n"),
    Goal("11.rss_anon_http", 11, "server RssAnon, peak under the HTTP loads", "MiB", 64 * MIB),
    Goal(
        "11.rss_anon_big",
        11,
        "server RssAnon, peak with the big database under snapshots + PUT load",
        "MiB",
        64 * MIB,
    ),
)
BY_ID = {g.id: g for g in GOALS}


# --- quantities ---

_UNITS = {
    "µs": 1e-6,
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "/s": 1.0,
    "B": 1.0,
    "KiB": 1024.0,
    "MiB": MIB,
    "GiB": float(1 << 30),
    "×": 1.0,
    "": 1.0,
}
_QUANTITY = re.compile(r"^\s*([-+]?[\d,]*\.?\d+(?:[eE][-+]?\d+)?)\s*(µs|us|ms|s|/s|B|KiB|MiB|GiB|×)?")


def parse_quantity(text: str) -> float | None:
    """``"1.80 ms"`` → 0.0018, ``"6,761/s"`` → 6761, ``"63 MiB"`` → bytes, ``"1.29×"`` → 1.29.

    Only the leading quantity counts (``"1.29× (better)"``); None when the cell holds none
    (``"—"``, ``"not run"``)."""
    m = _QUANTITY.match(text.replace("*", ""))
    if not m:
        return None
    return float(m.group(1).replace(",", "")) * _UNITS[m.group(2) or ""]


def fmt_quantity(x: float | None, unit: str) -> str:
    if x is None or math.isnan(x):
        return "—"
    if unit == "×":
        return f"{x:.2f}×" if abs(x) < 10 else f"{x:.1f}×"
    if unit in ("s", "ms"):
        if x < 1e-4:
            return f"{x * 1e6:.1f} µs"
        if x < 1.0:
            return f"{x * 1e3:.2f} ms"
        return f"{x:.2f} s"
    if unit == "MiB":
        return f"{x / MIB:,.1f} MiB"
    if unit == "B":
        return f"{x / 1024:,.1f} KiB" if x >= 1024 else f"{x:,.0f} B"
    return f"{x:,.2f}" if x < 100 else f"{x:,.0f}"


# --- a measured row ---


@dataclass
class Row:
    goal: Goal
    #: Per-run values of the row's quantity (ratios for "×" rows), in base units.
    runs: list[float] = field(default_factory=list)
    ours: str = "—"
    peer: str = "—"
    #: 1-minute load averages sampled at the row's measurements.
    loads: list[float] = field(default_factory=list)
    #: Why the row has no value (section not run, disk too small, ...).
    skipped: str = ""
    note: str = ""

    @property
    def value(self) -> float:
        return median(self.runs)

    def met(self) -> str:
        v = self.value
        if self.skipped or math.isnan(v):
            return "—"
        if self.goal.bound is None:
            return "(report)"
        ok = v >= self.goal.bound if self.goal.higher_better else v <= self.goal.bound
        return "yes" if ok else "**no**"


def load_range(loads: Sequence[float]) -> str:
    if not loads:
        return "—"
    lo, hi = f"{min(loads):.1f}", f"{max(loads):.1f}"
    return lo if lo == hi else f"{lo}–{hi}"


# --- the previous report ---


@dataclass(frozen=True)
class Previous:
    """One row of a previous report: its result and its UnisonDB cell, in base units."""

    result: float | None
    ours: float | None


_FULL_TITLE = re.compile(r"^# UnisonDB benchmarks — .*\(full mode\)\s*$", re.MULTILINE)
_STARTED = re.compile(r"started (\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})")


def parse_tables(text: str) -> dict[str, list[list[str]]]:
    """Every Markdown table under a ``##`` heading: heading → rows (header row first), cells stripped."""
    tables: dict[str, list[list[str]]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
            continue
        s = line.strip()
        if not (s.startswith("|") and s.endswith("|")):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", s[1:-1])]
        if all(re.fullmatch(r":?-+:?", c) for c in cells if c):
            continue  # the alignment row
        tables.setdefault(heading, []).append(cells)
    return tables


def _part(cell: str, i: int) -> str:
    parts = re.split(r" / |, ", cell)
    return parts[i] if i < len(parts) else ""


@dataclass(frozen=True)
class LegacyRule:
    """Where an old report (no goals table) holds a row: the Results row whose measurement
    matches ``measurement`` (〃 continues the row above) and whose peer cell matches ``peer``;
    ``column`` "ratio" or "ours"; ``part`` picks one side of ``a / b`` cells."""

    id: str
    measurement: str
    peer: str = ""
    column: str = "ratio"
    part: int = 0
    transform: Callable[[float], float] | None = None


LEGACY: tuple[LegacyRule, ...] = (
    LegacyRule("10.snapshot", r"^B-tree snapshot", r"^\*\*limit\*\*"),
    LegacyRule("10.wal_backup", r"^WAL backup of", r"^\*\*limit\*\*"),
    LegacyRule("10.restore", r"^restore: snapshot", r"^\*\*limit\*\*"),
    LegacyRule("10.put_during_snapshots", r"while a snapshot loop runs.*\)$", r"without the loop"),
    LegacyRule("10.put_p99_during_snapshots", r"while a snapshot loop runs.* p50 / p99$", r"without", part=1),
    LegacyRule("10.restore_rss", r"^peak RSS of `unisondb restore`", column="ours"),
    LegacyRule("11.put_vs_etcd", r"^durable PUT req/s", r"^etcd"),
    LegacyRule("11.put_p99_vs_etcd", r"^PUT latency p50 / p99", r"^etcd", part=1),
    LegacyRule("11.get_vs_redis", r"^GET req/s", r"^Redis"),
    LegacyRule("11.rss_anon_http", r"anonymous memory only", column="ours", part=0),
    LegacyRule("11.rss_anon_big", r"anonymous memory only", column="ours", part=1),
    # The old reports gave fsyncs per write.
    LegacyRule(
        "11.writes_per_fsync",
        r"^WAL fsyncs per acknowledged HTTP PUT",
        column="context",
        transform=lambda f: 1 / f if f else math.nan,
    ),
)


def _parse_legacy(tables: dict[str, list[list[str]]]) -> dict[str, Previous]:
    out: dict[str, Previous] = {}
    results = tables.get("Results", [])[1:]
    context = tables.get("Context", [])[1:]
    rows: list[tuple[str, str, str, str]] = []  # measurement, ours, peer, ratio — 〃 resolved
    last_meas = last_ours = ""
    for r in results:
        if len(r) < 5:
            continue
        meas, ours, peer, _theirs, rat = r[:5]
        if meas.startswith("〃"):
            meas = last_meas + meas[1:]
            ours = ours or last_ours
        else:
            last_meas, last_ours = meas, ours
        rows.append((meas, ours, peer, rat))
    for rule in LEGACY:
        value: float | None = None
        if rule.column == "context":
            for c in context:
                if len(c) >= 2 and re.search(rule.measurement, c[0]):
                    value = parse_quantity(c[1])
                    break
        else:
            for meas, ours, peer, rat in rows:
                if re.search(rule.measurement, meas) and (not rule.peer or re.search(rule.peer, peer)):
                    cell = rat if rule.column == "ratio" else ours
                    value = parse_quantity(_part(cell, rule.part))
                    break
        if value is not None and rule.transform is not None:
            value = rule.transform(value)
        if value is not None and not math.isnan(value):
            # The old reports' UnisonDB cell of a ratio row is not the row's quantity.
            out[rule.id] = Previous(value, value if rule.column == "ours" else None)
    return out


def parse_report(text: str) -> dict[str, Previous]:
    """Row id → the previous run's value, from a report of this harness (old or new format)."""
    tables = parse_tables(text)
    goals = tables.get("Goals")
    if not goals:
        return _parse_legacy(tables)
    head = [h.lower() for h in goals[0]]
    try:
        i_id, i_res, i_ours = head.index("id"), head.index("result"), head.index("unisondb")
    except ValueError:
        return {}
    out: dict[str, Previous] = {}
    for r in goals[1:]:
        if len(r) != len(head):
            continue
        rid = r[i_id].strip("`")
        res, ours = parse_quantity(r[i_res]), parse_quantity(r[i_ours])
        if res is not None or ours is not None:
            out[rid] = Previous(res, ours)
    return out


def is_full_report(text: str) -> bool:
    return bool(_FULL_TITLE.search(text))


def started_at(text: str) -> str:
    m = _STARTED.search(text)
    return m.group(1) if m else ""


def committed_reports(results_dir: Path) -> list[Path] | None:
    """The ``*.md`` files git tracks in ``results_dir`` (None when git cannot tell)."""
    try:
        p = subprocess.run(
            ["git", "ls-files", "--", "*.md"],
            cwd=results_dir,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0:
        return None
    return [results_dir / line for line in p.stdout.splitlines() if "/" not in line]


def newest_full_report(candidates: Sequence[Path], exclude: Path | None = None) -> Path | None:
    """The full-mode report with the latest "started" time (the file name breaks ties)."""
    best: tuple[str, str] | None = None
    best_path: Path | None = None
    for p in candidates:
        if exclude is not None and p.resolve() == exclude.resolve():
            continue
        try:
            text = p.read_text(errors="replace")
        except OSError:
            continue
        if not is_full_report(text):
            continue
        key = (started_at(text), p.name)
        if best is None or key > best:
            best, best_path = key, p
    return best_path


# --- the table ---

HEADER = [
    "id",
    "measurement",
    "goal",
    "UnisonDB",
    "peer",
    "result",
    "per run",
    "load (1 min)",
    "previous",
    "change",
    "met?",
]


def change_text(goal: Goal, now: float, before: float | None) -> str:
    if before is None:
        return "new"
    if math.isnan(now) or not before:
        return "—"
    r = now / before
    if abs(r - 1) < 0.05:
        word = "same"
    else:
        better = r > 1 if goal.higher_better else r < 1
        if goal.bound is None and goal.unit != "×":
            word = "up" if r > 1 else "down"
        else:
            word = "better" if better else "worse"
    return f"{fmt_quantity(r, '×')} ({word})"


def table_rows(rows: Sequence[Row], previous: dict[str, Previous]) -> list[list[str]]:
    out: list[list[str]] = []
    for row in rows:
        g = row.goal
        prev = previous.get(g.id)
        if row.skipped:
            out.append([f"`{g.id}`", g.measurement, g.goal_text, row.skipped, "", "—", "", "", "", "", "—"])
            continue
        v = row.value
        out.append(
            [
                f"`{g.id}`",
                g.measurement + (f" — {row.note}" if row.note else ""),
                g.goal_text,
                row.ours,
                row.peer,
                f"**{fmt_quantity(v, g.unit)}**",
                ", ".join(fmt_quantity(x, g.unit) for x in row.runs) or "—",
                load_range(row.loads),
                fmt_quantity(prev.result, g.unit) if prev and prev.result is not None else "new",
                change_text(g, v, prev.result if prev else None),
                row.met(),
            ]
        )
    return out
