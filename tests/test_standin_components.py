"""The kube-controller-manager, kube-scheduler and kube-proxy stand-ins (scenarios/standins/).

Real processes on 127.0.0.1 only: Debian's etcd and the kube-apiserver stand-in (as in
tests/test_standin_apiserver.py), then each component stand-in started with the flags
`lifecycle.desired` gives it, its kubeconfig (what `PKI.files_for` writes) pointed at this
test's files and apiserver port. Health ports come from STANDIN_*_PORT.
"""

from __future__ import annotations

import http.client
import os
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lifecycle.desired_certs import SSL_DIR
from lifecycle.pki import LOCAL_SERVER
from lifecycle.pki_x509 import issue_ca, issue_leaf, load_cert, load_key
from lifecycle.spec import CertRequest
from tests.test_standin_apiserver import (
    NODE,
    PYTHON,
    STANDINS,
    ApiServer,
    Cluster,
    free_port,
    register_node,
    running_api,
    tail,
)

SCRIPTS = {"kube-controller-manager": "kube_controller_manager.py",
           "kube-scheduler": "kube_scheduler.py", "kube-proxy": "kube_proxy.py"}
PORT_ENV = {"kube-controller-manager": "STANDIN_KUBE_CONTROLLER_MANAGER_PORT",
            "kube-scheduler": "STANDIN_KUBE_SCHEDULER_PORT", "kube-proxy": "STANDIN_KUBE_PROXY_PORT"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    for tool in ("/usr/bin/etcd", "/usr/bin/etcdctl", "/usr/bin/openssl"):
        if not os.path.exists(tool):
            pytest.fail(f"{tool} is missing")
    return Cluster(tmp_path_factory.mktemp("components-pki"))


@pytest.fixture(scope="module")
def api(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with running_api(cluster, tmp_path_factory, "components") as server:
        yield server


class Component:
    """One stand-in process, stopped by its Popen handle."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], workdir: Path,
                 port: int) -> None:
        self.name, self.port = name, port
        self.log = workdir / f"{name}.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([PYTHON, "-E", "-s", str(STANDINS / SCRIPTS[name]),
                                          *args], env=env, stdout=out, stderr=subprocess.STDOUT)

    def healthz(self) -> tuple[int, str]:
        if self.name == "kube-proxy":
            conn: http.client.HTTPConnection = http.client.HTTPConnection(
                "127.0.0.1", self.port, timeout=5)
        else:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=5,
                                               context=ssl._create_unverified_context())
        try:
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        except OSError:
            return 0, ""
        finally:
            conn.close()

    def wait_health(self, code: int, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while True:
            got = self.healthz()
            if got[0] == code:
                return got[1]
            assert self.proc.poll() is None, f"{self.name} exited:\n{tail(self.log)}"
            assert time.monotonic() < deadline, f"{self.name} /healthz {got}\n{tail(self.log)}"
            time.sleep(0.2)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def kubeconfig_for(cluster: Cluster, api: ApiServer, name: str, workdir: Path,
                   cert: str | None = None) -> Path:
    """rkel's kubecfg-<name>.yaml with this test's paths and apiserver port."""
    text = (cluster.ssl / f"kubecfg-{name}.yaml").read_text()
    assert LOCAL_SERVER in text and f"{SSL_DIR}/" in text
    text = text.replace(LOCAL_SERVER, api.url).replace(f"{SSL_DIR}/", f"{cluster.ssl}/")
    if cert:  # another client certificate (for the wrong-identity test)
        text = text.replace(f"{cluster.ssl}/{name}.pem", f"{cert}.pem")
        text = text.replace(f"{cluster.ssl}/{name}-key.pem", f"{cert}-key.pem")
    path = workdir / f"kubecfg-{name}.yaml"
    path.write_text(text)
    return path


def rkel_args(cluster: Cluster, name: str, kubeconfig: Path | None) -> list[str]:
    out = []
    for arg in cluster.service(name).args:
        flag = arg.split("=", 1)[0]
        if flag in ("--kubeconfig", "--authentication-kubeconfig", "--authorization-kubeconfig"):
            if kubeconfig is None:
                continue
            arg = f"{flag}={kubeconfig}"
        out.append(arg.replace(SSL_DIR + "/", f"{cluster.ssl}/"))
    if name != "kube-proxy":
        out.append("--bind-address=127.0.0.1")
    return out


@pytest.fixture()
def start(cluster: Cluster, api: ApiServer, tmp_path: Path
          ) -> Iterator[Callable[..., Component]]:
    started: list[Component] = []

    def run(name: str, extra: tuple[str, ...] = (), env: dict[str, str] | None = None,
            cert: str | None = None, kubeconfig: bool = True) -> Component:
        port = free_port()
        path = kubeconfig_for(cluster, api, name, tmp_path, cert) if kubeconfig else None
        proc = Component(name, [*rkel_args(cluster, name, path), *extra],
                         {"PATH": "/usr/bin:/bin", PORT_ENV[name]: str(port), **(env or {})},
                         tmp_path, port)
        started.append(proc)
        return proc

    yield run
    for proc in started:
        proc.stop()


def add_node(api: ApiServer, name: str, ready: str = "True", heartbeat: str | None = None,
             spec: dict[str, Any] | None = None) -> None:
    """A node as an admin would write it (the kubelet's own cert exists for n1 only)."""
    code, _ = api.call("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                                 "metadata": {"name": name}, "spec": spec or {}})
    assert code in (201, 409)
    if spec is not None:
        assert api.call("PATCH", f"/api/v1/nodes/{name}", {"spec": spec},
                        content_type="application/merge-patch+json")[0] == 200
    beat = heartbeat or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    code, node = api.call("PATCH", f"/api/v1/nodes/{name}/status",
                          content_type="application/strategic-merge-patch+json",
                          body={"status": {"conditions": [{
                              "type": "Ready", "status": ready, "reason": "KubeletReady",
                              "lastHeartbeatTime": beat, "lastTransitionTime": beat}]}})
    assert code == 200, node


def pod(api: ApiServer, name: str, **spec: Any) -> None:
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "nginx"}], **spec}}
    code, got = api.call("POST", "/api/v1/namespaces/default/pods", body)
    assert code == 201, got


def node_of(api: ApiServer, name: str) -> str:
    code, got = api.call("GET", f"/api/v1/namespaces/default/pods/{name}")
    assert code == 200, got
    return str(got["spec"].get("nodeName") or "")


def ready_status(api: ApiServer, name: str) -> str:
    _, node = api.call("GET", f"/api/v1/nodes/{name}")
    return next(c["status"] for c in node["status"]["conditions"] if c["type"] == "Ready")


# --- health --------------------------------------------------------------------------------


def test_each_component_is_healthy_with_rkel_flags_and_exits_0_on_sigterm(
        start: Callable[..., Component]) -> None:
    procs = [start(name) for name in SCRIPTS]
    for proc in procs:
        assert proc.wait_health(200) == "ok"
    proxy = procs[2]
    assert '"Using cluster CIDR" clusterCIDR="10.42.0.0/16"' in tail(proxy.log)
    assert "self-signed certificate made by openssl" in tail(procs[1].log)
    for proc in procs:
        assert proc.stop() == 0, tail(proc.log)
        assert "received SIGTERM" in tail(proc.log)


def test_a_client_cert_from_another_pki_is_unhealthy(start: Callable[..., Component],
                                                     tmp_path: Path) -> None:
    ca = issue_ca(CertRequest("kube-ca", "kube-ca", ca="kube-ca"))
    leaf = issue_leaf(CertRequest("kube-scheduler", "system:kube-scheduler"),
                      load_cert(ca.cert_pem), load_key(ca.key_pem))
    (tmp_path / "other.pem").write_bytes(leaf.cert_pem)
    (tmp_path / "other-key.pem").write_bytes(leaf.key_pem)
    proc = start("kube-scheduler", cert=str(tmp_path / "other"))
    assert "[-]api failed" in proc.wait_health(500)
    assert "unhealthy: the API does not answer as 'system:kube-scheduler'" in tail(proc.log)


def test_the_wrong_identity_is_unhealthy(start: Callable[..., Component],
                                         cluster: Cluster) -> None:
    # kube-proxy's certificate is valid but may not bind pods: a 403-style denial.
    proc = start("kube-scheduler", cert=str(cluster.ssl / "kube-proxy"))
    assert "may not create pods" in proc.wait_health(500)


def test_an_unknown_flag_exits_1(start: Callable[..., Component]) -> None:
    for name in SCRIPTS:
        proc = start(name, extra=("--insecure-port=10251",))
        assert proc.proc.wait(timeout=15) == 1
        assert "Error: unknown flag: --insecure-port" in tail(proc.log)


def test_a_missing_kubeconfig_exits_1(start: Callable[..., Component], tmp_path: Path) -> None:
    for name in SCRIPTS:
        proc = start(name, kubeconfig=False, extra=(f"--kubeconfig={tmp_path / 'absent.yaml'}",))
        assert proc.proc.wait(timeout=15) == 1
        assert "unable to read --kubeconfig" in tail(proc.log)


# --- the scheduler -----------------------------------------------------------------------------


def test_the_scheduler_binds_to_ready_schedulable_nodes_round_robin(
        api: ApiServer, start: Callable[..., Component]) -> None:
    register_node(api)  # n1, with the kubelet's own certificate
    add_node(api, "n2")
    add_node(api, "cordoned")
    assert api.call("PATCH", "/api/v1/nodes/cordoned", {"spec": {"unschedulable": True}},
                    content_type="application/merge-patch+json")[0] == 200
    add_node(api, "tainted", spec={"taints": [{"key": "dedicated", "value": "x",
                                                "effect": "NoSchedule"}]})
    add_node(api, "down", ready="False")
    for i in range(4):
        pod(api, f"web-{i}")
    pod(api, "nowhere", nodeSelector={"disk": "ssd"})
    pod(api, "other", schedulerName="my-scheduler")
    start("kube-scheduler", env={"STANDIN_SCHEDULER_PERIOD": "0.3"}).wait_health(200)
    deadline = time.monotonic() + 15
    while not all(node_of(api, f"web-{i}") for i in range(4)):
        assert time.monotonic() < deadline, "pods were not bound"
        time.sleep(0.2)
    placed = [node_of(api, f"web-{i}") for i in range(4)]
    assert sorted(placed) == [NODE, NODE, "n2", "n2"], placed
    pod(api, "tolerant", tolerations=[{"key": "dedicated", "operator": "Exists"}])
    while not node_of(api, "tolerant"):
        assert time.monotonic() < deadline, "tolerant pod was not bound"
        time.sleep(0.2)
    assert node_of(api, "tolerant") in (NODE, "n2", "tainted")
    time.sleep(1)
    assert node_of(api, "nowhere") == "" and node_of(api, "other") == ""
    _, got = api.call("GET", "/api/v1/namespaces/default/pods/nowhere")
    cond = next(c for c in got["status"]["conditions"] if c["type"] == "PodScheduled")
    assert cond["status"] == "False" and cond["reason"] == "Unschedulable"
    assert "0/5 nodes are available" in cond["message"]
    # Cordon n2 too: new pods go to n1 only.
    assert api.call("PATCH", "/api/v1/nodes/n2", {"spec": {"unschedulable": True}},
                    content_type="application/merge-patch+json")[0] == 200
    for i in range(2):
        pod(api, f"late-{i}")
    while not all(node_of(api, f"late-{i}") for i in range(2)):
        assert time.monotonic() < deadline, "late pods were not bound"
        time.sleep(0.2)
    assert [node_of(api, f"late-{i}") for i in range(2)] == [NODE, NODE]


# --- the controller-manager ----------------------------------------------------------------


def test_the_controller_manager_marks_a_stale_node_unknown(
        api: ApiServer, start: Callable[..., Component]) -> None:
    register_node(api)
    add_node(api, "fresh")
    add_node(api, "stale", heartbeat="2020-01-01T00:00:00Z")
    proc = start("kube-controller-manager", env={"STANDIN_NODE_MONITOR_GRACE_PERIOD": "20",
                                                 "STANDIN_NODE_MONITOR_PERIOD": "0.3"})
    proc.wait_health(200)
    deadline = time.monotonic() + 10
    while ready_status(api, "stale") != "Unknown":
        assert time.monotonic() < deadline, tail(proc.log)
        time.sleep(0.2)
    _, node = api.call("GET", "/api/v1/nodes/stale")
    cond = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert cond["reason"] == "NodeStatusUnknown"
    assert cond["lastHeartbeatTime"] == "2020-01-01T00:00:00Z"
    assert ready_status(api, "fresh") == "True" and ready_status(api, NODE) == "True"
    assert 'node="stale"' in tail(proc.log)
