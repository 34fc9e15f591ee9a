"""etcd snapshots on the Simulated backend: save, list, verify, prune, and what must be refused.

The simulated hosts model `etcdctl snapshot save|status` with their arguments checked (the
certificate files must be on the node, the paths bound, the member running), keep file content
for snapshots, and compute sha256 on the "node"; tests flip bytes in a copy to see verify catch
it. The real path is tests/e2e/test_snapshots.py.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lifecycle import restore, snapshots
from lifecycle.config import load_config_text
from lifecycle.config.model import ClusterConfig
from lifecycle.desired import compile_desired
from lifecycle.errors import HostUnreachableError, StateError
from lifecycle.hosts.simulated import SimWorld, foreign_container
from lifecycle.snapshots import (
    Retention,
    SnapshotError,
    check_name,
    parse_duration,
    prune_snapshots,
    recurring_snapshot_warning,
    save_snapshot,
    to_prune,
    verify_error,
    verify_snapshot,
)
from store import SnapshotRow, Store
from tests.simcluster import SimCluster

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
cluster_name: snap
kubernetes_version: v1.30.5-rancher1-1
nodes:
  - {address: 10.0.0.1, hostname_override: n1, user: rkel, role: [controlplane, etcd, worker],
     ssh_key: "-----BEGIN OPENSSH PRIVATE KEY-----\\nsecret\\n"}
  - {address: 10.0.0.2, hostname_override: n2, user: rkel, role: [etcd]}
  - {address: 10.0.0.3, hostname_override: n3, user: rkel, role: [etcd, worker]}
private_registries:
  - {url: registry.example.com, user: bob, password: hunter2}
"""
REMOTE = "/opt/rke/etcd-snapshots"


def config_of(text: str = CONFIG) -> ClusterConfig:
    return load_config_text(text).config


@pytest.fixture
def sim(tmp_path: Path) -> SimCluster:
    cluster = SimCluster(tmp_path / "cluster.rkel.db")
    outcome = cluster.apply(config_of())
    assert not outcome.failed, outcome.failed
    return cluster


def save(sim: SimCluster, folder: Path, name: str | None = None, config: ClusterConfig | None = None,
         ) -> SnapshotRow:
    config = config or config_of()
    return save_snapshot(sim.store, sim.world.backend(), config, compile_desired(config), name,
                         folder=folder)


def refs(sim: SimCluster) -> dict:
    return snapshots.node_refs(sim.store, config_of())


# ---------------------------------------------------------------------------- save
def test_save_spreads_one_checked_file_and_catalogues_it(sim: SimCluster, tmp_path: Path) -> None:
    folder = tmp_path / "cluster.snapshots"
    row = save(sim, folder, "first")
    local = folder / "first"
    assert local.is_file() and (local.stat().st_mode & 0o777) == 0o600
    assert (folder.stat().st_mode & 0o777) == 0o700
    data = local.read_bytes()
    for host in ("n1", "n2", "n3"):
        assert sim.world.read_blob(host, f"{REMOTE}/first") == data, host
    assert row.kind == "manual" and row.size == len(data) and row.status == "ok"
    assert row.location["nodes"] == ["n1", "n2", "n3"] and row.location["taken_on"] == "n1"
    assert row.location["local"] == str(local.resolve())
    assert row.versions["kubernetes_version"] == "v1.30.5-rancher1-1"
    assert row.versions["images"]["n2"]["etcd"].startswith("rancher/mirrored-coreos-etcd:")
    assert sim.store.snapshot("first") == row
    assert not [p for p in folder.iterdir() if p.name.endswith(".part")]


def test_config_and_state_copy_hold_no_secret_in_clear(sim: SimCluster, tmp_path: Path) -> None:
    row = save(sim, tmp_path / "s", "first")
    text = json.dumps(row.config)
    assert "hunter2" not in text and "PRIVATE KEY" not in text
    assert row.config["private_registries"][0]["user"] == "bob"
    assert row.config["nodes"][0]["address"] == "10.0.0.1"
    copy = Path(row.location["state_copy"])
    assert (copy.stat().st_mode & 0o777) == 0o600
    db = sqlite3.connect(copy)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        names = {r[0] for r in db.execute("SELECT name FROM nodes")}
        assert names == {"n1", "n2", "n3"}
    finally:
        db.close()


def test_default_name_is_a_utc_timestamp(sim: SimCluster, tmp_path: Path) -> None:
    row = save(sim, tmp_path / "s")
    assert row.name.startswith("rkel-") and row.name.endswith("Z") and "T" in row.name
    assert snapshots.default_name(datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)) == \
        "rkel-20240506T070809Z"


def test_unnamed_snapshots_in_one_second_get_distinct_names(sim: SimCluster, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # two runs in the same second (an upgrade, then the apply that finishes it) must not make
    # the second refuse with "already exists"
    monkeypatch.setattr(snapshots, "default_name", lambda *a, **k: "rkel-20240506T070809Z")
    folder = tmp_path / "s"
    names = [save(sim, folder).name for _ in range(3)]
    assert names == ["rkel-20240506T070809Z", "rkel-20240506T070809Z-2", "rkel-20240506T070809Z-3"]
    assert all((folder / name).is_file() for name in names)


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "/etc/passwd", ".hidden", "a b", "x;rm",
                                 "a" * 129, "x.part", "y.rkel.db", "é"])
def test_bad_names_are_refused(bad: str) -> None:
    with pytest.raises(SnapshotError, match="invalid snapshot name"):
        check_name(bad)


@pytest.mark.parametrize("name", ["2026-02-30T00:00:00Z_etcd", "2026-01-01T24:00:00Z_etcd"])
def test_a_recurring_lookalike_with_no_such_time_is_refused_cleanly(name: str) -> None:
    assert snapshots.taken_at(name) is None
    with pytest.raises(SnapshotError, match="invalid snapshot name"):
        check_name(name)


@pytest.mark.parametrize("good", ["a", "rkel-20240101T000000Z", "pre_upgrade.v1.31", "A-1"])
def test_good_names(good: str) -> None:
    assert check_name(good) == good


def test_a_taken_name_is_refused(sim: SimCluster, tmp_path: Path) -> None:
    save(sim, tmp_path / "s", "same")
    with pytest.raises(SnapshotError, match="already exists"):
        save(sim, tmp_path / "s", "same")


def test_save_skips_an_unhealthy_member(sim: SimCluster, tmp_path: Path) -> None:
    sim.world.hosts["n1"].containers["etcd"].running = False
    row = save(sim, tmp_path / "s", "from-n2")
    assert row.location["taken_on"] == "n2"
    assert sorted(row.location["nodes"]) == ["n1", "n2", "n3"]


def test_no_quorum_no_snapshot(sim: SimCluster, tmp_path: Path) -> None:
    for host in ("n1", "n2"):
        sim.world.hosts[host].containers["etcd"].running = False
    with pytest.raises(HostUnreachableError, match="no quorum"):
        save(sim, tmp_path / "s", "x")
    assert sim.store.snapshots() == []


def test_missing_member_certificate_fails_cleanly(sim: SimCluster, tmp_path: Path) -> None:
    files = sim.world.hosts["n1"].files
    for path in [p for p in files if "kube-etcd-10-0-0-1" in p]:
        del files[path]
    with pytest.raises(Exception, match="etcdctl snapshot save failed") as err:
        save(sim, tmp_path / "s", "x")
    assert "n1" in str(err.value)
    assert sim.store.snapshots() == []


def test_a_failed_copy_leaves_nothing_behind(sim: SimCluster, tmp_path: Path) -> None:
    sim.world.set_reachable("n3", False)
    with pytest.raises(HostUnreachableError, match="n3") as err:
        save(sim, tmp_path / "s", "x")
    assert "nothing was catalogued" in str(err.value)
    assert sim.store.snapshots() == []
    assert list((tmp_path / "s").iterdir()) == []
    for host in ("n1", "n2"):
        assert sim.world.read_blob(host, f"{REMOTE}/x") is None, host


def test_prefix_path_moves_the_node_folder(tmp_path: Path) -> None:
    text = CONFIG + "prefix_path: /opt/custom\n"
    cluster = SimCluster(tmp_path / "c.rkel.db")
    assert not cluster.apply(config_of(text)).failed
    # The certificates land under the prefix, where the services bind <prefix>/etc/kubernetes.
    files = cluster.world.hosts["n1"].files
    assert any(k.startswith("/opt/custom/etc/kubernetes/ssl/") for k in files)
    assert not any(k.startswith("/etc/kubernetes/") for k in files)
    row = save(cluster, tmp_path / "s", "p", config_of(text))
    assert row.location["path"] == f"/opt/custom{REMOTE}/p"
    assert cluster.world.read_blob("n3", f"/opt/custom{REMOTE}/p") is not None


# ---------------------------------------------------------------------------- verify
def test_verify_passes_on_good_copies(sim: SimCluster, tmp_path: Path) -> None:
    row = save(sim, tmp_path / "s", "good")
    result = verify_snapshot(sim.store, sim.world.backend(), row, refs(sim))
    assert result.ok and result.checked == ["local", "n1", "n2", "n3"]
    assert verify_error([result]) is None


def test_verify_names_the_node_with_a_flipped_byte(sim: SimCluster, tmp_path: Path) -> None:
    row = save(sim, tmp_path / "s", "good")
    path = f"{REMOTE}/good"
    data = bytearray(sim.world.read_blob("n2", path) or b"")
    data[5] ^= 0x01
    sim.world.write_blob("n2", path, bytes(data))
    result = verify_snapshot(sim.store, sim.world.backend(), row, refs(sim))
    assert not result.ok and len(result.problems) == 1
    assert result.problems[0].startswith("n2: ") and row.sha256 in result.problems[0]
    error = verify_error([result])
    assert isinstance(error, SnapshotError) and error.exit_code == 3
    assert "n2" in str(error) and "n1" not in str(error)
    assert sim.store.snapshot("good").status == "corrupt"  # type: ignore[union-attr]
    # etcdctl's own test read refuses the tampered copy too
    code, out = sim.world.backend().host(refs(sim)["n2"]).run_once(
        "etcd", [snapshots.ETCDCTL, "snapshot", "status", path, "-w", "json"],
        binds=[f"{REMOTE}:{REMOTE}"])
    assert code == 1 and "integrity" in out


def test_verify_catches_a_bad_local_copy_and_a_missing_node_copy(sim: SimCluster,
                                                                 tmp_path: Path) -> None:
    row = save(sim, tmp_path / "s", "good")
    local = Path(row.location["local"])
    data = bytearray(local.read_bytes())
    data[-1] ^= 0xFF
    local.write_bytes(bytes(data))
    sim.world.backend().host(refs(sim)["n3"]).remove_paths([f"{REMOTE}/good"])
    result = verify_snapshot(sim.store, sim.world.backend(), row, refs(sim))
    text = "; ".join(result.problems)
    assert "local copy" in text and "expected " + row.sha256 in text
    assert "n3:" in text and "missing" in text
    assert result.checked == ["n1", "n2"]


def test_verify_of_an_unreachable_node_is_a_host_error(sim: SimCluster, tmp_path: Path) -> None:
    row = save(sim, tmp_path / "s", "good")
    sim.world.set_reachable("n2", False)
    result = verify_snapshot(sim.store, sim.world.backend(), row, refs(sim))
    error = verify_error([result])
    assert isinstance(error, HostUnreachableError) and "n2" in str(error)
    assert sim.store.snapshot("good").status == "ok"  # type: ignore[union-attr]  # unknown


# ---------------------------------------------------------------------------- prune
def _row(name: str, age_hours: float, now: datetime) -> SnapshotRow:
    created = (now - timedelta(hours=age_hours)).isoformat()
    return SnapshotRow(name, created, None, "manual", "", 0, {}, {}, {}, "ok")


@pytest.mark.parametrize("retention,expected", [
    (Retention(keep=2, older_than=None), ["a", "b"]),
    (Retention(keep=None, older_than=timedelta(hours=72)), ["a", "b"]),
    (Retention(keep=None, older_than=timedelta(hours=1)), ["a", "b", "c"]),
    (Retention(keep=None, older_than=timedelta(seconds=0)), ["a", "b", "c"]),  # never "d"
    (Retention(keep=1, older_than=None), ["a", "b", "c"]),
    (Retention(keep=10, older_than=None), []),
    (Retention(keep=3, older_than=timedelta(hours=80)), ["a", "b"]),  # either rule removes
])
def test_retention_rules(retention: Retention, expected: list[str]) -> None:
    now = datetime(2024, 1, 10, tzinfo=UTC)
    rows = [_row("a", 100, now), _row("b", 90, now), _row("c", 10, now), _row("d", 0.5, now)]
    assert [r.name for r in to_prune(rows, retention, now)] == expected


def test_the_only_snapshot_is_never_pruned() -> None:
    now = datetime(2024, 1, 10, tzinfo=UTC)
    assert to_prune([_row("old", 1000, now)], Retention(1, timedelta(0)), now) == []


def test_default_retention_follows_rke() -> None:
    assert snapshots.default_retention(config_of()) == Retention(None, timedelta(hours=72))
    text = CONFIG + "services:\n  etcd:\n    retention: 24h\n"
    assert snapshots.default_retention(config_of(text)) == Retention(None, timedelta(hours=24))
    text = CONFIG + "services:\n  etcd:\n    backup_config: {enabled: true, retention: 3}\n"
    assert snapshots.default_retention(config_of(text)) == Retention(3, None)


@pytest.mark.parametrize("text,seconds", [("72h", 259200), ("30m", 1800), ("1h30m", 5400),
                                          ("7d", 604800), ("45s", 45)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("bad", ["", "h", "72", "3w", "-1h", "1h 2m"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(SnapshotError, match="invalid duration"):
        parse_duration(bad)


def test_prune_removes_everywhere_and_keeps_the_newest(sim: SimCluster, tmp_path: Path) -> None:
    for name in ("one", "two", "three"):
        save(sim, tmp_path / "s", name)
    result = prune_snapshots(sim.store, sim.world.backend(), refs(sim), Retention(1, None))
    assert result.removed == ["one", "two"] and result.kept == ["three"]
    assert [r.name for r in sim.store.snapshots()] == ["three"]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["three", "three.rkel.db"]
    for host in ("n1", "n2", "n3"):
        assert sim.world.read_blob(host, f"{REMOTE}/one") is None
        assert sim.world.read_blob(host, f"{REMOTE}/three") is not None


def test_prune_keeps_what_it_could_not_delete_on_a_node(sim: SimCluster, tmp_path: Path) -> None:
    for name in ("one", "two"):
        save(sim, tmp_path / "s", name)
    sim.world.set_reachable("n2", False)
    result = prune_snapshots(sim.store, sim.world.backend(), refs(sim), Retention(1, None))
    assert result.removed == [] and "n2" in result.failures["one"]
    assert [r.name for r in sim.store.snapshots()] == ["one", "two"]
    sim.world.set_reachable("n2", True)
    again = prune_snapshots(sim.store, sim.world.backend(), refs(sim), Retention(1, None))
    assert again.removed == ["one"]


# ---------------------------------------------------------------------------- warning
def test_recurring_snapshot_warning_only_for_s3_uploads() -> None:
    """rkel runs the recurring snapshots; only their S3 uploads are still warned about."""
    assert recurring_snapshot_warning(config_of()) is None
    on = config_of(CONFIG + "services:\n  etcd:\n    snapshot: true\n")
    assert recurring_snapshot_warning(on) is None
    s3_yaml = ("services:\n  etcd:\n    backup_config:\n      enabled: {}\n"
               "      s3backupconfig: {{bucket_name: b, endpoint: s3.example.com}}\n")
    warning = recurring_snapshot_warning(config_of(CONFIG + s3_yaml.format("true")))
    assert warning and "S3" in warning and "locally" in warning
    assert "/opt/rke/etcd-snapshots" in warning
    # snapshots off altogether: no upload to warn about
    off = config_of(CONFIG + s3_yaml.format("false").replace("etcd:\n", "etcd:\n    snapshot: false\n"))
    assert recurring_snapshot_warning(off) is None


# ---------------------------------------------------------------------------- recurring
RECURRING = "2026-01-02T03:04:05Z_etcd"


def place_recurring(world: SimWorld, node: str, name: str = RECURRING, source: str = "n1",
                    snapshot: str = "base") -> bytes:
    """Put a file like the etcd-rolling-snapshots container's on `node`: the bytes of a
    snapshot `source` holds."""
    data = world.read_blob(source, f"{REMOTE}/{snapshot}")
    assert data is not None
    world.write_blob(node, f"{REMOTE}/{name}", data)
    return data


def catalogue(sim: SimCluster, folder: Path, name: str = RECURRING,
              source: str | None = None) -> SnapshotRow:
    config = config_of()
    return snapshots.catalogue_recurring(sim.store, sim.world.backend(), config,
                                         compile_desired(config), name, folder=folder,
                                         source=source)


def test_recurring_files_on_the_nodes_are_found(sim: SimCluster, tmp_path: Path) -> None:
    save(sim, tmp_path / "s", "base")
    size = len(place_recurring(sim.world, "n2"))
    place_recurring(sim.world, "n3", "2026-01-02T09:00:00Z_etcd")
    sim.world.write_blob("n3", f"{REMOTE}/notes.txt", b"not a snapshot")
    config = config_of()
    found = snapshots.recurring_on_nodes(sim.world.backend(), config, compile_desired(config))
    assert found.files == {RECURRING: {"n2": size}, "2026-01-02T09:00:00Z_etcd": {"n3": size}}
    assert found.unreachable == {}
    sim.world.set_reachable("n3", False)
    found = snapshots.recurring_on_nodes(sim.world.backend(), config, compile_desired(config))
    assert list(found.files) == [RECURRING] and list(found.unreachable) == ["n3"]


def test_a_recurring_snapshot_is_catalogued_from_its_node(sim: SimCluster, tmp_path: Path) -> None:
    save(sim, tmp_path / "s", "base")
    data = place_recurring(sim.world, "n2")
    row = catalogue(sim, tmp_path / "s")
    assert row.kind == "recurring" and row.name == RECURRING
    assert row.created_at.startswith("2026-01-02T03:04:05")  # when it was taken
    assert row.location["nodes"] == ["n2"] and row.location["taken_on"] == "n2"
    local = tmp_path / "s" / RECURRING
    assert local.read_bytes() == data and (local.stat().st_mode & 0o777) == 0o600
    assert row.size == len(data) and row.versions == {}  # nobody recorded versions with it
    assert snapshots.describe(row)["kubernetes_version"] == ""
    with pytest.raises(SnapshotError, match="nobody recorded the versions or the cluster.yml"):
        restore.recorded_config(row, b"")
    with pytest.raises(SnapshotError, match="already catalogued"):
        catalogue(sim, tmp_path / "s")


def test_cataloguing_refuses_what_it_cannot_trust(sim: SimCluster, tmp_path: Path) -> None:
    save(sim, tmp_path / "s", "base")
    save(sim, tmp_path / "s", "later")
    folder = tmp_path / "s"
    with pytest.raises(SnapshotError, match="not a recurring snapshot's name"):
        catalogue(sim, folder, "base")
    with pytest.raises(SnapshotError, match="no etcd node holds"):
        catalogue(sim, folder)
    # a file etcd cannot read
    sim.world.write_blob("n2", f"{REMOTE}/{RECURRING}", b"garbage")
    with pytest.raises(SnapshotError, match="does not read as an etcd snapshot"):
        catalogue(sim, folder)
    assert sim.store.snapshot(RECURRING) is None and not (folder / RECURRING).exists()


def test_nodes_with_different_files_of_one_name_need_a_choice(sim: SimCluster,
                                                              tmp_path: Path) -> None:
    # each node takes its own: in the same second, two nodes name different files alike
    folder = tmp_path / "s"
    save(sim, folder, "base")
    save(sim, folder, "later")
    mine = place_recurring(sim.world, "n2")
    theirs = place_recurring(sim.world, "n3", snapshot="later")
    with pytest.raises(SnapshotError, match="--from NODE"):
        catalogue(sim, folder)
    with pytest.raises(SnapshotError, match="n1 holds no"):
        catalogue(sim, folder, source="n1")
    assert sim.world.read_blob("n3", f"{REMOTE}/{RECURRING}") == theirs  # nothing touched
    said: list[str] = []
    config = config_of()
    row = snapshots.catalogue_recurring(sim.store, sim.world.backend(), config,
                                        compile_desired(config), RECURRING, folder=folder,
                                        source="n2", notice=said.append)
    assert row.location["nodes"] == ["n2"] and (folder / RECURRING).read_bytes() == mine
    # n3's own is kept under another name, so the restore's upload cannot overwrite it
    assert sim.world.read_blob("n3", f"{REMOTE}/{RECURRING}.n3") == theirs
    assert sim.world.read_blob("n3", f"{REMOTE}/{RECURRING}") is None
    assert said == [f"n3's own {RECURRING} is kept as {REMOTE}/{RECURRING}.n3"]


def test_a_save_may_not_take_a_recurring_name(sim: SimCluster, tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="named like the recurring snapshots"):
        save(sim, tmp_path / "s", RECURRING)


# ---------------------------------------------------------------------------- the command
def rkel(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lifecycle", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_save_list_verify_prune(tmp_path: Path) -> None:
    (tmp_path / "cluster.yml").write_text(CONFIG)
    sim = ["--backend", "simulated"]
    assert rkel("apply", "--yes", *sim, cwd=tmp_path).returncode == 0
    first = rkel("-o", "json", "snapshot", "save", "--name", "a", *sim, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["local"] == str(tmp_path / "cluster.snapshots" / "a")
    assert rkel("snapshot", "save", "--name", "b", *sim, cwd=tmp_path).returncode == 0
    bad = rkel("snapshot", "save", "--name", "../evil", *sim, cwd=tmp_path)
    assert bad.returncode == 3 and "invalid snapshot name" in bad.stderr
    assert "Traceback" not in bad.stderr
    listed = rkel("snapshot", "list", cwd=tmp_path)
    assert listed.returncode == 0 and listed.stdout.count("manual") == 2
    assert "n1, n2, n3 + local" in listed.stdout
    assert rkel("snapshot", "verify", *sim, cwd=tmp_path).returncode == 0
    world = SimWorld.load(tmp_path / "cluster.rkel.world.json")
    data = bytearray(world.read_blob("n3", f"{REMOTE}/a") or b"")
    data[0] ^= 0x20
    world.write_blob("n3", f"{REMOTE}/a", bytes(data))
    failed = rkel("snapshot", "verify", "a", *sim, cwd=tmp_path)
    assert failed.returncode == 3 and "n3" in failed.stderr and "Traceback" not in failed.stderr
    assert rkel("snapshot", "verify", "nope", *sim, cwd=tmp_path).returncode == 3
    pruned = rkel("snapshot", "prune", "--keep", "1", *sim, cwd=tmp_path)
    assert pruned.returncode == 0 and "removed a" in pruned.stdout and "kept b" in pruned.stdout
    assert [d["name"] for d in json.loads(
        rkel("-o", "json", "snapshot", "list", cwd=tmp_path).stdout)] == ["b"]


def test_save_while_a_run_holds_the_lock_is_refused(sim: SimCluster, tmp_path: Path) -> None:
    with Store.open(sim.store.path) as other:
        other.acquire_lock(None, "rkel apply (elsewhere)")
        try:
            with pytest.raises(StateError, match="holds the lock"), \
                    snapshots.locked(sim.store, "rkel snapshot save"):
                pass
        finally:
            other.release_lock()


def test_cli_lists_catalogues_and_restores_a_recurring_snapshot(tmp_path: Path) -> None:
    (tmp_path / "cluster.yml").write_text(CONFIG)
    sim = ["--backend", "simulated"]
    assert rkel("apply", "--yes", *sim, cwd=tmp_path).returncode == 0
    assert rkel("snapshot", "save", "--name", "base", *sim, cwd=tmp_path).returncode == 0
    world = SimWorld.load(tmp_path / "cluster.rkel.world.json")
    place_recurring(world, "n3")
    place_recurring(world, "n1", "2026-01-03T00:00:00Z_etcd")
    assert RECURRING not in rkel("snapshot", "list", cwd=tmp_path).stdout  # not asked for
    listed = rkel("snapshot", "list", "--on-nodes", *sim, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if x.startswith(RECURRING))
    assert "on node" in line and line.endswith("n3")
    # restore by name, as with `rke etcd snapshot-restore --name`: catalogued first
    restored = rkel("snapshot", "restore", RECURRING, "--yes", *sim, cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert f"catalogued recurring snapshot {RECURRING} (taken on n3)" in restored.stderr
    for node in ("n1", "n2"):  # staged on every etcd node from the local copy
        assert SimWorld.load(tmp_path / "cluster.rkel.world.json").read_blob(
            node, f"{REMOTE}/{RECURRING}") == (tmp_path / "cluster.snapshots" / RECURRING).read_bytes()
    kept = rkel("snapshot", "catalogue", "2026-01-03T00:00:00Z_etcd", *sim, cwd=tmp_path)
    assert kept.returncode == 0 and "from n1" in kept.stdout, kept.stderr
    rows = {d["name"]: d for d in json.loads(
        rkel("-o", "json", "snapshot", "list", cwd=tmp_path).stdout)}
    assert rows[RECURRING]["kind"] == rows["2026-01-03T00:00:00Z_etcd"]["kind"] == "recurring"
    missing = rkel("snapshot", "restore", "2026-01-09T00:00:00Z_etcd", "--yes", *sim, cwd=tmp_path)
    assert missing.returncode == 3 and "no etcd node holds" in missing.stderr
    assert "Traceback" not in missing.stderr
    rolled = rkel("rollback", "--to", RECURRING, "--yes", *sim, cwd=tmp_path)
    assert rolled.returncode != 0 and "is a recurring one" in rolled.stderr
    assert f"`rkel snapshot restore {RECURRING}`" in rolled.stderr


# ---------------------------------------------------------------------------- foreign etcd data
def test_a_new_cluster_is_not_started_over_another_clusters_etcd_data(tmp_path: Path) -> None:
    # data left on the first member's node by another cluster (or by this one, its state
    # lost): etcd would start as that cluster and never be healthy; rkel says so at once and
    # deletes nothing
    cluster = SimCluster(tmp_path / "cluster.rkel.db")
    cluster.world.write_blob("n1", "/var/lib/etcd/member/snap/db", b"another cluster")
    outcome = cluster.apply(config_of())
    assert "n1 (state" in outcome.failed, outcome.failed
    assert "/var/lib/etcd already holds etcd data" in outcome.failed
    assert "sudo mv /var/lib/etcd /var/lib/etcd.old" in outcome.failed
    assert cluster.world.read_blob("n1", "/var/lib/etcd/member/snap/db") == b"another cluster"
    assert not any("etcd" in cluster.world.containers(n) for n in ("n1", "n2", "n3"))
    # moved away, the next apply builds the cluster
    cluster.world.move_paths("n1", "/var/lib", [("etcd", "etcd.old")], replace=False)
    again = cluster.apply(config_of())
    assert not again.failed, again.failed
    assert cluster.mismatches(config_of()) == []
    assert cluster.world.read_blob("n1", "/var/lib/etcd.old/member/snap/db") == b"another cluster"


def test_an_rke_cluster_is_not_taken_over_by_a_fresh_apply(tmp_path: Path) -> None:
    # `rkel apply` (not `rkel import`) on an RKE cluster's nodes: RKE's etcd container and data
    # are there; rkel must not replace the container and start a new cluster over the data
    cluster = SimCluster(tmp_path / "cluster.rkel.db")
    etcd = compile_desired(config_of()).node("n1").service("etcd")
    assert etcd is not None
    cluster.world.write_blob("n1", "/var/lib/etcd/member/snap/db", b"RKE's data")
    cluster.world.hosts["n1"].containers["etcd"] = foreign_container(etcd, {})
    outcome = cluster.apply(config_of())
    assert "beside an etcd container rkel did not make" in outcome.failed, outcome.failed
    assert "rkel import --rke-state" in outcome.failed
    assert cluster.world.containers("n1")["etcd"].spec_hash == ""  # RKE's, untouched
    assert cluster.world.read_blob("n1", "/var/lib/etcd/member/snap/db") == b"RKE's data"


def test_a_members_own_data_never_counts_as_foreign(sim: SimCluster) -> None:
    # the cluster exists: etcd's container gone on a node (e.g. `docker rm -f etcd`) is started
    # again over its own data
    sim.world.write_blob("n1", "/var/lib/etcd/member/snap/db", b"this cluster")
    sim.world.remove_container("n1", "etcd")
    outcome = sim.apply(config_of())
    assert not outcome.failed, outcome.failed
    assert sim.world.read_blob("n1", "/var/lib/etcd/member/snap/db") == b"this cluster"
