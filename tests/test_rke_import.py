"""`rkel import`: adopting an RKE-built cluster, through the real `rkel` process on the
Simulated backend.

The cluster "RKE built" is a simulated world whose containers carry RKE's names and only RKE's
label, made from rkel's specs compiled with RKE's certificate layout (rkel's flags are RKE's), and
whose certificate files and `cluster.rkestate` come from a PKI made by `tests.rke_fixture`, not by
rkel. The real-hosts counterpart is `tests/e2e/test_rke_import.py`.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import textwrap
from pathlib import Path
from typing import Any

import pytest

from lifecycle.config import load_config
from lifecycle.desired import SIDEKICK, compile_desired
from lifecycle.hosts.simulated import SimWorld, foreign_container
from tests import rke_fixture as rke
from tests.test_cli import no_traceback, rkel

CONFIG = textwrap.dedent("""\
    cluster_name: adopted
    kubernetes_version: v1.30.5-rancher1-1
    nodes:
      - address: 10.0.0.11
        hostname_override: cp-1
        user: rkel
        role: [controlplane, etcd]
      - address: 10.0.0.12
        hostname_override: etcd-2
        user: rkel
        role: [etcd, worker]
      - address: 10.0.0.13
        hostname_override: etcd-3
        user: rkel
        role: [etcd, worker]
        internal_address: 192.168.10.13
      - address: 10.0.0.14
        hostname_override: worker-4
        user: rkel
        role: [worker]
    """)


@pytest.fixture(scope="module")
def pki() -> dict[str, rke.Pair]:
    config = load_config_text_path(CONFIG)
    return rke.rke_pki(config)


def load_config_text_path(text: str) -> Any:
    from lifecycle.config import load_config_text

    return load_config_text(text, "cluster.yml").config


def rke_world(path: Path, config: Any, pki: dict[str, rke.Pair],
              change: dict[tuple[str, str], dict[str, Any]] | None = None) -> SimWorld:
    """The simulated cluster as RKE left it. `change`: per (node, container), fields of the
    made-as record to alter (a container RKE made differently)."""
    desired = compile_desired(config, pki_layout="rke")
    world = SimWorld(path=path)
    for node in desired.nodes:
        world.put_files(node.name, rke.node_files(config, pki, node.name))
        host = world.hosts[node.name]
        host.roles = list(node.roles)
        for spec in node.services:
            made = foreign_container(spec, {rke.CONTAINER_NAME_LABEL: spec.name},
                                     spec.bootstrap_args, running=spec.name != SIDEKICK)
            made.config.update((change or {}).get((node.name, spec.name), {}))
            if "image" in made.config:
                made.image = made.config.pop("image")
            host.containers[spec.name] = made
            if spec.name == "kubelet":
                world.kube_nodes[node.name] = {
                    "schedulable": True, "version": spec.image.rsplit(":", 1)[-1],
                    "labels": {"kubernetes.io/hostname": node.name}, "annotations": {},
                    "taints": []}
            if spec.name == "etcd":
                world.etcd[f"etcd-{node.name}"] = {
                    "peer_url": f"https://{node.internal_address}:2380", "learner": False}
    world._save()
    return world


@pytest.fixture
def site(tmp_path: Path, pki: dict[str, rke.Pair]) -> Path:
    """A directory with cluster.yml, cluster.rkestate and the simulated RKE cluster."""
    (tmp_path / "cluster.yml").write_text(CONFIG)
    config = load_config(tmp_path / "cluster.yml").config
    rke.write_rkestate(tmp_path / "cluster.rkestate", config, pki)
    rke_world(tmp_path / "cluster.rkel.world.json", config, pki)
    return tmp_path


def do_import(site: Path, *extra: str, env: dict[str, str] | None = None) -> Any:
    return rkel("-c", str(site / "cluster.yml"), "-o", "json", "import", "--rke-state",
                str(site / "cluster.rkestate"), "--backend", "simulated", "--yes", *extra,
                env=env)


def plan(site: Path) -> dict[str, Any]:
    result = rkel("-c", str(site / "cluster.yml"), "-o", "json", "plan")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def steps(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for g in data["groups"] for u in g["units"] for s in u["steps"]]


def test_unchanged_cluster_imports_and_plans_no_container_or_certificate_change(
        site: Path) -> None:
    result = do_import(site)
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["kubernetes_version"] == "v1.30.5-rancher1-1"
    for name, node in data["nodes"].items():
        assert node["differing"] == {}, name
        assert node["certificates_match"], name
    assert data["nodes"]["cp-1"]["matching"] == sorted(
        ["etcd", "etcd-rolling-snapshots", SIDEKICK, "kube-apiserver",
         "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy"])
    assert "nginx-proxy" in data["nodes"]["worker-4"]["matching"]
    # rkel adopts RKE's recurring snapshots: no note may call them RKE's and left alone
    assert not [n for n in data["notes"] if "etcd-rolling-snapshots" in n], data["notes"]

    after = plan(site)
    actions = sorted({s["action"] for s in steps(after)})
    # Only the add-ons: rkel applies its manifests of canal and CoreDNS once (server-side
    # apply over RKE's objects). No certificate, no container, no node metadata change.
    assert actions == ["apply-addon"], actions
    assert after["summary"]["add"] == after["summary"]["change"] == 0
    assert after["summary"]["remove"] == 0

    status = rkel("-c", str(site / "cluster.yml"), "-o", "json", "status")
    assert status.returncode == 0, status.stderr
    assert "cp-1" in status.stdout

    # The same cluster is not imported twice, and nothing else is imported over it.
    again = do_import(site)
    assert again.returncode == 3
    assert "already holds this cluster" in again.stdout
    history = rkel("-c", str(site / "cluster.yml"), "-o", "json", "history")
    assert [r["kind"] for r in json.loads(history.stdout)] == ["import"]


def test_version_bump_after_import_is_a_rolling_upgrade_keeping_rke_certificates(
        site: Path, pki: dict[str, rke.Pair]) -> None:
    assert do_import(site).returncode == 0
    cfg = site / "cluster.yml"
    cfg.write_text(CONFIG.replace("v1.30.5-rancher1-1", "v1.31.1-rancher1-1"))
    upgrade = plan(site)
    replaced = {(s["node"], s["service"]) for s in steps(upgrade) if s["action"] == "replace"}
    assert ("cp-1", "kube-apiserver") in replaced and ("worker-4", "kubelet") in replaced
    assert not any(s["action"] in ("deliver-certs", "start") for s in steps(upgrade))
    titles = [g["title"] for g in upgrade["groups"]]
    assert any("controlplane nodes" in t for t in titles)
    assert any("worker nodes" in t for t in titles)
    applied = rkel("-c", str(cfg), "apply", "--backend", "simulated", "--yes", "--no-snapshot")
    assert applied.returncode == 0, applied.stderr
    assert plan(site)["groups"] == []
    world = SimWorld.load(site / "cluster.rkel.world.json")
    assert {n["version"] for n in world.kube_nodes.values()} == {"v1.31.1-rancher1"}
    # The upgraded containers still use RKE's certificates: etcd trusts kube-ca, kubelets the
    # shared kube-node, and the state's kube-ca is RKE's.
    db = sqlite3.connect(site / "cluster.rkel.db")
    ca = db.execute("SELECT cert_pem FROM certificates WHERE name='kube-ca'").fetchone()[0]
    assert ca == pki["kube-ca"].cert_pem
    names = {r[0] for r in db.execute("SELECT name FROM certificates")}
    assert "kube-etcd-ca" not in names and not any(n.startswith("kube-node-") for n in names)
    apiserver = json.loads(db.execute(
        "SELECT spec FROM services WHERE node='cp-1' AND name='kube-apiserver'").fetchone()[0])
    assert "--etcd-cafile=/etc/kubernetes/ssl/kube-ca.pem" in apiserver["args"]
    assert "--etcd-certfile=/etc/kubernetes/ssl/kube-node.pem" in apiserver["args"]


def test_a_container_rke_made_differently_is_named_and_planned_alone(
        tmp_path: Path, pki: dict[str, rke.Pair]) -> None:
    (tmp_path / "cluster.yml").write_text(CONFIG)
    config = load_config(tmp_path / "cluster.yml").config
    rke.write_rkestate(tmp_path / "cluster.rkestate", config, pki)
    desired = compile_desired(config, pki_layout="rke")
    proxy = desired.node("worker-4").service("kube-proxy")  # type: ignore[union-attr]
    extra = "--oom-score-adj=-999"  # RKE v1.6 does not pass it; rkel does not either
    assert extra not in proxy.args
    argv = [*proxy.command, *proxy.args, extra]
    rke_world(tmp_path / "cluster.rkel.world.json", config, pki,
              {("worker-4", "kube-proxy"): {"argv": argv}})
    result = do_import(tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["nodes"]["worker-4"]["differing"] == {"kube-proxy": [f"argument {extra} dropped"]}
    assert any("kube-proxy differs" in n for n in data["notes"])
    after = plan(tmp_path)
    changed = [(s["node"], s["service"], s["args_removed"]) for s in steps(after)
               if s["action"] == "replace"]
    assert changed == [("worker-4", "kube-proxy", [extra])]


def test_killed_import_is_finished_by_apply_resume(site: Path) -> None:
    crashed = do_import(site, env={"RKEL_CRASH_AFTER_JOURNAL_WRITES": "4"})
    assert crashed.returncode == -9
    plain = rkel("-c", str(site / "cluster.yml"), "apply", "--backend", "simulated", "--yes")
    assert plain.returncode == 4 and "--resume" in plain.stderr
    again = do_import(site)
    assert again.returncode == 3 and "interrupted run" in again.stdout
    resumed = rkel("-c", str(site / "cluster.yml"), "apply", "--resume", "--backend",
                   "simulated", "--yes")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted({s["action"] for s in steps(plan(site))}) == ["apply-addon"]


def test_no_private_key_in_clear_in_the_state_or_output(
        site: Path, pki: dict[str, rke.Pair]) -> None:
    result = do_import(site)
    assert result.returncode == 0
    shown = result.stdout + result.stderr + json.dumps(plan(site))
    stored = b"".join(p.read_bytes() for p in site.glob("cluster.rkel.db*")
                      if not p.name.endswith(".key"))
    bodies = rke.key_bodies(pki)
    assert bodies
    assert [b for b in bodies if b in shown] == []
    assert [b for b in bodies if b.encode() in stored] == []
    db = sqlite3.connect(site / "cluster.rkel.db")
    rows = db.execute("SELECT name, key_encrypted FROM certificates").fetchall()
    assert rows and all(k and not k.startswith(b"-----") for _, k in rows)
    assert dict(db.execute("SELECT key, value FROM cluster"))["pki_layout"] == '"rke"'
    verify = rkel("-c", str(site / "cluster.yml"), "state", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _mutated(site: Path, edit: Any) -> None:
    path = site / "cluster.rkestate"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("case, message", [
    ("not-json", "it is not JSON"),
    ("no-bundle", "holds a certificatesBundle"),
    ("missing-ca", "kube-ca: missing"),
    ("wrong-key", "kube-proxy: keyPEM is not the private key of its certificatePEM"),
    ("foreign-ca", "kube-apiserver: the certificate is not signed by kube-ca"),
    ("no-file", "does not exist"),
])
def test_bad_rke_state_is_a_clear_error_and_writes_nothing(
        site: Path, pki: dict[str, rke.Pair], case: str, message: str) -> None:
    state = site / "cluster.rkestate"
    if case == "not-json":
        state.write_text("desiredState: {}\n")
    elif case == "no-bundle":
        _mutated(site, lambda d: [d[k].pop("certificatesBundle") for k in list(d)])
    elif case == "missing-ca":
        _mutated(site, lambda d: [d[k]["certificatesBundle"].pop("kube-ca") for k in list(d)])
    elif case == "wrong-key":
        other = pki["kube-scheduler"].key_pem
        _mutated(site, lambda d: [d[k]["certificatesBundle"]["kube-proxy"].update(keyPEM=other)
                                  for k in list(d)])
    elif case == "foreign-ca":
        stranger = rke.make_leaf(rke.make_ca("kube-ca"), "kube-apiserver")
        _mutated(site, lambda d: [d[k]["certificatesBundle"]["kube-apiserver"].update(
            certificatePEM=stranger.cert_pem, keyPEM=stranger.key_pem) for k in list(d)])
    elif case == "no-file":
        state.unlink()
    result = do_import(site)
    no_traceback(result)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stdout
    assert not (site / "cluster.rkel.db").exists()
    assert "BEGIN RSA PRIVATE KEY" not in result.stdout + result.stderr


def test_import_into_a_state_that_holds_a_cluster_is_refused(site: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(site / "cluster.yml", other / "cluster.yml")
    made = rkel("-c", str(other / "cluster.yml"), "apply", "--backend", "simulated", "--yes")
    assert made.returncode == 0, made.stderr
    before = (other / "cluster.rkel.db").read_bytes()
    result = rkel("-c", str(other / "cluster.yml"), "-o", "json", "import", "--rke-state",
                  str(site / "cluster.rkestate"), "--backend", "simulated", "--yes")
    no_traceback(result)
    assert result.returncode == 3
    assert "already holds a cluster" in result.stdout
    assert (other / "cluster.rkel.db").read_bytes() == before


def test_a_cluster_whose_secrets_rke_encrypted_is_refused_before_anything_is_written(
        site: Path) -> None:
    (site / "cluster.yml").write_text(
        CONFIG + "services:\n  kube-api:\n    secrets_encryption_config: {enabled: true}\n")
    result = do_import(site)
    no_traceback(result)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "secrets_encryption_config" in result.stdout + result.stderr
    assert not (site / "cluster.rkel.db").exists()


# ---------------------------------------------------------------------------- pure parts
def test_rke_layout_specs_use_rkes_certificates() -> None:
    config = load_config_text_path(CONFIG)
    desired = compile_desired(config, pki_layout="rke")
    cp = desired.node("cp-1")
    assert cp is not None
    etcd = cp.service("etcd")
    apiserver = cp.service("kube-apiserver")
    assert etcd is not None and apiserver is not None
    assert "--trusted-ca-file=/etc/kubernetes/ssl/kube-ca.pem" in etcd.args
    assert "--cert-file=/etc/kubernetes/ssl/kube-etcd-10-0-0-11.pem" in etcd.args
    assert "ETCDCTL_CACERT=/etc/kubernetes/ssl/kube-ca.pem" in etcd.env
    assert etcd.health is not None and etcd.health.client_cert == "kube-node"
    assert "--etcd-certfile=/etc/kubernetes/ssl/kube-node.pem" in apiserver.args
    names = {c.name for n in desired.nodes for c in n.certs}
    assert "kube-node" in names and "kube-etcd-ca" not in names
    assert not any(n.startswith("kube-node-") for n in names)
    # rkel's own layout is untouched by the option
    own = compile_desired(config)
    assert own.fingerprint != desired.fingerprint
    assert {c.name for n in own.nodes for c in n.certs} >= {"kube-etcd-ca", "kube-node-cp-1"}


def test_compare_names_each_difference_and_ignores_labels_and_bootstrap_flags() -> None:
    from lifecycle.hosts import ContainerConfig
    from lifecycle.rke_import import compare

    config = load_config_text_path(CONFIG)
    etcd = compile_desired(config, pki_layout="rke").node("cp-1").service("etcd")  # type: ignore[union-attr]
    assert etcd is not None
    same = ContainerConfig("etcd", etcd.image, (*etcd.command, *reversed(etcd.args),
                                                *etcd.bootstrap_args),
                           tuple(etcd.env), tuple(etcd.binds), etcd.privileged,
                           etcd.network_mode, etcd.pid_mode, etcd.restart, (),
                           (("io.rancher.rke.container.name", "etcd"),), True)
    assert compare(etcd, same)[0] == ()
    other = ContainerConfig("etcd", "rancher/mirrored-coreos-etcd:v3.5.9", same.argv,
                            (*etcd.env[1:], "ETCD_UNSUPPORTED_ARCH=arm64"),
                            (*etcd.binds, "/var/log:/var/log:z"), False, "host", "",
                            "unless-stopped", (), (), True)
    diffs, as_made = compare(etcd, other)
    assert diffs[0] == f"image rancher/mirrored-coreos-etcd:v3.5.9 -> {etcd.image}"
    assert f"env {etcd.env[0]} added" in diffs
    assert "env ETCD_UNSUPPORTED_ARCH=arm64 dropped" in diffs
    assert "bind /var/log:/var/log:z dropped" in diffs
    assert "restart policy unless-stopped -> always" in diffs
    assert as_made.hash != etcd.hash and as_made.image.endswith("v3.5.9")


def test_a_node_whose_certificate_files_differ_gets_them_delivered_again(
        tmp_path: Path, pki: dict[str, rke.Pair]) -> None:
    (tmp_path / "cluster.yml").write_text(CONFIG)
    config = load_config(tmp_path / "cluster.yml").config
    rke.write_rkestate(tmp_path / "cluster.rkestate", config, pki)
    world = rke_world(tmp_path / "cluster.rkel.world.json", config, pki)
    world.put_files("worker-4", {"/etc/kubernetes/ssl/kube-proxy.pem": b"something else"})
    result = do_import(tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert not data["nodes"]["worker-4"]["certificates_match"]
    assert all(n["certificates_match"] for k, n in data["nodes"].items() if k != "worker-4")
    delivered = [s["node"] for s in steps(plan(tmp_path)) if s["action"] == "deliver-certs"]
    assert delivered == ["worker-4"]


def test_an_unreachable_node_stops_the_import_before_anything_is_recorded(site: Path) -> None:
    world = SimWorld.load(site / "cluster.rkel.world.json")
    world.set_reachable("worker-4", False)
    result = do_import(site)
    no_traceback(result)
    assert result.returncode == 6, result.stdout + result.stderr
    assert "worker-4" in result.stdout and "nothing was written" in result.stdout
    db = sqlite3.connect(site / "cluster.rkel.db")
    assert db.execute("SELECT count(*) FROM runs").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM certificates").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM nodes").fetchone()[0] == 0
