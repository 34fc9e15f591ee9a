"""`rkel cert rotate` on the Simulated backend, with the real PKI in the state.

The simulated hosts keep the files delivered to them, so what a node holds (a CA bundle, a leaf)
is checked as the PEM it is; the real path is tests/e2e/test_cert_rotate.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from lifecycle import rotate
from lifecycle.config import load_config_text
from lifecycle.desired import compile_desired
from lifecycle.errors import PlanError
from lifecycle.pki import NEXT, PKI, PREVIOUS, load_state_key
from lifecycle.pki_x509 import issued_by, load_cert
from lifecycle.plan import diff
from lifecycle.runner import apply_plan, current_state
from store import PutCertificate
from tests.simcluster import Crash, SimCluster

CONFIG = """
cluster_name: cr
nodes:
  - {address: 10.0.0.1, hostname_override: n1, user: rkel, role: [controlplane, etcd, worker]}
  - {address: 10.0.0.2, hostname_override: n2, user: rkel, role: [controlplane, etcd, worker]}
  - {address: 10.0.0.3, hostname_override: n3, user: rkel, role: [controlplane, etcd, worker]}
  - {address: 10.0.0.4, hostname_override: w1, user: rkel, role: [worker]}
"""
SSL = "/etc/kubernetes/ssl"
CAS = ("kube-ca", "kube-etcd-ca", "kube-apiserver-requestheader-ca")


def _pki(sim: SimCluster) -> PKI:
    return PKI(sim.store, load_state_key(Path(sim.store.path)))


def _cluster(where: Path) -> SimCluster:
    """A running cluster whose nodes hold the state's real certificates."""
    sim = SimCluster(where / "cluster.rkel.db")
    config = load_config_text(CONFIG).config
    desired = compile_desired(config)
    pki = _pki(sim)
    pki.ensure(desired)
    apply_plan(sim.store, sim.world.backend(), diff(current_state(sim.store), desired), pki,
               command="apply", desired=desired)
    return sim


@pytest.fixture
def sim(tmp_path: Path) -> SimCluster:
    return _cluster(tmp_path)


def _config():  # type: ignore[no-untyped-def]
    return load_config_text(CONFIG).config


def _plan(sim: SimCluster, services: tuple[str, ...] = rotate.SERVICES, ca: bool = False):  # type: ignore[no-untyped-def]
    return rotate.plan_rotation(_config(), sim.store, current_state(sim.store), services, ca)


def _rotate(sim: SimCluster, services: tuple[str, ...] = rotate.SERVICES, ca: bool = False,
            crash_after: int | None = None, before_resume=None) -> int:  # type: ignore[no-untyped-def]
    """Plan and run a rotation; with `crash_after`, die after that many journal writes, then
    (after `before_resume(sim)`) resume as `rkel apply --resume`. Returns the journal writes."""
    plan = _plan(sim, services, ca).plan
    start = sim.store._journal_writes
    sim._crash_at = None if crash_after is None else start + crash_after
    try:
        apply_plan(sim.store, sim.world.backend(), plan, _pki(sim), command="cert rotate",
                   kind="cert-rotate")
        return int(sim.store._journal_writes - start)
    except Crash:
        sim.restart()
        if before_resume is not None:
            before_resume(sim)
        apply_plan(sim.store, sim.world.backend(), plan, _pki(sim), command="apply --resume",
                   resume=True)
        return -1
    finally:
        sim._crash_at = None


def _pems(sim: SimCluster) -> dict[str, str]:
    return {r.name: r.cert_pem for r in sim.store.certificates()}


def _converged(sim: SimCluster) -> list[str]:
    """What differs between the cluster and cluster.yml compiled with the recorded rotations."""
    desired = compile_desired(_config(), rotations=rotate.rotations(sim.store))
    problems = [s.id for s in diff(current_state(sim.store), desired).steps]
    pki = _pki(sim)
    if pki.ensure(desired):
        problems.append("ensure issued certificates after the rotation")
    for node in desired.nodes:
        host = sim.world.hosts[node.name]
        running = {c.name: c.spec_hash for c in host.containers.values() if c.running}
        if running != {s.name: s.hash for s in node.services}:
            problems.append(f"{node.name}: containers differ from desired")
        for path, body in pki.files_for(node.name, list(node.certs)).items():
            if host.files.get(path) != _sha(body):
                problems.append(f"{node.name}: {path} is not what the state holds")
        if [c for c in host.containers if c.startswith("old-")]:
            problems.append(f"{node.name}: old-* containers left")
    return problems


def _sha(data: bytes | str) -> str:
    """What a simulated host keeps of a file: its sha256."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _replaced(plan) -> set[str]:  # type: ignore[no-untyped-def]
    return {s.service for s in plan.steps if s.action == "replace"}


# ---------------------------------------------------------------------------- choosing
def test_unknown_service_is_refused_naming_the_valid_ones() -> None:
    with pytest.raises(rotate.UnknownServiceError) as err:
        rotate.check_services(["kube-apiserver", "etcdd"])
    assert "'etcdd'" in str(err.value) and "kube-controller-manager" in str(err.value)
    assert err.value.exit_code == 2
    assert rotate.check_services([]) == rotate.SERVICES


@pytest.mark.parametrize("service, restarted", [
    ("etcd", {"etcd", "etcd-rolling-snapshots"}),  # it reads the etcd certificate too
    ("kube-apiserver", {"kube-apiserver"}),
    ("kube-controller-manager", {"kube-controller-manager"}),
    ("kube-scheduler", {"kube-scheduler"}),
    ("kubelet", {"kubelet"}),
    ("kube-proxy", {"kube-proxy"}),
])
def test_only_the_services_reading_a_rotated_certificate_restart(
        sim: SimCluster, service: str, restarted: set[str]) -> None:
    rotation = _plan(sim, (service,))
    assert _replaced(rotation.plan) == restarted
    assert rotation.certs and all(rotate.owner(_request(sim, n)) == service for n in rotation.certs)
    assert "kube-service-account-token" not in rotation.certs


def _request(sim: SimCluster, name: str):  # type: ignore[no-untyped-def]
    from lifecycle.pki import collect_requests

    return collect_requests(compile_desired(_config()))[name]


def test_the_plan_renews_first_then_delivers_then_rolls(sim: SimCluster) -> None:
    plan = _plan(sim).plan
    first = plan.groups[0]
    assert [s.action for u in first.units for s in u.steps] == ["rotate-certs"]
    assert first.units[0].steps[0].detail["stage"] == "leaves"
    assert plan.groups[1].phase == "certs"
    assert {s.action for s in plan.groups[1].units[0].steps} == {"deliver-certs"}
    cp = next(g for g in plan.groups if g.phase == "controlplane")
    assert cp.concurrency == 1  # max_unavailable_controlplane: one node at a time
    etcd = next(g for g in plan.groups if g.phase == "etcd")
    assert etcd.concurrency == 1
    assert _replaced(plan) == {"etcd", "etcd-rolling-snapshots", "kube-apiserver",
                               "kube-controller-manager", "kube-scheduler", "kubelet",
                               "kube-proxy"}
    assert "nginx-proxy" not in _replaced(plan)  # reads no certificate


def test_a_pending_config_change_is_refused(sim: SimCluster) -> None:
    changed = load_config_text(CONFIG.replace("cluster_name: cr", "cluster_name: cr\n"
                                              "services: {kubelet: {extra_args: {max-pods: '99'}}}")).config
    with pytest.raises(PlanError, match="run `rkel apply` first"):
        rotate.plan_rotation(changed, sim.store, current_state(sim.store), rotate.SERVICES, False)


# ---------------------------------------------------------------------------- leaves
def test_rotation_renews_the_leaves_keeps_the_cas_and_the_service_account_key(sim: SimCluster) -> None:
    before = _pems(sim)
    _rotate(sim)
    after = _pems(sim)
    assert _converged(sim) == []
    for name in ("kube-apiserver", "kube-admin", "kube-node-n1", "kube-etcd-10-0-0-2",
                 "kube-proxy", "kube-scheduler", "kube-controller-manager"):
        assert after[name] != before[name], name
        assert load_cert(after[name]).serial_number != load_cert(before[name]).serial_number
    for name in (*CAS, "kube-service-account-token"):
        assert after[name] == before[name], name
    n2 = sim.world.hosts["n2"].files
    assert n2[f"{SSL}/kube-apiserver.pem"] == _sha(after["kube-apiserver"])
    # a later `rkel apply` plans nothing: the rotation counts are part of what it compiles
    assert rotate.rotations(sim.store)["kube-apiserver"] == 1


def test_a_single_service_rotation_leaves_the_others_alone(sim: SimCluster) -> None:
    before = _pems(sim)
    containers = {n: {c.name: c.spec_hash for c in h.containers.values()}
                  for n, h in sim.world.hosts.items()}
    _rotate(sim, ("kube-proxy",))
    after = _pems(sim)
    assert [n for n in after if after[n] != before.get(n)] == ["kube-proxy"]
    for node, host in sim.world.hosts.items():
        changed = {c.name for c in host.containers.values()
                   if containers[node].get(c.name) != c.spec_hash}
        assert changed == {"kube-proxy"}, node
    assert _converged(sim) == []


def test_killed_at_every_journal_write_it_resumes_and_issues_nothing_twice(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    total = _rotate(_cluster(base))
    assert total > 40
    for n in range(1, total, 4):
        where = tmp_path / f"crash-{n}"
        where.mkdir()
        sim = _cluster(where)
        original = _pems(sim)
        seen: dict[str, str] = {}
        assert _rotate(sim, crash_after=n, before_resume=lambda s: seen.update(_pems(s))) == -1
        after = _pems(sim)
        for name in ("kube-apiserver", "kube-admin", "kube-node-w1", "kube-etcd-10-0-0-3"):
            assert after[name] != original[name], f"crash after write {n}: {name} not renewed"
            if seen[name] != original[name]:  # the dead run had renewed it: kept as it was
                assert after[name] == seen[name], f"crash after write {n}: {name} renewed twice"
        assert _converged(sim) == [], f"crash after write {n}"
        assert sim.journal_problems() == [], n
        sim.close()


def test_the_renewing_step_done_by_a_dead_run_is_not_done_again(sim: SimCluster) -> None:
    """Killed after the new certificates were stored but before the step was journaled done:
    the resumed step finds them matching their requests and issues none."""
    issued: dict[str, str] = {}

    def finish_the_effect(s: SimCluster) -> None:
        plan = s.store.unfinished_run().plan  # type: ignore[union-attr]
        from lifecycle.plan import Plan

        step = Plan.from_dict(plan).groups[0].units[0].steps[0]

        class _Executor:
            store = s.store
            backend = s.world.backend()

        rotate.run_step(_Executor(), step)  # type: ignore[arg-type]
        issued.update(_pems(s))

    assert _rotate(sim, crash_after=1, before_resume=finish_the_effect) == -1
    assert issued and _pems(sim) == issued
    assert _converged(sim) == []


# ---------------------------------------------------------------------------- CA
def _file(sim: SimCluster, node: str, name: str) -> str:
    return str(sim.world.hosts[node].files[f"{SSL}/{name}.pem"])


def test_rotate_ca_runs_its_three_stages_in_order(sim: SimCluster) -> None:
    plan = _plan(sim, ca=True).plan
    stages = [s.detail["stage"] for s in plan.steps if s.action == "rotate-certs"]
    assert stages == ["ca-trust", "ca-issue", "ca-drop"]
    order = [s.id.split("/")[0] if "/" in s.id else s.detail["stage"] for s in plan.steps
             if s.action in ("rotate-certs", "replace")]
    assert order == sorted(order, key=lambda x: {"ca-trust": 0, "stage 1": 1, "ca-issue": 2,
                                                "stage 2": 3, "ca-drop": 4, "stage 3": 5}[x])
    for tag in ("stage 1", "stage 2", "stage 3"):
        replaced = {s.service for s in plan.steps if s.id.startswith(tag + "/")
                    and s.action == "replace"}
        assert replaced == {"etcd", "etcd-rolling-snapshots", "kube-apiserver",
                            "kube-controller-manager", "kube-scheduler", "kubelet",
                            "kube-proxy"}, tag
    assert len({s.id for s in plan.steps}) == len(plan.steps)


def test_rotate_ca_trusts_both_cas_in_between_and_only_the_new_one_after(tmp_path: Path) -> None:
    sim = _cluster(tmp_path)
    old = {ca: _pems(sim)[ca] for ca in CAS}
    old_sa = load_cert(_pems(sim)["kube-service-account-token"]).public_key()
    seen: dict[str, object] = {}

    def inspect(s: SimCluster) -> None:
        seen.update(pems=_pems(s), w1=_file(s, "w1", "kube-ca"), n1=_file(s, "n1", "kube-etcd-ca"))

    # stop right after stage 2's certificates reached every node: both CAs still trusted
    base = tmp_path / "base"
    base.mkdir()
    probe = _cluster(base)
    _rotate(probe, ca=True)
    rows = probe.store.journal(probe.store.runs()[0].id)
    writes = 1 + max(i for i, r in enumerate(rows) if r.phase == "done"
                     and r.step_id.startswith("stage 2/") and ":certs:" in r.step_id)
    assert _rotate(sim, ca=True, crash_after=writes, before_resume=inspect) == -1
    pems: dict[str, str] = seen["pems"]  # type: ignore[assignment]
    assert pems["kube-ca" + PREVIOUS] == old["kube-ca"]
    assert seen["w1"] == _sha(pems["kube-ca"] + pems["kube-ca" + PREVIOUS])
    assert seen["n1"] == _sha(pems["kube-etcd-ca"] + pems["kube-etcd-ca" + PREVIOUS])
    new_ca = load_cert(pems["kube-ca"])
    assert issued_by(load_cert(pems["kube-apiserver"]), new_ca)
    assert not issued_by(load_cert(pems["kube-apiserver"]), load_cert(old["kube-ca"]))

    after = _pems(sim)
    assert _converged(sim) == []
    assert not [n for n in after if n.endswith(NEXT) or n.endswith(PREVIOUS)]
    for ca in CAS:
        assert after[ca] != old[ca], ca
    for node in ("n1", "w1"):
        assert _file(sim, node, "kube-ca") == _sha(after["kube-ca"])
    leaf = load_cert(after["kube-etcd-10-0-0-1"])
    assert issued_by(leaf, load_cert(after["kube-etcd-ca"]))
    assert not issued_by(leaf, load_cert(old["kube-etcd-ca"]))
    sa = load_cert(after["kube-service-account-token"])
    assert issued_by(sa, load_cert(after["kube-ca"]))
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.PEM
    assert sa.public_key().public_bytes(enc, pub) == old_sa.public_bytes(enc, pub)
    from lifecycle.cli.state import check_certificates

    assert check_certificates(sim.store).ok


def test_rotate_ca_killed_anywhere_converges(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    total = _rotate(_cluster(base), ca=True)
    for n in sorted({*range(1, total, 17), 2, 3, total - 1}):  # total - 1 may be in the range
        where = tmp_path / f"crash-{n}"
        where.mkdir()
        sim = _cluster(where)
        old_ca = _pems(sim)["kube-ca"]
        assert _rotate(sim, ca=True, crash_after=n) == -1
        after = _pems(sim)
        assert _converged(sim) == [], f"crash after write {n}"
        assert after["kube-ca"] != old_ca
        assert not [k for k in after if ":" in k], n
        assert sim.journal_problems() == [], n
        sim.close()


# ---------------------------------------------------------------------------- expiry
def _short_lived(sim: SimCluster, name: str, days: int) -> None:
    """Replace `name` with a certificate of the same key that expires in `days` days."""
    row = next(r for r in sim.store.certificates() if r.name == name)
    pki = _pki(sim)
    ca = pki.material("kube-ca")
    from lifecycle.pki_x509 import load_key

    cert = load_cert(row.cert_pem)
    now = datetime.now(UTC)
    built = (x509.CertificateBuilder().subject_name(cert.subject)
             .issuer_name(load_cert(ca.cert_pem.decode()).subject).public_key(cert.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
             .not_valid_after(now + timedelta(days=days))
             .sign(load_key(ca.key_pem), hashes.SHA256()))
    pem = built.public_bytes(serialization.Encoding.PEM).decode()
    sim.store.apply_ops([PutCertificate(name, pem, row.key_encrypted,
                                        built.not_valid_after_utc.isoformat(), row.sans, row.hash)])


def test_a_certificate_expiring_in_10_days_is_warned_about(sim: SimCluster) -> None:
    _short_lived(sim, "kube-proxy", 10)
    rows = {r["name"]: r for r in rotate.expiry(sim.store)}
    assert rows["kube-proxy"]["warn"] and rows["kube-proxy"]["days_left"] in (9, 10)
    assert not rows["kube-apiserver"]["warn"] and rows["kube-apiserver"]["days_left"] > 3000
    assert rows["kube-service-account-token"]["not_after"] is None
    warnings = rotate.expiry_warnings(list(rows.values()))
    assert len(warnings) == 1 and "kube-proxy expires in" in warnings[0]
    assert "rkel cert rotate" in warnings[0]
    text = rotate.expiry_text(list(rows.values()))
    assert "no expiry" in text and "WARNING" in text
    # rotating kube-proxy clears it
    _rotate(sim, ("kube-proxy",))
    assert not [r for r in rotate.expiry(sim.store) if r["warn"]]


# ---------------------------------------------------------------------------- the command
def _rkel(tmp: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lifecycle", "-c", str(tmp / "cluster.yml"), *args],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})})


def test_the_command_rotates_a_simulated_cluster_and_status_shows_expiry(tmp_path: Path) -> None:
    (tmp_path / "cluster.yml").write_text(CONFIG)
    assert _rkel(tmp_path, "apply", "--backend", "simulated", "--yes").returncode == 0
    bad = _rkel(tmp_path, "cert", "rotate", "--service", "kube-apiserverr", "--yes",
                "--backend", "simulated")
    assert bad.returncode == 2 and "valid: etcd, kubelet" in bad.stderr
    assert "Traceback" not in bad.stderr
    # killed after its first journal write, then resumed
    killed = _rkel(tmp_path, "cert", "rotate", "--yes", "--backend", "simulated",
                   env={"RKEL_CRASH_AFTER_JOURNAL_WRITES": "3"})
    assert killed.returncode == -9
    # it restarts etcd and the control plane: an automatic snapshot came first
    assert "taking an automatic etcd snapshot first (it changes etcd" in killed.stderr
    autos = [d for d in json.loads(_rkel(tmp_path, "-o", "json", "snapshot", "list").stdout)
             if d["kind"] == "auto"]
    assert len(autos) == 1 and autos[0]["kubernetes_version"]
    refused = _rkel(tmp_path, "cert", "rotate", "--yes", "--backend", "simulated")
    assert refused.returncode == 4 and "--resume" in refused.stderr
    done = _rkel(tmp_path, "cert", "rotate", "--resume", "--backend", "simulated")
    assert done.returncode == 0, done.stderr
    assert "Certificate rotation complete" in done.stdout
    plan = _rkel(tmp_path, "-o", "json", "plan")
    data = json.loads(plan.stdout)
    assert data["groups"] == []  # the rotation counts are compiled in: nothing left to do
    names = {c["name"] for c in data["certificates"]}
    assert "kube-apiserver" in names
    status = _rkel(tmp_path, "-o", "json", "status")
    rows = {c["name"]: c for c in json.loads(status.stdout)["certificates"]}
    assert rows["kube-service-account-token"]["not_after"] is None
    assert rows["kube-apiserver"]["days_left"] > 3000
    text = _rkel(tmp_path, "status").stdout
    assert "NOT AFTER" in text and "no expiry" in text
    # no private key in what was printed or in the state in clear
    state = (tmp_path / "cluster.rkel.db").read_bytes()
    assert b"PRIVATE KEY" not in state
    for out in (done.stdout, done.stderr, plan.stdout, status.stdout, text):
        assert "PRIVATE KEY" not in out


def test_cert_rotate_no_snapshot_warns_and_takes_none(tmp_path: Path) -> None:
    (tmp_path / "cluster.yml").write_text(CONFIG)
    assert _rkel(tmp_path, "apply", "--backend", "simulated", "--yes").returncode == 0
    done = _rkel(tmp_path, "cert", "rotate", "--service", "kube-apiserver", "--yes",
                 "--no-snapshot", "--backend", "simulated")
    assert done.returncode == 0, done.stderr
    assert "warning: --no-snapshot: it changes kube-apiserver" in done.stderr
    assert json.loads(_rkel(tmp_path, "-o", "json", "snapshot", "list").stdout) == []


def test_cert_rotate_plan_shows_the_rotation_and_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "cluster.yml").write_text(CONFIG)
    assert _rkel(tmp_path, "apply", "--backend", "simulated", "--yes").returncode == 0
    history = _rkel(tmp_path, "-o", "json", "history").stdout
    shown = _rkel(tmp_path, "cert", "rotate", "--service", "etcd", "--plan")
    assert shown.returncode == 0, shown.stderr
    assert "etcd" in shown.stdout and "Before the run: an automatic etcd snapshot" in shown.stdout
    data = json.loads(_rkel(tmp_path, "-o", "json", "cert", "rotate", "--plan").stdout)
    assert data["plan"]["groups"] and "etcd" in data["snapshot_first"]
    assert _rkel(tmp_path, "-o", "json", "history").stdout == history  # no run was made
    assert json.loads(_rkel(tmp_path, "-o", "json", "snapshot", "list").stdout) == []
