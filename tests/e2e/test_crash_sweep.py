"""The sampled crash sweep on the real testbed (the full one: scenarios/crash_sweep.py).

For each operation (a fresh apply, an upgrade 1.30 -> 1.31, a rollback to the snapshot before
it), rkel is killed with SIGKILL right after journal write N, for N drawn from the operation's
journal boundaries (seed RKEL_SWEEP_SEED, default 0; RKEL_SWEEP_SAMPLE per operation, default
1), then `rkel apply --resume` runs and the cluster is checked: converged, no etcd key lost (a
rollback's later keys gone), members and containers once each, no `old-*` or helper container,
CA unchanged, state file intact.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scenarios"))
from crash_sweep import OPERATIONS, Choice, Record, Sweep, run_sweep  # noqa: E402

pytestmark = pytest.mark.e2e

SEED = int(os.environ.get("RKEL_SWEEP_SEED", "0"))
SAMPLE = int(os.environ.get("RKEL_SWEEP_SAMPLE", "1"))


def test_killed_at_sampled_journal_boundaries_then_resumed_converges(
        testbed: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    testbed.ensure(("4",))
    workdir = tmp_path_factory.mktemp("sweep")
    sweep = Sweep(workdir, testbed.state_dir, ["rkn1", "rkn2", "rkn3"])
    record = Record(workdir / "record.jsonl")
    try:
        tallies = run_sweep(sweep, {op: Choice(sample=SAMPLE, seed=SEED) for op in OPERATIONS},
                            record)
    finally:
        sweep.remove()
    for op, tally in tallies.items():
        print(f"{op}: {tally.passed} passed, {len(tally.failed)} failed of {tally.total}"
              f" boundaries; slowest resume {tally.slowest:.1f}s")
    for op, tally in tallies.items():
        assert tally.total > 10, op
        assert tally.failed == [], tally.failed
        assert tally.passed == tally.chosen == SAMPLE, op
    # the record holds each try, so the same sweep started again has nothing left to do
    tries = [json.loads(line) for line in (workdir / "record.jsonl").read_text().splitlines()]
    assert sorted(t["op"] for t in tries) == sorted(OPERATIONS * SAMPLE)
    assert all(t["outcome"] == "killed and resumed" for t in tries), tries
