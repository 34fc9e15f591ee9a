"""`rkel import`: adopt a cluster RKE built, as it runs, without touching a container.

Observe -> plan -> apply, as for every run. Before anything is written, RKE's state file is
checked (`lifecycle.rke_state`) against the certificates the cluster needs in RKE's layout
(`lifecycle.rke_layout`), and every node's containers are inspected: each one RKE named as rkel
does is compared with rkel's spec for it (image, entrypoint and command, arguments as a set as
RKE compares them, environment, binds, privileges, namespaces). The import is then a journaled
run of three kinds of steps:

* `import-certs`: RKE's certificates into the state, keys encrypted with the state key, and the
  state marked `pki_layout: rke`;
* `adopt-node`, one per node: the node and its services as observed. A service that matches
  its spec is recorded with the spec's hash (`rkel plan` leaves it alone); one that differs is
  recorded as it is (`rkel plan` shows the replacement, with the arguments that change);
  a missing one is not recorded (`rkel plan` starts it). The node's certificate files are
  compared with RKE's by sha256 on the node: the node records them as delivered only if they
  all match;
* `import-finish`: the Kubernetes version RKE deployed, the cluster name.

Nothing on a host changes. Killed anywhere, `rkel apply --resume` finishes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lifecycle import desired_certs as names
from lifecycle import rke_layout
from lifecycle.desired import ETCD_BOOTSTRAP_FLAGS, SIDEKICK
from lifecycle.errors import HostError, RkelError, StateError
from lifecycle.hosts import Backend, ContainerConfig
from lifecycle.pki import PKI, collect_requests, load_state_key
from lifecycle.plan import Current, Group, Plan, Step, Unit, as_data
from lifecycle.pki_x509 import load_cert
from lifecycle.rke_state import RkeState, check, read_rke_state
from lifecycle.spec import CertRequest, Desired, NodeDesired, NodeRef, ServiceSpec
from store import SetMeta, StateOp, Store, UpsertNode, UpsertService

if TYPE_CHECKING:
    from lifecycle.executor import Executor

ACTIONS = ("import-certs", "adopt-node", "import-finish")
IMPORTED_FROM = "imported_from"  # the state's cluster key: RKE state file path and sha256
# Containers RKE runs that rkel does not manage: left as they are, named in the import notes.
RKE_ONLY = ("rke-log-linker", "rke-log-cleaner", "rke-bundle-cert")


class AdoptionError(RkelError):
    """The cluster cannot be adopted into this state (it already holds one, or a run)."""

    exit_code = 3


class NodesUnreachable(AdoptionError):
    """Some nodes could not be inspected, so nothing was adopted."""

    exit_code = 6


@dataclass(frozen=True)
class Adopted:
    """One service as `rkel import` found it."""

    name: str
    state: str  # running | failed (exited) | absent
    spec_hash: str
    image: str
    spec: dict[str, Any]
    differences: tuple[str, ...]  # why it does not match rkel's spec; empty when it does


@dataclass(frozen=True)
class NodeFound:
    """One node as `rkel import` found it."""

    name: str
    services: tuple[Adopted, ...]
    certs_match: bool
    cert_differences: tuple[str, ...]
    unmanaged: tuple[str, ...]  # RKE's containers rkel leaves alone


@dataclass(frozen=True)
class ImportPlan:
    plan: Plan
    state: RkeState
    nodes: tuple[NodeFound, ...]
    notes: tuple[str, ...]
    certificates: tuple[str, ...]  # the names taken from RKE's state


# ---------------------------------------------------------------------------- checks
def refuse_used_state(store: Store, state: RkeState | None = None) -> None:
    """Import only into a state that holds no cluster (and say so when it is this very import)."""
    if store.unfinished_run() is not None:
        raise AdoptionError(
            f"the state {store.path} has an interrupted run; finish it with "
            "`rkel apply --resume` first"
        )
    done = store.get_meta(IMPORTED_FROM)
    if done and state is not None and done.get("sha256") == state.sha256 and store.nodes():
        raise AdoptionError(
            f"the state {store.path} already holds this cluster, imported from "
            f"{done.get('path')}; nothing to do. `rkel plan` shows what differs from cluster.yml"
        )
    nodes, certs = len(store.nodes()), len(store.certificates())
    if nodes or certs:
        raise AdoptionError(
            f"the state {store.path} already holds a cluster ({nodes} node(s), {certs} "
            "certificate(s)); `rkel import` adopts an RKE cluster into a new state. Give "
            "another --state (or -c with a cluster.yml in another directory), or manage this "
            "cluster with `rkel plan` and `rkel apply`"
        )


def checked_certificates(state: RkeState, desired: Desired) -> dict[str, Any]:
    """RKE's certificates that the adopted cluster uses, checked (see `rke_state.check`)."""
    return check(state, collect_requests(desired))


# ---------------------------------------------------------------------------- observe
def compare(spec: ServiceSpec, seen: ContainerConfig) -> tuple[tuple[str, ...], ServiceSpec]:
    """What differs between rkel's `spec` and the container as made (RKE's rule: arguments as a
    set; rkel's own labels and etcd's first-start flags do not count), and the container as a
    ServiceSpec (what the state records when it differs)."""
    argv = list(seen.argv)
    command = tuple(argv[:len(spec.command)])
    args = [a for a in argv[len(spec.command):]
            if not (spec.name == "etcd" and a.lstrip("-").split("=", 1)[0] in ETCD_BOOTSTRAP_FLAGS)]
    diffs: list[str] = []
    if seen.image != spec.image:
        diffs.append(f"image {seen.image} -> {spec.image}")
    if command != spec.command:
        diffs.append(f"command {' '.join(command) or '(image default)'} -> {' '.join(spec.command)}")
    _set_diff(diffs, "argument", args, spec.args)
    _set_diff(diffs, "env", seen.env, spec.env)
    _set_diff(diffs, "bind", seen.binds, spec.binds)
    _set_diff(diffs, "volumes_from", seen.volumes_from, spec.volumes_from)
    for what, have, want in (("privileged", seen.privileged, spec.privileged),
                             ("network mode", seen.network_mode or "default", spec.network_mode or "default"),
                             ("pid mode", seen.pid_mode or "private", spec.pid_mode or "private"),
                             ("restart policy", seen.restart or "no", spec.restart or "no")):
        if have != want:
            diffs.append(f"{what} {have} -> {want}")
    as_made = ServiceSpec(
        name=spec.name, image=seen.image, command=command, args=tuple(args), env=seen.env,
        binds=seen.binds, privileged=seen.privileged, network_mode=seen.network_mode,
        pid_mode=seen.pid_mode, restart=seen.restart, health=spec.health,
        volumes_from=seen.volumes_from,
    )
    return tuple(diffs), as_made


def _set_diff(out: list[str], what: str, have: Sequence[str], want: Sequence[str]) -> None:
    for value in sorted(set(have) - set(want)):
        out.append(f"{what} {value} dropped")
    for value in sorted(set(want) - set(have)):
        out.append(f"{what} {value} added")


def _adopt(spec: ServiceSpec, seen: ContainerConfig | None) -> Adopted | None:
    if seen is None:
        return None
    diffs, as_made = compare(spec, seen)
    # The sidekick only carries /opt/rke-tools: it exits at once, and is meant to.
    running = seen.running or spec.name == SIDEKICK
    if not diffs:
        return Adopted(spec.name, "running" if running else "failed", spec.hash, spec.image,
                       spec.to_dict(), ())
    return Adopted(spec.name, "running" if running else "failed", as_made.hash, seen.image,
                   as_made.to_dict(), diffs)


def observe_node(backend: Backend, want: NodeDesired, cert_files: Mapping[str, str]) -> NodeFound:
    """Inspect one node: its containers against `want`, its certificate files against
    `cert_files` (path -> sha256 of the PEM RKE's state holds)."""
    host = backend.host(_ref(want))
    present = host.containers()
    services = []
    for spec in want.services:
        found = _adopt(spec, host.inspect_container(spec.name) if spec.name in present else None)
        if found is not None:
            services.append(found)
    cert_diffs = []
    for path, digest in sorted(cert_files.items()):
        have = host.file_sha256(path)
        if have != digest:
            cert_diffs.append(f"{path} {'missing' if have is None else 'differs from RKE state'}")
    unmanaged = tuple(sorted(n for n in present if n in RKE_ONLY))
    return NodeFound(want.name, tuple(services), not cert_diffs, tuple(cert_diffs), unmanaged)


def _ref(node: NodeDesired) -> NodeRef:
    return NodeRef(node.name, node.address, node.internal_address, node.port, node.user,
                   node.roles)


def observe(backend: Backend, desired: Desired, certificates: Mapping[str, Any]) -> list[NodeFound]:
    """Every node, all at once; every unreachable node is named in one error."""
    def cert_files(node: NodeDesired) -> dict[str, str]:
        prefix = desired.prefix_path
        return {f"{prefix}{names.cert_path(c.name)}":
                hashlib.sha256(certificates[c.name].cert_pem.encode()).hexdigest()
                for c in node.certs}

    def one(node: NodeDesired) -> NodeFound | HostError:
        try:
            return observe_node(backend, node, cert_files(node))
        except HostError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, min(32, len(desired.nodes)))) as pool:
        results = list(pool.map(one, desired.nodes))
    failed = [r for r in results if isinstance(r, HostError)]
    if failed:
        raise NodesUnreachable(
            "cannot inspect every node, nothing was written:\n  "
            + "\n  ".join(str(e) for e in failed)
            + "\nFix access to these nodes (or drop them from cluster.yml if they are gone), "
            "then run `rkel import` again"
        )
    return [r for r in results if isinstance(r, NodeFound)]


# ---------------------------------------------------------------------------- plan
def import_plan(state: RkeState, desired: Desired, found: Sequence[NodeFound],
                current: Current) -> ImportPlan:
    """The import run: certificates, then every node as found, then the cluster's version."""
    version = state.kubernetes_version or desired.kubernetes_version
    by_name = {n.name: n for n in desired.nodes}
    requests = collect_requests(desired)
    cert_step = Step("cluster:import-certs", "", "import-certs", detail={
        "rke_state": str(state.path.resolve()), "sha256": state.sha256,
        "certificates": sorted(requests),
        "requests": {name: as_data(req) for name, req in sorted(requests.items())},
    })
    units = []
    notes: list[str] = []
    for node in found:
        want = by_name[node.name]
        detail = {
            "certs_hash": want.certs_hash if node.certs_match else "",
            "labels": dict(want.labels),
            "taints": [list(t) for t in want.taints],
            "services": [{"name": s.name, "state": s.state, "spec_hash": s.spec_hash,
                          "image": s.image, "spec": s.spec} for s in node.services],
        }
        units.append(Unit(node.name, "change",
                          (Step(f"{node.name}:adopt-node", node.name, "adopt-node", detail=detail),)))
        notes += _node_notes(want, node)
    missing = sorted(set(state.node_addresses) - {n.address for n in desired.nodes})
    if missing:
        notes.append(f"RKE's state lists node(s) cluster.yml does not: {', '.join(missing)}; "
                     "they are not adopted (their containers keep running)")
    if state.kubernetes_version and state.kubernetes_version != desired.kubernetes_version:
        notes.append(f"RKE deployed Kubernetes {state.kubernetes_version}; cluster.yml asks for "
                     f"{desired.kubernetes_version}: `rkel plan` shows that change")
    finish = Step("cluster:import-finish", "", "import-finish", detail={
        "cluster_name": desired.cluster_name, "kubernetes_version": version,
        "desired_fingerprint": desired.fingerprint, "rke_state": str(state.path.resolve()),
        "sha256": state.sha256,
    })
    groups = (
        Group("import", "import: RKE's certificates", 1, (Unit("cluster", "add", (cert_step,)),)),
        Group("import", f"import: {len(units)} node(s) as found", max(1, len(units)), tuple(units)),
        Group("import", "import: the cluster's version", 1, (Unit("cluster", "add", (finish,)),)),
    )
    plan = Plan(
        groups=groups,
        nodes=tuple(sorted((_ref(n) for n in desired.nodes), key=lambda r: r.name)),
        state_fingerprint=current.fingerprint,
        desired_fingerprint=desired.fingerprint,
        cluster_name=desired.cluster_name,
        kubernetes_version=version,
        summary={"import": len(units)},
    )
    return ImportPlan(plan, state, tuple(found), tuple(notes), tuple(sorted(requests)))


def _node_notes(want: NodeDesired, node: NodeFound) -> list[str]:
    notes = []
    seen = {s.name for s in node.services}
    for spec in want.services:
        if spec.name not in seen:
            notes.append(f"{node.name}: no {spec.name} container; `rkel apply` starts it")
    for s in node.services:
        if s.differences:
            notes.append(f"{node.name}: {s.name} differs from rkel's spec ({'; '.join(s.differences)});"
                         " `rkel apply` replaces it")
        elif s.state == "failed":
            notes.append(f"{node.name}: {s.name} is not running; `rkel apply` starts it again")
    if node.cert_differences:
        notes.append(f"{node.name}: certificate files {', '.join(node.cert_differences)};"
                     " `rkel apply` delivers RKE's certificates again")
    for name in node.unmanaged:
        notes.append(f"{node.name}: {name} is RKE's and left alone (rkel does not manage it)")
    return notes


def plan_note(store: Store, plan: Plan) -> str | None:
    """What `rkel plan` says of an adopted cluster whose add-ons rkel has not applied yet."""
    done = store.get_meta(IMPORTED_FROM)
    if not done or store.get_meta("addons"):
        return None
    if not any(s.action == "apply-addon" for s in plan.steps):
        return None
    return (f"this cluster was adopted from RKE ({done.get('path', '')}): RKE deployed its "
            "add-ons itself, so rkel applies its own manifests of them once (server-side "
            "apply over RKE's objects; nothing restarts for it)")


# ---------------------------------------------------------------------------- run
def _reread(step: Step) -> RkeState:
    """RKE's state file again (a resumed import reads it anew), refused if it changed."""
    detail = step.detail or {}
    state = read_rke_state(Path(detail["rke_state"]))
    if state.sha256 != detail.get("sha256"):
        raise StateError(
            f"{state.path} changed since the import started; put back the file it read "
            f"(sha256 {str(detail.get('sha256', ''))[:12]}...), then `rkel apply --resume`"
        )
    return state


def run_step(executor: Executor, plan: Plan, step: Step) -> None:
    """The effect of an import step: nothing on a host. The state file is read again for the
    certificates (`done_ops` stores them with the step's done row)."""
    if step.action == "import-certs":
        _reread(step)


def done_ops(store: Store, step: Step) -> list[StateOp]:
    """What the done row of an import step records, in the same transaction."""
    detail = step.detail or {}
    if step.action == "import-certs":
        state = _reread(step)
        pki = PKI(store, load_state_key(Path(store.path)))
        ops: list[StateOp] = []
        for name in detail.get("certificates", []):
            entry = state.certificates[name]
            req = _request(step, name)
            ops.append(pki.adopt(req, entry.cert_pem, entry.key_pem, _expiry(entry.cert_pem)))
        ops.append(SetMeta(rke_layout.LAYOUT_META, rke_layout.RKE))
        return ops
    if step.action == "adopt-node":
        ops = [UpsertNode(step.node, {"state": "running",
                                      "certs_hash": detail.get("certs_hash", ""),
                                      "labels": detail.get("labels", {}),
                                      "taints": detail.get("taints", [])})]
        for svc in detail.get("services", []):
            ops.append(UpsertService(step.node, svc["name"], {
                "state": svc["state"], "spec_hash": svc["spec_hash"], "image": svc["image"],
                "spec": svc["spec"]}))
        return ops
    if step.action == "import-finish":
        return [SetMeta("cluster_name", detail.get("cluster_name", "local")),
                SetMeta("kubernetes_version", detail.get("kubernetes_version", "")),
                SetMeta("desired_fingerprint", detail.get("desired_fingerprint", "")),
                SetMeta(IMPORTED_FROM, {"path": detail.get("rke_state", ""),
                                        "sha256": detail.get("sha256", "")})]
    raise RkelError(f"step {step.id}: unknown import action {step.action!r}")  # pragma: no cover


def _expiry(cert_pem: str) -> str:
    return load_cert(cert_pem).not_valid_after_utc.isoformat()


def _request(step: Step, name: str) -> CertRequest:
    requests = (step.detail or {}).get("requests", {})
    data = requests.get(name)
    if data is None:
        raise StateError(f"step {step.id} names certificate {name} without its request")
    return CertRequest(name=data["name"], common_name=data["common_name"],
                       organizations=tuple(data.get("organizations", ())),
                       sans=tuple(data.get("sans", ())), ca=data.get("ca", "kube-ca"))

