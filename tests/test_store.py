"""The state store against real SQLite files: schema, atomic journal, hash chain, lock, crashes.

No mocks: every test opens a real database file, and the crash test kills a real process.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# rkel is not installed into the venv and pytest has no `pythonpath` setting yet; until one of
# those exists, make the repository importable (harmless once it does).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from store import (  # noqa: E402
    DeleteNode,
    DeleteService,
    LockHeld,
    PutCertificate,
    SetMeta,
    Store,
    StoreError,
    UpsertNode,
    UpsertService,
    default_state_path,
)
from store.schema import KNOWN_MIGRATIONS, MIGRATIONS_TABLE  # noqa: E402


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "cluster.rkel.db"


@pytest.fixture
def store(db_path: Path):
    with Store.open(db_path) as s:
        yield s


def raw(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection, bypassing Store, for tampering and inspection."""
    return sqlite3.connect(str(path), isolation_level=None)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock_row(path: Path, pid: int, hostname: str) -> None:
    with raw(path) as conn:
        conn.execute(
            "INSERT OR REPLACE INTO lock (id, pid, hostname, started_at, run_id, command)"
            " VALUES (1, ?, ?, '2024-01-01T00:00:00+00:00', 7, 'rkel apply')",
            [pid, hostname],
        )
    conn.close()


# --- opening, schema, migrations ---------------------------------------------------------------


def test_default_state_path_sits_beside_the_config() -> None:
    assert default_state_path("cluster.yml") == Path("cluster.rkel.db")
    assert default_state_path("/srv/prod/edge.yaml") == Path("/srv/prod/edge.rkel.db")


def test_open_creates_parent_dir_and_sets_durable_pragmas(store: Store, db_path: Path) -> None:
    assert db_path.exists()
    settings = store.settings()
    assert settings["journal_mode"] == "wal"
    assert settings["synchronous"] == 2  # FULL
    assert settings["foreign_keys"] == 1
    assert settings["busy_timeout"] > 0
    assert store.integrity_check() == "ok"


def test_migrations_recorded_and_idempotent_on_reopen(db_path: Path) -> None:
    with Store.open(db_path) as s:
        first = s.migrations_applied()
    assert first == KNOWN_MIGRATIONS
    with Store.open(db_path) as s:
        assert s.migrations_applied() == first
    conn = raw(db_path)
    names = [r[0] for r in conn.execute(f"SELECT name FROM {MIGRATIONS_TABLE} ORDER BY id")]
    conn.close()
    assert names == KNOWN_MIGRATIONS


def test_db_from_newer_rkel_is_refused(db_path: Path) -> None:
    Store.open(db_path).close()
    with raw(db_path) as conn:
        conn.execute(
            f"INSERT INTO {MIGRATIONS_TABLE} (migration_set, name, applied_at)"
            " VALUES ('rkel', '9999_from_the_future', '2030-01-01')"
        )
    conn.close()
    with pytest.raises(StoreError, match="newer rkel"):
        Store.open(db_path)


def test_non_sqlite_file_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "cluster.rkel.db"
    bogus.write_text("nodes:\n  - address: 10.0.0.1\n" * 100)
    with pytest.raises(StoreError, match="not a SQLite file"):
        Store.open(bogus)


def test_foreign_sqlite_db_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    conn = raw(other)
    conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    conn.close()
    with pytest.raises(StoreError, match="not an rkel state database"):
        Store.open(other)
    conn = raw(other)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # left untouched
    conn.close()


def test_closed_store_refuses_use(db_path: Path) -> None:
    s = Store.open(db_path)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        s.nodes()


# --- state -------------------------------------------------------------------------------------


def test_upserts_merge_fields_and_output_is_sorted(store: Store) -> None:
    store.apply_ops(
        [
            UpsertNode("n2", {"address": "10.0.0.2", "roles": ["worker"]}),
            UpsertNode("n1", {"address": "10.0.0.1", "roles": ("etcd", "controlplane")}),
            UpsertService("n2", "kubelet", {"image": "k:1", "spec": {"args": ["a"]}}),
            UpsertService("n1", "kubelet", {"image": "k:1"}),
            UpsertService("n1", "etcd", {"image": "e:1", "state": "running"}),
        ]
    )
    store.apply_ops([UpsertNode("n1", {"state": "running", "labels": {"zone": "a"}})])
    n1 = store.node("n1")
    assert n1 is not None
    assert (n1.address, n1.roles, n1.state, n1.labels) == (
        "10.0.0.1",
        ("etcd", "controlplane"),
        "running",
        {"zone": "a"},
    )
    assert [n.name for n in store.nodes()] == ["n1", "n2"]
    assert [(s.node, s.name) for s in store.services()] == [
        ("n1", "etcd"),
        ("n1", "kubelet"),
        ("n2", "kubelet"),
    ]
    assert [s.name for s in store.services("n1")] == ["etcd", "kubelet"]
    kubelet = store.service("n2", "kubelet")
    assert kubelet is not None and kubelet.spec == {"args": ["a"]}
    assert store.node("nope") is None and store.service("n1", "nope") is None


def test_delete_node_cascades_to_its_services(store: Store) -> None:
    store.apply_ops(
        [
            UpsertNode("n1", {}),
            UpsertService("n1", "etcd", {}),
            UpsertService("n1", "kubelet", {}),
        ]
    )
    store.apply_ops([DeleteService("n1", "etcd")])
    assert [s.name for s in store.services()] == ["kubelet"]
    store.apply_ops([DeleteNode("n1")])
    assert store.nodes() == [] and store.services() == []


def test_unknown_field_is_a_value_error_and_nothing_lands(store: Store) -> None:
    with pytest.raises(ValueError, match="addres"):
        store.apply_ops([UpsertNode("n1", {}), UpsertNode("n1", {"addres": "x"})])
    assert store.nodes() == []
    with pytest.raises(ValueError, match="list of strings"):
        store.apply_ops([UpsertNode("n1", {"roles": "etcd"})])


def test_meta_values_round_trip_as_json(store: Store) -> None:
    store.set_meta("name", "prod")
    store.apply_ops([SetMeta("desired_json", {"nodes": [1, 2]}), SetMeta("name", "prod2")])
    assert store.get_meta("name") == "prod2"
    assert store.get_meta("desired_json") == {"nodes": [1, 2]}
    assert store.get_meta("missing", default=3) == 3
    assert list(store.meta()) == ["desired_json", "name"]


# --- journal -----------------------------------------------------------------------------------


def test_journal_row_and_ops_commit_together_or_not_at_all(store: Store) -> None:
    run = store.start_run("apply", {}, "fp", "rkel apply")
    store.write_journal(run, "n1/prepare", "intent", {"a": 1}, [UpsertNode("n1", {})])
    with pytest.raises(StoreError, match="FOREIGN KEY"):
        store.write_journal(
            run,
            "ghost/etcd",
            "done",
            {"b": 2},
            [UpsertNode("n1", {"state": "certs"}), UpsertService("ghost", "etcd", {})],
        )
    assert [j.step_id for j in store.journal()] == ["n1/prepare"]
    n1 = store.node("n1")
    assert n1 is not None and n1.state == "absent"
    assert store.services() == []
    seq = store.write_journal(run, "n1/prepare", "done", {}, [UpsertNode("n1", {"state": "certs"})])
    assert seq == 2
    assert store.verify_journal() == []


def test_journal_rows_decode_and_filter_by_run(store: Store) -> None:
    r1 = store.start_run("apply", {}, "fp", "c")
    store.write_journal(r1, "s1", "intent", {"x": [1, 2]})
    store.finish_run(r1, "done")
    r2 = store.start_run("rollback", {}, "fp", "c")
    store.write_journal(r2, "s2", "note")
    assert [(j.seq, j.run_id, j.detail) for j in store.journal()] == [
        (1, r1, {"x": [1, 2]}),
        (2, r2, {}),
    ]
    assert [j.step_id for j in store.journal(r2)] == ["s2"]
    assert store.journal()[1].prev_hash == store.journal()[0].hash
    with pytest.raises(ValueError, match="phase"):
        store.write_journal(r2, "s3", "started")


def test_after_journal_write_counts_and_its_exception_propagates(db_path: Path) -> None:
    seen: list[int] = []

    def die_at_third(count: int) -> None:
        seen.append(count)
        if count == 3:
            raise KeyboardInterrupt("simulated crash")

    with Store.open(db_path, after_journal_write=die_at_third) as s:
        run = s.start_run("apply", {}, "fp", "c")
        s.write_journal(run, "a", "intent")
        s.write_journal(run, "a", "done")
        with pytest.raises(KeyboardInterrupt):
            s.write_journal(run, "b", "intent", {}, [UpsertNode("n1", {"state": "certs"})])
    assert seen == [1, 2, 3]
    with Store.open(db_path) as s:
        assert [(j.step_id, j.phase) for j in s.journal()] == [
            ("a", "intent"),
            ("a", "done"),
            ("b", "intent"),
        ]
        node = s.node("n1")
        assert node is not None and node.state == "certs"


def test_journal_refuses_update_and_delete(store: Store, db_path: Path) -> None:
    run = store.start_run("apply", {}, "fp", "c")
    store.write_journal(run, "a", "intent")
    conn = raw(db_path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE journal SET phase = 'done'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM journal")
    conn.close()
    assert len(store.journal()) == 1


def _tamperable(store: Store, db_path: Path, rows: int) -> sqlite3.Connection:
    run = store.start_run("apply", {}, "fp", "c")
    for i in range(rows):
        store.write_journal(run, f"s{i + 1}", "done", {"i": i + 1})
    assert store.verify_journal() == []
    conn = raw(db_path)
    conn.execute("DROP TRIGGER journal_no_update")
    conn.execute("DROP TRIGGER journal_no_delete")
    return conn


def test_verify_journal_detects_an_edited_row(store: Store, db_path: Path) -> None:
    conn = _tamperable(store, db_path, 4)
    conn.execute("""UPDATE journal SET detail = '{"i":99}' WHERE seq = 2""")
    conn.close()
    problems = store.verify_journal()
    assert len(problems) == 1 and "seq 2" in problems[0] and "hash mismatch" in problems[0]


def test_verify_journal_detects_a_rehashed_row_by_the_chain(store: Store, db_path: Path) -> None:
    conn = _tamperable(store, db_path, 4)
    conn.execute("UPDATE journal SET prev_hash = 'forged', hash = 'forged' WHERE seq = 3")
    conn.close()
    problems = store.verify_journal()
    assert any("seq 3" in p and "broken chain" in p for p in problems)
    assert any("seq 4" in p and "broken chain" in p for p in problems)


def test_verify_journal_detects_missing_rows(store: Store, db_path: Path) -> None:
    conn = _tamperable(store, db_path, 5)
    conn.execute("DELETE FROM journal WHERE seq IN (2, 5)")
    conn.close()
    problems = store.verify_journal()
    assert any("seq 3" in p and "gap" in p for p in problems)
    assert any("5..5" in p and "missing" in p for p in problems)


def test_concurrent_writers_share_one_store(store: Store) -> None:
    run = store.start_run("apply", {}, "fp", "c")
    store.apply_ops([UpsertNode(f"n{i}", {}) for i in range(8)])

    def worker(i: int) -> None:
        for k in range(25):
            store.write_journal(
                run, f"n{i}/{k}", "done", {"k": k}, [UpsertNode(f"n{i}", {"state": f"s{k}"})]
            )
            store.nodes()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [j.seq for j in store.journal()] == list(range(1, 201))
    assert store.verify_journal() == []
    assert {n.state for n in store.nodes()} == {"s24"}


# --- runs --------------------------------------------------------------------------------------


def test_run_lifecycle(store: Store) -> None:
    r1 = store.start_run("apply", {"steps": ["a"]}, "fp1", "rkel apply")
    run = store.unfinished_run()
    assert run is not None and run.id == r1 and run.status == "running"
    assert (run.plan, run.pid, run.hostname) == (
        {"steps": ["a"]},
        os.getpid(),
        socket.gethostname(),
    )
    with pytest.raises(StoreError, match="unfinished|running"):
        store.start_run("apply", {}, "fp2", "rkel apply")
    store.mark_interrupted(r1)
    interrupted = store.unfinished_run()
    assert interrupted is not None and interrupted.status == "interrupted"
    assert store.resume_run(r1).status == "running"
    store.finish_run(r1, "failed", error="etcd unhealthy")
    assert store.unfinished_run() is None
    with pytest.raises(StoreError, match="already ended"):
        store.finish_run(r1, "done")
    r2 = store.start_run("rollback", {}, "fp1", "rkel rollback")
    store.finish_run(r2, "done")
    assert [r.id for r in store.runs()] == [r2, r1]
    failed = store.run(r1)
    assert failed is not None and failed.error == "etcd unhealthy" and failed.finished_at
    assert store.run(999) is None


# --- lock --------------------------------------------------------------------------------------


def test_lock_acquire_release(store: Store) -> None:
    assert store.lock_holder() is None
    assert store.acquire_lock(1, "rkel apply") is None
    holder = store.lock_holder()
    assert holder is not None and (holder.pid, holder.run_id) == (os.getpid(), 1)
    store.set_lock_run(2)
    holder = store.lock_holder()
    assert holder is not None and holder.run_id == 2
    with pytest.raises(LockHeld) as err:
        store.acquire_lock(3, "rkel remove")
    assert err.value.pid == os.getpid() and err.value.command == "rkel apply"
    assert store.release_lock() is True
    assert store.release_lock() is False
    assert store.lock_holder() is None


def test_lock_held_by_another_live_process(store: Store, db_path: Path) -> None:
    write_lock_row(db_path, os.getppid(), socket.gethostname())
    with pytest.raises(LockHeld) as err:
        store.acquire_lock(None, "rkel apply")
    e = err.value
    assert (e.pid, e.hostname, e.run_id, e.command) == (
        os.getppid(),
        socket.gethostname(),
        7,
        "rkel apply",
    )
    assert e.started_at == "2024-01-01T00:00:00+00:00"
    assert str(os.getppid()) in str(e) and isinstance(e, StoreError)
    assert store.release_lock() is False  # not ours: left alone
    holder = store.lock_holder()
    assert holder is not None and holder.pid == os.getppid()


def test_lock_on_another_host_is_never_taken_over(store: Store, db_path: Path) -> None:
    write_lock_row(db_path, dead_pid(), "some-other-laptop")
    with pytest.raises(LockHeld, match="some-other-laptop"):
        store.acquire_lock(None, "rkel apply")


def test_stale_lock_of_dead_process_is_taken_over_and_returned(store: Store, db_path: Path) -> None:
    pid = dead_pid()
    write_lock_row(db_path, pid, socket.gethostname())
    stale = store.acquire_lock(5, "rkel apply --resume")
    assert stale is not None and (stale.pid, stale.run_id, stale.command) == (pid, 7, "rkel apply")
    holder = store.lock_holder()
    assert holder is not None and (holder.pid, holder.run_id) == (os.getpid(), 5)


# --- catalogs ----------------------------------------------------------------------------------


def test_snapshot_catalog(store: Store) -> None:
    assert store.snapshots() == []
    row = store.add_snapshot(
        "pre-apply-1",
        kind="auto",
        sha256="ab" * 32,
        size=1234,
        location={"node": "n1", "path": "/opt/rke/etcd-snapshots/pre-apply-1"},
        versions={"kubernetes": "v1.30.4"},
        config={"nodes": []},
    )
    assert row.location["node"] == "n1" and row.status == "ok" and row.run_id is None
    store.add_snapshot(
        "manual-a", kind="manual", sha256="", size=0, location={}, versions={}, config={}
    )
    with pytest.raises(StoreError, match="already exists"):
        store.add_snapshot(
            "manual-a", kind="manual", sha256="", size=0, location={}, versions={}, config={}
        )
    assert [s.name for s in store.snapshots()] == ["pre-apply-1", "manual-a"]
    store.set_snapshot_status("manual-a", "verified")
    got = store.snapshot("manual-a")
    assert got is not None and got.status == "verified"
    assert store.delete_snapshot("manual-a") is True
    assert store.delete_snapshot("manual-a") is False
    assert store.snapshot("manual-a") is None


def test_a_state_from_before_recurring_snapshots_keeps_its_catalogue(db_path: Path) -> None:
    # a database migrated up to 0004 (kind 'manual' or 'auto' only) with a catalogued snapshot
    with Store.open(db_path) as s:
        s.add_snapshot("pre-1", kind="auto", sha256="ab" * 32, size=5, location={"path": "/x"},
                       versions={"kubernetes_version": "v1.30.5"}, config={"nodes": []})
    with raw(db_path) as conn:
        conn.executescript(
            "BEGIN; CREATE TABLE old AS SELECT * FROM snapshots; DROP TABLE snapshots;"
            " CREATE TABLE snapshots (name TEXT PRIMARY KEY, created_at TEXT NOT NULL, run_id"
            " INTEGER REFERENCES runs(id), kind TEXT NOT NULL CHECK (kind IN ('manual', 'auto')),"
            " sha256 TEXT NOT NULL DEFAULT '', size INTEGER NOT NULL DEFAULT 0, location TEXT NOT"
            " NULL DEFAULT '{}', versions TEXT NOT NULL DEFAULT '{}', config_json TEXT NOT NULL"
            " DEFAULT '{}', status TEXT NOT NULL DEFAULT 'ok', seal TEXT NOT NULL DEFAULT '');"
            " INSERT INTO snapshots SELECT * FROM old; DROP TABLE old;"
            f" DELETE FROM {MIGRATIONS_TABLE} WHERE name = '0005_recurring_snapshot_kind'; COMMIT;")
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO snapshots (name, created_at, kind) VALUES ('r', 'now',"
                         " 'recurring')")
    conn.close()
    with Store.open(db_path) as s:
        assert s.migrations_applied() == KNOWN_MIGRATIONS
        row = s.snapshot("pre-1")
        assert row is not None and row.kind == "auto" and row.sha256 == "ab" * 32
        assert s.catalogue_problems("pre-1") == []  # its seal still holds
        taken = s.add_snapshot("2026-01-02T03:04:05Z_etcd", kind="recurring", sha256="cd" * 32,
                               size=7, location={}, versions={}, config={},
                               created_at="2026-01-02T03:04:05+00:00")
        assert taken.created_at == "2026-01-02T03:04:05+00:00"
        # oldest first, by when each was taken (not when it was catalogued)
        assert [r.name for r in s.snapshots()] == ["2026-01-02T03:04:05Z_etcd", "pre-1"]


def test_certificates_put_get_and_journaled(store: Store) -> None:
    store.put_certificate("kube-ca", "PEM", b"\x00secret", expires_at="2035", sans=["a", "b"])
    cert = store.certificate("kube-ca")
    assert cert is not None and cert.key_encrypted == b"\x00secret" and cert.sans == ("a", "b")
    assert "secret" not in repr(cert)
    run = store.start_run("apply", {}, "fp", "c")
    store.write_journal(run, "certs", "done", {}, [PutCertificate("kube-node", "PEM2", None)])
    assert [c.name for c in store.certificates()] == ["kube-ca", "kube-node"]
    assert store.certificate("missing") is None


def test_known_hosts_pinning(store: Store) -> None:
    first = store.put_known_host("10.0.0.1", "ssh-ed25519", "AAAA", "SHA256:x")
    assert store.put_known_host("10.0.0.1", "ssh-ed25519", "AAAA", "SHA256:x") == first
    with pytest.raises(StoreError, match="different pinned host key"):
        store.put_known_host("10.0.0.1", "ssh-ed25519", "BBBB", "SHA256:y")
    store.put_known_host("10.0.0.1", "ssh-ed25519", "BBBB", "SHA256:y", replace=True)
    store.put_known_host("10.0.0.0", "ssh-rsa", "CCCC", "SHA256:z")
    assert [(h.host, h.key_b64) for h in store.known_hosts()] == [
        ("10.0.0.0", "CCCC"),
        ("10.0.0.1", "BBBB"),
    ]
    assert store.delete_known_host("10.0.0.0") and store.known_host("10.0.0.0") is None


# --- crash --------------------------------------------------------------------------------------

_WRITER = """
import sys
from store import Store, UpsertNode, UpsertService
s = Store.open(sys.argv[1])
run = s.start_run("apply", {}, "fp", "crash-test")
s.apply_ops([UpsertNode("n", {})])
i = 0
while True:
    i += 1
    s.write_journal(run, f"step-{i}", "done", {"i": i, "pad": "x" * 2000}, [
        UpsertNode("n", {"state": f"s{i}", "labels": {"i": i}}),
        UpsertService("n", f"svc-{i % 7}", {"spec": {"i": i}}),
    ])
    print(i, flush=True)
"""


@pytest.mark.parametrize("kill_after", [1, 40, 300])
def test_sigkill_mid_write_leaves_a_sound_resumable_db(db_path: Path, kill_after: int) -> None:
    db_path.parent.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    acknowledged = 0
    for line in proc.stdout:
        acknowledged = int(line)
        if acknowledged >= kill_after:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    with Store.open(db_path) as s:
        assert s.integrity_check() == "ok"
        assert s.verify_journal() == []
        journal = s.journal()
        assert len(journal) >= acknowledged  # every acknowledged write survived
        last = journal[-1].detail["i"]
        node = s.node("n")
        assert node is not None and node.state == f"s{last}" and node.labels == {"i": last}
        run = s.unfinished_run()
        assert run is not None and run.status == "running" and run.command == "crash-test"


def test_two_stores_on_one_file_keep_one_chain(db_path: Path) -> None:
    with Store.open(db_path) as a, Store.open(db_path) as b:
        run = a.start_run("apply", {}, "fp", "c")
        for i in range(10):
            (a if i % 2 else b).write_journal(run, f"s{i}", "note", {"i": i})
        assert [j.seq for j in b.journal()] == list(range(1, 11))
        assert a.verify_journal() == []
