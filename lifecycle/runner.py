"""What the commands do, below the CLI: load, plan, apply under the lock, resume, rehearse.

Each function takes the store and backend it works on explicitly; nothing here prints. The CLI
(`lifecycle.cli`) renders results and maps errors to exit codes.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from lifecycle.addons import compile_addons
from lifecycle.budget import Unavailable, check_version_change
from lifecycle import encryption_run, restore, rke_import, rotate
from lifecycle.snapshots import (APPLIED_CONFIG, default_name, recurring_snapshot_warning,
                                 save_snapshot, unused_name)
from lifecycle.budget import preflight as budget_preflight
from lifecycle.config import LoadedConfig, load_config, load_config_text
from lifecycle.config.model import ClusterConfig
from lifecycle.desired import compile_desired
from lifecycle.effects import READY_TIMEOUT
from lifecycle.errors import (
    LockHeldError,
    ResumeRequiredError,
    RkelError,
    StalePlanError,
    StateError,
)
from lifecycle.executor import (
    DEFAULT_WORKERS,
    CertRenderer,
    Executor,
    Observer,
    RunResult,
)
from lifecycle.hosts import Backend
from lifecycle.hosts.simulated import SimContainer, SimWorld
from lifecycle.pki import PKI, load_state_key
from lifecycle.rke_layout import layout_of
from lifecycle.plan import (
    ADDON_TIMEOUT,
    Current,
    CurrentNode,
    CurrentService,
    Plan,
    diff,
    restrict,
    teardown,
)
from lifecycle.spec import Desired, canonical_json
from store import LockHeld, SetMeta, SnapshotRow, Store, StoreError, default_state_path

CRASH_ENV = "RKEL_CRASH_AFTER_JOURNAL_WRITES"  # test-only: SIGKILL self after the Nth journal write


def crash_hook_from_env() -> Callable[[int], None] | None:
    """The test-only crash switch: with RKEL_CRASH_AFTER_JOURNAL_WRITES=N, die right after the
    Nth journal write of this process, as a kill -9 would."""
    value = os.environ.get(CRASH_ENV, "").strip()
    if not value:
        return None
    limit = int(value)

    def hook(count: int) -> None:
        if count >= limit:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def open_store(state: Path | None, config: Path) -> Store:
    """Open (creating if needed) the state database for `config`."""
    path = state or default_state_path(config)
    try:
        return Store.open(path, after_journal_write=crash_hook_from_env())
    except StoreError as exc:
        raise StateError(f"{path}: {exc}") from exc


def desired_for(config: ClusterConfig, store: Store, **given: Any) -> Desired:
    """`compile_desired` of `config` with what the state records of the cluster: its
    certificate layout, the secrets encryption keys in use and the certificate rotation counts
    (`given` overrides any of them)."""
    known: dict[str, Any] = {"pki_layout": pki_layout(store),
                             "encryption_keys": encryption_run.active_keys(store),
                             "rotations": rotate.rotations(store)}
    return compile_desired(config, **{**known, **given})


def pki_layout(store: Store) -> str:
    """The certificate layout the cluster runs with: "rkel", or "rke" once adopted from RKE."""
    return layout_of(store)


def current_state(store: Store) -> Current:
    """What the store records now, as the planner's input."""
    services: dict[str, list[CurrentService]] = {}
    for s in store.services():
        services.setdefault(s.node, []).append(
            CurrentService(
                name=s.name,
                state=s.state,
                spec_hash=s.spec_hash or "",
                image=s.image or "",
                args=tuple(s.spec.get("args", ())),
            )
        )
    nodes = tuple(
        CurrentNode(
            name=n.name,
            address=n.address,
            internal_address=n.internal_address,
            roles=tuple(n.roles),
            state=n.state,
            certs_hash=n.certs_hash or "",
            port=n.port,
            user=n.user,
            services=tuple(sorted(services.get(n.name, []), key=lambda s: s.name)),
            labels=tuple(sorted((str(k), str(v)) for k, v in n.labels.items())),
            taints=tuple(sorted(n.taints)),
        )
        for n in store.nodes()
    )
    addons = store.get_meta("addons", {}) or {}
    return Current(nodes=nodes, addons=tuple(sorted((str(k), str(v)) for k, v in addons.items())))


@dataclass(frozen=True)
class Planned:
    loaded: LoadedConfig
    desired: Desired
    current: Current
    plan: Plan


def make_plan(config: Path, store: Store, only: tuple[str, ...] = ()) -> Planned:
    """Load cluster.yml, compile it and diff it with the store (limited to `only` phases)."""
    loaded = load_config(config)
    desired = desired_for(loaded.config, store)
    if store.nodes():
        check_version_change(store.get_meta("kubernetes_version", "") or "", desired.kubernetes_version)
    notes: list[str] = []
    addons = compile_addons(loaded.config, config.parent, source=str(config), warnings=notes)
    recurring = recurring_snapshot_warning(loaded.config)
    if recurring:
        notes.append(recurring)
    if loaded.config.rotate_encryption_key:
        notes.append("rotate_encryption_key: true does not rotate the key during `rkel apply`"
                     " (RKE's `rke up` does); run `rkel encrypt rotate-key`, then remove it")
    current = current_state(store)
    timeout = max(ADDON_TIMEOUT, float(loaded.config.addon_job_timeout or 0))
    plan = encryption_run.with_rewrite(diff(current, desired, addons, timeout), store, current,
                                       desired)
    adopted = rke_import.plan_note(store, plan)
    if adopted:
        notes.append(adopted)
    if notes:
        plan = replace(plan, warnings=plan.warnings + tuple(notes))
    return Planned(loaded, desired, current, restrict(plan, only) if only else plan)


# ---------------------------------------------------------------------------- snapshots, rollback
def sealed_config(store: Store, config: Path) -> dict[str, str]:
    """cluster.yml as the run applying it records it: sealed with the state key."""
    return restore.seal(load_state_key(Path(store.path)), config.read_text(encoding="utf-8-sig"))


def running_config(store: Store, config: Path) -> LoadedConfig:
    """The cluster.yml the cluster runs: the one the last complete run applied (the file at
    `config` when no run recorded one)."""
    sealed = store.get_meta(APPLIED_CONFIG)
    if not sealed:
        return load_config(config)
    text = restore.unseal(sealed, load_state_key(Path(store.path)), "the last run")
    return load_config_text(text, f"{config} (as last applied)")


def snapshot_reason(plan: Plan, store: Store) -> str | None:
    """Why `plan` needs an automatic snapshot first (None: it does not, or there is no etcd
    data yet): it changes etcd, the control plane or the Kubernetes version."""
    if not any(s.name == "etcd" and s.spec_hash for s in store.services()):
        return None
    touched = sorted({s.service or s.action for s in plan.steps
                      if (s.action in ("start", "replace", "remove-service")
                          and s.service in restore.SNAPSHOT_SERVICES)
                      or s.action in ("etcd-join", "etcd-leave")})
    version = store.get_meta("kubernetes_version", "") or ""
    if plan.kubernetes_version and version and plan.kubernetes_version != version:
        touched.insert(0, f"Kubernetes {version} -> {plan.kubernetes_version}")
    return f"it changes {', '.join(touched)}" if touched else None


def auto_snapshot(store: Store, backend: Backend, config: Path, folder: Path) -> SnapshotRow:
    """The snapshot taken before a disruptive run, of the cluster as it runs (the caller holds
    the lock)."""
    loaded = running_config(store, config)
    return save_snapshot(store, backend, loaded.config,
                         desired_for(loaded.config, store),
                         unused_name(store, folder, default_name(prefix="rkel-auto")),
                         kind="auto",
                         folder=folder)


@dataclass(frozen=True)
class RollbackPlan:
    row: SnapshotRow
    plan: Plan
    loaded: LoadedConfig | None  # the recorded cluster.yml (None for a data-only restore)
    desired: Desired | None
    text: str  # the recorded cluster.yml's text ("" for a data-only restore)


def plan_restore(store: Store, name: str, cluster_name: str) -> RollbackPlan:
    """`rkel snapshot restore NAME`: etcd data only; every component keeps its version."""
    row = restore.target(store, name)
    current = current_state(store)
    plan = restore.restore_plan(store, row, current.fingerprint, cluster_name)
    return RollbackPlan(row, plan, None, None, "")


def plan_rollback(config: Path, store: Store, name: str | None) -> RollbackPlan:
    """`rkel rollback [--to NAME]`: the snapshot's data, then the planner's diff from what runs
    to the cluster.yml recorded with it (downgrades allowed: that is what rollback is for)."""
    row = restore.target(store, name)
    text = restore.recorded_config(row, load_state_key(Path(store.path)))
    loaded = load_config_text(text, f"cluster.yml recorded with snapshot {row.name}")
    desired = desired_for(loaded.config, store, encryption_keys=encryption_run.rollback_keys(store))
    addons = compile_addons(loaded.config, config.parent, source=str(config))
    current = current_state(store)
    timeout = max(ADDON_TIMEOUT, float(loaded.config.addon_job_timeout or 0))
    then = encryption_run.with_rewrite(diff(current, desired, addons, timeout), store, current,
                                       desired, rollback=True)
    plan = restore.restore_plan(store, row, current.fingerprint, desired.cluster_name, then)
    return RollbackPlan(row, plan, loaded, desired, text)


def plan_rotation(config: Path, store: Store) -> encryption_run.Rotation:
    """`rkel encrypt rotate-key`: the three-stage rotation of the cluster as it runs (the
    cluster.yml of the last complete run)."""
    loaded = running_config(store, config)
    return encryption_run.rotation_plan(loaded.config, store, current_state(store))


def interrupted_message(store: Store) -> str | None:
    """What to say about an unfinished run, if there is one."""
    unfinished = store.unfinished_run()
    if unfinished is None:
        return None
    return (f"run {unfinished.id} ({unfinished.kind}, started {unfinished.started_at}) was "
            "interrupted; continue it with `rkel apply --resume`")


def refuse_if_interrupted(store: Store) -> None:
    """A new run (even one with nothing to do) must not start over an interrupted one: its
    steps may have left services stopped that only its resume starts again."""
    message = interrupted_message(store)
    if message:
        raise ResumeRequiredError(message)


def check_fresh(plan: Plan, store: Store) -> None:
    """Refuse a saved plan computed from a state that has changed since."""
    now = current_state(store).fingerprint
    if now != plan.state_fingerprint:
        raise StalePlanError(
            f"the saved plan was made from state {plan.state_fingerprint}, but the state is now "
            f"{now} (another run changed the cluster); run `rkel plan` again and review it"
        )


def _lock(store: Store, command: str) -> str | None:
    try:
        stale = store.acquire_lock(None, command)
    except LockHeld as held:
        raise LockHeldError(
            f"another rkel run holds the lock on {store.path}: pid {held.pid} on {held.hostname}, "
            f"started {held.started_at} ({held.command}); wait for it to finish. If that process "
            "is gone for good (another machine), remove its lock with `rkel state unlock --force`"
        ) from held
    if stale is None:
        return None
    return f"took over the lock of pid {stale.pid} (started {stale.started_at}), which is gone"


def apply_plan(
    store: Store,
    backend: Backend,
    plan: Plan,
    certs: CertRenderer,
    *,
    command: str,
    resume: bool = False,
    workers: int = DEFAULT_WORKERS,
    observer: Observer | None = None,
    desired: Desired | None = None,
    notices: list[str] | None = None,
    kind: str = "apply",
    node_ready_timeout: float = READY_TIMEOUT,
    unavailable: dict[str, str] | None = None,
    budgets: dict[str, int] | None = None,
    before_run: Callable[[], None] | None = None,
    applies: dict[str, str] | None = None,
    secrets_encryption: dict[str, Any] | None = None,
) -> RunResult:
    """Run `plan` (or, with resume, the interrupted run) under the lock; the lock is released
    when the run ends, whatever the outcome.

    :param before_run: called under the lock before a new run starts (the automatic snapshot);
        what it raises ends the call with nothing started.
    :param applies: the sealed cluster.yml the run applies; recorded as the applied config
        (what the next snapshot keeps) once the run, or its resume, ends well.
    :param secrets_encryption: cluster.yml's `secrets_encryption_config` (a custom_config the
        run delivers is sealed into the state from it before the run starts).
    """
    notice = _lock(store, command)
    if notice and notices is not None:
        notices.append(notice)
    try:
        unfinished = store.unfinished_run()
        if resume:
            if unfinished is None:
                raise ResumeRequiredError(
                    "there is no interrupted run to resume; run `rkel apply` to start one"
                )
            run = store.resume_run(unfinished.id)
            plan = Plan.from_dict(run.plan)
            run_id = run.id
            kind = run.kind  # `rkel apply --resume` also finishes a remove or a rollback
        else:
            refuse_if_interrupted(store)
            check_fresh(plan, store)
            if before_run is not None:
                before_run()
            restore.mark_pending(store, applies)
            made = encryption_run.prepare(store, plan, secrets_encryption)
            if made and notices is not None:
                notices.append("generated secrets encryption key(s) " + ", ".join(made)
                               + " (kept in the state, encrypted with the state key)")
            run_id = store.start_run(kind, plan.to_dict(), plan.state_fingerprint, command)
        store.set_lock_run(run_id)
        executor = Executor(store, backend, certs, workers=workers, observer=observer,
                            node_ready_timeout=node_ready_timeout, unavailable=unavailable,
                            budgets=budgets)
        result = executor.run(run_id, plan)
        restore.promote_pending(store)
        encryption_run.after_run(store, plan)
        if desired is not None and not resume:
            store.apply_ops(
                [
                    SetMeta("cluster_name", desired.cluster_name),
                    SetMeta("kubernetes_version", desired.kubernetes_version),
                    SetMeta("desired_fingerprint", desired.fingerprint),
                ]
            )
        elif resume and plan.kubernetes_version and kind != "remove":
            # what the interrupted run would have recorded (a resumed rollback: the old version)
            store.apply_ops(
                [
                    SetMeta("cluster_name", plan.cluster_name),
                    SetMeta("kubernetes_version", plan.kubernetes_version),
                    SetMeta("desired_fingerprint", plan.desired_fingerprint),
                ]
            )
        if kind == "remove":
            # a cluster made again gets its add-ons again, at whatever version it is given
            store.apply_ops([SetMeta("addons", {}), SetMeta("kubernetes_version", ""),
                             SetMeta(APPLIED_CONFIG, None)])
        else:
            note = save_state_copy(store, backend)
            if note and notices is not None:
                notices.append(note)
    except BaseException:
        try:
            store.release_lock()
        except StoreError:
            pass  # what went wrong first matters; a dead process's lock is taken over
        raise
    store.release_lock()
    return result


# ---------------------------------------------------------------------------- preflight
def preflight(store: Store, backend: Backend, plan: Plan, workers: int = DEFAULT_WORKERS) -> list[Unavailable]:
    """The nodes already in Kubernetes (a kubelet ran there) that are unreachable or NotReady."""
    in_kube = {s.node for s in store.services() if s.name == "kubelet" and s.spec_hash}
    refs = [r for r in plan.nodes if r.name in in_kube]
    failed = {n.name for n in store.nodes() if n.state == "failed"}
    return budget_preflight(backend, refs, workers, repairing=failed)


# ---------------------------------------------------------------------------- state copy
STATE_SECRET = "rkel-cluster-state"  # in kube-system, like RKE's full-cluster-state


def state_document(store: Store) -> dict[str, str]:
    """What the kube-system copy of the state holds: nodes, services, meta, the last run and the
    certificates' public parts. Never a private key (they stay encrypted in the store only)."""
    services: dict[str, list[dict[str, object]]] = {}
    for s in store.services():
        services.setdefault(s.node, []).append(
            {"name": s.name, "state": s.state, "image": s.image or "", "spec_hash": s.spec_hash or ""})
    nodes = [
        {"name": n.name, "address": n.address, "internal_address": n.internal_address,
         "roles": list(n.roles), "state": n.state, "services": services.get(n.name, [])}
        for n in store.nodes()
    ]
    runs = store.runs()
    last = runs[-1] if runs else None
    doc = {
        "meta": {k: v for k, v in store.meta().items() if k != encryption_run.KEYRING},
        "nodes": nodes,
        "last_run": {"id": last.id, "kind": last.kind, "status": last.status,
                     "started_at": last.started_at} if last else None,
        "certificates": [
            {"name": c.name, "certificate": c.cert_pem, "expires_at": c.expires_at,
             "sans": list(c.sans)}
            for c in store.certificates()
        ],
    }
    return {"state.json": canonical_json(doc)}


def save_state_copy(store: Store, backend: Backend) -> str | None:
    """Save the state copy in kube-system when a control plane runs; a notice if it could not
    be saved (the run itself succeeded: the store is the record, the copy is for recovery)."""
    if not any(s.name == "kube-apiserver" and s.state == "running" for s in store.services()):
        return None
    try:
        backend.kube().save_state_secret(STATE_SECRET, "kube-system", state_document(store))
    except RkelError as exc:
        return f"could not save the state copy in kube-system/{STATE_SECRET}: {exc}"
    return None


# ---------------------------------------------------------------------------- remove
def teardown_plan(config: ClusterConfig, store: Store) -> Plan:
    """`rkel remove`'s plan: every node of the store and of cluster.yml emptied and forgotten."""
    from lifecycle.hosts.ssh import node_ref

    return teardown(current_state(store), tuple(node_ref(n) for n in config.nodes),
                    config.cluster_name, config.prefix_path)


# ---------------------------------------------------------------------------- rehearsal
def world_from_current(current: Current) -> SimWorld:
    """A simulated copy of the cluster as the store records it."""
    world = SimWorld()
    for node in current.nodes:
        host = world._host(node.name)
        host.roles = list(node.roles)
        for svc in node.services:
            if svc.spec_hash:
                host.containers[svc.name] = SimContainer(
                    svc.name, svc.image, svc.spec_hash, svc.state != "failed", list(svc.args)
                )
        kubelet = node.service("kubelet")
        if kubelet is not None and kubelet.spec_hash:
            world.kube_nodes[node.name] = {
                "schedulable": node.state not in ("draining", "upgraded"),
                "version": kubelet.image.rsplit(":", 1)[-1],
            }
        if node.service("etcd") is not None and node.service("etcd").spec_hash:  # type: ignore[union-attr]
            world.etcd[f"etcd-{node.name}"] = {
                "peer_url": f"https://{node.internal_address}:2380",
                "learner": False,
            }
    return world


def _copy_store(store: Store, into: Path) -> Store:
    """A copy of the state database, taken with SQLite's online backup (WAL-safe)."""
    src = sqlite3.connect(str(store.path))
    dst = sqlite3.connect(str(into))
    with dst:
        src.backup(dst)
    src.close()
    dst.close()
    return Store.open(into)


@dataclass
class Rehearsal:
    result: RunResult
    world: SimWorld
    seconds: float  # simulated wall time, honouring each group's concurrency
    order: list[str]  # step ids in the order they completed
    groups: list[tuple[str, float]]  # (group title, simulated seconds), in run order


def rehearse(store: Store, plan: Plan, certs: CertRenderer, *, workers: int = DEFAULT_WORKERS,
             observer: Observer | None = None) -> Rehearsal:
    """Run `plan` against a simulated copy of the cluster and a throwaway copy of the state."""
    world = world_from_current(current_state(store))
    tmp = Path(tempfile.mkdtemp(prefix="rkel-rehearsal-"))
    try:
        copy = _copy_store(store, tmp / "state.db")
        try:
            backend = world.backend()
            run_id = copy.start_run("rehearsal", plan.to_dict(), plan.state_fingerprint, "rehearsal")
            result = Executor(copy, backend, certs, workers=workers, observer=observer).run(run_id, plan)
            order = [r.step_id for r in copy.journal(run_id) if r.phase == "done"]
        finally:
            copy.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    groups = [
        (f"{g.phase}: {g.title}", makespan(result.unit_seconds.get(g.title, []), g.concurrency))
        for g in plan.groups
    ]
    return Rehearsal(result, world, sum(t for _, t in groups), order, groups)


def makespan(durations: list[float], window: int) -> float:
    """Wall time of running `durations` in order through a sliding window of `window` slots."""
    slots = [0.0] * max(1, min(window, len(durations) or 1))
    for d in durations:
        i = slots.index(min(slots))
        slots[i] += d
    return max(slots) if durations else 0.0


# ---------------------------------------------------------------------------- real hosts
@dataclass
class RealSession:
    """What a run on real hosts needs: the SSH + Docker backend and the PKI behind it."""

    backend: Backend
    pki: PKI
    generated: list[str]


def real_session(
    store: Store,
    config: ClusterConfig,
    desired: Desired | None,
    *,
    trust_new_hosts: bool = True,
    notice: Callable[[str], None] | None = None,
) -> RealSession:
    """Open the state key and PKI (creating the certificates `desired` needs, when given) and
    an SSH backend that checks health with them."""
    from lifecycle.hosts.ssh import (
        SSHBackend,  # paramiko and docker only when really needed
    )

    pki = PKI(store, load_state_key(Path(store.path)))
    generated = pki.ensure(desired) if desired is not None else []
    backend = SSHBackend(
        config, store, trust_new_hosts=trust_new_hosts, tls=pki.material, notice=notice
    )
    return RealSession(backend, pki, generated)


def write_kubeconfig(pki: PKI, desired: Desired, config_path: Path) -> Path | None:
    """kube_config_<name>.yml for the first controlplane node, once the control plane runs."""
    cps = [n for n in desired.nodes if n.has("controlplane")]
    if not cps:
        return None
    return pki.write_admin_kubeconfig(
        config_path, f"https://{cps[0].address}:6443", desired.cluster_name
    )
