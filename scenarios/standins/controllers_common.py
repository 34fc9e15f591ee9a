"""Shared pieces of the kube-controller-manager stand-in's workload controllers.

Python 3.11 standard library only. What is here:

- `Kind` and the kinds the controllers handle (their API paths).
- `Snapshot`: one round's view of the cluster (nodes, workloads, pods), listed owners before
  dependents and indexed by controller owner uid, kept current with the round's own writes.
- `Writer`: the writes a controller makes, one klog-style line each. A failure is logged (once
  while it repeats unchanged) and answered with None/False, never raised: one object's failure
  cannot stop the loop. A 409 conflict is left for the next round.
- Matching: label selectors, taints and tolerations, nodeSelector and required node affinity.
- Pod states (active, ready, available), owner references, conditions, the pod-template hash.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from component_common import ApiClient, ApiFailure, parse_rfc3339

Obj = dict[str, Any]
LOG = logging.getLogger("kube-controller-manager")


@dataclass(frozen=True)
class Kind:
    kind: str
    api_version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str = "", name: str = "", sub: str = "") -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        out = f"{base}/namespaces/{quote(namespace)}/{self.plural}" if namespace else \
            f"{base}/{self.plural}"
        if name:
            out += f"/{quote(name)}"
        return out + (f"/{sub}" if sub else "")


NODES = Kind("Node", "v1", "nodes", namespaced=False)
PODS = Kind("Pod", "v1", "pods")
DEPLOYMENTS = Kind("Deployment", "apps/v1", "deployments")
REPLICASETS = Kind("ReplicaSet", "apps/v1", "replicasets")
DAEMONSETS = Kind("DaemonSet", "apps/v1", "daemonsets")
JOBS = Kind("Job", "batch/v1", "jobs")
# Listed in this order: an owner is always listed before its dependents, so a dependent whose
# owner is missing from the snapshot was not created after the owner list was taken.
LISTED = (NODES, DEPLOYMENTS, DAEMONSETS, JOBS, REPLICASETS, PODS)


# --- small accessors ---------------------------------------------------------------------------


def meta(obj: Obj) -> Obj:
    out: Obj = obj.setdefault("metadata", {})
    return out


def key(obj: Obj) -> str:
    m = obj.get("metadata") or {}
    return f"{m['namespace']}/{m.get('name', '')}" if m.get("namespace") else m.get("name", "")


def uid(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("uid", ""))


def generation(obj: Obj) -> int:
    """metadata.generation; the stand-in apiserver sets it like the real one, so 1 then."""
    return int((obj.get("metadata") or {}).get("generation") or 1)


def created(obj: Obj) -> tuple[float, str]:
    """A sort key: creationTimestamp (oldest first), then name."""
    m = obj.get("metadata") or {}
    return parse_rfc3339(m.get("creationTimestamp") or "") or 0.0, m.get("name", "")


def deleting(obj: Obj) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def replicas(obj: Obj) -> int:
    value = (obj.get("spec") or {}).get("replicas")
    return 1 if value is None else int(value)


def now_rfc3339(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def controller_ref(obj: Obj) -> Obj | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return dict(ref)
    return None


def owner_ref(kind: Kind, owner: Obj) -> Obj:
    m = owner["metadata"]
    return {"apiVersion": kind.api_version, "kind": kind.kind, "name": m["name"],
            "uid": m["uid"], "controller": True, "blockOwnerDeletion": True}


# --- pods ----------------------------------------------------------------------------------------


def phase(pod: Obj) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def is_active(pod: Obj) -> bool:
    """Neither terminated (Succeeded/Failed) nor being deleted."""
    return phase(pod) not in ("Succeeded", "Failed") and not deleting(pod)


def condition(obj: Obj, ctype: str) -> Obj | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype:
            return dict(cond)
    return None


def is_ready(pod: Obj) -> bool:
    cond = condition(pod, "Ready")
    return phase(pod) == "Running" and cond is not None and cond.get("status") == "True" \
        and not deleting(pod)


def is_available(pod: Obj, min_ready_seconds: int, now: float) -> bool:
    """Ready for at least minReadySeconds (by the Ready condition's lastTransitionTime)."""
    if not is_ready(pod):
        return False
    if min_ready_seconds <= 0:
        return True
    since = parse_rfc3339((condition(pod, "Ready") or {}).get("lastTransitionTime") or "")
    return since is not None and now - since >= min_ready_seconds


def pod_from_template(template: Obj, owner_kind: Kind, owner: Obj, extra_labels: Obj,
                      node: str = "") -> Obj:
    """A Pod for `owner` from its pod template (generateName `<owner>-`)."""
    tmpl_meta = copy.deepcopy(template.get("metadata") or {})
    labels = {**(tmpl_meta.get("labels") or {}), **extra_labels}
    pod_meta: Obj = {"generateName": f"{owner['metadata']['name']}-",
                     "namespace": owner["metadata"].get("namespace", "default"),
                     "labels": labels, "ownerReferences": [owner_ref(owner_kind, owner)]}
    for field in ("annotations", "finalizers"):
        if tmpl_meta.get(field):
            pod_meta[field] = tmpl_meta[field]
    spec = copy.deepcopy(template.get("spec") or {})
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": spec}


# --- matching ------------------------------------------------------------------------------------


def _expression(labels: dict[str, str], key_: str, op: str, values: list[str]) -> bool:
    has, value = key_ in labels, labels.get(key_)
    if op == "In":
        return has and value in values
    if op == "NotIn":
        return not has or value not in values
    if op == "Exists":
        return has
    if op == "DoesNotExist":
        return not has
    if op in ("Gt", "Lt") and has and len(values) == 1:
        try:
            left, right = int(str(value)), int(values[0])
        except ValueError:
            return False
        return left > right if op == "Gt" else left < right
    return False


def selector_matches(selector: Obj | None, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector: None matches nothing, {} matches everything."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    return all(_expression(labels, e.get("key", ""), e.get("operator", ""),
                           list(e.get("values") or []))
               for e in selector.get("matchExpressions") or [])


def tolerates(tolerations: list[Obj], taint: Obj) -> bool:
    for tol in tolerations:
        if tol.get("effect") and tol.get("effect") != taint.get("effect"):
            continue
        op = tol.get("operator") or "Equal"
        if op == "Exists" and (not tol.get("key") or tol.get("key") == taint.get("key")):
            return True
        if op == "Equal" and tol.get("key") == taint.get("key") and \
                (tol.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def untolerated(pod_spec: Obj, node: Obj, effects: tuple[str, ...]) -> list[Obj]:
    """The node's taints with one of `effects` that the pod spec does not tolerate."""
    tolerations = pod_spec.get("tolerations") or []
    return [t for t in (node.get("spec") or {}).get("taints") or []
            if t.get("effect") in effects and not tolerates(tolerations, t)]


def node_matches(pod_spec: Obj, node: Obj) -> bool:
    """nodeSelector and required node affinity (matchExpressions on labels, matchFields on
    metadata.name); nodeSelectorTerms are ORed, the expressions of a term ANDed."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    for k, v in (pod_spec.get("nodeSelector") or {}).items():
        if labels.get(k) != v:
            return False
    required = (((pod_spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if required is None:
        return True
    fields = {"metadata.name": (node.get("metadata") or {}).get("name", "")}
    for term in required.get("nodeSelectorTerms") or []:
        exprs, field_exprs = term.get("matchExpressions") or [], term.get("matchFields") or []
        if not exprs and not field_exprs:
            continue  # an empty term matches no node
        if all(_expression(labels, e.get("key", ""), e.get("operator", ""),
                           list(e.get("values") or [])) for e in exprs) and \
                all(_expression(fields, e.get("key", ""), e.get("operator", ""),
                                list(e.get("values") or [])) for e in field_exprs):
            return True
    return False


# --- hashes, int-or-percent, conditions ----------------------------------------------------------

_ALPHANUMS = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand SafeEncodeString


def template_hash(template: Obj, collision_count: int = 0) -> str:
    """FNV-1a (32 bit) of the template, safe-encoded like the real pod-template-hash (the real
    one hashes Go's printed form, so the values differ; the shape is the same)."""
    data = json.dumps(template or {}, sort_keys=True, separators=(",", ":")).encode()
    if collision_count:
        data += collision_count.to_bytes(4, "little")
    value = 0x811C9DC5
    for byte in data:
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return "".join(_ALPHANUMS[b % len(_ALPHANUMS)] for b in str(value).encode())


def scaled(value: Any, total: int, round_up: bool, default: Any) -> int:
    """An int-or-percent (`1`, `"25%"`) against `total`."""
    value = default if value is None else value
    if isinstance(value, str) and value.endswith("%"):
        try:
            share = float(value[:-1]) * total / 100
        except ValueError:
            return 0
        return int(math.ceil(share) if round_up else math.floor(share))
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def set_condition(conditions: list[Obj], ctype: str, status: str, reason: str, message: str,
                  stamp: str, extra_times: tuple[str, ...] = ()) -> list[Obj]:
    """`conditions` with `ctype` set. lastTransitionTime changes only with the status; the
    `extra_times` (lastUpdateTime, lastProbeTime) whenever reason or message change."""
    old = next((c for c in conditions if c.get("type") == ctype), None)
    new: Obj = {"type": ctype, "status": status}
    if old and (old.get("status"), old.get("reason", ""), old.get("message", "")) == \
            (status, reason, message):
        new = dict(old)
    else:
        for field in extra_times:
            new[field] = stamp
        new["lastTransitionTime"] = old["lastTransitionTime"] if old and \
            old.get("status") == status and old.get("lastTransitionTime") else stamp
        if reason:
            new["reason"] = reason
        if message:
            new["message"] = message
    if old is None:
        return [*conditions, new]
    return [new if c is old else c for c in conditions]  # in place: the order stays


# --- the round's view ----------------------------------------------------------------------------


class Snapshot:
    """Everything one round looks at, indexed by controller owner uid."""

    def __init__(self, objects: dict[str, list[Obj]]) -> None:
        self._items = {k: list(v) for k, v in objects.items()}
        self._owned: dict[tuple[str, str], list[Obj]] = {}
        for kind_name, items in self._items.items():
            for obj in items:
                self._index(kind_name, obj)

    @classmethod
    def load(cls, client: ApiClient) -> Snapshot:
        """:raises ApiFailure: a list failed (the round is skipped)."""
        out = {}
        for kind in LISTED:
            got = client.call("GET", kind.path()) or {}
            out[kind.kind] = list(got.get("items") or [])
        return cls(out)

    def _index(self, kind_name: str, obj: Obj) -> None:
        ref = controller_ref(obj)
        if ref and ref.get("uid"):
            self._owned.setdefault((kind_name, str(ref["uid"])), []).append(obj)

    def items(self, kind: Kind) -> list[Obj]:
        return list(self._items.get(kind.kind, []))

    def owned(self, kind: Kind, owner: Obj) -> list[Obj]:
        """The `kind` objects whose controller ownerReference is `owner` (by uid)."""
        return list(self._owned.get((kind.kind, uid(owner)), []))

    def uids(self, kind: Kind) -> set[str]:
        return {uid(o) for o in self._items.get(kind.kind, [])}

    def add(self, kind: Kind, obj: Obj) -> None:
        self._items.setdefault(kind.kind, []).append(obj)
        self._index(kind.kind, obj)

    def replace(self, kind: Kind, obj: Obj) -> None:
        self.remove(kind, obj)
        self.add(kind, obj)

    def remove(self, kind: Kind, obj: Obj) -> None:
        gone = uid(obj)
        self._items[kind.kind] = [o for o in self._items.get(kind.kind, []) if uid(o) != gone]
        for owner, items in self._owned.items():
            if owner[0] == kind.kind:
                items[:] = [o for o in items if uid(o) != gone]


# --- writes --------------------------------------------------------------------------------------


class Writer:
    """API writes, each logged in one line; failures are logged and swallowed."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self._failing: dict[str, str] = {}  # what -> last error logged

    def failed(self, what: str, exc: BaseException | str) -> None:
        """Log a failure once while it repeats unchanged."""
        text = str(exc)
        code = getattr(exc, "code", 0)
        if code == 409:
            LOG.info(f'"Conflict, will retry next period" {what} err="{text}"')
            return
        if self._failing.get(what) != text:
            self._failing[what] = text
            LOG.error(f'"Failed" {what} err="{text}"')

    def _ok(self, what: str) -> None:
        if self._failing.pop(what, None) is not None:
            LOG.info(f'"Recovered" {what}')

    def create(self, kind: Kind, namespace: str, body: Obj, what: str) -> Obj | None:
        try:
            got = self.client.call("POST", kind.path(namespace), body)
        except ApiFailure as exc:
            self.failed(what, exc)
            return None
        self._ok(what)
        return got if isinstance(got, dict) else None

    def update(self, kind: Kind, obj: Obj, what: str, sub: str = "") -> Obj | None:
        """PUT (with the object's resourceVersion: a stale view is a 409, retried later)."""
        m = obj["metadata"]
        try:
            got = self.client.call("PUT", kind.path(m.get("namespace", ""), m["name"], sub), obj)
        except ApiFailure as exc:
            self.failed(what, exc)
            return None
        self._ok(what)
        return got if isinstance(got, dict) else None

    def delete(self, kind: Kind, obj: Obj, what: str) -> bool:
        """DELETE with the object's uid as precondition; already gone counts as done."""
        m = obj["metadata"]
        options = {"apiVersion": "v1", "kind": "DeleteOptions",
                   "preconditions": {"uid": m.get("uid", "")},
                   "propagationPolicy": "Background"}
        try:
            self.client.call("DELETE", kind.path(m.get("namespace", ""), m["name"]), options)
        except ApiFailure as exc:
            if exc.code == 404:
                return True
            self.failed(what, exc)
            return False
        self._ok(what)
        return True

    def get(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        """The object, or None when it is gone. :raises ApiFailure: any other failure."""
        try:
            got = self.client.call("GET", kind.path(namespace, name))
        except ApiFailure as exc:
            if exc.code == 404:
                return None
            raise
        return got if isinstance(got, dict) else None

    def update_status(self, kind: Kind, obj: Obj, status: Obj, summary: str) -> Obj | None:
        """PUT .../status when `status` differs from the object's; logged with `summary`."""
        if (obj.get("status") or {}) == status:
            return obj
        body = copy.deepcopy(obj)
        body["status"] = status
        got = self.update(kind, body, f'{kind.kind.lower()}="{key(obj)}" action="update status"',
                          "status")
        if got is not None:
            LOG.info(f'"Updated status" {kind.kind.lower()}="{key(obj)}" {summary}')
        return got
