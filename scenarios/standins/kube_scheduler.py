"""kube-scheduler stand-in: binds Pending pods to Ready, schedulable nodes, round-robin.

Python 3.11 standard library only. Run as a script with rkel's flags, verbatim. See README.md.
"""

from __future__ import annotations

import os
import sys
import threading
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
    read_kubeconfig,
    run_until_signal,
    serving_cert,
    setup_logging,
)

NAME = "kube-scheduler"
FLAGS = {**COMMON_FLAGS, **SERVING_FLAGS, "config": STRING, "write-config-to": STRING,
         "master": STRING, "pod-max-in-unschedulable-pods-duration": DURATION,
         "lock-object-name": STRING, "lock-object-namespace": STRING,
         "scheduler-name": STRING, "policy-config-file": STRING, "use-legacy-policy-config": BOOL,
         "policy-configmap": STRING, "policy-configmap-namespace": STRING,
         "hard-pod-affinity-symmetric-weight": INT, "algorithm-provider": STRING,
         "port": INT, "address": STRING}
SCHEDULER = "default-scheduler"
LOG = setup_logging(NAME)


def node_ready(node: dict[str, Any]) -> bool:
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def tolerates(pod: dict[str, Any], taint: dict[str, Any]) -> bool:
    for tol in (pod.get("spec") or {}).get("tolerations") or []:
        if tol.get("effect") and tol.get("effect") != taint.get("effect"):
            continue
        op = tol.get("operator") or "Equal"
        if op == "Exists" and (not tol.get("key") or tol.get("key") == taint.get("key")):
            return True
        if op == "Equal" and tol.get("key") == taint.get("key") and \
                (tol.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def fits(pod: dict[str, Any], node: dict[str, Any]) -> str:
    """Why `pod` cannot go to `node` ("" when it can)."""
    spec = node.get("spec") or {}
    if not node_ready(node):
        return "node(s) were not Ready"
    if spec.get("unschedulable"):
        return "node(s) were unschedulable"
    for taint in spec.get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(pod, taint):
            return "node(s) had untolerated taint(s)"
    labels = (node.get("metadata") or {}).get("labels") or {}
    for key, value in ((pod.get("spec") or {}).get("nodeSelector") or {}).items():
        if labels.get(key) != value:
            return "node(s) didn't match Pod's node affinity/selector"
    return ""


class Scheduler:
    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self.next = 0
        self.unschedulable: dict[str, str] = {}  # pod uid -> last reason logged

    def round(self, stop: threading.Event) -> None:
        try:
            pods = self.client.call("GET", "/api/v1/pods")["items"]
            nodes = self.client.call("GET", "/api/v1/nodes")["items"]
        except ApiFailure as exc:
            LOG.error(f"cannot list pods and nodes: {exc}")
            return
        nodes.sort(key=lambda n: n["metadata"]["name"])
        for pod in pods:
            if stop.is_set():
                return
            meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
            if spec.get("nodeName") or meta.get("deletionTimestamp"):
                continue
            if (spec.get("schedulerName") or SCHEDULER) != SCHEDULER:
                continue
            if (pod.get("status") or {}).get("phase", "Pending") != "Pending":
                continue
            self.schedule(pod, nodes)

    def schedule(self, pod: dict[str, Any], nodes: list[dict[str, Any]]) -> None:
        meta = pod["metadata"]
        ns, name = meta.get("namespace", "default"), meta["name"]
        reasons: dict[str, int] = {}
        fitting = []
        for node in nodes:
            why = fits(pod, node)
            if why:
                reasons[why] = reasons.get(why, 0) + 1
            else:
                fitting.append(node)
        if not fitting:
            text = f"0/{len(nodes)} nodes are available: " + ", ".join(
                f"{n} {why}" for why, n in sorted(reasons.items())) + "."
            if self.unschedulable.get(meta.get("uid", name)) != text:
                self.unschedulable[meta.get("uid", name)] = text
                LOG.info(f'"Unable to schedule pod; no fit; waiting" pod="{ns}/{name}" '
                         f'err="{text}"')
                self._condition(ns, name, "False", "Unschedulable", text)
            return
        node = fitting[self.next % len(fitting)]["metadata"]["name"]
        self.next += 1
        binding = {"apiVersion": "v1", "kind": "Binding",
                   "metadata": {"name": name, "namespace": ns},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
        try:
            self.client.call("POST", f"/api/v1/namespaces/{quote(ns)}/pods/{quote(name)}/binding",
                             binding)
        except ApiFailure as exc:
            LOG.error(f'"Error scheduling pod" pod="{ns}/{name}" node="{node}" err="{exc}"')
            return
        self.unschedulable.pop(meta.get("uid", name), None)
        LOG.info(f'"Successfully bound pod to node" pod="{ns}/{name}" node="{node}" '
                 f"evaluatedNodes={len(nodes)} feasibleNodes={len(fitting)}")
        self._condition(ns, name, "True", "", "")

    def _condition(self, ns: str, name: str, status: str, reason: str, message: str) -> None:
        cond = {"type": "PodScheduled", "status": status, "lastTransitionTime": now_rfc3339()}
        if reason:
            cond.update(reason=reason, message=message)
        try:
            self.client.call("PATCH", f"/api/v1/namespaces/{quote(ns)}/pods/{quote(name)}/status",
                             {"status": {"conditions": [cond]}},
                             "application/strategic-merge-patch+json")
        except ApiFailure as exc:
            LOG.warning(f"cannot set PodScheduled on {ns}/{name}: {exc}")


def main(argv: list[str], environ: dict[str, str]) -> int:
    flags = flags_or_exit(NAME, argv, FLAGS)
    if help_or_version(NAME, flags, environ):
        return 0
    try:
        kubeconfig = read_kubeconfig(flags.get("kubeconfig", ""))
        client = ApiClient(kubeconfig)
        port = env_port(environ, "STANDIN_KUBE_SCHEDULER_PORT", flags.get("secure-port"), 10259)
        period = env_seconds(environ, "STANDIN_SCHEDULER_PERIOD", 2.0)
        probe = IdentityProbe(client, {"verb": "create", "resource": "pods",
                                       "subresource": "binding", "namespace": "default"})
        cert_key, tmp = serving_cert(NAME, flags)
        server = health_server(flags.get("bind-address", "0.0.0.0"), port, probe.check, cert_key)
    except StartupError as exc:
        LOG.error(f'"command failed" err="{exc}"')
        return 1
    LOG.info(f"Serving securely on {flags.get('bind-address', '0.0.0.0')}:{port}; API "
             f"{kubeconfig['server']} as {client.user!r}; scheduling every {period}s "
             f"(leader election not implemented: every instance schedules, bindings are "
             f"set once)")
    probe.check()
    scheduler = Scheduler(client)
    return run_until_signal(scheduler.round, period, [server], tmp)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], dict(os.environ)))
