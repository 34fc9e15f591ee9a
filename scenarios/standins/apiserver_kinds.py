"""What the kube-apiserver stand-in serves, and who may do what: resources, discovery, authz.

`RESOURCES` is the built-in resource table (core v1 and the usual groups), from which the
discovery documents (`/api`, `/api/v1`, `/apis`, `/apis/<group>[/<version>]`) are built, plus
any CustomResourceDefinition stored in etcd. `authorize` decides a request the way
`--authorization-mode` asks: `AlwaysAllow`, `AlwaysDeny`, `Node` (the node authorizer's rules
for `system:node:<name>` users) and `RBAC` (a fixed copy of the default bootstrap roles:
system:masters may do anything, the control-plane components read everything and write what
they own; RBAC objects stored in the cluster are kept but not evaluated). `node_restriction`
is the NodeRestriction admission check: a kubelet may only change its own Node, its own Lease,
and pods bound to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RESOURCES", "Attributes", "Resource", "User", "api_group_list", "authorize",
    "crd_resources", "node_restriction", "pod_references", "resource_list",
]

Obj = dict[str, Any]
STORED_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update")


@dataclass(frozen=True)
class Resource:
    """One served resource: where it lives in the API and in etcd."""

    group: str
    version: str
    name: str  # plural, e.g. "nodes"
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    subresources: frozenset[str] = frozenset()
    storage: str = ""  # path under --etcd-prefix; default: the plural
    verbs: tuple[str, ...] = STORED_VERBS

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def api_version(self) -> str:
        return self.group_version

    @property
    def storage_path(self) -> str:
        return self.storage or self.name


def _table(group: str, version: str, rows: list[tuple[Any, ...]]) -> list[Resource]:
    out = []
    for row in rows:
        name, kind, namespaced, short, subs, *rest = row
        out.append(Resource(group, version, name, kind, namespaced, tuple(short),
                            frozenset(subs), *rest))
    return out


_ST = {"status"}
_CORE = _table("", "v1", [
    ("namespaces", "Namespace", False, ["ns"], {"status", "finalize"}),
    ("nodes", "Node", False, ["no"], _ST),
    ("pods", "Pod", True, ["po"], {"status", "eviction", "binding"}),
    ("configmaps", "ConfigMap", True, ["cm"], ()),
    ("secrets", "Secret", True, [], ()),
    ("services", "Service", True, ["svc"], _ST, "services/specs"),
    ("endpoints", "Endpoints", True, ["ep"], (), "services/endpoints"),
    ("serviceaccounts", "ServiceAccount", True, ["sa"], ()),
    ("events", "Event", True, ["ev"], ()),
    ("persistentvolumes", "PersistentVolume", False, ["pv"], _ST),
    ("persistentvolumeclaims", "PersistentVolumeClaim", True, ["pvc"], _ST),
    ("limitranges", "LimitRange", True, ["limits"], ()),
    ("resourcequotas", "ResourceQuota", True, ["quota"], _ST),
    ("replicationcontrollers", "ReplicationController", True, ["rc"], _ST),
    ("podtemplates", "PodTemplate", True, [], ()),
])
_GROUPS = [
    *_table("apps", "v1", [
        ("deployments", "Deployment", True, ["deploy"], _ST),
        ("daemonsets", "DaemonSet", True, ["ds"], _ST),
        ("statefulsets", "StatefulSet", True, ["sts"], _ST),
        ("replicasets", "ReplicaSet", True, ["rs"], _ST),
        ("controllerrevisions", "ControllerRevision", True, [], ()),
    ]),
    *_table("batch", "v1", [("jobs", "Job", True, [], _ST),
                            ("cronjobs", "CronJob", True, ["cj"], _ST)]),
    *_table("policy", "v1", [("poddisruptionbudgets", "PodDisruptionBudget", True, ["pdb"],
                              _ST)]),
    *_table("rbac.authorization.k8s.io", "v1", [
        ("roles", "Role", True, [], ()), ("rolebindings", "RoleBinding", True, [], ()),
        ("clusterroles", "ClusterRole", False, [], ()),
        ("clusterrolebindings", "ClusterRoleBinding", False, [], ()),
    ]),
    *_table("coordination.k8s.io", "v1", [("leases", "Lease", True, [], ())]),
    *_table("networking.k8s.io", "v1", [
        ("networkpolicies", "NetworkPolicy", True, ["netpol"], ()),
        ("ingresses", "Ingress", True, ["ing"], _ST, "ingress"),
        ("ingressclasses", "IngressClass", False, [], ()),
    ]),
    *_table("storage.k8s.io", "v1", [
        ("storageclasses", "StorageClass", False, ["sc"], ()),
        ("csidrivers", "CSIDriver", False, [], ()), ("csinodes", "CSINode", False, [], ()),
        ("volumeattachments", "VolumeAttachment", False, [], _ST),
    ]),
    *_table("scheduling.k8s.io", "v1", [("priorityclasses", "PriorityClass", False, ["pc"],
                                         ())]),
    *_table("apiextensions.k8s.io", "v1", [
        ("customresourcedefinitions", "CustomResourceDefinition", False, ["crd", "crds"], _ST,
         "apiextensions.k8s.io/customresourcedefinitions"),
    ]),
    *_table("admissionregistration.k8s.io", "v1", [
        ("mutatingwebhookconfigurations", "MutatingWebhookConfiguration", False, [], ()),
        ("validatingwebhookconfigurations", "ValidatingWebhookConfiguration", False, [], ()),
    ]),
    *_table("discovery.k8s.io", "v1", [("endpointslices", "EndpointSlice", True, [], ())]),
    *_table("node.k8s.io", "v1", [("runtimeclasses", "RuntimeClass", False, [], ())]),
    *_table("events.k8s.io", "v1", [("events", "Event", True, ["ev"], ())]),
    *_table("certificates.k8s.io", "v1", [
        ("certificatesigningrequests", "CertificateSigningRequest", False, ["csr"],
         {"status", "approval"}),
    ]),
    *_table("autoscaling", "v2", [("horizontalpodautoscalers", "HorizontalPodAutoscaler", True,
                                   ["hpa"], _ST)]),
    *_table("apiregistration.k8s.io", "v1", [
        ("apiservices", "APIService", False, [], _ST, "apiregistration.k8s.io/apiservices"),
    ]),
    *_table("authorization.k8s.io", "v1", [
        ("selfsubjectaccessreviews", "SelfSubjectAccessReview", False, [], (), "", ("create",)),
        ("subjectaccessreviews", "SubjectAccessReview", False, [], (), "", ("create",)),
    ]),
]
RESOURCES: tuple[Resource, ...] = (*_CORE, *_GROUPS)
# Subresources whose kind differs from their parent's (discovery names them so).
_SUB_KINDS = {"eviction": ("policy", "v1", "Eviction", ("create",)),
              "binding": ("", "v1", "Binding", ("create",)),
              "approval": ("", "", "", ("get", "patch", "update")),
              "finalize": ("", "", "", ("update",))}


def crd_resources(crds: list[Obj]) -> list[Resource]:
    """The resources that stored CustomResourceDefinitions define (served versions only)."""
    out = []
    for crd in crds:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        group, plural = spec.get("group", ""), names.get("plural", "")
        if not group or not plural:
            continue
        for version in spec.get("versions") or []:
            if version.get("served", True) and version.get("name"):
                subs = frozenset(version.get("subresources") or {})
                out.append(Resource(
                    group, version["name"], plural, names.get("kind", ""),
                    spec.get("scope", "Namespaced") == "Namespaced",
                    tuple(names.get("shortNames") or ()), subs, f"{group}/{plural}",
                ))
    return out


def _api_resource(res: Resource) -> list[Obj]:
    main: Obj = {"name": res.name, "singularName": res.kind.lower(),
                 "namespaced": res.namespaced, "kind": res.kind, "verbs": list(res.verbs)}
    if res.short_names:
        main["shortNames"] = list(res.short_names)
    out = [main]
    for sub in sorted(res.subresources):
        group, version, kind, verbs = _SUB_KINDS.get(sub, ("", "", "", ("get", "patch",
                                                                          "update")))
        entry: Obj = {"name": f"{res.name}/{sub}", "singularName": "",
                      "namespaced": res.namespaced, "kind": kind or res.kind,
                      "verbs": list(verbs)}
        if group or version:
            entry.update({"group": group, "version": version})
        out.append(entry)
    return out


def resource_list(group_version: str, resources: list[Resource]) -> Obj:
    """The APIResourceList of one group version (`/api/v1`, `/apis/apps/v1`)."""
    items = [item for res in resources if res.group_version == group_version
             for item in _api_resource(res)]
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": items}


def api_group(name: str, resources: list[Resource]) -> Obj | None:
    """The APIGroup document of group `name`, or None when nothing is served in it."""
    versions = sorted({r.version for r in resources if r.group == name}, reverse=True)
    if not versions:
        return None
    entries = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": name, "versions": entries,
            "preferredVersion": entries[0]}


def api_group_list(resources: list[Resource]) -> Obj:
    """The APIGroupList served at `/apis` (every group but the core one)."""
    names = list(dict.fromkeys(r.group for r in resources if r.group))
    groups = [g for g in (api_group(n, resources) for n in names) if g is not None]
    for group in groups:
        del group["kind"], group["apiVersion"]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


# --- authorization -------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    """An authenticated identity: certificate CN -> name, O -> groups."""

    name: str
    groups: tuple[str, ...] = ()

    @property
    def node_name(self) -> str:
        """The node a kubelet identity stands for (system:node:<name>), else ""."""
        if "system:nodes" in self.groups and self.name.startswith("system:node:"):
            return self.name[len("system:node:"):]
        return ""


@dataclass(frozen=True)
class Attributes:
    """What a request does: a verb on a resource (or on a non-resource path)."""

    verb: str
    path: str = ""
    group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    resource_request: bool = field(default=True)


PUBLIC_PATHS = ("/healthz", "/livez", "/readyz", "/version")
DISCOVERY_PATHS = ("/api", "/apis", "/openapi", *PUBLIC_PATHS)
READ = ("get", "list", "watch")
_COMPONENT_WRITES: dict[str, set[tuple[str, str]]] = {
    "system:kube-controller-manager": {
        ("coordination.k8s.io", "leases"), ("", "events"), ("events.k8s.io", "events"),
        ("", "endpoints"), ("", "serviceaccounts"), ("", "secrets"), ("", "configmaps"),
        ("", "nodes"), ("", "nodes/status"), ("", "pods"), ("", "pods/status"),
        ("apps", "replicasets"), ("apps", "replicasets/status"), ("apps", "deployments/status"),
        ("apps", "daemonsets/status"), ("batch", "jobs/status"),
        ("authentication.k8s.io", "tokenreviews"),
        ("authorization.k8s.io", "subjectaccessreviews"),
    },
    "system:kube-scheduler": {
        ("coordination.k8s.io", "leases"), ("", "events"), ("events.k8s.io", "events"),
        ("", "pods/binding"), ("", "pods/status"),
    },
    "system:kube-proxy": {("", "events"), ("events.k8s.io", "events")},
}
_NODE_RULES: dict[tuple[str, str], tuple[str, ...]] = {
    ("", "nodes"): ("get", "list", "watch", "create", "update", "patch", "delete"),
    ("", "nodes/status"): ("get", "update", "patch"),
    ("", "pods"): ("get", "list", "watch", "create", "delete"),
    ("", "pods/status"): ("get", "update", "patch"),
    ("", "pods/eviction"): ("create",),
    ("", "events"): ("create", "update", "patch"),
    ("events.k8s.io", "events"): ("create", "update", "patch"),
    ("", "services"): READ, ("", "endpoints"): READ, ("discovery.k8s.io", "endpointslices"): READ,
    ("coordination.k8s.io", "leases"): ("get", "create", "update", "patch", "delete"),
    ("storage.k8s.io", "csinodes"): ("get", "create", "update", "patch", "delete"),
    ("storage.k8s.io", "csidrivers"): READ, ("node.k8s.io", "runtimeclasses"): READ,
    ("certificates.k8s.io", "certificatesigningrequests"): ("create", "get", "list", "watch"),
    ("authentication.k8s.io", "tokenreviews"): ("create",),
    ("authorization.k8s.io", "subjectaccessreviews"): ("create",),
}
RKE_NODE_USER = "system:node"  # the CN of RKE's shared kube-node certificate
# Read only when a pod bound to the node refers to the object (the node authorizer's graph).
NODE_GRAPH = ("configmaps", "secrets", "persistentvolumeclaims", "persistentvolumes")


def _non_resource(user: User, attrs: Attributes) -> bool:
    allowed = DISCOVERY_PATHS if "system:authenticated" in user.groups else PUBLIC_PATHS
    return any(attrs.path == p or attrs.path.startswith(p + "/") for p in allowed)


def _rbac(user: User, attrs: Attributes) -> bool:
    if "system:masters" in user.groups:
        return True
    if not attrs.resource_request:
        return attrs.verb == "get" and _non_resource(user, attrs)
    if attrs.resource == "selfsubjectaccessreviews":
        return "system:authenticated" in user.groups
    if user.name in _COMPONENT_WRITES:
        full = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
        return attrs.verb in READ or (attrs.group, full) in _COMPONENT_WRITES[user.name]
    if user.name == RKE_NODE_USER and "system:nodes" in user.groups:
        # RKE's ClusterRoleBinding `system:node` (ClusterRole system:node to the group
        # system:nodes) for its kubelets' one shared certificate, CN system:node, which the
        # Node authorizer does not know (no node name in it).
        full = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
        if attrs.group == "" and attrs.resource in NODE_GRAPH:
            return attrs.verb in READ
        return attrs.verb in _NODE_RULES.get((attrs.group, full), ())
    return False


def _node(user: User, attrs: Attributes, related: Callable[[str, Attributes], bool]) -> bool:
    node = user.node_name
    if not node or not attrs.resource_request:
        return False
    full = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    if attrs.group == "" and attrs.resource in NODE_GRAPH:
        return attrs.verb == "get" and related(node, attrs)
    return attrs.verb in _NODE_RULES.get((attrs.group, full), ())


def authorize(
    user: User, attrs: Attributes, modes: list[str],
    related: Callable[[str, Attributes], bool] = lambda node, attrs: False,
) -> bool:
    """Whether `user` may do `attrs`, asking each `--authorization-mode` authorizer in order.

    ABAC and Webhook have no opinion here (the stand-in does not implement them).
    """
    for mode in modes:
        if mode == "AlwaysAllow":
            return True
        if mode == "AlwaysDeny":
            return False
        if mode == "Node" and _node(user, attrs, related):
            return True
        if mode == "RBAC" and _rbac(user, attrs):
            return True
    return False


def forbidden_message(user: User, attrs: Attributes) -> str:
    """The real apiserver's 403 text for an RBAC denial."""
    if not attrs.resource_request:
        return f'forbidden: User "{user.name}" cannot {attrs.verb} path "{attrs.path}"'
    full = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    what = f'{full} "{attrs.name}"' if attrs.name else full
    scope = f'in the namespace "{attrs.namespace}"' if attrs.namespace else "at the cluster scope"
    return (f'{what} is forbidden: User "{user.name}" cannot {attrs.verb} resource "{full}" '
            f'in API group "{attrs.group}" {scope}')


def node_restriction(user: User, attrs: Attributes, obj: Obj | None) -> str:
    """NodeRestriction admission: "" if allowed, else the reason (`obj`: new, else existing).

    A kubelet may create, change and delete only its own Node (and its status) and its own
    Lease in kube-node-lease, and only change, delete or evict pods bound to it.
    """
    node = user.node_name
    if not node or attrs.verb in READ:
        return ""
    if attrs.group == "" and attrs.resource == "nodes":
        name = attrs.name or ((obj or {}).get("metadata") or {}).get("name", "")
        if name != node:
            return f'node "{node}" is not allowed to modify node "{name}"'
    if attrs.resource == "leases" and attrs.group == "coordination.k8s.io":
        name = attrs.name or ((obj or {}).get("metadata") or {}).get("name", "")
        if attrs.namespace != "kube-node-lease" or name != node:
            return f'node "{node}" is not allowed to modify lease {attrs.namespace}/{name}'
    if attrs.group == "" and attrs.resource == "pods":
        bound = ((obj or {}).get("spec") or {}).get("nodeName", "")
        if bound != node:
            verb = "create" if attrs.verb == "create" else "modify"
            return f'node "{node}" can only {verb} pods with spec.nodeName set to itself'
    return ""


def pod_references(pod: Obj, resource: str) -> set[str]:
    """Names of the configmaps, secrets or PVCs a pod refers to."""
    spec = pod.get("spec") or {}
    out: set[str] = set()
    for vol in spec.get("volumes") or []:
        out.add({"configmaps": (vol.get("configMap") or {}).get("name", ""),
                 "secrets": (vol.get("secret") or {}).get("secretName", ""),
                 "persistentvolumeclaims": (vol.get("persistentVolumeClaim") or {})
                 .get("claimName", "")}.get(resource, ""))
        for source in (vol.get("projected") or {}).get("sources") or []:
            key = {"configmaps": "configMap", "secrets": "secret"}.get(resource, "")
            out.add((source.get(key) or {}).get("name", "") if key else "")
    from_key, value_key = {"configmaps": ("configMapRef", "configMapKeyRef"),
                           "secrets": ("secretRef", "secretKeyRef")}.get(resource, ("", ""))
    containers = [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
    for container in containers if from_key else []:
        for source in container.get("envFrom") or []:
            out.add((source.get(from_key) or {}).get("name", ""))
        for env in container.get("env") or []:
            out.add(((env.get("valueFrom") or {}).get(value_key) or {}).get("name", ""))
    if resource == "secrets":
        out |= {s.get("name", "") for s in spec.get("imagePullSecrets") or []}
    out.discard("")
    return out


# --- OpenAPI v3 (just what kubectl checks before it relies on server-side validation) ---------


def _gv_path(res: Resource) -> str:
    return f"apis/{res.group}/{res.version}" if res.group else "api/v1"


def openapi_root(resources: list[Resource]) -> Obj:
    """/openapi/v3: one entry per group version, as the real server lists them."""
    paths = sorted({_gv_path(r) for r in resources})
    return {"paths": {p: {"serverRelativeURL": f"/openapi/v3/{p}?hash=standin"} for p in paths}}


def openapi_group_version(gv_path: str, resources: list[Resource], version: str) -> Obj | None:
    """/openapi/v3/<gv>: the PATCH operation of every object path, with its GVK and query
    parameters (kubectl reads `fieldValidation` there); no schemas (kubectl explain fails)."""
    chosen = [r for r in resources if _gv_path(r) == gv_path and "patch" in r.verbs]
    if not chosen:
        return None
    params = [{"name": n, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
              for n in ("dryRun", "fieldManager", "fieldValidation", "force")]
    paths = {}
    for res in chosen:
        scope = "/namespaces/{namespace}" if res.namespaced else ""
        gvk = {"group": res.group, "version": res.version, "kind": res.kind}
        paths[f"/{gv_path}{scope}/{res.name}/{{name}}"] = {"patch": {
            "operationId": f"patch{res.kind}", "parameters": params,
            "x-kubernetes-action": "patch", "x-kubernetes-group-version-kind": gvk,
            "responses": {"200": {"description": "OK"}}}}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes (stand-in)", "version": version},
            "paths": paths}
