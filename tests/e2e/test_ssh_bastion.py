"""The SSH backend through a bastion: hosts on 10.78.0.0/24 that this machine has no route to,
reached only by direct-tcpip channels over one SSH connection to the bastion 10.77.0.10.

A different testbed shape (`up 2 --bastion`): the shared session testbed switches to it for this
module and back to the standard three hosts for the modules after it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BASTION, STANDARD, Testbed

from lifecycle.config.loader import load_config
from lifecycle.config.model import ClusterConfig
from lifecycle.hosts.ssh import SSHBackend, node_ref
from lifecycle.spec import HealthCheck, ServiceSpec
from store import Store

BASTION_ADDRESS = "10.77.0.10"
PRIVATE = {"rkn1": "10.78.0.11", "rkn2": "10.78.0.12"}


@pytest.fixture(scope="module")
def bastion_config(testbed: Testbed) -> Iterator[ClusterConfig]:
    testbed.ensure(BASTION)
    try:
        yield load_config(testbed.cluster_yml).config
    finally:
        testbed.ensure(STANDARD)


def no_direct_route(address: str) -> bool:
    try:
        socket.create_connection((address, 22), timeout=2).close()
    except OSError:
        return True
    return False


@pytest.mark.e2e
def test_private_hosts_only_through_the_bastion(bastion_config: ClusterConfig,
                                                tmp_path: Path) -> None:
    assert bastion_config.bastion_host is not None
    assert bastion_config.bastion_host.address == BASTION_ADDRESS
    assert [n.address for n in bastion_config.nodes] == list(PRIVATE.values())
    assert all(no_direct_route(a) for a in PRIVATE.values())

    notices: list[str] = []
    with Store.open(tmp_path / "cluster.rkel.db") as store:
        backend = SSHBackend(bastion_config, store, notice=notices.append)
        try:
            for node in bastion_config.nodes:
                started = time.monotonic()
                host = backend.host(node_ref(node))
                assert time.monotonic() - started < 5
                assert host.containers() is not None
                assert host.api.info()["Name"] == node.name  # that host's own Docker Engine
            registry = bastion_config.private_registries[0].url
            web = ServiceSpec(
                name="tb-web", image=f"{registry}/rancher/rke-tools:testbed", restart="no",
                command=("sh", "-c", ("mkdir -p /www && echo ok > /www/health && "
                                      "exec httpd -f -p 127.0.0.1:18080 -h /www")),
                health=HealthCheck(url="http://127.0.0.1:18080/health", expect="ok"),
            )
            host = backend.host(node_ref(bastion_config.nodes[0]))
            host.remove_container(web.name)
            host.run_container(web)  # pulled from the bastion's registry address
            try:
                deadline = time.monotonic() + 10
                while not host.probe(web) and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert host.probe(web)  # a tunnel from the node, inside the bastion's tunnel
            finally:
                host.remove_container(web.name)
            host.put_files({"/etc/kubernetes/ssl/bastion-test.pem": b"x"})
            host.remove_paths(["/etc/kubernetes/ssl/bastion-test.pem"])
            # One connection to the bastion carries both hosts; each host has one of its own.
            assert dict(backend.connections) == {BASTION_ADDRESS: 1, "rkn1": 1, "rkn2": 1}
            pinned = {row.host for row in store.known_hosts()}
            assert pinned == {BASTION_ADDRESS, *PRIVATE.values()}
            assert len(notices) == 3
        finally:
            backend.close()


@pytest.mark.e2e
def test_rkel_apply_through_the_bastion(bastion_config: ClusterConfig, testbed: Testbed,
                                        tmp_path: Path) -> None:
    """The whole command, not just the backend: two etcd members on hosts only the bastion
    reaches, health-checked through the tunnelled connections."""
    import shutil
    import subprocess
    import sys

    cluster = tmp_path / "cluster.yml"
    shutil.copy(testbed.cluster_yml, cluster)
    root = Path(__file__).resolve().parents[2]
    run = [sys.executable, "-m", "lifecycle", "-c", str(cluster)]
    applied = subprocess.run([*run, "apply", "--only", "etcd", "--yes"], cwd=root,
                             capture_output=True, text=True, timeout=600)
    assert applied.returncode == 0, applied.stderr
    assert f"pinned host key of {BASTION_ADDRESS}" in applied.stderr
    status = subprocess.run([*run, "status"], cwd=root, capture_output=True, text=True,
                            timeout=60).stdout
    assert status.count("etcd                     running") == 2, status
    for address in PRIVATE.values():
        assert address in status
