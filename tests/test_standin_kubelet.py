"""The kubelet stand-in (scenarios/standins/kubelet.py) against etcd and the apiserver stand-in.

Real processes on 127.0.0.1 only: Debian's etcd and the kube-apiserver stand-in as
tests/test_standin_apiserver.py runs them, with rkel's PKI. The kubelet gets the flags
`lifecycle.desired` computes for a node (labels, taints and an internal address in cluster.yml),
its certificate paths pointed at the test's ssl dir, and the kubecfg-kube-node.yaml that
`PKI.files_for` delivers, its server pointed at the stand-in.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lifecycle.config.model import ClusterConfig, Node, Taint
from lifecycle.desired import compile_desired
from lifecycle.desired_certs import SSL_DIR
from lifecycle.pki import LOCAL_SERVER
from tests.test_standin_apiserver import (
    NODE,
    PYTHON,
    STANDINS,
    ApiServer,
    Cluster,
    free_port,
    running_api,
    tail,
)

KUBELET = STANDINS / "kubelet.py"
HEARTBEAT = 0.5


def rkel_kubelet_args() -> tuple[str, list[str]]:
    """rkel's kubelet image and flags for node NODE, with labels, taints and an internal IP."""
    config = ClusterConfig(nodes=(Node(
        address="127.0.0.1", internal_address="127.0.0.2", user="u", hostname_override=NODE,
        role=("etcd", "controlplane"), labels={"tier": "web"},
        taints=(Taint("dedicated", "db", "NoExecute"),)),))
    spec = compile_desired(config).nodes[0].service("kubelet")
    assert spec is not None
    return spec.image, list(spec.args)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    return Cluster(tmp_path_factory.mktemp("kubelet-pki"))


@pytest.fixture(scope="module")
def api(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with running_api(cluster, tmp_path_factory, "kubelet") as server:
        yield server


class Kubelet:
    def __init__(self, args: list[str], env: dict[str, str], log: Path, healthz: int) -> None:
        self.log, self.healthz = log, healthz
        with log.open("ab") as out:
            self.proc = subprocess.Popen([PYTHON, "-E", "-s", str(KUBELET), *args], env=env,
                                         stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture
def start(cluster: Cluster, api: ApiServer, tmp_path: Path
          ) -> Iterator[Callable[..., Kubelet]]:
    """Start the stand-in with rkel's flags (paths adapted), the node's kubeconfig pointing at
    the apiserver stand-in; `extra` flags are appended, `cert` swaps the identity."""
    started: list[Kubelet] = []

    def run(extra: tuple[str, ...] = (), cert: str = f"kube-node-{NODE}",
            kubeconfig: Path | None = None, hostname: str = NODE,
            **more_env: str) -> Kubelet:
        image, args = rkel_kubelet_args()
        text = (cluster.ssl / "kubecfg-kube-node.yaml").read_text()
        text = text.replace(LOCAL_SERVER, api.url).replace(f"kube-node-{NODE}", cert)
        own = tmp_path / f"kubecfg-{len(started)}.yaml"
        own.write_text(text.replace(SSL_DIR + "/", f"{cluster.ssl}/"))
        flags = []
        for arg in args:
            if arg.startswith("--kubeconfig="):
                arg = f"--kubeconfig={kubeconfig or own}"
            elif arg.startswith("--hostname-override="):
                arg = f"--hostname-override={hostname}"
            flags.append(arg.replace(SSL_DIR + "/", f"{cluster.ssl}/"))
        healthz = free_port()
        env = {"PATH": "/usr/bin:/bin", "RKEL_IMAGE": image,
               "STANDIN_HEARTBEAT_SECONDS": str(HEARTBEAT), "STANDIN_POD_POLL_SECONDS": "0.5",
               "STANDIN_HEALTHZ_PORT": str(healthz), **more_env}
        kubelet = Kubelet([*flags, *extra], env, tmp_path / f"kubelet-{len(started)}.log",
                          healthz)
        started.append(kubelet)
        return kubelet

    yield run
    for kubelet in started:
        kubelet.stop()


def wait_until(what: Callable[[], Any], kubelet: Kubelet, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out:\n{tail(kubelet.log)}"
        time.sleep(0.1)


def ready(api: ApiServer, name: str = NODE) -> str:
    code, node = api.call("GET", f"/api/v1/nodes/{name}")
    if code != 200:
        return ""
    cond = [c for c in node.get("status", {}).get("conditions", []) if c["type"] == "Ready"]
    return f"{cond[0]['status']}/{cond[0]['reason']}" if cond else ""


def test_registers_the_node_from_its_flags_and_reports_ready(start: Callable[..., Kubelet],
                                                             api: ApiServer) -> None:
    kubelet = start()
    wait_until(lambda: ready(api) == "True/KubeletReady", kubelet)
    _, node = api.call("GET", f"/api/v1/nodes/{NODE}")
    labels = node["metadata"]["labels"]
    assert labels["tier"] == "web" and labels["kubernetes.io/hostname"] == NODE
    assert labels["kubernetes.io/os"] == "linux"
    taints = {(t["key"], t.get("value"), t["effect"]) for t in node["spec"]["taints"]}
    assert taints == {("dedicated", "db", "NoExecute"),
                      ("node-role.kubernetes.io/controlplane", "true", "NoSchedule")}
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.30.5" and info["operatingSystem"] == "linux"
    for field in ("machineID", "systemUUID", "bootID", "kernelVersion", "osImage",
                  "containerRuntimeVersion", "kubeProxyVersion", "architecture"):
        assert isinstance(info[field], str) and info[field], field
    assert info["containerRuntimeVersion"].startswith("docker://")  # cri-dockerd endpoint
    addresses = {(a["type"], a["address"]) for a in node["status"]["addresses"]}
    assert addresses == {("InternalIP", "127.0.0.2"), ("Hostname", NODE)}
    first = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    time.sleep(HEARTBEAT * 3)  # the heartbeat moves lastHeartbeatTime on
    _, later = api.call("GET", f"/api/v1/nodes/{NODE}")
    beat = next(c for c in later["status"]["conditions"] if c["type"] == "Ready")
    assert beat["status"] == "True" and beat["lastHeartbeatTime"] >= first["lastHeartbeatTime"]
    with urllib.request.urlopen(f"http://127.0.0.1:{kubelet.healthz}/healthz", timeout=5) as r:
        assert (r.status, r.read()) == (200, b"ok")


def test_sigterm_reports_not_ready_and_exits_zero(start: Callable[..., Kubelet],
                                                  api: ApiServer) -> None:
    kubelet = start()
    wait_until(lambda: "registered" in tail(kubelet.log), kubelet)
    wait_until(lambda: ready(api) == "True/KubeletReady", kubelet)
    assert kubelet.stop() == 0, tail(kubelet.log)
    assert ready(api) == "False/KubeletStopped"


def test_a_pending_pod_bound_to_the_node_becomes_running(start: Callable[..., Kubelet],
                                                         api: ApiServer) -> None:
    kubelet = start()
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1"},
           "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "nginx"}]}}
    code, created = api.call("POST", "/api/v1/namespaces/default/pods", pod)
    assert code == 201, created

    def running() -> Any:
        _, got = api.call("GET", "/api/v1/namespaces/default/pods/web-1")
        return got if got.get("status", {}).get("phase") == "Running" else None

    got = wait_until(running, kubelet)
    conditions = {c["type"]: c["status"] for c in got["status"]["conditions"]}
    assert conditions["Ready"] == "True" and got["status"]["hostIP"] == "127.0.0.2"
    assert got["status"]["containerStatuses"][0]["ready"] is True
    assert api.call("DELETE", "/api/v1/namespaces/default/pods/web-1")[0] == 200


def test_another_nodes_identity_is_refused_and_retried(start: Callable[..., Kubelet],
                                                       api: ApiServer) -> None:
    kubelet = start(hostname="n2")  # with kube-node-n1's certificate
    wait_until(lambda: tail(kubelet.log, 20000).count("Unable to register node") >= 2, kubelet)
    text = tail(kubelet.log, 20000)
    assert "403" in text and 'node "n1" is not allowed to modify node "n2"' in text, text
    assert kubelet.proc.poll() is None
    assert api.call("GET", "/api/v1/nodes/n2")[0] == 404
    with urllib.request.urlopen(f"http://127.0.0.1:{kubelet.healthz}/healthz", timeout=5) as r:
        assert r.read() == b"ok"  # like the real one: healthy while the API refuses it


def healthz_answers(kubelet: Kubelet) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{kubelet.healthz}/healthz", timeout=2) as r:
            return r.read() == b"ok"
    except OSError:
        return False


def test_a_slow_start_answers_healthz_only_after_its_delay_and_stops_at_once_meanwhile(
        start: Callable[..., Kubelet], api: ApiServer) -> None:
    slow = start(STANDIN_HEALTHZ_DELAY_SECONDS="2.5")
    started = time.monotonic()
    wait_until(lambda: healthz_answers(slow), slow)
    assert time.monotonic() - started >= 2.0  # refused until then
    assert slow.stop() == 0
    never = start(STANDIN_HEALTHZ_DELAY_SECONDS="600")
    wait_until(lambda: "kubelet stand-in starting" in tail(never.log), never)
    assert not healthz_answers(never)
    stopping = time.monotonic()
    assert never.stop() == 0 and time.monotonic() - stopping < 10


def test_an_unreachable_apiserver_is_retried_while_healthz_is_ok(
        start: Callable[..., Kubelet], cluster: Cluster, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "nowhere.yaml"
    text = (cluster.ssl / "kubecfg-kube-node.yaml").read_text()
    kubeconfig.write_text(text.replace(LOCAL_SERVER, f"https://127.0.0.1:{free_port()}")
                          .replace(SSL_DIR + "/", f"{cluster.ssl}/"))
    kubelet = start(kubeconfig=kubeconfig)
    wait_until(lambda: tail(kubelet.log).count("will retry") >= 2, kubelet)
    with urllib.request.urlopen(f"http://127.0.0.1:{kubelet.healthz}/healthz", timeout=5) as r:
        assert r.read() == b"ok"
    assert kubelet.stop() == 0


def test_missing_kubeconfig_or_cert_or_unknown_flag_exit_one(start: Callable[..., Kubelet],
                                                             tmp_path: Path,
                                                             cluster: Cluster) -> None:
    missing = start(kubeconfig=tmp_path / "absent.yaml")
    assert missing.proc.wait(timeout=15) == 1
    assert "invalid kubeconfig" in tail(missing.log) and "absent.yaml" in tail(missing.log)
    no_cert = start(cert="kube-node-nobody")
    assert no_cert.proc.wait(timeout=15) == 1
    assert "unable to read client-certificate" in tail(no_cert.log)
    unknown = start(extra=("--network-plugin=cni",))  # removed from the kubelet in 1.24
    assert unknown.proc.wait(timeout=15) == 1
    assert "Error: unknown flag: --network-plugin" in tail(unknown.log)
