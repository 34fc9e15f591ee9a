"""Rollback on the real testbed: etcd data and component versions back together.

One story on 3 all-role nodes (rkn1..rkn3, non-root SSH user):
1. apply 1.30; write keys `before`; upgrade to 1.31 — the plan announces an automatic snapshot
   and apply takes it (catalogued as `auto`, at v1.30, with the applied cluster.yml); write keys
   `after`.
2. A snapshot whose every copy has a flipped byte is refused by `verify` and by `restore`, with a
   message naming it, and nothing is stopped: every container keeps running and etcd still
   holds `after`.
3. `rkel plan --rollback` shows the restore and the downgrade; `rkel rollback` is killed (-9)
   while the etcd members are being restored (etcd stopped); `rkel apply` refuses, `rkel apply
   --resume` finishes it. Then: every `before` key present, every `after` key gone, every
   Kubernetes component on v1.30.5, every node Ready at v1.30.5 and schedulable, no set-aside
   data, helper container or `old-*` container left; the cluster.yml of 1.30 plans no change.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import cluster_story
from tests.e2e.test_cluster import ALL_ROLES, HOSTS, ready_nodes
from tests.e2e.test_upgrade import NEW, OLD, Upgrade

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def story(testbed: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upgrade]:
    with cluster_story(Upgrade, testbed, tmp_path_factory, "rollback") as c:
        yield c


def write(c: Upgrade, version: str) -> None:
    c.write({h: ALL_ROLES for h in HOSTS}, kubernetes_version=version)


def started_at(c: Upgrade) -> dict[tuple[str, str], str]:
    """(host, container) -> StartedAt of every running container (a restart changes it)."""
    out = {}
    for host in HOSTS:
        client = c.engine(host)
        try:
            for container in client.containers.list():
                out[(host, container.name)] = container.attrs["State"]["StartedAt"]
        finally:
            client.close()
    return out


def test_upgrade_takes_an_automatic_snapshot_first(story: Upgrade) -> None:
    c = story
    write(c, OLD)
    c.apply("apply-1.30")
    ready_nodes(c, 3)
    c.put_keys("before", 20)
    write(c, NEW)
    plan = c.rkel("plan")
    assert "Before the run: an automatic etcd snapshot" in plan.stdout, plan.stdout
    started = time.monotonic()
    up = c.rkel("apply", "--yes")
    c.timings["upgrade-1.31-with-auto-snapshot"] = time.monotonic() - started
    assert up.returncode == 0, up.stdout + up.stderr
    assert "taking an automatic etcd snapshot first" in up.stderr
    listed = json.loads(c.rkel("-o", "json", "snapshot", "list").stdout)
    autos = [s for s in listed if s["kind"] == "auto"]
    assert len(autos) == 1 and autos[0]["kubernetes_version"] == OLD, listed
    assert autos[0]["nodes"] == list(HOSTS)
    c.put_keys("after", 10)
    assert len(c.keys("after")) == 10


def test_a_corrupted_snapshot_is_refused_and_nothing_is_stopped(story: Upgrade) -> None:
    c = story
    saved = c.rkel("-o", "json", "snapshot", "save", "--name", "e2e-corrupt")
    assert saved.returncode == 0, saved.stderr
    info = json.loads(saved.stdout)
    copies = [Path(info["local"])] + [
        c.testbed.state_dir / f"n{h[-1]}" / "opt-rke" / "etcd-snapshots" / "e2e-corrupt"
        for h in HOSTS]
    for path in copies:
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0xFF
        path.write_bytes(bytes(data))
    before = started_at(c)
    verify = c.rkel("snapshot", "verify", "e2e-corrupt")
    assert verify.returncode == 3 and "rkn2" in verify.stderr, verify.stderr
    restore = c.rkel("snapshot", "restore", "e2e-corrupt", "--yes")
    assert restore.returncode == 3, restore.stdout + restore.stderr
    assert "no copy matches its catalogued sha256" in restore.stderr
    assert "nothing was stopped" in restore.stderr and "Traceback" not in restore.stderr
    assert started_at(c) == before  # not one container was stopped or restarted
    assert len(c.keys("after")) == 10
    listed = {s["name"]: s for s in json.loads(c.rkel("-o", "json", "snapshot", "list").stdout)}
    assert listed["e2e-corrupt"]["status"] == "corrupt"  # kept, marked, never used


def test_rollback_killed_mid_restore_then_resumed_brings_back_data_and_versions(
        story: Upgrade) -> None:
    c = story
    shown = c.rkel("plan", "--rollback")
    assert shown.returncode == 0, shown.stderr
    assert "restore every etcd member" in shown.stdout
    downgrades = [line for line in shown.stdout.splitlines() if "kube-apiserver" in line
                  and "v1.31.1-rancher1 ->" in line and line.endswith(":v1.30.5-rancher1")]
    assert downgrades, shown.stdout
    assert "+kubernetes_version: v1.30.5-rancher1-1" in shown.stdout  # the cluster.yml to write
    started = time.monotonic()
    # journal writes: stage 3x2, stop 3x2, then inside the members' restore (etcd is down)
    crashed = c.rkel("rollback", "--yes", env={"RKEL_CRASH_AFTER_JOURNAL_WRITES": "14"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    refused = c.rkel("apply", "--yes")
    assert refused.returncode == 4 and "--resume" in refused.stderr
    resumed = c.rkel("apply", "--resume", "--yes")
    c.timings["rollback-with-kill-9"] = time.monotonic() - started
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    assert c.keys("before") == sorted(f"/e2e/before/{i}" for i in range(20))
    assert c.keys("after") == []
    nodes = ready_nodes(c, 3, lambda n: n["status"]["nodeInfo"]["kubeletVersion"] == "v1.30.5")
    assert all(not n["spec"].get("unschedulable") for n in nodes), "a node was left cordoned"
    kube_images = {k: v for k, v in c.images().items() if "hyperkube" in v}
    assert kube_images and all(v.endswith(":v1.30.5-rancher1") for v in kube_images.values())
    assert c.members() == [f"etcd-{h}" for h in HOSTS]
    containers = c.all_containers()
    assert not [k for k in containers if k[1].startswith(("old-", "rkel-helper"))], containers
    for host in HOSTS:
        data = c.testbed.state_dir / f"n{host[-1]}" / "var-lib-etcd"
        assert sorted(p.name for p in data.iterdir()) == ["member"], host
    write(c, OLD)
    assert "No changes" in c.rkel("plan").stdout
    # the snapshot of what was rolled back from is the next rollback target (an undo)
    listed = json.loads(c.rkel("-o", "json", "snapshot", "list").stdout)
    assert [s["kubernetes_version"] for s in listed if s["kind"] == "auto"][-1] == NEW
