"""The REST API of the kube-apiserver stand-in: routing, verbs and per-resource rules.

`Api.handle` takes one authenticated request and returns the reply, as the real server would:
discovery, `/version`, health; get/list (label and field selectors, limit/continue, Tables for
kubectl) / create / update / patch (JSON, merge, strategic merge) / server-side apply / delete /
deletecollection on any resource path, cluster-scoped or namespaced; the `status` subresource;
`pods/eviction` and `pods/binding`; SelfSubjectAccessReview; `metadata.generation`.
Authorization and NodeRestriction come from `apiserver_kinds`, storage from `apiserver_store`.
Watches are refused (405): clients of the stand-in poll.

Known simplifications: server-side apply replaces the object with the applied manifest
(keeping uid, creationTimestamp and, if the manifest has none, status) instead of merging by
field manager; deletion is immediate (no grace period) unless finalizers are set; admission
plugins other than NamespaceLifecycle and NodeRestriction are not run.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from apiserver_kinds import (
    NODE_GRAPH,
    RESOURCES,
    Attributes,
    Resource,
    User,
    api_group,
    api_group_list,
    authorize,
    crd_resources,
    forbidden_message,
    node_restriction,
    openapi_group_version,
    openapi_root,
    pod_references,
    resource_list,
)
from apiserver_objects import (
    ApiError,
    allocate_service,
    apply_patch,
    field_selector_matches,
    label_selector_matches,
    now,
    partial_metadata,
    table,
)
from apiserver_store import Storage, conflict, not_found, qualified

__all__ = ["Api", "Reply", "Request", "ServerInfo"]

Obj = dict[str, Any]
PROTECTED_NAMESPACES = ("default", "kube-system", "kube-public")
APPLY = "application/apply-patch+yaml"
NS_RESOURCE = next(r for r in RESOURCES if r.name == "namespaces")
PODS = next(r for r in RESOURCES if r.name == "pods")
PVCS = next(r for r in RESOURCES if r.name == "persistentvolumeclaims")


@dataclass(frozen=True)
class Request:
    """One authenticated HTTP request."""

    method: str
    path: str
    query: dict[str, str]
    user: User
    accept: str = ""
    content_type: str = ""
    body: bytes = b""


@dataclass
class Reply:
    code: int
    body: bytes
    content_type: str = "application/json"


@dataclass(frozen=True)
class ServerInfo:
    """What the flags and the image say about this server."""

    version: Obj
    modes: tuple[str, ...]
    service_cidrs: tuple[str, ...]
    node_ports: tuple[int, int]
    advertise: str
    port: int


@dataclass(frozen=True)
class Target:
    """The object or collection a resource request addresses."""

    res: Resource
    namespace: str
    name: str
    subresource: str
    verb: str
    attrs: Attributes = field(compare=False)


def json_reply(code: int, obj: Any) -> Reply:
    return Reply(code, json.dumps(obj, separators=(",", ":")).encode() + b"\n")


def success_status(code: int, details: Obj | None = None) -> Obj:
    out: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "code": code}
    if details:
        out["details"] = details
    return out


def _meta(obj: Obj) -> Obj:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = obj["metadata"] = {}
    return meta


def _parse_json(req: Request) -> Any:
    try:
        return json.loads(req.body or b"null")
    except (ValueError, UnicodeDecodeError):
        if req.content_type in (APPLY, "application/yaml"):
            raise ApiError(415, "the kube-apiserver stand-in accepts YAML bodies only when they "
                           "are JSON (which is YAML): send the manifest as JSON") from None
        raise ApiError(400, "the body of the request is not valid JSON") from None


def _beyond_metadata(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "apiVersion", "kind")}


def _set_generation(t: Target, old: Obj, new: Obj) -> None:
    """metadata.generation belongs to the server, whatever the client sent: it is 1 on create
    and goes up by 1 when a write through the main resource changes the object beyond its
    metadata. Status counts only where it is not a subresource: elsewhere `_carry_over` has
    already put the old status back. That is the rule of the real custom-resource strategy.
    Subresources (status, approval, finalize) never change it."""
    generation = int(old["metadata"].get("generation") or 1)
    if not t.subresource and _beyond_metadata(new) != _beyond_metadata(old):
        generation += 1
    _meta(new)["generation"] = generation


def _wants(accept: str, kind: str) -> bool:
    return any(f"as={kind}" in part.replace(" ", "") for part in accept.split(","))


class Api:
    """The REST semantics, independent of HTTP and TLS."""

    def __init__(self, storage: Storage, info: ServerInfo,
                 health: Callable[[str, bool], tuple[int, str]]) -> None:
        self.storage = storage
        self.info = info
        self.health = health
        self._crds: tuple[float, list[Resource]] = (0.0, [])
        self._lock = threading.Lock()

    # --- entry ---------------------------------------------------------------------------------

    def handle(self, req: Request) -> Reply:
        """The reply to `req`; every failure is a Status object."""
        try:
            return self._route(req)
        except ApiError as exc:
            return json_reply(exc.code, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                         "status": "Failure", "message": str(exc),
                                         "reason": exc.reason, "code": exc.code,
                                         **({"details": exc.details} if exc.details else {})})

    def _route(self, req: Request) -> Reply:
        path = req.path.rstrip("/") or "/"
        parts = [urllib.parse.unquote(p) for p in path.split("/")[1:]]
        if parts[0] in ("healthz", "livez", "readyz"):
            self._allow(req, Attributes("get", path=path, resource_request=False))
            code, text = self.health(path, "verbose" in req.query)
            return Reply(code, text.encode(), "text/plain; charset=utf-8")
        if parts[0] in ("api", "apis"):
            return self._api(req, path, parts)
        self._allow(req, Attributes("get", path=path, resource_request=False))
        if path == "/version":
            return json_reply(200, self.info.version)
        if path == "/openapi/v3":
            return json_reply(200, openapi_root(self.resources()))
        if path.startswith("/openapi/v3/"):
            doc = openapi_group_version(path[len("/openapi/v3/"):], self.resources(),
                                        self.info.version["gitVersion"])
            if doc is not None:
                return json_reply(200, doc)
        if path == "/":
            return json_reply(200, {"paths": ["/api", "/api/v1", "/apis", "/healthz",
                                              "/livez", "/readyz", "/version"]})
        raise ApiError(404, "the server could not find the requested resource")

    def _allow(self, req: Request, attrs: Attributes) -> None:
        if not authorize(req.user, attrs, list(self.info.modes), self._related):
            raise ApiError(403, forbidden_message(req.user, attrs), "Forbidden",
                           {"name": attrs.name, "group": attrs.group, "kind": attrs.resource}
                           if attrs.resource_request else None)

    # --- discovery -----------------------------------------------------------------------------

    def resources(self) -> list[Resource]:
        """Built-in resources plus those of stored CRDs (re-read at most every 2 s)."""
        with self._lock:
            stamp, cached = self._crds
        if time.monotonic() - stamp > 2.0:
            crd = next(r for r in RESOURCES if r.name == "customresourcedefinitions")
            try:
                items, _ = self.storage.list(crd, "")
                cached = crd_resources([obj for _, obj in items])
            except ApiError:
                cached = []
            with self._lock:
                self._crds = (time.monotonic(), cached)
        return [*RESOURCES, *cached]

    def _discovery(self, req: Request, path: str, parts: list[str]) -> Reply:
        self._allow(req, Attributes("get", path=path, resource_request=False))
        if req.method != "GET":
            raise ApiError(405, "the server does not allow this method on the requested "
                           "resource")
        resources = self.resources()
        if path == "/api":
            return json_reply(200, {"kind": "APIVersions", "versions": ["v1"],
                                    "serverAddressByClientCIDRs": [{
                                        "clientCIDR": "0.0.0.0/0",
                                        "serverAddress": f"{self.info.advertise}:"
                                                         f"{self.info.port}"}]})
        if path == "/api/v1":
            return json_reply(200, resource_list("v1", resources))
        if path == "/apis":
            return json_reply(200, api_group_list(resources))
        group = api_group(parts[1], resources)
        if group is not None and len(parts) == 2:
            return json_reply(200, group)
        gv = "/".join(parts[1:3])
        if group is not None and any(r.group_version == gv for r in resources):
            return json_reply(200, resource_list(gv, resources))
        raise ApiError(404, "the server could not find the requested resource")

    # --- resource requests ---------------------------------------------------------------------

    def _api(self, req: Request, path: str, parts: list[str]) -> Reply:
        core = parts[0] == "api"
        if core and len(parts) >= 2 and parts[1] != "v1":
            raise ApiError(404, "the server could not find the requested resource")
        base = 2 if core else 3
        if len(parts) <= base:
            return self._discovery(req, path, parts)
        group, version = ("", "v1") if core else (parts[1], parts[2])
        rest = parts[base:]
        if rest[0] == "watch" or req.query.get("watch") in ("true", "1"):
            raise ApiError(405, "watch is not supported by the kube-apiserver stand-in; "
                           "poll with list instead", "MethodNotAllowed")
        target = self._target(req, group, version, rest)
        self._allow(req, target.attrs)
        return self._dispatch(req, target)

    def _resource(self, group: str, version: str, name: str, namespaced: bool) -> Resource:
        for res in self.resources():
            if (res.group, res.version, res.name) == (group, version, name):
                return res
        if any((r.group, r.name) == (group, name) for r in self.resources()) or not name:
            raise ApiError(404, "the server could not find the requested resource")
        # Any other resource: stored as-is (server-side apply of arbitrary manifests).
        return Resource(group, version, name, "", namespaced,
                        storage=f"{group}/{name}" if group else name)

    def _target(self, req: Request, group: str, version: str, rest: list[str]) -> Target:
        namespace = ""
        if rest[0] == "namespaces" and len(rest) >= 3 and not (
                len(rest) == 3 and rest[2] in ("status", "finalize")):
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise ApiError(404, "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        res = self._resource(group, version, rest[0], bool(namespace))
        if namespace and not res.namespaced:
            raise ApiError(404, "the server could not find the requested resource")
        if sub and sub not in res.subresources:
            raise ApiError(404, "the server could not find the requested resource")
        if req.method == "POST" and name and sub not in ("eviction", "binding"):
            raise ApiError(405, "the server does not allow this method on the requested "
                           "resource")
        verb = self._verb(req.method, name, res, namespace)
        attrs = Attributes(verb, req.path, res.group, res.name, sub, namespace, name)
        return Target(res, namespace, name, sub, verb, attrs)

    @staticmethod
    def _verb(method: str, name: str, res: Resource, namespace: str) -> str:
        verbs = {"GET": "get" if name else "list", "POST": "create" if not name else "",
                 "PUT": "update", "PATCH": "patch",
                 "DELETE": "delete" if name else "deletecollection"}
        verb = verbs.get(method, "")
        if method == "POST" and name:
            verb = "create"  # a subresource (eviction, binding) is created
        if not verb or (verb in ("update", "patch") and not name):
            raise ApiError(405, "the server does not allow this method on the requested "
                           "resource")
        if res.namespaced and not namespace and verb not in ("list", "deletecollection"):
            raise ApiError(405, "the server does not allow this method on the requested "
                           "resource")
        if verb not in res.verbs:
            raise ApiError(405, "the server does not allow this method on the requested "
                           "resource")
        return verb

    def _dispatch(self, req: Request, t: Target) -> Reply:
        if t.res.name in ("selfsubjectaccessreviews", "subjectaccessreviews"):
            return self._access_review(req, t)
        if t.subresource in ("eviction", "binding"):
            return self._evict(req, t) if t.subresource == "eviction" else self._bind(req, t)
        handler = {"get": self._get, "list": self._list, "create": self._create,
                   "update": self._update, "patch": self._patch, "delete": self._delete,
                   "deletecollection": self._delete_collection}[t.verb]
        return handler(req, t)

    # --- reads ---------------------------------------------------------------------------------

    def _render(self, req: Request, t: Target, objects: list[Obj], rv: str,
                single: bool, cont: str = "") -> Reply:
        if _wants(req.accept, "Table"):
            doc = table(t.res.name, objects, rv, req.query.get("includeObject", "Metadata"))
            if cont:
                doc["metadata"]["continue"] = cont
            return json_reply(200, doc)
        if _wants(req.accept, "PartialObjectMetadata"):
            if single:
                return json_reply(200, partial_metadata(objects[0]))
            items = [partial_metadata(o) for o in objects]
            return json_reply(200, {"kind": "PartialObjectMetadataList",
                                    "apiVersion": "meta.k8s.io/v1",
                                    "metadata": {"resourceVersion": rv}, "items": items})
        if req.accept and not any(m in req.accept for m in ("json", "*/*", "application/*")):
            raise ApiError(406, f"only the following media types are accepted: "
                           f"application/json (got {req.accept!r})")
        if single:
            return json_reply(200, objects[0])
        meta: Obj = {"resourceVersion": rv, **({"continue": cont} if cont else {})}
        kind = f"{t.res.kind}List" if t.res.kind else "List"
        return json_reply(200, {"kind": kind, "apiVersion": t.res.api_version,
                                "metadata": meta, "items": objects})

    def _get(self, req: Request, t: Target) -> Reply:
        obj = self.storage.must_get(t.res, t.namespace, t.name)
        return self._render(req, t, [obj], obj["metadata"]["resourceVersion"], True)

    def _select(self, req: Request, items: list[tuple[str, Obj]]) -> list[tuple[str, Obj]]:
        labels, fields = req.query.get("labelSelector", ""), req.query.get("fieldSelector", "")
        return [(key, obj) for key, obj in items
                if (not labels or label_selector_matches(labels, obj))
                and (not fields or field_selector_matches(fields, obj))]

    def _list(self, req: Request, t: Target) -> Reply:
        revision, start = 0, ""
        if req.query.get("continue"):
            try:
                token = json.loads(base64.urlsafe_b64decode(req.query["continue"]))
                revision, start = int(token["rv"]), str(token["start"])
            except (ValueError, KeyError, TypeError):
                raise ApiError(400, "continue key is not valid") from None
        items, rev = self.storage.list(t.res, t.namespace, revision, start)
        rev = revision or rev
        matched = self._select(req, items)
        limit = int(req.query.get("limit") or 0)
        cont = ""
        if limit > 0 and len(matched) > limit:
            matched = matched[:limit]
            token = {"rv": rev, "start": matched[-1][0] + "\x00"}
            cont = base64.urlsafe_b64encode(json.dumps(token).encode()).decode()
        return self._render(req, t, [obj for _, obj in matched], str(rev), False, cont)

    # --- writes --------------------------------------------------------------------------------

    def _body_object(self, req: Request, t: Target) -> Obj:
        obj = _parse_json(req)
        if not isinstance(obj, dict):
            raise ApiError(400, "the body of the request must be a JSON object")
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if t.res.kind and kind and kind != t.res.kind and not t.subresource:
            raise ApiError(400, f"the kind in the data ({kind}) does not match the expected "
                           f"kind ({t.res.kind})")
        obj.setdefault("apiVersion", api_version or t.res.api_version)
        if t.res.kind:
            obj.setdefault("kind", t.res.kind)
        meta = _meta(obj)
        if t.namespace:
            if meta.get("namespace", t.namespace) != t.namespace:
                raise ApiError(400, "the namespace of the provided object does not match the "
                               "namespace sent on the request")
            meta["namespace"] = t.namespace
        elif not t.res.namespaced:
            meta.pop("namespace", None)  # cluster-scoped: a namespace in the data means nothing
        if t.name and meta.get("name", t.name) != t.name:
            raise ApiError(400, f"the name of the object ({meta.get('name')}) does not match "
                           f"the name on the URL ({t.name})")
        if t.name:
            meta["name"] = t.name
        return obj

    def _admit(self, req: Request, t: Target, obj: Obj | None) -> None:
        reason = node_restriction(req.user, t.attrs, obj)
        if reason:
            name = t.name or ((obj or {}).get("metadata") or {}).get("name", "")
            raise ApiError(403, f'{qualified(t.res)} "{name}" is forbidden: {reason}',
                           "Forbidden", {"name": name, "kind": t.res.name})

    def _namespace_exists(self, t: Target) -> None:
        if t.res.namespaced and self.storage.get(NS_RESOURCE, "", t.namespace) is None:
            raise not_found(NS_RESOURCE, t.namespace)

    def _create(self, req: Request, t: Target) -> Reply:
        obj = self._body_object(req, t)
        meta = _meta(obj)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if not meta.get("name"):
            raise ApiError(422, f'{t.res.kind or t.res.name} "" is invalid: metadata.name: '
                           "Required value: name or generateName is required", "Invalid")
        self._admit(req, t, obj)
        self._namespace_exists(t)
        self._defaults_on_create(t.res, obj)
        if req.query.get("dryRun") == "All":
            return json_reply(201, obj)
        return json_reply(201, self.storage.create(t.res, obj))

    def _defaults_on_create(self, res: Resource, obj: Obj) -> None:
        meta = obj["metadata"]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now()
        meta["generation"] = 1  # the server's: whatever the client sent is ignored
        meta.pop("resourceVersion", None)
        if res.group == "" and res.name == "pods":
            obj.setdefault("status", {}).setdefault("phase", "Pending")
        if res.group == "" and res.name == "namespaces":
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj.setdefault("status", {})["phase"] = "Active"
        if res.group == "" and res.name == "services":
            self._allocate_service(obj)
        self._defaults_on_write(res, obj)

    @staticmethod
    def _defaults_on_write(res: Resource, obj: Obj) -> None:
        if res.group == "" and res.name == "secrets":
            obj.setdefault("type", "Opaque")
            for key, value in (obj.pop("stringData", None) or {}).items():
                obj.setdefault("data", {})[key] = base64.b64encode(str(value).encode()).decode()

    def _allocate_service(self, svc: Obj) -> None:
        items, _ = self.storage.list(next(r for r in RESOURCES if r.name == "services"), "")
        allocate_service(svc, [o for _, o in items], self.info.service_cidrs[0],
                         self.info.node_ports)

    def _carry_over(self, t: Target, old: Obj, new: Obj) -> Obj:
        """Keep what a write may not change: identity, and the status/spec split."""
        meta, old_meta = _meta(new), old["metadata"]
        for key in ("uid", "creationTimestamp", "deletionTimestamp"):
            if key in old_meta:
                meta[key] = old_meta[key]
        for key in ("name", "namespace"):
            if meta.get(key, "") != old_meta.get(key, ""):
                raise ApiError(422, f'{t.res.kind or t.res.name} "{old_meta.get("name")}" is '
                               f"invalid: metadata.{key}: Invalid value: field is immutable",
                               "Invalid")
        if "status" in t.res.subresources:  # status changes only through .../status
            if t.subresource == "status":
                new = {**old, "status": new.get("status", old.get("status"))}
            elif "status" in old:
                new["status"] = old["status"]
            else:
                new.pop("status", None)
        self._defaults_on_write(t.res, new)
        _set_generation(t, old, new)
        return new

    def _finish(self, t: Target, obj: Obj) -> Obj | None:
        """None (delete now) when a deletion was waiting for the last finalizer to go."""
        meta = obj["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return None
        return obj

    def _update(self, req: Request, t: Target) -> Reply:
        body = self._body_object(req, t)
        self._admit(req, t, body)
        wanted = _meta(body).get("resourceVersion")

        def change(current: Obj) -> Obj | None:
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                raise conflict(t.res, t.name)
            new = self._carry_over(t, current, json.loads(json.dumps(body)))
            self._admit(req, t, current)
            return self._finish(t, new)

        if req.query.get("dryRun") == "All":
            current = self.storage.must_get(t.res, t.namespace, t.name)
            return json_reply(200, self._carry_over(t, current, body))
        old, new = self.storage.guaranteed_update(t.res, t.namespace, t.name, change)
        return json_reply(200, new if new is not None else old)

    def _patch(self, req: Request, t: Target) -> Reply:
        content_type = req.content_type.split(";")[0].strip()
        if content_type == APPLY:
            return self._apply(req, t)
        patch = _parse_json(req)

        def change(current: Obj) -> Obj | None:
            self._admit(req, t, current)
            new = apply_patch(content_type, current, patch)
            if new.get("metadata", {}).get("resourceVersion") != \
                    current["metadata"]["resourceVersion"]:
                raise conflict(t.res, t.name)
            return self._finish(t, self._carry_over(t, current, new))

        if req.query.get("dryRun") == "All":
            current = self.storage.must_get(t.res, t.namespace, t.name)
            return json_reply(200, change(current))
        old, new = self.storage.guaranteed_update(t.res, t.namespace, t.name, change)
        return json_reply(200, new if new is not None else old)

    def _apply(self, req: Request, t: Target) -> Reply:
        """Server-side apply: the manifest is stored as given (see the module docstring)."""
        if not req.query.get("fieldManager"):
            raise ApiError(422, 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: '
                           "Required value: is required for apply patch", "Invalid")
        obj = self._body_object(req, t)
        if not obj.get("apiVersion") or not obj.get("kind"):
            raise ApiError(400, "apiVersion and kind must be set in an apply patch")
        current = self.storage.get(t.res, t.namespace, t.name)
        self._admit(req, t, obj if current is None else current)
        if current is None:
            if t.subresource:
                raise not_found(t.res, t.name)
            return self._create(Request("POST", req.path, req.query, req.user, req.accept,
                                        "application/json", json.dumps(obj).encode()), t)
        _meta(obj).pop("resourceVersion", None)

        def change(current: Obj) -> Obj | None:
            new = json.loads(json.dumps(obj))
            if "status" not in new and "status" in current and not t.subresource:
                new["status"] = current["status"]
            return self._finish(t, self._carry_over(t, current, new))

        if req.query.get("dryRun") == "All":
            return json_reply(200, change(current))
        old, new = self.storage.guaranteed_update(t.res, t.namespace, t.name, change)
        return json_reply(200, new if new is not None else old)

    # --- deletes -------------------------------------------------------------------------------

    def _delete_options(self, req: Request) -> Obj:
        options = _parse_json(req) if req.body else {}
        return options if isinstance(options, dict) else {}

    def _delete(self, req: Request, t: Target) -> Reply:
        if t.res.name == "namespaces" and t.name in PROTECTED_NAMESPACES:
            raise ApiError(403, f'namespaces "{t.name}" is forbidden: this namespace may not '
                           "be deleted", "Forbidden", {"name": t.name, "kind": "namespaces"})
        pre = self._delete_options(req).get("preconditions") or {}
        dry = req.query.get("dryRun") == "All"

        def change(current: Obj) -> Obj | None:
            meta = current["metadata"]
            self._admit(req, t, current)
            for key, field_name in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
                if pre.get(key) and pre[key] != meta.get(key):
                    raise ApiError(409, f"Precondition failed: {field_name} in precondition: "
                                   f"{pre[key]}, {field_name} in object meta: "
                                   f"{meta.get(key)}", "Conflict")
            if meta.get("finalizers"):
                if not meta.get("deletionTimestamp"):
                    meta["deletionTimestamp"] = now()
                    if meta.get("generation"):  # as the real markAsDeleting/BeforeDelete do
                        meta["generation"] = int(meta["generation"]) + 1
                return current
            return None

        if dry:
            current = self.storage.must_get(t.res, t.namespace, t.name)
            change(json.loads(json.dumps(current)))
            return json_reply(200, current)
        old, new = self.storage.guaranteed_update(t.res, t.namespace, t.name, change)
        if new is None and t.res.name == "namespaces" and t.res.group == "":
            self._delete_namespace_contents(t.name)
        return self._deleted_reply(t, old, new)

    def _deleted_reply(self, t: Target, old: Obj, new: Obj | None) -> Reply:
        if new is not None:
            return json_reply(202, new)
        if t.res.name in ("pods", "namespaces") and t.res.group == "":
            gone = json.loads(json.dumps(old))
            gone["metadata"]["deletionTimestamp"] = now()
            if t.res.name == "namespaces":
                gone.setdefault("status", {})["phase"] = "Terminating"
            return json_reply(200, gone)
        return json_reply(200, success_status(200, {
            "name": t.name, "group": t.res.group, "kind": t.res.name,
            "uid": old["metadata"].get("uid", "")}))

    def _delete_namespace_contents(self, namespace: str) -> None:
        for res in self.resources():
            if res.namespaced and "delete" in res.verbs:
                self.storage.delete_collection(res, namespace)

    def _delete_collection(self, req: Request, t: Target) -> Reply:
        items, rev = self.storage.list(t.res, t.namespace)
        deleted = []
        for _, obj in self._select(req, items):
            meta = obj["metadata"]
            sub = Target(t.res, meta.get("namespace", ""), meta["name"], "", "delete",
                         Attributes("delete", req.path, t.res.group, t.res.name, "",
                                    meta.get("namespace", ""), meta["name"]))
            self._admit(req, sub, obj)
            if req.query.get("dryRun") != "All":
                try:
                    self.storage.delete(t.res, sub.namespace, sub.name)
                except ApiError as exc:
                    if exc.code != 404:
                        raise
            deleted.append(obj)
        kind = f"{t.res.kind}List" if t.res.kind else "List"
        return json_reply(200, {"kind": kind, "apiVersion": t.res.api_version,
                                "metadata": {"resourceVersion": str(rev)}, "items": deleted})

    # --- subresources ----------------------------------------------------------------------------

    def _evict(self, req: Request, t: Target) -> Reply:
        """POST pods/NAME/eviction: the pod is deleted (no PodDisruptionBudget is consulted)."""
        body = _parse_json(req) or {}
        if not isinstance(body, dict):
            raise ApiError(400, "the body of the request must be an Eviction object")
        if (body.get("metadata") or {}).get("name", t.name) != t.name:
            raise ApiError(400, "name in URL does not match name in Eviction object")
        pod = self.storage.must_get(PODS, t.namespace, t.name)
        self._admit(req, t, pod)
        pre = ((body.get("deleteOptions") or {}).get("preconditions") or {})
        if pre.get("uid") and pre["uid"] != pod["metadata"].get("uid"):
            raise ApiError(409, f"Precondition failed: UID in precondition: {pre['uid']}, "
                           f"UID in object meta: {pod['metadata'].get('uid')}", "Conflict")
        if req.query.get("dryRun") != "All":
            self.storage.delete(PODS, t.namespace, t.name,
                                int(pod["metadata"]["resourceVersion"]))
        return json_reply(201, success_status(201))

    def _bind(self, req: Request, t: Target) -> Reply:
        """POST pods/NAME/binding: set spec.nodeName once (the scheduler's write)."""
        body = _parse_json(req) or {}
        node = (body.get("target") or {}).get("name", "") if isinstance(body, dict) else ""
        if not node:
            raise ApiError(422, "Binding is invalid: target.name: Required value", "Invalid")

        def change(pod: Obj) -> Obj:
            bound = (pod.get("spec") or {}).get("nodeName")
            if bound:
                raise ApiError(409, f'Operation cannot be fulfilled on pods/binding '
                               f'"{t.name}": pod {t.name} is already assigned to node '
                               f'"{bound}"', "Conflict")
            pod.setdefault("spec", {})["nodeName"] = node
            return pod

        self.storage.guaranteed_update(PODS, t.namespace, t.name, change)
        return json_reply(201, success_status(201))

    def _access_review(self, req: Request, t: Target) -> Reply:
        review = self._body_object(req, t)
        spec = review.get("spec") or {}
        user = req.user
        if t.res.name == "subjectaccessreviews":
            user = User(spec.get("user", ""), tuple(spec.get("groups") or ()))
        ra, nra = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
        if ra:
            attrs = Attributes(ra.get("verb", ""), "", ra.get("group", ""),
                               ra.get("resource", ""), ra.get("subresource", ""),
                               ra.get("namespace", ""), ra.get("name", ""))
        else:
            attrs = Attributes((nra or {}).get("verb", ""), (nra or {}).get("path", ""),
                               resource_request=False)
        allowed = authorize(user, attrs, list(self.info.modes), self._related)
        review["status"] = {"allowed": allowed, **({} if allowed else {"reason": ""})}
        return json_reply(201, review)

    # --- the node authorizer's graph -----------------------------------------------------------

    def _related(self, node: str, attrs: Attributes) -> bool:
        """Whether a pod bound to `node` refers to the configmap/secret/PVC/PV `attrs` names."""
        if attrs.resource not in NODE_GRAPH or not attrs.name:
            return False
        items, _ = self.storage.list(PODS, attrs.namespace)
        pods = [o for _, o in items if (o.get("spec") or {}).get("nodeName") == node]
        if attrs.resource == "persistentvolumes":
            claims = {(p["metadata"].get("namespace", ""), n) for p in pods
                      for n in pod_references(p, "persistentvolumeclaims")}
            for ns, claim in claims:
                pvc = self.storage.get(PVCS, ns, claim)
                if pvc and (pvc.get("spec") or {}).get("volumeName") == attrs.name:
                    return True
            return False
        return any(attrs.name in pod_references(p, attrs.resource) for p in pods)

