"""The planner: phase order, windows, etcd membership changes and quorum, determinism, removal.

Configs are built from ClusterConfig/Node directly and compiled; "current" is either empty (a
fresh cluster) or what the store records after SimCluster applied an earlier config.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from lifecycle.config.model import (
    ClusterConfig,
    EtcdService,
    KubeAPIService,
    Node,
    Services,
    UpgradeStrategy,
)
from lifecycle.desired import compile_desired
from lifecycle.errors import PlanError
from lifecycle.plan import (
    PHASES,
    STOP_ORDER,
    Current,
    CurrentNode,
    CurrentService,
    Group,
    Plan,
    Step,
    Unit,
    diff,
    quorum,
    resolve_max_unavailable,
)
from lifecycle.runner import current_state
from tests.simcluster import SimCluster

V_OLD = "v1.29.9-rancher1-1"
V_NEW = "v1.30.5-rancher1-1"
CP, ETCD, WORKER = "controlplane", "etcd", "worker"


def node(i: int, *roles: str) -> Node:
    return Node(address=f"10.0.{i // 250}.{i % 250 + 1}", user="rkel", role=roles,
                hostname_override=f"n{i}")


def cluster(nodes: list[Node], version: str = V_OLD, **strategy: object) -> ClusterConfig:
    return ClusterConfig(
        nodes=tuple(nodes),
        kubernetes_version=version,
        upgrade_strategy=UpgradeStrategy(**strategy),  # type: ignore[arg-type]
    )


def actions(unit: Unit) -> list[str]:
    return [s.action for s in unit.steps]


def names(group: Group) -> list[str]:
    return [u.node for u in group.units]


def groups_of(plan: Plan, phase: str) -> list[Group]:
    return [g for g in plan.groups if g.phase == phase]


def only_group(plan: Plan, phase: str, title_start: str = "") -> Group:
    found = [g for g in groups_of(plan, phase) if g.title.startswith(title_start)]
    assert len(found) == 1, [g.title for g in plan.groups]
    return found[0]


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimCluster]:
    cluster_ = SimCluster(tmp_path / "state.rkel.db", workers=8)
    yield cluster_
    cluster_.close()


def applied(sim: SimCluster, config: ClusterConfig) -> Current:
    outcome = sim.apply(config)
    assert not outcome.failed, outcome.failed
    assert sim.mismatches(config) == []
    return current_state(sim.store)


def plan_for(current: Current, config: ClusterConfig) -> Plan:
    return diff(current, compile_desired(config))


# ---------------------------------------------------------------------------- a fresh cluster
FRESH = [node(1, CP, ETCD), node(2, ETCD), node(3, ETCD, WORKER), node(4, CP), node(5, WORKER),
         node(6, WORKER), node(7, WORKER)]


def test_fresh_cluster_phases_run_certs_etcd_controlplane_workers() -> None:
    plan = plan_for(Current(), cluster(FRESH))
    phases = [g.phase for g in plan.groups]
    assert list(dict.fromkeys(phases)) == ["certs", "etcd", "controlplane", "workers"]
    assert phases == sorted(phases, key=PHASES.index)  # never back to an earlier phase


def test_fresh_cluster_certs_reach_every_node_first() -> None:
    plan = plan_for(Current(), cluster(FRESH))
    certs = plan.groups[0]
    assert certs.phase == "certs"
    assert names(certs) == sorted(n.name for n in FRESH)
    assert all(actions(u) == ["deliver-certs"] for u in certs.units)


def test_fresh_etcd_members_start_one_at_a_time() -> None:
    plan = plan_for(Current(), cluster(FRESH))
    group = only_group(plan, "etcd")
    assert group.concurrency == 1
    assert names(group) == ["n1", "n2", "n3"]  # one unit per etcd node, by name
    for unit in group.units:
        assert actions(unit) == ["etcd-join", "start", "start"]
        assert [s.service for s in unit.steps[1:]] == ["etcd", "etcd-rolling-snapshots"]
    # etcd starts nowhere else.
    etcd_steps = [s.node for s in plan.steps if s.service == "etcd"]
    assert etcd_steps == ["n1", "n1", "n2", "n2", "n3", "n3"]


def test_fresh_nodes_come_up_all_at_once() -> None:
    plan = plan_for(Current(), cluster(FRESH, max_unavailable_worker="1"))
    for group in plan.groups:
        if group.phase in ("controlplane", "workers"):
            assert group.concurrency == len(group.units), group.title
            for unit in group.units:
                assert unit.kind == "add"
                # Ready first, then the Node gets cluster.yml's labels and taints.
                assert actions(unit)[-2:] == ["wait-ready", "node-metadata"]
                assert "cordon" not in actions(unit)  # nothing runs there yet to protect
    assert names(only_group(plan, "controlplane")) == ["n1", "n4"]
    assert names(only_group(plan, "workers", "worker nodes")) == ["n5", "n6", "n7"]
    assert names(only_group(plan, "workers", "nodes with the etcd role")) == ["n2", "n3"]


def test_fresh_plan_has_no_removals_and_counts_what_it_adds() -> None:
    plan = plan_for(Current(), cluster(FRESH))
    assert groups_of(plan, "removals") == []
    assert plan.summary["nodes_added"] == len(FRESH)
    assert plan.summary["nodes_removed"] == 0
    assert plan.summary["add"] == sum(1 for s in plan.steps if s.action == "start") > 0


# ---------------------------------------------------------------------------- upgrades
ONE_CP_FIVE_WORKERS = [node(1, CP, ETCD), *(node(i, WORKER) for i in range(2, 7))]


@pytest.mark.parametrize("drain", [False, True])
def test_version_bump_moves_workers_two_at_a_time_cordoned(sim: SimCluster, drain: bool) -> None:
    current = applied(sim, cluster(ONE_CP_FIVE_WORKERS, max_unavailable_worker="2"))
    plan = plan_for(current, cluster(ONE_CP_FIVE_WORKERS, V_NEW, max_unavailable_worker="2",
                                     drain=drain))
    workers = only_group(plan, "workers", "worker nodes")
    assert workers.concurrency == 2
    assert names(workers) == ["n2", "n3", "n4", "n5", "n6"]
    prefix = ["cordon", "drain"] if drain else ["cordon"]
    for unit in workers.units:
        steps = actions(unit)
        assert unit.kind == "change"
        assert steps[: len(prefix)] == prefix
        assert steps[-2:] == ["wait-ready", "uncordon"]
        middle = steps[len(prefix):-2]
        assert middle and set(middle) == {"replace"}
        replaced = [s for s in unit.steps if s.action == "replace"]
        assert "kubelet" in {s.service for s in replaced}
        for step in replaced:
            assert step.old_image.endswith("v1.29.9-rancher1")
            assert step.new_image.endswith("v1.30.5-rancher1")
            was = current.node(unit.node).service(step.service)  # type: ignore[union-attr]
            assert was is not None and step.old_hash == was.spec_hash
    assert plan.drain is drain


def test_version_bump_replaces_etcd_before_the_control_plane(sim: SimCluster) -> None:
    current = applied(sim, cluster(ONE_CP_FIVE_WORKERS))
    plan = plan_for(current, cluster(ONE_CP_FIVE_WORKERS, "v1.31.1-rancher1-1"))
    phases = [g.phase for g in plan.groups]
    assert phases.index("controlplane") < phases.index("workers")
    cp = only_group(plan, "controlplane")
    assert names(cp) == ["n1"]
    assert actions(cp.units[0])[0] == "cordon"
    assert actions(cp.units[0])[-2:] == ["wait-ready", "uncordon"]


@pytest.fixture(scope="module")
def three_cps(tmp_path_factory: pytest.TempPathFactory) -> Current:
    sim = SimCluster(tmp_path_factory.mktemp("cps") / "state.rkel.db", workers=8)
    try:
        return applied(sim, cluster(THREE_CPS))
    finally:
        sim.close()


THREE_CPS = [node(1, CP), node(2, CP), node(3, CP), node(4, ETCD), node(5, WORKER)]


@pytest.mark.parametrize(("setting", "window"), [("1", 1), ("2", 2), ("100%", 3), ("34%", 1),
                                                 ("67%", 2)])
def test_controlplane_window_follows_max_unavailable_controlplane(
    three_cps: Current, setting: str, window: int
) -> None:
    plan = plan_for(three_cps, cluster(THREE_CPS, V_NEW, max_unavailable_controlplane=setting))
    cp = only_group(plan, "controlplane")
    assert cp.concurrency == window
    assert names(cp) == ["n1", "n2", "n3"]
    assert all(actions(u)[0] == "cordon" and actions(u)[-1] == "uncordon" for u in cp.units)


def test_etcd_and_worker_node_is_upgraded_alone_whatever_the_worker_window(
    sim: SimCluster,
) -> None:
    nodes = [node(1, CP, ETCD), node(2, ETCD, WORKER), node(3, ETCD, WORKER),
             *(node(i, WORKER) for i in range(4, 8))]
    current = applied(sim, cluster(nodes))
    plan = plan_for(current, cluster(nodes, V_NEW, max_unavailable_worker="100%"))
    etcd_role = only_group(plan, "workers", "nodes with the etcd role")
    assert etcd_role.concurrency == 1
    assert names(etcd_role) == ["n2", "n3"]
    workers = only_group(plan, "workers", "worker nodes")
    assert names(workers) == ["n4", "n5", "n6", "n7"]
    assert workers.concurrency == 4  # 100% of the worker-only nodes, not of every node
    assert only_group(plan, "etcd").concurrency == 1
    assert names(only_group(plan, "etcd")) == ["n1", "n2", "n3"]


def test_a_hundred_percent_of_two_hundred_workers_is_two_hundred(sim: SimCluster) -> None:
    nodes = [node(0, CP, ETCD), *(node(i, WORKER) for i in range(1, 201))]
    current = applied(sim, cluster(nodes))
    plan = plan_for(current, cluster(nodes, V_NEW, max_unavailable_worker="100%"))
    workers = only_group(plan, "workers", "worker nodes")
    assert len(workers.units) == 200
    assert workers.concurrency == 200


# ---------------------------------------------------------------------------- windows
@pytest.mark.parametrize(
    ("value", "total", "expected"),
    [
        ("10%", 97, 9),
        ("10%", 5, 1),
        ("100%", 200, 200),
        ("3", 10, 3),
        (3, 10, 3),
        (" 25 % ", 8, 2),
        ("0", 5, 1),
        ("0%", 5, 1),
        ("60", 10, 60),
    ],
)
def test_resolve_max_unavailable(value: str | int, total: int, expected: int) -> None:
    assert resolve_max_unavailable(value, total) == expected


@pytest.mark.parametrize("value", ["abc", "1.5", "10 percent", "%", ""])
def test_resolve_max_unavailable_refuses_nonsense(value: str) -> None:
    with pytest.raises(PlanError, match="neither a number nor a percent"):
        resolve_max_unavailable(value, 10)


def test_nonsense_window_in_cluster_yml_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="'abc'"):
        plan_for(Current(), cluster(FRESH, max_unavailable_worker="abc"))


@pytest.mark.parametrize(("members", "needed"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3)])
def test_quorum(members: int, needed: int) -> None:
    assert quorum(members) == needed


# ---------------------------------------------------------------------------- etcd membership
ETCD3 = [node(1, CP, WORKER), node(2, ETCD), node(3, ETCD), node(4, ETCD), node(5, WORKER)]


@pytest.fixture(scope="module")
def etcd3(tmp_path_factory: pytest.TempPathFactory) -> Current:
    sim = SimCluster(tmp_path_factory.mktemp("etcd3") / "state.rkel.db", workers=8)
    try:
        return applied(sim, cluster(ETCD3))
    finally:
        sim.close()


def without(nodes: list[Node], *gone: str) -> list[Node]:
    return [n for n in nodes if n.name not in gone]


def test_adding_and_removing_an_etcd_member_adds_first(etcd3: Current) -> None:
    plan = plan_for(etcd3, cluster([*without(ETCD3, "n2"), node(6, ETCD)]))
    etcd = only_group(plan, "etcd")
    removal = only_group(plan, "removals", "etcd members")
    assert plan.groups.index(etcd) < plan.groups.index(removal)
    assert names(etcd) == ["n6"]
    assert actions(etcd.units[0]) == ["etcd-join", "start", "start"]
    assert names(removal) == ["n2"]
    assert removal.concurrency == 1
    unit = removal.units[0]
    assert unit.kind == "remove"
    assert actions(unit)[0] == "etcd-leave"
    assert actions(unit)[-1] == "forget-node"
    assert plan.summary["nodes_removed"] == 1
    assert sorted(n.name for n in plan.etcd_members) == ["n3", "n4", "n6"]


def test_dropping_the_etcd_role_leaves_then_removes_only_etcd(sim: SimCluster) -> None:
    nodes = [node(1, CP, ETCD), node(2, ETCD), node(3, ETCD), node(4, WORKER)]
    current = applied(sim, cluster(nodes))
    plan = plan_for(current, cluster([node(1, CP), *nodes[1:]]))
    removal = only_group(plan, "removals")
    assert names(removal) == ["n1"]
    steps = removal.units[0].steps
    assert [(s.action, s.service) for s in steps] == [("etcd-leave", "etcd"),
                                                     ("remove-service", "etcd")]


@pytest.mark.parametrize(
    ("unreachable", "refused"),
    [
        ((), False),
        (("n3",), False),  # 4 members after the add, 3 healthy after n2 leaves: quorum 3
        (("n3", "n4"), True),  # 2 healthy of 4 after n2 leaves: below quorum 3
        (("n2",), False),  # the member leaving is the unreachable one
        (("n2", "n3"), True),  # 2 healthy of 4 before anything leaves: no quorum to remove through
    ],
)
def test_quorum_check_on_an_add_and_a_removal(
    etcd3: Current, unreachable: tuple[str, ...], refused: bool
) -> None:
    config = cluster([*without(ETCD3, "n2"), node(6, ETCD)])
    current = replace(etcd3, unreachable=unreachable)
    if refused:
        with pytest.raises(PlanError, match="quorum") as info:
            plan_for(current, config)
        assert "etcd-n2" in str(info.value)
    else:
        assert only_group(plan_for(current, config), "removals").units[0].node == "n2"


@pytest.mark.parametrize(
    ("unreachable", "refused"),
    [
        ((), False),  # 2 of 2 healthy after n2 leaves
        (("n4",), True),  # 1 of 2 healthy after n2 leaves
        (("n3", "n4"), True),
    ],
)
def test_quorum_check_on_a_plain_removal(
    etcd3: Current, unreachable: tuple[str, ...], refused: bool
) -> None:
    config = cluster(without(ETCD3, "n2"))
    current = replace(etcd3, unreachable=unreachable)
    if refused:
        with pytest.raises(PlanError, match="quorum"):
            plan_for(current, config)
    else:
        assert names(only_group(plan_for(current, config), "removals")) == ["n2"]


def test_removing_the_unreachable_member_itself_is_allowed(etcd3: Current) -> None:
    plan = plan_for(replace(etcd3, unreachable=("n4",)), cluster(without(ETCD3, "n4")))
    assert names(only_group(plan, "removals")) == ["n4"]


def test_removing_two_of_three_healthy_members_is_allowed_one_at_a_time(etcd3: Current) -> None:
    plan = plan_for(etcd3, cluster(without(ETCD3, "n2", "n3")))
    removal = only_group(plan, "removals", "etcd members")
    assert removal.concurrency == 1
    assert names(removal) == ["n2", "n3"]


# ---------------------------------------------------------------------------- determinism
def test_same_inputs_give_the_same_plan(etcd3: Current) -> None:
    config = cluster([*without(ETCD3, "n2"), node(6, ETCD)], V_NEW)
    first = plan_for(etcd3, config).to_dict()
    second = plan_for(etcd3, config).to_dict()
    assert first == second
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)


@pytest.mark.parametrize("fresh", [True, False])
def test_node_order_in_cluster_yml_does_not_change_the_plan(etcd3: Current, fresh: bool) -> None:
    nodes = [*ETCD3, node(6, ETCD), node(7, WORKER), node(8, WORKER)]
    current = Current() if fresh else etcd3
    forward = plan_for(current, cluster(nodes, V_NEW))
    backward = plan_for(current, cluster(list(reversed(nodes)), V_NEW))
    shuffled = plan_for(current, cluster(nodes[3:] + nodes[:3], V_NEW))
    assert forward.to_dict() == backward.to_dict() == shuffled.to_dict()
    for group in forward.groups:
        if group.phase != "etcd":  # etcd: existing members first, then by name
            assert names(group) == sorted(names(group)), group.title
    assert [n.name for n in forward.nodes] == sorted(n.name for n in forward.nodes)


def test_existing_etcd_members_change_before_new_ones_join(etcd3: Current) -> None:
    plan = plan_for(etcd3, cluster([*ETCD3, node(0, ETCD)], V_NEW))
    etcd = only_group(plan, "etcd")
    assert names(etcd) == ["n2", "n3", "n4", "n0"]
    assert [u.kind for u in etcd.units] == ["change", "change", "change", "add"]


def test_plan_round_trips_through_to_dict(etcd3: Current) -> None:
    config = replace(cluster([*without(ETCD3, "n5"), node(6, ETCD)], V_NEW, drain=True),
                     services=Services(kube_api=KubeAPIService(extra_args={"v": "4"})))
    plan = plan_for(etcd3, config)
    assert {s.action for s in plan.steps} >= {"replace", "start", "etcd-join", "remove-service",
                                             "deliver-certs", "forget-node"}
    assert Plan.from_dict(plan.to_dict()) == plan


def test_plan_round_trips_through_json(etcd3: Current) -> None:
    """What the store keeps and `rkel apply PLANFILE` reads: the same plan comes back."""
    plan = plan_for(etcd3, cluster([*without(ETCD3, "n5"), node(6, ETCD)], V_NEW))
    text = json.dumps(plan.to_dict(), sort_keys=True)
    back = Plan.from_dict(json.loads(text))
    assert json.dumps(back.to_dict(), sort_keys=True) == text
    assert back.groups and [g.title for g in back.groups] == [g.title for g in plan.groups]
    for mine, theirs in zip(plan.steps, back.steps, strict=True):
        assert (mine.id, mine.args_removed, mine.args_added) == (
            theirs.id, theirs.args_removed, theirs.args_added)
        if mine.spec:
            assert theirs.service_spec.hash == mine.service_spec.hash
            assert theirs.service_spec == mine.service_spec
    assert back.nodes == plan.nodes
    assert back.etcd_members == plan.etcd_members


# ---------------------------------------------------------------------------- fingerprint
def _tiny_current(spec_hash: str) -> Current:
    svc = CurrentService("kubelet", "running", spec_hash=spec_hash, image="img:v1")
    return Current(nodes=(CurrentNode("n1", "10.0.0.1", "10.0.0.1", (WORKER,), "running",
                                      services=(svc,)),))


def test_state_fingerprint_follows_a_service_spec_hash() -> None:
    assert _tiny_current("aaaa").fingerprint == _tiny_current("aaaa").fingerprint
    assert _tiny_current("aaaa").fingerprint != _tiny_current("bbbb").fingerprint


def test_plan_state_fingerprint_changes_when_the_store_changes(etcd3: Current) -> None:
    config = cluster(ETCD3, V_NEW)
    n3 = etcd3.node("n3")
    assert n3 is not None
    changed_services = tuple(
        replace(s, spec_hash="0123456789abcdef") if s.name == "kubelet" else s
        for s in n3.services
    )
    changed = replace(etcd3, nodes=tuple(
        replace(n, services=changed_services) if n.name == "n3" else n for n in etcd3.nodes))
    before, after = plan_for(etcd3, config), plan_for(changed, config)
    assert before.state_fingerprint == etcd3.fingerprint
    assert after.state_fingerprint == changed.fingerprint != before.state_fingerprint
    assert before.desired_fingerprint == after.desired_fingerprint
    assert plan_for(replace(etcd3, unreachable=("n3",)), config).state_fingerprint != (
        before.state_fingerprint)


# ---------------------------------------------------------------------------- arg changes
def test_an_apiserver_arg_change_replaces_only_the_apiserver(sim: SimCluster) -> None:
    nodes = [node(1, CP, ETCD), node(2, CP), node(3, WORKER)]
    config = cluster(nodes)
    current = applied(sim, config)
    changed = replace(config, services=Services(kube_api=KubeAPIService(
        extra_args={"profiling": "true", "audit-log-maxage": "30"})))
    plan = plan_for(current, changed)
    replaced = [s for s in plan.steps if s.action == "replace"]
    assert {(s.node, s.service) for s in replaced} == {("n1", "kube-apiserver"),
                                                       ("n2", "kube-apiserver")}
    for step in replaced:
        assert step.args_removed == ("--profiling=false",)
        assert step.args_added == ("--audit-log-maxage=30", "--profiling=true")
        assert step.old_image == step.new_image  # same version: only the args moved
        assert step.old_hash != step.service_spec.hash
    assert [g.phase for g in plan.groups] == ["controlplane"]
    assert not any(s.action == "start" for s in plan.steps)


# ---------------------------------------------------------------------------- removals
def test_removing_a_worker_drains_deletes_and_forgets_it(sim: SimCluster) -> None:
    nodes = [node(1, CP, ETCD), node(2, WORKER), node(3, WORKER)]
    current = applied(sim, cluster(nodes))
    plan = plan_for(current, cluster(without(nodes, "n3")))
    removal = only_group(plan, "removals")
    assert names(removal) == ["n3"]
    unit = removal.units[0]
    assert unit.kind == "remove"
    was_running = current.node("n3").services  # type: ignore[union-attr]
    assert was_running
    # containers go workloads' side first, etcd-facing last; then the node's files
    stop_order = sorted(was_running, key=lambda s: STOP_ORDER.index(s.name))
    assert [(s.action, s.service) for s in unit.steps] == [
        ("drain-out", ""),
        ("delete-node", ""),
        *[("remove-service", s.name) for s in stop_order],
        ("clean-node", ""),
        ("forget-node", ""),
    ]
    assert [s.old_image for s in unit.steps if s.action == "remove-service"] == [
        s.image for s in stop_order]
    clean = next(s for s in unit.steps if s.action == "clean-node")
    assert "/etc/kubernetes" in clean.detail["paths"] and "/var/lib/etcd" in clean.detail["paths"]
    assert [g.phase for g in plan.groups] == ["removals"]
    assert plan.summary["nodes_removed"] == 1
    assert plan.summary["remove"] == len(was_running)
    assert next(s for s in unit.steps if s.action == "forget-node").detail is None


def test_a_node_removed_under_prefix_path_is_cleaned_there(sim: SimCluster) -> None:
    nodes = [node(1, CP, ETCD), node(2, WORKER), node(3, WORKER)]
    current = applied(sim, replace(cluster(nodes), prefix_path="/opt/custom/"))
    plan = plan_for(current, replace(cluster(without(nodes, "n3")), prefix_path="/opt/custom/"))
    steps = {s.action: s for s in only_group(plan, "removals").units[0].steps}
    assert "/opt/custom/etc/kubernetes" in steps["clean-node"].detail["paths"]
    assert all(p.startswith("/opt/custom/") for p in steps["clean-node"].detail["paths"])
    assert steps["forget-node"].detail == {
        "paths": ["/opt/custom/etc/kubernetes/ssl", "/opt/custom/var/lib/etcd"]}


# ---------------------------------------------------------------------------- converged
CHANGES = {
    "fresh": [cluster(ETCD3)],
    "version bump": [cluster(ETCD3), cluster(ETCD3, V_NEW)],
    "swap an etcd member": [cluster(ETCD3), cluster([*without(ETCD3, "n2"), node(6, ETCD)])],
    "remove a worker": [cluster(ETCD3), cluster(without(ETCD3, "n5"))],
    "arg change": [cluster(ETCD3), replace(cluster(ETCD3), services=Services(
        kube_api=KubeAPIService(extra_args={"v": "4"})))],
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_replan_after_a_complete_apply_is_empty(sim: SimCluster, change: str) -> None:
    for config in CHANGES[change]:
        assert not plan_for(current_state(sim.store), config).empty
        current = applied(sim, config)
        again = plan_for(current, config)
        assert again.empty
        assert again.groups == ()
        assert again.steps == ()


def test_a_plan_with_two_steps_sharing_an_id_is_refused() -> None:
    # A resumed run skips steps by id: a second step with a done id would be skipped unrun.
    twice = Step("n1:restore-start", "n1", "restore-start")
    group = Group("restore", "start", 1, (Unit("n1", "change", (twice,)),))
    with pytest.raises(ValueError, match="n1:restore-start"):
        Plan((group, replace(group, title="again")), (), "", "")


# ---------------------------------------------------------------------------- rolling snapshots
ROLLING = "etcd-rolling-snapshots"


def with_etcd(config: ClusterConfig, **etcd: object) -> ClusterConfig:
    return replace(config, services=Services(etcd=EtcdService(**etcd)))  # type: ignore[arg-type]


def test_rolling_snapshots_are_switched_in_the_etcd_phase_alone(sim: SimCluster) -> None:
    nodes = [node(1, CP, ETCD), node(2, ETCD), node(3, ETCD, WORKER), node(4, WORKER)]
    off = with_etcd(cluster(nodes), snapshot=False)
    current = applied(sim, off)
    assert not any(s.name == ROLLING for n in current.nodes for s in n.services)
    # on, on a running cluster: started beside each member, no etcd-join, nothing else touched
    on = cluster(nodes)
    plan = plan_for(current, on)
    assert [g.phase for g in plan.groups] == ["etcd"]
    etcd = only_group(plan, "etcd")
    assert names(etcd) == ["n1", "n2", "n3"] and etcd.concurrency == 1
    assert all([(s.action, s.service) for s in u.steps] == [("start", ROLLING)] for u in etcd.units)
    current = applied(sim, on)
    # a setting of theirs replaces them alone
    plan = plan_for(current, with_etcd(cluster(nodes), creation="6h"))
    assert {(s.action, s.service) for s in plan.steps} == {("replace", ROLLING)}
    assert [g.phase for g in plan.groups] == ["etcd"]
    # off again: removed, in the etcd phase
    plan = plan_for(current, off)
    assert [g.phase for g in plan.groups] == ["etcd"]
    assert {(s.node, s.action, s.service) for s in plan.steps} == {
        (n, "remove-service", ROLLING) for n in ("n1", "n2", "n3")}
    current = applied(sim, off)
    assert not any(s.name == ROLLING for n in current.nodes for s in n.services)


def test_teardown_stops_rolling_snapshots_just_before_etcd() -> None:
    assert STOP_ORDER.index(ROLLING) == STOP_ORDER.index("etcd") - 1
