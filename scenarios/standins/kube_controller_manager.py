"""kube-controller-manager stand-in: the node lifecycle controller only.

Python 3.11 standard library only. Run as a script with rkel's flags, verbatim. See README.md.
No other controller runs: a deleted (evicted) pod of a ReplicaSet is not recreated.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
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
            return cond
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
        probe = IdentityProbe(client, {"verb": "patch", "resource": "nodes",
                                       "subresource": "status"})
        cert_key, tmp = serving_cert(NAME, flags)
        server = health_server(flags.get("bind-address", "0.0.0.0"), port, probe.check, cert_key)
    except StartupError as exc:
        LOG.error(f'"command failed" err="{exc}"')
        return 1
    LOG.info(f"Serving securely on {flags.get('bind-address', '0.0.0.0')}:{port}; API "
             f"{kubeconfig['server']} as {client.user!r}; node lifecycle controller: grace "
             f"{grace:g}s, every {period:g}s; cluster-cidr {flags.get('cluster-cidr', '')} "
             f"service-cluster-ip-range {flags.get('service-cluster-ip-range', '')} (no other "
             f"controllers run; leader election not implemented)")
    probe.check()
    lifecycle = NodeLifecycle(client, grace)
    return run_until_signal(lifecycle.round, period, [server], tmp)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], dict(os.environ)))
