"""The benchmark report's goal rows: medians, interleaving, the reader of a previous report
(both the goals table this harness writes and the older reports' Results table), and the
comparison with it. bench/ is not a package: its directory goes on sys.path, as run.py does."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench"
sys.path.insert(0, str(BENCH))

import goals  # noqa: E402
import lib  # noqa: E402

OLD_REPORT = BENCH / "results" / "2026-11-24-after-improvements.md"


def test_median_ignores_missing_runs() -> None:
    assert lib.median([3.0, 1.0, 2.0]) == 2.0
    assert lib.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert lib.median([1.0, math.nan, 5.0, 3.0]) == 3.0
    assert math.isnan(lib.median([]))
    assert math.isnan(lib.median([math.nan]))


def test_paired_ratios_are_per_round_and_drop_broken_pairs() -> None:
    assert lib.paired_ratios([2.0, 3.0, 4.0], [1.0, 2.0, 8.0]) == [2.0, 1.5, 0.5]
    # a zero or missing side drops that round only; the longer list is cut to the pairs
    assert lib.paired_ratios([2.0, 3.0, math.nan, 5.0], [0.0, 1.5, 1.0]) == [2.0]


def test_interleave_alternates_sides_and_rotates_groups() -> None:
    groups = [["uni", "cp"], ["etcd"]]
    rounds = [lib.interleave(groups, i) for i in range(4)]
    assert rounds == [
        ["uni", "cp", "etcd"],
        ["etcd", "cp", "uni"],
        ["uni", "cp", "etcd"],
        ["etcd", "cp", "uni"],
    ]
    # every round runs every step exactly once; each side of the pair goes first in turn
    for r in rounds:
        assert sorted(r) == ["cp", "etcd", "uni"]
    firsts = [r.index("uni") < r.index("cp") for r in rounds]
    assert firsts == [True, False, True, False]
    three = [["a", "b"], ["c", "d"], ["e"]]
    assert [lib.interleave(three, i)[0] for i in range(3)] == ["a", "d", "e"]
    assert lib.interleave([], 5) == []


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1.80 ms", 0.0018),
        ("79.0 µs", 79e-6),
        ("6,761/s", 6761.0),
        ("9.02 s", 9.02),
        ("63 MiB", 63 * 2**20),
        ("17.0 KiB", 17 * 1024),
        ("**1.29×**", 1.29),
        ("0.22× (better)", 0.22),
        ("8.2", 8.2),
    ],
)
def test_parse_quantity(text: str, value: float) -> None:
    got = goals.parse_quantity(text)
    assert got is not None and math.isclose(got, value, rel_tol=1e-9)


@pytest.mark.parametrize("text", ["—", "new", "not run (`--only http`)", ""])
def test_parse_quantity_refuses_non_numbers(text: str) -> None:
    assert goals.parse_quantity(text) is None


def test_fmt_quantity_round_trips_through_parse() -> None:
    for x, unit in [(1.2345, "×"), (0.0018, "ms"), (2.5, "s"), (63.4 * 2**20, "MiB"), (8.19, "n")]:
        back = goals.parse_quantity(goals.fmt_quantity(x, unit))
        assert back is not None and math.isclose(back, x, rel_tol=0.01), (x, unit)


def test_old_report_rows_are_found_by_the_legacy_rules() -> None:
    prev = goals.parse_report(OLD_REPORT.read_text())
    assert prev["10.snapshot"].result == 5.52
    assert prev["10.wal_backup"].result == 2.01
    assert prev["10.restore"].result == 9.33
    assert prev["10.put_during_snapshots"].result == 0.60
    assert prev["10.put_p99_during_snapshots"].result == 6.39  # the p99 half of "1.43× / 6.39×"
    assert prev["10.restore_rss"].result == 63 * 2**20
    assert prev["11.put_vs_etcd"].result == 1.29  # the etcd row, not Redis or the limit
    assert prev["11.put_p99_vs_etcd"].result == 0.55
    assert prev["11.get_vs_redis"].result == 0.20
    assert prev["11.rss_anon_http"].result == 29 * 2**20
    assert prev["11.rss_anon_big"].result == 43 * 2**20
    wpf = prev["11.writes_per_fsync"].result
    assert wpf is not None and math.isclose(wpf, 1 / 0.122)
    for new in ("10.snapshot_cold", "10.restore_snapshot_only", "11.single_client_p50", "11.lmdb_lag"):
        assert new not in prev


def _report(rows: list[goals.Row], previous: dict[str, goals.Previous]) -> str:
    md = lib.Markdown()
    md.h(1, "UnisonDB benchmarks — 2026-12-02 (full mode)")
    md.p("Command: `bench/run.py` — started 2026-12-02 09:00:00 UTC, took 14.0 min.")
    md.h(2, "Goals")
    md.table(goals.HEADER, goals.table_rows(rows, previous))
    md.h(2, "Results")
    md.table(["measurement", "UnisonDB", "compared with (same run)", "peer", "UnisonDB / peer"], [])
    return md.render()


def test_goals_table_round_trips_and_compares() -> None:
    g = goals.BY_ID
    snap = goals.Row(g["10.snapshot"], runs=[1.4, 1.2, 1.25], ours="2.41 s", peer="1.90 s", loads=[1.5, 2.5])
    rss = goals.Row(g["10.restore_rss"], runs=[140 * 2**20, 170 * 2**20, 160 * 2**20], ours="160.0 MiB")
    c1 = goals.Row(g["11.single_client_p50"], ours="1.80 ms", note="no previous single-client figure")
    skipped = goals.Row(g["10.wal_backup"], skipped="skipped: 3.0 GiB free, the database needs 14.0 GiB")
    old = goals.parse_report(OLD_REPORT.read_text())
    text = _report([snap, rss, c1, skipped], old)
    table = goals.parse_tables(text)["Goals"]
    by_id = {r[0].strip("`"): dict(zip(goals.HEADER, r, strict=True)) for r in table[1:]}
    assert by_id["10.snapshot"]["result"] == "**1.25×**"
    assert by_id["10.snapshot"]["previous"] == "5.52×"
    assert by_id["10.snapshot"]["change"] == "0.23× (better)"
    assert by_id["10.snapshot"]["met?"] == "yes"  # 1.25 ≤ 1.3
    assert by_id["10.snapshot"]["load (1 min)"] == "1.5–2.5"
    assert by_id["10.restore_rss"]["met?"] == "**no**"  # median 160 MiB > 150 MiB
    assert by_id["10.restore_rss"]["change"].endswith("(worse)")
    assert by_id["11.single_client_p50"]["previous"] == "new"
    assert by_id["11.single_client_p50"]["change"] == "new"
    assert by_id["10.wal_backup"]["UnisonDB"].startswith("skipped: 3.0 GiB free")

    again = goals.parse_report(text)
    assert again["10.snapshot"] == goals.Previous(1.25, 2.41)
    assert again["10.restore_rss"].result == 160 * 2**20
    # A row with no result yet keeps its UnisonDB figure: the next run compares with it.
    c1_prev = again["11.single_client_p50"]
    assert c1_prev.result is None and c1_prev.ours == pytest.approx(0.0018)
    assert "10.wal_backup" not in again


def test_load_range() -> None:
    assert goals.load_range([]) == "—"
    assert goals.load_range([9.36, 9.44]) == "9.4"
    assert goals.load_range([2.0, 11.5, 3.25]) == "2.0–11.5"


def test_change_text_follows_the_goal_direction() -> None:
    put = goals.BY_ID["11.put_vs_etcd"]  # higher is better
    assert goals.change_text(put, 2.2, 1.1) == "2.00× (better)"
    assert goals.change_text(put, 1.0, 2.0) == "0.50× (worse)"
    assert goals.change_text(put, 1.02, 1.0) == "1.02× (same)"
    assert goals.change_text(put, 1.0, None) == "new"
    lag = goals.BY_ID["11.lmdb_lag"]  # report-only, no direction
    assert goals.change_text(lag, 300, 100) == "3.00× (up)"


def test_met_needs_a_value_and_a_bound() -> None:
    put = goals.BY_ID["11.put_vs_etcd"]
    assert goals.Row(put, runs=[2.1, 1.9, 2.4]).met() == "yes"
    assert goals.Row(put, runs=[1.9, 1.8, 2.4]).met() == "**no**"
    assert goals.Row(put).met() == "—"
    assert goals.Row(goals.BY_ID["11.lmdb_lag"], runs=[5.0]).met() == "(report)"


def test_newest_full_report_skips_quick_and_other_reports(tmp_path: Path) -> None:
    def write(name: str, title: str, started: str) -> Path:
        p = tmp_path / name
        p.write_text(f"# {title}\n\nCommand: `x` — started {started} UTC, took 9 min.\n")
        return p

    a = write("2026-11-24.md", "UnisonDB benchmarks — 2026-11-24 (full mode)", "2026-11-24 09:50:29")
    b = write("2026-11-24-b.md", "UnisonDB benchmarks — 2026-11-24 (full mode)", "2026-11-24 10:33:08")
    q = write("quick-2026-12-01.md", "UnisonDB benchmarks — 2026-12-01 (quick mode)", "2026-12-01 10:00:00")
    other = write("2026-12-01-speed.md", "Issue 10 (speed) — partial", "2026-12-01 11:00:00")
    assert goals.newest_full_report([a, q, b, other]) == b
    assert goals.newest_full_report([a, q, b, other], exclude=b) == a
    assert goals.newest_full_report([q, other]) is None


def test_the_committed_reports_give_a_previous_full_report() -> None:
    committed = goals.committed_reports(BENCH / "results")
    if committed is None:
        pytest.skip("not a git checkout")
    newest = goals.newest_full_report(committed)
    assert newest is not None and goals.is_full_report(newest.read_text())


def test_run_maxrss_reports_the_child_not_the_harness(tmp_path: Path) -> None:
    # The harness holds 200 MiB; a naive fork + exec would report at least that for the child.
    ballast = bytearray(200 << 20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    m = lib.run_maxrss([sys.executable, "-c", "x = bytearray(40 << 20); print(len(x))"], 60, tmp_path)
    assert m.returncode == 0 and m.stdout.strip() == str(40 << 20)
    assert 40 << 10 <= m.maxrss_kib < 120 << 10, m.maxrss_kib
    assert ballast[4096] == 1
    failed = lib.run_maxrss(["sh", "-c", "echo no >&2; exit 3"], 60, tmp_path)
    assert failed.returncode == 3 and failed.stderr == "no\n"
    assert list(tmp_path.iterdir()) == []  # the result file is removed


HEY_FEW = """
Summary:
  Total:\t1.0123 secs
  Slowest:\t0.3297 secs
  Fastest:\t0.0027 secs
  Average:\t0.0301 secs
  Requests/sec:\t37.5380

Latency distribution:
  10% in 0.0050 secs
  50% in 0.0120 secs
  95% in 0.3297 secs
  0% in 0.0000 secs

Status code distribution:
  [200]\t38 responses
"""


def test_parse_hey_with_too_few_responses_for_a_p99_line_uses_the_slowest() -> None:
    load = lib.parse_hey(HEY_FEW)
    assert load == lib.Load(37.538, 12.0, 329.7)
    assert lib.parse_hey(HEY_FEW.replace("  0% in 0.0000", "  99% in 0.2000")).p99 == 200.0
    with pytest.raises(lib.BenchError, match="non-2xx"):
        lib.parse_hey(HEY_FEW.replace("[200]\t38 responses", "[200]\t30 responses\n  [503]\t8 responses"))
