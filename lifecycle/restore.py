"""Restore and rollback: etcd data from a catalogued snapshot, then (rollback) every component back
to the versions and specs of the cluster.yml recorded with it, as one journaled, resumable run.

A restore is a plan like any other: groups of per-node steps the executor journals, so a run
killed anywhere continues with `rkel apply --resume`. Its groups, in order, each stopping the run
at the first failure:

1. **stage** (every etcd node at once): the snapshot file with the catalogued sha256 is on the
   node, uploaded from the local copy where missing or different; leftover helper containers of
   an earlier failed restore are removed. Nothing has been stopped yet: an unreachable node or a
   bad copy ends the run here, with the cluster untouched.
2. **stop**: kube-apiserver on every controlplane node, then etcd on every etcd node.
3. **restore-member** (every etcd node): `etcdctl snapshot restore` of the same file into a
   staging directory beside the member's data, with the full initial cluster and a new cluster
   token; then the old data is set aside (`member.pre-restore-<token>`, kept until the restored
   cluster is healthy) and the restored data moved in. Safe to run again at any point.
4. **start etcd** (all members at once: a restored cluster needs its quorum to come up), then
   wait until every member is healthy.
5. **start the control plane**, then restart every other Kubernetes component (their caches
   describe the cluster after the snapshot) and remove the set-aside data.

RKE, by contrast, wipes the etcd nodes before it knows the restore can succeed and leaves every
component at the new version. `rollback` appends the ordinary planner's diff to the recorded
desired state: components downgraded through the same rolling, health-gated path as an upgrade.

The cluster.yml that was applied is kept sealed (Fernet, the state key) in the store and with
each snapshot: it holds SSH keys and registry passwords, which never sit in the database in clear.
"""

from __future__ import annotations

import difflib
import hashlib
import posixpath
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from cryptography.fernet import Fernet, InvalidToken

from lifecycle.errors import HostError, RkelError, StateError
from lifecycle.hosts import Backend
from lifecycle.plan import Group, Plan, Step, Unit
from lifecycle.snapshots import (
    APPLIED_CONFIG,
    ETCDCTL,
    SNAPSHOT_DIR,
    SnapshotError,
    sha256_file,
)
from lifecycle.spec import NodeRef, ServiceSpec
from store import SetMeta, SnapshotRow, Store

if TYPE_CHECKING:
    from lifecycle.executor import Executor

PENDING_CONFIG = "pending_config"  # meta: the sealed cluster.yml of the run under way
CONTROL_PLANE = ("kube-apiserver",)
# A run changing one of these gets an automatic snapshot first.
SNAPSHOT_SERVICES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
# Restarted once etcd holds the snapshot's data (their caches and watches describe later data).
RESTART = ("kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "nginx-proxy")
ACTIONS = ("restore-stage", "restore-stop", "restore-member", "restore-start", "restore-wait",
           "restore-restart", "restore-cleanup")
HEALTH_RETRIES = 60
HEALTH_INTERVAL = 2.0
ETCD_INSIDE = "/var/lib/rancher/etcd"  # etcd's data dir inside its container
SECRET_KEYS = frozenset({"ssh_key", "ssh_cert", "password", "secret_key", "access_key",
                         "secrets_encryption_config", "custom_config", "token", "key"})


# ---------------------------------------------------------------------------- sealed config
def seal(key: bytes, text: str) -> dict[str, str]:
    """cluster.yml `text` encrypted with the state key, with its sha256 (of the clear text)."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    return {"sha256": digest, "sealed": Fernet(key).encrypt(text.encode()).decode()}


def unseal(sealed: dict[str, Any], key: bytes, what: str) -> str:
    """The clear cluster.yml of a `seal` result; StateError when the key or the data is wrong."""
    try:
        text = Fernet(key).decrypt(str(sealed["sealed"]).encode()).decode()
    except (InvalidToken, KeyError, TypeError, ValueError) as exc:
        raise StateError(f"the cluster.yml recorded with {what} cannot be decrypted with this"
                         " state key (a different key, or the record was changed)") from exc
    if hashlib.sha256(text.encode()).hexdigest() != sealed.get("sha256"):
        raise StateError(f"the cluster.yml recorded with {what} does not match its checksum")
    return text


def mark_pending(store: Store, sealed: dict[str, str] | None) -> None:
    """What the run about to start applies; it becomes the applied config when the run ends."""
    store.apply_ops([SetMeta(PENDING_CONFIG, sealed)])


def promote_pending(store: Store) -> None:
    """The run ended well: the cluster now runs what it applied."""
    pending = store.get_meta(PENDING_CONFIG)
    if pending:
        store.apply_ops([SetMeta(APPLIED_CONFIG, pending), SetMeta(PENDING_CONFIG, None)])


def redacted_diff(old: str, new: str, old_name: str, new_name: str) -> str:
    """A unified diff from `new` to `old` (two cluster.yml texts), compared as YAML data with
    every secret replaced: SSH keys, passwords, S3 keys and the encryption config by
    <redacted>, inline add-ons by their sha256 (they may hold Secrets). The diff is printed;
    secrets never are."""
    def lines(text: str) -> list[str]:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            return [f"# (not valid YAML: {str(exc).splitlines()[0]})\n"]
        dumped = yaml.safe_dump(_redact(data), sort_keys=False, default_flow_style=False,
                                allow_unicode=True, width=100)
        return dumped.splitlines(keepends=True)
    return "".join(difflib.unified_diff(lines(new), lines(old), new_name, old_name))


def _redact(value: Any, key: str = "") -> Any:
    if key in SECRET_KEYS and value not in (None, ""):
        return "<redacted>"
    if key == "addons" and isinstance(value, str):
        return f"<inline add-ons, sha256 {hashlib.sha256(value.encode()).hexdigest()[:12]}>"
    if isinstance(value, dict):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


# ---------------------------------------------------------------------------- choosing a snapshot
def target(store: Store, name: str | None) -> SnapshotRow:
    """The snapshot to roll back to: `name`, or the newest automatic one. Refused when its
    catalogue row was changed outside rkel (its seal does not hold)."""
    if name:
        row = store.snapshot(name)
        if row is None:
            known = ", ".join(r.name for r in store.snapshots()[-5:]) or "none"
            raise SnapshotError(f"no snapshot named {name!r} (newest: {known}); see"
                                " `rkel snapshot list`")
    else:
        autos = [r for r in store.snapshots() if r.kind == "auto"]
        if not autos:
            raise SnapshotError("there is no automatic snapshot to roll back to (rkel takes one"
                                " before each run that changes etcd, the control plane or"
                                " versions); name one with --to (see `rkel snapshot list`)")
        row = autos[-1]
    problems = store.catalogue_problems(row.name)
    if problems:
        raise SnapshotError(f"{'; '.join(problems)}: it cannot be trusted for a restore, and"
                            " nothing was stopped; run `rkel state verify`, and pick another"
                            " snapshot (`rkel snapshot list`)")
    return row


def recorded_config(row: SnapshotRow, key: bytes) -> str:
    """The cluster.yml text the cluster ran when `row` was taken."""
    sealed = row.location.get("cluster_yml")
    if not sealed and row.kind == "recurring":
        raise SnapshotError(f"snapshot {row.name} is a recurring one (etcd-rolling-snapshots):"
                            " it holds etcd data only, and nobody recorded the versions or the"
                            f" cluster.yml with it; `rkel snapshot restore {row.name}` restores"
                            " its data and keeps today's versions")
    if not sealed:
        raise SnapshotError(f"snapshot {row.name} carries no cluster.yml (it was taken before"
                            " rkel recorded the applied config); `rkel snapshot restore"
                            f" {row.name}` restores its etcd data and keeps today's versions")
    return unseal(sealed, key, f"snapshot {row.name}")


def check_local(row: SnapshotRow, backend: Backend, refs: dict[str, NodeRef]) -> list[str]:
    """Make sure a local copy with the catalogued checksum exists before anything is planned:
    fetched from the first node whose copy matches when the local one is missing or corrupt.
    Returns notices; SnapshotError (nothing stopped) when no copy matches."""
    local = Path(str(row.location.get("local", "")))
    problems: list[str] = []
    if local.is_file():
        digest, _ = sha256_file(local)
        if digest == row.sha256:
            return []
        problems.append(f"local copy {local} has sha256 {digest}")
    else:
        problems.append(f"local copy {local} is missing")
    remote = str(row.location.get("path", ""))
    for name in row.location.get("nodes", []):
        ref = refs.get(str(name))
        if ref is None:
            continue
        try:
            host = backend.host(ref)
            got = host.file_sha256(remote)
            if got != row.sha256:
                problems.append(f"{name}: {remote} has sha256 {got or '(missing)'}")
                continue
            local.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            part = local.with_name(f".{local.name}.part")
            with part.open("wb") as out:
                host.fetch_file(remote, out)
            part.chmod(0o600)
            if sha256_file(part)[0] != row.sha256:
                part.unlink(missing_ok=True)
                problems.append(f"{name}: the fetched copy does not match")
                continue
            part.replace(local)
            return [f"{'; '.join(problems)}: fetched the good copy from {name}"]
        except HostError as exc:
            problems.append(f"{name}: {exc}")
    raise SnapshotError(
        f"snapshot {row.name} cannot be restored: no copy matches its catalogued sha256"
        f" {row.sha256} ({'; '.join(problems)}); nothing was stopped. Pick another snapshot"
        " (`rkel snapshot list`, `rkel snapshot verify`)")


# ---------------------------------------------------------------------------- planning
def _ref(store: Store, name: str) -> NodeRef:
    row = store.node(name)
    assert row is not None
    return NodeRef(row.name, row.address, row.internal_address, row.port, row.user,
                   tuple(row.roles))


def _step(node: str, action: str, detail: dict[str, Any]) -> Step:
    """A restore step; its id names the services it acts on, as a node starts etcd and then
    kube-apiserver in two groups: the journal tells them apart on resume."""
    services = "+".join(str(s) for s in detail.get("services", ()))
    return Step(id=":".join(filter(None, (node or "cluster", action, services))), node=node,
                action=action, detail=detail)


def _unit(node: str, *steps: Step) -> Unit:
    return Unit(node, "change", steps)


def restore_groups(store: Store, row: SnapshotRow, token: str | None = None,
                   skip_restart: set[tuple[str, str]] | frozenset = frozenset(),
                   ) -> tuple[tuple[Group, ...], tuple[NodeRef, ...]]:
    """The restore's groups (see the module docstring) for the cluster the store records, and
    the nodes they touch; components in `skip_restart` (node, service) are not restarted (the
    rollback replaces them next). Refused when the store has no running etcd member."""
    etcd = {s.node: ServiceSpec.from_dict(s.spec) for s in store.services()
            if s.name == "etcd" and s.spec_hash and s.spec}
    if not etcd:
        raise SnapshotError("the state records no etcd member rkel runs: nothing to restore into"
                            " (run `rkel apply` first)")
    token = token or f"rkel-restore-{secrets.token_hex(4)}"
    refs = {n: _ref(store, n) for n in etcd}
    cps = sorted({s.node for s in store.services() if s.name in CONTROL_PLANE and s.spec_hash})
    running = sorted({s.node for s in store.services() if s.name in RESTART and s.spec_hash})
    for name in {*cps, *running}:
        refs.setdefault(name, _ref(store, name))
    members = ",".join(f"etcd-{n}=https://{refs[n].internal_address}:2380" for n in sorted(etcd))
    remote = str(row.location.get("path", ""))
    stage = tuple(_unit(n, _step(n, "restore-stage", {
        "snapshot": row.name, "path": remote, "sha256": row.sha256, "size": row.size,
        "local": str(row.location.get("local", ""))})) for n in sorted(etcd))
    stop = tuple(_unit(n, _step(n, "restore-stop", {"services": [
        s for s in (*CONTROL_PLANE, "etcd") if (s == "etcd" and n in etcd) or
        (s != "etcd" and n in cps)]})) for n in sorted({*cps, *etcd}))
    restore = tuple(_unit(n, _step(n, "restore-member", {
        "snapshot": row.name, "path": remote, "sha256": row.sha256, "size": row.size,
        "local": str(row.location.get("local", "")), "token": token, "member": f"etcd-{n}",
        "initial_cluster": members, "peer_url": f"https://{refs[n].internal_address}:2380",
        "image": spec.image, "binds": list(spec.binds)})) for n, spec in sorted(etcd.items()))
    start_etcd = tuple(_unit(n, _step(n, "restore-start", {"services": ["etcd"]}))
                       for n in sorted(etcd))
    wait = (_unit("", _step("", "restore-wait", {"members": sorted(f"etcd-{n}" for n in etcd)})),)
    start_cp = tuple(_unit(n, _step(n, "restore-start", {"services": list(CONTROL_PLANE)}))
                     for n in cps)
    restarts = {n: sorted(s.name for s in store.services(n) if s.name in RESTART
                          and s.spec_hash and (n, s.name) not in skip_restart) for n in running}
    restart = tuple(_unit(n, _step(n, "restore-restart", {"services": names}))
                    for n, names in restarts.items() if names)
    cleanup = tuple(_unit(n, _step(n, "restore-cleanup", {
        "data_dir": _data_dir(spec), "keep": f"member.pre-restore-{token}"}))
        for n, spec in sorted(etcd.items()))
    everyone = len(refs)
    groups = (
        Group("restore", f"check snapshot {row.name} on every etcd node (nothing stopped yet)",
              everyone, stage),
        Group("restore", "stop kube-apiserver and etcd", everyone, stop),
        Group("restore", f"restore every etcd member from {row.name}", everyone, restore),
        Group("restore", "start etcd on every member", everyone, start_etcd),
        Group("restore", "wait until every etcd member is healthy", 1, wait),
        Group("restore", "start the control plane", everyone, start_cp),
        Group("restore", "restart the other components; drop the set-aside etcd data",
              everyone, tuple(_merge(restart, cleanup))),
    )
    return tuple(g for g in groups if g.units), tuple(refs[n] for n in sorted(refs))


def _merge(*unit_lists: tuple[Unit, ...]) -> list[Unit]:
    """One unit per node holding the steps of every list, in list order."""
    by_node: dict[str, list[Step]] = {}
    for units in unit_lists:
        for unit in units:
            by_node.setdefault(unit.node, []).extend(unit.steps)
    return [_unit(node, *steps) for node, steps in sorted(by_node.items())]


def _data_dir(spec: ServiceSpec) -> str:
    for bind in spec.binds:
        source, _, rest = bind.partition(":")
        if rest.split(":")[0] == ETCD_INSIDE:
            return source
    return "/var/lib/etcd"


def restore_plan(store: Store, row: SnapshotRow, fingerprint: str, cluster_name: str,
                 then: Plan | None = None) -> Plan:
    """The restore's groups, followed (rollback) by `then`'s."""
    replaced = {(s.node, s.service) for s in then.steps if s.action == "replace"} if then else set()
    groups, refs = restore_groups(store, row, skip_restart=replaced)
    nodes = {r.name: r for r in refs}
    if then is not None:
        nodes.update({r.name: r for r in then.nodes})
    base = then or Plan((), (), fingerprint, "", cluster_name)
    summary = {**base.summary, "restore": 1}
    return Plan(groups=groups + base.groups, nodes=tuple(nodes[k] for k in sorted(nodes)),
                state_fingerprint=fingerprint, desired_fingerprint=base.desired_fingerprint,
                cluster_name=base.cluster_name or cluster_name,
                kubernetes_version=base.kubernetes_version, etcd_members=base.etcd_members,
                drain=base.drain, drain_options=base.drain_options, summary=summary,
                warnings=base.warnings)


# ---------------------------------------------------------------------------- effects
def run_step(executor: Executor, plan: Plan, step: Step) -> None:
    """The effect of one restore step (called by the executor, which journals it)."""
    detail = step.detail or {}
    backend = executor.backend
    if step.action == "restore-wait":
        wait_healthy(backend, list(detail.get("members", [])))
        return
    host = backend.host(plan.node_ref(step.node))
    services = [str(s) for s in detail.get("services", [])]
    if step.action == "restore-stage":
        _remove_helpers(host)
        stage(host, str(detail["path"]), str(detail["sha256"]), int(detail["size"]),
              Path(str(detail["local"])))
    elif step.action == "restore-stop":
        have = host.containers()
        for name in services:
            if name in have and have[name].running:
                host.stop_container(name)
    elif step.action == "restore-member":
        if "sha256" in detail:  # still there? (a resume may come long after the stage)
            stage(host, str(detail["path"]), str(detail["sha256"]), int(detail["size"]),
                  Path(str(detail["local"])), then="etcd is stopped; put a good copy there or"
                  " at the local path, then `rkel apply --resume`")
        restore_member(host, detail)
    elif step.action == "restore-start":
        have = host.containers()
        for name in services:
            if name in have and not have[name].running:
                host.start_container(name)
    elif step.action == "restore-restart":
        have = host.containers()
        for name in services:
            if name in have:
                if have[name].running:
                    host.stop_container(name)
                host.start_container(name)
    elif step.action == "restore-cleanup":
        host.remove_paths([posixpath.join(str(detail["data_dir"]), str(detail["keep"]))])
    else:  # pragma: no cover - restore_groups emits only the actions above
        raise RkelError(f"step {step.id}: unknown restore action {step.action!r}")


def _remove_helpers(host: Any) -> None:
    """An earlier, interrupted restore may have left one-shot containers: never a blocker."""
    for name, container in host.containers().items():
        if name.startswith("rkel-helper-") and not container.running:
            host.remove_container(name)


def stage(host: Any, remote: str, digest: str, size: int, local: Path,
          then: str = "nothing was stopped") -> None:
    """The snapshot file with `digest` at `remote` on the node, uploaded where it is not.
    `then`: what the errors add about the cluster's state."""
    if host.file_sha256(remote) == digest:
        return
    if not local.is_file() or sha256_file(local)[0] != digest:
        raise SnapshotError(f"{host.name}: {remote} is missing or differs, and the local copy"
                            f" {local} does not match sha256 {digest} either; {then}")
    with local.open("rb") as src:
        host.put_file(remote, src, size)
    got = host.file_sha256(remote)
    if got != digest:
        raise SnapshotError(f"{host.name}: uploaded {remote} but it reads back as sha256"
                            f" {got or '(missing)'}, expected {digest}; {then}")


def restore_member(host: Any, detail: dict[str, Any]) -> None:
    """Restore one member's data from the snapshot, keeping its old data aside. Idempotent:
    a rerun restores again into a fresh staging dir; the set-aside copy is the first one."""
    binds = [str(b) for b in detail["binds"]]
    data = next((b.split(":")[0] for b in binds if b.split(":")[1] == ETCD_INSIDE), "")
    if not data:
        raise HostError(host.name, "the etcd container binds no data directory; cannot restore")
    token = str(detail["token"])
    staging = f"restore-{token}"
    host.remove_paths([posixpath.join(data, staging)])
    snapshot_dir = posixpath.dirname(str(detail["path"]))
    inside = f"{SNAPSHOT_DIR}/{posixpath.basename(str(detail['path']))}"
    command = [ETCDCTL, "snapshot", "restore", inside,
               f"--name={detail['member']}",
               f"--initial-cluster={detail['initial_cluster']}",
               f"--initial-cluster-token={token}",
               f"--initial-advertise-peer-urls={detail['peer_url']}",
               f"--data-dir={ETCD_INSIDE}/{staging}"]
    code, out = host.run_once(str(detail["image"]), command,
                              binds=[*binds, f"{snapshot_dir}:{SNAPSHOT_DIR}:ro"],
                              env=["ETCDCTL_API=3"])
    if code != 0:
        tail = " ".join(out.split())[-300:]
        raise HostError(host.name, f"etcdctl snapshot restore failed ({tail}); the member's data"
                        " is untouched")
    keep = f"member.pre-restore-{token}"
    host.move_paths(data, [("member", keep)], replace=False)  # the first, pre-restore data
    host.move_paths(data, [(f"{staging}/member", "member")], replace=True)
    host.remove_paths([posixpath.join(data, staging)])


def wait_healthy(backend: Backend, members: list[str], retries: int = HEALTH_RETRIES,
                 interval: float = HEALTH_INTERVAL) -> None:
    """Until every restored member answers healthy (and no other member is listed)."""
    seen: dict[str, bool] = {}
    for _ in range(retries):
        try:
            seen = backend.etcd().healthy()
        except HostError:
            seen = {}
        if sorted(seen) == sorted(members) and all(seen.values()):
            return
        backend.sleep(interval)
    state = ", ".join(f"{k} {'healthy' if v else 'unhealthy'}" for k, v in sorted(seen.items()))
    raise HostError("etcd", f"the restored etcd cluster is not healthy after"
                    f" {retries * interval:.0f}s ({state or 'no member answers'}); see"
                    " `docker logs etcd` on the etcd nodes, then `rkel apply --resume`")
