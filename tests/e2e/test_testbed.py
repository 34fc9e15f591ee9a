"""End-to-end checks of the local testbed (scenarios/testbed/testbed.py) on this machine.

The shared session testbed (tests/e2e/conftest.py) runs `testbed.py up 3` as CI does (root
machine) and `down` at the end of the session. The hosts are real: each has its own sshd and
Docker Engine, images come from the testbed registry.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import paramiko
import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[2]
TESTBED = ROOT / "scenarios" / "testbed" / "testbed.py"
STATE_DIR = Path(os.environ.get("RKEL_TESTBED_DIR", "/var/lib/rkel-testbed"))
KEY = STATE_DIR / "keys" / "id_ed25519"
HOSTS = {"rkn1": "10.77.0.11", "rkn2": "10.77.0.12", "rkn3": "10.77.0.13"}
REGISTRY = "10.77.0.1:5000"
ETCD_IMAGE = f"{REGISTRY}/rancher/mirrored-coreos-etcd:v3.4.23-testbed"


def run_testbed(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run testbed.py with this session's state dir."""
    cmd = [sys.executable, str(TESTBED), "--state-dir", str(STATE_DIR), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def status() -> dict:
    return json.loads(run_testbed("status", "--json").stdout)


def connect(address: str, user: str) -> paramiko.SSHClient:
    """SSH to a testbed host with the testbed key, checking its host key against known_hosts."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(STATE_DIR / "known_hosts"))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(address, username=user, key_filename=str(KEY), look_for_keys=False,
                   allow_agent=False, timeout=10)
    return client


def remote(client: paramiko.SSHClient, command: str, timeout: float = 120) -> tuple[int, str, str]:
    """Run `command` on the host: (exit status, stdout, stderr)."""
    _stdin, stdout, stderr = client.exec_command(command, timeout=timeout)
    out, err = stdout.read().decode(), stderr.read().decode()
    return stdout.channel.recv_exit_status(), out.strip(), err.strip()


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(HOSTS))
def test_ssh_as_root_and_as_rkel(testbed_up: None, name: str) -> None:
    with connect(HOSTS[name], "root") as root:
        assert remote(root, "id -u; hostname")[:2] == (0, f"0\n{name}")
    with connect(HOSTS[name], "rkel") as user:
        code, out, _ = remote(user, "id -un; id -Gn")
        assert code == 0
        assert out.splitlines()[0] == "rkel" and "docker" in out.splitlines()[1].split()


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(HOSTS))
def test_rkel_user_runs_docker_on_its_own_engine(testbed_up: None, name: str) -> None:
    with connect(HOSTS[name], "rkel") as user:
        code, out, err = remote(user, "docker info --format '{{.Name}} {{.ServerVersion}}'")
    assert code == 0, err
    engine, version = out.split()
    assert engine == name  # each host has its own Docker Engine
    assert version.startswith("20.10")


@pytest.mark.e2e
def test_registry_serves_the_images(testbed_up: None) -> None:
    with urllib.request.urlopen(f"http://{REGISTRY}/v2/_catalog", timeout=10) as resp:
        repos = set(json.load(resp)["repositories"])
    assert {"rkel-test/base", "rancher/mirrored-coreos-etcd", "rancher/rke-tools"} <= repos


@pytest.mark.e2e
def test_cluster_yml_names_the_hosts_and_registry(testbed_up: None) -> None:
    cfg = YAML(typ="safe").load((STATE_DIR / "cluster.yml").read_text())
    assert [n["address"] for n in cfg["nodes"]] == list(HOSTS.values())
    assert {n["user"] for n in cfg["nodes"]} == {"rkel"}
    assert all(n["role"] == ["controlplane", "etcd", "worker"] for n in cfg["nodes"])
    assert cfg["private_registries"] == [{"url": REGISTRY, "is_default": True}]
    assert cfg["system_images"]["etcd"] == ETCD_IMAGE
    assert Path(cfg["nodes"][0]["ssh_key_path"]) == KEY


def etcd_command(index: int) -> str:
    addr = list(HOSTS.values())[index]
    cluster = ",".join(f"etcd{i}=http://{a}:2380" for i, a in enumerate(HOSTS.values()))
    return (
        f"docker run -d --name tb-etcd --network host {ETCD_IMAGE} /usr/bin/etcd --name etcd{index}"
        f" --data-dir /tmp/etcd-data --listen-peer-urls http://{addr}:2380"
        f" --initial-advertise-peer-urls http://{addr}:2380"
        f" --listen-client-urls http://{addr}:2379,http://127.0.0.1:2379"
        f" --advertise-client-urls http://{addr}:2379 --initial-cluster {cluster}"
        " --initial-cluster-token rkel-testbed-e2e --initial-cluster-state new"
    )


@pytest.mark.e2e
def test_three_member_etcd_cluster_forms(testbed_up: None) -> None:
    endpoints = ",".join(f"http://{a}:2379" for a in HOSTS.values())
    clients = [connect(a, "rkel") for a in HOSTS.values()]
    try:
        for i, client in enumerate(clients):
            remote(client, "docker rm -f tb-etcd >/dev/null 2>&1")
            code, _out, err = remote(client, etcd_command(i))
            assert code == 0, err
        health = f"docker exec tb-etcd etcdctl --endpoints={endpoints} endpoint health"
        deadline = time.monotonic() + 60
        while (result := remote(clients[0], health))[0] != 0 and time.monotonic() < deadline:
            time.sleep(1)
        assert result[0] == 0, result
        assert (result[1] + result[2]).count("is healthy") == 3  # etcdctl reports on stderr
        members = remote(clients[1], "docker exec tb-etcd etcdctl member list")[1].splitlines()
        assert sorted(m.split(", ")[2] for m in members) == ["etcd0", "etcd1", "etcd2"]
        # The machine itself reaches the members too (the etcdctl of Debian's etcd-client).
        local = subprocess.run(["etcdctl", f"--endpoints={endpoints}", "endpoint", "health"],
                               capture_output=True, text=True, timeout=30)
        assert local.returncode == 0 and (local.stdout + local.stderr).count("is healthy") == 3
    finally:
        for client in clients:
            remote(client, "docker rm -f tb-etcd >/dev/null 2>&1")
            client.close()


@pytest.mark.e2e
def test_second_up_is_fast_and_changes_nothing(testbed_up: None) -> None:
    before = status()
    started = time.monotonic()
    res = run_testbed("up", "3")
    elapsed = time.monotonic() - started
    assert res.returncode == 0, res.stderr
    assert "reusing" in res.stderr and "all present in the registry" in res.stderr
    assert elapsed < 20, f"second up took {elapsed:.1f}s"
    after = status()
    assert after["up"] and [h["pid"] for h in after["hosts"]] == [h["pid"] for h in before["hosts"]]


def sshd_reachable(address: str) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=2) as sock:
            sock.settimeout(2)
            return sock.recv(16).startswith(b"SSH-")
    except OSError:
        return False


@pytest.mark.e2e
def test_partition_and_heal(testbed_up: None) -> None:
    assert run_testbed("partition", "3").returncode == 0
    try:
        assert not sshd_reachable(HOSTS["rkn3"])
        assert sshd_reachable(HOSTS["rkn2"])
    finally:
        assert run_testbed("heal", "3").returncode == 0
    with connect(HOSTS["rkn3"], "rkel") as user:
        assert remote(user, "docker info --format '{{.Name}}'")[:2] == (0, "rkn3")


@pytest.mark.e2e
def test_stop_and_start_host(testbed_up: None) -> None:
    assert run_testbed("stop-host", "2").returncode == 0
    row = {h["name"]: h for h in status()["hosts"]}["rkn2"]
    assert (row["sshd"], row["dockerd"], row["pid"]) == (False, False, None)
    assert not sshd_reachable(HOSTS["rkn2"])
    res = run_testbed("start-host", "2")
    assert res.returncode == 0, res.stderr
    with connect(HOSTS["rkn2"], "rkel") as user:
        assert remote(user, "docker info --format '{{.Name}}'")[:2] == (0, "rkn2")
    assert status()["up"]
