"""Text and JSON renderings of plans, runs and status. Sorted, stable, no colour codes in pipes."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from lifecycle.plan import Group, Plan, Step, Unit
from store import JournalRow, NodeRow, RunRow, ServiceRow

MARK = {"add": "+", "change": "~", "remove": "-"}
RESTORE_LABELS = {
    "restore-stage": "snapshot file checked, uploaded where missing",
    "restore-stop": "stop",
    "restore-member": "etcdctl snapshot restore, old data set aside",
    "restore-start": "start",
    "restore-wait": "every member healthy",
    "restore-restart": "restart",
    "restore-cleanup": "drop the set-aside data",
}


def _service_line(step: Step) -> list[str]:
    if step.action == "start":
        return [f"      + {step.service:<24} {step.new_image}"]
    if step.action == "replace":
        lines = []
        if step.old_image and step.old_image != step.new_image:
            lines.append(f"      ~ {step.service:<24} {step.old_image} -> {step.new_image}")
        else:
            lines.append(f"      ~ {step.service:<24} {step.new_image} (spec changed)")
        lines += [f"            - {arg}" for arg in step.args_removed]
        lines += [f"            + {arg}" for arg in step.args_added]
        return lines
    if step.action == "remove-service":
        return [f"      - {step.service:<24} {step.old_image}".rstrip()]
    return []


def _step_label(step: Step) -> str:
    """Who a step is about: its node, or for a cluster-wide add-on, the add-on."""
    return step.node or str((step.detail or {}).get("name", "cluster"))


def _unit_lines(unit: Unit) -> list[str]:
    actions = [s.action for s in unit.steps]
    extras: list[str] = [
        a for a in ("cordon", "drain", "uncordon", "etcd-join", "etcd-leave") if a in actions
    ]
    if "drain-out" in actions:
        extras.append("drain")
    if "node-metadata" in actions:
        extras.append("labels/taints")
    if "apply-addon" in actions:
        docs = (unit.steps[0].detail or {}).get("docs", [])
        extras.append(f"{len(docs)} object(s), server-side apply")
    for step in unit.steps:
        if step.action in RESTORE_LABELS:
            services = " ".join((step.detail or {}).get("services", []))
            extras.append(f"{RESTORE_LABELS[step.action]} {services}".rstrip())
    if "deliver-certs" in actions:
        certs = (unit.steps[0].detail or {}).get("certs", [])
        extras.append(f"{len(certs)} certificate(s)")
        keys = ((unit.steps[0].detail or {}).get("encryption") or {}).get("providers")
        if keys:
            extras.append("encryption.yaml: " + ", ".join(k.removeprefix("aescbc:") for k in keys))
    head = f"  {MARK[unit.kind]} {unit.node or 'etcd cluster'}"
    if extras:
        head += f"  ({', '.join(extras)})"
    lines = [head]
    for step in unit.steps:
        lines += _service_line(step)
    return lines


def _window_lines(group: Group) -> list[str]:
    """For a windowed group, the order nodes enter the window, a window's worth per line."""
    names = [u.node for u in group.units]
    width = max(1, group.concurrency)
    return [
        f"    wave {i // width + 1}: {' '.join(names[i:i + width])}"
        for i in range(0, len(names), width)
    ]


def plan_text(plan: Plan, warnings: list[str] | None = None) -> str:
    out: list[str] = []
    notes = list(warnings or []) + list(plan.warnings)
    for warning in notes:
        out.append(f"warning: {warning}")
    if notes:
        out.append("")
    if plan.empty:
        out.append(f"No changes. Cluster {plan.cluster_name!r} matches cluster.yml.")
        return "\n".join(out)
    out.append(
        f"Plan for cluster {plan.cluster_name!r} (Kubernetes {plan.kubernetes_version}), "
        f"from state {plan.state_fingerprint}:"
    )
    for index, group in enumerate(plan.groups, 1):
        out.append("")
        out.append(f"[{index}/{len(plan.groups)}] {group.phase}: {group.title}")
        if group.concurrency > 1 and len(group.units) > group.concurrency:
            out += _window_lines(group)
        for unit in sorted(group.units, key=lambda u: u.node) if group.phase == "certs" else group.units:
            out += _unit_lines(unit)
    s = plan.summary
    out.append("")
    nodes = []
    if s.get("nodes_added"):
        nodes.append(f"{s['nodes_added']} node(s) joining")
    if s.get("nodes_removed"):
        nodes.append(f"{s['nodes_removed']} node(s) leaving")
    if s.get("addons"):
        nodes.append(f"{s['addons']} add-on(s) to apply")
    tail = f" ({', '.join(nodes)})" if nodes else ""
    out.append(
        f"Plan: {s.get('add', 0)} to add, {s.get('change', 0)} to change, "
        f"{s.get('remove', 0)} to remove.{tail}"
    )
    return "\n".join(out)


def plan_json(plan: Plan, warnings: list[str] | None = None) -> dict[str, Any]:
    return {"warnings": list(warnings or []), **plan.to_dict()}


class Progress:
    """Executor observer printing phase, node and step; plain lines when not on a terminal."""

    def __init__(self, stream: TextIO | None = None, total_groups: int = 0) -> None:
        self.stream = stream or sys.stderr
        self.total = total_groups
        self.tty = self.stream.isatty()
        self._t: dict[str, float] = {}

    def _say(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def group_started(self, index: int, group: Group) -> None:
        self._say(f"[{index + 1}/{self.total}] {group.phase}: {group.title}")

    def step_started(self, step: Step) -> None:
        self._t[step.id] = time.monotonic()
        if self.tty:
            self._say(f"    {_step_label(step)}: {step.action} {step.service}".rstrip() + " ...")

    def step_finished(self, step: Step, error: str | None) -> None:
        seconds = time.monotonic() - self._t.pop(step.id, time.monotonic())
        what = f"{_step_label(step)}: {step.action} {step.service}".rstrip()
        status = "ok" if error is None else "FAILED"
        self._say(f"    {what} {status} ({seconds:.1f}s)")

    def unit_finished(self, group: Group, unit: Unit, seconds: float, error: str | None) -> None:
        if error:
            self._say(f"  {unit.node}: failed: {error.splitlines()[0]}")


def status_text(nodes: list[NodeRow], services: list[ServiceRow], run: RunRow | None) -> str:
    if not nodes:
        return "No nodes recorded yet: run `rkel plan`, then `rkel apply`."
    out = [f"{'NODE':<24} {'ROLES':<26} {'STATE':<10} ADDRESS"]
    by_node: dict[str, list[ServiceRow]] = {}
    for s in services:
        by_node.setdefault(s.node, []).append(s)
    for n in nodes:
        out.append(f"{n.name:<24} {','.join(n.roles):<26} {n.state:<10} {n.address}")
        for s in sorted(by_node.get(n.name, []), key=lambda s: s.name):
            out.append(f"    {s.name:<24} {s.state:<10} {s.image or ''}")
    legend = [f"  {state}: {NODE_STATES[state]}" for state in sorted({n.state for n in nodes})
              if state in NODE_STATES and state != "running"]
    if legend:
        out += ["", "node states:", *legend]
    if run is not None:
        out.append("")
        out.append(f"last run: {run.id} {run.kind} {run.status} (started {run.started_at})")
    return "\n".join(out)


NODE_STATES = {
    "absent": "known to rkel, nothing on it yet",
    "certs": "certificates delivered; not every service of the node is up yet "
             "(e.g. after `apply --only etcd`)",
    "draining": "cordoned for a change in progress",
    "upgraded": "services replaced, not yet uncordoned",
    "failed": "a step failed on it; `rkel history` shows which, `rkel apply` retries",
    "removing": "leaving the cluster",
}


def history_text(runs: list[RunRow]) -> str:
    if not runs:
        return "No runs yet."
    out = [f"{'RUN':>4}  {'KIND':<10} {'STATUS':<12} {'STARTED':<27} FINISHED"]
    for r in runs:
        out.append(f"{r.id:>4}  {r.kind:<10} {r.status:<12} {r.started_at:<27} {r.finished_at or '-'}")
    return "\n".join(out)


def journal_text(run: RunRow, rows: list[JournalRow]) -> str:
    out = [f"run {run.id} ({run.kind}) {run.status}, started {run.started_at} by {run.command}"]
    if run.error:
        out.append(f"error: {run.error}")
    for r in rows:
        extra = f"  {r.detail.get('error')}" if r.phase == "failed" else ""
        out.append(f"{r.seq:>6} {r.at} {r.phase:<7} {r.step_id}{extra}")
    return "\n".join(out)


def snapshot_note(reason: str | None, command: str) -> str:
    """What a plan says of the automatic snapshot its run takes first ("" when none)."""
    if not reason:
        return ""
    return (f"\n\nBefore the run: an automatic etcd snapshot, because {reason}"
            f" (`rkel rollback` returns to it; {command} --no-snapshot skips it).")
