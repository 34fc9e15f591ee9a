"""Restore and rollback on the Simulated backend: the plan, crash-anywhere resumes, refusals.

The simulated hosts model `etcdctl snapshot restore` (the file checked, its flags required, the
staging dir bound writable) and keep files, so a restore's staging, set-aside and cleanup are
visible; the real path is tests/e2e/test_rollback.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lifecycle import restore
from lifecycle.config import load_config_text
from lifecycle.desired import compile_desired
from lifecycle.errors import StateError
from lifecycle.hosts.simulated import SimulatedCerts, SimWorld
from lifecycle.pki import load_state_key
from lifecycle.runner import apply_plan, plan_rollback
from lifecycle.snapshots import APPLIED_CONFIG, SnapshotError, save_snapshot
from store import SetMeta
from tests.simcluster import Crash, SimCluster

OLD = """
cluster_name: rb
kubernetes_version: v1.30.5-rancher1-1
nodes:
  - {address: 10.0.0.1, hostname_override: n1, user: rkel, role: [controlplane, etcd, worker],
     ssh_key: "-----BEGIN OPENSSH PRIVATE KEY-----\\nsecret-key-body\\n-----END OPENSSH PRIVATE KEY-----\\n"}
  - {address: 10.0.0.2, hostname_override: n2, user: rkel, role: [etcd, worker]}
  - {address: 10.0.0.3, hostname_override: n3, user: rkel, role: [etcd, worker]}
private_registries:
  - {url: registry.example.com, user: bob, password: hunter2}
"""
NEW = OLD.replace("v1.30.5-rancher1-1", "v1.31.1-rancher1-1")


def _apply(sim: SimCluster, text: str) -> None:
    outcome = sim.apply(load_config_text(text).config)
    assert not outcome.failed, outcome.failed
    key = load_state_key(Path(sim.store.path))
    sim.store.apply_ops([SetMeta(APPLIED_CONFIG, restore.seal(key, text))])


@pytest.fixture
def upgraded(tmp_path: Path) -> SimCluster:
    return _fresh(tmp_path)


def _rollback(sim: SimCluster, tmp_path: Path, crash_after: int | None = None) -> int:
    """Plan and run the rollback to the newest automatic snapshot; with `crash_after`, die
    after that many journal writes and resume. Returns the journal writes of the first try."""
    rb = plan_rollback(tmp_path / "cluster.yml", sim.store, None)
    writes = []
    start = sim.store._journal_writes  # the store counts the earlier applies' writes too
    sim._crash_at = None if crash_after is None else start + crash_after
    try:
        apply_plan(sim.store, sim.world.backend(), rb.plan, SimulatedCerts(), command="rollback",
                   desired=rb.desired, kind="rollback",
                   applies=rb.row.location["cluster_yml"])
        writes.append(sim.store._journal_writes - start)
    except Crash:
        sim.restart()
        apply_plan(sim.store, sim.world.backend(), rb.plan, SimulatedCerts(),
                   command="apply --resume", resume=True)
    sim._crash_at = None
    return writes[0] if writes else -1


def test_the_rollback_plan_restores_first_then_downgrades(upgraded: SimCluster, tmp_path: Path) -> None:
    rb = plan_rollback(tmp_path / "cluster.yml", upgraded.store, None)
    assert rb.row.name == "before"
    phases = [g.phase for g in rb.plan.groups]
    assert phases[:7] == ["restore"] * 7 and "controlplane" in phases[7:]
    first = rb.plan.groups[0]
    assert {s.action for u in first.units for s in u.steps} == {"restore-stage"}
    assert [u.node for u in rb.plan.groups[1].units] == ["n1", "n2", "n3"]
    replaced = [s for s in rb.plan.steps if s.action == "replace" and s.service == "kube-apiserver"]
    assert [s.new_image.rsplit(":", 1)[1] for s in replaced] == ["v1.30.5-rancher1"]
    assert rb.plan.kubernetes_version == "v1.30.5-rancher1-1"


def test_rollback_converges_to_the_recorded_config(upgraded: SimCluster, tmp_path: Path) -> None:
    _rollback(upgraded, tmp_path)
    assert upgraded.mismatches(load_config_text(OLD).config) == []
    assert upgraded.store.get_meta("kubernetes_version") == "v1.30.5-rancher1-1"
    key = load_state_key(Path(upgraded.store.path))
    assert restore.unseal(upgraded.store.get_meta(APPLIED_CONFIG), key, "t") == OLD
    for host in ("n1", "n2", "n3"):
        files = upgraded.world.hosts[host].files
        assert "/var/lib/etcd/member/snap/db" in files  # the restored data is in place
        assert not [p for p in files if "restore-" in p]  # staging and set-aside data gone


def test_rollback_killed_at_every_journal_write_resumes_to_the_same_end(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    total = _rollback(_fresh(base), base)
    assert total > 40
    for n in range(1, total):
        where = tmp_path / f"crash-{n}"
        where.mkdir()
        sim = _fresh(where)
        assert _rollback(sim, where, crash_after=n) == -1, f"no crash after write {n}"
        assert sim.mismatches(load_config_text(OLD).config) == [], f"crash after write {n}"
        assert sim.store.get_meta("kubernetes_version") == "v1.30.5-rancher1-1", n
        assert sim.store.verify_journal() == [], n
        sim.close()


def test_a_snapshot_copy_gone_after_the_stage_is_put_back_on_resume(tmp_path: Path) -> None:
    # killed once etcd is stopped; meanwhile the copy on n2 goes (pruned, deleted by hand):
    # the resume stages it again before restoring the member, instead of failing for good
    base = tmp_path / "base"
    base.mkdir()
    probe = _fresh(base)
    _rollback(probe, base)
    rows = [r for r in probe.store.journal() if r.run_id == max(x.run_id for x in
                                                                 probe.store.journal())]
    stopped = next(i for i, r in enumerate(rows)
                   if r.step_id.startswith("n3:restore-stop") and r.phase == "done")
    where = tmp_path / "crash"
    where.mkdir()
    sim = _fresh(where)
    start = sim.store._journal_writes
    sim._crash_at = start + stopped + 1
    rb = plan_rollback(where / "cluster.yml", sim.store, None)
    with pytest.raises(Crash):
        apply_plan(sim.store, sim.world.backend(), rb.plan, SimulatedCerts(), command="rollback",
                   desired=rb.desired, kind="rollback", applies=rb.row.location["cluster_yml"])
    sim.restart()
    remote = rb.row.location["path"]
    assert not sim.world.containers("n2")["etcd"].running  # etcd is stopped
    sim.world.remove_paths("n2", [remote])
    apply_plan(sim.store, sim.world.backend(), rb.plan, SimulatedCerts(),
               command="apply --resume", resume=True)
    assert sim.world.read_blob("n2", remote) == Path(rb.row.location["local"]).read_bytes()
    assert sim.mismatches(load_config_text(OLD).config) == []


def _fresh(where: Path) -> SimCluster:
    """1.30 applied, snapshot `before` (auto), then 1.31 applied."""
    sim = SimCluster(where / "cluster.rkel.db")
    _apply(sim, OLD)
    config = load_config_text(OLD).config
    save_snapshot(sim.store, sim.world.backend(), config, compile_desired(config), "before",
                  kind="auto", folder=where / "snaps")
    _apply(sim, NEW)
    return sim


def test_a_corrupt_local_copy_is_fetched_again_from_a_good_node(upgraded: SimCluster) -> None:
    row = upgraded.store.snapshot("before")
    assert row is not None
    local = Path(row.location["local"])
    local.write_bytes(b"garbage")
    refs = {r.name: r for r in plan_rollback(Path("cluster.yml"), upgraded.store, None).plan.nodes}
    notes = restore.check_local(row, upgraded.world.backend(), refs)
    assert notes and "fetched the good copy from n1" in notes[0]
    assert restore.sha256_file(local)[0] == row.sha256


def test_no_matching_copy_anywhere_is_refused_before_anything_stops(upgraded: SimCluster) -> None:
    row = upgraded.store.snapshot("before")
    assert row is not None
    Path(row.location["local"]).write_bytes(b"garbage")
    for host in ("n1", "n2", "n3"):
        upgraded.world.write_blob(host, row.location["path"], b"flipped")
    refs = {r.name: r for r in plan_rollback(Path("cluster.yml"), upgraded.store, None).plan.nodes}
    running = {h: {c.name for c in s.containers.values() if c.running}
               for h, s in upgraded.world.hosts.items()}
    with pytest.raises(SnapshotError, match="no copy matches .* nothing was stopped"):
        restore.check_local(row, upgraded.world.backend(), refs)
    assert running == {h: {c.name for c in s.containers.values() if c.running}
                       for h, s in upgraded.world.hosts.items()}


def test_the_recorded_config_is_sealed_in_the_database(upgraded: SimCluster) -> None:
    raw = Path(upgraded.store.path).read_bytes()
    for secret in (b"hunter2", b"secret-key-body"):
        assert secret not in raw
    row = upgraded.store.snapshot("before")
    assert row is not None
    with pytest.raises(StateError, match="cannot be decrypted"):
        restore.recorded_config(row, b"A" * 43 + b"=")


def test_the_config_diff_never_shows_secrets() -> None:
    changed = NEW.replace("hunter2", "swordfish")
    text = restore.redacted_diff(OLD, changed, "recorded", "now")
    assert "v1.30.5" in text and "v1.31.1" in text
    for secret in ("hunter2", "swordfish", "secret-key-body"):
        assert secret not in text


def test_rollback_without_an_automatic_snapshot_says_what_to_do(tmp_path: Path) -> None:
    sim = SimCluster(tmp_path / "cluster.rkel.db")
    _apply(sim, OLD)
    with pytest.raises(SnapshotError, match="--to"):
        plan_rollback(tmp_path / "cluster.yml", sim.store, None)
    with pytest.raises(SnapshotError, match="no snapshot named 'nope'"):
        plan_rollback(tmp_path / "cluster.yml", sim.store, "nope")


# ---------------------------------------------------------------------------- the commands
def rkel(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lifecycle", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_upgrade_snapshots_first_and_rollback_writes_the_config(tmp_path: Path) -> None:
    sim = ["--backend", "simulated"]
    config = tmp_path / "cluster.yml"
    config.write_text(OLD)
    assert rkel("apply", "--yes", *sim, cwd=tmp_path).returncode == 0
    config.write_text(NEW)
    plan = rkel("-o", "json", "plan", cwd=tmp_path)
    assert "Kubernetes v1.30.5-rancher1-1 -> v1.31.1-rancher1-1" in json.loads(plan.stdout)["snapshot_first"]
    up = rkel("apply", "--yes", *sim, cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    assert "taking an automatic etcd snapshot first" in up.stderr
    shown = rkel("plan", "--rollback", cwd=tmp_path)
    assert shown.returncode == 0 and "restore every etcd member" in shown.stdout, shown.stderr
    assert "hunter2" not in shown.stdout and "secret-key-body" not in shown.stdout
    back = rkel("rollback", "--yes", "--write-config", *sim, cwd=tmp_path)
    assert back.returncode == 0, back.stderr
    assert config.read_text() == OLD
    kept = list(tmp_path.glob("cluster.yml.before-rollback-*"))
    assert len(kept) == 1 and kept[0].read_text() == NEW
    assert "No changes" in rkel("plan", cwd=tmp_path).stdout
    services = json.loads(rkel("-o", "json", "status", cwd=tmp_path).stdout)["services"]
    kube = {s["image"] for s in services if "hyperkube" in s["image"]}
    assert kube == {"rancher/hyperkube:v1.30.5-rancher1"}


def test_cli_no_snapshot_warns_and_a_failed_snapshot_refuses_the_run(tmp_path: Path) -> None:
    sim = ["--backend", "simulated"]
    config = tmp_path / "cluster.yml"
    config.write_text(OLD)
    assert rkel("apply", "--yes", *sim, cwd=tmp_path).returncode == 0
    config.write_text(NEW)
    world_path = tmp_path / "cluster.rkel.world.json"
    world = SimWorld.load(world_path)
    for host in ("n1", "n2", "n3"):
        world.set_running(host, "etcd", False)  # no healthy member: the snapshot cannot be taken
    refused = rkel("apply", "--yes", *sim, cwd=tmp_path)
    assert refused.returncode == 3, refused.stderr
    assert "automatic snapshot before this run failed, so nothing was changed" in refused.stderr
    assert "--no-snapshot" in refused.stderr and "Traceback" not in refused.stderr
    history = rkel("-o", "json", "history", cwd=tmp_path)
    assert len(json.loads(history.stdout)) == 1  # no run was started
    world = SimWorld.load(world_path)
    for host in ("n1", "n2", "n3"):
        world.set_running(host, "etcd", True)
    forced = rkel("apply", "--yes", "--no-snapshot", *sim, cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert "--no-snapshot" in forced.stderr and "cannot return" in forced.stderr


def test_cli_a_killed_rollback_blocks_new_runs_until_resumed(tmp_path: Path) -> None:
    sim = ["--backend", "simulated"]
    config = tmp_path / "cluster.yml"
    config.write_text(OLD)
    assert rkel("apply", "--yes", *sim, cwd=tmp_path).returncode == 0
    config.write_text(NEW)
    assert rkel("apply", "--yes", *sim, cwd=tmp_path).returncode == 0
    crashed = subprocess.run([sys.executable, "-m", "lifecycle", "rollback", "--yes", *sim],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "RKEL_CRASH_AFTER_JOURNAL_WRITES": "14"})
    assert crashed.returncode == -9, crashed.stderr
    # the cluster.yml (1.31) matches the services the store records, but etcd is stopped:
    refused = rkel("apply", "--yes", *sim, cwd=tmp_path)
    assert refused.returncode == 4 and "interrupted" in refused.stderr, refused.stdout
    assert "apply --resume" in rkel("plan", cwd=tmp_path).stdout
    resumed = rkel("rollback", "--resume", *sim, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    services = json.loads(rkel("-o", "json", "status", cwd=tmp_path).stdout)["services"]
    assert {s["image"] for s in services if "hyperkube" in s["image"]} == {
        "rancher/hyperkube:v1.30.5-rancher1"}


def test_a_catalogue_row_changed_outside_rkel_is_not_restored(upgraded: SimCluster,
                                                              tmp_path: Path) -> None:
    import sqlite3

    row = upgraded.store.snapshot("before")
    assert row is not None
    with sqlite3.connect(str(upgraded.store.path)) as db:  # someone edits the checksum
        db.execute("UPDATE snapshots SET sha256 = ? WHERE name = 'before'", ["0" * 64])
    with pytest.raises(SnapshotError, match="cannot be trusted for a restore"):
        plan_rollback(tmp_path / "cluster.yml", upgraded.store, None)


def test_write_config_never_overwrites_an_earlier_backup(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # two `rollback --write-config` in one second: each cluster.yml the user had is kept
    from datetime import UTC, datetime

    from lifecycle.cli import rollback as cli_rollback
    from lifecycle.runner import RollbackPlan

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def, override]
            return datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    monkeypatch.setattr(cli_rollback, "datetime", Frozen)
    config = tmp_path / "cluster.yml"
    for before, recorded in (("first edit\n", OLD), ("second edit\n", NEW)):
        config.write_text(before)
        rb = RollbackPlan(row=None, plan=None, loaded=None, desired=None, text=recorded)  # type: ignore[arg-type]
        assert cli_rollback._write_config(rb, config) is not None
        assert config.read_text() == recorded
    kept = sorted(tmp_path.glob("cluster.yml.before-rollback-*"))
    assert [p.name for p in kept] == ["cluster.yml.before-rollback-20260102T030405Z",
                                      "cluster.yml.before-rollback-20260102T030405Z-2"]
    assert [p.read_text() for p in kept] == ["first edit\n", "second edit\n"]
