"""Replays every scenario in scenarios/*.yml on the Simulated backend.

A scenario is data: a cluster.yml, then steps — `apply` (optionally dying after the Nth journal
write, then resumed), `edit` (change the cluster.yml), `fault` / `heal` (on a simulated host) —
each with what a user would observe afterwards. After every apply the universal checks hold too:
journal intact, no step done twice, etcd quorum kept, windows respected.
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from lifecycle.config import load_config_text
from lifecycle.config.model import ClusterConfig
from tests.simcluster import SimCluster

SCENARIOS = sorted((Path(__file__).resolve().parents[1] / "scenarios").glob("*.yml"))
yaml = YAML(typ="safe")


def _config(data: dict[str, Any]) -> ClusterConfig:
    out = io.StringIO()
    yaml.dump(data, out)
    return load_config_text(out.getvalue(), source="scenario").config


def _edit(data: dict[str, Any], edit: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    nodes = [dict(n) for n in data.get("nodes", [])]
    for name in edit.pop("remove_nodes", []):
        nodes = [n for n in nodes if n.get("hostname_override") != name]
    nodes += edit.pop("add_nodes", [])
    for name, roles in edit.pop("set_roles", {}).items():
        for n in nodes:
            if n.get("hostname_override") == name:
                n["role"] = roles
    data["nodes"] = nodes
    data.update(edit)
    return data


def _fault(sim: SimCluster, spec: dict[str, Any], on: bool) -> None:
    host = spec["host"]
    if "unreachable" in spec:
        sim.world.set_reachable(host, not on)
    if "never_healthy" in spec:
        sim.world.set_never_healthy(host, spec["never_healthy"], on)


def _check(sim: SimCluster, config: ClusterConfig, outcome: Any, expect: dict[str, Any]) -> None:
    assert outcome.crashed == expect.get("crashed", outcome.crashed)
    problems = sim.journal_problems() + sim.availability_problems(config)
    assert not problems, problems
    if expect.get("converged", not expect.get("failed_nodes")):
        assert not outcome.failed, outcome.failed
        assert sim.mismatches(config) == []
    if "failed_nodes" in expect:
        assert outcome.failed, "the run was expected to fail"
        for name in expect["failed_nodes"]:
            assert f"  {name} (state" in outcome.failed, outcome.failed
    if "error_contains" in expect:
        assert expect["error_contains"] in outcome.failed
    for group, count in expect.get("max_unschedulable", {}).items():
        assert sim.world.max_unschedulable.get(group, 0) == count, sim.world.max_unschedulable
    if "etcd_members" in expect:
        members = sorted(m.removeprefix("etcd-") for m in sim.world.etcd)
        assert members == sorted(expect["etcd_members"])
    version = expect.get("kubelet_version")
    if version:
        for name, node in sim.world.kube_nodes.items():
            assert node["version"].startswith(version), (name, node)
    for name in expect.get("upgraded", []):
        kubelet = sim.world.hosts[name].containers["kubelet"]
        want = next(s for n in sim.plan(config)[0].nodes if n.name == name for s in n.services
                    if s.name == "kubelet")
        assert kubelet.spec_hash == want.hash and kubelet.running


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario(path: Path, tmp_path: Path) -> None:
    replay(path, tmp_path / "state.rkel.db")


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
@settings(max_examples=int(os.environ.get("RKEL_SCENARIO_EXAMPLES", "8")), deadline=None,
          derandomize="RKEL_SCENARIO_EXAMPLES" not in os.environ,  # CI: the same points each run
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_scenario_survives_a_crash_anywhere(path: Path, tmp_path: Path, data: st.DataObject) -> None:
    """The same story with every apply killed after a journal write Hypothesis picks (then
    resumed): what the user observes at the end of each step is the same."""
    state = tmp_path / f"state-{uuid.uuid4().hex}.rkel.db"

    def crash_point(step: dict[str, Any]) -> int | None:
        return data.draw(st.one_of(st.none(), st.integers(1, 60)), label=f"crash in {step}")

    replay(path, state, crash_point, strict_crash=False)


def replay(path: Path, state: Path, crash_point: Any = None, strict_crash: bool = True) -> None:
    scenario = yaml.load(path.read_text())
    data = yaml.load(scenario["cluster"])
    sim = SimCluster(state)
    try:
        for step in scenario["steps"]:
            if "edit" in step:
                data = _edit(data, dict(step["edit"]))
            elif "fault" in step:
                _fault(sim, step["fault"], True)
            elif "heal" in step:
                _fault(sim, step["heal"], False)
            elif "apply" in step:
                options = step["apply"] or {}
                sim.workers = options.get("workers", 1)
                config = _config(data)
                crash = crash_point(options) if crash_point else options.get("crash_after")
                outcome = sim.apply(config, crash)
                expect = dict(step.get("expect", {}))
                if not strict_crash:
                    expect.pop("crashed", None)  # a drawn point may fall after the run's end
                _check(sim, config, outcome, expect)
            else:
                raise AssertionError(f"{path.name}: unknown step {step}")
    finally:
        sim.close()


def test_every_scenario_is_listed() -> None:
    assert len(SCENARIOS) >= 5, SCENARIOS
