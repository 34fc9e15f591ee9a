"""etcd snapshots on the real testbed: save, list, verify (and catch a corrupted copy), prune.

One story on hosts rkn1..rkn3 (10.77.0.11-13), as the non-root docker-group user `rkel`: a
3-member etcd plane (`rkel apply --only etcd`), keys written over TLS, then `rkel snapshot save`.
The file must be on every node's /opt/rke/etcd-snapshots (read through the testbed's host dirs)
and locally, byte-identical, and readable by the machine's own etcdctl; one flipped byte on one
node makes verify fail naming that node; prune removes the older one everywhere and keeps the
newest. Besides, the story's cluster.yml asks for RKE's recurring snapshots (backup_config,
retention 2; the rke-etcd-backup stand-in's interval set to 2 s): each etcd node's
etcd-rolling-snapshots container keeps its newest two `<time>_etcd` files there, readable by
etcdctl; switching them off removes the container and leaves the files, and one of those files
is found with `snapshot list --on-nodes`, catalogued and restored by name (a key written after it
is gone, the keys before it are back). Last, on the idle rkn4: a new cluster is not started over
etcd data another cluster left there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_etcd_plane import ADDRESSES, Story, rkel

pytestmark = pytest.mark.e2e

HOSTS = ("rkn1", "rkn2", "rkn3")
ROLLING = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ_etcd")  # rke-tools' names
INTERVAL = 2  # seconds between recurring snapshots (a stand-in switch, through etcd's extra_env)
RECURRING = {"extra_env": [f"STANDIN_SNAPSHOT_INTERVAL_SECONDS={INTERVAL}"],
             "backup_config": {"interval_hours": 12, "retention": 2}}


def node_copy(story: Story, host: str, name: str) -> Path:
    """The snapshot file as the host sees it at /opt/rke/etcd-snapshots (a testbed bind dir)."""
    return story.testbed.state_dir / f"n{host[-1]}" / "opt-rke" / "etcd-snapshots" / name


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def story(testbed: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    testbed.ensure(("4",))
    s = Story(tmp_path_factory.mktemp("snapshots"), testbed)
    s.write(list(HOSTS), services={"etcd": RECURRING})
    try:
        yield s
    finally:
        removed = rkel(s.workdir, "remove", "--force")
        assert removed.returncode == 0, removed.stderr


def snap(story: Story, *args: str) -> subprocess.CompletedProcess[str]:
    return rkel(story.workdir, *args)


def test_save_puts_identical_copies_on_every_etcd_node_and_here(story: Story) -> None:
    up = story.apply()
    assert up.returncode == 0, up.stderr
    files = story.client_files(story.state, "kube-apiserver-etcd-client")
    for i in range(20):
        story.etcdctl(ADDRESSES["rkn1"], files, "put", f"/e2e/snap/{i}", f"value-{i}")
    started = time.monotonic()
    saved = snap(story, "-o", "json", "snapshot", "save", "--name", "e2e-first")
    story.timings["save"] = time.monotonic() - started
    assert saved.returncode == 0, saved.stderr
    info = json.loads(saved.stdout)
    assert info["nodes"] == list(HOSTS)
    local = Path(info["local"])
    assert local == story.workdir / "cluster.snapshots" / "e2e-first"
    assert stat.S_IMODE(local.stat().st_mode) == 0o600
    assert stat.S_IMODE(local.parent.stat().st_mode) == 0o700
    digest = sha(local)
    assert digest == info["sha256"] and local.stat().st_size == info["size"] > 0
    for host in HOSTS:
        copy = node_copy(story, host, "e2e-first")
        assert copy.is_file(), host
        assert sha(copy) == digest, host
        st = copy.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), host
    state_copy = Path(info["state_copy"])
    assert state_copy.is_file() and stat.S_IMODE(state_copy.stat().st_mode) == 0o600
    # no helper container is left behind on any node
    for host in HOSTS:
        names = story.ssh(host, "docker ps -a --format '{{.Names}}'").split()
        assert not [n for n in names if n.startswith("rkel-helper")], (host, names)
    print(f"snapshot save (3 members, {info['size']} bytes): {story.timings['save']:.1f}s wall"
          f" (rkel's own count: {info['seconds']}s)")


def test_local_copy_reads_with_etcdctl(story: Story) -> None:
    local = story.workdir / "cluster.snapshots" / "e2e-first"
    result = subprocess.run(["etcdctl", "snapshot", "status", str(local), "-w", "json"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "ETCDCTL_API": "3"}, check=False)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["totalKey"] >= 20 and status["revision"] >= 20


def test_list_shows_it(story: Story) -> None:
    listed = snap(story, "snapshot", "list")
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith("e2e-first"))
    digest = sha(story.workdir / "cluster.snapshots" / "e2e-first")
    assert digest[:12] in line and "manual" in line and "rkn1, rkn2, rkn3 + local" in line
    data = json.loads(snap(story, "-o", "json", "snapshot", "list").stdout)
    assert [d["name"] for d in data] == ["e2e-first"]
    assert data[0]["images"]["rkn1"]["etcd"].endswith("mirrored-coreos-etcd:v3.4.23-testbed")


def test_verify_passes_then_catches_a_flipped_byte_on_one_node(story: Story) -> None:
    ok = snap(story, "snapshot", "verify")
    assert ok.returncode == 0, ok.stderr
    assert "e2e-first: OK (local, rkn1, rkn2, rkn3)" in ok.stdout
    copy = node_copy(story, "rkn2", "e2e-first")
    original = copy.read_bytes()
    expected = hashlib.sha256(original).hexdigest()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    copy.write_bytes(bytes(flipped))
    try:
        bad = snap(story, "snapshot", "verify", "e2e-first")
        assert bad.returncode == 3, bad.stdout + bad.stderr
        assert "rkn2" in bad.stderr and expected in bad.stderr
        assert hashlib.sha256(bytes(flipped)).hexdigest() in bad.stderr
        assert "rkn1" not in bad.stderr and "rkn3" not in bad.stderr
        assert "Traceback" not in bad.stderr
        data = json.loads(snap(story, "-o", "json", "snapshot", "list").stdout)
        assert data[0]["status"] == "corrupt"
    finally:
        copy.write_bytes(original)
    again = snap(story, "snapshot", "verify")
    assert again.returncode == 0, again.stderr
    assert json.loads(snap(story, "-o", "json", "snapshot", "list").stdout)[0]["status"] == "ok"


def test_prune_keeps_the_newest(story: Story) -> None:
    second = snap(story, "snapshot", "save", "--name", "e2e-second")
    assert second.returncode == 0, second.stderr
    nothing = snap(story, "snapshot", "prune")  # default retention 72h: both are young
    assert nothing.returncode == 0 and "Nothing to prune." in nothing.stdout, nothing.stderr
    pruned = snap(story, "snapshot", "prune", "--keep", "1")
    assert pruned.returncode == 0, pruned.stderr
    assert "removed e2e-first" in pruned.stdout and "kept e2e-second" in pruned.stdout
    for host in HOSTS:
        assert not node_copy(story, host, "e2e-first").exists(), host
        assert node_copy(story, host, "e2e-second").is_file(), host
    folder = story.workdir / "cluster.snapshots"
    assert sorted(p.name for p in folder.iterdir()) == ["e2e-second", "e2e-second.rkel.db"]
    data = json.loads(snap(story, "-o", "json", "snapshot", "list").stdout)
    assert [d["name"] for d in data] == ["e2e-second"]
    # the newest is never pruned, whatever the rule
    last = snap(story, "snapshot", "prune", "--older-than", "1s")
    assert last.returncode == 0 and "kept e2e-second" in last.stdout, last.stderr
    assert snap(story, "snapshot", "verify").returncode == 0


def rolling(story: Story, host: str) -> list[str]:
    folder = node_copy(story, host, "")
    return sorted(p.name for p in folder.iterdir() if ROLLING.fullmatch(p.name))


def test_recurring_snapshots_are_taken_on_every_etcd_node_and_pruned(story: Story) -> None:
    seen: dict[str, set[str]] = {h: set() for h in HOSTS}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for host in HOSTS:
            now = rolling(story, host)
            assert len(now) <= 2, (host, now)  # backup_config.retention: 2
            seen[host].update(now)
        if all(len(names) >= 4 for names in seen.values()):  # two rounds of pruning seen
            break
        time.sleep(0.5)
    assert all(len(names) >= 4 for names in seen.values()), seen
    for host in HOSTS:
        newest = node_copy(story, host, rolling(story, host)[-1])
        result = subprocess.run(["etcdctl", "snapshot", "status", str(newest), "-w", "json"],
                                capture_output=True, text=True, timeout=60,
                                env={**os.environ, "ETCDCTL_API": "3"}, check=False)
        assert result.returncode == 0, (host, result.stderr)
        assert json.loads(result.stdout)["totalKey"] >= 20, host  # the story's keys are in it
    planned = snap(story, "plan")
    assert planned.returncode == 0 and "etcd-rolling-snapshots" not in planned.stdout, planned.stdout


def test_recurring_snapshots_switched_off_remove_the_container_not_the_files(story: Story) -> None:
    story.write(list(HOSTS), services={"etcd": {**RECURRING, "snapshot": False,
                                                "backup_config": {"enabled": False}}})
    planned = snap(story, "plan")
    assert planned.returncode == 0, planned.stderr
    assert "etcd-rolling-snapshots" in planned.stdout, planned.stdout
    off = story.apply()
    assert off.returncode == 0, off.stderr
    for host in HOSTS:
        names = story.ssh(host, "docker ps -a --format '{{.Names}}'").split()
        assert "etcd-rolling-snapshots" not in names and "etcd" in names, (host, names)
        assert rolling(story, host), host  # rkel never deletes the backups themselves


def test_a_recurring_snapshot_is_restored_by_name(story: Story) -> None:
    # the files the (now switched off) container left: found on the nodes, not yet catalogued
    listed = snap(story, "-o", "json", "snapshot", "list", "--on-nodes")
    assert listed.returncode == 0, listed.stderr
    on_nodes = {d["name"]: d["nodes"] for d in json.loads(listed.stdout)
                if d.get("catalogued") is False}
    for host in HOSTS:
        assert {n for n, where in on_nodes.items() if host in where} == set(rolling(story, host))
    name = rolling(story, "rkn1")[-1]
    files = story.client_files(story.state, "kube-apiserver-etcd-client")
    story.etcdctl(ADDRESSES["rkn1"], files, "put", "/e2e/after-recurring", "gone after restore")
    kept = snap(story, "-o", "json", "snapshot", "catalogue", name, "--from", "rkn1")
    assert kept.returncode == 0, kept.stderr
    info = json.loads(kept.stdout)
    assert info["kind"] == "recurring" and sha(Path(info["local"])) == info["sha256"]
    assert info["sha256"] == sha(node_copy(story, "rkn1", name))
    restored = snap(story, "snapshot", "restore", name, "--yes")
    assert restored.returncode == 0, restored.stderr
    for host in HOSTS:  # the same file on every etcd node now
        assert sha(node_copy(story, host, name)) == info["sha256"], host
    for host in HOSTS:
        gone = story.etcdctl(ADDRESSES[host], files, "get", "/e2e/after-recurring",
                             "--print-value-only")
        assert gone.stdout.strip() == "", host  # written after the snapshot
        before = story.etcdctl(ADDRESSES[host], files, "get", "/e2e/snap/7", "--print-value-only")
        assert before.stdout.strip() == "value-7", host  # written before it
    assert sorted(story.members()) == [f"etcd-{h}" for h in HOSTS]


def test_a_new_cluster_is_not_started_over_etcd_data_left_on_its_node(
        testbed: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    # rkn4 (idle here) holds another cluster's etcd data: a new one-node cluster stops at once
    # naming the path, and rkel deletes nothing
    other = Story(tmp_path_factory.mktemp("foreign-etcd"), testbed)
    other.write(["rkn4"])
    data = testbed.state_dir / "n4" / "var-lib-etcd"
    db = data / "member" / "snap" / "db"
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_bytes(b"another cluster's etcd data")
    try:
        started = time.monotonic()
        refused = other.apply()
        seconds = time.monotonic() - started
        assert refused.returncode == 7, refused.stderr
        assert "rkn4" in refused.stderr and "/var/lib/etcd already holds etcd data" in refused.stderr
        assert db.read_bytes() == b"another cluster's etcd data"
        names = other.ssh("rkn4", "docker ps -a --format '{{.Names}}'").split()
        assert "etcd" not in names, names
        print(f"refused over foreign etcd data in {seconds:.1f}s")
        # moved away on the node, the same apply goes on
        other.ssh("rkn4", "mv /var/lib/etcd/member /var/lib/etcd/member.old")
        built = other.apply()
        assert built.returncode == 0, built.stderr
        running = other.ssh("rkn4", "docker inspect -f '{{.State.Running}}' etcd").strip()
        assert running == "true"
        assert (data / "member.old" / "snap" / "db").read_bytes() == b"another cluster's etcd data"
    finally:
        rkel(other.workdir, "remove", "--force")
        for leftover in ("member", "member.old"):  # whatever the test left for later stories
            shutil.rmtree(data / leftover, ignore_errors=True)
