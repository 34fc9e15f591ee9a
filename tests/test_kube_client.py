"""rkel's Kubernetes API client (lifecycle/hosts/kube.py) against the kube-apiserver stand-in.

Real processes on 127.0.0.1: Debian's etcd with TLS, the stand-in with the flags rkel computes,
and the official `kubernetes` client presenting rkel's kube-admin identity from memory. Checks
what the executor relies on: Node Ready and version, cordon/uncordon, drain as kubectl does it
(DaemonSet pods stay, bare pods need force), delete, and failing over between API servers.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lifecycle.errors import HostError, HostUnreachableError
from lifecycle.hosts import DrainOptions
from lifecycle.hosts.kube import KubernetesAPI
from lifecycle.pki import PKI
from store import Store
from tests.test_standin_apiserver import (
    NODE,
    ApiServer,
    Cluster,
    free_port,
    register_node,
    running_api,
)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    cluster = Cluster(tmp_path_factory.mktemp("kube-pki"))
    with running_api(cluster, tmp_path_factory, "kube") as server:
        yield server


@pytest.fixture(scope="module")
def kube(api: ApiServer) -> KubernetesAPI:
    with Store.open(api.cluster.state) as store:
        admin = PKI(store, api.cluster.key).material("kube-admin")
    dead = f"https://127.0.0.1:{free_port()}"  # nothing listens: the client must move on
    return KubernetesAPI([dead, api.url], admin, sleep=lambda s: None, timeout=5)


def pod(api: ApiServer, name: str, owner: str | None = None, empty_dir: bool = False,
        annotations: dict[str, str] | None = None) -> None:
    metadata: dict[str, Any] = {"name": name, "namespace": "default"}
    if annotations:
        metadata["annotations"] = annotations
    if owner:
        metadata["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner, "name": "o",
                                        "uid": f"uid-{name}", "controller": True}]
    spec: dict[str, Any] = {"nodeName": NODE, "containers": [{"name": "c", "image": "x"}]}
    if empty_dir:
        spec["volumes"] = [{"name": "scratch", "emptyDir": {}}]
    code, body = api.call("POST", "/api/v1/namespaces/default/pods",
                          body={"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
                                "spec": spec})
    assert code == 201, body


def pods_on_node(api: ApiServer) -> list[str]:
    code, body = api.call("GET", f"/api/v1/pods?fieldSelector=spec.nodeName={NODE}")
    assert code == 200, body
    return sorted(p["metadata"]["name"] for p in body["items"])


def test_node_ready_and_version_through_a_failover(api: ApiServer, kube: KubernetesAPI) -> None:
    assert kube.node(NODE) is None  # not registered yet: None, not an error
    register_node(api)
    node = kube.node(NODE)
    assert node is not None and node.ready and node.schedulable
    assert node.kubelet_version == "v1.30.5"


def test_cordon_and_uncordon(api: ApiServer, kube: KubernetesAPI) -> None:
    register_node(api)
    kube.cordon(NODE)
    node = kube.node(NODE)
    assert node is not None and not node.schedulable
    code, body = api.call("GET", f"/api/v1/nodes/{NODE}")
    assert body["spec"]["unschedulable"] is True
    kube.uncordon(NODE)
    node = kube.node(NODE)
    assert node is not None and node.schedulable


def test_drain_follows_node_drain_input(api: ApiServer, kube: KubernetesAPI) -> None:
    register_node(api)
    pod(api, "web-1", owner="ReplicaSet")
    pod(api, "agent-1", owner="DaemonSet")
    pod(api, "bare-1")
    pod(api, "cache-1", owner="ReplicaSet", empty_dir=True)
    # scratch space only, says the pod (as metrics-server's does): no delete_local_data needed
    pod(api, "metrics-1", owner="ReplicaSet", empty_dir=True,
        annotations={"cluster-autoscaler.kubernetes.io/safe-to-evict": "true"})
    with pytest.raises(HostError) as refused:
        kube.drain(NODE, DrainOptions())
    text = str(refused.value)
    assert "default/bare-1" in text and "force" in text
    assert "default/cache-1" in text and "delete_local_data" in text
    assert "metrics-1" not in text
    assert pods_on_node(api) == ["agent-1", "bare-1", "cache-1", "metrics-1", "web-1"]
    code, body = api.call("DELETE", "/api/v1/namespaces/default/pods/cache-1")
    assert code == 200, body
    kube.drain(NODE, DrainOptions(force=True, timeout=10))  # no delete_local_data
    assert pods_on_node(api) == ["agent-1"]  # the DaemonSet's pod stays, as with kubectl
    pod(api, "cache-2", owner="ReplicaSet", empty_dir=True)
    kube.drain(NODE, DrainOptions(delete_local_data=True, timeout=10))
    assert pods_on_node(api) == ["agent-1"]


def test_delete_node_is_idempotent(api: ApiServer, kube: KubernetesAPI) -> None:
    register_node(api)
    kube.delete_node(NODE)
    assert kube.node(NODE) is None
    kube.delete_node(NODE)  # already gone: fine


def test_no_api_server_at_all_is_a_clear_error(api: ApiServer, tmp_path: Path) -> None:
    with Store.open(api.cluster.state) as store:
        admin = PKI(store, api.cluster.key).material("kube-admin")
    nowhere = KubernetesAPI([f"https://127.0.0.1:{free_port()}"], admin, timeout=2)
    with pytest.raises(HostUnreachableError, match="no API server answered") as err:
        nowhere.node(NODE)
    assert "Connection refused" in str(err.value)  # why, not just an exception's class name


# --- labels and taints, the state Secret, manifests, rollouts ---------------------------------


class Clock:
    """A virtual clock: `sleep` advances it, and may run a callback (something that happens
    while rkel waits)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.on_sleep: list[Any] = []

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        if self.on_sleep:
            self.on_sleep.pop(0)()


def client(api: ApiServer, clock: Clock | None = None) -> KubernetesAPI:
    with Store.open(api.cluster.state) as store:
        admin = PKI(store, api.cluster.key).material("kube-admin")
    if clock is None:
        return KubernetesAPI([api.url], admin, timeout=5, poll_interval=0.2)
    return KubernetesAPI([api.url], admin, sleep=clock.sleep, clock=lambda: clock.now, timeout=5)


def get(api: ApiServer, path: str) -> Any:
    code, body = api.call("GET", path)
    assert code == 200, body
    return body


def node_object(api: ApiServer, name: str) -> Any:
    node = get(api, f"/api/v1/nodes/{name}")
    taints = sorted((t["key"], t.get("value", ""), t["effect"])
                    for t in node["spec"].get("taints") or [])
    return node["metadata"].get("labels") or {}, taints, node["metadata"].get("annotations") or {}


def fresh_node(api: ApiServer, name: str) -> None:
    """A Node as a kubelet registers it, plus a taint someone else put on it."""
    register_node(api, name=name, cert="kube-admin")
    code, body = api.call("PATCH", f"/api/v1/nodes/{name}",
                          content_type="application/merge-patch+json",
                          body={"metadata": {"labels": {"kubernetes.io/hostname": name}},
                                "spec": {"taints": [{"key": "ops/maintenance",
                                                     "effect": "NoSchedule"}]}})
    assert code == 200, body


def test_node_labels_and_taints_follow_cluster_yml_and_leave_others_alone(
        api: ApiServer, kube: KubernetesAPI) -> None:
    fresh_node(api, "lab1")
    kubelets = {"kubernetes.io/hostname": "lab1", "node-role.kubernetes.io/controlplane": "true",
                "node-role.kubernetes.io/etcd": "true"}
    kube.sync_node_metadata("lab1", {"pool": "a", "tier": "web"},
                            [("dedicated", "gpu", "NoSchedule"), ("drain", "", "NoExecute")])
    labels, taints, notes = node_object(api, "lab1")
    assert labels == {**kubelets, "pool": "a", "tier": "web"}
    assert taints == [("dedicated", "gpu", "NoSchedule"), ("drain", "", "NoExecute"),
                      ("ops/maintenance", "", "NoSchedule")]
    assert "rkel.io/managed-labels" in notes and "rkel.io/managed-taints" in notes

    version = get(api, "/api/v1/nodes/lab1")["metadata"]["resourceVersion"]
    kube.sync_node_metadata("lab1", {"pool": "a", "tier": "web"},
                            [("drain", "", "NoExecute"), ("dedicated", "gpu", "NoSchedule")])
    assert get(api, "/api/v1/nodes/lab1")["metadata"]["resourceVersion"] == version  # no write

    kube.sync_node_metadata("lab1", {"tier": "db"}, [("dedicated", "cpu", "NoSchedule")])
    labels, taints, _ = node_object(api, "lab1")
    assert labels == {**kubelets, "tier": "db"}  # pool removed: rkel had set it
    assert taints == [("dedicated", "cpu", "NoSchedule"), ("ops/maintenance", "", "NoSchedule")]

    kube.sync_node_metadata("lab1", {}, [])
    labels, taints, notes = node_object(api, "lab1")
    assert labels == kubelets
    assert taints == [("ops/maintenance", "", "NoSchedule")]
    assert "rkel.io/managed-labels" not in notes and "rkel.io/managed-taints" not in notes


def test_a_registered_taint_that_cluster_yml_wants_becomes_rkels(api: ApiServer,
                                                                 kube: KubernetesAPI) -> None:
    fresh_node(api, "lab2")  # the kubelet registered ops/maintenance (--register-with-taints)
    kube.sync_node_metadata("lab2", {}, [("ops/maintenance", "", "NoSchedule")])
    assert node_object(api, "lab2")[1] == [("ops/maintenance", "", "NoSchedule")]
    kube.sync_node_metadata("lab2", {}, [])  # removed from cluster.yml: rkel removes it
    assert node_object(api, "lab2")[1] == []


def test_a_node_changed_meanwhile_is_read_again(api: ApiServer) -> None:
    fresh_node(api, "lab3")
    kube = client(api)
    real = kube._request
    raced: list[int] = []

    def racing(core: Any, method: str, path: str, **kw: Any) -> Any:
        if method == "PATCH" and not raced:  # another writer gets in between read and patch
            raced.append(api.call("PATCH", "/api/v1/nodes/lab3",
                                  content_type="application/merge-patch+json",
                                  body={"spec": {"taints": [
                                      {"key": "ops/maintenance", "effect": "NoSchedule"},
                                      {"key": "racer", "effect": "NoSchedule"}]}})[0])
        return real(core, method, path, **kw)

    kube._request = racing  # type: ignore[method-assign]
    kube.sync_node_metadata("lab3", {"tier": "web"}, [("dedicated", "gpu", "NoSchedule")])
    assert raced == [200]
    labels, taints, _ = node_object(api, "lab3")
    assert labels["tier"] == "web"
    assert taints == [("dedicated", "gpu", "NoSchedule"), ("ops/maintenance", "", "NoSchedule"),
                      ("racer", "", "NoSchedule")]


def test_labels_for_a_node_the_kubelet_never_registered(kube: KubernetesAPI) -> None:
    with pytest.raises(HostError, match="node ghost .*kubelet has not registered it"):
        kube.sync_node_metadata("ghost", {"a": "b"}, [])


def test_the_state_secret_is_created_then_replaced(api: ApiServer, kube: KubernetesAPI) -> None:
    kube.save_state_secret("rkel-state", "kube-system", {"cluster.json": '{"v": 1}', "old": "x"})
    kube.save_state_secret("rkel-state", "kube-system", {"cluster.json": '{"v": 2}'})
    secret = get(api, "/api/v1/namespaces/kube-system/secrets/rkel-state")
    assert secret["type"] == "Opaque"
    assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "rkel"
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "cluster.json": '{"v": 2}'}
    with pytest.raises(HostError, match='Secret nowhere/rkel-state.*namespaces "nowhere" not'):
        kube.save_state_secret("rkel-state", "nowhere", {"a": "b"})


def addon_docs(data: str) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "settings", "namespace": "rkel-addons"}, "data": {"level": data}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "rkel-addons"}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "addon-sa"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "addon-reader"},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]},
    ]


def test_manifests_are_applied_namespaces_first_and_read_back(api: ApiServer,
                                                            kube: KubernetesAPI) -> None:
    assert kube.apply_manifests(addon_docs("1")) == [
        "Namespace/rkel-addons", "ConfigMap/rkel-addons/settings",
        "ServiceAccount/default/addon-sa", "ClusterRole/addon-reader"]
    assert kube.apply_manifests(addon_docs("2"), field_manager="rkel-addons") != []
    assert get(api, "/api/v1/namespaces/rkel-addons/configmaps/settings")["data"] == {
        "level": "2"}
    assert get(api, "/api/v1/namespaces/rkel-addons")["status"]["phase"] == "Active"
    assert get(api, "/api/v1/namespaces/default/serviceaccounts/addon-sa")["metadata"][
        "name"] == "addon-sa"
    rules = get(api, "/apis/rbac.authorization.k8s.io/v1/clusterroles/addon-reader")["rules"]
    assert rules[0]["resources"] == ["pods"]
    kube.wait_rollout(addon_docs("2"), timeout=0)  # nothing to roll out: they exist


def test_an_unknown_kind_and_a_refusal_name_their_objects(api: ApiServer,
                                                          kube: KubernetesAPI) -> None:
    docs = [
        {"apiVersion": "example.com/v1", "kind": "Widget",
         "metadata": {"name": "w", "namespace": "default"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "lost",
                                                               "namespace": "nowhere"}},
        {"apiVersion": "apps/v1", "kind": "Pod", "metadata": {"name": "misfiled"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "fine"}},
    ]
    with pytest.raises(HostError) as failed:
        kube.apply_manifests(docs)
    text = str(failed.value)
    assert "3 of 4 manifests were not applied" in text
    assert "Widget/default/w: the server has no kind Widget in example.com/v1" in text
    assert "Pod/misfiled: the server has no kind Pod in apps/v1" in text
    assert 'ConfigMap/nowhere/lost: 404 Not Found: namespaces "nowhere" not found' in text
    assert get(api, "/api/v1/namespaces/default/configmaps/fine")  # the good one went in


def test_a_custom_resource_waits_for_its_crd(api: ApiServer) -> None:
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "gadgets.example.org"},
           "spec": {"group": "example.org", "scope": "Namespaced",
                    "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
                    "versions": [{"name": "v1", "served": True, "storage": True,
                                  "schema": {"openAPIV3Schema": {"type": "object"}}}]}}
    gadget = {"apiVersion": "example.org/v1", "kind": "Gadget", "metadata": {"name": "g1"},
              "spec": {"size": 3}}
    assert client(api).apply_manifests([gadget, crd]) == [
        "CustomResourceDefinition/gadgets.example.org", "Gadget/default/g1"]
    assert get(api, "/apis/example.org/v1/namespaces/default/gadgets/g1")["spec"] == {"size": 3}


def workloads() -> list[dict[str, Any]]:
    pod = {"metadata": {"labels": {"app": "web"}},
           "spec": {"containers": [{"name": "c", "image": "nginx"}]}}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
         "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}, "template": pod}},
        {"apiVersion": "apps/v1", "kind": "DaemonSet",
         "metadata": {"name": "agent", "namespace": "kube-system"},
         "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": pod}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "web-config"}},
    ]


def set_status(api: ApiServer, path: str, status: dict[str, Any]) -> None:
    """What the workload's controller would write: it has seen the current generation."""
    code, obj = api.call("GET", path)
    assert code == 200, obj
    status = {"observedGeneration": obj["metadata"]["generation"], **status}
    code, body = api.call("PATCH", f"{path}/status", body={"status": status},
                          content_type="application/merge-patch+json")
    assert code == 200, body


def test_rollout_wait_times_out_naming_what_is_not_ready(api: ApiServer) -> None:
    clock = Clock()
    kube = client(api, clock)
    kube.apply_manifests(workloads())
    set_status(api, "/apis/apps/v1/namespaces/kube-system/daemonsets/agent",
               {"desiredNumberScheduled": 3, "numberAvailable": 1, "updatedNumberScheduled": 3})
    with pytest.raises(HostError) as late:
        kube.wait_rollout(workloads(), timeout=6)
    text = str(late.value)
    assert "not rolled out after 6s" in text
    assert "DaemonSet/kube-system/agent: 3/3 updated, 1/3 available" in text
    assert "Deployment/default/web: generation 1 not observed yet" in text  # no controller
    assert "web-config" not in text  # a ConfigMap is ready once it exists
    assert clock.now == 6.0  # it polled every 2 s on the injected clock


def test_rollout_wait_returns_once_the_status_says_complete(api: ApiServer) -> None:
    clock = Clock()
    kube = client(api, clock)
    kube.apply_manifests(workloads())
    deployment = "/apis/apps/v1/namespaces/default/deployments/web"
    set_status(api, "/apis/apps/v1/namespaces/kube-system/daemonsets/agent",
               {"desiredNumberScheduled": 1, "numberAvailable": 1, "updatedNumberScheduled": 1})
    set_status(api, deployment, {"replicas": 3, "updatedReplicas": 2, "availableReplicas": 2})
    # the controller finishes while rkel waits: the old replica goes at the second poll
    clock.on_sleep = [lambda: None, lambda: set_status(api, deployment, {
        "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2})]
    kube.wait_rollout(workloads(), timeout=60)
    assert clock.now == 4.0  # two polls of 2 s
