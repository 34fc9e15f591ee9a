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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from operator import attrgetter
from typing import Any, TypeVar

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
# The hashed fields that differ from node to node (the arguments name the node, the labels
# carry its certificates' hash), and the others, which most nodes share.
_VARYING = ("args", "labels")
_varying_values = attrgetter(*_VARYING)
_SHARED_FIELDS = tuple(name for name, _ in _HASHED_FIELDS if name not in _VARYING)
_shared_values = attrgetter(*_SHARED_FIELDS)
_encode_str = json.encoder.encode_basestring_ascii


def strings_json(items: Sequence[str]) -> str:
    """canonical_json of a sequence of strings, faster: one join, and one escaping pass to check
    that no string needs escaping (escaping always lengthens the text); else the encoder."""
    if not items:
        return "[]"
    joined = "".join(items)
    if len(_encode_str(joined)) == len(joined) + 2:
        return '["' + '","'.join(items) + '"]'
    return canonical_json(items)


def _pairs_json(pairs: Sequence[Sequence[str]]) -> str:
    """canonical_json of pairs of strings (labels), faster (see `strings_json`)."""
    return "[" + ",".join(map(strings_json, pairs)) + "]"


class SpecHashes:
    """`ServiceSpec.hash` of many specs: the same text is hashed, but assembled from pieces made
    once. `compile_desired` shares equal binds, env, health checks... between nodes, so the
    text around the arguments and labels is the same for most specs: it is made once per
    distinct combination of those shared value objects (keyed by their ids), from the JSON of
    each value, itself made once per value object. Values are kept referenced, so an id cannot
    be reused while this lives."""

    def __init__(self) -> None:
        self._texts: dict[int, tuple[Any, str]] = {}
        self._frames: dict[tuple[int, ...], tuple[Any, tuple[str, str, str]]] = {}

    def __call__(self, spec: ServiceSpec) -> str:
        shared = _shared_values(spec)
        key = tuple(map(id, shared))
        hit = self._frames.get(key)
        if hit is None:
            hit = self._frames[key] = (shared, self._frame(spec))
        before, between, after = hit[1]
        args, labels = _varying_values(spec)
        text = before + strings_json(args) + between + self._json(labels, _pairs_json) + after
        return sha256_hex(text)[:16]

    def _frame(self, spec: ServiceSpec) -> tuple[str, str, str]:
        """The spec's JSON text before its arguments, between them and its labels, and after."""
        pieces, parts = [], []
        for name, key in _HASHED_FIELDS:
            value = getattr(spec, name)
            if name in _VARYING:
                parts.append(key)
                pieces.append(",".join(parts))
                parts = [""]
            elif value or name != "volumes_from":  # as ServiceSpec.hash drops it when empty
                parts.append(key + self._json(value))
        pieces.append(",".join(parts))
        return "{" + pieces[0], pieces[1], pieces[2] + "}"

    def _json(self, value: Any, encode: Callable[[Any], str] = _field_json) -> str:
        """`_field_json(value)` (or `encode`, which gives the same text), once per object."""
        hit = self._texts.get(id(value))
        if hit is None:
            hit = self._texts[id(value)] = (value, encode(value))
        return hit[1]


@dataclass(frozen=True)
class CertRequest:
    """One certificate a node needs: name (file stem under /etc/kubernetes/ssl), subject, SANs."""

    name: str
    common_name: str
    organizations: tuple[str, ...] = ()
    sans: tuple[str, ...] = ()
    ca: str = "kube-ca"  # which CA signs it ("kube-ca" or "kube-etcd-ca")
    # How many times `rkel cert rotate` renewed it: a new value is a new request, so the
    # certificate is issued again and what reads it restarts. 0 is left out of the hash.
    rotation: int = 0

    @property
    def hash(self) -> str:
        data = asdict(self)
        if not data["rotation"]:
            data.pop("rotation")
        return sha256_hex(canonical_json(data))[:16]


# CertRequest's fields in the order canonical_json writes them (sorted), with their keys.
_CERT_FIELDS = tuple(
    (f.name, f'"{f.name}":') for f in sorted(fields(CertRequest), key=lambda f: f.name)
)


def cert_hash(request: CertRequest) -> str:
    """`request.hash`, faster: its fields are strings and tuples of strings, so the same JSON is
    written here directly (see `strings_json`) instead of through asdict and the encoder."""
    parts = []
    for name, key in _CERT_FIELDS:
        value = getattr(request, name)
        if name == "rotation":
            if value:
                parts.append(f"{key}{int(value)}")
            continue
        parts.append(key + (_encode_str(value) if type(value) is str else strings_json(value)))
    return sha256_hex("{" + ",".join(parts) + "}")[:16]


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
    # Hash of the secrets encryption config the node receives with its certificates ("" none).
    encryption: str = ""

    def has(self, role: str) -> bool:
        return role in self.roles

    def service(self, name: str) -> ServiceSpec | None:
        return next((s for s in self.services if s.name == name), None)

    @property
    def certs_hash(self) -> str:
        hashes = [c.hash for c in self.certs]
        if self.encryption:
            hashes.append(f"encryption={self.encryption}")
        return sha256_hex(canonical_json(hashes))[:16]

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
    # Secrets encryption (lifecycle.encryption.Encryption): provider names and the file's hash.
    encryption: tuple[str, ...] = ()
    encryption_hash: str = ""

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
