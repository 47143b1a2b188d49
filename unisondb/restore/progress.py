"""Progress reporting for long restore phases: a rich bar on a terminal, silence otherwise."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TextIO


class Progress:
    """No-op progress: the interface every phase reports to."""

    def phase(self, name: str, total: int, unit: str = "B") -> None:
        """Start a new phase of ``total`` units (bytes or records)."""

    def advance(self, n: int) -> None:
        """``n`` more units of the current phase are done."""

    def close(self) -> None:
        """Finish the display."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class RichProgress(Progress):
    """One rich progress bar per phase, on stderr."""

    def __init__(self, stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as _RichProgress

        self._console = Console(file=stream or sys.stderr)
        self._bytes_cols = (
            TextColumn("{task.description:<18}"),
            BarColumn(),
            DownloadColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self._count_cols = (
            TextColumn("{task.description:<18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self._factory = _RichProgress
        self._bar: _RichProgress | None = None
        self._task: object = None

    def phase(self, name: str, total: int, unit: str = "B") -> None:
        self.close()
        cols = self._bytes_cols if unit == "B" else self._count_cols
        self._bar = self._factory(*cols, console=self._console, transient=False)
        self._bar.start()
        self._task = self._bar.add_task(name, total=max(total, 1))

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)  # type: ignore[arg-type]

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def for_terminal(enabled: bool = True) -> Progress:
    """A rich bar if stderr is a terminal (and ``enabled``), otherwise the no-op."""
    if enabled and sys.stderr.isatty():
        return RichProgress()
    return Progress()
