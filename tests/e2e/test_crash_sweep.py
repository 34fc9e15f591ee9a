"""The sampled crash sweep on the real testbed (the full one: scenarios/crash_sweep.py).

For each operation (a fresh apply, an upgrade 1.30 -> 1.31, a rollback to the snapshot before
it), rkel is killed with SIGKILL right after journal write N, for N drawn from the operation's
journal boundaries (seed RKEL_SWEEP_SEED, default 0; counts RKEL_SWEEP_SAMPLE, default 1 for
apply and 1 for the others), then `rkel apply --resume` runs and the cluster is checked:
converged, no etcd key lost (a rollback's later keys gone), members and containers once each,
no `old-*` or helper container, CA unchanged, state file intact.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scenarios"))
from crash_sweep import Sweep, run_operation  # noqa: E402

pytestmark = pytest.mark.e2e

SEED = int(os.environ.get("RKEL_SWEEP_SEED", "0"))
SAMPLE = os.environ.get("RKEL_SWEEP_SAMPLE", "")


@pytest.fixture(scope="module")
def sweep(testbed: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sweep]:
    testbed.ensure(("4",))
    s = Sweep(tmp_path_factory.mktemp("sweep"), testbed.state_dir, ["rkn1", "rkn2", "rkn3"])
    try:
        yield s
    finally:
        if s.state.exists():
            s.rkel("apply", "--resume", "--yes")
            s.rkel("remove", "--force")


@pytest.mark.parametrize(("op", "default"), [("apply", 1), ("upgrade", 1), ("rollback", 1)])
def test_killed_at_a_sampled_journal_boundary_then_resumed_converges(
        sweep: Sweep, op: str, default: int) -> None:
    tally = run_operation(sweep, op, sample=int(SAMPLE or default), seed=SEED)
    print(f"{op}: {tally.passed} passed, {len(tally.failed)} failed of {tally.total} boundaries;"
          f" slowest resume {tally.slowest:.1f}s")
    assert tally.total > 10
    assert tally.failed == [], tally.failed
    assert tally.passed == int(SAMPLE or default)
