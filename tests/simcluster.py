"""A test harness: one simulated cluster, its state database, and a process that can 'die'.

`SimCluster.apply(config, crash_after=N)` plans and applies like `rkel apply`; with `crash_after`
the executor dies right after the Nth journal write (as a kill -9 would: nothing after that write
runs), the objects of that 'process' are dropped, a new Store is opened on the same file and the
interrupted run is resumed. Used by the stateful property tests and the scenario replays.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lifecycle.config.model import ClusterConfig
from lifecycle.desired import compile_desired
from lifecycle.errors import RunFailedError
from lifecycle.hosts.simulated import SimulatedCerts, SimWorld
from lifecycle.plan import Plan, diff
from lifecycle.runner import apply_plan, current_state
from lifecycle.spec import Desired
from store import Store


def _allowed(value: str, total: int) -> int:
    """RKE's rule, written out independently of the planner: N, or N% of total rounded down;
    at least 1."""
    if value.endswith("%"):
        return max(1, int(value[:-1]) * total // 100)
    return max(1, int(value))


class Crash(BaseException):
    """The 'process' died (BaseException: nothing in rkel may catch it)."""


@dataclass
class Outcome:
    plan: Plan
    crashed: bool = False
    failed: str = ""
    resumes: int = 0
    journal_writes: int = 0


@dataclass
class SimCluster:
    path: Path
    world: SimWorld = field(default_factory=SimWorld)
    workers: int = 1

    def __post_init__(self) -> None:
        self._crash_at: int | None = None
        self.store = self._open()

    def _hook(self, count: int) -> None:
        if self._crash_at is not None and count >= self._crash_at:
            raise Crash(count)

    def _open(self) -> Store:
        return Store.open(self.path, after_journal_write=self._hook)

    def restart(self) -> None:
        """The process died: its lock is stale, its objects are gone; a new one opens the file."""
        self.store.release_lock()  # what the dead pid's lock amounts to for the next process
        self.store.close()
        self._crash_at = None
        self.store = self._open()

    def plan(self, config: ClusterConfig) -> tuple[Desired, Plan]:
        desired = compile_desired(config)
        return desired, diff(current_state(self.store), desired)

    def apply(self, config: ClusterConfig, crash_after: int | None = None) -> Outcome:
        desired, plan = self.plan(config)
        outcome = Outcome(plan)
        self.world.creations.clear()
        self.world.max_unschedulable.clear()
        self._crash_at = crash_after
        certs = SimulatedCerts()
        try:
            apply_plan(self.store, self.world.backend(), plan, certs, command="test",
                       workers=self.workers, desired=desired)
        except Crash:
            outcome.crashed = True
            self.restart()
            outcome.resumes += 1
            try:
                apply_plan(self.store, self.world.backend(), plan, certs, command="test --resume",
                           resume=True, workers=self.workers)
            except RunFailedError as exc:
                outcome.failed = str(exc)
        except RunFailedError as exc:
            outcome.failed = str(exc)
        self._crash_at = None
        return outcome

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ checks
    def mismatches(self, config: ClusterConfig) -> list[str]:
        """Every way the store or the simulated hosts differ from the desired cluster."""
        desired = compile_desired(config)
        problems: list[str] = []
        plan = diff(current_state(self.store), desired)
        if not plan.empty:
            problems.append(f"plan not empty after apply: {[s.id for s in plan.steps]}")
        wanted = {n.name: {s.name: s.hash for s in n.services} for n in desired.nodes}
        for name, host in self.world.hosts.items():
            have = {c.name: c.spec_hash for c in host.containers.values() if c.running}
            if have != wanted.get(name, {}):
                problems.append(f"{name}: containers {have} != desired {wanted.get(name, {})}")
            stray = [c for c in host.containers if c.startswith("old-")]
            if stray:
                problems.append(f"{name}: leftover {stray}")
        missing = set(wanted) - set(self.world.hosts)
        if missing:
            problems.append(f"hosts never reached: {sorted(missing)}")
        members = {m.removeprefix("etcd-") for m in self.world.etcd}
        if members != {n.name for n in desired.etcd_nodes}:
            problems.append(f"etcd members {sorted(members)} != {[n.name for n in desired.etcd_nodes]}")
        if any(m["learner"] for m in self.world.etcd.values()):
            problems.append("an etcd learner was never promoted")
        for name, node in self.world.kube_nodes.items():
            if not node["schedulable"]:
                problems.append(f"{name} left cordoned")
        return problems

    def journal_problems(self) -> list[str]:
        problems = list(self.store.verify_journal())
        done: Counter[tuple[int, str]] = Counter()
        open_intents: dict[tuple[int, str], int] = {}
        for row in self.store.journal():
            key = (row.run_id, row.step_id)
            if row.phase == "intent":
                open_intents[key] = row.seq
            elif row.phase in ("done", "failed"):
                open_intents.pop(key, None)
                if row.phase == "done":
                    done[key] += 1
        problems += [f"step {k[1]} of run {k[0]} done {n} times" for k, n in done.items() if n > 1]
        finished = {r.id for r in self.store.runs() if r.status in ("done", "failed")}
        dangling = [k for k in open_intents if k[0] in finished and k[0] in {
            r.id for r in self.store.runs() if r.status == "done"}]
        problems += [f"run {k[0]} completed with a dangling intent for {k[1]}" for k in dangling]
        return problems

    def availability_problems(self, config: ClusterConfig) -> list[str]:
        desired = compile_desired(config)
        workers = sum(1 for n in desired.nodes if n.group == "worker")
        cps = sum(1 for n in desired.nodes if n.group == "controlplane")
        limits = {
            "worker": _allowed(desired.strategy.max_unavailable_worker, workers),
            "controlplane": _allowed(desired.strategy.max_unavailable_controlplane, cps),
            "etcd": 1,
        }
        problems = [
            f"{count} {group} nodes unschedulable at once (limit {limits[group]})"
            for group, count in self.world.max_unschedulable.items()
            if count > limits[group]
        ]
        problems += self.world.quorum_violations
        # A step whose failure was journaled before a crash is tried again by the resumed run
        # (the user may have fixed the cause): a second creation there is a retry, not a bug.
        last = max((r.id for r in self.store.runs()), default=None)
        retried = {f"{r.detail.get('node')}/{r.detail.get('service')}"
                   for r in self.store.journal(last) if r.phase == "failed"} if last else set()
        problems += [f"{key} created {n} times in one apply" for key, n in self.world.creations.items()
                     if n > 1 and key.split("@")[0] not in retried]
        return problems
