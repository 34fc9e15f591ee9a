"""The SSH backend against the real testbed hosts: SSH as the non-root user `rkel`, host keys
pinned in a store, Docker over the one connection, files, tunnelled probes, and etcd membership
through etcdctl in a real 3-member TLS etcd cluster started from rkel's own etcd spec and PKI.

No mocks: every call crosses SSH to a host's own sshd and Docker Engine.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import pwd
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from conftest import Testbed, run_testbed
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from lifecycle.config.loader import load_config
from lifecycle.config.model import ClusterConfig, PrivateRegistry
from lifecycle.desired import compile_desired
from lifecycle.errors import HostError, HostUnreachableError
from lifecycle.hosts.docker_ssh import HELPER_LABEL, registry_auth
from lifecycle.hosts.ssh import (
    SSHBackend,
    SSHHost,
    _parse_key,
    fingerprint,
    helper_image,
    node_ref,
)
from lifecycle.pki import PKI
from lifecycle.spec import SPEC_HASH_LABEL, HealthCheck, NodeRef, ServiceSpec
from store import Store

REGISTRY = "10.77.0.1:5000"
TOOLS = f"{REGISTRY}/rancher/rke-tools:testbed"
SLEEPER = ServiceSpec(name="tb-sleep", image=TOOLS, command=("sleep", "3600"), network_mode="host",
                      restart="no", labels=(("io.rkel.test", "yes"),))
# `sleep` as PID 1 ignores SIGTERM (a stop would wait out Docker's 10 s); this one exits on it.
STOPPABLE = dataclasses.replace(SLEEPER, name="tb-stoppable",
                                command=("sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"))
WEB = ServiceSpec(
    name="tb-web", image=TOOLS, network_mode="host", restart="no",
    command=("sh", "-c", ("mkdir -p /www && echo ok > /www/health && "
                          "exec httpd -f -p 127.0.0.1:18080 -h /www")),
    health=HealthCheck(url="http://127.0.0.1:18080/health", expect="ok"),
)
VIEWER = ServiceSpec(name="tb-view", image=TOOLS, command=("sleep", "3600"), restart="no",
                     network_mode="none", binds=("/etc/kubernetes:/etc/kubernetes",))


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def config(testbed: Testbed) -> ClusterConfig:
    testbed.ensure()  # the standard three hosts
    return load_config(testbed.cluster_yml).config


@pytest.fixture(scope="module")
def refs(config: ClusterConfig) -> dict[str, NodeRef]:
    return {n.name: node_ref(n) for n in config.nodes}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    with Store.open(tmp_path_factory.mktemp("state") / "cluster.rkel.db") as s:
        yield s


@pytest.fixture(scope="module")
def notices() -> list[str]:
    return []


@pytest.fixture(scope="module")
def backend(config: ClusterConfig, store: Store, notices: list[str],
            refs: dict[str, NodeRef]) -> Iterator[SSHBackend]:
    """The module's one backend: every test below shares its connections."""
    pki_holder: dict[str, PKI] = {}
    b = SSHBackend(config, store, notice=notices.append,
                   tls=lambda name: pki_holder["pki"].material(name))
    b.pki_holder = pki_holder  # type: ignore[attr-defined]
    try:
        yield b
    finally:
        for ref in refs.values():
            host = b.host(ref)
            for name in ("tb-sleep", "old-tb-sleep", "tb-stoppable", "tb-web", "tb-view", "etcd"):
                host.remove_container(name)
            host.remove_paths(["/etc/kubernetes/ssl", "/var/lib/etcd"])
        b.close()


def fresh_backend(config: ClusterConfig, tmp_path: Path, **kwargs: object) -> SSHBackend:
    return SSHBackend(config, Store.open(tmp_path / "other.rkel.db"), **kwargs)  # type: ignore[arg-type]


def with_node(config: ClusterConfig, **changes: object) -> ClusterConfig:
    """The config with only its first node, changed."""
    return dataclasses.replace(config, nodes=(dataclasses.replace(config.nodes[0], **changes),))


# ---------------------------------------------------------------------------- connecting
@pytest.mark.e2e
def test_connects_as_nonroot_user_and_pins_host_keys(
    backend: SSHBackend, refs: dict[str, NodeRef], store: Store, notices: list[str],
    testbed: Testbed,
) -> None:
    for name, ref in refs.items():
        started = time.monotonic()
        host = backend.host(ref)
        elapsed = time.monotonic() - started
        assert elapsed < 3, f"connecting to {name} took {elapsed:.2f}s"
        code, out, _ = host.run_command("id -un; id -u")
        assert (code, out.split()) == (0, ["rkel", str(_uid("rkel"))])
        pinned = store.known_host(ref.address)
        assert pinned is not None and pinned.key_type == "ssh-ed25519"
        # The same fingerprint OpenSSH prints for the host's key.
        pub = testbed.state_dir / "keys" / f"host_{name}_ed25519.pub"
        keygen = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True,
                                check=True)
        assert keygen.stdout.split()[1] == pinned.fingerprint
        assert f"pinned host key of {ref.address}: {pinned.fingerprint}" in notices
    assert dict(backend.connections) == {"rkn1": 1, "rkn2": 1, "rkn3": 1}


def _uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


@pytest.mark.e2e
def test_a_changed_host_key_is_refused_with_both_fingerprints(
    config: ClusterConfig, refs: dict[str, NodeRef], tmp_path: Path
) -> None:
    first = fresh_backend(config, tmp_path)
    first.host(refs["rkn1"])
    real = first.store.known_host("10.77.0.11")
    first.close()
    assert real is not None
    other = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode().split()[1]
    other_fp = fingerprint(paramiko.Ed25519Key(data=base64.b64decode(other)))
    first.store.put_known_host("10.77.0.11", "ssh-ed25519", other, other_fp, replace=True)
    again = SSHBackend(config, first.store)
    with pytest.raises(HostError) as info:
        again.host(refs["rkn1"])
    message = str(info.value)
    assert other_fp in message and real.fingerprint in message
    assert "rkel hosts forget 10.77.0.11" in message
    assert again.connections["rkn1"] == 0
    # A pin of another key type is refused too (paramiko then negotiates the pinned type first).
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    rsa_b64 = rsa_pub.public_bytes(serialization.Encoding.OpenSSH,
                                   serialization.PublicFormat.OpenSSH).decode().split()[1]
    first.store.put_known_host("10.77.0.11", "ssh-rsa", rsa_b64, "SHA256:rsa-pin", replace=True)
    with pytest.raises(HostError, match="CHANGED"):
        SSHBackend(config, first.store).host(refs["rkn1"])


@pytest.mark.e2e
def test_unknown_host_refused_without_trust_new_hosts(
    config: ClusterConfig, refs: dict[str, NodeRef], tmp_path: Path
) -> None:
    backend = fresh_backend(config, tmp_path, trust_new_hosts=False)
    with pytest.raises(HostError, match="--trust-new-hosts") as info:
        backend.host(refs["rkn2"])
    assert "SHA256:" in str(info.value)
    assert backend.store.known_hosts() == []


@pytest.mark.e2e
@pytest.mark.parametrize(("address", "port", "why"), [
    ("10.77.0.99", 22, "10.77.0.99:22"),  # no such host
    ("10.77.0.11", 2222, "connection refused"),  # a host, but nothing on that port
])
def test_unreachable_hosts_fail_fast_and_plainly(
    config: ClusterConfig, tmp_path: Path, address: str, port: int, why: str
) -> None:
    cfg = with_node(config, address=address, port=port, hostname_override="ghost")
    backend = fresh_backend(cfg, tmp_path)
    started = time.monotonic()
    with pytest.raises(HostUnreachableError) as info:
        backend.host(node_ref(cfg.nodes[0]))
    assert time.monotonic() - started < 12
    assert why in str(info.value) and f"{address}:{port}" in str(info.value)


@pytest.mark.e2e
def test_a_wrong_key_is_an_authentication_error_naming_user_host_and_key(
    config: ClusterConfig, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong_ed25519"
    wrong.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    cfg = with_node(config, ssh_key_path=str(wrong))
    with pytest.raises(HostError) as info:
        fresh_backend(cfg, tmp_path).host(node_ref(cfg.nodes[0]))
    message = str(info.value)
    assert not isinstance(info.value, HostUnreachableError)
    assert "rkel@10.77.0.11" in message and str(wrong) in message
    assert "authorized_keys" in message


@pytest.mark.e2e
def test_inline_ssh_key_and_another_docker_socket_path(
    config: ClusterConfig, testbed: Testbed, tmp_path: Path
) -> None:
    # /run/docker.sock is where the testbed's engines listen (/var/run links to /run): a
    # non-default docker_socket makes dial-stdio use `docker -H unix://...`.
    cfg = with_node(config, ssh_key=testbed.key.read_text(), ssh_key_path="/nonexistent",
                    docker_socket="/run/docker.sock")
    backend = fresh_backend(cfg, tmp_path)
    try:
        host = backend.host(node_ref(cfg.nodes[0]))
        assert host.api.info()["Name"] == "rkn1"
        assert isinstance(host.containers(), dict)
    finally:
        backend.close()


@pytest.mark.e2e
def test_a_node_no_longer_in_cluster_yml_logs_in_like_its_peers(
    config: ClusterConfig, refs: dict[str, NodeRef], tmp_path: Path
) -> None:
    # Being removed: rkn1 is gone from the file, whose only key paths are the nodes' own.
    cfg = dataclasses.replace(config, nodes=config.nodes[1:], ssh_key_path="~/.ssh/id_rsa")
    backend = fresh_backend(cfg, tmp_path)
    try:
        assert backend.host(refs["rkn1"]).api.info()["Name"] == "rkn1"
    finally:
        backend.close()


@pytest.mark.e2e
def test_a_user_without_docker_access_is_told_to_join_the_docker_group(
    config: ClusterConfig, tmp_path: Path
) -> None:
    # A socket only root may use, standing in for a Docker socket the user may not open.
    sock = "/run/rkel-e2e-docker.sock"
    root_cfg = with_node(config, user="root")
    root = fresh_backend(root_cfg, tmp_path)
    host = root.host(node_ref(root_cfg.nodes[0]))
    make = (f"python3 -c \"import os, socket; s = socket.socket(socket.AF_UNIX); s.bind('{sock}');"
            f" os.chmod('{sock}', 0o600)\"")
    try:
        assert host.run_command(f"rm -f {sock}; {make}")[0] == 0
        cfg = with_node(config, docker_socket=sock)
        with pytest.raises(HostError) as info:
            SSHBackend(cfg, root.store).host(node_ref(cfg.nodes[0]))
        assert "usermod -aG docker rkel" in str(info.value)
        assert "user rkel cannot use the Docker socket on 10.77.0.11" in str(info.value)
    finally:
        host.run_command(f"rm -f {sock}")
        root.close()


# ---------------------------------------------------------------------------- containers
@pytest.mark.e2e
def test_container_lifecycle(backend: SSHBackend, refs: dict[str, NodeRef]) -> None:
    host = backend.host(refs["rkn1"])
    host.remove_container(SLEEPER.name)
    host.run_container(SLEEPER)
    seen = host.containers()[SLEEPER.name]
    assert (seen.image, seen.spec_hash, seen.running) == (TOOLS, SLEEPER.hash, True)
    inspect = host.api.inspect_container(SLEEPER.name)
    assert inspect["Config"]["Cmd"] == ["sleep", "3600"]
    assert not inspect["Config"]["Entrypoint"]
    assert inspect["Config"]["Labels"] == {"io.rkel.test": "yes", SPEC_HASH_LABEL: SLEEPER.hash}
    assert inspect["HostConfig"]["NetworkMode"] == "host"
    assert inspect["HostConfig"]["RestartPolicy"]["Name"] == "no"

    host.rename_container(SLEEPER.name, "old-tb-sleep")
    assert set(host.containers()) >= {"old-tb-sleep"} and SLEEPER.name not in host.containers()
    host.remove_container("old-tb-sleep")  # running: removed by force
    host.remove_container("old-tb-sleep")  # gone already: no error
    assert "old-tb-sleep" not in host.containers()
    with pytest.raises(HostError, match="No such container"):
        host.stop_container("old-tb-sleep")

    host.remove_container(STOPPABLE.name)
    host.run_container(STOPPABLE)
    host.stop_container(STOPPABLE.name)
    assert host.containers()[STOPPABLE.name].running is False
    host.start_container(STOPPABLE.name)
    assert host.containers()[STOPPABLE.name].running is True
    host.remove_container(STOPPABLE.name)
    with pytest.raises(HostError):
        host.run_container(dataclasses.replace(SLEEPER, image=f"{REGISTRY}/rkel-test/nope:1"))


@pytest.mark.e2e
def test_exec_returns_exit_code_and_output(backend: SSHBackend, refs: dict[str, NodeRef]) -> None:
    host = backend.host(refs["rkn2"])
    host.remove_container(SLEEPER.name)
    host.run_container(SLEEPER, extra_args=())
    code, out = host.exec(SLEEPER.name, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (code, out) == (3, "out\nerr\n")
    host.remove_container(SLEEPER.name)
    with pytest.raises(HostError):
        host.exec(SLEEPER.name, ["true"])


@pytest.mark.e2e
def test_put_files_root_owned_0600_as_nonroot_user(
    backend: SSHBackend, refs: dict[str, NodeRef]
) -> None:
    host = backend.host(refs["rkn3"])
    assert host.run_command("id -u")[1].strip() != "0"
    secret = b"-----BEGIN TEST-----\nnot really a key\n-----END TEST-----\n"
    started = time.monotonic()
    host.put_files({"/etc/kubernetes/ssl/test.pem": secret,
                    "/etc/kubernetes/ssl/sub/dir/other.pem": b"two"})
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"put_files took {elapsed:.2f}s"
    host.remove_container(VIEWER.name)
    host.run_container(VIEWER)
    try:
        code, out = host.exec(VIEWER.name, [
            "stat", "-c", "%u:%g %a %n", "/etc/kubernetes/ssl/test.pem",
            "/etc/kubernetes/ssl/sub/dir/other.pem", "/etc/kubernetes/ssl/sub/dir"])
        assert code == 0, out
        assert out.splitlines() == [
            "0:0 600 /etc/kubernetes/ssl/test.pem",
            "0:0 600 /etc/kubernetes/ssl/sub/dir/other.pem",
            "0:0 755 /etc/kubernetes/ssl/sub/dir",
        ]
        assert host.exec(VIEWER.name, ["cat", "/etc/kubernetes/ssl/test.pem"]) == (0, secret.decode())
        # Overwriting keeps the mode, and the user cannot read the file over plain SSH.
        host.put_files({"/etc/kubernetes/ssl/test.pem": b"new"})
        assert host.exec(VIEWER.name, ["cat", "/etc/kubernetes/ssl/test.pem"]) == (0, "new")
        assert host.run_command("cat /etc/kubernetes/ssl/test.pem")[0] != 0
        # No helper is left, and none carried the content in its command or environment.
        assert not host.api.containers(all=True, filters={"label": f"{HELPER_LABEL}=1"})

        host.put_files({"/etc/kubernetes/ssl/keep.pem": b"stays"})
        host.remove_paths(["/etc/kubernetes/ssl/sub", "/etc/kubernetes/ssl/test.pem"])
        code, out = host.exec(VIEWER.name, ["ls", "-A", "/etc/kubernetes/ssl"])
        assert code == 0 and "keep.pem" in out.split()
        assert not {"sub", "test.pem"} & set(out.split())
    finally:
        host.remove_container(VIEWER.name)
    with pytest.raises(HostError, match="absolute"):
        host.put_files({"relative/path": b"x"})


@pytest.mark.e2e
def test_leftover_helpers_are_removed_at_first_contact(
    backend: SSHBackend, config: ClusterConfig, refs: dict[str, NodeRef], tmp_path: Path
) -> None:
    api = backend.host(refs["rkn1"]).api
    api.create_container(TOOLS, ["true"], name="rkel-helper-put-deadbeef",
                         labels={HELPER_LABEL: "1"},
                         host_config=api.create_host_config(network_mode="none"))
    other = fresh_backend(config, tmp_path)
    try:
        other.host(refs["rkn1"])
        assert "rkel-helper-put-deadbeef" not in backend.host(refs["rkn1"]).containers()
    finally:
        other.close()


@pytest.mark.e2e
def test_probe_goes_through_the_tunnel(backend: SSHBackend, refs: dict[str, NodeRef]) -> None:
    host = backend.host(refs["rkn2"])
    host.remove_container(WEB.name)
    host.run_container(WEB)
    try:
        deadline = time.monotonic() + 10
        while not host.probe(WEB) and time.monotonic() < deadline:
            time.sleep(0.2)
        # httpd listens on the node's loopback only: nothing but a tunnel from the node gets in.
        assert host.probe(WEB)
        closed = HealthCheck(url="http://127.0.0.1:18081/health", expect="ok")
        assert not host.probe(dataclasses.replace(WEB, health=closed))
        missing = HealthCheck(url="http://127.0.0.1:18080/nothing-here")
        assert not host.probe(dataclasses.replace(WEB, health=missing))
        wrong = HealthCheck(url="http://127.0.0.1:18080/health", expect="healthy")
        assert not host.probe(dataclasses.replace(WEB, health=wrong))
    finally:
        host.remove_container(WEB.name)
    assert not host.probe(WEB)


# ---------------------------------------------------------------------------- etcd
@pytest.mark.e2e
def test_etcd_cluster_with_rkel_specs_and_certs(
    backend: SSHBackend, config: ClusterConfig, refs: dict[str, NodeRef], store: Store
) -> None:
    """rkel's own etcd spec and PKI: TLS members, client-cert probes, membership via etcdctl."""
    desired = compile_desired(config)
    pki = PKI(store, Fernet.generate_key())
    pki.ensure(desired)
    backend.pki_holder["pki"] = pki  # type: ignore[attr-defined]
    for node in desired.nodes:
        host = backend.host(refs[node.name])
        host.remove_container("etcd")
        host.remove_paths(["/var/lib/etcd"])
        host.put_files(pki.files_for(node.name, node.certs))
        spec = node.service("etcd")
        assert spec is not None
        host.run_container(spec, spec.bootstrap_args)
    deadline = time.monotonic() + 60
    health = {}
    while time.monotonic() < deadline:
        health = {n.name: backend.host(refs[n.name]).probe(n.service("etcd")) for n in desired.nodes}
        if all(health.values()):
            break
        time.sleep(1)
    assert all(health.values()), health
    # The probe verifies the server against the etcd CA: a wrong client cert name fails.
    spec = desired.nodes[0].service("etcd")
    assert spec is not None and spec.health is not None
    stranger = dataclasses.replace(spec.health, client_cert="kube-proxy")  # signed by kube-ca
    assert not backend.host(refs["rkn1"]).probe(dataclasses.replace(spec, health=stranger))

    etcd = backend.etcd()
    names = ["etcd-rkn1", "etcd-rkn2", "etcd-rkn3"]
    members = etcd.members()
    assert [m.name for m in members] == names
    assert all(m.started and not m.learner for m in members)
    assert members[0].peer_url == "https://10.77.0.11:2380"
    assert etcd.healthy() == dict.fromkeys(names, True)

    etcd.add_member("etcd-extra", "https://10.77.0.14:2380")
    extra = next(m for m in etcd.members() if m.name == "etcd-extra")
    assert (extra.learner, extra.started) == (True, False)
    assert etcd.healthy() == {**dict.fromkeys(names, True), "etcd-extra": False}
    with pytest.raises(HostError, match="in sync"):
        etcd.promote_member("etcd-extra")
    etcd.remove_member("etcd-extra")
    etcd.remove_member("etcd-extra")  # not a member any more: nothing to do
    assert [m.name for m in etcd.members()] == names

    # With the first member's container stopped, the next etcd host answers.
    backend.host(refs["rkn1"]).stop_container("etcd")
    try:
        assert [m.name for m in etcd.members()] == names
        assert etcd.healthy() == {"etcd-rkn1": False, "etcd-rkn2": True, "etcd-rkn3": True}
    finally:
        backend.host(refs["rkn1"]).start_container("etcd")


@pytest.mark.e2e
def test_kube_api_without_an_api_server_says_so(backend: SSHBackend) -> None:
    # No kube-apiserver runs on the testbed here: every controlplane node refuses port 6443.
    started = time.monotonic()
    with pytest.raises(HostUnreachableError, match="no API server answered") as info:
        backend.kube().node("rkn1")
    assert "https://10.77.0.11:6443" in str(info.value)
    assert time.monotonic() - started < 60


@pytest.mark.e2e
def test_every_operation_above_used_one_connection_per_host(backend: SSHBackend) -> None:
    assert dict(backend.connections) == {"rkn1": 1, "rkn2": 1, "rkn3": 1}
    assert all(isinstance(h, SSHHost) and h.alive() for h in backend._hosts.values())


@pytest.mark.e2e
def test_a_dead_connection_is_reported_then_replaced(
    config: ClusterConfig, refs: dict[str, NodeRef], tmp_path: Path
) -> None:
    """A rebooted host: operations on the old connection fail plainly, host() reconnects."""
    backend = fresh_backend(config, tmp_path)
    try:
        host = backend.host(refs["rkn3"])
        assert run_testbed("stop-host", "3").returncode == 0
        try:
            with pytest.raises(HostUnreachableError):
                host.containers()
        finally:
            assert run_testbed("start-host", "3").returncode == 0
        again = backend.host(refs["rkn3"])
        assert again is not host and isinstance(again.containers(), dict)
        assert backend.connections["rkn3"] == 2
    finally:
        backend.close()


# ---------------------------------------------------------------------------- offline
@pytest.mark.e2e  # its config comes from the testbed's cluster.yml (`up 3`)
def test_registry_credentials_and_helper_image_follow_cluster_yml(config: ClusterConfig) -> None:
    regs = (PrivateRegistry("https://registry.example.com/", "bob", "s3cret"),
            PrivateRegistry("docker.io", "alice", "pw"), PrivateRegistry("10.77.0.1:5000"))
    assert registry_auth(regs, "registry.example.com/team/app:1") == {
        "username": "bob", "password": "s3cret", "serveraddress": "registry.example.com"}
    assert registry_auth(regs, "rancher/rke-tools:v1")["username"] == "alice"  # type: ignore[index]
    assert registry_auth(regs, "10.77.0.1:5000/x:1") is None  # no user: anonymous
    assert "s3cret" not in repr(regs)
    assert helper_image(config) == TOOLS  # system_images.cert_downloader, as given
    plain = dataclasses.replace(config, system_images={})
    assert helper_image(plain).startswith(f"{REGISTRY}/rancher/rke-tools:")  # default, prefixed



KEY_KINDS = [
    ("rsa", "pem"), ("rsa", "openssh"), ("ecdsa", "pem"), ("ecdsa", "openssh"),
    ("ed25519", "openssh"),  # ed25519 has no traditional PEM form
]


def _new_key(kind: str) -> object:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


@pytest.mark.parametrize(("kind", "fmt"), KEY_KINDS)
def test_inline_keys_of_every_kind_parse(kind: str, fmt: str) -> None:
    key: Any = _new_key(kind)
    form = (serialization.PrivateFormat.OpenSSH if fmt == "openssh"
            else serialization.PrivateFormat.TraditionalOpenSSL)
    text = key.private_bytes(serialization.Encoding.PEM, form,
                             serialization.NoEncryption()).decode()
    parsed = _parse_key(text, "the test key", "node")
    want = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).split()[1].decode()
    assert parsed.get_base64() == want
    with pytest.raises(HostError, match="not a private key"):
        _parse_key("garbage", "the test key", "node")


@pytest.mark.e2e
def test_ssh_agent_auth_logs_in_with_the_agents_key(
    config: ClusterConfig, testbed: Testbed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(50):
            if sock.exists():
                break
            time.sleep(0.1)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", str(testbed.key)], env=env, check=True, capture_output=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        node = dataclasses.replace(config.nodes[0], ssh_key_path="", ssh_key="")
        cfg = dataclasses.replace(config, nodes=(node,), ssh_key_path=str(tmp_path / "none"),
                                  ssh_agent_auth=True)
        backend = fresh_backend(cfg, tmp_path)
        try:
            code, out, _ = backend.host(node_ref(node)).run_command("id -un")
            assert (code, out.strip()) == (0, "rkel")
        finally:
            backend.close()
    finally:
        agent.terminate()
        agent.wait(timeout=10)
