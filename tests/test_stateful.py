"""Stateful properties on the Simulated backend: random clusters, random changes, random crashes.

After every rule: the store and the simulated hosts match cluster.yml, the journal is intact with
no step done twice and no dangling intent in a completed run, etcd never lost quorum, and never
more nodes of a group were unschedulable at once than the strategy allows.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from lifecycle.config.model import (
    ClusterConfig,
    KubeAPIService,
    KubeletService,
    Node,
    UpgradeStrategy,
)
from lifecycle.versions import supported_versions
from tests.simcluster import SimCluster

VERSIONS = supported_versions()
ROLE_SETS = [
    ("controlplane", "etcd", "worker"),
    ("etcd",),
    ("controlplane",),
    ("worker",),
    ("worker",),
    ("controlplane", "etcd"),
    ("etcd", "worker"),
]
EXAMPLES = int(os.environ.get("RKEL_STATEFUL_EXAMPLES", "200"))


def node(i: int, roles: tuple[str, ...]) -> Node:
    return Node(address=f"10.0.0.{i}", user="rkel", role=roles, hostname_override=f"n{i}")


@st.composite
def clusters(draw: st.DrawFn) -> list[Node]:
    count = draw(st.integers(1, 9))
    roles = [draw(st.sampled_from(ROLE_SETS)) for _ in range(count)]
    roles[0] = ("controlplane", "etcd", "worker")  # every cluster needs each plane somewhere
    return [node(i + 1, r) for i, r in enumerate(roles)]


class ClusterLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory(prefix="rkel-stateful-")
        # Several workers, so windows of more than one node really run side by side.
        self.sim = SimCluster(Path(self.dir.name) / "state.rkel.db", workers=4)
        self.config = ClusterConfig(nodes=())
        self.next_index = 10
        self.version_index = 0

    def teardown(self) -> None:
        self.sim.close()
        self.dir.cleanup()

    def _apply(self, config: ClusterConfig, crash_after: int | None) -> None:
        outcome = self.sim.apply(config, crash_after)
        assert not outcome.failed, outcome.failed
        self.config = config
        self.check_converged()

    @initialize(
        nodes=clusters(),
        window=st.sampled_from(["1", "2", "34%", "50%", "100%"]),
        drain=st.booleans(),
        crash=st.none() | st.integers(1, 80),
    )
    def create(self, nodes: list[Node], window: str, drain: bool, crash: int | None) -> None:
        self.version_index = 0
        config = ClusterConfig(
            nodes=tuple(nodes),
            kubernetes_version=VERSIONS[0],
            upgrade_strategy=UpgradeStrategy(max_unavailable_worker=window, drain=drain),
        )
        self._apply(config, crash)

    @rule(roles=st.sampled_from(ROLE_SETS), crash=st.none() | st.integers(1, 40))
    def add_node(self, roles: tuple[str, ...], crash: int | None) -> None:
        if len(self.config.nodes) >= 9:
            return
        self.next_index += 1
        nodes = self.config.nodes + (node(self.next_index, roles),)
        self._apply(replace(self.config, nodes=nodes), crash)

    def _removable(self) -> list[Node]:
        out = []
        for n in self.config.nodes:
            rest = [m for m in self.config.nodes if m is not n]
            if all(any(r in m.role for m in rest) for r in ("etcd", "controlplane", "worker")):
                out.append(n)
        return out

    @precondition(lambda self: len(self.config.nodes) > 1)
    @rule(data=st.data(), crash=st.none() | st.integers(1, 40))
    def remove_node(self, data: st.DataObject, crash: int | None) -> None:
        candidates = self._removable()
        if not candidates:
            return
        gone = data.draw(st.sampled_from(candidates))
        nodes = tuple(n for n in self.config.nodes if n is not gone)
        self._apply(replace(self.config, nodes=nodes), crash)

    @precondition(lambda self: self.version_index + 1 < len(VERSIONS))
    @rule(crash=st.none() | st.integers(1, 120))
    def upgrade(self, crash: int | None) -> None:
        self.version_index += 1
        self._apply(replace(self.config, kubernetes_version=VERSIONS[self.version_index]), crash)

    @rule(verbosity=st.integers(1, 6), where=st.sampled_from(["kube-api", "kubelet"]),
          crash=st.none() | st.integers(1, 60))
    def change_args(self, verbosity: int, where: str, crash: int | None) -> None:
        services = self.config.services
        if where == "kube-api":
            services = replace(services, kube_api=KubeAPIService(extra_args={"v": str(verbosity)}))
        else:
            services = replace(services, kubelet=KubeletService(extra_args={"v": str(verbosity)}))
        self._apply(replace(self.config, services=services), crash)

    @rule()
    def reapply_changes_nothing(self) -> None:
        before = {n: dict(h.containers) for n, h in self.sim.world.hosts.items()}
        outcome = self.sim.apply(self.config)
        assert outcome.plan.empty, [s.id for s in outcome.plan.steps]
        assert {n: dict(h.containers) for n, h in self.sim.world.hosts.items()} == before

    @invariant()
    def check_converged(self) -> None:
        if not self.config.nodes:
            return
        problems = self.sim.mismatches(self.config)
        problems += self.sim.journal_problems()
        problems += self.sim.availability_problems(self.config)
        assert not problems, "\n".join(problems)


ClusterLifecycle.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestClusterLifecycle = ClusterLifecycle.TestCase

