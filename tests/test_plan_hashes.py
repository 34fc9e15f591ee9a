"""The planner's fast paths give what the slow, obvious code gives.

`diff` hashes specs and certificates and converts values with `as_data` instead of the
`hash` properties and `dataclasses.asdict` (which dominate its time at thousands of nodes);
these tests hold the two together, so a new field or a changed hash formula in
`lifecycle.spec` cannot silently make plans differ from the specs they carry.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import asdict, dataclass, field

from lifecycle.config.model import (
    ClusterConfig,
    EtcdService,
    KubeAPIService,
    Node,
    Services,
    Taint,
)
from lifecycle.desired import compile_desired
from lifecycle.plan import (
    Current,
    CurrentNode,
    CurrentService,
    Plan,
    _Lookups,
    as_data,
    diff,
)
from lifecycle.spec import HealthCheck, ServiceSpec, canonical_json, sha256_hex


def config() -> ClusterConfig:
    """Every role mix, labels, taints, extra args and binds: specs of every shape."""
    nodes = (
        Node(address="10.0.0.1", user="rkel", role=("controlplane", "etcd"),
             hostname_override="cp-1"),
        Node(address="10.0.0.2", user="rkel", role=("controlplane", "etcd", "worker"),
             internal_address="192.168.0.2", hostname_override="all-2"),
        Node(address="10.0.0.3", user="rkel", role=("etcd",), hostname_override="etcd-3"),
        Node(address="10.0.0.4", user="rkel", role=("worker",), hostname_override="w-4",
             labels={"zone": "a"}, taints=(Taint("dedicated", "db", "NoSchedule"),)),
        Node(address="10.0.0.5", user="rkel", role=("worker",), hostname_override="w-5"),
    )
    services = Services(
        kube_api=KubeAPIService(extra_args={"v": "4"}, extra_binds=["/opt/a:/opt/a"],
                                extra_args_array={"audit-log-path": ["/x", "/y"]}),
        etcd=EtcdService(extra_env=["GOMAXPROCS=2"]),
    )
    return ClusterConfig(nodes=nodes, services=services)


def test_as_data_equals_asdict_on_specs_desired_and_plans() -> None:
    desired = compile_desired(config())
    for node in desired.nodes:
        assert as_data(node) == asdict(node)
        for spec in node.services:
            assert as_data(spec) == asdict(spec)
            assert canonical_json(as_data(spec)) == canonical_json(spec.to_dict())
    assert as_data(desired) == asdict(desired)
    plan = diff(Current(), desired)
    assert plan.to_dict() == asdict(plan)
    assert canonical_json(plan.to_dict()) == canonical_json(asdict(plan))
    assert Plan.from_dict(plan.to_dict()) == plan


def test_as_data_copies_what_is_mutable_and_keeps_types() -> None:
    Pair = namedtuple("Pair", "a b")

    @dataclass(frozen=True)
    class Odd:
        items: list[str] = field(default_factory=lambda: ["x"])
        table: dict[str, list[int]] = field(default_factory=lambda: {"k": [1]})
        mixed: tuple[object, ...] = ("a", 1, ("b",), HealthCheck("u"))
        pair: Pair = field(default_factory=lambda: Pair(1, [2]))
        flag: bool = True

    value = Odd()
    data = as_data(value)
    assert data == asdict(value)
    assert type(data["pair"]) is Pair and type(data["mixed"]) is tuple
    data["items"].append("y")
    data["table"]["k"].append(2)
    assert value.items == ["x"] and value.table == {"k": [1]}


def test_diff_hashes_are_the_spec_hashes() -> None:
    desired = compile_desired(config())
    look = _Lookups(Current(), desired)
    assert look.fingerprint(desired) == desired.fingerprint
    for node in desired.nodes:
        assert look.certs(node) == node.certs_hash
        for cert in node.certs:
            assert look.cert(cert) == cert.hash
        for spec in node.services:
            assert look.spec(spec) == spec.hash
    plan = diff(Current(), desired)
    assert plan.desired_fingerprint == desired.fingerprint
    for step in plan.steps:
        if step.spec is not None:
            assert ServiceSpec.from_dict(step.spec).to_dict() == step.spec


def test_shared_specs_are_equal_values() -> None:
    """compile_desired builds the sidekick and nginx-proxy once and shares them between nodes."""
    desired = compile_desired(config())
    workers = [n for n in desired.nodes if not n.has("controlplane")]
    proxies = [n.service("nginx-proxy") for n in workers]
    assert proxies[0] is proxies[-1]
    assert len({p.hash for p in proxies if p}) == 1


def test_the_state_fingerprint_is_the_hash_of_the_whole_state() -> None:
    service = CurrentService("kubelet", "running", "abc", "img:1", ("--a=1", "--b=2"))
    node = CurrentNode("n1", "10.0.0.1", "10.0.0.1", ("worker",), "running", "h", 22, "rkel",
                       (service,), (("zone", "a"),), (("k", "v", "NoSchedule"),))
    current = Current(nodes=(node,), unreachable=("n2",), addons=(("canal", "x"),))
    assert current.fingerprint == sha256_hex(canonical_json(asdict(current)))[:16]
    assert Current().fingerprint == sha256_hex(canonical_json(asdict(Current())))[:16]
