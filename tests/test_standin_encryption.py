"""Encryption at rest in the kube-apiserver stand-in: pure-Python AES against the standard test
vectors, and `--encryption-provider-config` against a real etcd.

The stored bytes are checked by reading etcd directly (etcdctl) and decrypting them with the
`cryptography` package, as the layout real Kubernetes uses:
`k8s:enc:aescbc:v1:<key name>:` + 16-byte IV + AES-CBC ciphertext with PKCS#7 padding.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tests.test_standin_apiserver import (  # noqa: F401  (cluster, etcd: module fixtures)
    STANDINS,
    ApiServer,
    Cluster,
    Etcd,
    cluster,
    etcd,
    free_port,
    run_standin,
    standin_args,
    tail,
)

sys.path.insert(0, str(STANDINS))
from aes import AES, PaddingError, cbc_decrypt, cbc_encrypt  # noqa: E402

# --- AES: FIPS-197 appendix C, NIST SP 800-38A F.2 -------------------------------------------

PLAIN = bytes.fromhex("00112233445566778899aabbccddeeff")


@pytest.mark.parametrize("key, cipher", [
    ("000102030405060708090a0b0c0d0e0f", "69c4e0d86a7b0430d8cdb78070b4c55a"),
    ("000102030405060708090a0b0c0d0e0f1011121314151617", "dda97ca4864cdfe06eaf70a0ec0d7191"),
    ("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
     "8ea2b7ca516745bfeafc49904b496089"),
])
def test_fips_197_block_vectors(key: str, cipher: str) -> None:
    aes = AES(bytes.fromhex(key))
    assert aes.encrypt_block(PLAIN).hex() == cipher
    assert aes.decrypt_block(bytes.fromhex(cipher)) == PLAIN


SP800_PLAIN = bytes.fromhex(
    "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710")
IV = bytes(range(16))


@pytest.mark.parametrize("key, cipher", [
    ("2b7e151628aed2a6abf7158809cf4f3c",
     "7649abac8119b246cee98e9b12e9197d5086cb9b507219ee95db113a917678b2"
     "73bed6b8e3c1743b7116e69e222295163ff1caa1681fac09120eca307586e1a7"),
    ("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
     "f58c4c04d6e5f1ba779eabfb5f7bfbd69cfc4e967edb808d679f777bc6702c7d"
     "39f23369a9d9bacfa530e26304231461b2eb05e2c39be9fcda6c19078c6a9d1b"),
])
def test_sp800_38a_cbc_vectors(key: str, cipher: str) -> None:
    aes = AES(bytes.fromhex(key))
    assert cbc_encrypt(aes, IV, SP800_PLAIN, pad=False).hex() == cipher
    assert cbc_decrypt(aes, IV, bytes.fromhex(cipher), pad=False) == SP800_PLAIN


def _reference_encrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return enc.update(padder.update(data) + padder.finalize()) + enc.finalize()


def _reference_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    return unpadder.update(dec.update(data) + dec.finalize()) + unpadder.finalize()


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 100, 1000])
def test_cbc_with_padding_matches_the_cryptography_package(size: int) -> None:
    key, iv, data = os.urandom(32), os.urandom(16), os.urandom(size)
    ours = cbc_encrypt(AES(key), iv, data)
    assert ours == _reference_encrypt(key, iv, data)
    assert cbc_decrypt(AES(key), iv, ours) == data


def test_a_wrong_key_fails_on_the_padding_not_with_garbage() -> None:
    iv = os.urandom(16)
    data = cbc_encrypt(AES(os.urandom(32)), iv, b"x" * 40)
    failures = 0
    for _ in range(20):  # a random key yields valid padding by chance about 1 time in 256
        try:
            cbc_decrypt(AES(os.urandom(32)), iv, data)
        except PaddingError:
            failures += 1
    assert failures >= 15


# --- the stand-in with --encryption-provider-config -----------------------------------------

K1, K2 = os.urandom(32), os.urandom(32)


def _config(path: Path, keys: list[tuple[str, bytes]], identity: bool = True,
            identity_first: bool = False) -> Path:
    """An EncryptionConfiguration in RKE's block YAML."""
    lines = ["apiVersion: apiserver.config.k8s.io/v1", "kind: EncryptionConfiguration",
             "resources:", "- resources:", "  - secrets", "  providers:"]
    if identity_first:
        lines.append("  - identity: {}")
    if keys:
        lines += ["  - aescbc:", "      keys:"]
        for name, key in keys:
            lines += [f"      - name: {name}",
                      f"        secret: {base64.b64encode(key).decode()}"]
    if identity and not identity_first:
        lines.append("  - identity: {}")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


class Server:
    """The stand-in started with an encryption config; restarted with another one."""

    def __init__(self, cluster: Cluster, etcd: Etcd, workdir: Path) -> None:
        self.cluster, self.etcd, self.workdir = cluster, etcd, workdir
        self.api: ApiServer | None = None

    def start(self, config: Path) -> ApiServer:
        self.stop()
        api = ApiServer.__new__(ApiServer)
        api.cluster = self.cluster
        api.port = free_port()
        api.url = f"https://127.0.0.1:{api.port}"
        api.log = self.workdir / f"apiserver-{config.stem}.log"
        api.image = self.cluster.service("kube-apiserver").image
        api.env = {"PATH": "/usr/bin:/bin", "RKEL_IMAGE": api.image}
        args = standin_args(self.cluster, self.etcd.endpoint, api.port)
        api.proc = run_standin(args + [f"--encryption-provider-config={config}"], api.env,
                               api.log)
        api.wait_for("/readyz", 200)
        self.api = api
        return api

    def stop(self) -> None:
        if self.api is not None:
            self.api.stop()
            self.api = None


@pytest.fixture
def server(cluster: Cluster, etcd: Etcd, tmp_path: Path) -> Iterator[Server]:
    s = Server(cluster, etcd, tmp_path)
    try:
        yield s
    finally:
        s.stop()


def raw(etcd: Etcd, key: str) -> bytes:
    got = etcd.etcdctl("get", key, "-w", "json")
    assert got.returncode == 0, got.stderr
    kvs = json.loads(got.stdout).get("kvs") or []
    assert kvs, f"{key} is not in etcd"
    return base64.b64decode(kvs[0]["value"])


def secret(name: str, value: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "data": {"password": base64.b64encode(value.encode()).decode()}}


def read_back(api: ApiServer, name: str) -> str:
    code, got = api.call("GET", f"/api/v1/namespaces/default/secrets/{name}")
    assert code == 200, got
    return base64.b64decode(got["data"]["password"]).decode()


def decrypt_as_kubernetes(value: bytes, keys: dict[str, bytes]) -> dict[str, Any]:
    prefix = b"k8s:enc:aescbc:v1:"
    assert value.startswith(prefix), value[:40]
    name, _, rest = value[len(prefix):].partition(b":")
    plain = _reference_decrypt(keys[name.decode()], rest[:16], rest[16:])
    return json.loads(plain)  # type: ignore[no-any-return]


def test_secrets_are_stored_aescbc_encrypted_and_read_back(server: Server, etcd: Etcd,
                                                           tmp_path: Path) -> None:
    api = server.start(_config(tmp_path / "one.yaml", [("key-1", K1)]))
    code, body = api.call("POST", "/api/v1/namespaces/default/secrets",
                          secret("enc-a", "hunter2-plaintext"))
    assert code == 201, body
    stored = raw(etcd, "/registry/secrets/default/enc-a")
    assert stored.startswith(b"k8s:enc:aescbc:v1:key-1:")
    assert b"hunter2" not in stored and base64.b64encode(b"hunter2-plaintext") not in stored
    assert decrypt_as_kubernetes(stored, {"key-1": K1})["metadata"]["name"] == "enc-a"
    assert read_back(api, "enc-a") == "hunter2-plaintext"
    # other resources stay as they were: the config names secrets only
    code, _ = api.call("POST", "/api/v1/namespaces/default/configmaps",
                       {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "enc-cm"},
                        "data": {"k": "visible"}})
    assert code == 201
    assert b"visible" in raw(etcd, "/registry/configmaps/default/enc-cm")
    code, listed = api.call("GET", "/api/v1/secrets")
    assert code == 200 and "enc-a" in {i["metadata"]["name"] for i in listed["items"]}


def test_a_rotation_reads_old_writes_new_then_drops_the_old_key(server: Server, etcd: Etcd,
                                                              tmp_path: Path) -> None:
    api = server.start(_config(tmp_path / "old.yaml", [("key-1", K1)]))
    assert api.call("POST", "/api/v1/namespaces/default/secrets", secret("rot", "s3cr3t"))[0] \
        == 201
    key = "/registry/secrets/default/rot"
    assert raw(etcd, key).startswith(b"k8s:enc:aescbc:v1:key-1:")
    # stage 1: new key first, old key kept: old data still reads
    api = server.start(_config(tmp_path / "both.yaml", [("key-2", K2), ("key-1", K1)]))
    assert read_back(api, "rot") == "s3cr3t"
    # stage 2: a replace stores it again, under the new key
    code, obj = api.call("GET", "/api/v1/namespaces/default/secrets/rot")
    code, _ = api.call("PUT", "/api/v1/namespaces/default/secrets/rot", obj)
    assert code == 200
    stored = raw(etcd, key)
    assert stored.startswith(b"k8s:enc:aescbc:v1:key-2:")
    assert decrypt_as_kubernetes(stored, {"key-2": K2})["metadata"]["name"] == "rot"
    # stage 3: old key dropped: still readable
    api = server.start(_config(tmp_path / "new.yaml", [("key-2", K2)]))
    assert read_back(api, "rot") == "s3cr3t"
    # a server without the key cannot read it, and says so
    api = server.start(_config(tmp_path / "other.yaml", [("key-9", os.urandom(32))]))
    code, body = api.call("GET", "/api/v1/namespaces/default/secrets/rot")
    assert code == 500 and "no matching key" in json.dumps(body)


def test_plain_secrets_from_before_read_and_identity_first_writes_plain(
        server: Server, etcd: Etcd, tmp_path: Path) -> None:
    api = server.start(_config(tmp_path / "plain.yaml", [], identity=True))
    assert api.call("POST", "/api/v1/namespaces/default/secrets", secret("pl", "clear"))[0] == 201
    assert raw(etcd, "/registry/secrets/default/pl").startswith(b"{")
    api = server.start(_config(tmp_path / "enc.yaml", [("key-1", K1)]))
    assert read_back(api, "pl") == "clear"  # identity reads what was stored in clear
    api = server.start(_config(tmp_path / "idfirst.yaml", [("key-1", K1)], identity_first=True))
    assert api.call("POST", "/api/v1/namespaces/default/secrets", secret("pl2", "c2"))[0] == 201
    assert raw(etcd, "/registry/secrets/default/pl2").startswith(b"{")


@pytest.mark.parametrize("text, message", [
    ("kind: Pod\napiVersion: v1\n", "not an EncryptionConfiguration"),
    ("apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n"
     "- resources:\n  - secrets\n  providers:\n  - aesgcm:\n      keys:\n      - name: k\n"
     "        secret: AAAA\n", "provider 'aesgcm' is not supported"),
    ("apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n"
     "- resources:\n  - secrets\n  providers:\n  - aescbc:\n      keys:\n      - name: k\n"
     "        secret: c2hvcnQ=\n", "aescbc keys are 16, 24 or 32 bytes"),
])
def test_a_bad_config_exits_non_zero_naming_the_problem(cluster: Cluster, etcd: Etcd,
                                                        tmp_path: Path, text: str,
                                                        message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    log = tmp_path / "bad.log"
    args = standin_args(cluster, etcd.endpoint, free_port())
    proc = run_standin(args + [f"--encryption-provider-config={path}"],
                       {"PATH": "/usr/bin:/bin"}, log)
    assert proc.wait(timeout=30) == 1
    assert message in tail(log)


def test_rkels_rewrite_of_every_secret_encrypts_the_ones_stored_in_clear(
        server: Server, etcd: Etcd, tmp_path: Path) -> None:
    from lifecycle.hosts.kube import KubernetesAPI
    from lifecycle.pki import PKI
    from store import Store

    api = server.start(_config(tmp_path / "clear.yaml", [], identity=True))
    for i in range(7):
        assert api.call("POST", "/api/v1/namespaces/default/secrets",
                        secret(f"rw-{i}", f"clear-{i}"))[0] == 201
    assert raw(etcd, "/registry/secrets/default/rw-0").startswith(b"{")
    # key-2 too: the module's etcd holds the other tests' Secrets, some stored under it
    api = server.start(_config(tmp_path / "on.yaml", [("key-1", K1), ("key-2", K2)]))
    with Store.open(api.cluster.state) as store:
        admin = PKI(store, api.cluster.key).material("kube-admin")
    kube = KubernetesAPI([api.url], admin, sleep=lambda s: None, timeout=5)
    count = kube.rewrite_secrets()
    assert count >= 7  # every Secret, the other tests' ones too
    for i in range(7):
        stored = raw(etcd, f"/registry/secrets/default/rw-{i}")
        assert stored.startswith(b"k8s:enc:aescbc:v1:key-1:") and b"clear-" not in stored
        assert read_back(api, f"rw-{i}") == f"clear-{i}"


def test_kubectl_create_secret_is_encrypted_and_reads_back(server: Server, etcd: Etcd,
                                                           tmp_path: Path) -> None:
    import subprocess

    api = server.start(_config(tmp_path / "kubectl.yaml", [("key-1", K1), ("key-2", K2)]))
    kubeconfig = tmp_path / "admin.yaml"
    kubeconfig.write_text(api.cluster.admin_kubeconfig(api.url, "standin"))

    def kubectl(*args: str) -> str:
        done = subprocess.run(["/usr/bin/kubectl", "--kubeconfig", str(kubeconfig), *args],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    kubectl("create", "secret", "generic", "by-kubectl", "-n", "default",
            "--from-literal=password=kubectl-plaintext-1")
    stored = raw(etcd, "/registry/secrets/default/by-kubectl")
    assert stored.startswith(b"k8s:enc:aescbc:v1:key-1:") and b"kubectl-plaintext" not in stored
    got = json.loads(kubectl("get", "secret", "by-kubectl", "-n", "default", "-o", "json"))
    assert base64.b64decode(got["data"]["password"]) == b"kubectl-plaintext-1"
