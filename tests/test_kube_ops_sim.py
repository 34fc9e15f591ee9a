"""The Simulated backend's Kubernetes API beyond nodes: labels and taints, the state Secret,
applied manifests and rollouts, with the semantics the real client has against the apiserver
stand-in (tests/test_kube_client.py): same keys, same error texts, same rules.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifecycle.errors import HostError
from lifecycle.hosts.simulated import SimKube, SimWorld
from lifecycle.spec import NodeRef, ServiceSpec

KUBELET = ServiceSpec("kubelet", "rancher/hyperkube:v1.30.5-rancher1", args=(
    "--node-labels=node-role.kubernetes.io/worker=true",
    "--register-with-taints=ops/maintenance:NoSchedule"))


def world_with_node(name: str = "n1", path: Path | None = None) -> tuple[SimWorld, SimKube]:
    world = SimWorld(path=path)
    backend = world.backend()
    backend.host(NodeRef(name, "10.0.0.1", "10.0.0.1", 22, "rkel", ("worker",))).run_container(
        KUBELET)
    return world, backend.kube()


def labels_and_taints(world: SimWorld, name: str = "n1") -> tuple[dict[str, str], list[Any]]:
    node = world.kube_nodes[name]
    return node["labels"], sorted((t["key"], t.get("value", ""), t["effect"])
                                  for t in node["taints"])


KUBELETS = {"kubernetes.io/hostname": "n1", "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64", "node-role.kubernetes.io/worker": "true"}


def test_the_kubelet_registers_labels_and_taints_that_rkel_then_leaves_alone() -> None:
    world, kube = world_with_node()
    assert labels_and_taints(world) == (KUBELETS, [("ops/maintenance", "", "NoSchedule")])
    kube.sync_node_metadata("n1", {"pool": "a"}, [("dedicated", "gpu", "NoSchedule")])
    assert labels_and_taints(world) == ({**KUBELETS, "pool": "a"}, [
        ("dedicated", "gpu", "NoSchedule"), ("ops/maintenance", "", "NoSchedule")])
    kube.sync_node_metadata("n1", {}, [])
    assert labels_and_taints(world) == (KUBELETS, [("ops/maintenance", "", "NoSchedule")])
    assert world.kube_nodes["n1"]["annotations"] == {}


def test_labels_for_an_unregistered_node_say_so() -> None:
    kube = SimWorld().backend().kube()
    with pytest.raises(HostError, match="node ghost .*kubelet has not registered it"):
        kube.sync_node_metadata("ghost", {}, [])


def test_node_metadata_survives_a_reload(tmp_path: Path) -> None:
    world, kube = world_with_node(path=tmp_path / "world.json")
    kube.sync_node_metadata("n1", {"pool": "a"}, [("dedicated", "gpu", "NoSchedule")])
    kube.apply_manifests([{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}])
    again = SimWorld.load(tmp_path / "world.json")
    assert labels_and_taints(again) == labels_and_taints(world)
    SimKube(again).sync_node_metadata("n1", {}, [])  # it still knows what rkel set
    assert labels_and_taints(again)[0] == KUBELETS
    assert "ConfigMap/default/c" in again.kube_objects


def test_the_state_secret_is_replaced_and_base64() -> None:
    world, kube = world_with_node()
    kube.save_state_secret("rkel-state", "kube-system", {"a": "1", "b": "2"})
    kube.save_state_secret("rkel-state", "kube-system", {"a": "3"})
    secret = world.kube_objects["Secret/kube-system/rkel-state"]
    assert secret["type"] == "Opaque"
    assert secret["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "rkel"}
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {"a": "3"}
    with pytest.raises(HostError, match='Secret nowhere/rkel-state.*namespaces "nowhere" not'):
        kube.save_state_secret("rkel-state", "nowhere", {})


def test_manifests_apply_namespaces_first_with_the_real_keys_and_errors() -> None:
    world, kube = world_with_node()
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "settings", "namespace": "rkel-addons"}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "rkel-addons"}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "addon-sa"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "addon-reader", "namespace": "ignored"}},
    ]
    assert kube.apply_manifests(docs) == [
        "Namespace/rkel-addons", "ConfigMap/rkel-addons/settings",
        "ServiceAccount/default/addon-sa", "ClusterRole/addon-reader"]
    assert "namespace" not in world.kube_objects["ClusterRole/addon-reader"]["metadata"]
    bad = [{"apiVersion": "example.com/v1", "kind": "Widget",
            "metadata": {"name": "w", "namespace": "default"}},
           {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "lost", "namespace": "nowhere"}},
           {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "fine"}}]
    with pytest.raises(HostError) as failed:
        kube.apply_manifests(bad)
    text = str(failed.value)
    assert "2 of 3 manifests were not applied" in text
    assert "Widget/default/w: the server has no kind Widget in example.com/v1" in text
    assert 'ConfigMap/nowhere/lost: 404 Not Found: namespaces "nowhere" not found' in text
    assert "ConfigMap/default/fine" in world.kube_objects


def test_a_crd_makes_its_kind_known() -> None:
    world, kube = world_with_node()
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "gadgets.example.org"},
           "spec": {"group": "example.org", "scope": "Cluster",
                    "names": {"plural": "gadgets", "kind": "Gadget"},
                    "versions": [{"name": "v1", "served": True, "storage": True}]}}
    gadget = {"apiVersion": "example.org/v1", "kind": "Gadget", "metadata": {"name": "g1"}}
    assert kube.apply_manifests([gadget, crd]) == [
        "CustomResourceDefinition/gadgets.example.org", "Gadget/g1"]


DEPLOY = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
          "spec": {"replicas": 2}}
DAEMONS = {"apiVersion": "apps/v1", "kind": "DaemonSet",
           "metadata": {"name": "agent", "namespace": "kube-system"}}
JOB = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"}}


def test_workloads_roll_out_on_the_virtual_clock() -> None:
    world, kube = world_with_node()
    kube.apply_manifests([DEPLOY, DAEMONS, JOB])
    start = world.clock()
    kube.wait_rollout([DEPLOY, DAEMONS, JOB], timeout=300)
    took = world.clock() - start
    assert world.latency.rollout <= took <= world.latency.rollout + 3
    start = world.clock()
    kube.apply_manifests([DEPLOY])  # unchanged: nothing rolls out again
    kube.wait_rollout([DEPLOY], timeout=300)
    assert world.clock() - start < 1


def test_a_stuck_rollout_times_out_naming_it() -> None:
    world, kube = world_with_node()
    kube.apply_manifests([DEPLOY, DAEMONS])
    world.set_rollout_stuck("Deployment/default/web")
    world.set_rollout_stuck("DaemonSet/kube-system/agent")
    with pytest.raises(HostError) as late:
        kube.wait_rollout([DEPLOY, DAEMONS], timeout=60)
    text = str(late.value)
    assert "not rolled out after 60s" in text
    assert "Deployment/default/web: 0/2 updated, 0/2 available" in text
    assert "DaemonSet/kube-system/agent: 0/1 updated, 0/1 available" in text
    with pytest.raises(HostError, match="ConfigMap/default/never: not found"):
        kube.wait_rollout([{"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"name": "never"}}], timeout=5)


# --- the property: after any sequence of syncs, the Node carries exactly what others set plus
# what cluster.yml wants now

keys = st.sampled_from(["a", "b", "example.com/c", "d"])
effects = st.sampled_from(["NoSchedule", "PreferNoSchedule", "NoExecute"])
label_sets = st.dictionaries(keys, st.sampled_from(["1", "2"]), max_size=3)
taint_sets = st.lists(st.tuples(keys, st.sampled_from(["", "x"]), effects), max_size=3,
                      unique_by=lambda t: (t[0], t[2]))


@settings(max_examples=150, deadline=None)
@given(wants=st.lists(st.tuples(label_sets, taint_sets), min_size=1, max_size=5))
def test_syncs_keep_foreign_labels_and_taints_and_end_at_the_last_wanted(
        wants: list[tuple[dict[str, str], list[tuple[str, str, str]]]]) -> None:
    world, kube = world_with_node()
    foreign_taints = [("ops/maintenance", "", "NoSchedule")]
    for labels, taints in wants:
        kube.sync_node_metadata("n1", labels, taints)
    labels, taints = wants[-1]
    have_labels, have_taints = labels_and_taints(world)
    assert have_labels == {**KUBELETS, **labels}
    ours = {(k, e) for k, _, e in taints}
    assert have_taints == sorted(set(taints) | {t for t in foreign_taints
                                                if (t[0], t[2]) not in ours})


def test_a_node_rkel_left_failed_mid_change_is_retried_not_skipped_when_notready() -> None:
    from lifecycle.budget import preflight

    world, _kube = world_with_node("w1")
    ref = NodeRef("w1", "10.0.0.1", "10.0.0.1", 22, "rkel", ("worker",))
    world.set_running("w1", "kubelet", False)  # a replacement stopped it and could not put it back
    skipped = preflight(world.backend(), [ref])
    assert [(u.node, u.why) for u in skipped] == [("w1", "NotReady in Kubernetes")]
    assert preflight(world.backend(), [ref], repairing={"w1"}) == []
    world.set_reachable("w1", False)  # unreachable is skipped even so: there is nothing to retry on
    assert [u.node for u in preflight(world.backend(), [ref], repairing={"w1"})] == ["w1"]
