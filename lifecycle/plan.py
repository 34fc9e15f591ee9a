"""The planner: a pure function from (current, desired) to an ordered, phased Plan.

No I/O here: no sqlite, paramiko or docker. `Current` is what the store recorded (plus, later,
what was observed on hosts); `Desired` is compiled from cluster.yml. The plan is a list of groups,
each a set of per-node units run with a concurrency limit; groups run one after another, steps of a
unit one after another. Constraints live here:

* etcd members are started, changed and removed one at a time, adds before removals;
* controlplane nodes change `max_unavailable_controlplane` at a time, worker-only nodes in a
  sliding window of `max_unavailable_worker` (int or percent of worker-only nodes, rounded down,
  at least 1, no hidden cap), nodes with the etcd role one at a time;
* new nodes carry no workload, so they come up together;
* an etcd removal that would leave fewer healthy members than a quorum is refused.
"""

from __future__ import annotations

import copy
import json
import re
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from itertools import chain
from typing import TYPE_CHECKING, Any

from lifecycle.errors import PlanError

if TYPE_CHECKING:
    from lifecycle.addons import Addon
from lifecycle.spec import (
    CertRequest,
    Desired,
    HealthCheck,
    NodeDesired,
    NodeRef,
    ServiceSpec,
    SpecHashes,
    cert_hash,
    gc_paused,
    sha256_hex,
    strings_json,
)

PHASES = ("certs", "etcd", "controlplane", "workers", "addons", "removals")
ADDON_TIMEOUT = 300.0  # seconds an add-on may take to roll out (RKE: a fixed 45 s Job timeout)
# What a removed node keeps of rkel's: nothing. Paths on the node (under prefix_path), as RKE's
# `remove` cleans them, plus /opt/rke (snapshots on the node) and the kubelet's root.
NODE_PATHS = ("/etc/kubernetes", "/var/lib/etcd", "/opt/rke", "/var/lib/cni", "/etc/cni",
              "/opt/cni", "/var/run/calico", "/var/lib/calico", "/var/lib/kubelet")
# The order containers stop in when a node goes: workloads' side first, etcd last.
STOP_ORDER = ("kube-proxy", "kubelet", "nginx-proxy", "kube-scheduler", "kube-controller-manager",
              "kube-apiserver", "service-sidekick", "etcd-rolling-snapshots", "etcd")
# The containers of the etcd phase, started in this order: the member, then its snapshots.
ETCD_SERVICES = ("etcd", "etcd-rolling-snapshots")
NEW_NODE_STATES = ("absent", "certs")
FORGET_PATHS = ("/etc/kubernetes/ssl", "/var/lib/etcd")  # what `forget-node` removes


def node_paths(prefix: str, paths: tuple[str, ...] = NODE_PATHS) -> tuple[str, ...]:
    """`paths` on a node whose rkel files live under `prefix` (cluster.yml's prefix_path)."""
    prefix = prefix.rstrip("/")
    return tuple(f"{prefix}{p}" for p in paths)


# ---------------------------------------------------------------------------- current state
@dataclass(frozen=True)
class CurrentService:
    name: str
    state: str
    spec_hash: str = ""
    image: str = ""
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class CurrentNode:
    name: str
    address: str
    internal_address: str
    roles: tuple[str, ...]
    state: str
    certs_hash: str = ""
    port: int = 22
    user: str = ""
    services: tuple[CurrentService, ...] = ()
    # What rkel last applied to the Kubernetes Node (cluster.yml labels, role labels, taints).
    labels: tuple[tuple[str, str], ...] = ()
    taints: tuple[tuple[str, str, str], ...] = ()

    def service(self, name: str) -> CurrentService | None:
        return next((s for s in self.services if s.name == name), None)


@dataclass(frozen=True)
class Current:
    """What the store says is on the cluster now (nodes sorted by name)."""

    nodes: tuple[CurrentNode, ...] = ()
    unreachable: tuple[str, ...] = ()  # observed before planning; empty when not observed
    addons: tuple[tuple[str, str], ...] = ()  # (name, hash) of each add-on last applied

    def node(self, name: str) -> CurrentNode | None:
        return next((n for n in self.nodes if n.name == name), None)

    @property
    def fingerprint(self) -> str:
        """Changes whenever anything the planner reads changes: what a saved plan is checked by."""
        return sha256_hex(_canonical_values_json(self))[:16]


# ---------------------------------------------------------------------------- plain data
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}  # per dataclass: its field names, in order
_ATOMS = (str, int, float, bool, type(None))
_ATOM_TYPES = frozenset(_ATOMS)
_STRINGS = {str}


def as_data(value: Any) -> Any:
    """`dataclasses.asdict`, equal in result and several times faster on plans and specs.

    asdict deep-copies every leaf through a generic recursion, which at thousands of nodes is
    most of the planner's time. Here dicts and lists are fresh, as there, while strings,
    numbers and tuples of strings are shared: they are immutable, so the result is the same."""
    kind = type(value)
    if kind in _ATOM_TYPES:
        return value
    names = _FIELD_NAMES.get(kind)
    if names is not None:
        out = {}
        for name in names:
            item = getattr(value, name)
            sort = type(item)
            if sort in _ATOM_TYPES or (
                sort is tuple and (not item or set(map(type, item)) == _STRINGS)
            ):
                out[name] = item
            else:
                out[name] = as_data(item)
        return out
    if kind is tuple:
        if not value or set(map(type, value)) == _STRINGS:
            return value
        return tuple(as_data(v) for v in value)
    if kind is list:
        return [as_data(v) for v in value]
    if kind is dict:
        return {as_data(k): as_data(v) for k, v in value.items()}
    if isinstance(value, _ATOMS):
        return value
    if is_dataclass(value) and not isinstance(value, type):
        _FIELD_NAMES[kind] = tuple(f.name for f in fields(value))
        return as_data(value)
    return copy.deepcopy(value)  # as asdict does with anything else (plain namedtuples too)


_SPEC_FIELDS = tuple(f.name for f in fields(ServiceSpec))
_HEALTH_FIELDS = tuple(f.name for f in fields(HealthCheck))


def _spec_data(spec: ServiceSpec) -> dict[str, Any]:
    """`as_data(spec)` for a step, several times faster: a copy of the spec's own `__dict__`
    (its fields, in order, as __init__ sets them) and of its health check's (all atoms). The
    other values are shared rather than rebuilt: strings, tuples of strings and `labels`, a
    tuple of string pairs, are all immutable, so the result is equal and encodes the same."""
    data = dict(vars(spec))
    health = data["health"]
    if tuple(data) != _SPEC_FIELDS or (
        health is not None and tuple(vars(health)) != _HEALTH_FIELDS
    ):
        return as_data(spec)  # type: ignore[no-any-return]
    if health is not None:
        data["health"] = dict(vars(health))
    return data


# canonical_json with one encoder for all calls (json.dumps builds one per call): same text.
# Both encoders here skip the check for reference cycles (a marker per container encoded):
# what they encode is a tree of values, and the text is the same.
_canonical_json = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), default=str, check_circular=False
).encode


def _fields_or_str(value: Any) -> Any:
    """The encoder's fallback for `_canonical_values_json`: a dataclass as a dict of its
    fields (the encoder then goes on into them), anything else as canonical_json does.

    The dict is the instance's own `__dict__` when that holds exactly the fields (as a
    dataclass's __init__ sets them): no copy for each of the state's many values."""
    names = _FIELD_NAMES.get(type(value))
    if names is None:
        if not is_dataclass(value) or isinstance(value, type):
            return str(value)
        names = _FIELD_NAMES[type(value)] = tuple(f.name for f in fields(value))
    state = getattr(value, "__dict__", None)
    if state is not None and tuple(state) == names:
        return state
    return {name: getattr(value, name) for name in names}


# canonical_json(as_data(value)), without building the whole dict tree first: the same text.
_canonical_values_json = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), default=_fields_or_str, check_circular=False
).encode


class _Lookups:
    """What one diff looks up many times, built once per call: nodes by name (the first of a
    name, as `Current.node` and `Desired.node` give), and the hashes `ServiceSpec.hash`,
    `CertRequest.hash`, `NodeDesired.certs_hash` and `Desired.fingerprint`, by the same formulas
    (tests check they agree) but from `SpecHashes` and `cert_hash`, each computed once. Hashes
    are keyed by object identity; the objects are kept referenced here, so an id cannot be
    reused meanwhile."""

    def __init__(self, current: Current, desired: Desired) -> None:
        self.current: dict[str, CurrentNode] = {}
        for cur in current.nodes:
            self.current.setdefault(cur.name, cur)
        self.desired: dict[str, NodeDesired] = {}
        for want in desired.nodes:
            self.desired.setdefault(want.name, want)
        self._specs: dict[int, tuple[ServiceSpec, str]] = {}
        self._spec_hashes = SpecHashes()
        self._certs: dict[int, tuple[CertRequest, str]] = {}
        self._nodes: dict[int, tuple[NodeDesired, str]] = {}

    def spec(self, spec: ServiceSpec) -> str:
        """`spec.hash`."""
        hit = self._specs.get(id(spec))
        if hit is None:
            hit = self._specs[id(spec)] = (spec, self._spec_hashes(spec))
        return hit[1]

    def cert(self, cert: CertRequest) -> str:
        hit = self._certs.get(id(cert))
        if hit is None:
            hit = self._certs[id(cert)] = (cert, cert_hash(cert))
        return hit[1]

    def certs(self, node: NodeDesired) -> str:
        hit = self._nodes.get(id(node))
        if hit is None:
            hashes = [self.cert(c) for c in node.certs]
            if node.encryption:  # as NodeDesired.certs_hash
                hashes.append(f"encryption={node.encryption}")
            text = strings_json(hashes)
            hit = self._nodes[id(node)] = (node, sha256_hex(text)[:16])
        return hit[1]

    def fingerprint(self, desired: Desired) -> str:
        data = {
            "cluster": desired.cluster_name,
            "version": desired.kubernetes_version,
            "nodes": [
                {
                    "name": n.name,
                    "roles": n.roles,
                    "services": {s.name: self.spec(s) for s in n.services},
                    "certs": self.certs(n),
                }
                for n in desired.nodes
            ],
        }
        return sha256_hex(_canonical_json(data))[:16]


# ---------------------------------------------------------------------------- plan values
@dataclass(frozen=True)
class Step:
    """One journaled effect on one node. `id` is unique within a plan and stable across plans."""

    id: str
    node: str
    action: str
    service: str = ""
    spec: dict[str, Any] | None = None  # the ServiceSpec to run, for start/replace
    old_image: str = ""
    old_hash: str = ""
    args_removed: tuple[str, ...] = ()
    args_added: tuple[str, ...] = ()
    detail: dict[str, Any] | None = None  # action-specific data (e.g. certificate requests)

    @property
    def service_spec(self) -> ServiceSpec:
        assert self.spec is not None, f"step {self.id} carries no spec"
        return ServiceSpec.from_dict(self.spec)

    @property
    def new_image(self) -> str:
        return self.spec["image"] if self.spec else ""


@dataclass(frozen=True)
class Unit:
    """The steps of one node inside one group, run in order."""

    node: str
    kind: str  # add | change | remove
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Group:
    phase: str
    title: str
    concurrency: int
    units: tuple[Unit, ...]


@dataclass(frozen=True)
class Plan:
    groups: tuple[Group, ...]
    nodes: tuple[NodeRef, ...]
    state_fingerprint: str
    desired_fingerprint: str
    cluster_name: str = "local"
    kubernetes_version: str = ""
    etcd_members: tuple[NodeRef, ...] = ()  # desired etcd membership, for bootstrap args
    drain: bool = False
    drain_options: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, int] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A resumed run skips every step whose id has a done row: two steps sharing an id would
        # have the second skipped as if it had run.
        twice = sorted(i for i, n in Counter(s.id for s in self.steps).items() if n > 1)
        if twice:
            raise ValueError(f"plan has steps sharing an id: {', '.join(twice)}")

    @property
    def steps(self) -> tuple[Step, ...]:
        return tuple(chain.from_iterable(u.steps for g in self.groups for u in g.units))

    @property
    def empty(self) -> bool:
        return not self.groups

    def node_ref(self, name: str) -> NodeRef:
        # `nodes` is sorted by name (diff and teardown sort it): a binary search, with the
        # linear one for a hand-made plan.
        nodes = self.nodes
        i = bisect_left(nodes, name, key=lambda n: n.name)
        if i < len(nodes) and nodes[i].name == name:
            return nodes[i]
        return next(n for n in nodes if n.name == name)

    def to_dict(self) -> dict[str, Any]:
        return as_data(self)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        def step(d: dict[str, Any]) -> Step:
            return Step(
                **{
                    **d,
                    "args_removed": tuple(d.get("args_removed", ())),
                    "args_added": tuple(d.get("args_added", ())),
                }
            )

        def ref(d: dict[str, Any]) -> NodeRef:
            return NodeRef(**{**d, "roles": tuple(d["roles"])})

        groups = tuple(
            Group(
                phase=g["phase"],
                title=g["title"],
                concurrency=int(g["concurrency"]),
                units=tuple(
                    Unit(u["node"], u["kind"], tuple(step(s) for s in u["steps"]))
                    for u in g["units"]
                ),
            )
            for g in data["groups"]
        )
        return cls(
            groups=groups,
            nodes=tuple(ref(n) for n in data["nodes"]),
            state_fingerprint=data["state_fingerprint"],
            desired_fingerprint=data["desired_fingerprint"],
            cluster_name=data.get("cluster_name", "local"),
            kubernetes_version=data.get("kubernetes_version", ""),
            etcd_members=tuple(ref(n) for n in data.get("etcd_members", ())),
            drain=bool(data.get("drain", False)),
            drain_options=dict(data.get("drain_options", {})),
            summary=dict(data.get("summary", {})),
            warnings=tuple(data.get("warnings", ())),
        )


# ---------------------------------------------------------------------------- strategy
_PERCENT = re.compile(r"^\s*(\d+)\s*%\s*$")


def resolve_max_unavailable(value: str | int, total: int) -> int:
    """RKE's rule: an int as given, a percent of `total` rounded down; never below 1."""
    text = str(value).strip()
    match = _PERCENT.match(text)
    if match:
        count = int(match.group(1)) * total // 100
    else:
        try:
            count = int(text)
        except ValueError as exc:
            raise PlanError(f"max_unavailable {value!r} is neither a number nor a percent") from exc
    return max(1, count)


def quorum(members: int) -> int:
    return members // 2 + 1


# ---------------------------------------------------------------------------- the diff
def _ref(node: NodeDesired | CurrentNode) -> NodeRef:
    return NodeRef(
        name=node.name,
        address=node.address,
        internal_address=node.internal_address,
        port=node.port,
        user=node.user,
        roles=tuple(node.roles),
    )


def _is_new(cur: CurrentNode | None) -> bool:
    return cur is None or cur.state in NEW_NODE_STATES


def _service_steps(
    want: NodeDesired, cur: CurrentNode | None, names: list[str], hashes: _Lookups
) -> list[Step]:
    """start/replace steps for the named services of one node, in the node's start order."""
    steps: list[Step] = []
    # The node's services by name (the first of a name, as CurrentNode.service gives).
    current = {s.name: s for s in reversed(cur.services)} if cur else {}
    for spec in want.services:
        if spec.name not in names:
            continue
        have = current.get(spec.name)
        base = f"{want.name}:{spec.name}"
        spec_hash = hashes.spec(spec)  # hashed here whatever happens: the fingerprint needs it
        if have is None or have.state in ("absent", "certs") or not have.spec_hash:
            steps.append(Step(f"{base}:start", want.name, "start", spec.name, _spec_data(spec)))
        elif have.spec_hash != spec_hash or have.state != "running":
            old, new = set(have.args), set(spec.args)
            steps.append(
                Step(
                    f"{base}:replace:{spec_hash}",
                    want.name,
                    "replace",
                    spec.name,
                    _spec_data(spec),
                    old_image=have.image,
                    old_hash=have.spec_hash,
                    args_removed=tuple(sorted(old - new)) if have.args else (),
                    args_added=tuple(sorted(new - old)) if have.args else (),
                )
            )
    return steps


def _dropped_services(want: NodeDesired, cur: CurrentNode | None, keep_etcd: bool) -> list[Step]:
    if cur is None:
        return []
    wanted = {s.name for s in want.services}
    return [
        Step(f"{want.name}:{s.name}:remove", want.name, "remove-service", s.name, old_image=s.image)
        for s in cur.services
        if s.name not in wanted and (keep_etcd or s.name != "etcd")
    ]


def _node_unit(
    want: NodeDesired, cur: CurrentNode | None, services: list[str], drain: bool,
    hashes: _Lookups,
) -> Unit | None:
    """The unit that brings `services` of a node to desired, cordoning an existing node first."""
    # an etcd node's etcd containers belong to the etcd phase (see _etcd_groups)
    etcd_phase = ETCD_SERVICES if want.has("etcd") else ("etcd",)
    steps = _service_steps(want, cur, services, hashes) + [
        s for s in _dropped_services(want, cur, keep_etcd=True) if s.service not in etcd_phase
    ]
    new = _is_new(cur)
    needs_ready = new and "kubelet" in services
    metadata = _metadata_step(want, cur) if "kubelet" in services else None
    name = want.name
    if not steps and not needs_ready and not (cur is not None and cur.state != "running"):
        # Labels and taints alone change through the API: no cordon, no restart.
        return Unit(name, "change", (metadata,)) if metadata is not None else None
    tail = (metadata,) if metadata is not None else ()
    if new:
        return Unit(name, "add", tuple(steps) + (Step(f"{name}:ready", name, "wait-ready"),) + tail)
    prefix = [Step(f"{name}:cordon", name, "cordon")]
    if drain:
        prefix.append(Step(f"{name}:drain", name, "drain"))
    suffix = [Step(f"{name}:ready", name, "wait-ready"), *tail,
              Step(f"{name}:uncordon", name, "uncordon")]
    return Unit(name, "change", tuple(prefix + steps + suffix))


def _metadata_step(want: NodeDesired, cur: CurrentNode | None) -> Step | None:
    """Set the Node's labels and taints when they differ from what rkel last applied."""
    if cur is not None and (cur.labels, cur.taints) == (want.labels, want.taints):
        return None
    detail = {"labels": dict(want.labels), "taints": [list(t) for t in want.taints]}
    return Step(f"{want.name}:metadata", want.name, "node-metadata", detail=detail)


def _groups_for(
    phase: str, label: str, units: list[Unit], window: int
) -> list[Group]:
    """New nodes together, then changed nodes `window` at a time."""
    out: list[Group] = []
    adds = [u for u in units if u.kind == "add"]
    changes = [u for u in units if u.kind != "add"]
    if adds:
        out.append(Group(phase, f"{label}: {len(adds)} new, all at once", len(adds), tuple(adds)))
    if changes:
        title = f"{label}: {len(changes)} to change, at most {window} at a time"
        out.append(Group(phase, title, window, tuple(changes)))
    return out


def _etcd_groups(desired: Desired, look: _Lookups) -> list[Group]:
    units: list[Unit] = []
    # Existing members first, so a new member joins a cluster already at the desired version.
    order = sorted(desired.etcd_nodes, key=lambda n: (_is_new(look.current.get(n.name)), n.name))
    for want in order:
        cur = look.current.get(want.name)
        steps = _service_steps(want, cur, list(ETCD_SERVICES), look) + [
            s for s in _dropped_services(want, cur, keep_etcd=True) if s.service in ETCD_SERVICES
        ]
        if not steps:
            continue
        kind = "change"
        if steps[0].service == "etcd" and steps[0].action == "start":
            steps.insert(0, Step(f"{want.name}:etcd:join", want.name, "etcd-join", "etcd"))
            kind = "add"
        units.append(Unit(want.name, kind, tuple(steps)))
    if not units:
        return []
    return [Group("etcd", f"etcd members: {len(units)}, one at a time", 1, tuple(units))]


def _removal_groups(
    desired: Desired, current: Current, windows: dict[str, int], look: _Lookups
) -> list[Group]:
    """Nodes leaving (and etcd roles dropped): etcd members one at a time, others by their
    group's window, since a node being removed is drained first."""
    by_group: dict[str, list[Unit]] = {"etcd": [], "controlplane": [], "worker": []}
    for cur in current.nodes:
        want = look.desired.get(cur.name)
        name = cur.name
        if want is None:
            steps: list[Step] = []
            if cur.service("etcd"):
                steps.append(Step(f"{name}:etcd:leave", name, "etcd-leave", "etcd"))
            steps.append(Step(f"{name}:drain-out", name, "drain-out"))
            steps.append(Step(f"{name}:delete-node", name, "delete-node"))
            steps += _teardown_steps(cur.name, cur, desired.prefix_path)
            if cur.service("etcd"):
                group = "etcd"
            else:
                group = "controlplane" if "controlplane" in cur.roles else "worker"
            by_group[group].append(Unit(name, "remove", tuple(steps)))
        elif cur.service("etcd") and not want.has("etcd"):
            steps = [
                Step(f"{name}:etcd:leave", name, "etcd-leave", "etcd"),
                Step(f"{name}:etcd:remove", name, "remove-service", "etcd", old_image=""),
            ]
            by_group["etcd"].append(Unit(name, "change", tuple(steps)))
    order = {name: i for i, name in enumerate(_leaving_order(current, look))}
    by_group["etcd"].sort(key=lambda u: order.get(u.node, len(order)))
    groups = []
    titles = {"etcd": "etcd members to remove", "controlplane": "controlplane nodes to remove",
              "worker": "nodes to remove"}
    for key in ("etcd", "controlplane", "worker"):
        units = by_group[key]
        if units:
            window = 1 if key == "etcd" else windows[key]
            title = f"{titles[key]}: {len(units)}, " + (
                "one at a time" if window == 1 else f"at most {window} at a time"
            )
            groups.append(Group("removals", title, window, tuple(units)))
    return groups


def _leaving_order(current: Current, look: _Lookups) -> list[str]:
    """etcd members that leave, unreachable ones first (their leaving costs no healthy vote)."""
    members = [n.name for n in current.nodes if n.service("etcd") and n.state != "absent"]
    leaving = [m for m in members
               if (want := look.desired.get(m)) is None or not want.has("etcd")]
    return sorted(leaving, key=lambda m: (m not in current.unreachable, m))


def _check_quorum(desired: Desired, current: Current, look: _Lookups) -> None:
    """Refuse a plan whose etcd removals would, at any point, leave no healthy quorum.

    A member can only be removed through a cluster that has quorum, and what remains after
    each removal must still have it."""
    members = [n.name for n in current.nodes if n.service("etcd") and n.state != "absent"]
    known = set(members)
    members += [n.name for n in desired.etcd_nodes if n.name not in known]
    unhealthy = set(current.unreachable) & set(members)
    size, healthy = len(members), len(members) - len(unhealthy)
    for name in _leaving_order(current, look):
        if healthy < quorum(size):
            raise PlanError(
                f"etcd has {healthy} healthy member(s) of {size}, below quorum ({quorum(size)}): "
                f"member etcd-{name} cannot be removed. Bring the unreachable members back first"
            )
        size -= 1
        healthy -= 0 if name in unhealthy else 1
        if size < 1 or healthy < quorum(size):
            raise PlanError(
                f"removing etcd member etcd-{name} would leave {healthy} healthy member(s) "
                f"of {size}, below quorum ({quorum(size) if size else 1}); bring the unhealthy "
                "members back first, or remove fewer etcd nodes in this change"
            )


def _certs_group(desired: Desired, look: _Lookups) -> list[Group]:
    units = []
    for want in desired.nodes:
        cur = look.current.get(want.name)
        certs_hash = look.certs(want)
        if cur is None or cur.certs_hash != certs_hash or cur.state in ("absent", "failed"):
            detail: dict[str, Any] = {"certs": [as_data(c) for c in want.certs],
                                      "certs_hash": certs_hash}
            if want.encryption:  # key names and hash only: the keys stay in the state
                detail["encryption"] = {"providers": list(desired.encryption),
                                        "hash": want.encryption}
            if desired.prefix_path:  # files go under prefix_path, where the services bind them
                detail["prefix"] = desired.prefix_path
            step = Step(f"{want.name}:certs:{certs_hash}", want.name, "deliver-certs", detail=detail)
            units.append(Unit(want.name, "add" if _is_new(cur) else "change", (step,)))
    if not units:
        return []
    return [Group("certs", f"certificates: {len(units)} node(s)", len(units), tuple(units))]


def _addon_groups(current: Current, addons: Sequence[Addon], timeout: float) -> list[Group]:
    """Add-ons whose objects changed (or are new), applied one after another through the API.
    Their steps belong to no node (node ""); an add-on dropped from cluster.yml is only
    forgotten, its objects stay (as with RKE)."""
    applied = dict(current.addons)
    units = []
    for addon in addons:
        if applied.get(addon.name) == addon.hash:
            continue
        detail = {"name": addon.name, "hash": addon.hash, "docs": list(addon.docs),
                  "timeout": timeout}
        step = Step(f"addon:{addon.name}:{addon.hash}", "", "apply-addon", detail=detail)
        units.append(Unit(addon.name, "change" if addon.name in applied else "add", (step,)))
    if not units:
        return []
    return [Group("addons", f"add-ons: {len(units)}, one after another", 1, tuple(units))]


@gc_paused
def diff(current: Current, desired: Desired, addons: Sequence[Addon] = (),
         addon_timeout: float = ADDON_TIMEOUT) -> Plan:
    """Plan every step that takes the cluster from `current` to `desired` (and its add-ons),
    in safe order."""
    look = _Lookups(current, desired)
    _check_quorum(desired, current, look)
    workers = [n for n in desired.nodes if n.group == "worker"]
    cps = [n for n in desired.nodes if n.group == "controlplane"]
    worker_window = resolve_max_unavailable(
        desired.strategy.max_unavailable_worker, max(1, len(workers))
    )
    cp_window = resolve_max_unavailable(
        desired.strategy.max_unavailable_controlplane, max(1, len(cps))
    )
    drain = desired.strategy.drain

    def units(nodes: list[NodeDesired]) -> list[Unit]:
        out = []
        for want in nodes:
            names = [s.name for s in want.services if s.name not in ETCD_SERVICES]
            unit = _node_unit(want, look.current.get(want.name), names, drain, look)
            if unit is not None:
                out.append(unit)
        return out

    groups: list[Group] = []
    groups += _certs_group(desired, look)
    groups += _etcd_groups(desired, look)
    groups += _groups_for("controlplane", "controlplane nodes", units(cps), cp_window)
    etcd_only = [n for n in desired.nodes if n.group == "etcd"]
    groups += _groups_for("workers", "nodes with the etcd role", units(etcd_only), 1)
    groups += _groups_for("workers", "worker nodes", units(workers), worker_window)
    groups += _addon_groups(current, addons, addon_timeout)
    groups += _removal_groups(
        desired, current, {"worker": worker_window, "controlplane": cp_window}, look
    )

    refs = {n.name: _ref(n) for n in current.nodes}
    refs.update({n.name: _ref(n) for n in desired.nodes})
    plan_steps = [s for g in groups for u in g.units for s in u.steps]
    summary = {
        "add": sum(1 for s in plan_steps if s.action == "start"),
        "change": sum(1 for s in plan_steps if s.action == "replace"),
        "remove": sum(1 for s in plan_steps if s.action == "remove-service"),
        "nodes_added": sum(1 for n in desired.nodes if _is_new(look.current.get(n.name))),
        "nodes_removed": sum(1 for n in current.nodes if n.name not in look.desired),
        "addons": sum(1 for s in plan_steps if s.action == "apply-addon"),
    }
    return Plan(
        groups=tuple(groups),
        nodes=tuple(refs[k] for k in sorted(refs)),
        state_fingerprint=current.fingerprint,
        desired_fingerprint=look.fingerprint(desired),
        cluster_name=desired.cluster_name,
        kubernetes_version=desired.kubernetes_version,
        etcd_members=tuple(_ref(n) for n in desired.etcd_nodes),
        drain=drain,
        drain_options={
            "force": desired.strategy.drain_force,
            "ignore_daemonsets": desired.strategy.drain_ignore_daemonsets,
            "delete_local_data": desired.strategy.drain_delete_local_data,
            "grace_period": desired.strategy.drain_grace_period,
            "timeout": desired.strategy.drain_timeout,
        },
        summary=summary,
    )


def _stop_rank(name: str) -> tuple[int, str]:
    return (STOP_ORDER.index(name) if name in STOP_ORDER else -1, name)


def _teardown_steps(name: str, cur: CurrentNode | None, prefix: str) -> list[Step]:
    """Stop and remove every container rkel runs on the node, clean its files (under
    prefix_path), forget it."""
    services = sorted(cur.services if cur else (), key=lambda s: _stop_rank(s.name))
    steps = [Step(f"{name}:{s.name}:remove", name, "remove-service", s.name, old_image=s.image)
             for s in services]
    steps.append(Step(f"{name}:clean", name, "clean-node",
                      detail={"paths": list(node_paths(prefix))}))
    # without a prefix_path the executor's default paths (no detail: plans stay as they were)
    forget = {"paths": list(node_paths(prefix, FORGET_PATHS))} if prefix.strip("/") else None
    steps.append(Step(f"{name}:forget", name, "forget-node", detail=forget))
    return steps


def teardown(current: Current, nodes: tuple[NodeRef, ...], cluster_name: str,
             prefix: str = "") -> Plan:
    """`rkel remove`: every node the store or cluster.yml knows, all at once, emptied.

    Kubernetes is not asked anything (it goes away with its control plane); etcd members are
    not removed one by one (the whole cluster goes, quorum does not matter any more)."""
    refs = {n.name: _ref(n) for n in current.nodes}
    refs.update({n.name: n for n in nodes})
    known: dict[str, CurrentNode] = {}
    for cur in current.nodes:
        known.setdefault(cur.name, cur)
    units = tuple(
        Unit(name, "remove", tuple(_teardown_steps(name, known.get(name), prefix)))
        for name in sorted(refs)
    )
    groups = (Group("removals", f"remove the cluster: {len(units)} node(s), all at once",
                    max(1, len(units)), units),) if units else ()
    return Plan(
        groups=groups,
        nodes=tuple(refs[k] for k in sorted(refs)),
        state_fingerprint=current.fingerprint,
        desired_fingerprint="",
        cluster_name=cluster_name,
        summary={"add": 0, "change": 0, "remove": sum(
            1 for u in units for s in u.steps if s.action == "remove-service"),
            "nodes_added": 0, "nodes_removed": len(units)},
    )


def restrict(plan: Plan, phases: tuple[str, ...]) -> Plan:
    """Only the groups of `phases` (and the certificates they need): one plane at a time."""
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise PlanError(f"unknown phase {', '.join(unknown)}; phases are {', '.join(PHASES)}")
    keep = set(phases) | {"certs"}
    groups = tuple(g for g in plan.groups if g.phase in keep)
    steps = [s for g in groups for u in g.units for s in u.steps]
    summary = {
        **plan.summary,
        "add": sum(1 for s in steps if s.action == "start"),
        "change": sum(1 for s in steps if s.action == "replace"),
        "remove": sum(1 for s in steps if s.action == "remove-service"),
        "addons": sum(1 for s in steps if s.action == "apply-addon"),
    }
    skipped = [g.phase for g in plan.groups if g.phase not in keep]
    warnings = plan.warnings + (
        (f"limited to {', '.join(sorted(keep))}; not planned now: {', '.join(skipped)}",)
        if skipped else ()
    )
    return replace(plan, groups=groups, summary=summary, warnings=warnings)
