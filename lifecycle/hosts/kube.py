"""The Kubernetes API as the executor uses it, through the official `kubernetes` client.

rkel talks to the API servers directly (https://<controlplane address>:6443) as `kube-admin`,
whose key never leaves rkel: it is loaded from memory (memfd), never written to disk. Several
servers are tried in order, so a run that is upgrading one controlplane node keeps talking to
another. Drain follows `node_drain_input` the way `kubectl drain` does: DaemonSet pods are left
alone when ignore_daemonsets is set, bare pods need force, pods with emptyDir need
delete_local_data, and every pod is evicted (PodDisruptionBudgets are honoured by the server).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Protocol

from lifecycle.errors import HostError, HostUnreachableError
from lifecycle.hosts import DrainOptions, KubeNode

API = "kubernetes"


class Material(Protocol):
    @property
    def cert_pem(self) -> bytes: ...

    @property
    def key_pem(self) -> bytes: ...

    @property
    def ca_pem(self) -> bytes: ...


def _memfd(name: str, data: bytes) -> str:
    """A path to `data` that exists only in memory, for libraries that want file names."""
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    return f"/proc/{os.getpid()}/fd/{fd}"


class KubernetesAPI:
    """`KubeAPI` over the official client, failing over between API servers."""

    def __init__(self, servers: list[str], material: Material, *,
                 sleep: Callable[[float], None] = time.sleep, timeout: float = 15.0) -> None:
        import kubernetes.client  # only when a cluster is really talked to

        if not servers:
            raise HostError(API, "no controlplane node to reach the Kubernetes API through")
        self._sleep = sleep
        self._timeout = timeout
        files = (_memfd("rkel-ca", material.ca_pem), _memfd("rkel-admin-cert", material.cert_pem),
                 _memfd("rkel-admin-key", material.key_pem))
        self._clients = []
        for server in servers:
            cfg = kubernetes.client.Configuration()
            cfg.host = server
            cfg.ssl_ca_cert, cfg.cert_file, cfg.key_file = files
            cfg.verify_ssl = True
            cfg.retries = 1  # fail over to the next server instead of retrying a dead one
            self._clients.append((server, kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(cfg))))

    def _call(self, what: str, fn: Callable[[Any], Any], *, missing_ok: bool = False) -> Any:
        """Run `fn(core_v1)` on the first server that answers; None for 404 when missing_ok."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        errors = []
        for server, core in list(self._clients):
            try:
                result = fn(core)
            except ApiException as exc:
                if exc.status == 404 and missing_ok:
                    return None
                if exc.status and exc.status < 500:
                    raise HostError(API, f"{what}: {exc.status} {exc.reason}: "
                                         f"{(exc.body or '')[:300]}") from None
                errors.append(f"{server}: {exc.status} {exc.reason}")
                continue
            except (HTTPError, OSError) as exc:
                errors.append(f"{server}: {type(exc).__name__}")
                continue
            # keep the server that answered first for the next call
            self._clients.sort(key=lambda sc: sc[0] != server)
            return result
        raise HostUnreachableError(API, f"{what}: no API server answered ({'; '.join(errors)}); "
                                        "check the controlplane nodes, then run `rkel apply` again")

    # ------------------------------------------------------------------ KubeAPI
    def _json(self, what: str, fn: Callable[[Any], Any], *, missing_ok: bool = False) -> Any:
        """Like _call, but the raw JSON: the client's models reject objects a server may
        legitimately leave partial (a Node before its kubelet filled nodeInfo)."""
        response = self._call(what, fn, missing_ok=missing_ok)
        return None if response is None else json.loads(response.data or b"null")

    def node(self, name: str) -> KubeNode | None:
        obj = self._json(f"get node {name}",
                         lambda c: c.read_node(name, _request_timeout=self._timeout,
                                               _preload_content=False), missing_ok=True)
        if obj is None:
            return None
        status = obj.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in status.get("conditions") or [])
        return KubeNode(
            name=name,
            ready=ready,
            schedulable=not (obj.get("spec") or {}).get("unschedulable", False),
            kubelet_version=(status.get("nodeInfo") or {}).get("kubeletVersion", ""),
        )

    def _set_unschedulable(self, name: str, value: bool) -> None:
        body = {"spec": {"unschedulable": value}}
        self._call(f"{'cordon' if value else 'uncordon'} {name}",
                   lambda c: c.patch_node(name, body, _request_timeout=self._timeout,
                                          _preload_content=False),
                   missing_ok=True)

    def cordon(self, name: str) -> None:
        self._set_unschedulable(name, True)

    def uncordon(self, name: str) -> None:
        self._set_unschedulable(name, False)

    def delete_node(self, name: str) -> None:
        self._call(f"delete node {name}",
                   lambda c: c.delete_node(name, _request_timeout=self._timeout,
                                           _preload_content=False), missing_ok=True)

    def drain(self, name: str, options: DrainOptions) -> None:
        """Evict the node's pods as `kubectl drain` would, then wait until they are gone."""
        victims, refused = [], []
        for pod in self._pods_on(name):
            why = _keep_reason(pod, options)
            if why == "daemonset":
                continue
            if why:
                refused.append(f"{_pod_key(pod)} ({why})")
            else:
                victims.append(pod)
        if refused:
            raise HostError(name, "drain refused: " + ", ".join(sorted(refused)) + ". Set "
                            "upgrade_strategy.node_drain_input force / delete_local_data, or "
                            "move these pods first")
        for pod in victims:
            self._evict(pod, options)
        self._wait_gone(name, {_pod_key(p) for p in victims}, options)

    def _pods_on(self, name: str) -> list[dict[str, Any]]:
        result = self._json(
            f"list pods on {name}",
            lambda c: c.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={name}",
                                                   _request_timeout=self._timeout,
                                                   _preload_content=False))
        return list((result or {}).get("items") or [])

    def _evict(self, pod: dict[str, Any], options: DrainOptions) -> None:
        meta = pod["metadata"]
        body: dict[str, Any] = {"apiVersion": "policy/v1", "kind": "Eviction",
                                "metadata": {"name": meta["name"], "namespace": meta["namespace"]}}
        if options.grace_period >= 0:
            body["deleteOptions"] = {"gracePeriodSeconds": options.grace_period}
        self._call(f"evict {_pod_key(pod)}",
                   lambda c: c.create_namespaced_pod_eviction(
                       meta["name"], meta["namespace"], body, _request_timeout=self._timeout,
                       _preload_content=False),
                   missing_ok=True)

    def _wait_gone(self, name: str, pods: set[str], options: DrainOptions) -> None:
        deadline = time.monotonic() + max(1, options.timeout)
        left = pods
        while left:
            left = left & {_pod_key(p) for p in self._pods_on(name)}
            if not left:
                return
            if time.monotonic() > deadline:
                raise HostError(name, f"drain timed out after {options.timeout}s; still there: "
                                + ", ".join(sorted(left)))
            self._sleep(2.0)


def _pod_key(pod: dict[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _keep_reason(pod: dict[str, Any], options: DrainOptions) -> str:
    """Why drain must not (or need not) evict `pod`: "" when it may."""
    meta = pod.get("metadata") or {}
    owners = meta.get("ownerReferences") or []
    if any(o.get("kind") == "DaemonSet" for o in owners):
        return "daemonset" if options.ignore_daemonsets else "managed by a DaemonSet"
    if "kubernetes.io/config.mirror" in (meta.get("annotations") or {}):
        return "daemonset"  # a static pod's mirror: the kubelet owns it
    if not any(o.get("controller") for o in owners) and not options.force:
        return "not managed by a controller; needs force"
    volumes = (pod.get("spec") or {}).get("volumes") or []
    if any("emptyDir" in v for v in volumes) and not options.delete_local_data:
        return "uses emptyDir; needs delete_local_data"
    return ""
