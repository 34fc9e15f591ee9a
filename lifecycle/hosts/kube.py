"""The Kubernetes API as the executor uses it, through the official `kubernetes` client.

rkel talks to the API servers directly (https://<controlplane address>:6443) as `kube-admin`,
whose key never leaves rkel: it is loaded from memory (memfd), never written to disk. Several
servers are tried in order, so a run that is upgrading one controlplane node keeps talking to
another. Drain follows `node_drain_input` the way `kubectl drain` does: DaemonSet pods are left
alone when ignore_daemonsets is set, bare pods need force, pods with emptyDir need
delete_local_data, and every pod is evicted (PodDisruptionBudgets are honoured by the server).

Beyond nodes: the cluster.yml labels and taints of each Node (remembered in annotations, so rkel
removes only what it set), a Secret with a copy of rkel's state, add-on manifests by server-side
apply (REST paths found through API discovery), and polling until their workloads rolled out.
The pure parts (what to patch on a Node, apply order, when a rollout is complete) are module
functions that the Simulated backend shares, so both backends mean the same thing.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.parse
from typing import AbstractSet, Any, Callable, Protocol

from lifecycle.errors import HostError, HostUnreachableError
from lifecycle.hosts import DrainOptions, KubeNode

API = "kubernetes"
MANAGED_LABELS = "rkel.io/managed-labels"  # JSON list of the label keys rkel set on a Node
MANAGED_TAINTS = "rkel.io/managed-taints"  # JSON list of {key, value, effect} rkel set
MANAGED_BY = {"app.kubernetes.io/managed-by": "rkel"}
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
CONFLICT_RETRIES = 5
CRD_DISCOVERY_TIMEOUT = 30.0  # how long a kind defined by a just-applied CRD may take to appear


class Material(Protocol):
    @property
    def cert_pem(self) -> bytes: ...

    @property
    def key_pem(self) -> bytes: ...

    @property
    def ca_pem(self) -> bytes: ...


def _why(exc: BaseException) -> str:
    """Why a server did not answer, in a few words ("[Errno 111] Connection refused", a TLS
    failure, a timeout): urllib3 wraps the cause in MaxRetryError and prefixes it with the
    connection's repr."""
    text = str(getattr(exc, "reason", None) or exc)
    for marker in ("Failed to establish a new connection: ", ">: "):
        text = text.split(marker, 1)[-1]
    return " ".join(text.split())[:160] or type(exc).__name__


def _memfd(name: str, data: bytes) -> str:
    """A path to `data` that exists only in memory, for libraries that want file names."""
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    return f"/proc/{os.getpid()}/fd/{fd}"


class KubernetesAPI:
    """`KubeAPI` over the official client, failing over between API servers."""

    def __init__(self, servers: list[str], material: Material, *,
                 sleep: Callable[[float], None] = time.sleep, timeout: float = 15.0,
                 clock: Callable[[], float] = time.monotonic, poll_interval: float = 2.0) -> None:
        import kubernetes.client  # only when a cluster is really talked to

        if not servers:
            raise HostError(API, "no controlplane node to reach the Kubernetes API through")
        self._sleep = sleep
        self._timeout = timeout
        self._clock = clock
        self._poll = poll_interval
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

    def _call(self, what: str, fn: Callable[[Any], Any], *, missing_ok: bool = False,
              passthrough: tuple[int, ...] = ()) -> Any:
        """Run `fn(core_v1)` on the first server that answers; None for 404 when missing_ok.
        An ApiException whose status is in `passthrough` reaches the caller unchanged."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        errors = []
        for server, core in list(self._clients):
            try:
                result = fn(core)
            except ApiException as exc:
                if exc.status == 404 and missing_ok:
                    return None
                if exc.status in passthrough:
                    raise
                if exc.status and exc.status < 500:
                    raise HostError(API, f"{what}: {exc.status} {exc.reason}: "
                                         f"{_status_message(exc.body)}") from None
                errors.append(f"{server}: {exc.status} {exc.reason}")
                continue
            except (HTTPError, OSError) as exc:
                errors.append(f"{server}: {_why(exc)}")
                continue
            # keep the server that answered first for the next call
            self._clients.sort(key=lambda sc: sc[0] != server)
            return result
        raise HostUnreachableError(API, f"{what}: no API server answered ({'; '.join(errors)}); "
                                        "check the controlplane nodes, then run `rkel apply` again")

    def _request(self, core: Any, method: str, path: str, *, query: dict[str, str] | None = None,
                 body: Any = None, content_type: str = "application/json") -> Any:
        """One raw JSON request to any REST path (for `_call`); the decoded reply or None."""
        from kubernetes.client.exceptions import ApiException

        client = core.api_client
        url = client.configuration.host + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {**client.default_headers, "Accept": "application/json",
                   "Content-Type": content_type}
        resp = client.rest_client.request(method, url, headers=headers, body=body,
                                          _request_timeout=self._timeout)
        if getattr(resp, "data", None) is None:
            resp.read()
        if not 200 <= resp.status <= 299:
            raise ApiException(http_resp=resp)
        return json.loads(resp.data) if resp.data else None

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
        deadline = self._clock() + max(1, options.timeout)
        left = pods
        while left:
            left = left & {_pod_key(p) for p in self._pods_on(name)}
            if not left:
                return
            if self._clock() > deadline:
                raise HostError(name, f"drain timed out after {options.timeout}s; still there: "
                                + ", ".join(sorted(left)))
            self._sleep(2.0)

    # ------------------------------------------------------------------ node metadata
    def sync_node_metadata(self, name: str, labels: dict[str, str],
                           taints: list[tuple[str, str, str]]) -> None:
        """Make the Node carry exactly these rkel-managed labels and (key, value, effect) taints,
        leaving labels and taints rkel did not set alone."""
        from kubernetes.client.exceptions import ApiException

        for _ in range(CONFLICT_RETRIES):
            node = self._json(f"get node {name}",
                              lambda c: c.read_node(name, _request_timeout=self._timeout,
                                                    _preload_content=False), missing_ok=True)
            if node is None:
                raise not_registered(name)
            patch = node_metadata_patch(node, labels, taints, name)
            if patch is None:
                return
            # the taint list is replaced whole: only against the version it was computed from
            patch.setdefault("metadata", {})["resourceVersion"] = \
                node["metadata"]["resourceVersion"]
            try:
                self._call(f"label and taint node {name}",
                           lambda c: self._request(c, "PATCH", f"/api/v1/nodes/{name}",
                                                   body=patch, content_type=MERGE_PATCH),
                           passthrough=(409,))
                return
            except ApiException:
                continue  # the Node changed meanwhile: read it again
        raise HostError(name, f"node {name} kept changing while rkel set its labels and taints "
                        f"({CONFLICT_RETRIES} conflicts); run `rkel apply` again")

    # ------------------------------------------------------------------ state copy
    def save_state_secret(self, name: str, namespace: str, data: dict[str, str]) -> None:
        """Create or replace the Opaque Secret `namespace/name` holding `data`."""
        from kubernetes.client.exceptions import ApiException

        body = state_secret(name, namespace, data)
        base = f"/api/v1/namespaces/{namespace}/secrets"
        what = f"save Secret {namespace}/{name}"
        for _ in range(CONFLICT_RETRIES):
            replaced = self._call(what, lambda c: self._request(c, "PUT", f"{base}/{name}",
                                                                body=body), missing_ok=True)
            if replaced is not None:
                return
            try:
                self._call(what, lambda c: self._request(c, "POST", base, body=body),
                           passthrough=(409,))
                return
            except ApiException:
                continue  # created by someone else just now: replace it
        raise HostError(API, f"{what}: it kept changing ({CONFLICT_RETRIES} conflicts); run "
                        "`rkel apply` again")

    # ------------------------------------------------------------------ encryption at rest
    def rewrite_secrets(self) -> int:
        """Replace every Secret with itself (read, then PUT at its resourceVersion)."""
        from kubernetes.client.exceptions import ApiException

        rewritten, token = 0, ""
        while True:
            query = {"limit": "250", **({"continue": token} if token else {})}
            page = self._call("list Secrets", lambda c: self._request(
                c, "GET", "/api/v1/secrets", query=query)) or {}
            for item in page.get("items") or []:
                meta = item.get("metadata") or {}
                ns, name = meta.get("namespace", ""), meta.get("name", "")
                body = {**item, "apiVersion": "v1", "kind": "Secret"}
                path = (f"/api/v1/namespaces/{urllib.parse.quote(ns, safe='')}/secrets/"
                        f"{urllib.parse.quote(name, safe='')}")
                try:
                    done = self._call(f"rewrite Secret {ns}/{name}", lambda c: self._request(
                        c, "PUT", path, body=body), missing_ok=True, passthrough=(409,))
                except ApiException:
                    continue  # written since it was read: stored with the current key already
                rewritten += done is not None
            token = (page.get("metadata") or {}).get("continue") or ""
            if not token:
                return rewritten

    # ------------------------------------------------------------------ manifests
    def _resources(self, group_version: str, cache: dict[str, dict[str, tuple[str, bool]]],
                   fresh: bool = False) -> dict[str, tuple[str, bool]]:
        """kind -> (plural, namespaced) served in `group_version`, from API discovery."""
        if fresh or group_version not in cache:
            path = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
            found = self._call(f"discover {group_version}",
                               lambda c: self._request(c, "GET", path), missing_ok=True)
            cache[group_version] = {
                r["kind"]: (r["name"], bool(r.get("namespaced")))
                for r in (found or {}).get("resources") or [] if "/" not in r.get("name", "/")
            }
        return cache[group_version]

    def _locate(self, doc: dict[str, Any], cache: dict[str, dict[str, tuple[str, bool]]],
                crd_kinds: AbstractSet[tuple[str, str]] = frozenset(),
                ) -> tuple[str, str, dict[str, Any]]:
        """(REST path, "kind/namespace/name", object with its namespace set) for `doc`."""
        api_version, kind, name = identity(doc)
        found = self._resources(api_version, cache).get(kind)
        if found is None and (api_version.split("/")[0], kind) in crd_kinds:
            # defined by a CRD applied just now: wait until the server serves it
            deadline = self._clock() + CRD_DISCOVERY_TIMEOUT
            while found is None and self._clock() < deadline:
                self._sleep(min(self._poll, 1.0))
                found = self._resources(api_version, cache, fresh=True).get(kind)
        given = (doc.get("metadata") or {}).get("namespace") or ""
        if found is None:
            raise unknown_kind(api_version, kind, given, name)
        plural, namespaced = found
        namespace = given or "default"
        obj = json.loads(json.dumps(doc))
        meta = obj.setdefault("metadata", {})
        if namespaced:
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        scope = f"/namespaces/{namespace}" if namespaced else ""
        return (f"{prefix}{scope}/{plural}/{urllib.parse.quote(name, safe='')}",
                object_key(kind, meta.get("namespace", ""), name), obj)

    def apply_manifests(self, docs: list[dict], field_manager: str = "rkel") -> list[str]:
        """Server-side apply each object (CRDs and Namespaces first); the keys applied."""
        cache: dict[str, dict[str, tuple[str, bool]]] = {}
        ordered = manifest_order(docs)
        crd_kinds = {((d.get("spec") or {}).get("group", ""),
                      ((d.get("spec") or {}).get("names") or {}).get("kind", ""))
                     for d in ordered if d.get("kind") == "CustomResourceDefinition"}
        query = {"fieldManager": field_manager, "force": "true"}
        applied, failed = [], []
        for doc in ordered:
            try:
                path, key, obj = self._locate(doc, cache, crd_kinds)
                self._call(f"apply {key}",
                           lambda c: self._request(c, "PATCH", path, query=query, body=obj,
                                                   content_type=APPLY_PATCH))
            except HostUnreachableError:
                raise
            except HostError as exc:
                failed.append(str(exc).removeprefix(f"{API}: ").removeprefix("apply "))
                continue
            applied.append(key)
        if failed:
            raise apply_failed(failed, len(ordered))
        return applied

    def wait_rollout(self, objects: list[dict], timeout: float) -> None:
        """Poll until every Deployment, DaemonSet, StatefulSet and Job among `objects` has
        rolled out (anything else: until it exists); HostError naming the rest on timeout."""
        cache: dict[str, dict[str, tuple[str, bool]]] = {}
        left = {key: path for path, key, _ in (self._locate(d, cache)
                                               for d in manifest_order(objects))}
        deadline = self._clock() + timeout
        while True:
            pending = {}
            for key, path in sorted(left.items()):
                obj = self._call(f"get {key}", lambda c: self._request(c, "GET", path),
                                 missing_ok=True)
                why = "not found" if obj is None else rollout_pending(obj)
                if why:
                    pending[key] = why
            if not pending:
                return
            if self._clock() >= deadline:
                raise rollout_timeout(pending, timeout)
            left = {key: left[key] for key in pending}
            self._sleep(self._poll)


def _status_message(body: str | None) -> str:
    """The message of a Kubernetes Status reply, else the start of the body."""
    try:
        status = json.loads(body or "")
    except ValueError:
        status = None
    if isinstance(status, dict) and status.get("message"):
        return str(status["message"])
    return (body or "")[:300]


# ---------------------------------------------------------------------- shared with the simulator
def _json_list(text: str | None) -> list[Any]:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []  # edited by hand into nonsense: treat as nothing managed (never removes)
    return value if isinstance(value, list) else []


def node_metadata_patch(node: dict[str, Any], labels: dict[str, str],
                        taints: list[tuple[str, str, str]], name: str) -> dict[str, Any] | None:
    """The JSON merge patch that gives `node` exactly the wanted rkel-managed labels and taints
    (and records them in its annotations), or None when it has them already."""
    wanted: list[dict[str, str]] = []
    for key, value, effect in taints:
        if effect not in TAINT_EFFECTS:
            raise HostError(name, f"taint {key}: effect {effect!r} is not one of "
                            f"{', '.join(TAINT_EFFECTS)}; fix cluster.yml")
        if any((w["key"], w["effect"]) == (key, effect) for w in wanted):
            raise HostError(name, f"taint {key}:{effect} is given twice; fix cluster.yml")
        wanted.append({"key": key, "value": value, "effect": effect})
    meta = node.get("metadata") or {}
    have = meta.get("labels") or {}
    notes = meta.get("annotations") or {}
    before = {k for k in _json_list(notes.get(MANAGED_LABELS)) if isinstance(k, str)}
    label_patch: dict[str, str | None] = {k: None for k in sorted(before - labels.keys())
                                          if k in have}
    label_patch.update({k: v for k, v in sorted(labels.items()) if have.get(k) != v})

    managed = {(t.get("key"), t.get("effect")) for t in _json_list(notes.get(MANAGED_TAINTS))
               if isinstance(t, dict)}
    current = list((node.get("spec") or {}).get("taints") or [])
    todo = {(w["key"], w["effect"]): w for w in wanted}
    new: list[dict[str, Any]] = []
    for taint in current:
        ident = (taint.get("key"), taint.get("effect"))
        if ident in todo:
            want = todo.pop(ident)  # in place; an unchanged one keeps its timeAdded
            same = taint.get("value", "") == want["value"]
            new.append(taint if same else _wire_taint(want))
        elif ident not in managed:
            new.append(taint)  # someone else's
    new += [_wire_taint(w) for w in wanted if (w["key"], w["effect"]) in todo]

    records = {MANAGED_LABELS: json.dumps(sorted(labels)) if labels else None,
               MANAGED_TAINTS: json.dumps(sorted(wanted, key=lambda w: (w["key"], w["effect"])))
               if wanted else None}
    note_patch = {k: v for k, v in records.items() if notes.get(k) != v}
    patch: dict[str, Any] = {}
    if label_patch or note_patch:
        patch["metadata"] = {**({"labels": label_patch} if label_patch else {}),
                             **({"annotations": note_patch} if note_patch else {})}
    if new != current:
        patch["spec"] = {"taints": new or None}
    return patch or None


def _wire_taint(taint: dict[str, str]) -> dict[str, str]:
    """A taint as the API holds it: no value field when the value is empty."""
    return {k: v for k, v in taint.items() if v or k != "value"}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch of `target` (a new value; `target` is not changed)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def state_secret(name: str, namespace: str, data: dict[str, str]) -> dict[str, Any]:
    """The Secret that holds a copy of rkel's state (values base64, as the API wants)."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in sorted(data.items())}}


def object_key(kind: str, namespace: str, name: str) -> str:
    """How an object is named to users: kind/namespace/name, kind/name when cluster-scoped."""
    return f"{kind}/{namespace}/{name}" if namespace else f"{kind}/{name}"


def identity(doc: dict[str, Any]) -> tuple[str, str, str]:
    """(apiVersion, kind, name) of a manifest; HostError when one is missing."""
    name = (doc.get("metadata") or {}).get("name") or ""
    api_version, kind = doc.get("apiVersion") or "", doc.get("kind") or ""
    if not (api_version and kind and name):
        raise HostError(API, f"a manifest needs apiVersion, kind and metadata.name: "
                        f"{json.dumps(doc, sort_keys=True)[:120]}")
    return api_version, kind, name


def manifest_order(docs: list[dict]) -> list[dict]:
    """`docs` with `List`s flattened, CustomResourceDefinitions first, then Namespaces, then
    the rest as given."""
    flat: list[dict] = []
    for doc in docs:
        items = (doc.get("items") or []) if isinstance(doc, dict) and doc.get("kind") == "List" \
            else [doc]
        for item in items:
            if not isinstance(item, dict):
                raise HostError(API, f"a manifest is not an object: {str(item)[:80]}")
            if item:
                flat.append(item)
    first = {"CustomResourceDefinition": 0, "Namespace": 1}
    return sorted(flat, key=lambda d: first.get(d.get("kind", ""), 2))


def rollout_pending(obj: dict[str, Any]) -> str:
    """What a workload's status says is still to happen; "" once it has rolled out (and for
    kinds without a rollout)."""
    kind = obj.get("kind")
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    generation = (obj.get("metadata") or {}).get("generation")
    observed = status.get("observedGeneration")
    if kind in ("Deployment", "DaemonSet", "StatefulSet") and generation is not None and (
            observed is None or observed < generation):
        return f"generation {generation} not observed yet (observedGeneration {observed})"
    if kind == "Deployment":
        want = spec.get("replicas", 1)
        updated, available = status.get("updatedReplicas", 0), status.get("availableReplicas", 0)
        old = status.get("replicas", 0) - updated
        if updated == available == want and old <= 0:
            return ""
        why = f"{updated}/{want} updated, {available}/{want} available"
        why += f", {old} old pending termination" if old > 0 else ""
        return why + _condition(status, "Progressing", "False")
    if kind == "DaemonSet":
        desired = status.get("desiredNumberScheduled")
        if desired is None:
            return "not scheduled by the DaemonSet controller yet"
        available = status.get("numberAvailable", 0)
        updated = status.get("updatedNumberScheduled", desired)
        if available == desired and updated >= desired:
            return ""
        return f"{updated}/{desired} updated, {available}/{desired} available"
    if kind == "StatefulSet":
        want = spec.get("replicas", 1)
        ready = status.get("readyReplicas", 0)
        revisions = status.get("currentRevision"), status.get("updateRevision")
        if ready >= want and (None in revisions or revisions[0] == revisions[1]):
            return ""
        return f"{ready}/{want} ready" + ("" if ready < want else ", revision update running")
    if kind == "Job":
        if status.get("succeeded", 0) >= 1:
            return ""
        return (f"not succeeded yet ({status.get('active', 0)} active, "
                f"{status.get('failed', 0)} failed)" + _condition(status, "Failed", "True"))
    return ""


def _condition(status: dict[str, Any], kind: str, value: str) -> str:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == value:
            return f"; {kind}: {cond.get('reason', '')} {cond.get('message', '')}".rstrip()
    return ""


def rollout_timeout(pending: dict[str, str], timeout: float) -> HostError:
    return HostError(API, f"not rolled out after {timeout:g}s: "
                     + "; ".join(f"{key}: {why}" for key, why in sorted(pending.items()))
                     + ". Look at them with `kubectl describe`, then run `rkel apply` again")


def not_registered(name: str) -> HostError:
    return HostError(name, f"node {name} is not in the Kubernetes API: its kubelet has not "
                     "registered it; check the kubelet on it, then run `rkel apply` again")


def unknown_kind(api_version: str, kind: str, namespace: str, name: str) -> HostError:
    return HostError(API, f"{object_key(kind, namespace, name)}: the server has no kind {kind} "
                     f"in {api_version}; check apiVersion and kind, or install its "
                     "CustomResourceDefinition first")


def apply_failed(failed: list[str], total: int) -> HostError:
    return HostError(API, f"{len(failed)} of {total} manifests were not applied: "
                     + "; ".join(failed) + ". Fix them, then run `rkel apply` again")


def _pod_key(pod: dict[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


# A pod that says its emptyDir volumes are scratch (the convention the cluster autoscaler reads):
# drain evicts it without delete_local_data. rkel's own add-ons with such volumes carry it.
SAFE_TO_EVICT = "cluster-autoscaler.kubernetes.io/safe-to-evict"


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
    scratch = (meta.get("annotations") or {}).get(SAFE_TO_EVICT) == "true"
    if any("emptyDir" in v for v in volumes) and not options.delete_local_data and not scratch:
        return "uses emptyDir; needs delete_local_data"
    return ""
