"""Desired-state values: what a container, a node and a whole cluster should look like.

`lifecycle.desired` computes these from a `ClusterConfig`; the planner compares their hashes with
what the store records; host backends turn a `ServiceSpec` into a container. Frozen and
JSON-serialisable, so plans and journals store them as data, never pickles.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Callable, TypeVar

T = TypeVar("T")

SPEC_HASH_LABEL = "io.rkel.spec-hash"


def gc_paused(fn: Callable[..., T]) -> Callable[..., T]:
    """Run `fn` with the cyclic garbage collector paused (restored after, whatever happens).

    Compiling and planning allocate hundreds of thousands of small objects and free almost
    none, so the collector's passes only re-scan them: a fifth of a 5,000-node plan. Nothing
    they build has reference cycles to collect."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was:
                gc.enable()

    return wrapper


# What json.dumps(value, sort_keys=True, separators=(",", ":"), default=str) does, without
# building an encoder on every call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the same value always gives the same text."""
    return _CANONICAL.encode(value)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class HealthCheck:
    """How to tell a service is up: an HTTP(S) GET that must answer 200 (and contain `expect`)."""

    url: str
    client_cert: str = ""  # certificate name (e.g. "kube-admin") to present, "" for none
    expect: str = ""
    retries: int = 25
    interval: float = 2.0


@dataclass(frozen=True)
class ServiceSpec:
    """Everything that defines one container; `hash` is what the planner compares."""

    name: str  # container name on the node, as RKE names it ("etcd", "kube-apiserver", ...)
    image: str
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    binds: tuple[str, ...] = ()
    privileged: bool = False
    network_mode: str = "host"
    pid_mode: str = ""
    restart: str = "always"
    health: HealthCheck | None = None
    labels: tuple[tuple[str, str], ...] = ()
    # Arguments that only matter the first time a container starts (etcd's --initial-cluster*).
    # The executor fills them from the live membership; they are not part of the hash, so a
    # membership change does not restart every member.
    bootstrap_args: tuple[str, ...] = ()
    # Containers whose volumes this one mounts (RKE's `service-sidekick`, which carries
    # /opt/rke-tools into every Kubernetes component container).
    volumes_from: tuple[str, ...] = ()

    @property
    def hash(self) -> str:
        data = asdict(self)
        data.pop("bootstrap_args")
        if not data["volumes_from"]:
            data.pop("volumes_from")  # specs without it hash as they did before it existed
        return sha256_hex(canonical_json(data))[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServiceSpec:
        health = data.get("health")
        return cls(
            name=data["name"],
            image=data["image"],
            command=tuple(data.get("command", ())),
            args=tuple(data.get("args", ())),
            env=tuple(data.get("env", ())),
            binds=tuple(data.get("binds", ())),
            privileged=bool(data.get("privileged", False)),
            network_mode=data.get("network_mode", "host"),
            pid_mode=data.get("pid_mode", ""),
            restart=data.get("restart", "always"),
            health=HealthCheck(**health) if health else None,
            labels=tuple((k, v) for k, v in data.get("labels", ())),
            bootstrap_args=tuple(data.get("bootstrap_args", ())),
            volumes_from=tuple(data.get("volumes_from", ())),
        )


def _asdict_or_str(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return str(value)


# canonical_json(asdict(x)) of a field value x, as one piece of canonical_json(asdict(spec)).
_field_json = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=_asdict_or_str).encode
# ServiceSpec.hash's fields in the order canonical_json writes them (sorted), with their keys.
_HASHED_FIELDS = tuple(
    (f.name, f'"{f.name}":') for f in sorted(fields(ServiceSpec), key=lambda f: f.name)
    if f.name != "bootstrap_args"
)


class SpecHashes:
    """`ServiceSpec.hash` of many specs: the same text is hashed, but assembled from the JSON of
    each field value, made once per value object. `compile_desired` shares equal binds, env,
    labels and health checks between nodes, so most of a spec's text is encoded once per
    cluster instead of once per node; only the arguments (they name the node) are encoded
    each time. Values are kept referenced, so an id cannot be reused while this lives."""

    def __init__(self) -> None:
        self._texts: dict[int, tuple[Any, str]] = {}

    def __call__(self, spec: ServiceSpec) -> str:
        parts = []
        for name, key in _HASHED_FIELDS:
            value = getattr(spec, name)
            if name == "args":
                parts.append(key + _field_json(value))
            elif value or name != "volumes_from":  # as ServiceSpec.hash drops it when empty
                parts.append(key + self._json(value))
        return sha256_hex("{" + ",".join(parts) + "}")[:16]

    def _json(self, value: Any) -> str:
        hit = self._texts.get(id(value))
        if hit is None:
            hit = self._texts[id(value)] = (value, _field_json(value))
        return hit[1]


@dataclass(frozen=True)
class CertRequest:
    """One certificate a node needs: name (file stem under /etc/kubernetes/ssl), subject, SANs."""

    name: str
    common_name: str
    organizations: tuple[str, ...] = ()
    sans: tuple[str, ...] = ()
    ca: str = "kube-ca"  # which CA signs it ("kube-ca" or "kube-etcd-ca")

    @property
    def hash(self) -> str:
        return sha256_hex(canonical_json(asdict(self)))[:16]


@dataclass(frozen=True)
class NodeDesired:
    """One node as it should be: identity, roles, and the services and certificates it runs."""

    name: str
    address: str
    internal_address: str
    port: int
    user: str
    roles: tuple[str, ...]  # sorted
    services: tuple[ServiceSpec, ...]  # in start order
    certs: tuple[CertRequest, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    taints: tuple[tuple[str, str, str], ...] = ()  # (key, value, effect)

    def has(self, role: str) -> bool:
        return role in self.roles

    def service(self, name: str) -> ServiceSpec | None:
        return next((s for s in self.services if s.name == name), None)

    @property
    def certs_hash(self) -> str:
        return sha256_hex(canonical_json([c.hash for c in self.certs]))[:16]

    @property
    def group(self) -> str:
        """Which upgrade group the node falls in: controlplane, etcd (non-cp) or worker."""
        if self.has("controlplane"):
            return "controlplane"
        if self.has("etcd"):
            return "etcd"
        return "worker"


@dataclass(frozen=True)
class NodeRef:
    """How to reach a node: what a host backend needs, never a secret."""

    name: str
    address: str
    internal_address: str
    port: int
    user: str
    roles: tuple[str, ...]


@dataclass(frozen=True)
class Strategy:
    """Upgrade strategy as given; counts are resolved by the planner against the node counts."""

    max_unavailable_worker: str = "10%"
    max_unavailable_controlplane: str = "1"
    drain: bool = False
    drain_force: bool = False
    drain_ignore_daemonsets: bool = True
    drain_delete_local_data: bool = False
    drain_grace_period: int = -1
    drain_timeout: int = 120


@dataclass(frozen=True)
class Desired:
    """The whole cluster as it should be. A pure function of the config (see lifecycle.desired)."""

    cluster_name: str
    kubernetes_version: str
    nodes: tuple[NodeDesired, ...]  # sorted by name
    strategy: Strategy = field(default_factory=Strategy)
    cluster_certs: tuple[CertRequest, ...] = ()  # kept by rkel, delivered to no node
    prefix_path: str = ""  # RKE's prefix_path: node files live under it ("" for /)

    def node(self, name: str) -> NodeDesired | None:
        return next((n for n in self.nodes if n.name == name), None)

    @property
    def etcd_nodes(self) -> tuple[NodeDesired, ...]:
        return tuple(n for n in self.nodes if n.has("etcd"))

    @property
    def fingerprint(self) -> str:
        data = {
            "cluster": self.cluster_name,
            "version": self.kubernetes_version,
            "nodes": [
                {
                    "name": n.name,
                    "roles": n.roles,
                    "services": {s.name: s.hash for s in n.services},
                    "certs": n.certs_hash,
                }
                for n in self.nodes
            ],
        }
        return sha256_hex(canonical_json(data))[:16]
