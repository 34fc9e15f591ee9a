"""Rolling upgrades, node failures and membership changes of whole clusters on the testbed.

The invariants are checked from etcd's own record of events: every write of a Node object is a
revision of `/registry/nodes/<name>` in the real etcd, so replaying that history (etcdctl watch
from the revision before the run) shows how many nodes were unschedulable at any moment.

Stories, each on a fresh cluster (hosts rkn1..rkn4, non-root SSH user):
1. 3 all-role nodes, 1.30 -> 1.31, with drain; rkel is killed (-9) in the controlplane phase and
   `rkel apply --resume` finishes. Never more than max_unavailable_controlplane (1) node
   unschedulable; keys written before are all there; every node ends Ready, schedulable, at
   v1.31.1; pods of a Deployment were moved by the drains and run again.
2. 1 controlplane+etcd node and 3 workers, max_unavailable_worker 2, drain; a worker's host dies
   while it is being upgraded. The run goes on with the others, never has more than 2 workers
   unschedulable, ends naming the dead worker and its state, leaves nothing cordoned; once the
   host is back, `rkel apply` finishes the upgrade.
3. One apply adds an etcd node (rkn4) and removes another (rkn3): rkn4 joins etcd and Kubernetes,
   rkn3 leaves both and is emptied, and the data survives.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import run_testbed
from tests.e2e.test_cluster import ALL_ROLES, Cluster, ready, ready_nodes, wait_for
from tests.e2e.test_etcd_plane import ADDRESSES

pytestmark = pytest.mark.e2e

OLD, NEW = "v1.30.5-rancher1-1", "v1.31.1-rancher1-1"
DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: REPLICAS
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: "10.77.0.1:5000/rkel-test/base:py311"}]
"""


class Upgrade(Cluster):
    def etcd(self, *args: str) -> subprocess.CompletedProcess[str]:
        files = self.client_files(self.state, "kube-apiserver-etcd-client")
        return self.etcdctl(ADDRESSES["rkn1"], files, *args)

    def revision(self) -> int:
        out = json.loads(self.etcd("endpoint", "status", "-w", "json").stdout)
        return int(out[0]["Status"]["header"]["revision"])

    def put_keys(self, prefix: str, n: int) -> None:
        for i in range(n):
            self.etcd("put", f"/e2e/{prefix}/{i}", f"value-{i}")

    def keys(self, prefix: str) -> list[str]:
        out = self.etcd("get", "--prefix", f"/e2e/{prefix}/", "--keys-only").stdout
        return sorted(k for k in out.split() if k)

    def most_unschedulable(self, since: int, group: set[str]) -> int:
        """Replay every write of a Node in `group` since revision `since`: the most that were
        unschedulable at the same moment."""
        files = self.client_files(self.state, "kube-apiserver-etcd-client")
        cmd = ["etcdctl", f"--endpoints=https://{ADDRESSES['rkn1']}:2379",
               f"--cert={files['cert']}", f"--key={files['key']}", f"--cacert={files['cacert']}",
               "watch", "--prefix", "/registry/nodes/", f"--rev={since}", "-w", "json"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "ETCDCTL_API": "3"})
        timer = threading.Timer(8, proc.terminate)
        timer.start()
        out, _ = proc.communicate()
        timer.cancel()
        state: dict[str, bool] = {}
        most = 0
        for line in out.splitlines():
            if not line.startswith("{"):
                continue
            for event in json.loads(line).get("Events") or []:
                kv = event["kv"]
                name = base64.b64decode(kv["key"]).decode().rsplit("/", 1)[-1]
                if name not in group:
                    continue
                if event.get("type") == "DELETE":
                    state.pop(name, None)
                else:
                    node = json.loads(base64.b64decode(kv["value"]))
                    state[name] = bool(node.get("spec", {}).get("unschedulable"))
                most = max(most, sum(state.values()))
        assert state, f"no Node writes found since revision {since}:\n{out[:500]}"
        return most

    def images(self) -> dict[tuple[str, str], str]:
        out = {}
        for host in ("rkn1", "rkn2", "rkn3", "rkn4"):
            client = self.engine(host)
            try:
                for c in client.containers.list(all=True):
                    out[(host, c.name)] = c.attrs["Config"]["Image"]
            finally:
                client.close()
        return out

    def deployment(self, replicas: int) -> None:
        self.kubectl("create", "-f", "-", stdin=DEPLOYMENT.replace("REPLICAS", str(replicas)))

    def web_pods(self, count: int) -> dict[str, str]:
        def check() -> dict[str, str] | None:
            pods = self.kube_json("get", "pods", "-n", "default", "-l", "app=web")["items"]
            running = {p["metadata"]["name"]: p["spec"].get("nodeName", "") for p in pods
                       if p["status"].get("phase") == "Running"
                       and not p["metadata"].get("deletionTimestamp")}
            return running if len(running) == count else None
        return wait_for(f"{count} web pods running", check, timeout=90)  # type: ignore[no-any-return]


def converged_at_new_version(c: Upgrade, count: int) -> None:
    nodes = ready_nodes(c, count, lambda n: n["status"]["nodeInfo"]["kubeletVersion"] == "v1.31.1")
    assert all(not n["spec"].get("unschedulable") for n in nodes), "a node was left cordoned"
    kube_images = {k: v for k, v in c.images().items() if "hyperkube" in v}
    assert kube_images and all(v.endswith(":v1.31.1-rancher1") for v in kube_images.values()), kube_images
    plan = c.rkel("plan")
    assert "No changes" in plan.stdout, plan.stdout


@pytest.fixture
def upgrade(testbed: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upgrade]:
    testbed.ensure(("4",))
    c = Upgrade(tmp_path_factory.mktemp("upgrade"), testbed)
    try:
        yield c
    finally:
        run_testbed("start-host", "4")  # in case a story left it stopped
        if (c.workdir / "cluster.yml").exists():
            c.rkel("remove", "--force")
        for label, seconds in sorted(c.timings.items()):
            print(f"{label}: {seconds:.1f}s wall")


def test_rolling_upgrade_of_three_all_role_nodes_survives_kill_9(upgrade: Upgrade) -> None:
    c = upgrade
    hosts = ["rkn1", "rkn2", "rkn3"]
    c.write({h: ALL_ROLES for h in hosts}, kubernetes_version=OLD,
            upgrade_strategy={"drain": True, "node_drain_input": {"force": True, "timeout": 60}})
    c.apply("apply-1.30")
    ready_nodes(c, 3)
    c.deployment(3)
    c.web_pods(3)
    c.put_keys("before", 20)
    since = c.revision()

    c.write({h: ALL_ROLES for h in hosts}, kubernetes_version=NEW,
            upgrade_strategy={"drain": True, "node_drain_input": {"force": True, "timeout": 60}})
    plan = json.loads(c.rkel("-o", "json", "plan").stdout)
    assert [g["phase"] for g in plan["groups"]] == ["controlplane"]
    assert plan["groups"][0]["concurrency"] == 1
    # die in the controlplane phase: after 12 journal writes (first node cordoned, drained, and
    # its control plane being replaced)
    started = time.monotonic()
    crashed = c.rkel("apply", "--yes", env={"RKEL_CRASH_AFTER_JOURNAL_WRITES": "12"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    refused = c.rkel("apply", "--yes")
    assert refused.returncode == 4 and "--resume" in refused.stderr
    resumed = c.rkel("apply", "--resume", "--yes")
    c.timings["upgrade-1.31-with-kill-9"] = time.monotonic() - started
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    converged_at_new_version(c, 3)
    assert c.most_unschedulable(since, set(hosts)) == 1
    assert c.keys("before") == sorted(f"/e2e/before/{i}" for i in range(20))
    assert len(c.web_pods(3)) == 3  # the drains evicted them; the Deployment brought them back
    containers = c.all_containers()
    assert not [k for k in containers if k[1].startswith("old-")]  # nothing set aside is left


def test_a_worker_that_dies_mid_upgrade_is_contained_and_finished_later(upgrade: Upgrade) -> None:
    c = upgrade
    roles = {"rkn1": ["controlplane", "etcd"], "rkn2": ["worker"], "rkn3": ["worker"],
             "rkn4": ["worker"]}
    strategy = {"max_unavailable_worker": 2, "drain": True,
                "node_drain_input": {"force": True, "timeout": 60}}
    c.write(roles, kubernetes_version=OLD, upgrade_strategy=strategy)
    c.apply("apply-1cp-3w")
    ready_nodes(c, 4)
    c.deployment(6)
    c.web_pods(6)
    since = c.revision()
    c.write(roles, kubernetes_version=NEW, upgrade_strategy=strategy)

    # rkn4 is upgraded in the window's second turn: once it is cordoned, its host dies
    killed = threading.Event()

    def kill_rkn4_when_cordoned() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed.is_set():
            try:
                node = c.kube_json("get", "node", "rkn4")
            except AssertionError:
                node = {}
            if node.get("spec", {}).get("unschedulable"):
                assert run_testbed("stop-host", "4").returncode == 0
                killed.set()
                return
            time.sleep(0.3)

    watcher = threading.Thread(target=kill_rkn4_when_cordoned, daemon=True)
    watcher.start()
    started = time.monotonic()
    result = c.rkel("apply", "--yes")
    c.timings["upgrade-with-dead-worker"] = time.monotonic() - started
    watcher.join(timeout=5)
    assert killed.is_set(), "rkn4 was never cordoned"
    assert result.returncode == 7, result.stdout + result.stderr
    assert "rkn4 (state failed)" in result.stderr, result.stderr
    nodes = {n["metadata"]["name"]: n for n in c.kube_json("get", "nodes")["items"]}
    for name in ("rkn1", "rkn2", "rkn3"):
        assert ready(nodes[name]) and nodes[name]["status"]["nodeInfo"]["kubeletVersion"] == "v1.31.1"
    assert not any(n["spec"].get("unschedulable") for n in nodes.values()), "left cordoned"
    assert c.most_unschedulable(since, {"rkn2", "rkn3", "rkn4"}) <= 2

    assert run_testbed("start-host", "4").returncode == 0
    ready_nodes(c, 4)  # its kubelet is back (at the old version)
    finished = c.rkel("apply", "--yes")
    assert finished.returncode == 0, finished.stdout + finished.stderr
    converged_at_new_version(c, 4)


def test_one_apply_adds_an_etcd_node_and_removes_another(upgrade: Upgrade) -> None:
    c = upgrade
    c.write({h: ALL_ROLES for h in ("rkn1", "rkn2", "rkn3")})
    c.apply("apply-3")
    c.put_keys("kept", 10)
    c.write({h: ALL_ROLES for h in ("rkn1", "rkn2", "rkn4")})
    plan = c.rkel("plan")
    assert "rkn4" in plan.stdout and "rkn3" in plan.stdout
    c.apply("swap-etcd-member")
    assert c.members() == ["etcd-rkn1", "etcd-rkn2", "etcd-rkn4"]
    assert c.keys("kept") == sorted(f"/e2e/kept/{i}" for i in range(10))
    names = sorted(n["metadata"]["name"] for n in ready_nodes(c, 3))
    assert names == ["rkn1", "rkn2", "rkn4"]  # rkn3 was deleted from Kubernetes
    assert c.containers("rkn3") == {}
    assert c.leftover_files("rkn3") == []
