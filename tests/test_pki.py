"""The PKI with real crypto: chains, subjects, encryption at rest, state key, files, etcd TLS."""

from __future__ import annotations

import base64
import dataclasses
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from ruamel.yaml import YAML

from lifecycle import desired_certs as names
from lifecycle.config.model import Authentication, ClusterConfig, Node
from lifecycle.desired import compile_desired
from lifecycle.errors import PlanError, StateError
from lifecycle.kubeconfig import file_kubeconfig, quote
from lifecycle.pki import PKI, collect_requests, load_state_key, state_key_path
from lifecycle.spec import CertRequest, Desired, NodeDesired
from store import Store

ALL_ROLES = ("etcd", "controlplane", "worker")
ETCD_MEMBER = "kube-etcd-127-0-0-1"
NO_ENV: dict[str, str] = {}


def single_node(sans: tuple[str, ...] = ()) -> Desired:
    """One node with every role on 127.0.0.1."""
    config = ClusterConfig(
        nodes=(Node(address="127.0.0.1", user="u", role=ALL_ROLES),),
        authentication=Authentication(sans=list(sans)),
    )
    return compile_desired(config)


def three_roles() -> Desired:
    """A controlplane, an etcd-only and a worker-only node."""
    config = ClusterConfig(
        nodes=(
            Node(address="10.0.0.1", user="u", role=("controlplane",)),
            Node(address="10.0.0.2", user="u", role=("etcd",)),
            Node(address="10.0.0.3", user="u", role=("worker",)),
        )
    )
    return compile_desired(config)


def open_pki(directory: Path, env: dict[str, str] | None = None) -> tuple[Store, PKI]:
    state = directory / "cluster.rkel.db"
    store = Store.open(state)
    return store, PKI(store, load_state_key(state, environ=NO_ENV if env is None else env))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, PKI, Desired]]:
    """A generated single-node PKI, read-only for the tests that use it."""
    store, pki = open_pki(tmp_path_factory.mktemp("pki"))
    desired = single_node()
    pki.ensure(desired)
    yield store, pki, desired
    store.close()


@pytest.fixture()
def fresh(tmp_path: Path) -> Iterator[tuple[Store, PKI]]:
    store, pki = open_pki(tmp_path)
    yield store, pki
    store.close()


def cert_of(pki: PKI, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pki.material(name).cert_pem)


def requests_of(desired: Desired) -> dict[str, CertRequest]:
    return collect_requests(desired)


# --- chains and subjects ----------------------------------------------------------------------


def test_every_leaf_verifies_against_its_ca(shared: tuple[Store, PKI, Desired]) -> None:
    _, pki, desired = shared
    for req in requests_of(desired).values():
        cert = cert_of(pki, req.name)
        ca = cert_of(pki, req.ca)
        cert.verify_directly_issued_by(ca)
        assert pki.material(req.name).ca_pem == pki.material(req.ca).cert_pem
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert constraints.ca is names.is_ca(req)
        if not names.is_ca(req):
            usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        key = serialization.load_pem_private_key(pki.material(req.name).key_pem, None)
        assert key.public_key() == cert.public_key()
        assert key.key_size == 2048  # type: ignore[union-attr]


def test_etcd_member_is_signed_by_the_etcd_ca_only(shared: tuple[Store, PKI, Desired]) -> None:
    _, pki, _ = shared
    member = cert_of(pki, ETCD_MEMBER)
    member.verify_directly_issued_by(cert_of(pki, names.ETCD_CA))
    with pytest.raises((ValueError, InvalidSignature)):
        member.verify_directly_issued_by(cert_of(pki, names.KUBE_CA))
    ips = member.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in {str(ip) for ip in ips.get_values_for_type(x509.IPAddress)}


def test_subjects(shared: tuple[Store, PKI, Desired]) -> None:
    _, pki, _ = shared
    node = cert_of(pki, "kube-node-127.0.0.1")
    assert node.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "system:node:127.0.0.1"
    )
    assert [a.value for a in node.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == [
        "system:nodes"
    ]
    admin = cert_of(pki, names.KUBE_ADMIN)
    assert [a.value for a in admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == [
        "system:masters"
    ]
    assert admin.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "kube-admin"


def test_apiserver_sans_match_the_request(shared: tuple[Store, PKI, Desired]) -> None:
    _, pki, desired = shared
    req = requests_of(desired)[names.KUBE_APISERVER]
    sans = (
        cert_of(pki, names.KUBE_APISERVER)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    got = {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
    got |= set(sans.get_values_for_type(x509.DNSName))
    assert got == set(req.sans)
    assert {"10.43.0.1", "127.0.0.1"} <= {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
    assert "kubernetes.default.svc.cluster.local" in sans.get_values_for_type(x509.DNSName)


def test_material_repr_hides_the_key(shared: tuple[Store, PKI, Desired]) -> None:
    _, pki, _ = shared
    material = pki.material(names.KUBE_ADMIN)
    assert b"PRIVATE KEY" in material.key_pem
    assert "PRIVATE" not in repr(material) and "key_pem" not in repr(material)
    assert "PRIVATE" not in repr(pki)


# --- at rest and the state key ----------------------------------------------------------------


def test_private_keys_are_encrypted_at_rest(tmp_path: Path) -> None:
    store, pki = open_pki(tmp_path)
    desired = single_node()
    generated = pki.ensure(desired)
    keys = [pki.material(name).key_pem for name in generated]
    store.close()
    raw = b"".join(
        p.read_bytes()
        for p in sorted(tmp_path.glob("cluster.rkel.db*"))
        if not p.name.endswith(".key")
    )
    assert b"-----BEGIN" in raw  # the certificates themselves are in clear, as they may be
    assert b"PRIVATE KEY" not in raw
    for key_pem in keys:
        body = [line for line in key_pem.splitlines() if line and not line.startswith(b"-----")]
        assert len(body) > 10
        for line in body:
            assert line not in raw
        der = base64.b64decode(b"".join(body))
        assert der[40:72] not in raw


def test_key_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "cluster.rkel.db"
    key = load_state_key(state, environ=NO_ENV)
    path = state_key_path(state)
    assert path == tmp_path / "cluster.rkel.db.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_state_key(state, environ=NO_ENV) == key
    Fernet(key)


def test_env_key_wins_and_is_checked(tmp_path: Path) -> None:
    state = tmp_path / "cluster.rkel.db"
    env_key = Fernet.generate_key()
    assert load_state_key(state, environ={"RKEL_STATE_KEY": env_key.decode()}) == env_key
    assert not state_key_path(state).exists()
    with pytest.raises(StateError, match="RKEL_STATE_KEY is not a valid"):
        load_state_key(state, environ={"RKEL_STATE_KEY": "not-a-key"})


def test_no_key_and_no_create(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no state key yet"):
        load_state_key(tmp_path / "cluster.rkel.db", create=False, environ=NO_ENV)


def test_missing_key_file_with_existing_certs_is_a_helpful_error(tmp_path: Path) -> None:
    store, pki = open_pki(tmp_path)
    pki.ensure(single_node())
    store.close()
    key_file = tmp_path / "cluster.rkel.db.key"
    key_file.unlink()
    with pytest.raises(StateError) as info:
        load_state_key(tmp_path / "cluster.rkel.db", environ=NO_ENV)
    message = str(info.value)
    assert str(key_file) in message
    assert "cannot be recovered" in message
    assert "backup" in message and "RKEL_STATE_KEY" in message
    assert not key_file.exists()  # no new key minted over the old state


def test_wrong_state_key_is_refused(tmp_path: Path) -> None:
    store, pki = open_pki(tmp_path)
    pki.ensure(single_node())
    store.close()
    wrong = {"RKEL_STATE_KEY": Fernet.generate_key().decode()}
    with (
        Store.open(tmp_path / "cluster.rkel.db") as again,
        pytest.raises(StateError, match="does not match this state"),
    ):
        PKI(again, load_state_key(tmp_path / "cluster.rkel.db", environ=wrong))


def test_key_from_env_opens_the_state(tmp_path: Path) -> None:
    store, pki = open_pki(tmp_path)
    pki.ensure(single_node())
    admin = pki.material(names.KUBE_ADMIN)
    store.close()
    key = (tmp_path / "cluster.rkel.db.key").read_text().strip()
    (tmp_path / "cluster.rkel.db.key").unlink()
    with Store.open(tmp_path / "cluster.rkel.db") as again:
        reopened = PKI(again, load_state_key(again.path, environ={"RKEL_STATE_KEY": key}))
        assert reopened.material(names.KUBE_ADMIN) == admin
        assert reopened.ensure(single_node()) == []


# --- ensure -----------------------------------------------------------------------------------


def test_ensure_is_idempotent_and_orders_cas_first(fresh: tuple[Store, PKI]) -> None:
    _, pki = fresh
    desired = single_node()
    generated = pki.ensure(desired)
    assert generated == sorted(requests_of(desired))
    assert pki.ensure(desired) == []
    assert [name for name, _ in pki.expiries()] == generated
    for _, expires in pki.expiries():
        assert expires.year - time.gmtime().tm_year in (9, 10)


def test_san_change_regenerates_only_the_apiserver(fresh: tuple[Store, PKI]) -> None:
    store, pki = fresh
    pki.ensure(single_node())
    before = {row.name: row.cert_pem for row in store.certificates()}
    assert pki.ensure(single_node(sans=("k8s.example.com", "192.0.2.10"))) == [names.KUBE_APISERVER]
    after = {row.name: row.cert_pem for row in store.certificates()}
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {names.KUBE_APISERVER}
    sans = (
        cert_of(pki, names.KUBE_APISERVER)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert "k8s.example.com" in sans.get_values_for_type(x509.DNSName)
    cert_of(pki, names.KUBE_APISERVER).verify_directly_issued_by(cert_of(pki, names.KUBE_CA))


def _replace_request(desired: Desired, name: str, **changes: Any) -> Desired:
    def node(n: NodeDesired) -> NodeDesired:
        certs = tuple(dataclasses.replace(c, **changes) if c.name == name else c for c in n.certs)
        return dataclasses.replace(n, certs=certs)

    return dataclasses.replace(desired, nodes=tuple(node(n) for n in desired.nodes))


def test_a_changed_ca_request_keeps_the_ca(fresh: tuple[Store, PKI]) -> None:
    store, pki = fresh
    desired = single_node()
    pki.ensure(desired)
    ca = store.certificate(names.KUBE_CA)
    changed = _replace_request(desired, names.KUBE_CA, organizations=("someone",))
    assert pki.ensure(changed) == []
    assert store.certificate(names.KUBE_CA) == ca


def test_conflicting_requests_are_a_bug(tmp_path: Path) -> None:
    store, pki = open_pki(tmp_path)
    desired = three_roles()
    cp = desired.nodes[0]
    bad = dataclasses.replace(
        cp,
        certs=tuple(
            dataclasses.replace(c, common_name="x") if c.name == names.KUBE_CA else c
            for c in cp.certs
        ),
    )
    with pytest.raises(PlanError, match="requested differently"):
        pki.ensure(dataclasses.replace(desired, nodes=(bad, *desired.nodes[1:])))
    assert store.certificates() == []
    store.close()


def test_files_for_refuses_stale_certificates(fresh: tuple[Store, PKI]) -> None:
    _, pki = fresh
    pki.ensure(single_node())
    node = single_node(sans=("new.example.com",)).nodes[0]
    with pytest.raises(StateError, match="older than its request"):
        pki.files_for(node.name, list(node.certs))


# --- files on nodes ---------------------------------------------------------------------------


def test_files_for_an_etcd_only_node(tmp_path: Path) -> None:
    store, pki = open_pki(tmp_path)
    desired = three_roles()
    pki.ensure(desired)
    etcd = desired.node("10.0.0.2")
    assert etcd is not None and etcd.roles == ("etcd",)
    files = pki.files_for(etcd.name, list(etcd.certs))
    ca_keys = [pki.material(ca).key_pem for ca in (names.KUBE_CA, names.ETCD_CA)]
    apiserver_key = pki.material(names.KUBE_APISERVER).key_pem
    for path, content in files.items():
        assert content not in ca_keys and content != apiserver_key, path
    assert names.key_path(names.KUBE_CA) not in files
    assert names.key_path(names.ETCD_CA) not in files
    assert names.key_path(names.KUBE_APISERVER) not in files
    assert names.key_path(names.SERVICE_ACCOUNT_TOKEN) not in files
    assert names.cert_path(names.ETCD_CA) in files
    assert names.key_path("kube-etcd-10-0-0-2") in files
    assert names.kubeconfig_path(names.KUBE_NODE_KUBECONFIG) in files
    assert names.kubeconfig_path(names.KUBE_CONTROLLER_MANAGER) not in files
    store.close()


def _flag(args: tuple[str, ...], name: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(f"--{name}="))


def test_files_match_what_the_components_are_told(tmp_path: Path) -> None:
    store, pki = open_pki(tmp_path)
    desired = three_roles()
    pki.ensure(desired)
    yaml = YAML(typ="safe")
    for node in desired.nodes:
        files = pki.files_for(node.name, list(node.certs))
        for service in node.services:
            for arg in service.args:
                value = arg.split("=", 1)[1] if "=" in arg else ""
                if value.startswith(names.SSL_DIR):
                    assert value in files, (node.name, service.name, arg)
            if any(a.startswith("--kubeconfig=") for a in service.args):
                doc = yaml.load(files[_flag(service.args, "kubeconfig")])
                user = doc["users"][0]["user"]
                assert doc["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:6443"
                for key in ("client-certificate", "client-key"):
                    assert user[key] in files
                ca = doc["clusters"][0]["cluster"]["certificate-authority"]
                assert files[ca] == pki.material(names.KUBE_CA).cert_pem
        kubelet = yaml.load(files[names.kubeconfig_path(names.KUBE_NODE_KUBECONFIG)])
        assert kubelet["users"][0]["user"]["client-certificate"] == names.cert_path(
            f"kube-node-{node.name}"
        )
        # no other node's identity on this node
        others = {f"kube-node-{n.name}" for n in desired.nodes if n.name != node.name}
        assert not any(names.cert_path(o) in files for o in others)
    store.close()


def test_admin_kubeconfig(shared: tuple[Store, PKI, Desired], tmp_path: Path) -> None:
    _, pki, _ = shared
    config = tmp_path / "edge.yml"
    target = tmp_path / "kube_config_edge.yml"
    target.write_text("old")
    target.chmod(0o644)
    path = pki.write_admin_kubeconfig(config, "https://10.0.0.1:6443", "edge")
    assert path == target
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["kube_config_edge.yml"]
    doc = YAML(typ="safe").load(path.read_text())
    assert doc["current-context"] == "edge"
    cluster = doc["clusters"][0]["cluster"]
    assert cluster["server"] == "https://10.0.0.1:6443"
    assert (
        base64.b64decode(cluster["certificate-authority-data"])
        == pki.material(names.KUBE_CA).cert_pem
    )
    user = doc["users"][0]["user"]
    cert = x509.load_pem_x509_certificate(base64.b64decode(user["client-certificate-data"]))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "kube-admin"
    assert base64.b64decode(user["client-key-data"]) == pki.material(names.KUBE_ADMIN).key_pem


def test_kubeconfig_quotes_awkward_values() -> None:
    awkward = 'a "b" \\ c: #d\n\te\u2028\x7f'
    text = file_kubeconfig(
        "https://h:1", awkward, ca_path="/p", cert_path="/c", key_path="/k", cluster_name="x: y"
    )
    doc = YAML(typ="safe").load(text)
    assert doc["users"][0]["name"] == awkward
    assert doc["current-context"] == "x: y"
    assert YAML(typ="safe").load(quote("\U0001f600 ok")) == "\U0001f600 ok"


# --- real TLS against etcd --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write(directory: Path, name: str, data: bytes) -> str:
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return str(path)


def _etcdctl(
    endpoint: str, ca: str, cert: str, key: str, *args: str, timeout: str = "3s"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "/usr/bin/etcdctl",
            f"--endpoints={endpoint}",
            f"--cacert={ca}",
            f"--cert={cert}",
            f"--key={key}",
            "--dial-timeout=2s",
            f"--command-timeout={timeout}",
            *args,
        ],
        check=False,
        env={**os.environ, "ETCDCTL_API": "3"},
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_etcd_accepts_only_clients_of_its_own_ca(tmp_path: Path) -> None:
    for tool in ("/usr/bin/etcd", "/usr/bin/etcdctl"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: apt-get install etcd-server etcd-client")
    store, pki = open_pki(tmp_path / "a")
    other_dir = tmp_path / "b"
    other_dir.mkdir()
    other_store, other = open_pki(other_dir)
    try:
        pki.ensure(single_node())
        other.ensure(single_node())
        files = tmp_path / "files"
        files.mkdir()
        member = pki.material(ETCD_MEMBER)
        client = pki.material(names.APISERVER_ETCD_CLIENT)
        wrong_ca = other.material(names.APISERVER_ETCD_CLIENT)
        kube_ca_signed = pki.material(names.KUBE_ADMIN)
        ca = _write(files, "etcd-ca.pem", member.ca_pem)
        paths = {
            label: (
                _write(files, f"{label}.pem", m.cert_pem),
                _write(files, f"{label}-key.pem", m.key_pem),
            )
            for label, m in {
                "member": member,
                "client": client,
                "other": wrong_ca,
                "admin": kube_ca_signed,
            }.items()
        }
    finally:
        store.close()
        other_store.close()
    client_port, peer_port = _free_port(), _free_port()
    endpoint = f"https://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    log = (tmp_path / "etcd.log").open("wb")
    proc = subprocess.Popen(
        [
            "/usr/bin/etcd",
            "--name=t",
            f"--data-dir={tmp_path / 'data'}",
            f"--listen-client-urls={endpoint}",
            f"--advertise-client-urls={endpoint}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=t={peer}",
            f"--cert-file={paths['member'][0]}",
            f"--key-file={paths['member'][1]}",
            "--client-cert-auth",
            f"--trusted-ca-file={ca}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            health = _etcdctl(endpoint, ca, *paths["client"], "endpoint", "health")
            if health.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"etcd did not come up: {health.stderr}\n"
                    f"{(tmp_path / 'etcd.log').read_text()[-2000:]}"
                )
            time.sleep(0.2)
        put = _etcdctl(endpoint, ca, *paths["client"], "put", "/rkel/test", "hello")
        assert put.returncode == 0, put.stderr
        get = _etcdctl(endpoint, ca, *paths["client"], "get", "--print-value-only", "/rkel/test")
        assert get.returncode == 0 and get.stdout.strip() == "hello", get.stderr
        for label in ("other", "admin"):  # another PKI's etcd client; a kube-ca-signed client
            refused = _etcdctl(endpoint, ca, *paths[label], "get", "/rkel/test", timeout="1s")
            assert refused.returncode != 0, label
            assert "hello" not in refused.stdout
        log.flush()
        assert "certificate signed by unknown authority" in (tmp_path / "etcd.log").read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
