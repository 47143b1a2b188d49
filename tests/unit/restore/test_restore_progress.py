"""The progress reporters: silent off a terminal, rich bars on one."""

from __future__ import annotations

import io

from unisondb.restore.progress import Progress, RichProgress, for_terminal


def test_not_a_terminal_is_silent(capsys: object) -> None:
    p = for_terminal()
    assert type(p) is Progress
    with p:
        p.phase("copy snapshot", 10)
        p.advance(10)


def test_rich_progress_renders_phases() -> None:
    out = io.StringIO()
    p = RichProgress(out)
    with p:
        p.phase("copy snapshot", 1000)
        p.advance(1000)
        p.phase("replay WAL", 5, unit="records")
        p.advance(5)
    text = out.getvalue()
    assert "copy snapshot" in text and "replay WAL" in text and "5/5" in text
