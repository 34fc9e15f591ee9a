"""A tampered state is found and refused: journal rows, snapshot catalogue rows, certificates.

Clusters are built as a user builds them, on the Simulated backend (`rkel apply --backend
simulated`, `rkel snapshot save --backend simulated`); the state is then edited behind rkel's
back with plain sqlite3, as someone with the file would. What must follow: `rkel status` and
`rkel apply --resume` refuse a broken journal (exit 4, naming the row and what to do), `rkel
snapshot verify` refuses an edited catalogue row, and `rkel state verify` reports every check on
one line each, exit 0 when all pass and 4 otherwise, without printing a key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lifecycle.cli import app
from lifecycle.config.model import ROLES, ClusterConfig, Node
from lifecycle.desired import compile_desired
from lifecycle.hosts.simulated import SimWorld
from lifecycle.pki import PKI, load_state_key
from store import JournalBroken, Store

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "scenarios" / "examples" / "three-node.yml"
runner = CliRunner()


def rkel(cluster: Path, *args: str) -> object:
    """`rkel -c cluster ARGS` in this process; a crash (not an exit) fails the test."""
    result = runner.invoke(app, ["-c", str(cluster), *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"rkel {' '.join(args)} crashed") from result.exception
    return result


def state_of(cluster: Path) -> Path:
    return cluster.with_name(f"{cluster.stem}.rkel.db")


def raw(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection, as someone editing the file by hand would use."""
    return sqlite3.connect(str(path), isolation_level=None)


def edit_journal(state: Path, sql: str, *params: object) -> None:
    """Change journal rows behind rkel's back (the append-only triggers dropped first)."""
    conn = raw(state)
    conn.execute("DROP TRIGGER journal_no_update")
    conn.execute("DROP TRIGGER journal_no_delete")
    conn.execute(sql, params)
    conn.close()


def lines_of(result: object) -> list[str]:
    return result.stdout.splitlines()  # type: ignore[attr-defined]


@pytest.fixture
def cluster(tmp_path: Path) -> Path:
    """A three-node simulated cluster, applied, with one snapshot catalogued."""
    path = tmp_path / "cluster.yml"
    shutil.copy(EXAMPLE, path)
    applied = rkel(path, "apply", "--backend", "simulated", "--yes", "--no-snapshot")
    assert applied.exit_code == 0, applied.output
    saved = rkel(path, "snapshot", "save", "--name", "before", "--backend", "simulated")
    assert saved.exit_code == 0, saved.output
    return path


# ---------------------------------------------------------------------------- intact
def test_an_intact_state_passes_every_check(cluster: Path) -> None:
    result = rkel(cluster, "state", "verify")
    assert result.exit_code == 0, result.output
    lines = lines_of(result)
    assert [line.split(":")[0] for line in lines] == [
        "ok    sqlite integrity", "ok    journal chain", "ok    snapshot catalogue",
        "ok    certificates"]
    as_json = json.loads(rkel(cluster, "-o", "json", "state", "verify").stdout)
    assert as_json["ok"] is True and len(as_json["checks"]) == 4


# ---------------------------------------------------------------------------- the journal
def test_an_edited_journal_row_makes_status_refuse_naming_the_row(cluster: Path) -> None:
    state = state_of(cluster)
    edit_journal(state, """UPDATE journal SET detail = '{"forged":true}' WHERE seq = 3""")
    status = rkel(cluster, "status")
    assert status.exit_code == 4
    assert "journal seq 3" in status.stderr and "rkel state verify" in status.stderr
    assert "backup" in status.stderr
    report = rkel(cluster, "state", "verify")
    assert report.exit_code == 4
    journal_line = next(line for line in lines_of(report) if "journal chain" in line)
    assert journal_line.startswith("FAIL") and "journal seq 3: hash mismatch" in journal_line
    assert "journal_no_update was removed" in journal_line
    assert next(line for line in lines_of(report) if "sqlite" in line).startswith("ok")


def test_deleted_last_journal_rows_are_found(cluster: Path) -> None:
    state = state_of(cluster)
    with Store.open(state) as store:
        last = store.journal()[-1].seq
    edit_journal(state, "DELETE FROM journal WHERE seq >= ?", last - 1)
    status = rkel(cluster, "status")
    assert status.exit_code == 4 and f"rows {last - 1}..{last}" in status.stderr
    with pytest.raises(JournalBroken):
        Store.open(state)


def test_resume_refuses_a_broken_journal_and_changes_nothing(tmp_path: Path) -> None:
    """A real kill -9 mid-apply, then the journal edited: `apply --resume` must not redo (or
    skip) steps on the word of a forged journal."""
    cluster = tmp_path / "cluster.yml"
    shutil.copy(EXAMPLE, cluster)
    env = {**os.environ, "RKEL_CRASH_AFTER_JOURNAL_WRITES": "12"}
    crashed = subprocess.run(
        [sys.executable, "-m", "lifecycle", "-c", str(cluster), "apply", "--backend",
         "simulated", "--yes", "--no-snapshot"],
        env=env, capture_output=True, text=True, timeout=120)
    assert crashed.returncode == -9, crashed.stderr
    state = state_of(cluster)
    with Store.open(state) as store:
        before = [(r.seq, r.phase) for r in store.journal()]
        assert store.unfinished_run() is not None
    # claim that a step only begun (its intent row) was done, so a resume would skip it
    forged = max(seq for seq, phase in before if phase == "intent")
    edit_journal(state, "UPDATE journal SET phase = 'done' WHERE seq = ?", forged)
    resumed = rkel(cluster, "apply", "--resume", "--backend", "simulated", "--yes")
    assert resumed.exit_code == 4, resumed.output
    assert f"journal seq {forged}" in resumed.stderr
    assert "rkel state verify" in resumed.stderr
    with Store.open(state, check_journal=False) as store:
        assert len(store.journal()) == len(before)  # nothing was resumed
        assert store.unfinished_run() is not None


# ---------------------------------------------------------------------------- the catalogue
def forge_snapshot(cluster: Path, name: str) -> str:
    """Replace a snapshot's local copy and every node's copy with other bytes, and edit the
    catalogued sha256 and size to match: every file check passes, only the seal can tell."""
    state = state_of(cluster)
    forged = b"not the etcd data you saved"
    digest = hashlib.sha256(forged).hexdigest()
    with Store.open(state) as store:
        row = store.snapshot(name)
    assert row is not None
    Path(row.location["local"]).write_bytes(forged)
    world = SimWorld.load(cluster.with_name("cluster.rkel.world.json"))
    for node in row.location["nodes"]:
        world.write_blob(node, row.location["path"], forged)
    conn = raw(state)
    conn.execute("UPDATE snapshots SET sha256 = ?, size = ? WHERE name = ?",
                 [digest, len(forged), name])
    conn.close()
    return digest


def test_an_edited_snapshot_checksum_is_refused_by_snapshot_verify(cluster: Path) -> None:
    forge_snapshot(cluster, "before")
    verify = rkel(cluster, "snapshot", "verify", "before", "--backend", "simulated")
    assert verify.exit_code != 0
    assert "before" in verify.stderr and "changed outside rkel" in verify.stderr
    assert "cannot be trusted for a restore" in verify.stderr
    # the failed verify recorded a status, and that update must not have re-sealed the forgery
    again = rkel(cluster, "snapshot", "verify", "before", "--backend", "simulated")
    assert again.exit_code != 0 and "changed outside rkel" in again.stderr
    report = rkel(cluster, "state", "verify")
    assert report.exit_code == 4
    line = next(line for line in lines_of(report) if "snapshot catalogue" in line)
    assert line.startswith("FAIL") and "snapshot before" in line and "rkel snapshot save" in line


def test_a_reforged_unkeyed_seal_is_not_trusted_once_a_key_exists(cluster: Path) -> None:
    """Whoever edits a row can recompute a keyless checksum; a key-less seal on a state that
    has its state key is refused too."""
    digest = forge_snapshot(cluster, "before")
    with Store.open(state_of(cluster)) as store:
        row = store.snapshot("before")
    assert row is not None and row.sha256 == digest
    fields = json.dumps(row.sealed_fields(), sort_keys=True, separators=(",", ":"))
    plain = "sha256:" + hashlib.sha256(fields.encode()).hexdigest()
    conn = raw(state_of(cluster))
    conn.execute("UPDATE snapshots SET seal = ? WHERE name = 'before'", [plain])
    conn.close()
    verify = rkel(cluster, "snapshot", "verify", "before", "--backend", "simulated")
    assert verify.exit_code != 0 and "sealed without the state key" in verify.stderr


def test_an_intact_snapshot_still_verifies(cluster: Path) -> None:
    verify = rkel(cluster, "snapshot", "verify", "before", "--backend", "simulated")
    assert verify.exit_code == 0, verify.output
    assert verify.stdout.startswith("before: OK")


def test_a_row_catalogued_before_seals_existed_is_reported(cluster: Path) -> None:
    conn = raw(state_of(cluster))
    conn.execute("UPDATE snapshots SET seal = '' WHERE name = 'before'")
    conn.close()
    report = rkel(cluster, "state", "verify")
    assert report.exit_code == 4 and "has no integrity seal" in report.stdout


# ---------------------------------------------------------------------------- certificates
@pytest.fixture(scope="module")
def pki_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state holding a real generated PKI (one node with every role), built once."""
    directory = tmp_path_factory.mktemp("pki")
    state = directory / "cluster.rkel.db"
    config = ClusterConfig(nodes=(Node(address="127.0.0.1", user="u", role=ROLES),))
    with Store.open(state) as store:
        PKI(store, load_state_key(state, environ={})).ensure(compile_desired(config))
    return state


@pytest.fixture
def pki_copy(pki_state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delenv("RKEL_STATE_KEY", raising=False)
    state = tmp_path / "cluster.rkel.db"
    shutil.copy(pki_state, state)
    shutil.copy(pki_state.with_name(pki_state.name + ".key"), state.with_name(state.name + ".key"))
    (tmp_path / "cluster.yml").write_text("nodes: []\n")
    yield state


def certificate_line(state: Path) -> tuple[int, str, str]:
    result = rkel(state.with_name("cluster.yml"), "--state", str(state), "state", "verify")
    line = next(line for line in lines_of(result) if "certificates" in line)
    return result.exit_code, line, result.output


def test_generated_certificates_pass(pki_copy: Path) -> None:
    code, line, output = certificate_line(pki_copy)
    assert code == 0 and line.startswith("ok    certificates"), output
    assert "PRIVATE KEY" not in output


def test_a_replaced_certificate_is_found(pki_copy: Path) -> None:
    conn = raw(pki_copy)
    names = [r[0] for r in conn.execute("SELECT name FROM certificates ORDER BY name")]
    victim, donor = "kube-apiserver", "kube-controller-manager"
    assert victim in names and donor in names
    conn.execute("UPDATE certificates SET cert_pem = (SELECT cert_pem FROM certificates WHERE"
                 " name = ?) WHERE name = ?", [donor, victim])
    conn.close()
    code, line, output = certificate_line(pki_copy)
    assert code == 4 and line.startswith("FAIL")
    assert f"{victim}: the certificate does not belong to its private key" in line
    assert "PRIVATE KEY" not in output


def test_an_edited_private_key_is_found(pki_copy: Path) -> None:
    conn = raw(pki_copy)
    (blob,) = conn.execute("SELECT key_encrypted FROM certificates WHERE name = 'kube-ca'").fetchone()
    flipped = bytes(blob[:40]) + bytes([blob[40] ^ 1]) + bytes(blob[41:])
    conn.execute("UPDATE certificates SET key_encrypted = ? WHERE name = 'kube-ca'", [flipped])
    conn.close()
    code, line, _ = certificate_line(pki_copy)
    assert code == 4 and "kube-ca: the private key does not decrypt with the state key" in line


def test_a_lost_state_key_is_reported_with_directions(pki_copy: Path) -> None:
    pki_copy.with_name(pki_copy.name + ".key").unlink()
    code, line, _ = certificate_line(pki_copy)
    assert code == 4 and "state key is missing" in line and "backup" in line


# ---------------------------------------------------------------------------- the file itself
def test_a_damaged_database_file_exits_4_without_a_traceback(cluster: Path) -> None:
    state = state_of(cluster)
    with Store.open(state) as store:
        assert store.integrity_check() == "ok"
    data = bytearray(state.read_bytes())
    page = 4096
    assert len(data) > 3 * page
    for i in range(page, len(data)):  # every page but the header and schema page
        data[i] ^= 0xA5
    state.write_bytes(bytes(data))
    report = rkel(cluster, "state", "verify")
    assert report.exit_code == 4, report.output
    assert str(state) in report.stderr + report.stdout and "Traceback" not in report.output
    status = rkel(cluster, "status")
    assert status.exit_code == 4 and str(state) in status.stderr


def test_verify_without_a_state_says_so(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.yml"
    cluster.write_text("nodes: []\n")
    result = rkel(cluster, "state", "verify")
    assert result.exit_code == 4 and "there is no state at" in result.stderr
    assert not state_of(cluster).exists()  # verify does not create one
