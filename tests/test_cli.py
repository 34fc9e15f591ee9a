"""The `rkel` command as a user runs it: real processes, real files, the Simulated backend.

Kill -9 is real here: RKEL_CRASH_AFTER_JOURNAL_WRITES makes the rkel process SIGKILL itself
right after its Nth journal write, and the next `rkel apply --resume` has to finish the job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lifecycle.hosts.simulated import SimWorld

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "scenarios" / "examples"
RKE_CONFIGS = Path(
    os.environ.get("RKEL_RKE_CONFIGS", ROOT.parent / "shared" / "rke-configs")
)


def rkel(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "RKEL_CRASH_AFTER_JOURNAL_WRITES"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "lifecycle", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def cluster(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.yml"
    shutil.copy(EXAMPLES / "three-node.yml", path)
    return path


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr


# ---------------------------------------------------------------------------- config validate
def test_validate_announcement_example_ok() -> None:
    result = rkel("-c", str(RKE_CONFIGS / "01-rancher-rke-2017-auth-service-images.yml"),
                  "config", "validate")
    assert result.returncode == 0, result.stderr
    assert "OK:" in result.stdout
    assert "auth" in result.stdout  # the legacy spelling is loaded, with a warning


def test_validate_typo_says_did_you_mean(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yml"
    path.write_text(textwrap.dedent("""\
        nodes:
          - address: 10.0.0.1
            user: rkel
            role: [controlplane, etcd, worker]
            hostname_overide: n1
        """))
    result = rkel("-c", str(path), "config", "validate")
    assert result.returncode == 2
    assert "did you mean `hostname_override`" in result.stderr
    assert "line 5" in result.stderr
    no_traceback(result)


def test_validate_reports_every_error(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yml"
    path.write_text(textwrap.dedent("""\
        nodes:
          - {address: 10.0.0.1, user: rkel, role: [worker], port: twenty-two}
          - {address: 10.0.0.1, user: rkel, role: [boss]}
        services:
          kube-api: {service_cluster_ip_range: 10.43.0.0/33}
        upgrade_strategy: {max_unavailable_worker: 0}
        """))
    result = rkel("-c", str(path), "-o", "json", "config", "validate")
    assert result.returncode == 2
    issues = json.loads(result.stdout)["issues"]
    text = " ".join(i["message"] for i in issues)
    for needle in ("etcd", "port", "boss", "10.0.0.1", "10.43.0.0/33", "max_unavailable_worker"):
        assert needle in text or any(needle in i["path"] for i in issues), (needle, issues)
    no_traceback(result)


def test_validate_missing_file_is_clear(tmp_path: Path) -> None:
    result = rkel("-c", str(tmp_path / "nope.yml"), "config", "validate")
    assert result.returncode == 2
    assert "nope.yml" in result.stderr
    no_traceback(result)


# ---------------------------------------------------------------------------- plan / apply
def test_plan_then_apply_then_nothing_to_do(cluster: Path) -> None:
    plan = rkel("-c", str(cluster), "plan")
    assert plan.returncode == 0, plan.stderr
    assert "Plan: 20 to add, 0 to change, 0 to remove." in plan.stdout
    # phases appear in order
    positions = [plan.stdout.index(f"] {p}:") for p in ("certs", "etcd", "controlplane", "workers")]
    assert positions == sorted(positions)
    applied = rkel("-c", str(cluster), "apply", "--backend", "simulated", "--yes")
    assert applied.returncode == 0, applied.stderr
    again = rkel("-c", str(cluster), "plan")
    assert "No changes" in again.stdout
    status = rkel("-c", str(cluster), "status")
    assert status.stdout.count(" running ") >= 3 + 20
    assert "kube-apiserver" in status.stdout and "rancher/hyperkube:v1.30.5-rancher1" in status.stdout


def test_plan_json_is_the_same_plan(cluster: Path) -> None:
    text = rkel("-c", str(cluster), "plan")
    data = json.loads(rkel("-c", str(cluster), "-o", "json", "plan").stdout)
    steps = [s for g in data["groups"] for u in g["units"] for s in u["steps"]]
    # 14 services, an etcd-rolling-snapshots per etcd node and a service-sidekick per node
    assert sum(1 for s in steps if s["action"] == "start") == 20
    assert data["summary"]["add"] == 20 and "Plan: 20 to add" in text.stdout
    assert [g["phase"] for g in data["groups"]] == [
        "certs", "etcd", "controlplane", "workers", "addons"]
    # RKE's default add-ons, applied through the API once the nodes are up
    addons = [u["node"] for g in data["groups"] if g["phase"] == "addons" for u in g["units"]]
    assert addons == ["network-canal", "dns-coredns", "monitoring-metrics-server", "ingress-nginx"]
    assert "4 add-on(s) to apply" in text.stdout


def test_saved_plan_is_refused_once_stale(cluster: Path, tmp_path: Path) -> None:
    saved = tmp_path / "plan.json"
    assert rkel("-c", str(cluster), "plan", "--out", str(saved)).returncode == 0
    assert rkel("-c", str(cluster), "apply", "--backend", "simulated", "--yes").returncode == 0
    stale = rkel("-c", str(cluster), "apply", str(saved), "--backend", "simulated", "--yes")
    assert stale.returncode == 3
    assert "rkel plan" in stale.stderr
    no_traceback(stale)


def test_saved_plan_applies_when_fresh(cluster: Path, tmp_path: Path) -> None:
    saved = tmp_path / "plan.json"
    assert rkel("-c", str(cluster), "plan", "--out", str(saved)).returncode == 0
    applied = rkel("-c", str(cluster), "apply", str(saved), "--backend", "simulated", "--yes")
    assert applied.returncode == 0, applied.stderr
    assert "No changes" in rkel("-c", str(cluster), "plan").stdout


def test_upgrade_shows_old_and_new_images(cluster: Path) -> None:
    assert rkel("-c", str(cluster), "apply", "--backend", "simulated", "--yes").returncode == 0
    cluster.write_text(cluster.read_text().replace("v1.30.5-rancher1-1", "v1.31.1-rancher1-1"))
    plan = rkel("-c", str(cluster), "plan")
    assert ("~ kube-apiserver           rancher/hyperkube:v1.30.5-rancher1 -> "
            "rancher/hyperkube:v1.31.1-rancher1") in plan.stdout
    assert "(cordon, drain, uncordon)" in plan.stdout
    assert "0 to add" in plan.stdout and "0 to remove" in plan.stdout


def test_remove_empties_every_node_and_can_be_run_again(cluster: Path) -> None:
    assert rkel("-c", str(cluster), "apply", "--backend", "simulated", "--yes").returncode == 0
    refused = rkel("-c", str(cluster), "remove", "--backend", "simulated")
    assert refused.returncode != 0 and "not on a terminal" in refused.stderr  # asks first
    removed = rkel("-c", str(cluster), "remove", "--backend", "simulated", "--force")
    assert removed.returncode == 0, removed.stderr
    assert "Remove complete" in removed.stdout
    world = json.loads(cluster.with_name("cluster.rkel.world.json").read_text())
    assert all(not h["containers"] and not h["files"] for h in world["hosts"].values())
    status = json.loads(rkel("-c", str(cluster), "-o", "json", "status").stdout)
    assert status["nodes"] == [] and status["services"] == []
    history = rkel("-c", str(cluster), "history").stdout
    assert "remove" in history
    again = rkel("-c", str(cluster), "remove", "--backend", "simulated", "--force")
    assert again.returncode == 0, again.stderr  # idempotent
    assert "Plan: 20 to add" in rkel("-c", str(cluster), "plan").stdout  # a cluster can come back


# ---------------------------------------------------------------------------- kill -9 and resume
def test_kill_9_then_resume_converges(cluster: Path) -> None:
    crashed = rkel("-c", str(cluster), "apply", "--backend", "simulated", "--yes",
                   env={"RKEL_CRASH_AFTER_JOURNAL_WRITES": "17"})
    assert crashed.returncode == -signal.SIGKILL
    plain = rkel("-c", str(cluster), "apply", "--backend", "simulated", "--yes")
    assert plain.returncode == 4
    assert "rkel apply --resume" in plain.stderr
    resumed = rkel("-c", str(cluster), "apply", "--resume", "--backend", "simulated", "--yes")
    assert resumed.returncode == 0, resumed.stderr
    assert "already done before" in resumed.stdout
    assert "No changes" in rkel("-c", str(cluster), "plan").stdout
    world = json.loads((cluster.parent / "cluster.rkel.world.json").read_text())
    assert max(world["creations"].values()) == 1  # nothing was created twice
    history = rkel("-c", str(cluster), "history")
    assert " done " in history.stdout


def test_resume_with_nothing_to_resume(cluster: Path) -> None:
    result = rkel("-c", str(cluster), "apply", "--resume", "--backend", "simulated", "--yes")
    assert result.returncode == 4
    assert "no interrupted run" in result.stderr


def test_lock_names_the_holder(cluster: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from store import Store
            s = Store.open({str(cluster.parent / 'cluster.rkel.db')!r})
            s.acquire_lock(None, "rkel apply (holder)")
            print("held", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = rkel("-c", str(cluster), "apply", "--backend", "simulated", "--yes")
        assert result.returncode == 4
        assert f"pid {holder.pid}" in result.stderr and "rkel apply (holder)" in result.stderr
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its lock is stale and is taken over
    result = rkel("-c", str(cluster), "apply", "--backend", "simulated", "--yes")
    assert result.returncode == 0, result.stderr
    assert "took over the lock" in result.stderr


# ---------------------------------------------------------------------------- scale and misc
def test_hundred_nodes_windows(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yml"
    shutil.copy(EXAMPLES / "hundred-node.yml", path)
    assert rkel("-c", str(path), "apply", "--backend", "simulated", "--yes").returncode == 0
    path.write_text(path.read_text().replace("v1.30.5-rancher1-1", "v1.31.1-rancher1-1"))
    started = time.monotonic()
    result = rkel("-c", str(path), "-o", "json", "plan", "--simulate")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 120
    data = json.loads(result.stdout)
    workers = [g for g in data["groups"] if g["phase"] == "workers"]
    assert [g["concurrency"] for g in workers] == [9]  # 10% of 97, rounded down
    names = [u["node"] for u in workers[0]["units"]]
    assert names == sorted(names) and len(names) == 97
    assert data["rehearsal"]["max_unschedulable"]["worker"] == 9
    assert data["rehearsal"]["quorum_violations"] == []


def test_graph_and_version() -> None:
    graph = rkel("graph")
    assert graph.returncode == 0 and graph.stdout.count("stateDiagram-v2") == 2
    for state in ("absent", "certs", "running", "draining", "upgraded"):
        assert state in graph.stdout
    assert rkel("version").stdout.startswith("rkel ")


def test_every_command_has_help() -> None:
    for command in ([], ["plan"], ["apply"], ["status"], ["history"], ["graph"],
                    ["config", "validate"], ["version"]):
        result = rkel(*command, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout, command


# ---------------------------------------------------------------------------- version rules, budget
FIVE_NODES = """\
cluster_name: budget
kubernetes_version: v1.30.5-rancher1-1
nodes:
  - {address: 10.0.0.1, hostname_override: cp, user: rkel, role: [controlplane, etcd]}
  - {address: 10.0.0.2, hostname_override: w1, user: rkel, role: [worker]}
  - {address: 10.0.0.3, hostname_override: w2, user: rkel, role: [worker]}
  - {address: 10.0.0.4, hostname_override: w3, user: rkel, role: [worker]}
  - {address: 10.0.0.5, hostname_override: w4, user: rkel, role: [worker]}
upgrade_strategy: {max_unavailable_worker: WINDOW, drain: true}
network: {plugin: none}
dns: {provider: none}
"""


def five_nodes(tmp_path: Path, window: int) -> Path:
    path = tmp_path / "cluster.yml"
    path.write_text(FIVE_NODES.replace("WINDOW", str(window)))
    assert rkel("-c", str(path), "apply", "--backend", "simulated", "--yes").returncode == 0
    return path


def test_apply_refuses_a_downgrade_and_a_skipped_minor(tmp_path: Path) -> None:
    path = five_nodes(tmp_path, 1)
    path.write_text(path.read_text().replace("v1.30.5", "v1.29.9"))
    down = rkel("-c", str(path), "plan")
    assert down.returncode == 3, down.stdout + down.stderr
    assert "older than the cluster's v1.30.5-rancher1-1" in down.stderr
    assert "does not downgrade" in down.stderr
    no_traceback(down)
    # from 1.29, 1.31 skips 1.30
    other = tmp_path / "old"
    other.mkdir()
    old = other / "cluster.yml"
    old.write_text(path.read_text())
    assert rkel("-c", str(old), "apply", "--backend", "simulated", "--yes").returncode == 0
    old.write_text(old.read_text().replace("v1.29.9", "v1.31.1"))
    skip = rkel("-c", str(old), "plan")
    assert skip.returncode == 3 and "skips a minor version" in skip.stderr
    assert "Upgrade to a v1.30.x version first" in skip.stderr


def world(path: Path) -> SimWorld:
    return SimWorld.load(path.with_name("cluster.rkel.world.json"))


def kubelet_images(path: Path) -> dict[str, str]:
    status = json.loads(rkel("-c", str(path), "-o", "json", "status").stdout)
    return {s["node"]: s["image"] for s in status["services"] if s["name"] == "kubelet"}


def test_an_unavailable_worker_that_uses_up_the_budget_stops_the_upgrade_before_it_starts(
        tmp_path: Path) -> None:
    path = five_nodes(tmp_path, 1)
    world(path).set_reachable("w3", False)
    path.write_text(path.read_text().replace("v1.30.5", "v1.31.1"))
    before = kubelet_images(path)
    # `plan --check` says so first, without changing anything
    checked = rkel("-c", str(path), "plan", "--check", "--backend", "simulated")
    assert checked.returncode == 3 and "w3: unreachable" in checked.stderr, checked.stderr
    refused = rkel("-c", str(path), "apply", "--backend", "simulated", "--yes")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "1 worker node(s) are already unavailable (w3: unreachable" in refused.stderr
    assert "max_unavailable_worker allows 1" in refused.stderr
    assert kubelet_images(path) == before  # nothing was touched
    assert "apply" not in rkel("-c", str(path), "history").stdout.split("apply", 1)[1]


def test_under_budget_the_upgrade_skips_the_unavailable_worker_and_says_so(tmp_path: Path) -> None:
    path = five_nodes(tmp_path, 2)
    world(path).set_reachable("w3", False)
    path.write_text(path.read_text().replace("v1.30.5", "v1.31.1"))
    checked = rkel("-c", str(path), "plan", "--check", "--backend", "simulated")
    assert checked.returncode == 0, checked.stderr
    assert "warning: w3 (worker) is unavailable before the run: unreachable" in checked.stdout
    result = rkel("-c", str(path), "apply", "--backend", "simulated", "--yes")
    assert result.returncode == 7, result.stdout + result.stderr
    assert "w3 (worker) is unavailable before the run: unreachable" in result.stderr
    assert "w3: skipped: unreachable" in result.stderr
    images = kubelet_images(path)
    assert images.pop("w3").endswith("v1.30.5-rancher1")  # left as it was
    assert all(i.endswith("v1.31.1-rancher1") for i in images.values()), images
    # back again: the next apply finishes it
    world(path).set_reachable("w3", True)
    again = rkel("-c", str(path), "apply", "--backend", "simulated", "--yes")
    assert again.returncode == 0, again.stderr
    assert kubelet_images(path)["w3"].endswith("v1.31.1-rancher1")


def test_an_error_in_a_finalizer_at_exit_prints_no_traceback() -> None:
    """paramiko's channel files of a host cut off mid-run are collected at exit, and their
    close() fails: Python can only ignore that, and rkel says nothing of it on stderr."""
    script = textwrap.dedent("""
        from lifecycle import cli

        class ChannelFile:
            def __del__(self) -> None:
                raise ValueError("I/O operation on closed file.")

        def app() -> None:
            global kept
            kept = ChannelFile()  # collected at exit
            cycle = [ChannelFile()]
            cycle.append(cycle)  # collected by the GC

        cli.app = app
        cli.main()
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=False)
    assert run.returncode == 0
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr
