"""Idempotent effects on simulated hosts: container replace with rollback, start, remove, node
readiness and etcd membership. Every test looks at the SimWorld's state, never at calls."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lifecycle import effects
from lifecycle.errors import HealthCheckError, HostError
from lifecycle.hosts import Host
from lifecycle.hosts.simulated import SimContainer, SimWorld
from lifecycle.spec import HealthCheck, NodeRef, ServiceSpec

NODE = "n1"
HEALTH = HealthCheck(url="https://127.0.0.1:10250/healthz", retries=3, interval=2.0)
OLD = ServiceSpec("kubelet", "rancher/hyperkube:v1.29.9-rancher1", args=("--v=2",), health=HEALTH)
NEW = ServiceSpec("kubelet", "rancher/hyperkube:v1.30.5-rancher1", args=("--v=2",), health=HEALTH)
ETCD = ServiceSpec("etcd", "rancher/mirrored-coreos-etcd:v3.5.12", args=("--data-dir=/x",))


def ref(name: str = NODE, roles: tuple[str, ...] = ("worker",)) -> NodeRef:
    number = name.removeprefix("n")
    return NodeRef(name, f"10.0.0.{number}", f"10.0.0.{number}", 22, "rkel", roles)


def containers(world: SimWorld, node: str = NODE) -> dict[str, tuple[str, bool]]:
    """name -> (spec hash, running), as the host has them."""
    return {c.name: (c.spec_hash, c.running) for c in world.hosts[node].containers.values()}


ONLY_NEW = {"kubelet": (NEW.hash, True)}  # exactly one container, the new one, running


@pytest.fixture
def world() -> SimWorld:
    return SimWorld()


@pytest.fixture
def host(world: SimWorld) -> Host:
    return world.backend().host(ref())


@pytest.fixture
def running_old(world: SimWorld, host: Host) -> Host:
    effects.start_service(host, OLD, world.sleep)
    assert containers(world) == {"kubelet": (OLD.hash, True)}
    return host


# ---------------------------------------------------------------------------- replace
def test_replace_swaps_to_the_new_container(world: SimWorld, running_old: Host) -> None:
    effects.replace_service(running_old, NEW, world.sleep)
    assert containers(world) == ONLY_NEW
    assert world.hosts[NODE].containers["kubelet"].image == NEW.image
    assert world.creations[f"{NODE}/kubelet@{NEW.hash}"] == 1


def test_replace_keeps_the_old_service_when_the_new_one_never_gets_healthy(
    world: SimWorld, running_old: Host
) -> None:
    world.set_never_healthy(NODE, "kubelet")
    before = world.clock()
    with pytest.raises(HealthCheckError) as info:
        effects.replace_service(running_old, NEW, world.sleep)
    assert info.value.host == NODE
    message = str(info.value)
    assert NEW.image in message
    assert "6 probes over 4s" in message
    assert "previous container was put back" in message
    # It waited out the probe budget (retries - 1 intervals) before giving up.
    assert world.clock() - before >= (HEALTH.retries - 1) * HEALTH.interval

    world.set_never_healthy(NODE, "kubelet", False)
    assert containers(world) == {"kubelet": (OLD.hash, True)}
    assert world.hosts[NODE].containers["kubelet"].image == OLD.image
    assert running_old.probe(OLD)


def test_failed_new_container_with_no_previous_one_leaves_nothing(
    world: SimWorld, host: Host
) -> None:
    world.set_never_healthy(NODE, "kubelet")
    with pytest.raises(HealthCheckError, match="there was no previous container"):
        effects.replace_service(host, NEW, world.sleep)
    assert containers(world) == {}


def _interrupted(world: SimWorld, point: str) -> None:
    """Put the host in the state an earlier replace left when it died at `point`."""
    h = world.hosts[NODE]
    c = {
        "old": lambda running: SimContainer("kubelet", OLD.image, OLD.hash, running),
        "aside": lambda running: SimContainer("old-kubelet", OLD.image, OLD.hash, running),
        "new": lambda running: SimContainer("kubelet", NEW.image, NEW.hash, running),
        "stale": lambda running: SimContainer("old-kubelet", "img:older", "0" * 16, running),
    }
    layouts = {
        "old stopped, not yet renamed": [c["old"](False)],
        "old renamed, new not created": [c["aside"](False)],
        "new created, old not removed": [c["aside"](False), c["new"](True)],
        "new created stopped, old not removed": [c["aside"](False), c["new"](False)],
        "old in service, a stale old- copy beside it": [c["old"](True), c["stale"](False)],
        "old stopped, a stale old- copy beside it": [c["old"](False), c["stale"](False)],
        # the Docker Engine restarted mid-replacement and brought both back (restart=always)
        "both running again after the engine restarted": [c["aside"](True), c["new"](True)],
    }
    h.containers = {x.name: x for x in layouts[point]}


POINTS = [
    "old stopped, not yet renamed",
    "old renamed, new not created",
    "new created, old not removed",
    "new created stopped, old not removed",
    "old in service, a stale old- copy beside it",
    "old stopped, a stale old- copy beside it",
    "both running again after the engine restarted",
]


@pytest.mark.parametrize("point", POINTS)
def test_replace_after_an_interruption_converges(world: SimWorld, host: Host, point: str) -> None:
    _interrupted(world, point)
    effects.replace_service(host, NEW, world.sleep)
    assert containers(world) == ONLY_NEW
    # Redoing it once more changes nothing.
    effects.replace_service(host, NEW, world.sleep)
    assert containers(world) == ONLY_NEW


def test_with_both_copies_back_the_old_one_stops_before_the_new_one_is_checked(
        world: SimWorld, host: Host) -> None:
    # host networking: a running old copy would hold the ports and answer the health check
    _interrupted(world, "both running again after the engine restarted")
    calls: list[tuple[str, str]] = []

    class Recording:
        def __getattr__(self, op: str) -> object:
            real = getattr(host, op)
            if not callable(real):
                return real

            def record(*args: object, **kwargs: object) -> object:
                first = args[0] if args else ""
                calls.append((op, first if isinstance(first, str) else ""))
                return real(*args, **kwargs)
            return record

    effects.replace_service(Recording(), NEW, world.sleep)  # type: ignore[arg-type]
    assert containers(world) == ONLY_NEW
    stopped_old = calls.index(("stop_container", "old-kubelet"))
    started_new = calls.index(("start_container", "kubelet"))
    first_probe = next(i for i, (op, _) in enumerate(calls) if op == "probe")
    assert stopped_old < started_new < first_probe, calls


@pytest.mark.parametrize("point", POINTS)
def test_interrupted_replace_that_fails_again_puts_an_old_container_back(
    world: SimWorld, host: Host, point: str
) -> None:
    _interrupted(world, point)
    world.set_never_healthy(NODE, "kubelet")
    with pytest.raises(HealthCheckError):
        effects.replace_service(host, NEW, world.sleep)
    have = containers(world)
    assert list(have) == ["kubelet"], have  # one container, under the service's own name
    assert have["kubelet"][0] != NEW.hash
    assert have["kubelet"][1] is True


def _ops_of_a_clean_replace() -> int:
    world = SimWorld()
    host = world.backend().host(ref())
    effects.start_service(host, OLD, world.sleep)
    before = world.hosts[NODE].ops
    effects.replace_service(host, NEW, world.sleep)
    return world.hosts[NODE].ops - before


@pytest.mark.parametrize("fail_at", range(1, _ops_of_a_clean_replace() + 1))
def test_replace_dying_at_every_host_operation_then_redone_converges(
    world: SimWorld, running_old: Host, fail_at: int
) -> None:
    world.fail_nth_op(NODE, fail_at)
    with pytest.raises(HostError, match="injected fault"):
        effects.replace_service(running_old, NEW, world.sleep)
    # Whatever it left, the service's name or its old- copy still holds a container.
    assert {"kubelet", "old-kubelet"} & set(containers(world))
    effects.replace_service(running_old, NEW, world.sleep)
    assert containers(world) == ONLY_NEW


# ---------------------------------------------------------------------------- start / remove
def test_start_is_idempotent(world: SimWorld, host: Host) -> None:
    effects.start_service(host, NEW, world.sleep)
    effects.start_service(host, NEW, world.sleep)
    assert containers(world) == ONLY_NEW
    assert world.creations[f"{NODE}/kubelet@{NEW.hash}"] == 1


def test_start_restarts_a_stopped_container_instead_of_recreating_it(
    world: SimWorld, host: Host
) -> None:
    effects.start_service(host, NEW, world.sleep)
    host.stop_container("kubelet")
    effects.start_service(host, NEW, world.sleep)
    assert containers(world) == ONLY_NEW
    assert world.creations[f"{NODE}/kubelet@{NEW.hash}"] == 1


def test_start_raises_when_the_service_never_gets_healthy(world: SimWorld, host: Host) -> None:
    world.set_never_healthy(NODE, "kubelet")
    with pytest.raises(HealthCheckError) as info:
        effects.start_service(host, NEW, world.sleep)
    assert info.value.host == NODE
    assert "kubelet" in str(info.value)


@pytest.mark.parametrize("foreign_hash", ["", "ffffffffffffffff"])
def test_start_replaces_a_container_of_the_same_name_with_a_foreign_hash(
    world: SimWorld, host: Host, foreign_hash: str
) -> None:
    # An RKE-made container has no io.rkel.spec-hash label: its hash reads as "".
    world.hosts[NODE].containers["kubelet"] = SimContainer(
        "kubelet", "rancher/hyperkube:v1.29.9-rancher1", foreign_hash, True
    )
    effects.start_service(host, NEW, world.sleep)
    assert containers(world) == ONLY_NEW


def test_foreign_container_is_kept_when_its_replacement_fails(world: SimWorld, host: Host) -> None:
    world.hosts[NODE].containers["kubelet"] = SimContainer("kubelet", "rke/kubelet", "", True)
    world.set_never_healthy(NODE, "kubelet")
    with pytest.raises(HealthCheckError):
        effects.start_service(host, NEW, world.sleep)
    assert containers(world) == {"kubelet": ("", True)}


def test_remove_service_removes_name_and_old_name(world: SimWorld, host: Host) -> None:
    _interrupted(world, "new created, old not removed")
    world.hosts[NODE].containers["kube-proxy"] = SimContainer("kube-proxy", "img", "h", True)
    effects.remove_service(host, "kubelet")
    assert containers(world) == {"kube-proxy": ("h", True)}
    effects.remove_service(host, "kubelet")  # nothing left to remove: no error
    assert containers(world) == {"kube-proxy": ("h", True)}


def _fail_replace(world: SimWorld, host: Host) -> None:
    effects.start_service(host, OLD, world.sleep)
    world.set_never_healthy(NODE, "kubelet")
    effects.replace_service(host, NEW, world.sleep)


def _fail_ready(world: SimWorld, host: Host) -> None:
    effects.start_service(host, OLD, world.sleep)
    world.set_never_healthy(NODE, "kubelet")
    effects.wait_node_ready(world.backend().kube(), NODE, world.sleep)


def _fail_settle(world: SimWorld, host: Host) -> None:
    _first_member(world)
    effects.etcd_join(world.backend().etcd(), "n2", "10.0.0.2")
    effects.etcd_settle(world.backend().etcd(), "n2", world.sleep, retries=2, interval=1.0)


@pytest.mark.parametrize("fail", [_fail_replace, _fail_ready, _fail_settle],
                         ids=["replace", "wait-ready", "etcd-settle"])
def test_failure_advice_names_a_command_that_works_after_a_failed_run(
    world: SimWorld, host: Host, fail: Callable[[SimWorld, Host], None]
) -> None:
    """A health-check failure ends the run as *failed*; `rkel apply --resume` then refuses
    ("there is no interrupted run to resume"), and the executor's own summary says to run
    `rkel apply` again. The per-step advice must not send the user to --resume."""
    with pytest.raises(HealthCheckError) as info:
        fail(world, host)
    assert "--resume" not in str(info.value)
    assert "rkel apply" in str(info.value)


# ---------------------------------------------------------------------------- kubernetes
def test_wait_node_ready_returns_once_the_kubelet_runs(world: SimWorld, host: Host) -> None:
    effects.start_service(host, NEW, world.sleep)
    effects.wait_node_ready(world.backend().kube(), NODE, world.sleep, "v1.30.5-rancher1-1")


def test_wait_node_ready_names_the_node_when_kubelet_is_never_healthy(
    world: SimWorld, host: Host
) -> None:
    effects.start_service(host, NEW, world.sleep)
    world.set_never_healthy(NODE, "kubelet")
    before = world.clock()
    with pytest.raises(HealthCheckError) as info:
        effects.wait_node_ready(world.backend().kube(), NODE, world.sleep)
    assert info.value.host == NODE
    assert f"node {NODE} not Ready" in str(info.value)
    assert "Ready=False" in str(info.value)
    # RKE's 25 s is too short for a slow kubelet; rkel waits the documented budget.
    waited = world.clock() - before
    assert waited >= (effects.READY_RETRIES - 1) * effects.READY_INTERVAL


def test_wait_node_ready_at_a_version_refuses_a_node_on_another_version(
    world: SimWorld, host: Host
) -> None:
    effects.start_service(host, OLD, world.sleep)
    with pytest.raises(HealthCheckError, match="not Ready at v1.30.5-rancher1-1") as info:
        effects.wait_node_ready(world.backend().kube(), NODE, world.sleep, "v1.30.5-rancher1-1")
    assert "kubelet v1.29.9" in str(info.value)


def test_wait_node_ready_for_a_node_that_never_registered(world: SimWorld) -> None:
    with pytest.raises(HealthCheckError, match="not registered"):
        effects.wait_node_ready(world.backend().kube(), "n9", world.sleep)


@pytest.mark.parametrize(
    ("reported", "tag", "same"),
    [
        ("v1.30.5", "v1.30.5-rancher1-1", True),
        ("v1.30.5-rancher1", "v1.30.5-rancher1-1", True),
        ("v1.30.5", "v1.30.4-rancher1-1", False),
        ("v1.3.5", "v1.30.5-rancher1-1", False),
    ],
)
def test_same_version_compares_the_release(reported: str, tag: str, same: bool) -> None:
    assert effects.same_version(reported, tag) is same


# ---------------------------------------------------------------------------- etcd
def _first_member(world: SimWorld) -> None:
    args = effects.etcd_bootstrap_args(None, "n1", "10.0.0.1", "tok")
    effects.start_service(world.backend().host(ref("n1", ("etcd",))), ETCD, world.sleep, args)


def test_bootstrap_args_for_a_new_cluster_name_only_the_member_itself() -> None:
    assert effects.etcd_bootstrap_args(None, "n1", "10.0.0.1", "tok") == [
        "--initial-cluster=etcd-n1=https://10.0.0.1:2380",
        "--initial-cluster-state=new",
        "--initial-cluster-token=tok",
    ]


def test_bootstrap_args_for_a_joining_member_list_every_member(world: SimWorld) -> None:
    _first_member(world)
    etcd = world.backend().etcd()
    effects.etcd_join(etcd, "n3", "10.0.0.3")
    assert effects.etcd_bootstrap_args(etcd, "n3", "10.0.0.3", "tok") == [
        "--initial-cluster=etcd-n1=https://10.0.0.1:2380,etcd-n3=https://10.0.0.3:2380",
        "--initial-cluster-state=existing",
        "--initial-cluster-token=tok",
    ]


def test_bootstrap_args_include_the_member_even_before_it_joined(world: SimWorld) -> None:
    _first_member(world)
    args = effects.etcd_bootstrap_args(world.backend().etcd(), "n2", "10.0.0.2", "tok")
    assert args[0] == (
        "--initial-cluster=etcd-n1=https://10.0.0.1:2380,etcd-n2=https://10.0.0.2:2380"
    )
    assert args[1] == "--initial-cluster-state=existing"


def test_etcd_join_is_idempotent_and_adds_a_learner(world: SimWorld) -> None:
    _first_member(world)
    etcd = world.backend().etcd()
    effects.etcd_join(etcd, "n2", "10.0.0.2")
    effects.etcd_join(etcd, "n2", "10.0.0.2")
    assert world.etcd == {
        "etcd-n1": {"peer_url": "https://10.0.0.1:2380", "learner": False},
        "etcd-n2": {"peer_url": "https://10.0.0.2:2380", "learner": True},
    }


def test_etcd_settle_promotes_the_learner_once_it_runs(world: SimWorld) -> None:
    _first_member(world)
    etcd = world.backend().etcd()
    effects.etcd_join(etcd, "n2", "10.0.0.2")
    args = effects.etcd_bootstrap_args(etcd, "n2", "10.0.0.2", "tok")
    effects.start_service(world.backend().host(ref("n2", ("etcd",))), ETCD, world.sleep, args)
    effects.etcd_settle(etcd, "n2", world.sleep)
    assert world.etcd["etcd-n2"]["learner"] is False
    assert world.voting_started() == (2, 2)
    assert world.quorum_violations == []


def test_etcd_settle_gives_up_naming_the_node_when_the_learner_never_runs(
    world: SimWorld,
) -> None:
    _first_member(world)
    etcd = world.backend().etcd()
    effects.etcd_join(etcd, "n2", "10.0.0.2")
    with pytest.raises(HealthCheckError) as info:
        effects.etcd_settle(etcd, "n2", world.sleep, retries=3, interval=1.0)
    assert info.value.host == "n2"
    assert "etcd-n2" in str(info.value)
    assert world.etcd["etcd-n2"]["learner"] is True


def test_etcd_settle_waits_for_every_member_not_just_the_new_one(world: SimWorld) -> None:
    _first_member(world)
    etcd = world.backend().etcd()
    effects.etcd_join(etcd, "n2", "10.0.0.2")
    args = effects.etcd_bootstrap_args(etcd, "n2", "10.0.0.2", "tok")
    effects.start_service(world.backend().host(ref("n2", ("etcd",))), ETCD, world.sleep, args)
    effects.etcd_settle(etcd, "n2", world.sleep)
    effects.etcd_join(etcd, "n3", "10.0.0.3")
    args = effects.etcd_bootstrap_args(etcd, "n3", "10.0.0.3", "tok")
    effects.start_service(world.backend().host(ref("n3", ("etcd",))), ETCD, world.sleep, args)
    effects.etcd_settle(etcd, "n3", world.sleep)
    # Redone later (a resume) while an old member is sick: the new one being fine is not enough.
    world.set_never_healthy("n1", "etcd")
    with pytest.raises(HealthCheckError, match="unhealthy: etcd-n1"):
        effects.etcd_settle(etcd, "n3", world.sleep, retries=2, interval=1.0)


def test_etcd_leave_removes_the_member_once(world: SimWorld) -> None:
    _first_member(world)
    etcd = world.backend().etcd()
    effects.etcd_join(etcd, "n2", "10.0.0.2")
    effects.etcd_leave(etcd, "n2")
    effects.etcd_leave(etcd, "n2")
    assert set(world.etcd) == {"etcd-n1"}
