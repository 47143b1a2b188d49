"""Power cuts under load on a real server (see workload.py for a round and its checks)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from powercut_mount import PowerCutMount
from serverproc import ServerProcess
from workload import Rounds

ROUNDS = int(os.environ.get("UNISONDB_POWERCUT_ROUNDS", "5"))
SOAK_ROUNDS = int(os.environ.get("UNISONDB_POWERCUT_SOAK_ROUNDS", "50"))
SEED = int(os.environ.get("UNISONDB_POWERCUT_SEED", str(random.randrange(1 << 32))))
WORKLOADS = ["put", "wal-backup", "snapshot"]


def run_rounds(pcfs: PowerCutMount, servers: list[ServerProcess], tmp_path: Path,
               workload: str, rounds: int) -> None:
    r = Rounds(pcfs, servers, tmp_path / "logs", workload, SEED)
    problems = r.run(rounds)
    for line in r.lines:
        print(line)
    assert not problems, (f"UNISONDB_POWERCUT_SEED={SEED} {workload}:\n" + "\n".join(r.lines)
                          + "\n" + "\n".join(problems[:40]))


@pytest.mark.parametrize("workload", WORKLOADS)
def test_power_cut_keeps_every_acknowledged_write_and_backup(
        pcfs: PowerCutMount, servers: list[ServerProcess], tmp_path: Path, workload: str) -> None:
    run_rounds(pcfs, servers, tmp_path, workload, ROUNDS)


@pytest.mark.slow
@pytest.mark.parametrize("workload", WORKLOADS)
def test_power_cut_soak(pcfs: PowerCutMount, servers: list[ServerProcess], tmp_path: Path,
                        workload: str) -> None:
    run_rounds(pcfs, servers, tmp_path, workload, SOAK_ROUNDS)
