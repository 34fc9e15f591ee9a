"""The kube-controller-manager stand-in's Job controller and its light garbage collector.

Python 3.11 standard library only.

The kubelet stand-in runs no containers: its pods go Running and stay so. The Job controller
therefore completes a Job pod itself once it has been Running and Ready for `complete_after`
seconds as the controller saw it (STANDIN_JOB_SECONDS, default 2): it writes the pod's status
as the kubelet would for a container that exited 0 (phase Succeeded, reason Completed). A pod
some other kubelet marks Succeeded or Failed is counted as such.

The garbage collector deletes ReplicaSets and pods all of whose owners (Deployment, ReplicaSet,
DaemonSet, Job) are gone, checked with a live GET of each owner before deleting.
"""

from __future__ import annotations

import copy

from component_common import parse_rfc3339
from controllers_apps import create_pods, delete_pod, each
from controllers_common import (
    DAEMONSETS,
    DEPLOYMENTS,
    JOBS,
    LOG,
    PODS,
    REPLICASETS,
    Kind,
    Obj,
    Snapshot,
    Writer,
    condition,
    created,
    deleting,
    is_active,
    is_ready,
    key,
    now_rfc3339,
    phase,
    pod_from_template,
    set_condition,
    uid,
)

PROBE = ("lastProbeTime",)


def _finished(job: Obj) -> str:
    """"Complete" or "Failed" once the Job has that condition True, else ""."""
    for ctype in ("Complete", "Failed"):
        if (condition(job, ctype) or {}).get("status") == "True":
            return ctype
    return ""


class JobController:
    """Pods for each Job until spec.completions (default 1) have succeeded.

    parallelism (default 1) pods run at once; backoffLimit (default 6) failed pods, or running
    longer than activeDeadlineSeconds, fail the Job; suspend deletes the active pods. Indexed
    completion, pod failure policies and ttlSecondsAfterFinished are not implemented.
    """

    def __init__(self, writer: Writer, complete_after: float) -> None:
        self.writer, self.complete_after = writer, complete_after
        self.ready_since: dict[str, float] = {}  # pod uid -> when first seen Running and Ready

    def sync(self, snap: Snapshot, now: float) -> None:
        each(JOBS, snap, self.writer, lambda job: self.sync_one(snap, job, now))
        live = snap.uids(PODS)
        for gone in set(self.ready_since) - live:
            del self.ready_since[gone]

    def sync_one(self, snap: Snapshot, job: Obj, now: float) -> None:
        spec, old_status = job.get("spec") or {}, job.get("status") or {}
        stamp = now_rfc3339(now)
        finished = _finished(job)
        for pod in snap.owned(PODS, job):
            if is_ready(pod) and not finished:
                first = self.ready_since.setdefault(uid(pod), now)
                if now - first >= self.complete_after:
                    self.complete_pod(snap, job, pod, stamp)
        pods = snap.owned(PODS, job)
        active = [p for p in pods if is_active(p)]
        # Counts never go down: a terminated pod deleted later stays counted (the real
        # controller tracks them with a finalizer; the stand-in keeps the highest count).
        succeeded = max(int(old_status.get("succeeded") or 0),
                        sum(1 for p in pods if phase(p) == "Succeeded"))
        failed = max(int(old_status.get("failed") or 0),
                     sum(1 for p in pods if phase(p) == "Failed"))
        conditions = list(old_status.get("conditions") or [])
        status: Obj = {k: v for k, v in old_status.items()
                       if k in ("startTime", "completionTime")}
        suspended = bool(spec.get("suspend"))
        if not finished:
            if not suspended and "startTime" not in status:
                status["startTime"] = stamp
            failure = self._failure(spec, status, failed, now)
            completions = spec.get("completions")
            done = succeeded >= (1 if completions is None else int(completions))
            if failure or done:
                for pod in active:
                    delete_pod(self.writer, snap, JOBS, job, pod,
                               "job failed" if failure else "job complete")
                active = []
                if failure:
                    conditions = set_condition(conditions, "Failed", "True", *failure, stamp,
                                               PROBE)
                else:
                    conditions = set_condition(conditions, "Complete", "True",
                                               "CompletionsReached",
                                               "Reached expected number of succeeded pods",
                                               stamp, PROBE)
                    status["completionTime"] = stamp
                LOG.info(f'"Job finished" job="{key(job)}" condition='
                         f'"{"Failed" if failure else "Complete"}" succeeded={succeeded} '
                         f"failed={failed}")
            else:
                active = self.manage(snap, job, active, succeeded, suspended)
                conditions = self._suspended(conditions, suspended, stamp)
        for name, value in (("active", len(active)), ("succeeded", succeeded),
                            ("failed", failed)):
            if value:
                status[name] = value
        status["ready"] = sum(1 for p in active if is_ready(p))
        if conditions:
            status["conditions"] = conditions
        got = self.writer.update_status(JOBS, job, status, f"active={len(active)} "
                                        f"succeeded={succeeded} failed={failed}")
        if got is not None and got is not job:
            snap.replace(JOBS, got)

    @staticmethod
    def _failure(spec: Obj, status: Obj, failed: int, now: float) -> tuple[str, str] | None:
        if failed > int(spec.get("backoffLimit", 6)):
            return "BackoffLimitExceeded", "Job has reached the specified backoff limit"
        deadline = spec.get("activeDeadlineSeconds")
        start = parse_rfc3339(status.get("startTime") or "")
        if deadline is not None and start is not None and now - start > int(deadline):
            return "DeadlineExceeded", "Job was active longer than specified deadline"
        return None

    @staticmethod
    def _suspended(conditions: list[Obj], suspended: bool, stamp: str) -> list[Obj]:
        if suspended:
            return set_condition(conditions, "Suspended", "True", "JobSuspended",
                                 "Job suspended", stamp, PROBE)
        if any(c.get("type") == "Suspended" and c.get("status") == "True" for c in conditions):
            return set_condition(conditions, "Suspended", "False", "JobResumed", "Job resumed",
                                 stamp, PROBE)
        return conditions

    def manage(self, snap: Snapshot, job: Obj, active: list[Obj], succeeded: int,
               suspended: bool) -> list[Obj]:
        """Create or delete pods so that as many run as parallelism and completions allow."""
        spec = job.get("spec") or {}
        parallelism = int(spec.get("parallelism", 1))
        completions = spec.get("completions")
        if suspended:
            want = 0
        elif completions is None:
            want = parallelism if succeeded == 0 else 0
        else:
            want = max(0, min(parallelism, int(completions) - succeeded))
        if len(active) < want:
            m = job["metadata"]
            labels = {"batch.kubernetes.io/controller-uid": m["uid"], "controller-uid": m["uid"],
                      "batch.kubernetes.io/job-name": m["name"], "job-name": m["name"]}
            body = pod_from_template(spec.get("template") or {}, JOBS, job, labels)
            create_pods(self.writer, snap, JOBS, job,
                        [copy.deepcopy(body) for _ in range(want - len(active))],
                        f"active {len(active)}, wanted {want}")
        elif len(active) > want:
            for pod in sorted(active, key=created, reverse=True)[:len(active) - want]:
                delete_pod(self.writer, snap, JOBS, job, pod,
                           "job suspended" if suspended else "too many active")
        return [p for p in snap.owned(PODS, job) if is_active(p)]

    def complete_pod(self, snap: Snapshot, job: Obj, pod: Obj, stamp: str) -> None:
        """The stand-in's shortcut: the pod's containers "exited 0"."""
        body = copy.deepcopy(pod)
        status = body.setdefault("status", {})
        status["phase"] = "Succeeded"
        conditions = list(status.get("conditions") or [])
        for ctype in ("Ready", "ContainersReady"):
            conditions = set_condition(conditions, ctype, "False", "PodCompleted", "", stamp)
        status["conditions"] = conditions
        for container in status.get("containerStatuses") or []:
            started = ((container.get("state") or {}).get("running") or {}).get("startedAt")
            container.update(ready=False, started=False, state={"terminated": {
                "exitCode": 0, "reason": "Completed", "startedAt": started or stamp,
                "finishedAt": stamp, "containerID": container.get("containerID", "")}})
        got = self.writer.update(PODS, body, f'job="{key(job)}" action="complete pod '
                                 f'{key(pod)}"', "status")
        if got is None:
            return
        snap.replace(PODS, got)
        LOG.info(f'"Pod succeeded (stand-in: Running and Ready for {self.complete_after:g}s)" '
                 f'pod="{key(pod)}" job="{key(job)}"')


# --- garbage collection --------------------------------------------------------------------------

OWNER_KINDS: dict[tuple[str, str], Kind] = {
    ("apps/v1", "Deployment"): DEPLOYMENTS, ("apps/v1", "ReplicaSet"): REPLICASETS,
    ("apps/v1", "DaemonSet"): DAEMONSETS, ("batch/v1", "Job"): JOBS,
}


class GarbageCollector:
    """Deletes ReplicaSets and pods whose every owner is gone (background propagation).

    Only owners of the kinds above are judged; a dependent with any other owner (a StatefulSet,
    a custom resource) is left alone. propagationPolicy Orphan/Foreground is not honoured: the
    stand-in apiserver deletes owners at once and sets no orphan/foregroundDeletion finalizer.
    """

    def __init__(self, writer: Writer) -> None:
        self.writer = writer

    def sync(self, snap: Snapshot, now: float) -> None:
        for dependent in (REPLICASETS, PODS):  # ReplicaSets first: their pods go this round
            present = {kind.kind: snap.uids(kind) for kind in OWNER_KINDS.values()}
            for obj in sorted(snap.items(dependent), key=key):
                if deleting(obj):
                    continue
                try:
                    self.collect(snap, dependent, obj, present)
                except Exception as exc:  # noqa: BLE001 - logged; the next object goes on
                    self.writer.failed(f'object="{key(obj)}" action="garbage collect"',
                                       f"{type(exc).__name__}: {exc}")

    def collect(self, snap: Snapshot, dependent: Kind, obj: Obj,
                present: dict[str, set[str]]) -> None:
        refs = (obj.get("metadata") or {}).get("ownerReferences") or []
        if not refs:
            return
        owners = []
        for ref in refs:
            kind = OWNER_KINDS.get((ref.get("apiVersion", ""), ref.get("kind", "")))
            if kind is None or str(ref.get("uid", "")) in present[kind.kind]:
                return  # an owner we do not judge, or one that is there
            owners.append((kind, ref))
        namespace = obj["metadata"].get("namespace", "")
        for kind, ref in owners:  # confirm: the list may be older than the owner
            live = self.writer.get(kind, namespace, ref.get("name", ""))
            if live is not None and uid(live) == ref.get("uid"):
                return
        what = f'{dependent.kind.lower()}="{key(obj)}" action="garbage collect"'
        if self.writer.delete(dependent, obj, what):
            snap.remove(dependent, obj)
            gone = ", ".join(f"{k.kind} {namespace}/{r.get('name')} ({r.get('uid')})"
                             for k, r in owners)
            LOG.info(f'"Deleted object whose owners are gone" {dependent.kind.lower()}='
                     f'"{key(obj)}" uid="{uid(obj)}" owners="{gone}" '
                     f'propagationPolicy="Background"')
