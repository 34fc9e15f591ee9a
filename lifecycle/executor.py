"""The journaled executor: walks a Plan, group after group, with a bounded pool of workers.

For every step: an *intent* row is written (with any state that marks the step as under way),
the effect runs (idempotent: it looks at the host first), then a *done* row is written together
with the resulting state, in one transaction. A run that dies anywhere is resumed from its stored
plan: steps with a done row are skipped, a step with only an intent is redone — its effect
observes what the dead run already did. The state machines validate every state change before
the effect runs.

Within a group, units (one node's steps) run at most `group.concurrency` at a time, as a sliding
window; a failed unit does not stop its siblings, and the run stops after the group with an error
naming every failed node and the state it was left in.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from lifecycle import effects, encryption_run, restore, rke_import, rotate
from lifecycle.encryption import ENCRYPTION_FILE, Encryption
from lifecycle.errors import RkelError, RunFailedError
from lifecycle.hosts import Backend, DrainOptions
from lifecycle.machines import advance
from lifecycle.plan import FORGET_PATHS, Group, Plan, Step, Unit
from lifecycle.spec import CertRequest, ServiceSpec
from store import DeleteNode, DeleteService, SetMeta, Store, UpsertNode, UpsertService


class CertRenderer(Protocol):
    """Turns a node's certificate requests into the files to put on it."""

    def files_for(self, node: str, certs: list[CertRequest]) -> Mapping[str, bytes]: ...

    def encryption_config(self, enc: Encryption) -> bytes:
        """The secrets encryption config file for `enc`, from the keys in the state."""
        ...


class Observer(Protocol):
    """Progress reporting; every method is optional in spirit and must not raise."""

    def group_started(self, index: int, group: Group) -> None: ...

    def step_started(self, step: Step) -> None: ...

    def step_finished(self, step: Step, error: str | None) -> None: ...

    def unit_finished(self, group: Group, unit: Unit, seconds: float, error: str | None) -> None: ...


class QuietObserver:
    def group_started(self, index: int, group: Group) -> None:
        pass

    def step_started(self, step: Step) -> None:
        pass

    def step_finished(self, step: Step, error: str | None) -> None:
        pass

    def unit_finished(self, group: Group, unit: Unit, seconds: float, error: str | None) -> None:
        pass


@dataclass
class RunResult:
    run_id: int
    steps_done: int = 0
    steps_skipped: int = 0
    seconds: float = 0.0
    unit_seconds: dict[str, list[float]] = field(default_factory=dict)  # group title -> durations


# Which machine triggers a step fires, given the state before it: (intent, done).
def _node_triggers(action: str, state: str) -> tuple[list[str], list[str]]:
    if action == "deliver-certs":
        done = {"absent": ["prepare"], "failed": ["prepare"], "running": ["refresh"]}
        return [], done.get(state, [])
    if action == "cordon":
        return [], ["cordon"] if state in ("running", "failed") else []
    if action == "wait-ready":
        done = {"certs": ["start"], "failed": ["start"], "draining": ["upgrade"]}
        return [], done.get(state, [])
    if action == "uncordon":
        return [], ["uncordon"] if state in ("upgraded", "draining") else []
    if action in ("drain-out", "delete-node", "clean-node", "forget-node"):
        # etcd-leave is not here: it also serves a node that only drops its etcd role.
        return (["remove"] if state not in ("removing", "removed") else []), []
    return [], []


def _service_triggers(action: str, state: str) -> tuple[list[str], list[str]]:
    if action == "start":
        done = {"absent": ["prepare", "start"], "certs": ["start"], "failed": ["start"]}
        return [], done.get(state, [])
    if action == "replace":
        intent = ["replace"] if state in ("running", "failed") else []
        return intent, ["upgrade", "settle"]
    return [], []


# Hosts worked on at once: 0 means as many as each group's window (max_unavailable_*) allows,
# so the strategy is never capped behind the user's back. `--workers N` sets a cap explicitly.
DEFAULT_WORKERS = 0

STOP_ON_FAILURE = ("import", "restore", "certs", "etcd", "controlplane", "removals")
KUBE_ONLY = ("cordon", "drain", "uncordon", "drain-out", "delete-node", "node-metadata")


def etcd_data_dir(spec: ServiceSpec) -> str:
    """The host directory bound to etcd's data dir (with prefix_path, if any)."""
    for bind in spec.binds:
        source, _, target = bind.partition(":")
        if target.split(":")[0] == "/var/lib/rancher/etcd":
            return source
    return "/var/lib/etcd"


class Executor:
    """Runs plans against one backend, journaling into one store."""

    def __init__(
        self,
        store: Store,
        backend: Backend,
        certs: CertRenderer,
        *,
        workers: int = DEFAULT_WORKERS,
        observer: Observer | None = None,
        node_ready_timeout: float = effects.READY_TIMEOUT,
        unavailable: Mapping[str, str] | None = None,
        budgets: Mapping[str, int] | None = None,
    ) -> None:
        """`unavailable`: nodes found unavailable before the run (name -> why), skipped and
        counted against their group's failure budget; `budgets`: group (worker, controlplane,
        etcd) -> how many of its nodes may be unavailable at once (None: no budget)."""
        self.node_ready_timeout = node_ready_timeout
        self.unavailable = dict(unavailable or {})
        self.budgets = dict(budgets) if budgets is not None else None
        self.skipped: dict[str, str] = {}
        self.store = store
        self.backend = backend
        self.certs = certs
        self.workers = workers if workers > 0 else None
        self._kubelet_images: dict[str, str] | None = None
        self.observer: Observer = observer or QuietObserver()
        self._state_lock = threading.Lock()

    # ------------------------------------------------------------------ entry points
    def run(self, run_id: int, plan: Plan) -> RunResult:
        """Execute (or continue) run `run_id` of `plan`; finishes the run row either way."""
        journal = self.store.journal(run_id)
        done = {row.step_id for row in journal if row.phase == "done"}
        result = RunResult(run_id)
        self._kubelet_images = None
        started = self.backend.clock()
        try:
            for index, group in enumerate(plan.groups):
                self.observer.group_started(index, group)
                failures = self._run_group(run_id, plan, group, done, result)
                if failures:
                    raise RunFailedError(self._failure_message(group, failures), failures)
            if self.skipped:
                raise RunFailedError(self._skipped_message(), self.skipped)
        except RunFailedError as exc:
            self.store.finish_run(run_id, "failed", str(exc))
            raise
        result.seconds = self.backend.clock() - started
        self.store.finish_run(run_id, "done")
        return result

    def _skipped_message(self) -> str:
        lines = [f"the run is done except for {len(self.skipped)} node(s) it did not touch:"]
        lines += [f"  {node}: {why}" for node, why in sorted(self.skipped.items())]
        lines.append("Bring them back (or remove them from cluster.yml), then run `rkel apply` "
                     "again: it plans what is left.")
        return "\n".join(lines)

    def _budget_group(self, plan: Plan, group: Group, unit: Unit) -> str | None:
        """Which failure budget a unit of a node upgrade group counts against."""
        if self.budgets is None or group.phase not in ("controlplane", "workers"):
            return None
        ref = next((n for n in plan.nodes if n.name == unit.node), None)
        if ref is None:
            return None
        if "controlplane" in ref.roles:
            return "controlplane"
        return "etcd" if "etcd" in ref.roles else "worker"

    def _failure_message(self, group: Group, failures: dict[str, str]) -> str:
        lines = [f"{len(failures)} node(s) failed in '{group.title}'; later groups were not run:"]
        for node in sorted(failures):
            row = self.store.node(node)
            state = row.state if row else "absent"
            lines.append(f"  {node} (state {state}): {failures[node]}")
        lines.append("Fix the cause, then run `rkel apply` again to retry from the current state.")
        return "\n".join(lines)

    # ------------------------------------------------------------------ groups and units
    def _run_group(
        self, run_id: int, plan: Plan, group: Group, done: set[str], result: RunResult
    ) -> dict[str, str]:
        failures: dict[str, str] = {}
        durations = result.unit_seconds.setdefault(group.title, [])
        lock = threading.Lock()
        # etcd members and control plane nodes: one failure stops the group before the next
        # unit starts (the cluster's availability depends on them); workers carry on.
        stop_on_failure = group.phase in STOP_ON_FAILURE

        spent: dict[str, int] = {}
        for name in self.unavailable:
            ref = next((n for n in plan.nodes if n.name == name), None)
            if ref is not None:
                kind = ("controlplane" if "controlplane" in ref.roles
                        else "etcd" if "etcd" in ref.roles else "worker")
                spent[kind] = spent.get(kind, 0) + 1

        def work(unit: Unit) -> None:
            if stop_on_failure and failures:
                return
            kind = self._budget_group(plan, group, unit)
            if unit.node in self.unavailable and kind is not None:
                with lock:
                    self.skipped[unit.node] = f"skipped: {self.unavailable[unit.node]}"
                return
            if kind is not None and self.budgets is not None:
                with lock:
                    if spent.get(kind, 0) >= self.budgets.get(kind, 1):
                        self.skipped[unit.node] = (
                            f"not started: the failure budget of {kind} nodes "
                            f"({self.budgets.get(kind, 1)} unavailable at once) was used up")
                        return
            t0 = self.backend.clock()
            error: str | None = None
            cordoned = False
            try:
                for step in unit.steps:
                    if step.id in done:
                        with lock:
                            result.steps_skipped += 1
                    else:
                        self._run_step(run_id, plan, step)
                        with lock:
                            result.steps_done += 1
                    cordoned = step.action == "cordon" or (cordoned and step.action != "uncordon")
            except RkelError as exc:
                error = str(exc)
                if cordoned:
                    error += self._uncordon_after_failure(run_id, unit.node)
                with lock:
                    failures[unit.node] = error
                    if kind is not None:
                        spent[kind] = spent.get(kind, 0) + 1
            seconds = self.backend.clock() - t0
            with lock:
                durations.append(seconds)
            self.observer.unit_finished(group, unit, seconds, error)

        size = min(group.concurrency, self.workers or group.concurrency, len(group.units))
        if size <= 1:
            for unit in group.units:
                work(unit)
        else:
            with ThreadPoolExecutor(max_workers=size, thread_name_prefix="rkel") as pool:
                for future in [pool.submit(work, unit) for unit in group.units]:
                    future.result()
        return failures

    def _uncordon_after_failure(self, run_id: int, node: str) -> str:
        """Make a node that failed mid-change schedulable again (its previous containers were
        put back), as a journaled step of its own; say what happened either way."""
        base = f"{node}:uncordon-after-failure"
        # a resumed run may retry the failed unit, fail again and uncordon again: a new id
        prior = sum(1 for r in self.store.journal(run_id)
                    if r.phase == "intent" and (r.step_id == base or r.step_id.startswith(base + ":")))
        step_id = base if not prior else f"{base}:{prior + 1}"
        detail = {"action": "uncordon", "node": node, "service": "", "why": "unit failed"}
        with self._state_lock:
            self.store.write_journal(run_id, step_id, "intent", detail)
        try:
            self.backend.kube().uncordon(node)
        except RkelError as exc:
            with self._state_lock:
                self.store.write_journal(run_id, step_id, "failed", {**detail, "error": str(exc)})
            return f" (left cordoned: uncordon failed: {exc}; run `kubectl uncordon {node}`)"
        with self._state_lock:
            self.store.write_journal(run_id, step_id, "done", detail)
        return " (uncordoned again; it runs what it ran before)"

    # ------------------------------------------------------------------ one step
    def _state_ops(self, step: Step, which: int) -> list[Any]:
        """Store ops for the intent (which=0) or done (which=1) row of `step`."""
        ops: list[Any] = []
        node = self.store.node(step.node)
        node_state = node.state if node else "absent"
        triggers = _node_triggers(step.action, node_state)[which]
        if triggers:
            ops.append(UpsertNode(step.node, {"state": advance("node", node_state, *triggers)}))
        if step.service and step.action in ("start", "replace"):
            svc = self.store.service(step.node, step.service)
            svc_state = svc.state if svc else "absent"
            strig = _service_triggers(step.action, svc_state)[which]
            if strig:
                fields: dict[str, Any] = {"state": advance("service", svc_state, *strig)}
                if which == 1:
                    spec = step.service_spec
                    fields.update(spec_hash=spec.hash, image=spec.image, spec=spec.to_dict())
                ops.append(UpsertService(step.node, step.service, fields))
        return ops

    def _node_fields(self, plan: Plan, name: str) -> dict[str, Any]:
        ref = plan.node_ref(name)
        return {
            "address": ref.address,
            "internal_address": ref.internal_address,
            "port": ref.port,
            "user": ref.user,
            "roles": list(ref.roles),
        }

    def _run_step(self, run_id: int, plan: Plan, step: Step) -> None:
        detail = {"action": step.action, "node": step.node, "service": step.service}
        if step.spec:
            detail["image"] = step.new_image
        with self._state_lock:
            ops = self._state_ops(step, 0)
            if step.node and self.store.node(step.node) is None:
                ops.insert(0, UpsertNode(step.node, {**self._node_fields(plan, step.node), "state": "absent"}))
            self.store.write_journal(run_id, step.id, "intent", detail, ops)
        self.observer.step_started(step)
        try:
            self._effect(plan, step)
        except RkelError as exc:
            with self._state_lock:
                fail_ops: list[Any] = []
                node = self.store.node(step.node)
                if node and node.state not in ("removing", "removed"):
                    fail_ops.append(UpsertNode(step.node, {"state": advance("node", node.state, "fail")}))
                svc = self.store.service(step.node, step.service) if step.service else None
                if svc and step.action == "replace":
                    # The old container was put back (or never moved): it is what runs.
                    fail_ops.append(UpsertService(step.node, step.service, {"state": "running"}))
                elif svc and step.action == "start":
                    fail_ops.append(UpsertService(step.node, step.service, {"state": advance("service", svc.state, "fail")}))
                self.store.write_journal(run_id, step.id, "failed", {**detail, "error": str(exc)}, fail_ops)
            self.observer.step_finished(step, str(exc))
            raise
        with self._state_lock:
            ops = self._state_ops(step, 1)
            if step.action == "deliver-certs":
                want = plan.node_ref(step.node)
                ops.append(UpsertNode(step.node, {
                    **self._node_fields(plan, want.name),
                    "certs_hash": (step.detail or {}).get("certs_hash", ""),
                }))
            elif step.action == "apply-addon":
                meta = step.detail or {}
                applied = dict(self.store.get_meta("addons", {}) or {})
                applied[meta["name"]] = meta["hash"]
                ops.append(SetMeta("addons", applied))
            elif step.action == "node-metadata":
                meta = step.detail or {}
                ops.append(UpsertNode(step.node, {"labels": meta.get("labels", {}),
                                                  "taints": meta.get("taints", [])}))
            elif step.action == "remove-service":
                ops.append(DeleteService(step.node, step.service))
            elif step.action == "forget-node":
                ops.append(DeleteNode(step.node))
            elif step.action in rke_import.ACTIONS:
                ops += rke_import.done_ops(self.store, step)
            self.store.write_journal(run_id, step.id, "done", detail, ops)
        self.observer.step_finished(step, None)

    # ------------------------------------------------------------------ effects
    def _effect(self, plan: Plan, step: Step) -> None:
        action = step.action
        if action in restore.ACTIONS:
            restore.run_step(self, plan, step)
            return
        if action in encryption_run.ACTIONS:
            encryption_run.run_step(self, plan, step)
            return
        if action in rke_import.ACTIONS:
            rke_import.run_step(self, plan, step)
            return
        if action in rotate.ACTIONS:
            rotate.run_step(self, step)
            return
        if action == "apply-addon":  # cluster-wide: no node
            detail = step.detail or {}
            kube = self.backend.kube()
            kube.apply_manifests(list(detail.get("docs", [])))
            kube.wait_rollout(list(detail.get("docs", [])), float(detail.get("timeout", 300)))
            return
        ref = plan.node_ref(step.node)
        sleep = self.backend.sleep
        if action == "deliver-certs":
            certs = [CertRequest(**{**c, "organizations": tuple(c["organizations"]), "sans": tuple(c["sans"])})
                     for c in (step.detail or {}).get("certs", [])]
            files = dict(self.certs.files_for(step.node, certs))
            enc = (step.detail or {}).get("encryption")
            if enc:
                files[ENCRYPTION_FILE] = self.certs.encryption_config(Encryption.from_detail(enc))
            prefix = str((step.detail or {}).get("prefix", ""))
            self.backend.host(ref).put_files({f"{prefix}{p}": c for p, c in files.items()})
        elif action == "etcd-join":
            if self._etcd_exists(exclude=step.node):
                effects.etcd_join(self.backend.etcd(), step.node, ref.internal_address)
        elif action in ("start", "replace"):
            spec = step.service_spec
            host = self.backend.host(ref)
            extra: list[str] = []
            if spec.name == "etcd" and action == "start":
                etcd = self.backend.etcd() if self._etcd_exists(exclude=step.node) else None
                if etcd is not None:
                    effects.etcd_clear_unstarted(etcd, host, step.node, etcd_data_dir(spec))
                elif not self._etcd_exists(exclude=""):  # the first members of a new cluster
                    effects.refuse_foreign_etcd_data(host, step.node, etcd_data_dir(spec))
                token = f"rkel-etcd-{plan.cluster_name}"
                extra = effects.etcd_bootstrap_args(etcd, step.node, ref.internal_address, token)
            if action == "start":
                effects.start_service(host, spec, sleep, extra)
            else:
                effects.replace_service(host, spec, sleep, extra)
            if spec.name == "etcd":
                effects.etcd_settle(self.backend.etcd(), step.node, sleep)
        elif action == "remove-service":
            host = self.backend.host(ref)
            effects.remove_service(host, step.service)
            if step.service == "etcd":
                # A member that left must not keep its data: rejoining with it would fail.
                row = self.store.service(step.node, "etcd")
                spec_data = row.spec if row and row.spec else None
                path = etcd_data_dir(ServiceSpec.from_dict(spec_data)) if spec_data else "/var/lib/etcd"
                host.remove_paths([path])
        elif action in KUBE_ONLY and not self._in_kubernetes(step.node):
            return  # the node never ran a kubelet: Kubernetes does not know it
        elif action == "cordon":
            self.backend.kube().cordon(step.node)
        elif action == "drain":
            self.backend.kube().drain(step.node, self._drain_options(plan))
        elif action == "wait-ready":
            effects.wait_node_ready(self.backend.kube(), step.node, sleep,
                                    self._kubelet_version(plan, step.node), self.node_ready_timeout)
        elif action == "uncordon":
            self.backend.kube().uncordon(step.node)
        elif action == "node-metadata":
            detail = step.detail or {}
            taints = [(str(k), str(v), str(e)) for k, v, e in detail.get("taints", [])]
            self.backend.kube().sync_node_metadata(step.node, dict(detail.get("labels", {})), taints)
        elif action == "etcd-leave":
            effects.etcd_leave(self.backend.etcd(), step.node)
        elif action == "drain-out":
            kube = self.backend.kube()
            kube.cordon(step.node)
            if plan.drain:
                kube.drain(step.node, self._drain_options(plan))
        elif action == "delete-node":
            self.backend.kube().delete_node(step.node)
        elif action == "clean-node":
            host = self.backend.host(ref)
            for container in host.containers().values():
                # rkel's own (spec-hash label) and what a replacement set aside
                if container.spec_hash or container.name.startswith(effects.OLD_PREFIX):
                    host.remove_container(container.name)
            host.remove_paths(list((step.detail or {}).get("paths", [])))
        elif action == "forget-node":
            paths = (step.detail or {}).get("paths") or FORGET_PATHS
            self.backend.host(ref).remove_paths(list(paths))
        else:  # pragma: no cover - the planner only emits the actions above
            raise RkelError(f"step {step.id}: unknown action {action!r}")

    def _in_kubernetes(self, node: str) -> bool:
        svc = self.store.service(node, "kubelet")
        return bool(svc and svc.spec_hash)

    def _etcd_exists(self, exclude: str) -> bool:
        """Has an etcd member other than `exclude` ever been started (so a cluster exists)?"""
        return any(
            s.name == "etcd" and s.node != exclude and s.spec_hash
            for s in self.store.services()
        )

    def _kubelet_version(self, plan: Plan, node: str) -> str:
        if self._kubelet_images is None:  # once per run: every node's new kubelet image
            self._kubelet_images = {s.node: s.new_image for s in plan.steps
                                    if s.service == "kubelet" and s.spec}
        if node in self._kubelet_images:
            return self._kubelet_images[node].rsplit(":", 1)[-1]
        svc = self.store.service(node, "kubelet")
        return (svc.image or "").rsplit(":", 1)[-1] if svc else ""

    def _drain_options(self, plan: Plan) -> DrainOptions:
        return DrainOptions(**plan.drain_options) if plan.drain_options else DrainOptions()

