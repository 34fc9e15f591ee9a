"""How scenarios/crash_sweep.py chains its tries (the sweep itself runs on the testbed): each try
starts where the previous one left the cluster, no run is made that no try needs, and a sweep
stopped for time goes on from its record without making a try twice."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scenarios"))
from crash_sweep import NEW, OLD, Choice, Record, run_sweep  # noqa: E402

STEPS = {"apply": 3, "upgrade": 2, "rollback": 4}  # steps of each run: 2 journal writes each


class FakeSweep:
    """The cluster as a version, and every rkel run the sweep asks for."""

    def __init__(self, hosts: tuple[str, ...] = ("rkn1", "rkn2", "rkn3")) -> None:
        self.hosts = list(hosts)
        self.version: str | None = None  # running version, None when there is no cluster
        self.config = ""
        self.runs: list[str] = []

    def remove(self) -> None:
        if self.version is not None:
            self.runs.append("remove")
        self.version = None

    def write(self, version: str) -> None:
        self.config = version

    def put_keys(self, prefix: str) -> list[str]:
        return [f"/sweep/{prefix}/0"]

    def ca_fingerprint(self) -> str:
        return "ca"

    def _next(self, rollback: bool) -> str:
        if rollback:
            return "rollback"
        return "apply" if self.version is None else "upgrade" if self.config != self.version else "noop"

    def must(self, *args: str) -> Any:
        if args[:2] == ("-o", "json"):
            op = self._next(rollback="--rollback" in args)
            steps = STEPS.get(op, 0)
            return type("R", (), {"stdout": json.dumps(
                {"groups": [{"units": [{"steps": ["s"] * steps}]}]})})()
        if args[0] in ("apply", "rollback"):
            self.runs.append(f"{self._next(args[0] == 'rollback')} uncrashed")
            self.version = OLD if args[0] == "rollback" else self.config
        return None

    def killed(self, op: str, crash: int) -> tuple[str, float]:
        assert self._next(op == "rollback") == op, (op, self.version, self.config)
        self.runs.append(f"{op} @{crash}")
        time.sleep(0.01)  # a try takes time: the other lanes take theirs meanwhile
        self.version = OLD if op == "rollback" else self.config
        return "killed and resumed", 1.0

    def problems(self, version: str, kept: list[str], gone: list[str], ca: str) -> list[str]:
        return [] if version == self.version else [f"at {self.version}, not {version}"]


def test_every_try_starts_where_the_last_left_and_nothing_is_run_twice(tmp_path: Path) -> None:
    sweep = FakeSweep()
    record = Record(tmp_path / "record.jsonl")
    tallies = run_sweep(sweep, {op: Choice() for op in STEPS}, record,  # type: ignore[arg-type]
                        log=lambda *_: None)
    assert {op: (t.total, t.passed, t.failed) for op, t in tallies.items()} == {
        "apply": (6, 5, []), "upgrade": (4, 3, []), "rollback": (8, 7, [])}
    tries = [r for r in sweep.runs if "@" in r]
    assert len(tries) == len(set(tries)) == 15
    # counting boundaries: a fresh apply and an upgrade; then the chain: rollback, apply,
    # upgrade, rollback, ... and once the upgrades are all tried, an uncrashed one before each
    # remaining rollback (a rollback needs 1.31 with a snapshot of 1.30 to go back to)
    uncrashed = [r for r in sweep.runs if r.endswith("uncrashed")]
    assert uncrashed == ["apply uncrashed", "upgrade uncrashed"] + ["upgrade uncrashed"] * 3
    assert [r for r in sweep.runs if "@" in r][:6] == [
        "rollback @1", "apply @1", "upgrade @1", "rollback @2", "apply @2", "upgrade @2"]
    assert sweep.runs.count("remove") == 5  # one per apply try: a fresh cluster each


def test_a_sweep_stopped_for_time_goes_on_from_its_record(tmp_path: Path) -> None:
    path = tmp_path / "record.jsonl"
    said: list[str] = []
    stopped = run_sweep(FakeSweep(), {op: Choice() for op in STEPS}, Record(path),
                        budget=0.0, log=said.append)  # type: ignore[arg-type]
    assert [t.tried for t in stopped.values()] == [0, 0, 0]
    assert "stopped for time: 15 tries left; run the same command again to go on" in said
    first = FakeSweep()  # a session that got through apply's boundaries 1 and 2
    run_sweep(first, {"apply": Choice(points=[1, 2])}, Record(path),  # type: ignore[arg-type]
              log=lambda *_: None)
    again = FakeSweep()
    tallies = run_sweep(again, {op: Choice() for op in STEPS}, Record(path),  # type: ignore[arg-type]
                        log=lambda *_: None)
    assert sum(t.passed for t in tallies.values()) == 15
    assert [r for r in again.runs if r.startswith("apply @")] == ["apply @3", "apply @4", "apply @5"]
    lines = path.read_text().splitlines()
    assert len(lines) == 15 and all(json.loads(line)["problems"] == [] for line in lines)


def test_a_try_that_goes_wrong_is_recorded_failed_and_the_next_starts_afresh(tmp_path: Path) -> None:
    class Broken(FakeSweep):
        def killed(self, op: str, crash: int) -> tuple[str, float]:
            if (op, crash) == ("upgrade", 2):
                self.version = "v0"
                raise RuntimeError("the resume failed")
            return super().killed(op, crash)

    sweep = Broken()
    tallies = run_sweep(sweep, {op: Choice() for op in STEPS}, Record(tmp_path / "r.jsonl"),
                        log=lambda *_: None)  # type: ignore[arg-type]
    assert tallies["upgrade"].failed == ["upgrade crash after write 2: the resume failed"]
    assert tallies["upgrade"].passed == 2 and tallies["rollback"].passed == 7


def test_lanes_share_the_tries_each_made_once_on_its_own_cluster(tmp_path: Path) -> None:
    lanes = [FakeSweep(), FakeSweep(("rkn4", "rkn5", "rkn6"))]
    tallies = run_sweep(lanes, {op: Choice() for op in STEPS},  # type: ignore[arg-type]
                        Record(tmp_path / "r.jsonl"), log=lambda *_: None)
    assert sum(t.passed for t in tallies.values()) == 15
    made = [r for lane in lanes for r in lane.runs if "@" in r]
    assert len(made) == len(set(made)) == 15  # every try once, whichever lane made it
    assert all(any("@" in r for r in lane.runs) for lane in lanes)  # both lanes worked
    hosts = {json.loads(line)["hosts"] for line in (tmp_path / "r.jsonl").read_text().splitlines()}
    assert hosts == {"rkn1,rkn2,rkn3", "rkn4,rkn5,rkn6"}
