"""Before a run touches anything: version rules, and the failure budget of the upgrade strategy.

- **Version rules.** `apply` never downgrades Kubernetes (that is what a rollback to a snapshot
  taken before the upgrade is for) and never skips a minor version: Kubernetes supports
  upgrading one minor release at a time.
- **Failure budget.** `max_unavailable_worker` and `max_unavailable_controlplane` say how many
  nodes may be unavailable at once. Nodes that are unreachable over SSH or NotReady in Kubernetes
  *before* the run already count: the preflight finds them, the plan reports them, and when they
  use up a group's budget while the plan would take more of that group's nodes out, apply
  refuses before changing anything. Nodes found unavailable are skipped by the run (and named at
  its end); a node that fails during the run counts against the same budget, and the run starts
  no further node of that group once the budget is spent.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lifecycle.errors import HostError, PlanError
from lifecycle.hosts import Backend
from lifecycle.plan import Plan, resolve_max_unavailable
from lifecycle.spec import NodeRef, Strategy

_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")


def release(version: str) -> tuple[int, int, int]:
    """v1.30.5-rancher1-1 -> (1, 30, 5)."""
    match = _VERSION.match(version.strip())
    if not match:
        raise PlanError(f"kubernetes_version {version!r} is not of the form v1.30.5-rancher1-1")
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def check_version_change(current: str, wanted: str) -> None:
    """Refuse a downgrade, and an upgrade that skips a minor version, each saying what to do."""
    if not current or current == wanted:
        return
    have, want = release(current), release(wanted)
    if want < have:
        raise PlanError(
            f"kubernetes_version {wanted} is older than the cluster's {current}: `rkel apply` "
            "does not downgrade (components and etcd data of a newer release may not work "
            "with an older one). Set kubernetes_version back to "
            f"{current}; to return to the cluster as it was before an upgrade, restore the "
            "etcd snapshot taken before it"
        )
    if want[0] != have[0] or want[1] > have[1] + 1:
        step = f"v{have[0]}.{have[1] + 1}"
        raise PlanError(
            f"kubernetes_version {wanted} skips a minor version from the cluster's {current}: "
            f"Kubernetes upgrades one minor release at a time. Upgrade to a {step}.x version "
            f"first (`rkel config` lists them: see `lifecycle/data/versions.yml`), apply, then "
            f"set {wanted}"
        )


@dataclass(frozen=True)
class Unavailable:
    """A node found unavailable before the run: which upgrade group it is in, and why."""

    node: str
    group: str  # controlplane | etcd | worker
    why: str


def group_of(ref: NodeRef) -> str:
    if "controlplane" in ref.roles:
        return "controlplane"
    if "etcd" in ref.roles:
        return "etcd"
    return "worker"


def preflight(backend: Backend, refs: list[NodeRef], workers: int = 64,
              repairing: Collection[str] = ()) -> list[Unavailable]:
    """For every node that runs a kubelet already: is it reachable over SSH, and Ready?

    A reachable node in `repairing` (an earlier run failed mid-change on it, which may be why
    it is NotReady: its kubelet stopped and could not be put back) is not skipped: the run
    retries its change, which is what brings it back.

    Reaching a node opens its connection for the run (one per host, reused). When the
    Kubernetes API itself does not answer, Readiness is not judged (the run will find out)."""
    if not refs:
        return []
    kube = backend.kube()

    def check(ref: NodeRef) -> Unavailable | None:
        try:
            backend.host(ref).containers()
        except HostError as exc:
            return Unavailable(ref.name, group_of(ref), f"unreachable: {exc}")
        try:
            node = kube.node(ref.name)
        except HostError:
            return None
        if ref.name in repairing:
            return None
        if node is None:
            return Unavailable(ref.name, group_of(ref), "not registered in Kubernetes")
        if not node.ready:
            return Unavailable(ref.name, group_of(ref), "NotReady in Kubernetes")
        return None

    with ThreadPoolExecutor(max_workers=max(1, min(workers or 64, len(refs)))) as pool:
        found = list(pool.map(check, refs))
    return sorted((u for u in found if u is not None), key=lambda u: u.node)


def windows(plan: Plan, strategy: Strategy) -> dict[str, int]:
    """The budget of each group: how many of its nodes may be unavailable at once."""
    workers = [r for r in plan.nodes if group_of(r) == "worker"]
    cps = [r for r in plan.nodes if group_of(r) == "controlplane"]
    return {
        "worker": resolve_max_unavailable(strategy.max_unavailable_worker, max(1, len(workers))),
        "controlplane": resolve_max_unavailable(
            strategy.max_unavailable_controlplane, max(1, len(cps))),
        "etcd": 1,
    }


def check_budget(plan: Plan, strategy: Strategy, unavailable: list[Unavailable]) -> list[str]:
    """Warnings naming the unavailable nodes; PlanError when they already use up the budget of
    a group whose other nodes the plan would take out (cordon or replace)."""
    if not unavailable:
        return []
    budget = windows(plan, strategy)
    refs = {r.name: r for r in plan.nodes}
    down = {u.node for u in unavailable}
    changing = {
        group_of(refs[u.node])
        for g in plan.groups for u in g.units
        if u.kind == "change" and u.node in refs and u.node not in down
        and any(s.action in ("cordon", "replace", "drain-out") for s in u.steps)
    }
    names = {"worker": "max_unavailable_worker", "controlplane": "max_unavailable_controlplane",
             "etcd": "one etcd node at a time"}
    lines = [f"{u.node} ({u.group}) is unavailable before the run: {u.why}; it is skipped"
             for u in unavailable]
    for group in ("controlplane", "etcd", "worker"):
        gone = [u for u in unavailable if u.group == group]
        if gone and group in changing and len(gone) >= budget[group]:
            listed = "; ".join(f"{u.node}: {u.why}" for u in gone)
            raise PlanError(
                f"{len(gone)} {group} node(s) are already unavailable ({listed}) and "
                f"{names[group]} allows {budget[group]} at once: taking out any other {group} "
                "node would exceed it, so nothing was changed. Bring the node(s) back, remove "
                f"them from cluster.yml, or raise {names[group]}, then run `rkel apply` again"
            )
    return lines
