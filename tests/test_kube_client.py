"""rkel's Kubernetes API client (lifecycle/hosts/kube.py) against the kube-apiserver stand-in.

Real processes on 127.0.0.1: Debian's etcd with TLS, the stand-in with the flags rkel computes,
and the official `kubernetes` client presenting rkel's kube-admin identity from memory. Checks
what the executor relies on: Node Ready and version, cordon/uncordon, drain as kubectl does it
(DaemonSet pods stay, bare pods need force), delete, and failing over between API servers.
"""

from __future__ import annotations

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


def pod(api: ApiServer, name: str, owner: str | None = None, empty_dir: bool = False) -> None:
    metadata: dict[str, Any] = {"name": name, "namespace": "default"}
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
    with pytest.raises(HostError) as refused:
        kube.drain(NODE, DrainOptions())
    text = str(refused.value)
    assert "default/bare-1" in text and "force" in text
    assert "default/cache-1" in text and "delete_local_data" in text
    assert pods_on_node(api) == ["agent-1", "bare-1", "cache-1", "web-1"]  # nothing evicted
    kube.drain(NODE, DrainOptions(force=True, delete_local_data=True, timeout=10))
    assert pods_on_node(api) == ["agent-1"]  # the DaemonSet's pod stays, as with kubectl


def test_delete_node_is_idempotent(api: ApiServer, kube: KubernetesAPI) -> None:
    register_node(api)
    kube.delete_node(NODE)
    assert kube.node(NODE) is None
    kube.delete_node(NODE)  # already gone: fine


def test_no_api_server_at_all_is_a_clear_error(api: ApiServer, tmp_path: Path) -> None:
    with Store.open(api.cluster.state) as store:
        admin = PKI(store, api.cluster.key).material("kube-admin")
    nowhere = KubernetesAPI([f"https://127.0.0.1:{free_port()}"], admin, timeout=2)
    with pytest.raises(HostUnreachableError, match="no API server answered"):
        nowhere.node(NODE)
