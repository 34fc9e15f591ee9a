"""Scale benchmark on the Simulated backend: planning time and memory, an upgrade's makespan
against the lower bound its strategy allows and against RKE's schedule, and journal throughput.

For each size: 3 controlplane+etcd nodes, the rest workers, max_unavailable_worker 10%, drain
true. It measures
- plan: compile_desired + diff, for a fresh cluster and for the upgrade
  v1.30.5-rancher1-1 -> v1.31.1-rancher1-1 (best of --repeat runs, wall seconds), and the peak
  Python memory (tracemalloc) of each, in a separate run;
- the fresh cluster's state: a real journaled apply (Simulated backend, SQLite store) up to
  --journal-max nodes; above it, the same state written into the store directly (checked, at
  every journaled size, to give the very state the apply left);
- the upgrade as `apply` runs it (the executor, DEFAULT_WORKERS real threads, every step
  journaled in SQLite) under the latency model LATENCY, in virtual seconds: the makespan as the
  plan's windows allow (the figure `plan --simulate` reports) and as the executor's threads
  really scheduled it, against the analytic lower bound and RKE's schedule (see `bounds`);
- journal writes per second of that run (wall clock).

Numbers, not pass/fail. To reproduce the README table:

    .venv/bin/python scenarios/bench_scale.py                 (sizes 10 100 1000 5000)
    .venv/bin/python scenarios/bench_scale.py --sizes 10 100
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lifecycle.config.model import ClusterConfig, Node, UpgradeStrategy
from lifecycle.desired import compile_desired
from lifecycle.executor import DEFAULT_WORKERS
from lifecycle.hosts.simulated import Latency, SimulatedCerts, SimWorld
from lifecycle.plan import Current, Plan, Unit, diff, resolve_max_unavailable
from lifecycle.runner import apply_plan, current_state, makespan, world_from_current
from lifecycle.spec import Desired
from store import SetMeta, Store, UpsertNode, UpsertService

OLD, NEW = "v1.30.5-rancher1-1", "v1.31.1-rancher1-1"
RKE_WORKER_CAP = 50  # RKE upgrades at most 50 workers at once, whatever max_unavailable says

# The latency model, in virtual seconds; every operation not named here costs nothing.
LATENCY = Latency(
    connect=0.0, inspect=0.0, start=0.0, stop=0.0, remove=0.0, rename=0.0, put_files=0.0,
    cordon=0.0, delete_node=0.0, kube_write=0.0, etcd=0.0, rollout=0.0,
    run_container=2.0,  # container replace (or first start)
    probe=1.0,  # health check of a service that has one; it passes the first time
    drain=5.0,
    node_ready=3.0,  # from a kubelet's replacement until its Node reports Ready
)
MODEL_TEXT = ("latency model (virtual s): container replace/start 2, health check 1 (services "
              "with one), drain 5, node Ready 3 after its kubelet is replaced; all else 0")


def cluster(size: int, version: str = OLD) -> ClusterConfig:
    nodes = tuple(
        Node(address=f"10.{i // 250}.{i % 250}.1", user="rkel", hostname_override=f"n{i:04d}",
             role=("controlplane", "etcd") if i < 3 else ("worker",))
        for i in range(size)
    )
    return ClusterConfig(nodes=nodes, kubernetes_version=version,
                         upgrade_strategy=UpgradeStrategy(max_unavailable_worker="10%", drain=True))


# ---------------------------------------------------------------------------- measuring
def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[Any, float]:
    """fn's result and its best wall time of `repeat` runs (the machine is shared)."""
    times = []
    result = None
    for _ in range(repeat):
        result = None  # the previous result is garbage before the next run, as in one process
        gc.collect()
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return result, min(times)


def peak_mib(fn: Callable[[], Any]) -> float:
    gc.collect()
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def plan_for(config: ClusterConfig, current: Current) -> tuple[Desired, Plan]:
    desired = compile_desired(config)
    return desired, diff(current, desired)


# ---------------------------------------------------------------------------- the state
def seed(store: Store, desired: Desired) -> None:
    """Write the state a fresh journaled apply of `desired` leaves, without running it."""
    ops: list[Any] = []
    for node in desired.nodes:
        ops.append(UpsertNode(node.name, {
            "address": node.address, "internal_address": node.internal_address,
            "port": node.port, "user": node.user, "roles": list(node.roles),
            "state": "running", "certs_hash": node.certs_hash,
            "labels": dict(node.labels), "taints": [list(t) for t in node.taints],
        }))
        for spec in node.services:
            ops.append(UpsertService(node.name, spec.name, {
                "state": "running", "spec_hash": spec.hash, "image": spec.image,
                "spec": spec.to_dict(),
            }))
    ops += [SetMeta("cluster_name", desired.cluster_name),
            SetMeta("kubernetes_version", desired.kubernetes_version),
            SetMeta("desired_fingerprint", desired.fingerprint)]
    store.apply_ops(ops)


# ---------------------------------------------------------------------------- bounds
def unit_seconds(unit: Unit) -> float:
    """A unit's virtual seconds under LATENCY, from its steps alone."""
    total = 0.0
    kubelet_replaced = False
    for step in unit.steps:
        if step.action == "drain":
            total += LATENCY.drain
        elif step.action in ("start", "replace"):
            total += LATENCY.run_container + (LATENCY.probe if (step.spec or {}).get("health") else 0)
            kubelet_replaced |= step.service == "kubelet"
        elif step.action == "wait-ready" and kubelet_replaced:
            total += LATENCY.node_ready
    return total


@dataclass
class Bounds:
    lower: float  # the critical path rkel's strategy allows
    rke: float  # the same work under RKE's schedule
    formula: str


def bounds(plan: Plan) -> Bounds:
    """Per group of n units of t seconds each, run w at a time: ceil(n / w) * t.

    lower bound = sum over groups: etcd members 1 at a time, controlplane nodes
      max_unavailable_controlplane at a time, workers in ceil(W / window) waves;
    RKE = the same, except etcd members do not wait for health (t - health check each) and
      workers go in batches of min(window, 50) with a barrier after each batch."""
    lower = rke = 0.0
    parts = []
    for g in plan.groups:
        times = sorted({unit_seconds(u) for u in g.units})
        t = times[-1]
        n = len(g.units)
        if len(times) > 1:  # not this workload; say so rather than bound it wrongly
            parts.append(f"[{g.title}: unequal unit times {times}]")
        waves = math.ceil(n / max(1, g.concurrency))
        lower += waves * t
        if g.phase == "etcd":
            rke += sum(unit_seconds(u) - LATENCY.probe for u in g.units)
        elif g.phase == "workers" and any(u.kind == "change" for u in g.units):
            rke += math.ceil(n / min(g.concurrency, RKE_WORKER_CAP)) * t
        else:
            rke += waves * t
        parts.append(f"{g.phase} {waves}x{t:g}s")
    return Bounds(lower, rke, " + ".join(parts))


# ---------------------------------------------------------------------------- one size
@dataclass
class Row:
    size: int
    fresh_plan: float
    fresh_mib: float
    upgrade_plan: float
    upgrade_mib: float
    state: str
    state_seconds: float
    upgrade_steps: int
    journal_rows: int
    apply_wall: float
    writes_per_s: float
    window: int
    lower: float
    makespan_window: float
    makespan_threads: float
    rke: float
    formula: str


def run(size: int, repeat: int, journal_max: int) -> Row:
    config, upgraded = cluster(size), cluster(size, NEW)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "bench.rkel.db")
        empty = current_state(store)
        (desired, fresh), t_fresh = best_of(repeat, lambda: plan_for(config, empty))
        m_fresh = peak_mib(lambda: plan_for(config, empty))

        started = time.perf_counter()
        if size <= journal_max:
            apply_plan(store, SimWorld(LATENCY).backend(), fresh, SimulatedCerts(),
                       command="bench", desired=desired)
            state = "journaled apply"
            with tempfile.TemporaryDirectory() as other:
                check = Store.open(Path(other) / "seeded.rkel.db")
                seed(check, desired)
                same = current_state(check).fingerprint == current_state(store).fingerprint
                check.close()
            if not same:
                raise SystemExit(f"{size} nodes: the seeded state differs from the applied one")
        else:
            seed(store, desired)
            state = "seeded"
        t_state = time.perf_counter() - started
        del fresh, desired

        applied = current_state(store)
        (want, upgrade), t_upgrade = best_of(repeat, lambda: plan_for(upgraded, applied))
        m_upgrade = peak_mib(lambda: plan_for(upgraded, applied))

        world = world_from_current(current_state(store))
        world.latency = LATENCY
        rows_before = len(store.journal())
        started = time.perf_counter()
        result = apply_plan(store, world.backend(), upgrade, SimulatedCerts(), command="bench",
                            workers=DEFAULT_WORKERS, desired=want)
        wall = time.perf_counter() - started
        rows = len(store.journal()) - rows_before
        # Each unit's virtual seconds, laid out as the run schedules them: a sliding window of
        # the group's concurrency (what `plan --simulate` reports), or of the slots the
        # executor really has (DEFAULT_WORKERS threads; 0: as many as the window).
        durations = [result.unit_seconds.get(g.title, []) for g in upgrade.groups]
        by_window = sum(makespan(d, g.concurrency) for d, g in zip(durations, upgrade.groups))
        by_threads = sum(makespan(d, min(g.concurrency, DEFAULT_WORKERS or g.concurrency))
                         for d, g in zip(durations, upgrade.groups))
        store.close()
    workers = sum(1 for n in config.nodes if n.role == ("worker",))
    b = bounds(upgrade)
    return Row(size, t_fresh, m_fresh, t_upgrade, m_upgrade, state, t_state,
               len(upgrade.steps), rows, wall, rows / wall,
               resolve_max_unavailable("10%", workers), b.lower, by_window,
               by_threads, b.rke, b.formula)


# ---------------------------------------------------------------------------- output
def table(rows: list[Row]) -> list[str]:
    out = [
        ("| nodes | plan fresh | plan upgrade | peak MiB fresh / upgrade | upgrade steps | "
         "journaled upgrade (wall) | journal writes/s | window | lower bound | "
         "makespan (windows) | makespan (executor threads) | RKE |"),
        "|------:|-----:|-----:|-----:|-----:|-----:|-----:|-----:|-----:|-----:|-----:|-----:|",
    ]
    for r in rows:
        over = r.makespan_window / r.lower - 1 if r.lower else 0.0
        over_t = r.makespan_threads / r.lower - 1 if r.lower else 0.0
        out.append(
            f"| {r.size} | {r.fresh_plan:.3f} s | {r.upgrade_plan:.3f} s | "
            f"{r.fresh_mib:.1f} / {r.upgrade_mib:.1f} | {r.upgrade_steps} | "
            f"{r.apply_wall:.1f} s ({r.journal_rows} rows) | {r.writes_per_s:.0f} | "
            f"{r.window} | {r.lower:g} s | {r.makespan_window:g} s ({over:+.0%}) | "
            f"{r.makespan_threads:g} s ({over_t:+.0%}) | {r.rke:g} s |"
        )
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 5000])
    parser.add_argument("--repeat", type=int, default=3, help="plan timings: best of N")
    parser.add_argument("--journal-max", type=int, default=1000,
                        help="journal-apply the fresh cluster up to this size; seed it above")
    args = parser.parse_args(argv)
    print(MODEL_TEXT)
    print(f"executor threads: DEFAULT_WORKERS={DEFAULT_WORKERS}; plan = compile_desired + diff "
          f"(best of {args.repeat}); upgrade {OLD} -> {NEW}, drain true, workers 10%")
    rows = []
    for size in args.sizes:
        row = run(size, args.repeat, args.journal_max)
        rows.append(row)
        print(f"{size} nodes: fresh state by {row.state} ({row.state_seconds:.1f} s); "
              f"bound: {row.formula}", flush=True)
    print()
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main(sys.argv[1:])
