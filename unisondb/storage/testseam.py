"""Test seam: ``UNISONDB_TEST_HOLD=<point>:<fifo>`` stops the server at an exact step.

``hold(point)`` blocks until the FIFO is written (or the process is killed), after touching
``<fifo>.reached`` so the test knows it is there. Lets a test kill -9 or SIGTERM the server
at an exact step (a snapshot renamed but its sidecar not yet written; a snapshot copy
inside LMDB's read transaction) instead of racing a timer. Unset in production: one
environment lookup per call.
"""

from __future__ import annotations

import os
from pathlib import Path


def hold(point: str) -> None:
    spec = os.environ.get("UNISONDB_TEST_HOLD")
    if not spec or spec.partition(":")[0] != point:
        return
    fifo = spec.partition(":")[2]
    Path(fifo + ".reached").touch()
    with open(fifo, "rb") as f:  # blocks until the test opens it for writing (or kills us)
        f.read(1)
