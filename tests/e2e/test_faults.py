"""Faults on the testbed while rkel changes a cluster: each ends in a clear error that names the
host and what to do, leaves the state consistent (`rkel state verify`), and once the fault is
repaired the next `rkel apply` (or `--resume` for an interrupted run) converges.

One cluster for the module, on hosts rkn1..rkn4 as the non-root user: rkn1..rkn3 with every role
(three etcd members), rkn4 a worker; its kubelets take SLOW_START seconds to answer their health
check, as a slow kubelet does, so each fault lands mid-change. Its state folder is a 64 MiB tmpfs, so the disk can be
filled. Each story makes a rolling change (a kubelet flag, or a Kubernetes upgrade) and breaks
something while it runs:

1. rkn4's sshd is killed (with its sessions) while its new kubelet is health-checked;
2. rkn4's dockerd is stopped (its containers with it) while its new kubelet is health-checked;
3. rkn4 is cut off the network (veth down) during an upgrade 1.29 -> 1.30;
4. rkn3, an etcd member, is cut off the network during an upgrade 1.30 -> 1.31: etcd keeps
   quorum and every key, and rkel stops the controlplane group there;
5. the state folder fills up mid-run: rkel stops with what to do, nothing journaled is lost,
   `--resume` finishes once there is room;
6. rkel is killed -9 holding the run lock: the next command takes the dead process's lock over.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.e2e.conftest import run_testbed
from tests.e2e.test_cluster import ALL_ROLES, ready_nodes
from tests.e2e.test_upgrade import Upgrade

pytestmark = pytest.mark.e2e

ROLES = {"rkn1": ALL_ROLES, "rkn2": ALL_ROLES, "rkn3": ALL_ROLES, "rkn4": ["worker"]}
V129, V130, V131 = "v1.29.9-rancher1-1", "v1.30.5-rancher1-1", "v1.31.1-rancher1-1"
TMPFS_MIB = 64
# The kubelets answer their health check only this long after they start (a stand-in switch,
# passed through cluster.yml's extra_env): each fault lands while a kubelet is being replaced,
# however fast the rest of the change goes.
SLOW_START = 6


class Faults(Upgrade):
    version = V129
    max_pods = 110

    def change(self, **kw: Any) -> None:
        """Write cluster.yml with this story's version and kubelet flag."""
        self.version = kw.get("version", self.version)
        self.max_pods = kw.get("max_pods", self.max_pods)
        self.write(ROLES, kubernetes_version=self.version,
                   services={"kubelet": {"extra_args": {"max-pods": str(self.max_pods)},
                                         "extra_env": [f"STANDIN_HEALTHZ_DELAY_SECONDS={SLOW_START}"]}})

    def journal_rows(self) -> int:
        db = sqlite3.connect(f"file:{self.state}?mode=ro", uri=True, timeout=10)
        try:
            return int(db.execute("select count(*) from journal").fetchone()[0])
        finally:
            db.close()

    def cordoned(self, node: str) -> bool:
        try:
            return bool(self.kube_json("get", "node", node).get("spec", {}).get("unschedulable"))
        except AssertionError:
            return False

    def replacing_kubelet(self, node: str) -> bool:
        """The node's new kubelet runs, the old one set aside: rkel waits for its health check
        (SLOW_START seconds at least), no Docker call of its in flight."""
        try:
            client = self.engine(node)
            try:
                running = {c.name for c in client.containers.list()}
                return "kubelet" in running and any(
                    c.name == "old-kubelet" for c in client.containers.list(all=True))
            finally:
                client.close()
        except docker.errors.DockerException:
            return False

    def converged(self) -> None:
        """Every node Ready, schedulable, at this story's version and flag; nothing left to do;
        the state passes its own checks."""
        release = self.version.split("-")[0]
        nodes = ready_nodes(self, 4, lambda n: n["status"]["nodeInfo"]["kubeletVersion"] == release
                            and n["status"]["capacity"]["pods"] == str(self.max_pods))
        assert not [n["metadata"]["name"] for n in nodes if n["spec"].get("unschedulable")]
        plan = self.rkel("plan")
        assert plan.returncode == 0 and "No changes" in plan.stdout, plan.stdout + plan.stderr
        verify = self.rkel("state", "verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert not [k for k in self.all_containers() if k[1].startswith(("old-", "rkel-helper"))]

    def all_containers(self) -> dict[tuple[str, str], str]:
        return {(h, name): cid for h in ROLES for name, cid in self.containers(h).items()}


def when(condition: Callable[[], bool], then: Callable[[], None], timeout: float = 600) -> threading.Event:
    """Run `then` once `condition` holds (polled in a thread); the event tells that it ran."""
    fired = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                then()
                fired.set()
                return
            time.sleep(0.3)

    threading.Thread(target=watch, daemon=True).start()
    return fired


def on_testbed(*args: str) -> None:
    res = run_testbed(*args)
    assert res.returncode == 0, f"testbed {' '.join(args)}: {res.stdout}{res.stderr}"


@pytest.fixture(scope="module")
def faults(testbed: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    testbed.ensure(("4",))
    workdir = tmp_path_factory.mktemp("faults")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MIB}m,mode=0700", "tmpfs",
                    str(workdir)], check=True)
    c = Faults(workdir, testbed)
    try:
        for host in ROLES:  # an earlier module's cluster may have left its containers and data
            client = c.engine(host)
            try:
                for container in client.containers.list(all=True):
                    container.remove(force=True, v=True)
            finally:
                client.close()
            c.ssh(host, "rm -rf /etc/kubernetes/ssl /var/lib/etcd/member /opt/rke; true")
        c.change()
        c.apply("apply-3-all-roles-1-worker-1.29")
        c.converged()
        c.put_keys("before", 10)
        yield c
    finally:
        repair_testbed()
        if (c.workdir / "cluster.yml").exists():
            (c.workdir / "filler").unlink(missing_ok=True)
            c.rkel("apply", "--resume", "--yes")  # if a story left a run interrupted
            c.rkel("remove", "--force")
        for label, seconds in sorted(c.timings.items()):
            print(f"{label}: {seconds:.1f}s wall")
        subprocess.run(["umount", "--lazy", str(workdir)], check=False)


REPAIRS = (("heal", "3"), ("heal", "4"), ("start-sshd", "4"), ("start-dockerd", "4"))


def repair_testbed() -> None:
    """Undo every fault a story injects (each is a no-op when there is nothing to undo)."""
    for args in REPAIRS:
        run_testbed(*args)


@pytest.fixture(autouse=True)
def repaired(faults: Faults) -> Iterator[None]:
    """A story that fails before its own repair must not leave its fault to the next one."""
    yield
    repair_testbed()


def run_with_fault(c: Faults, label: str, condition: Callable[[], bool],
                   fault: Callable[[], None]) -> subprocess.CompletedProcess[str]:
    fired = when(condition, fault)
    started = time.monotonic()
    result = c.rkel("apply", "--yes")
    c.timings[label] = time.monotonic() - started
    assert fired.wait(5), f"{label}: the fault was never injected\n{result.stdout}{result.stderr}"
    print(f"--- {label}: exit {result.returncode}\n{result.stderr}")
    return result


def assert_contained(c: Faults, result: subprocess.CompletedProcess[str], host: str) -> None:
    """The run failed on `host` only, said so and what to do, and left the state sound."""
    assert result.returncode == 7, result.stdout + result.stderr
    assert f"{host} (state" in result.stderr, result.stderr
    assert "run `rkel apply` again" in result.stderr, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    verify = c.rkel("state", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert c.keys("before") == sorted(f"/e2e/before/{i}" for i in range(10))


@pytest.mark.parametrize(("daemon", "max_pods", "says"), [
    ("sshd", 111, "lost the SSH connection to 10.77.0.14:22"),  # killed with its sessions
    ("dockerd", 112, "the Docker Engine on 10.77.0.14"),  # as `systemctl stop docker`
])
def test_a_daemon_of_a_worker_stops_mid_change(faults: Faults, daemon: str, max_pods: int,
                                                says: str) -> None:
    c = faults
    c.change(max_pods=max_pods)
    result = run_with_fault(c, f"{daemon}-stopped", lambda: c.replacing_kubelet("rkn4"),
                            lambda: on_testbed(f"stop-{daemon}", "4"))
    assert_contained(c, result, "rkn4")
    assert says in result.stderr, result.stderr
    retry = c.rkel("apply", "--yes")  # still down: rkn4 is named again, the others are done
    assert retry.returncode != 0 and "rkn4" in retry.stderr, retry.stdout + retry.stderr
    assert "Traceback" not in retry.stderr
    on_testbed(f"start-{daemon}", "4")
    c.apply(f"{daemon}-repaired")
    c.converged()


def test_worker_partitioned_during_upgrade(faults: Faults) -> None:
    c = faults
    c.change(version=V130)
    result = run_with_fault(c, "worker-partitioned-upgrade-1.30", lambda: c.cordoned("rkn4"),
                            lambda: on_testbed("partition", "4"))
    assert_contained(c, result, "rkn4")
    nodes = {n["metadata"]["name"]: n for n in c.kube_json("get", "nodes")["items"]}
    for name in ("rkn1", "rkn2", "rkn3"):  # the others finished
        assert nodes[name]["status"]["nodeInfo"]["kubeletVersion"] == "v1.30.5"
    on_testbed("heal", "4")
    c.apply("worker-healed")
    c.converged()


def test_etcd_member_partitioned_during_upgrade(faults: Faults) -> None:
    c = faults
    c.change(version=V131)
    # rkn3 is the last controlplane node: cut it off once rkn2 is being upgraded
    result = run_with_fault(c, "etcd-member-partitioned-upgrade-1.31", lambda: c.cordoned("rkn2"),
                            lambda: on_testbed("partition", "3"))
    assert result.returncode in (6, 7), result.stdout + result.stderr
    assert "rkn3" in result.stderr, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    # etcd kept quorum on the other two members: every key is there
    assert c.keys("before") == sorted(f"/e2e/before/{i}" for i in range(10))
    verify = c.rkel("state", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    on_testbed("heal", "3")
    c.apply("etcd-member-healed")
    c.converged()
    assert c.members() == ["etcd-rkn1", "etcd-rkn2", "etcd-rkn3"]


def test_state_disk_full_mid_run_then_resume(faults: Faults) -> None:
    c = faults
    c.change(max_pods=113)
    before = c.journal_rows()
    filler = c.workdir / "filler"

    def fill() -> None:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * (1 << 16))
        except OSError:
            pass  # ENOSPC: the disk is full
        finally:
            os.close(fd)

    result = run_with_fault(c, "state-disk-full", lambda: c.journal_rows() >= before + 6, fill)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "space" in result.stderr.lower() and "--resume" in result.stderr, result.stderr
    journaled = c.journal_rows()
    assert journaled >= before + 6
    filler.unlink()
    db = sqlite3.connect(str(c.state))
    try:
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()  # an open file keeps the tmpfs busy at unmount
    started = time.monotonic()
    resumed = c.rkel("apply", "--resume", "--yes")
    c.timings["disk-full-resume"] = time.monotonic() - started
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert c.journal_rows() > journaled  # what was journaled before the disk filled is kept
    c.converged()


def test_lock_of_a_killed_run_is_taken_over(faults: Faults) -> None:
    c = faults
    c.change(max_pods=114)
    crashed = c.rkel("apply", "--yes", env={"RKEL_CRASH_AFTER_JOURNAL_WRITES": "5"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    db = sqlite3.connect(f"file:{c.state}?mode=ro", uri=True)
    try:
        held = db.execute("select * from lock").fetchall()
    finally:
        db.close()
    assert held, "the killed run left no lock to take over"
    status = c.rkel("-o", "json", "status")
    assert status.returncode == 0, status.stderr
    resumed = c.rkel("apply", "--resume", "--yes")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "dead" in resumed.stderr.lower() or "took over" in resumed.stderr.lower(), resumed.stderr
    json.loads(status.stdout)
    c.converged()
