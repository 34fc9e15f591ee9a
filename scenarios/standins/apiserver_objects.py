"""Object helpers of the kube-apiserver stand-in: Status errors, selectors, patches, Tables.

Pure functions on JSON objects (dicts), no I/O. They follow the real API's documented
semantics closely enough for kubectl and rkel: `Status` failures with reason and code; label
selectors (equality and set-based) and field selectors (`=`, `==`, `!=` on any dotted field);
JSON merge patch (RFC 7386), a strategic merge patch that merges the usual keyed lists
(conditions by type, containers by name, ...) and JSON patch (RFC 6902); and the
`meta.k8s.io/v1` Table that `kubectl get` prints, with the real printers' columns for nodes,
pods, services, deployments, namespaces, configmaps and secrets, and Name/Age for everything else.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "ApiError", "allocate_service", "apply_patch", "field_selector_matches", "human_duration",
    "label_selector_matches", "now", "status_failure", "table",
]

Obj = dict[str, Any]

REASONS = {
    400: "BadRequest", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
    406: "NotAcceptable", 409: "Conflict", 410: "Expired", 415: "UnsupportedMediaType",
    422: "Invalid", 429: "TooManyRequests", 500: "InternalError", 504: "Timeout",
}


class ApiError(Exception):
    """A request failure that becomes a `Status` reply."""

    def __init__(self, code: int, message: str, reason: str = "", details: Obj | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason or REASONS.get(code, "Unknown")
        self.details = details


def status_failure(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    """A `Status` object as the real apiserver returns for a failure."""
    out: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}
    if details:
        out["details"] = details
    return out


def now() -> str:
    """The current time as Kubernetes writes timestamps (RFC 3339, seconds, UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age_seconds(timestamp: str) -> float:
    try:
        then = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except (TypeError, ValueError):
        return -1.0
    return (datetime.now(UTC) - then).total_seconds()


def human_duration(seconds: float) -> str:
    """apimachinery's duration.HumanDuration: 45s, 3m20s, 5h, 2d3h, 400d, 3y20d."""
    if seconds < -1:
        return "<invalid>"
    s = max(int(seconds), 0)
    minutes, hours, days = s // 60, s // 3600, s // 86400
    if s < 120:
        return f"{s}s"
    if minutes < 10:
        return f"{minutes}m" if s % 60 == 0 else f"{minutes}m{s % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h" if minutes % 60 == 0 else f"{hours}h{minutes % 60}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 192:
        return f"{days}d" if hours % 24 == 0 else f"{days}d{hours % 24}h"
    if days < 365 * 2:
        return f"{days}d"
    if days < 365 * 8:
        years = days // 365
        return f"{years}y" if days % 365 == 0 else f"{years}y{days % 365}d"
    return f"{days // 365}y"


# --- selectors -------------------------------------------------------------------------------


def _split_requirements(selector: str) -> list[str]:
    """Split on commas that are not inside parentheses (`a in (x,y),b`)."""
    parts, depth, current = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


_SET_REQ = re.compile(r"^([^\s!=()]+)\s+(in|notin)\s+\((.*)\)$")


def _label_requirement(req: str, labels: dict[str, str]) -> bool:
    match = _SET_REQ.match(req)
    if match:
        key, op, values = match.groups()
        wanted = {v.strip() for v in values.split(",")}
        return (labels.get(key) in wanted) if op == "in" else (labels.get(key) not in wanted)
    for op in ("!=", "==", "="):
        if op in req:
            key, value = (part.strip() for part in req.split(op, 1))
            return labels.get(key) != value if op == "!=" else labels.get(key) == value
    if req.startswith("!"):
        return req[1:].strip() not in labels
    if re.fullmatch(r"[A-Za-z0-9._/-]+", req):
        return req in labels
    raise ApiError(400, f"unable to parse requirement: {req!r}")


def label_selector_matches(selector: str, obj: Obj) -> bool:
    """Whether `obj`'s labels satisfy `selector` (`a=b,c!=d,e in (f,g),!h,i`)."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(_label_requirement(req, labels) for req in _split_requirements(selector))


def field_value(obj: Obj, dotted: str) -> str:
    """A field by dotted path as a selector compares it (missing -> "", booleans lower-case)."""
    value: Any = obj
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def field_selector_matches(selector: str, obj: Obj) -> bool:
    """Whether `obj` satisfies a field selector (`spec.nodeName=n1,metadata.name!=x`)."""
    for req in _split_requirements(selector):
        for op in ("!=", "==", "="):
            if op in req:
                key, value = (part.strip() for part in req.split(op, 1))
                got = field_value(obj, key)
                if (got == value) == (op == "!="):
                    return False
                break
        else:
            raise ApiError(400, f"invalid field selector: {req!r}")
    return True


# --- patches ---------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


# Keyed lists the real strategic merge patch merges (field name -> merge key).
MERGE_KEYS = {
    "conditions": "type", "addresses": "type", "containers": "name", "initContainers": "name",
    "ephemeralContainers": "name", "volumes": "name", "volumeMounts": "mountPath",
    "env": "name", "ports": "containerPort", "imagePullSecrets": "name",
    "containerStatuses": "name", "initContainerStatuses": "name", "tolerations": "key",
    "ownerReferences": "uid", "images": "names", "volumesAttached": "name",
}


def _merge_list(field: str, target: Any, patch: list[Any]) -> list[Any]:
    key = MERGE_KEYS.get(field)
    if not key or not isinstance(target, list) or not all(isinstance(p, dict) for p in patch):
        return [strategic_merge_patch(None, p) if isinstance(p, dict) else p for p in patch]
    out = [copy.deepcopy(item) for item in target]
    for item in patch:
        index = next((i for i, old in enumerate(out)
                      if isinstance(old, dict) and old.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if index is not None:
                out.pop(index)
        elif index is None:
            out.append(strategic_merge_patch(None, item))
        else:
            out[index] = strategic_merge_patch(out[index], item)
    return out


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """A strategic merge patch: a merge patch whose known keyed lists merge by their key.

    Directives: `$patch: replace|delete` on a map, `$patch: delete` on a list item; the
    `$setElementOrder/...`, `$retainKeys` and `$deleteFromPrimitiveList/...` hints are dropped.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if not k.startswith("$")}
    if directive == "delete":
        return None
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            out.pop(key, None)
        elif isinstance(value, list):
            out[key] = _merge_list(key, out.get(key), value)
        else:
            merged = strategic_merge_patch(out.get(key), value)
            if merged is None:
                out.pop(key, None)
            else:
                out[key] = merged
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(doc, list):
            doc = doc[int(part)]
        elif isinstance(doc, dict):
            doc = doc[part]
        else:
            raise KeyError(part)
    return doc


def _json_patch_op(doc: Any, op: Obj) -> Any:
    kind, parts = op.get("op"), _pointer(str(op.get("path", "")))
    if kind in ("move", "copy"):
        value = copy.deepcopy(_walk(doc, _pointer(str(op.get("from", "")))))
        if kind == "move":
            doc = _json_patch_op(doc, {"op": "remove", "path": op.get("from")})
        return _json_patch_op(doc, {"op": "add", "path": op["path"], "value": value})
    if kind == "test":
        if _walk(doc, parts) != op.get("value"):
            raise ApiError(422, f"the test of {op.get('path')} failed")
        return doc
    if not parts:
        return copy.deepcopy(op.get("value")) if kind in ("add", "replace") else None
    parent, last = _walk(doc, parts[:-1]), parts[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if kind == "add":
            parent.insert(index, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            parent.pop(index)
        elif kind == "replace":
            parent[index] = copy.deepcopy(op.get("value"))
    elif kind == "add" or (kind == "replace" and last in parent):
        parent[last] = copy.deepcopy(op.get("value"))
    elif kind == "remove" and last in parent:
        del parent[last]
    else:
        raise ApiError(422, f"{kind} operation does not apply: doc is missing path: {op['path']}")
    return doc


def json_patch(target: Obj, ops: Any) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test)."""
    if not isinstance(ops, list):
        raise ApiError(400, "a JSON patch must be a list of operations")
    doc = copy.deepcopy(target)
    for op in ops:
        try:
            doc = _json_patch_op(doc, op)
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise ApiError(422, f"the JSON patch cannot be applied: {op!r}: {exc}") from None
    return doc


def apply_patch(content_type: str, target: Obj, patch: Any) -> Obj:
    """`patch` applied to `target` according to the PATCH request's Content-Type."""
    if content_type == "application/json-patch+json":
        result = json_patch(target, patch)
    elif content_type == "application/merge-patch+json":
        result = merge_patch(target, patch)
    elif content_type == "application/strategic-merge-patch+json":
        result = strategic_merge_patch(target, patch)
    else:
        raise ApiError(415, f"the body of the request was in an unknown format - accepted "
                       f"media types include: application/json-patch+json, "
                       f"application/merge-patch+json, application/apply-patch+yaml, "
                       f"application/strategic-merge-patch+json (got {content_type!r})")
    if not isinstance(result, dict):
        raise ApiError(422, "the patch does not leave an object")
    return result


# --- per-resource defaults ---------------------------------------------------------------------


def allocate_service(svc: Obj, existing: list[Obj], cidr: str, node_ports: tuple[int, int]
                     ) -> None:
    """Give a new Service a cluster IP from `cidr` (--service-cluster-ip-range; its first IP
    is the `kubernetes` Service's) and node ports from `node_ports` (--service-node-port-range),
    skipping those `existing` Services hold; refuse a node port outside the range."""
    spec = svc.setdefault("spec", {})
    used_ips = {(o.get("spec") or {}).get("clusterIP") for o in existing}
    used_ports = {p.get("nodePort") for o in existing
                  for p in (o.get("spec") or {}).get("ports") or []}
    if spec.get("type") != "ExternalName" and not spec.get("clusterIP"):
        network = ipaddress.ip_network(cidr, strict=False)
        free = next((str(ip) for ip in network.hosts()
                     if str(ip) not in used_ips and ip != network.network_address + 1), None)
        if free is None:
            raise ApiError(500, "Internal error occurred: failed to allocate a serviceIP: "
                           "range is full", "InternalError")
        spec["clusterIP"], spec["clusterIPs"] = free, [free]
    low, high = node_ports
    for port in spec.get("ports") or []:
        if port.get("nodePort") and not low <= int(port["nodePort"]) <= high:
            raise ApiError(422, f"Service \"{svc['metadata'].get('name')}\" is invalid: "
                           f"spec.ports.nodePort: Invalid value: {port['nodePort']}: provided "
                           f"port is not in the valid range. The range of valid ports is "
                           f"{low}-{high}", "Invalid")
        if spec.get("type") in ("NodePort", "LoadBalancer") and not port.get("nodePort"):
            free_port = next((p for p in range(low, high + 1) if p not in used_ports), None)
            if free_port is None:
                raise ApiError(500, "Internal error occurred: failed to allocate a nodePort: "
                               "range is full", "InternalError")
            port["nodePort"] = free_port
            used_ports.add(free_port)


# --- Tables ----------------------------------------------------------------------------------


def _column(name: str, kind: str = "string", fmt: str = "", priority: int = 0) -> Obj:
    return {"name": name, "type": kind, "format": fmt, "description": name, "priority": priority}


def _node_status(node: Obj) -> str:
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), None)
    text = "Unknown"
    if ready is not None:
        text = "Ready" if ready.get("status") == "True" else "NotReady"
    if (node.get("spec") or {}).get("unschedulable"):
        text += ",SchedulingDisabled"
    return text


def _node_roles(node: Obj) -> str:
    labels = (node.get("metadata") or {}).get("labels") or {}
    roles = {k.split("/", 1)[1] for k in labels
             if k.startswith("node-role.kubernetes.io/") and k.split("/", 1)[1]}
    if labels.get("kubernetes.io/role"):
        roles.add(labels["kubernetes.io/role"])
    return ",".join(sorted(roles)) or "<none>"


def _address(node: Obj, kind: str) -> str:
    addresses = (node.get("status") or {}).get("addresses") or []
    return next((a.get("address", "") for a in addresses if a.get("type") == kind), "<none>")


def _node_row(node: Obj) -> list[Any]:
    info = (node.get("status") or {}).get("nodeInfo") or {}
    return [node["metadata"].get("name", ""), _node_status(node), _node_roles(node),
            _age(node), info.get("kubeletVersion", ""), _address(node, "InternalIP"),
            _address(node, "ExternalIP"), info.get("osImage", "<unknown>"),
            info.get("kernelVersion", "<unknown>"), info.get("containerRuntimeVersion", "")]


def _pod_row(pod: Obj) -> list[Any]:
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for c in statuses if c.get("ready"))
    restarts = sum(int(c.get("restartCount", 0)) for c in statuses)
    phase = status.get("reason") or status.get("phase") or "Pending"
    if pod["metadata"].get("deletionTimestamp"):
        phase = "Terminating"
    return [pod["metadata"].get("name", ""), f"{ready}/{len(spec.get('containers') or [])}",
            phase, restarts, _age(pod), status.get("podIP") or "<none>",
            spec.get("nodeName") or "<none>"]


def _age(obj: Obj) -> str:
    return human_duration(_age_seconds((obj.get("metadata") or {}).get("creationTimestamp", "")))


def _service_row(svc: Obj) -> list[Any]:
    spec = svc.get("spec") or {}
    ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    external = [i.get("ip") or i.get("hostname", "") for i in ingress] + list(
        spec.get("externalIPs") or [])
    ports = ",".join(
        f"{p.get('port')}{':' + str(p['nodePort']) if p.get('nodePort') else ''}/"
        f"{p.get('protocol', 'TCP')}" for p in spec.get("ports") or [])
    return [svc["metadata"].get("name", ""), spec.get("type", "ClusterIP"),
            spec.get("clusterIP") or "<none>", ",".join(external) or "<none>",
            ports or "<none>", _age(svc)]


def _deployment_row(deploy: Obj) -> list[Any]:
    status = deploy.get("status") or {}
    wanted = (deploy.get("spec") or {}).get("replicas", 1)
    return [deploy["metadata"].get("name", ""), f"{status.get('readyReplicas', 0)}/{wanted}",
            status.get("updatedReplicas", 0), status.get("availableReplicas", 0), _age(deploy)]


PRINTERS: dict[str, tuple[list[Obj], Any]] = {
    "nodes": (
        [_column("Name", fmt="name"), _column("Status"), _column("Roles"), _column("Age"),
         _column("Version"), _column("Internal-IP", priority=1),
         _column("External-IP", priority=1), _column("OS-Image", priority=1),
         _column("Kernel-Version", priority=1), _column("Container-Runtime", priority=1)],
        _node_row,
    ),
    "pods": (
        [_column("Name", fmt="name"), _column("Ready"), _column("Status"),
         _column("Restarts", "integer"), _column("Age"), _column("IP", priority=1),
         _column("Node", priority=1)],
        _pod_row,
    ),
    "namespaces": (
        [_column("Name", fmt="name"), _column("Status"), _column("Age")],
        lambda o: [o["metadata"].get("name", ""),
                   (o.get("status") or {}).get("phase", "Active"), _age(o)],
    ),
    "services": (
        [_column("Name", fmt="name"), _column("Type"), _column("Cluster-IP"),
         _column("External-IP"), _column("Port(s)"), _column("Age")],
        _service_row,
    ),
    "deployments": (
        [_column("Name", fmt="name"), _column("Ready"), _column("Up-to-date", "integer"),
         _column("Available", "integer"), _column("Age")],
        _deployment_row,
    ),
    "secrets": (
        [_column("Name", fmt="name"), _column("Type"), _column("Data", "integer"),
         _column("Age")],
        lambda o: [o["metadata"].get("name", ""), o.get("type", "Opaque"),
                   len(o.get("data") or {}), _age(o)],
    ),
    "configmaps": (
        [_column("Name", fmt="name"), _column("Data", "integer"), _column("Age")],
        lambda o: [o["metadata"].get("name", ""),
                   len(o.get("data") or {}) + len(o.get("binaryData") or {}), _age(o)],
    ),
}
GENERIC = ([_column("Name", fmt="name"), _column("Age")],
           lambda o: [(o.get("metadata") or {}).get("name", ""), _age(o)])


def partial_metadata(obj: Obj) -> Obj:
    """The object as a meta.k8s.io/v1 PartialObjectMetadata (its metadata only)."""
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
            "metadata": copy.deepcopy(obj.get("metadata") or {})}


def table(resource: str, objects: list[Obj], resource_version: str, include: str) -> Obj:
    """A meta.k8s.io/v1 Table of `objects`, as `kubectl get` asks for (`as=Table`).

    :param include: the request's includeObject: None, Metadata (the default) or Object.
    """
    columns, row_of = PRINTERS.get(resource, GENERIC)
    rows = []
    for obj in objects:
        row: Obj = {"cells": row_of(obj)}
        if include == "Object":
            row["object"] = obj
        elif include != "None":
            row["object"] = partial_metadata(obj)
        rows.append(row)
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": columns, "rows": rows}
