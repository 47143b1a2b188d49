"""Power cuts during ``unisondb restore`` (see restore_rounds.py for a round and its checks).

CI cuts at 3 of the restore's sync points per scenario (the last two, where publication
happens, and a seeded one of the others); the slow soak cuts at every one of them,
which is every durable state a cut can leave.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from powercut_mount import PowerCutMount
from restore_rounds import SCENARIOS, BackupSet, RestoreRounds, make_backup_set
from serverproc import ServerProcess

ROUNDS = int(os.environ.get("UNISONDB_POWERCUT_RESTORE_ROUNDS", "1"))
SEED = int(os.environ.get("UNISONDB_POWERCUT_SEED", str(random.randrange(1 << 32))))


@pytest.fixture(scope="module")
def backup_set(tmp_path_factory: pytest.TempPathFactory) -> BackupSet:
    return make_backup_set(tmp_path_factory.mktemp("restore-set"), SEED)


def run(
    pcfs: PowerCutMount,
    servers: list[ServerProcess],
    tmp_path: Path,
    backup_set: BackupSet,
    scenario: str,
    rounds: int | None,
) -> RestoreRounds:
    logs = tmp_path / "logs"
    logs.mkdir()
    pcfs.unmount()  # each round mounts its own start tree
    r = RestoreRounds(pcfs, backup_set, scenario, logs, servers)
    total = r.calibrate()
    assert total >= 5, f"an undisturbed restore made only {total} syncs: is it on the mount?"
    points = list(range(1, total + 2))
    if rounds is not None:
        # Always the publish end (the cut before the last sync, and after the restore
        # ended), plus a seeded sample of the earlier points.
        early = points[:-2]
        points = sorted(random.Random(SEED).sample(early, min(rounds, len(early)))) + points[-2:]
    problems: list[str] = []
    for n in points:
        problems += r.round(n, total)
    print("\n".join(r.lines))
    print(f"{scenario}: {len(points)} of {total + 1} cut points, outcomes {dict(r.outcomes)}")
    assert not problems, f"UNISONDB_POWERCUT_SEED={SEED}:\n" + "\n".join(r.lines + problems[:40])
    return r


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_power_cut_during_restore_leaves_old_or_whole_new(
    pcfs: PowerCutMount, servers: list[ServerProcess], tmp_path: Path, backup_set: BackupSet, scenario: str
) -> None:
    run(pcfs, servers, tmp_path, backup_set, scenario, ROUNDS)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~12 rounds of ~30 s each on a loaded machine: over the default 300 s
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_power_cut_during_restore_at_every_sync_point(
    pcfs: PowerCutMount, servers: list[ServerProcess], tmp_path: Path, backup_set: BackupSet, scenario: str
) -> None:
    r = run(pcfs, servers, tmp_path, backup_set, scenario, None)
    # Every cut point was tried: both outcomes must have happened.
    assert r.outcomes["published"] > 0 and (r.outcomes["absent"] + r.outcomes["old"]) > 0, r.outcomes
