"""The kube-controller-manager stand-in's apps/v1 controllers: ReplicaSet, Deployment, DaemonSet.

Python 3.11 standard library only. Each `sync` goes over one round's `Snapshot`; a failure on
one object is logged and the next object is handled. See README.md for what is simplified
(rollouts surge to the full replica count, DaemonSet pods are bound directly, no adoption).
"""

from __future__ import annotations

import copy
from typing import Any

from component_common import ApiFailure, parse_rfc3339
from controllers_common import (
    DAEMONSETS,
    DEPLOYMENTS,
    LOG,
    NODES,
    PODS,
    REPLICASETS,
    Kind,
    Obj,
    Snapshot,
    Writer,
    controller_ref,
    created,
    deleting,
    generation,
    is_active,
    is_available,
    is_ready,
    key,
    meta,
    node_matches,
    now_rfc3339,
    phase,
    pod_from_template,
    replicas,
    scaled,
    set_condition,
    template_hash,
    uid,
    untolerated,
)

BURST = 500  # pods created per object and round at most
HASH_LABEL = "pod-template-hash"
REVISION = "deployment.kubernetes.io/revision"


def each(kind: Kind, snap: Snapshot, writer: Writer, sync: Any) -> None:
    """`sync(obj)` for every live `kind` object; an exception is logged, never raised."""
    for obj in sorted(snap.items(kind), key=key):
        if deleting(obj):
            continue
        try:
            sync(obj)
        except Exception as exc:  # noqa: BLE001 - one object's bug must not stop the others
            what = f'{kind.kind.lower()}="{key(obj)}" action="sync"'
            writer.failed(what, f"{type(exc).__name__}: {exc}")
            LOG.debug("sync failed", exc_info=True)


def create_pods(writer: Writer, snap: Snapshot, owner_kind: Kind, owner: Obj,
                bodies: list[Obj], why: str) -> str:
    """Create `bodies`; stop at the first failure. "" or the failure's text."""
    what = f'{owner_kind.kind.lower()}="{key(owner)}" action="create pod"'
    for body in bodies:
        got = writer.create(PODS, owner["metadata"].get("namespace", ""), body, what)
        if got is None:
            return f"cannot create pods for {key(owner)} (see the log)"
        snap.add(PODS, got)
        node = (got.get("spec") or {}).get("nodeName")
        LOG.info(f'"Created pod" pod="{key(got)}" {owner_kind.kind.lower()}="{key(owner)}" '
                 f'reason="{why}"' + (f' node="{node}"' if node else ""))
    return ""


def delete_pod(writer: Writer, snap: Snapshot, owner_kind: Kind, owner: Obj, pod: Obj,
               why: str) -> bool:
    what = f'{owner_kind.kind.lower()}="{key(owner)}" action="delete pod {key(pod)}"'
    if not writer.delete(PODS, pod, what):
        return False
    snap.remove(PODS, pod)
    LOG.info(f'"Deleted pod" pod="{key(pod)}" {owner_kind.kind.lower()}="{key(owner)}" '
             f'reason="{why}"')
    return True


def _deletion_rank(pod: Obj) -> tuple[Any, ...]:
    """Which pods a scale-down removes first (as the real controller ranks them): unassigned,
    then Pending before Unknown before Running, not ready before ready, newest first."""
    rank = {"Pending": 0, "Unknown": 1, "Running": 2}.get(phase(pod), 0)
    return (bool((pod.get("spec") or {}).get("nodeName")), rank, is_ready(pod),
            -created(pod)[0])


# --- ReplicaSet ----------------------------------------------------------------------------------


class ReplicaSetController:
    """Keeps spec.replicas active pods per ReplicaSet; a deleted or evicted pod is replaced."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer

    def sync(self, snap: Snapshot, now: float) -> None:
        each(REPLICASETS, snap, self.writer, lambda rs: self.sync_one(snap, rs, now))

    def sync_one(self, snap: Snapshot, rs: Obj, now: float) -> None:
        spec = rs.get("spec") or {}
        active = [p for p in snap.owned(PODS, rs) if is_active(p)]
        want, failure = replicas(rs), ""
        if len(active) < want:
            count = min(want - len(active), BURST)
            body = pod_from_template(spec.get("template") or {}, REPLICASETS, rs, {})
            failure = create_pods(self.writer, snap, REPLICASETS, rs,
                                  [copy.deepcopy(body) for _ in range(count)],
                                  f"too few replicas: {len(active)}/{want}")
        elif len(active) > want:
            for pod in sorted(active, key=_deletion_rank)[:len(active) - want]:
                delete_pod(self.writer, snap, REPLICASETS, rs, pod,
                           f"too many replicas: {len(active)}/{want}")
        pods = [p for p in snap.owned(PODS, rs) if is_active(p)]
        labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        min_ready = int(spec.get("minReadySeconds") or 0)
        status: Obj = {
            "replicas": len(pods),
            "fullyLabeledReplicas": sum(1 for p in pods if labels.items() <= (
                (p.get("metadata") or {}).get("labels") or {}).items()),
            "readyReplicas": sum(1 for p in pods if is_ready(p)),
            "availableReplicas": sum(1 for p in pods if is_available(p, min_ready, now)),
            "observedGeneration": generation(rs),
        }
        conditions = list((rs.get("status") or {}).get("conditions") or [])
        if failure:
            conditions = set_condition(conditions, "ReplicaFailure", "True", "FailedCreate",
                                       failure, now_rfc3339(now))
        elif len(pods) >= want:
            conditions = [c for c in conditions if c.get("type") != "ReplicaFailure"]
        if conditions:
            status["conditions"] = conditions
        got = self.writer.update_status(
            REPLICASETS, rs, status,
            f"replicas={status['replicas']} ready={status['readyReplicas']} "
            f"available={status['availableReplicas']}")
        if got is not None and got is not rs:
            snap.replace(REPLICASETS, got)


# --- Deployment ----------------------------------------------------------------------------------


def _revision(rs: Obj) -> int:
    try:
        return int(((rs.get("metadata") or {}).get("annotations") or {}).get(REVISION) or 0)
    except ValueError:
        return 0


class DeploymentController:
    """One ReplicaSet per pod template (`<deployment>-<hash>`), scaled to spec.replicas.

    RollingUpdate: the new ReplicaSet gets all replicas at once (maxSurge taken as 100%), the
    old ones shrink, oldest first, by as many pods as the new one has available (maxUnavailable
    taken as 0). Recreate: the old ones go to 0 first; the new one is scaled up once their pods
    are gone. Paused: nothing is scaled. Old ReplicaSets at 0 beyond revisionHistoryLimit (10)
    are deleted.
    """

    def __init__(self, writer: Writer) -> None:
        self.writer = writer

    def sync(self, snap: Snapshot, now: float) -> None:
        each(DEPLOYMENTS, snap, self.writer, lambda d: self.sync_one(snap, d, now))

    def status(self, snap: Snapshot, now: float) -> None:
        each(DEPLOYMENTS, snap, self.writer, lambda d: self.update_status(snap, d, now))

    @staticmethod
    def _hash(d: Obj) -> str:
        return template_hash((d.get("spec") or {}).get("template") or {},
                             int((d.get("status") or {}).get("collisionCount") or 0))

    def _sets(self, snap: Snapshot, d: Obj) -> tuple[Obj | None, list[Obj]]:
        """(the ReplicaSet of the current template, the others), oldest first."""
        current, new, old = self._hash(d), None, []
        for rs in sorted(snap.owned(REPLICASETS, d), key=created):
            if deleting(rs):
                continue
            if new is None and ((rs.get("metadata") or {}).get("labels") or {}).get(
                    HASH_LABEL) == current:
                new = rs
            else:
                old.append(rs)
        return new, old

    def sync_one(self, snap: Snapshot, d: Obj, now: float) -> None:
        spec = d.get("spec") or {}
        if spec.get("paused"):
            return
        want = replicas(d)
        new, old = self._sets(snap, d)
        recreate = (spec.get("strategy") or {}).get("type") == "Recreate"
        old_pods = [p for rs in old for p in snap.owned(PODS, rs) if is_active(p)]
        if recreate:
            for rs in old:
                self.scale(snap, d, rs, 0)
            new_target = 0 if old_pods else want
        else:
            new_target = want
        if new is None:
            new = self.create_set(snap, d, new_target,
                                  max([_revision(r) for r in old], default=0) + 1)
            if new is None:
                return
        else:
            self.scale(snap, d, new, new_target, old)
        if not recreate:
            min_ready = int(spec.get("minReadySeconds") or 0)
            new_available = sum(1 for p in snap.owned(PODS, new)
                                if is_available(p, min_ready, now))
            excess = sum(replicas(rs) for rs in old) - max(0, want - new_available)
            for rs in old:
                if excess <= 0:
                    break
                cut = min(replicas(rs), excess)
                self.scale(snap, d, rs, replicas(rs) - cut)
                excess -= cut
        self.cleanup(snap, d, old, int(spec.get("revisionHistoryLimit", 10)))

    def create_set(self, snap: Snapshot, d: Obj, count: int, revision: int) -> Obj | None:
        spec, dm = d.get("spec") or {}, d["metadata"]
        current = self._hash(d)
        template = copy.deepcopy(spec.get("template") or {})
        labels = {**((template.get("metadata") or {}).get("labels") or {}), HASH_LABEL: current}
        template.setdefault("metadata", {})["labels"] = labels
        selector = copy.deepcopy(spec.get("selector") or {"matchLabels": dict(labels)})
        selector.setdefault("matchLabels", {})[HASH_LABEL] = current
        name = f"{dm['name']}-{current}"
        body: Obj = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {
            "name": name, "namespace": dm.get("namespace", "default"),
            "labels": labels, "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "Deployment", "name": dm["name"],
                 "uid": dm["uid"], "controller": True, "blockOwnerDeletion": True}],
            "annotations": {REVISION: str(revision),
                            "deployment.kubernetes.io/desired-replicas": str(replicas(d)),
                            "deployment.kubernetes.io/max-replicas": str(replicas(d))}},
            "spec": {"replicas": count, "minReadySeconds": int(spec.get("minReadySeconds") or 0),
                     "selector": selector, "template": template}}
        what = f'deployment="{key(d)}" action="create replicaset {name}"'
        try:
            got = self.writer.client.call("POST", REPLICASETS.path(dm.get("namespace", "")),
                                          body)
        except ApiFailure as exc:
            if exc.code == 409:
                return self._collision(snap, d, name)
            self.writer.failed(what, exc)
            return None
        snap.add(REPLICASETS, got)
        LOG.info(f'"Created replica set" replicaSet="{key(got)}" deployment="{key(d)}" '
                 f"replicas={count} revision={revision}")
        return got if isinstance(got, dict) else None

    def _collision(self, snap: Snapshot, d: Obj, name: str) -> Obj | None:
        """The ReplicaSet name is taken: ours (a stale list) is used; another's bumps
        status.collisionCount, so the next round hashes to another name."""
        existing = self.writer.get(REPLICASETS, d["metadata"].get("namespace", ""), name)
        if existing is not None and (controller_ref(existing) or {}).get("uid") == uid(d):
            snap.add(REPLICASETS, existing)
            return existing
        status = copy.deepcopy(d.get("status") or {})
        status["collisionCount"] = int(status.get("collisionCount") or 0) + 1
        got = self.writer.update_status(DEPLOYMENTS, d, status,
                                        f"collisionCount={status['collisionCount']} "
                                        f'(replica set "{name}" exists and is not ours)')
        if got is not None:
            snap.replace(DEPLOYMENTS, got)
        return None

    def scale(self, snap: Snapshot, d: Obj, rs: Obj, count: int,
              others: list[Obj] | None = None) -> None:
        """Set the ReplicaSet's replicas (and, when it is the new one again after a rollback,
        the highest revision)."""
        body = copy.deepcopy(rs)
        annotations = meta(body).setdefault("annotations", {})
        revision = None
        if others is not None:
            top = max([_revision(r) for r in others], default=0)
            if _revision(rs) <= top:
                revision = top + 1
                annotations[REVISION] = str(revision)
        if replicas(rs) == count and revision is None:
            return
        body.setdefault("spec", {})["replicas"] = count
        annotations["deployment.kubernetes.io/desired-replicas"] = str(replicas(d))
        got = self.writer.update(REPLICASETS, body,
                                 f'deployment="{key(d)}" action="scale replicaset {key(rs)}"')
        if got is None:
            return
        snap.replace(REPLICASETS, got)
        LOG.info(f'"Scaled replica set" replicaSet="{key(rs)}" deployment="{key(d)}" '
                 f"from={replicas(rs)} to={count}" +
                 (f" revision={revision}" if revision else ""))

    def cleanup(self, snap: Snapshot, d: Obj, old: list[Obj], limit: int) -> None:
        idle = [rs for rs in old if replicas(rs) == 0 and not any(
            is_active(p) for p in snap.owned(PODS, rs))]
        for rs in idle[:max(0, len(idle) - limit)]:
            what = f'deployment="{key(d)}" action="delete old replicaset {key(rs)}"'
            if self.writer.delete(REPLICASETS, rs, what):
                snap.remove(REPLICASETS, rs)
                LOG.info(f'"Deleted old replica set" replicaSet="{key(rs)}" '
                         f'deployment="{key(d)}" revisionHistoryLimit={limit}')

    def update_status(self, snap: Snapshot, d: Obj, now: float) -> None:
        spec, old_status = d.get("spec") or {}, d.get("status") or {}
        want = replicas(d)
        new, old = self._sets(snap, d)
        min_ready = int(spec.get("minReadySeconds") or 0)
        pods = [p for rs in ([new] if new else []) + old for p in snap.owned(PODS, rs)
                if is_active(p)]
        updated = [p for p in snap.owned(PODS, new) if is_active(p)] if new else []
        available = sum(1 for p in pods if is_available(p, min_ready, now))
        status: Obj = {"observedGeneration": generation(d), "replicas": len(pods),
                       "updatedReplicas": len(updated),
                       "readyReplicas": sum(1 for p in pods if is_ready(p)),
                       "availableReplicas": available,
                       "unavailableReplicas": max(0, want - available)}
        if old_status.get("collisionCount"):
            status["collisionCount"] = old_status["collisionCount"]
        strategy = spec.get("strategy") or {}
        if strategy.get("type") == "Recreate":
            max_unavailable = 0
        else:
            rolling = strategy.get("rollingUpdate") or {}
            max_unavailable = scaled(rolling.get("maxUnavailable"), want, False, "25%")
            if max_unavailable == 0 and scaled(rolling.get("maxSurge"), want, True, "25%") == 0:
                max_unavailable = 1
        stamp, times = now_rfc3339(now), ("lastUpdateTime",)
        conditions = list(old_status.get("conditions") or [])
        if available >= want - min(max_unavailable, want):
            conditions = set_condition(conditions, "Available", "True", "MinimumReplicasAvailable",
                                       "Deployment has minimum availability.", stamp, times)
        else:
            conditions = set_condition(conditions, "Available", "False",
                                       "MinimumReplicasUnavailable",
                                       "Deployment does not have minimum availability.",
                                       stamp, times)
        name = str(new["metadata"]["name"]) if new else f"{d['metadata']['name']}-{self._hash(d)}"
        complete = len(updated) == want and status["replicas"] == want and available >= want
        counts = ("replicas", "updatedReplicas", "readyReplicas", "availableReplicas")
        progressed = any(old_status.get(c) != status[c] for c in counts)
        deadline = int(spec.get("progressDeadlineSeconds", 600))
        previous = next((c for c in conditions if c.get("type") == "Progressing"), None)
        last_progress = now if progressed or previous is None else (
            parse_rfc3339(previous.get("lastUpdateTime") or "") or now)
        if spec.get("paused"):
            conditions = set_condition(conditions, "Progressing", "Unknown", "DeploymentPaused",
                                       "Deployment is paused", stamp, times)
        elif complete:
            conditions = set_condition(conditions, "Progressing", "True", "NewReplicaSetAvailable",
                                       f'ReplicaSet "{name}" has successfully progressed.',
                                       stamp, times)
        elif now - last_progress > deadline:
            conditions = set_condition(conditions, "Progressing", "False",
                                       "ProgressDeadlineExceeded",
                                       f'ReplicaSet "{name}" has timed out progressing.',
                                       stamp, times)
        else:
            conditions = set_condition(conditions, "Progressing", "True", "ReplicaSetUpdated",
                                       f'ReplicaSet "{name}" is progressing.', stamp, times)
            for cond in conditions:
                if cond["type"] == "Progressing" and progressed:
                    cond["lastUpdateTime"] = stamp  # progress made: the deadline starts again
        status["conditions"] = conditions
        got = self.writer.update_status(
            DEPLOYMENTS, d, status,
            f"replicas={status['replicas']} updated={status['updatedReplicas']} "
            f"ready={status['readyReplicas']} available={available}")
        if got is not None and got is not d:
            snap.replace(DEPLOYMENTS, got)


# --- DaemonSet -----------------------------------------------------------------------------------

# What the real controller adds to every daemon pod (util.AddOrUpdateDaemonPodTolerations).
DAEMON_TOLERATIONS = (
    ("node.kubernetes.io/not-ready", "NoExecute"), ("node.kubernetes.io/unreachable", "NoExecute"),
    ("node.kubernetes.io/disk-pressure", "NoSchedule"),
    ("node.kubernetes.io/memory-pressure", "NoSchedule"),
    ("node.kubernetes.io/pid-pressure", "NoSchedule"),
    ("node.kubernetes.io/unschedulable", "NoSchedule"),
)


def daemon_pod_spec(template: Obj) -> Obj:
    """The template's pod spec with the daemon tolerations added."""
    spec = copy.deepcopy(template.get("spec") or {})
    tolerations = list(spec.get("tolerations") or [])
    wanted = list(DAEMON_TOLERATIONS)
    if spec.get("hostNetwork"):
        wanted.append(("node.kubernetes.io/network-unavailable", "NoSchedule"))
    for taint_key, effect in wanted:
        if not any(t.get("key") == taint_key and t.get("effect") == effect for t in tolerations):
            tolerations.append({"key": taint_key, "operator": "Exists", "effect": effect})
    spec["tolerations"] = tolerations
    return spec


class DaemonSetController:
    """One pod per eligible node, bound there directly (spec.nodeName).

    A node is eligible when nodeSelector and required node affinity match and every NoSchedule
    and NoExecute taint is tolerated (cordoned nodes are: the daemon tolerations include
    node.kubernetes.io/unschedulable). A pod keeps running while affinity matches and its
    NoExecute taints are tolerated. RollingUpdate replaces pods of an older template, at most
    maxUnavailable (default 1) unavailable at a time; OnDelete leaves them.
    """

    def __init__(self, writer: Writer) -> None:
        self.writer = writer

    def sync(self, snap: Snapshot, now: float) -> None:
        nodes = {n["metadata"]["name"]: n for n in snap.items(NODES) if not deleting(n)}
        each(DAEMONSETS, snap, self.writer, lambda ds: self.sync_one(snap, ds, nodes, now))

    def sync_one(self, snap: Snapshot, ds: Obj, nodes: dict[str, Obj], now: float) -> None:
        spec = ds.get("spec") or {}
        template = spec.get("template") or {}
        pod_spec = daemon_pod_spec(template)
        current = template_hash(template)
        min_ready = int(spec.get("minReadySeconds") or 0)
        by_node: dict[str, list[Obj]] = {}
        for pod in sorted(snap.owned(PODS, ds), key=created):
            if deleting(pod):
                continue
            if not is_active(pod):  # a daemon pod that ended is replaced
                delete_pod(self.writer, snap, DAEMONSETS, ds, pod, f"pod {phase(pod)}")
                continue
            by_node.setdefault(str((pod.get("spec") or {}).get("nodeName") or ""), []).append(pod)
        run, keep = set(), set()
        for name, node in nodes.items():
            if node_matches(pod_spec, node):
                if not untolerated(pod_spec, node, ("NoSchedule", "NoExecute")):
                    run.add(name)
                if not untolerated(pod_spec, node, ("NoExecute",)):
                    keep.add(name)
        for name, pods in sorted(by_node.items()):
            if name not in keep:
                for pod in pods:
                    delete_pod(self.writer, snap, DAEMONSETS, ds, pod,
                               "node gone or no longer eligible" if name else "no node")
                by_node[name] = []
            elif len(pods) > 1:  # keep the oldest
                for pod in pods[1:]:
                    delete_pod(self.writer, snap, DAEMONSETS, ds, pod, "more than one per node")
                by_node[name] = pods[:1]
        labels = {"controller-revision-hash": current,
                  "pod-template-generation": str(generation(ds))}
        missing = sorted(n for n in run if not by_node.get(n))
        bodies = [pod_from_template({"metadata": template.get("metadata") or {},
                                     "spec": pod_spec}, DAEMONSETS, ds, labels, node)
                  for node in missing]
        failure = create_pods(self.writer, snap, DAEMONSETS, ds, bodies, "node has none")
        if (spec.get("updateStrategy") or {}).get("type", "RollingUpdate") == "RollingUpdate":
            self.roll(snap, ds, run, current, min_ready, now)
        self.update_status(snap, ds, run, current, min_ready, now, failure)

    def _pods(self, snap: Snapshot, ds: Obj) -> dict[str, Obj]:
        out: dict[str, Obj] = {}
        for pod in sorted(snap.owned(PODS, ds), key=created):
            node = str((pod.get("spec") or {}).get("nodeName") or "")
            if is_active(pod) and node:
                out.setdefault(node, pod)
        return out

    def roll(self, snap: Snapshot, ds: Obj, run: set[str], current: str, min_ready: int,
             now: float) -> None:
        """Delete pods of an older template, the unavailable ones first, keeping at most
        maxUnavailable nodes without an available pod (the next round recreates them)."""
        pods = self._pods(snap, ds)
        rolling = (ds.get("spec") or {}).get("updateStrategy", {}).get("rollingUpdate") or {}
        budget = max(1, scaled(rolling.get("maxUnavailable"), len(run), True, 1))
        unavailable = sum(1 for n in run if n not in pods or
                          not is_available(pods[n], min_ready, now))
        outdated = sorted((p for n, p in pods.items() if n in run and
                           ((p.get("metadata") or {}).get("labels") or {})
                           .get("controller-revision-hash") != current),
                          key=lambda p: is_available(p, min_ready, now))
        for pod in outdated:
            if is_available(pod, min_ready, now):
                if unavailable >= budget:
                    break
                unavailable += 1
            delete_pod(self.writer, snap, DAEMONSETS, ds, pod, "rolling update: old template")

    def update_status(self, snap: Snapshot, ds: Obj, run: set[str], current: str,
                      min_ready: int, now: float, failure: str) -> None:
        pods = self._pods(snap, ds)
        scheduled = [n for n in run if n in pods]
        available = sum(1 for n in scheduled if is_available(pods[n], min_ready, now))
        status: Obj = {
            "desiredNumberScheduled": len(run),
            "currentNumberScheduled": len(scheduled),
            "numberMisscheduled": sum(1 for n in pods if n not in run),
            "numberReady": sum(1 for n in scheduled if is_ready(pods[n])),
            "numberAvailable": available,
            "numberUnavailable": len(run) - available,
            "updatedNumberScheduled": sum(1 for n in scheduled if (
                (pods[n].get("metadata") or {}).get("labels") or {})
                .get("controller-revision-hash") == current),
            "observedGeneration": generation(ds),
        }
        conditions = list((ds.get("status") or {}).get("conditions") or [])
        if failure:
            conditions = set_condition(conditions, "ReplicaFailure", "True", "FailedCreate",
                                       failure, now_rfc3339(now))
        elif len(scheduled) >= len(run):
            conditions = [c for c in conditions if c.get("type") != "ReplicaFailure"]
        if conditions:
            status["conditions"] = conditions
        got = self.writer.update_status(
            DAEMONSETS, ds, status,
            f"desired={len(run)} current={len(scheduled)} ready={status['numberReady']} "
            f"available={available} updated={status['updatedNumberScheduled']}")
        if got is not None and got is not ds:
            snap.replace(DAEMONSETS, got)
