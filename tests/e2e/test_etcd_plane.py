"""rkel drives a real etcd plane on the local testbed: real sshd, Docker Engines, registry, etcd.

One story, in order, on hosts rkn1..rkn4 (10.77.0.11-14), as the non-root docker-group user
`rkel`: bring up three members; data written over TLS reads back from every member; a client
certificate from another CA is refused; a second apply changes nothing; a kill -9 while a fourth
member joins is resumed with no duplicate member; a member is removed and its data dir cleaned;
a changed SSH host key is refused until the user forgets the old one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paramiko
import pytest
from ruamel.yaml import YAML

from lifecycle.pki import PKI, load_state_key
from store import Store

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ADDRESSES = {f"rkn{i}": f"10.77.0.{10 + i}" for i in range(1, 5)}
yaml = YAML(typ="safe")


def rkel(workdir: Path, *args: str, env: dict[str, str] | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "RKEL_CRASH_AFTER_JOURNAL_WRITES"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "lifecycle", "-c", str(workdir / "cluster.yml"), *args],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


class Story:
    def __init__(self, workdir: Path, testbed: Any) -> None:
        self.workdir = workdir
        self.testbed = testbed
        base = yaml.load(testbed.cluster_yml.read_text())
        self.base = {k: base[k] for k in ("system_images", "private_registries") if k in base}
        self.key = str(testbed.key)
        self.timings: dict[str, float] = {}

    def write(self, hosts: list[str] | dict[str, list[str]], **extra: Any) -> None:
        """cluster.yml for `hosts`: a list (every role on each) or host -> roles."""
        roles = hosts if isinstance(hosts, dict) else {
            h: ["controlplane", "etcd", "worker"] for h in hosts}
        nodes = [
            {"address": ADDRESSES[h], "hostname_override": h, "user": "rkel",
             "role": r, "ssh_key_path": self.key}
            for h, r in roles.items()
        ]
        data = {"cluster_name": "e2e", "nodes": nodes, **self.base, **extra}
        with (self.workdir / "cluster.yml").open("w") as fh:
            yaml.dump(data, fh)

    def apply(self, *args: str, env: dict[str, str] | None = None,
              json_output: bool = False) -> subprocess.CompletedProcess[str]:
        output = ["-o", "json"] if json_output else []
        return rkel(self.workdir, *output, "apply", "--only", "etcd", "--only", "removals",
                    "--yes", *args, env=env)

    def ssh(self, host: str, command: str) -> str:
        client = paramiko.SSHClient()
        client.load_host_keys(str(self.testbed.state_dir / "known_hosts"))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(ADDRESSES[host], username="root", key_filename=self.key,
                       look_for_keys=False, allow_agent=False, timeout=10)
        try:
            _, out, err = client.exec_command(command, timeout=60)
            code = out.channel.recv_exit_status()
            text = out.read().decode() + err.read().decode()
            assert code == 0, f"{host}: {command}: {text}"
            return text
        finally:
            client.close()

    def started_at(self, host: str) -> str:
        return self.ssh(host, "docker inspect -f '{{.State.StartedAt}}' etcd").strip()

    def client_files(self, pki_store: Path, name: str) -> dict[str, Path]:
        """Write a client cert/key/CA from a state's PKI to files etcdctl can read (test only)."""
        with Store.open(pki_store) as store:
            material = PKI(store, load_state_key(pki_store)).material(name)
        out = {}
        for part, data in (("cert", material.cert_pem), ("key", material.key_pem),
                           ("cacert", material.ca_pem)):
            path = self.workdir / f"{pki_store.stem}-{name}-{part}.pem"
            path.write_bytes(data)
            path.chmod(0o600)
            out[part] = path
        return out

    def etcdctl(self, endpoint: str, files: dict[str, Path], *args: str,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["etcdctl", f"--endpoints=https://{endpoint}:2379", f"--cert={files['cert']}",
               f"--key={files['key']}", f"--cacert={files['cacert']}",
               "--command-timeout=10s", *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "ETCDCTL_API": "3"})
        if check:
            assert result.returncode == 0, result.stderr
        return result

    @property
    def state(self) -> Path:
        return self.workdir / "cluster.rkel.db"

    def members(self) -> list[str]:
        files = self.client_files(self.state, "kube-apiserver-etcd-client")
        out = self.etcdctl(ADDRESSES["rkn1"], files, "member", "list", "-w", "json").stdout
        return sorted(m.get("name", "") for m in json.loads(out)["members"])


@pytest.fixture(scope="module")
def story(testbed: Any, tmp_path_factory: pytest.TempPathFactory) -> Story:
    testbed.ensure(("4",))
    return Story(tmp_path_factory.mktemp("etcd-plane"), testbed)


def test_apply_brings_up_three_members(story: Story) -> None:
    story.write(["rkn1", "rkn2", "rkn3"])
    started = time.monotonic()
    result = story.apply(json_output=True)
    story.timings["apply-3"] = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["connections"] == {"rkn1": 1, "rkn2": 1, "rkn3": 1}
    assert "pinned host key of 10.77.0.11" in result.stderr
    assert story.members() == ["etcd-rkn1", "etcd-rkn2", "etcd-rkn3"]
    status = rkel(story.workdir, "status").stdout
    for host in ("rkn1", "rkn2", "rkn3"):
        assert host in status
    assert status.count("etcd                     running") == 3
    assert "10.77.0.1:5000/rancher/mirrored-coreos-etcd:v3.4.23-testbed" in status
    print(f"3-member etcd apply: {story.timings['apply-3']:.1f}s wall")


def test_private_keys_reach_nodes_root_owned_0600(story: Story) -> None:
    listing = story.ssh("rkn1", "stat -c '%U %a %n' /etc/kubernetes/ssl/*-key.pem")
    lines = [line for line in listing.splitlines() if line]
    assert lines and all(line.startswith("root 600 ") for line in lines), listing
    assert "kube-ca-key.pem" not in listing and "kube-etcd-ca-key.pem" not in listing
    env = story.ssh("rkn1", "docker inspect -f '{{json .Config.Env}} {{json .Args}}' etcd")
    assert "PRIVATE KEY" not in env


def test_data_reads_back_from_every_member(story: Story) -> None:
    files = story.client_files(story.state, "kube-apiserver-etcd-client")
    story.etcdctl(ADDRESSES["rkn1"], files, "put", "/e2e/before", "kept")
    for host in ("rkn1", "rkn2", "rkn3"):
        got = story.etcdctl(ADDRESSES[host], files, "get", "/e2e/before", "--print-value-only")
        assert got.stdout.strip() == "kept", host


def test_client_cert_from_another_ca_is_refused(story: Story) -> None:
    other = story.workdir / "other.rkel.db"
    from lifecycle.config import load_config
    from lifecycle.desired import compile_desired

    with Store.open(other) as store:
        PKI(store, load_state_key(other)).ensure(
            compile_desired(load_config(story.workdir / "cluster.yml").config)
        )
    foreign = story.client_files(other, "kube-apiserver-etcd-client")
    ours = story.client_files(story.state, "kube-apiserver-etcd-client")
    # The real server is trusted (our etcd CA); only the client certificate differs.
    assert b'"health":"true"' in health(ADDRESSES["rkn1"], ours["cert"], ours["key"], ours["cacert"])
    with pytest.raises((ssl.SSLError, ConnectionError)):
        health(ADDRESSES["rkn1"], foreign["cert"], foreign["key"], ours["cacert"])


def health(address: str, cert: Path, key: Path, ca: Path) -> bytes:
    """GET https://address:2379/health presenting `cert`; the server is checked against `ca`."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    with socket.create_connection((address, 2379), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=address) as tls:
            tls.sendall(f"GET /health HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
                        .encode())
            body = b""
            while chunk := tls.recv(65536):
                body += chunk
            return body


def test_second_apply_changes_nothing(story: Story) -> None:
    before = {h: story.started_at(h) for h in ("rkn1", "rkn2", "rkn3")}
    plan = rkel(story.workdir, "plan", "--only", "etcd")
    assert "No changes" in plan.stdout, plan.stdout
    result = story.apply()
    assert result.returncode == 0 and "No changes" in result.stdout
    assert {h: story.started_at(h) for h in ("rkn1", "rkn2", "rkn3")} == before


def test_kill_9_while_a_member_joins_then_resume(story: Story) -> None:
    story.write(["rkn1", "rkn2", "rkn3", "rkn4"])
    # writes: certs for rkn4 (intent, done), etcd-join (intent, done), start (intent) -> die
    crashed = story.apply(env={"RKEL_CRASH_AFTER_JOURNAL_WRITES": "5"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    refused = story.apply()
    assert refused.returncode == 4 and "--resume" in refused.stderr
    resumed = story.apply("--resume")
    assert resumed.returncode == 0, resumed.stderr
    members = story.members()
    assert members == ["etcd-rkn1", "etcd-rkn2", "etcd-rkn3", "etcd-rkn4"]  # no duplicate
    files = story.client_files(story.state, "kube-apiserver-etcd-client")
    got = story.etcdctl(ADDRESSES["rkn4"], files, "get", "/e2e/before", "--print-value-only")
    assert got.stdout.strip() == "kept"


def test_remove_a_member_keeps_the_data(story: Story) -> None:
    story.write(["rkn1", "rkn2", "rkn4"])
    plan = rkel(story.workdir, "plan", "--only", "etcd", "--only", "removals")
    assert "etcd members to remove: 1" in plan.stdout
    result = story.apply()
    assert result.returncode == 0, result.stderr
    assert story.members() == ["etcd-rkn1", "etcd-rkn2", "etcd-rkn4"]
    files = story.client_files(story.state, "kube-apiserver-etcd-client")
    for host in ("rkn1", "rkn2", "rkn4"):
        got = story.etcdctl(ADDRESSES[host], files, "get", "/e2e/before", "--print-value-only")
        assert got.stdout.strip() == "kept", host
    left = story.ssh("rkn3", "docker ps -a --format '{{.Names}}'; ls -A /var/lib/etcd | wc -l")
    assert "etcd" not in left.split() and left.split()[-1] == "0", left


def test_changed_host_key_is_refused(story: Story) -> None:
    db = sqlite3.connect(story.state)
    with db:
        row = db.execute("SELECT key_b64 FROM known_hosts WHERE host LIKE '10.77.0.11%'").fetchone()
        assert row, "the host key was not pinned"
        real = row[0]
        fake = paramiko.Ed25519Key.from_private_key_file(
            str(story.testbed.state_dir / "keys" / "host_rkn2_ed25519")).get_base64()
        db.execute("UPDATE known_hosts SET key_b64 = ?, fingerprint = 'SHA256:pinned-fake' "
                   "WHERE host LIKE '10.77.0.11%'", [fake])
    db.close()
    # a change that needs every member: one more flag on etcd
    story.write(["rkn1", "rkn2", "rkn4"],
                services={"etcd": {"extra_args": {"heartbeat-interval": "400"}}})
    refused = story.apply()
    assert refused.returncode != 0
    assert "10.77.0.11" in refused.stderr and "SHA256:pinned-fake" in refused.stderr
    assert "rkel hosts forget" in refused.stderr
    assert real  # the real key is what the next connection will pin again
    forgot = rkel(story.workdir, "hosts", "forget", "10.77.0.11")
    assert forgot.returncode == 0, forgot.stderr
    again = story.apply()
    assert again.returncode == 0, again.stderr
    assert story.members() == ["etcd-rkn1", "etcd-rkn2", "etcd-rkn4"]
    args = story.ssh("rkn1", "docker inspect -f '{{json .Args}}' etcd")
    assert "--heartbeat-interval=400" in args
