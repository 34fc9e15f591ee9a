"""Scale benchmark on the Simulated backend: how planning and a journaled apply grow with nodes.

Prints, for each cluster size, the wall time and peak Python memory of: compiling the desired
state, planning a fresh cluster, applying it (every step journaled in SQLite), and planning a
version upgrade. Numbers, not pass/fail: compare the ratios between sizes within one run.

    .venv/bin/python scenarios/bench_scale.py [SIZES...]     (default: 10 100 300)
"""

from __future__ import annotations

import sys
import tempfile
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from lifecycle.config.model import ClusterConfig, Node, UpgradeStrategy
from lifecycle.desired import compile_desired
from lifecycle.hosts.simulated import SimulatedCerts, SimWorld
from lifecycle.plan import diff
from lifecycle.runner import apply_plan, current_state
from store import Store


def cluster(size: int) -> ClusterConfig:
    nodes = tuple(
        Node(address=f"10.{i // 250}.{i % 250}.1", user="rkel", hostname_override=f"n{i:04d}",
             role=("controlplane", "etcd") if i < 3 else ("worker",))
        for i in range(size)
    )
    return ClusterConfig(nodes=nodes, kubernetes_version="v1.30.5-rancher1-1",
                         upgrade_strategy=UpgradeStrategy(max_unavailable_worker="10%"))


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    tracemalloc.start()
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, seconds, peak / 2**20


def run(size: int) -> list[str]:
    config = cluster(size)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "bench.rkel.db")
        world = SimWorld()
        desired, t_compile, m_compile = measure(lambda: compile_desired(config))
        plan, t_plan, m_plan = measure(lambda: diff(current_state(store), desired))
        result, t_apply, m_apply = measure(lambda: apply_plan(
            store, world.backend(), plan, SimulatedCerts(), command="bench", desired=desired))
        upgraded = compile_desired(replace(config, kubernetes_version="v1.31.1-rancher1-1"))
        upgrade, t_replan, m_replan = measure(lambda: diff(current_state(store), upgraded))
        store.close()
    steps = result.steps_done
    return [
        f"{size:>6} nodes  compile {t_compile:7.3f}s {m_compile:6.1f}MiB  "
        f"plan {t_plan:7.3f}s {m_plan:6.1f}MiB  "
        f"apply {t_apply:7.2f}s {m_apply:6.1f}MiB ({steps} steps, "
        f"{1000 * t_apply / max(1, steps):.2f} ms/step)  "
        f"upgrade-plan {t_replan:7.3f}s ({len(upgrade.steps)} steps)"
    ]


def main(argv: list[str]) -> None:
    sizes = [int(a) for a in argv] or [10, 100, 300]
    for size in sizes:
        for line in run(size):
            print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
