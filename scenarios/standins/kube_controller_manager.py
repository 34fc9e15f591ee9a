"""kube-controller-manager stand-in: node lifecycle and the workload controllers.

Python 3.11 standard library only. Run as a script with rkel's flags, verbatim. See README.md.
Controllers: node lifecycle (every --node-monitor-period), and Deployment, ReplicaSet,
DaemonSet, Job and a light garbage collector (every STANDIN_CONTROLLER_PERIOD, default 2 s),
polling the API (the stand-in apiserver has no watch). With --leader-elect (rkel sets it) only
the holder of the kube-system/kube-controller-manager Lease runs them.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from component_common import (
    BOOL,
    COMMON_FLAGS,
    DURATION,
    INT,
    SERVING_FLAGS,
    STRING,
    ApiClient,
    ApiFailure,
    IdentityProbe,
    StartupError,
    env_port,
    env_seconds,
    flags_or_exit,
    health_server,
    help_or_version,
    now_rfc3339,
    parse_duration,
    parse_rfc3339,
    read_kubeconfig,
    run_until_signal,
    serving_cert,
    setup_logging,
)
from controllers_apps import (
    DaemonSetController,
    DeploymentController,
    ReplicaSetController,
)
from controllers_batch import GarbageCollector, JobController
from controllers_common import Snapshot, Writer
from controllers_leader import LeaderElector

NAME = "kube-controller-manager"
_STRINGS = (
    "cluster-cidr", "service-cluster-ip-range", "root-ca-file",
    "service-account-private-key-file", "cloud-provider", "cloud-config", "cluster-name",
    "cluster-signing-cert-file", "cluster-signing-key-file", "controllers",
    "node-cidr-mask-size", "node-cidr-mask-size-ipv4", "node-cidr-mask-size-ipv6",
    "secondary-node-cidr-mask-size", "flex-volume-plugin-dir", "external-cloud-volume-plugin",
    "pv-recycler-pod-template-filepath-hostpath", "pv-recycler-pod-template-filepath-nfs",
    "cluster-signing-kube-apiserver-client-cert-file",
    "cluster-signing-kube-apiserver-client-key-file", "cluster-signing-kubelet-client-cert-file",
    "cluster-signing-kubelet-client-key-file", "cluster-signing-kubelet-serving-cert-file",
    "cluster-signing-kubelet-serving-key-file", "cluster-signing-legacy-unknown-cert-file",
    "cluster-signing-legacy-unknown-key-file", "cidr-allocator-type", "route-reconciliation-period",
    "generic-pv-recycler-pod-template-filepath-hostpath", "volume-host-cidr-denylist",
)
_BOOLS = (
    "allocate-node-cidrs", "allow-untagged-cloud", "configure-cloud-routes",
    "enable-hostpath-provisioner", "use-service-account-credentials",
    "enable-dynamic-provisioning", "enable-garbage-collector", "enable-taint-manager",
    "enable-leader-migration", "disable-attach-detach-reconcile-sync",
    "volume-host-allow-local-loopback", "controller-start-interval-disabled",
)
_INTS = (
    "terminated-pod-gc-threshold", "concurrent-deployment-syncs", "concurrent-replicaset-syncs",
    "concurrent-service-syncs", "concurrent-endpoint-syncs", "concurrent-gc-syncs",
    "concurrent-namespace-syncs", "concurrent-serviceaccount-token-syncs",
    "concurrent-statefulset-syncs", "concurrent-job-syncs", "concurrent-cron-job-syncs",
    "concurrent-rc-syncs", "concurrent-resource-quota-syncs", "concurrent-ttl-after-finished-syncs",
    "concurrent-daemonset-syncs", "concurrent-horizontal-pod-autoscaler-syncs",
    "large-cluster-size-threshold", "pvclaimbinder-sync-period-seconds",
    "pv-recycler-minimum-timeout-nfs", "pv-recycler-increment-timeout-nfs",
    "pv-recycler-minimum-timeout-hostpath", "pv-recycler-timeout-increment-hostpath",
)
_DURATIONS = (
    "node-monitor-grace-period", "node-monitor-period", "node-startup-grace-period",
    "pod-eviction-timeout", "cluster-signing-duration", "horizontal-pod-autoscaler-sync-period",
    "namespace-sync-period", "resource-quota-sync-period", "pvclaimbinder-sync-period",
    "min-resync-period", "node-sync-period", "attach-detach-reconcile-sync-period",
    "controller-start-interval", "mirroring-endpointslice-updates-batch-period",
    "endpoint-updates-batch-period", "endpointslice-updates-batch-period",
    "horizontal-pod-autoscaler-downscale-stabilization",
    "horizontal-pod-autoscaler-initial-readiness-delay",
    "horizontal-pod-autoscaler-cpu-initialization-period",
)
FLAGS: dict[str, str] = {
    **COMMON_FLAGS, **SERVING_FLAGS, **{k: STRING for k in _STRINGS},
    **{k: BOOL for k in _BOOLS}, **{k: INT for k in _INTS}, **{k: DURATION for k in _DURATIONS},
    "node-eviction-rate": STRING, "secondary-node-eviction-rate": STRING,
    "unhealthy-zone-threshold": STRING, "horizontal-pod-autoscaler-tolerance": STRING,
    "leader-migration-config": STRING, "master": STRING, "port": INT, "address": STRING,
}
LOG = setup_logging(NAME)


def ready_condition(node: dict[str, Any]) -> dict[str, Any] | None:
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return dict(cond)
    return None


class NodeLifecycle:
    """Nodes whose Ready heartbeat is older than the grace period become Ready=Unknown.

    The heartbeat is the Ready condition's lastHeartbeatTime; when a kubelet sets none, the
    time this controller first saw that condition stands for it (like the real controller's
    probe timestamp). No taints, no evictions.
    """

    def __init__(self, client: ApiClient, grace: float) -> None:
        self.client, self.grace = client, grace
        self.seen: dict[str, tuple[str, float]] = {}  # node -> (condition json, first seen)

    def round(self, stop: threading.Event) -> None:
        try:
            nodes = self.client.call("GET", "/api/v1/nodes")["items"]
        except ApiFailure as exc:
            LOG.error(f"node lifecycle: cannot list nodes: {exc}")
            return
        now = time.time()
        for node in nodes:
            if stop.is_set():
                return
            name = node["metadata"]["name"]
            cond = ready_condition(node)
            if cond is None or cond.get("status") == "Unknown":
                continue
            beat = parse_rfc3339(cond.get("lastHeartbeatTime") or "")
            if beat is None:
                key = json.dumps(cond, sort_keys=True)
                if self.seen.get(name, ("", 0.0))[0] != key:
                    self.seen[name] = (key, now)
                beat = self.seen[name][1]
            if now - beat <= self.grace:
                continue
            self.mark_unknown(name, cond)
        names = {n["metadata"]["name"] for n in nodes}
        for gone in set(self.seen) - names:
            del self.seen[gone]

    def mark_unknown(self, name: str, cond: dict[str, Any]) -> None:
        new = {"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown",
               "message": "Kubelet stopped posting node status.",
               "lastTransitionTime": now_rfc3339()}
        if cond.get("lastHeartbeatTime"):
            new["lastHeartbeatTime"] = cond["lastHeartbeatTime"]
        try:
            self.client.call("PATCH", f"/api/v1/nodes/{quote(name)}/status",
                             {"status": {"conditions": [new]}},
                             "application/strategic-merge-patch+json")
        except ApiFailure as exc:
            LOG.error(f'node lifecycle: cannot mark node "{name}" Unknown: {exc}')
            return
        LOG.info(f'"Node is unresponsive: Ready heartbeat older than {self.grace:g}s" '
                 f'node="{name}" condition="Ready" status="Unknown"')


# --- the workload controllers ------------------------------------------------------------------

# Real controller names (1.28+) and their older aliases, as --controllers accepts them.
CONTROLLERS: dict[str, tuple[str, ...]] = {
    "node-lifecycle-controller": ("nodelifecycle",),
    "garbage-collector-controller": ("garbagecollector",),
    "deployment-controller": ("deployment",),
    "replicaset-controller": ("replicaset",),
    "daemonset-controller": ("daemonset",),
    "job-controller": ("job",),
}
# What each controller writes (verb, group, resource[/subresource]); checked at start.
NEEDS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "garbage-collector-controller": (("delete", "", "pods"), ("delete", "apps", "replicasets")),
    "deployment-controller": (("create", "apps", "replicasets"), ("update", "apps", "replicasets"),
                              ("delete", "apps", "replicasets"),
                              ("update", "apps", "deployments/status")),
    "replicaset-controller": (("create", "", "pods"), ("delete", "", "pods"),
                              ("update", "apps", "replicasets/status")),
    "daemonset-controller": (("create", "", "pods"), ("delete", "", "pods"),
                             ("update", "apps", "daemonsets/status")),
    "job-controller": (("create", "", "pods"), ("delete", "", "pods"), ("update", "", "pods/status"),
                       ("update", "batch", "jobs/status")),
}


def enabled_controllers(flags: dict[str, str]) -> set[str]:
    """--controllers (`*` = all, `name`, `-name`; default `*`) and --enable-garbage-collector."""
    items = [i.strip() for i in flags.get("controllers", "*").split(",") if i.strip()] or ["*"]
    out = set()
    for name, aliases in CONTROLLERS.items():
        names = (name, *aliases)
        if any(f"-{n}" in items for n in names):
            continue
        if "*" in items or any(n in items for n in names):
            out.add(name)
    if flags.get("enable-garbage-collector", "true").lower() in ("false", "0", "f"):
        out.discard("garbage-collector-controller")
    return out


class Workloads:
    """One round of the workload controllers over one snapshot of the cluster."""

    def __init__(self, client: ApiClient, enabled: set[str], job_seconds: float) -> None:
        self.client, self.enabled = client, enabled
        self.writer = Writer(client)
        deployments = DeploymentController(self.writer)
        steps: list[tuple[str, Callable[[Snapshot, float], None]]] = [
            ("garbage-collector-controller", GarbageCollector(self.writer).sync),
            ("deployment-controller", deployments.sync),
            ("replicaset-controller", ReplicaSetController(self.writer).sync),
            ("deployment-controller", deployments.status),
            ("daemonset-controller", DaemonSetController(self.writer).sync),
            ("job-controller", JobController(self.writer, job_seconds).sync),
        ]
        self.steps = [(n, fn) for n, fn in steps if n in enabled]
        self.rbac_checked = False

    def round(self, stop: threading.Event) -> None:
        if not self.steps:
            return
        try:
            snap = Snapshot.load(self.client)
        except ApiFailure as exc:
            self.writer.failed('action="list workloads and pods"', exc)
            return
        if not self.rbac_checked:
            self.check_rbac()
        for name, step in self.steps:
            if stop.is_set():
                return
            try:
                step(snap, time.time())
            except Exception:  # a bug in one controller must not stop the others
                LOG.exception(f"{name} failed")

    def check_rbac(self) -> None:
        """Log, once, what the enabled controllers need and this identity may not do."""
        for name in sorted(self.enabled & set(NEEDS)):
            denied = []
            for verb, group, resource in NEEDS[name]:
                plural, _, sub = resource.partition("/")
                review = {"apiVersion": "authorization.k8s.io/v1",
                          "kind": "SelfSubjectAccessReview",
                          "spec": {"resourceAttributes": {"verb": verb, "group": group,
                                                          "resource": plural,
                                                          "subresource": sub}}}
                try:
                    got = self.client.call(
                        "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review)
                except ApiFailure:
                    return  # asked again next round
                if not ((got or {}).get("status") or {}).get("allowed"):
                    denied.append(f"{verb} {resource}" + (f" ({group})" if group else ""))
            if denied:
                LOG.warning(f'"Not authorized for what the controller writes; those writes will '
                            f'fail" controller="{name}" user="{self.client.user}" '
                            f'denied="{", ".join(denied)}"')
        self.rbac_checked = True


@dataclass
class Task:
    name: str
    period: float
    run: Callable[[threading.Event], None]
    due: float = 0.0


class Manager:
    """Runs each controller every its period, while this instance leads."""

    def __init__(self, tasks: list[Task], elector: LeaderElector | None) -> None:
        self.tasks, self.elector = tasks, elector
        self.tick = min([t.period for t in tasks], default=1.0)
        if elector is not None:
            self.tick = min(self.tick, elector.retry_period)

    def round(self, stop: threading.Event) -> None:
        if self.elector is not None:
            self.elector.start(stop)
            if not self.elector.is_leader():
                return
        for task in self.tasks:
            if stop.is_set() or time.monotonic() < task.due:
                continue
            task.due = time.monotonic() + task.period
            try:
                task.run(stop)
            except Exception:
                LOG.exception(f"{task.name} failed")

    def shutdown(self) -> None:
        if self.elector is not None:
            self.elector.release()


def leader_elector(client: ApiClient, flags: dict[str, str]) -> LeaderElector | None:
    if flags.get("leader-elect", "true").lower() in ("false", "0", "f"):
        return None
    lease = parse_duration(flags.get("leader-elect-lease-duration", "15s"))
    renew = parse_duration(flags.get("leader-elect-renew-deadline", "10s"))
    retry = parse_duration(flags.get("leader-elect-retry-period", "2s"))
    if lease <= renew:
        raise StartupError("leaseDuration must be greater than renewDeadline")
    if renew <= retry * 1.2:
        raise StartupError("renewDeadline must be greater than retryPeriod*JitterFactor")
    lock = flags.get("leader-elect-resource-lock", "leases")
    if lock != "leases":
        LOG.warning(f"--leader-elect-resource-lock={lock}: the stand-in uses leases")
    identity = f"{socket.gethostname()}_{uuid.uuid4()}"
    return LeaderElector(client, flags.get("leader-elect-resource-namespace", "kube-system"),
                         flags.get("leader-elect-resource-name", NAME), identity, lease, renew,
                         retry)


def main(argv: list[str], environ: dict[str, str]) -> int:
    flags = flags_or_exit(NAME, argv, FLAGS)
    if help_or_version(NAME, flags, environ):
        return 0
    try:
        kubeconfig = read_kubeconfig(flags.get("kubeconfig", ""))
        client = ApiClient(kubeconfig)
        port = env_port(environ, "STANDIN_KUBE_CONTROLLER_MANAGER_PORT",
                        flags.get("secure-port"), 10257)
        grace = env_seconds(environ, "STANDIN_NODE_MONITOR_GRACE_PERIOD",
                            parse_duration(flags.get("node-monitor-grace-period", "40s")))
        period = env_seconds(environ, "STANDIN_NODE_MONITOR_PERIOD",
                             parse_duration(flags.get("node-monitor-period", "5s")))
        workload_period = env_seconds(environ, "STANDIN_CONTROLLER_PERIOD", 2.0)
        job_seconds = env_seconds(environ, "STANDIN_JOB_SECONDS", 2.0)
        elector = leader_elector(client, flags)
        probe = IdentityProbe(client, {"verb": "patch", "resource": "nodes",
                                       "subresource": "status"})
        cert_key, tmp = serving_cert(NAME, flags)
        server = health_server(flags.get("bind-address", "0.0.0.0"), port, probe.check, cert_key)
    except StartupError as exc:
        LOG.error(f'"command failed" err="{exc}"')
        return 1
    enabled = enabled_controllers(flags)
    LOG.info(f"Serving securely on {flags.get('bind-address', '0.0.0.0')}:{port}; API "
             f"{kubeconfig['server']} as {client.user!r}; node lifecycle controller: grace "
             f"{grace:g}s, every {period:g}s; workload controllers every {workload_period:g}s "
             f"(job pods complete after {job_seconds:g}s Running and Ready); cluster-cidr "
             f"{flags.get('cluster-cidr', '')} service-cluster-ip-range "
             f"{flags.get('service-cluster-ip-range', '')}; leader election: "
             + (f"lease {elector.lease} as {elector.identity}" if elector else "off"))
    LOG.info(f'"Controllers enabled" controllers="{",".join(sorted(enabled))}"')
    probe.check()
    tasks = [Task("workload controllers", workload_period,
                  Workloads(client, enabled, job_seconds).round)]
    if "node-lifecycle-controller" in enabled:
        tasks.insert(0, Task("node-lifecycle-controller", period,
                             NodeLifecycle(client, grace).round))
    manager = Manager(tasks, elector)
    code = run_until_signal(manager.round, manager.tick, [server], tmp)
    manager.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], dict(os.environ)))
