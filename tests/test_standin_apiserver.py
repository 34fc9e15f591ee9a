"""The kube-apiserver stand-in (scenarios/standins/) against a real etcd, with rkel's own PKI.

Real processes on 127.0.0.1 only: Debian's etcd with TLS and client-certificate auth (the
member certificate rkel generates for a node at 127.0.0.1), and the stand-in started with the
exact flags `lifecycle.desired` gives kube-apiserver on that node, its certificate paths
pointed at the files `PKI.files_for` delivers. Clients are kubectl and plain TLS connections
presenting rkel's certificates (kube-admin, the kubelet's kube-node-<name>).
"""

from __future__ import annotations

import ast
import contextlib
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from lifecycle.config.model import ClusterConfig, Node
from lifecycle.desired import compile_desired
from lifecycle.desired_certs import SSL_DIR
from lifecycle.pki import PKI
from lifecycle.pki_x509 import issue_ca, issue_leaf, load_cert, load_key
from lifecycle.spec import CertRequest, ServiceSpec
from store import Store

ROOT = Path(__file__).resolve().parents[1]
STANDINS = ROOT / "scenarios" / "standins"
STANDIN = STANDINS / "kube_apiserver.py"
# The stand-in's image has Debian's python3.11 and nothing else; run it with that interpreter.
PYTHON = "/usr/bin/python3.11" if Path("/usr/bin/python3.11").exists() else sys.executable
NODE = "n1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, size: int = 3000) -> str:
    return path.read_text(errors="replace")[-size:] if path.exists() else ""


class Cluster:
    """rkel's desired state and PKI for one node with every role at 127.0.0.1, as files."""

    def __init__(self, workdir: Path) -> None:
        config = ClusterConfig(nodes=(Node(address="127.0.0.1", user="u", hostname_override=NODE,
                                           role=("etcd", "controlplane", "worker")),))
        self.desired = compile_desired(config)
        self.node = self.desired.nodes[0]
        self.ssl = workdir / "ssl"
        self.ssl.mkdir()
        self.state, self.key = workdir / "cluster.rkel.db", Fernet.generate_key()
        with Store.open(self.state) as store:
            pki = PKI(store, self.key)
            pki.ensure(self.desired)
            for path, data in pki.files_for(self.node.name, list(self.node.certs)).items():
                self.write(path.removeprefix(SSL_DIR + "/"), data)
            admin = pki.material("kube-admin")
            self.write("kube-admin.pem", admin.cert_pem)
            self.write("kube-admin-key.pem", admin.key_pem)

    def admin_kubeconfig(self, server: str, cluster_name: str) -> str:
        """What rkel writes beside cluster.yml (PKI.admin_kubeconfig)."""
        with Store.open(self.state) as store:
            return PKI(store, self.key).admin_kubeconfig(server, cluster_name)

    def write(self, name: str, data: bytes) -> Path:
        path = self.ssl / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def service(self, name: str) -> ServiceSpec:
        spec = self.node.service(name)
        assert spec is not None
        return spec


class Etcd:
    """Debian's etcd on free loopback ports, TLS with client-cert auth, as rkel configures it."""

    def __init__(self, cluster: Cluster, workdir: Path) -> None:
        self.ssl = cluster.ssl
        self.client_port, self.peer_port = free_port(), free_port()
        self.endpoint = f"https://127.0.0.1:{self.client_port}"
        self.data = workdir / "etcd-data"
        self.log = workdir / "etcd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        member = "kube-etcd-127-0-0-1"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([
                "/usr/bin/etcd", "--name=standin-test", f"--data-dir={self.data}",
                f"--listen-client-urls={self.endpoint}",
                f"--advertise-client-urls={self.endpoint}",
                f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=standin-test={peer}",
                f"--cert-file={self.ssl / f'{member}.pem'}",
                f"--key-file={self.ssl / f'{member}-key.pem'}",
                "--client-cert-auth", f"--trusted-ca-file={self.ssl / 'kube-etcd-ca.pem'}",
            ], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while self.etcdctl("endpoint", "health").returncode != 0:
            assert self.proc.poll() is None, f"etcd exited:\n{tail(self.log)}"
            assert time.monotonic() < deadline, f"etcd did not come up:\n{tail(self.log)}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def etcdctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """etcdctl as the apiserver's etcd client (kube-apiserver-etcd-client)."""
        client = "kube-apiserver-etcd-client"
        return subprocess.run(
            ["/usr/bin/etcdctl", f"--endpoints={self.endpoint}",
             f"--cacert={self.ssl / 'kube-etcd-ca.pem'}", f"--cert={self.ssl / f'{client}.pem'}",
             f"--key={self.ssl / f'{client}-key.pem'}", "--dial-timeout=2s",
             "--command-timeout=3s", *args],
            env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True, text=True, timeout=20,
            check=False,
        )

    def value(self, key: str) -> Any:
        got = self.etcdctl("get", key, "--print-value-only")
        assert got.returncode == 0, got.stderr
        return json.loads(got.stdout) if got.stdout.strip() else None


def standin_args(cluster: Cluster, etcd_endpoint: str, port: int) -> list[str]:
    """rkel's kube-apiserver flags for the node, with files, etcd and port of this test."""
    out = []
    for arg in cluster.service("kube-apiserver").args:
        name = arg.split("=", 1)[0]
        if name == "--etcd-servers":
            arg = f"--etcd-servers={etcd_endpoint}"
        elif name == "--secure-port":
            arg = f"--secure-port={port}"
        elif name == "--bind-address":
            arg = "--bind-address=127.0.0.1"
        out.append(arg.replace(SSL_DIR + "/", f"{cluster.ssl}/"))
    return out


def run_standin(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([PYTHON, "-E", "-s", str(STANDIN), *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT)


class ApiServer:
    """The running stand-in and TLS clients for it."""

    def __init__(self, cluster: Cluster, etcd_endpoint: str, workdir: Path) -> None:
        self.cluster = cluster
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.log = workdir / "kube-apiserver.log"
        self.image = cluster.service("kube-apiserver").image
        self.env = {"PATH": "/usr/bin:/bin", "RKEL_IMAGE": self.image}
        self.proc = run_standin(standin_args(cluster, etcd_endpoint, self.port), self.env,
                                self.log)

    def context(self, cert: str | None = "kube-admin", ssl_dir: Path | None = None
                ) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.cluster.ssl / "kube-ca.pem"))
        if cert:
            where = ssl_dir or self.cluster.ssl
            ctx.load_cert_chain(str(where / f"{cert}.pem"), str(where / f"{cert}-key.pem"))
        return ctx

    def call(self, method: str, path: str, body: Any = None, cert: str = "kube-admin",
             content_type: str = "application/json", accept: str = "application/json"
             ) -> tuple[int, Any]:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10,
                                           context=self.context(cert))
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, data, {"Content-Type": content_type, "Accept": accept})
            resp = conn.getresponse()
            raw = resp.read().decode()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw

    def wait_for(self, path: str, code: int, timeout: float = 15) -> tuple[int, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = self.call("GET", path)
            except OSError:
                got = (0, "")
            if got[0] == code:
                return got
            assert self.proc.poll() is None, f"stand-in exited:\n{tail(self.log)}"
            assert time.monotonic() < deadline, f"{path}: {got}\n{tail(self.log)}"
            time.sleep(0.2)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@contextlib.contextmanager
def running_api(cluster: Cluster, factory: pytest.TempPathFactory, prefix: str
                ) -> Iterator[ApiServer]:
    """A real etcd and the stand-in in front of it, both stopped afterwards, whatever happens."""
    etcd = Etcd(cluster, factory.mktemp(f"{prefix}-etcd"))
    server = None
    try:
        etcd.start()
        server = ApiServer(cluster, etcd.endpoint, factory.mktemp(f"{prefix}-apiserver"))
        server.wait_for("/readyz", 200)
        yield server
    finally:
        if server is not None:
            server.stop()
        etcd.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    for tool in ("/usr/bin/etcd", "/usr/bin/etcdctl", "/usr/bin/kubectl"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing (apt-get install etcd-server etcd-client)")
    return Cluster(tmp_path_factory.mktemp("standin-pki"))


@pytest.fixture(scope="module")
def etcd(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    server = Etcd(cluster, tmp_path_factory.mktemp("standin-etcd"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api(cluster: Cluster, etcd: Etcd, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[ApiServer]:
    server = ApiServer(cluster, etcd.endpoint, tmp_path_factory.mktemp("standin-apiserver"))
    try:
        server.wait_for("/readyz", 200)
        yield server
    finally:
        code = server.stop()
        assert code == 0, f"the stand-in did not exit cleanly on SIGTERM:\n{tail(server.log)}"


def register_node(api: ApiServer, name: str = NODE, cert: str = f"kube-node-{NODE}") -> Any:
    """What a kubelet does with its own identity: create its Node, then report Ready."""
    code, node = api.call("POST", "/api/v1/nodes", cert=cert, body={
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"node-role.kubernetes.io/controlplane": "true",
                                              "node-role.kubernetes.io/etcd": "true"}},
    })
    assert code in (201, 409), node
    code, node = api.call(
        "PATCH", f"/api/v1/nodes/{name}/status", cert=cert,
        content_type="application/strategic-merge-patch+json",
        body={"status": {"conditions": [{"type": "Ready", "status": "True",
                                         "reason": "KubeletReady"}],
                         "nodeInfo": {"kubeletVersion": "v1.30.5"},
                         "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}})
    assert code == 200, node
    return node


# --- serving, identities ---------------------------------------------------------------------


def test_healthz_and_version_with_the_admin_cert(api: ApiServer) -> None:
    assert api.call("GET", "/healthz") == (200, "ok")
    code, version = api.call("GET", "/version")
    assert api.image == "rancher/hyperkube:v1.30.5-rancher1"
    assert code == 200
    assert (version["major"], version["minor"], version["gitVersion"]) == ("1", "30", "v1.30.5")
    assert version["platform"].startswith("linux/")


def test_a_client_without_a_certificate_is_refused(api: ApiServer) -> None:
    conn = http.client.HTTPSConnection("127.0.0.1", api.port, timeout=5,
                                       context=api.context(cert=None))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        conn.request("GET", "/healthz")
        conn.getresponse().read()
    conn.close()


def test_a_certificate_from_another_pki_is_refused(api: ApiServer, tmp_path: Path) -> None:
    ca = issue_ca(CertRequest("kube-ca", "kube-ca", ca="kube-ca"))
    admin = issue_leaf(CertRequest("kube-admin", "kube-admin", ("system:masters",)),
                       load_cert(ca.cert_pem), load_key(ca.key_pem))
    (tmp_path / "kube-admin.pem").write_bytes(admin.cert_pem)
    (tmp_path / "kube-admin-key.pem").write_bytes(admin.key_pem)
    conn = http.client.HTTPSConnection("127.0.0.1", api.port, timeout=5,
                                       context=api.context("kube-admin", tmp_path))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        conn.request("GET", "/healthz")
        conn.getresponse().read()
    conn.close()
    deadline = time.monotonic() + 5  # the server logs the refusal just after the client sees it
    while "certificate verify failed" not in tail(api.log, 20000):
        assert time.monotonic() < deadline, tail(api.log)
        time.sleep(0.05)


def test_a_kubelet_registers_its_node_and_it_lands_in_etcd(api: ApiServer, etcd: Etcd) -> None:
    node = register_node(api)
    stored = etcd.value(f"/registry/nodes/{NODE}")
    assert stored["metadata"]["name"] == NODE and stored["metadata"]["uid"]
    assert stored["status"]["nodeInfo"]["kubeletVersion"] == "v1.30.5"
    assert "resourceVersion" not in stored["metadata"]  # the etcd revision, as in the real one
    assert int(node["metadata"]["resourceVersion"]) > 0


def test_a_node_user_cannot_modify_another_node(api: ApiServer) -> None:
    register_node(api)
    code, _ = api.call("POST", "/api/v1/nodes", body={"metadata": {"name": "n2"}})
    assert code in (201, 409)
    kubelet = f"kube-node-{NODE}"
    code, status = api.call("PATCH", "/api/v1/nodes/n2", cert=kubelet,
                            content_type="application/merge-patch+json",
                            body={"metadata": {"labels": {"stolen": "yes"}}})
    assert code == 403, status
    assert (status["kind"], status["reason"]) == ("Status", "Forbidden")
    assert 'node "n1" is not allowed to modify node "n2"' in status["message"]
    code, status = api.call("POST", "/api/v1/nodes", cert=kubelet, body={"metadata": {
        "name": "n3"}})
    assert code == 403, status
    code, status = api.call("DELETE", "/api/v1/namespaces/default/configmaps/x", cert=kubelet)
    assert code == 403 and "cannot delete resource" in status["message"]
    code, own = api.call("PATCH", f"/api/v1/nodes/{NODE}", cert=kubelet,
                         content_type="application/merge-patch+json",
                         body={"metadata": {"labels": {"own": "ok"}}})
    assert code == 200 and own["metadata"]["labels"]["own"] == "ok"


def test_kubectl_get_nodes_prints_status_roles_and_version(api: ApiServer,
                                                            tmp_path: Path) -> None:
    register_node(api)
    kubeconfig = tmp_path / "kube_config_cluster.yml"
    kubeconfig.write_text(api.cluster.admin_kubeconfig(api.url, "standin"))
    result = subprocess.run(["/usr/bin/kubectl", "--kubeconfig", str(kubeconfig), "get",
                             "nodes"], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    mine = next(row.split() for row in rows if row.split()[0] == NODE)
    assert mine[1] == "Ready" and mine[2] == "controlplane,etcd" and mine[4] == "v1.30.5"


# --- REST ------------------------------------------------------------------------------------


def test_configmap_crud(api: ApiServer) -> None:
    base = "/api/v1/namespaces/default/configmaps"
    cm = {"apiVersion": "v1", "kind": "ConfigMap",
          "metadata": {"name": "c1", "labels": {"app": "x"}}, "data": {"a": "1"}}
    code, created = api.call("POST", base, cm)
    assert code == 201 and created["metadata"]["uid"] and created["metadata"]["creationTimestamp"]
    assert api.call("POST", base, cm)[1]["reason"] == "AlreadyExists"
    code, listed = api.call("GET", f"{base}?labelSelector=app%3Dx")
    assert code == 200 and [i["metadata"]["name"] for i in listed["items"]] == ["c1"]
    assert api.call("GET", f"{base}?labelSelector=app%3Dy")[1]["items"] == []
    stale = {**created, "data": {"a": "2"}}
    code, updated = api.call("PUT", f"{base}/c1", stale)
    assert code == 200 and updated["data"] == {"a": "2"}
    code, status = api.call("PUT", f"{base}/c1", stale)  # the old resourceVersion again
    assert code == 409 and status["reason"] == "Conflict"
    code, patched = api.call("PATCH", f"{base}/c1", {"data": {"b": "3"}},
                             content_type="application/merge-patch+json")
    assert code == 200 and patched["data"] == {"a": "2", "b": "3"}
    assert api.call("DELETE", f"{base}/c1")[0] == 200
    code, status = api.call("GET", f"{base}/c1")
    assert code == 404 and status["reason"] == "NotFound"
    code, status = api.call("POST", "/api/v1/namespaces/nope/configmaps", cm)
    assert code == 404 and 'namespaces "nope" not found' in status["message"]


def test_eviction_deletes_the_pod(api: ApiServer) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-0"},
           "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "nginx"}]}}
    assert api.call("POST", "/api/v1/namespaces/default/pods", pod)[0] == 201
    code, on_node = api.call("GET", f"/api/v1/pods?fieldSelector=spec.nodeName%3D{NODE}")
    assert code == 200 and [p["metadata"]["name"] for p in on_node["items"]] == ["web-0"]
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": "web-0", "namespace": "default"}}
    code, status = api.call("POST", "/api/v1/namespaces/default/pods/web-0/eviction", eviction)
    assert code == 201 and (status["kind"], status["status"]) == ("Status", "Success")
    assert api.call("GET", "/api/v1/namespaces/default/pods/web-0")[0] == 404
    assert api.call("GET", f"/api/v1/pods?fieldSelector=spec.nodeName%3D{NODE}")[1]["items"] == []


def test_server_side_apply_stores_the_manifest_as_is(api: ApiServer, etcd: Etcd) -> None:
    manifest = {"apiVersion": "example.com/v1", "kind": "Widget",
                "metadata": {"name": "w1", "namespace": "default", "labels": {"x": "y"}},
                "spec": {"size": 3, "parts": ["a", {"b": None}], "deep": {"z": [1, 2]}}}
    path = "/apis/example.com/v1/namespaces/default/widgets/w1"
    code, status = api.call("PATCH", path, manifest, content_type="application/apply-patch+yaml")
    assert code == 422 and "fieldManager" in status["message"]
    code, applied = api.call("PATCH", f"{path}?fieldManager=test&force=true", manifest,
                             content_type="application/apply-patch+yaml")
    assert code == 201, applied
    stored = etcd.value("/registry/example.com/widgets/default/w1")
    extra = {"uid", "creationTimestamp", "generation"}
    assert {k: v for k, v in stored.items() if k != "metadata"} == {
        k: v for k, v in manifest.items() if k != "metadata"}
    assert {k: v for k, v in stored["metadata"].items() if k not in extra} == manifest["metadata"]
    again = {**manifest, "spec": {"size": 4}}
    code, reapplied = api.call("PATCH", f"{path}?fieldManager=test", again,
                               content_type="application/apply-patch+yaml")
    assert code == 200 and reapplied["spec"] == {"size": 4}
    assert reapplied["metadata"]["uid"] == applied["metadata"]["uid"]


MERGE = "application/merge-patch+json"
APPLY = "application/apply-patch+yaml"


def _generation(obj: Any) -> Any:
    return obj["metadata"].get("generation")


def test_generation_is_set_on_create_and_bumped_by_spec_changes_only(api: ApiServer,
                                                                     etcd: Etcd) -> None:
    base = "/apis/apps/v1/namespaces/default/deployments"
    path = f"{base}/gen"
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment",
              "metadata": {"name": "gen", "generation": 99, "labels": {"app": "gen"}},
              "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "gen"}},
                       "template": {"metadata": {"labels": {"app": "gen"}}, "spec": {
                           "containers": [{"name": "c", "image": "nginx"}]}}}}
    code, created = api.call("POST", base, deploy)
    assert code == 201 and _generation(created) == 1, created  # the client's 99 is ignored
    assert _generation(etcd.value("/registry/deployments/default/gen")) == 1
    assert _generation(api.call("GET", path)[1]) == 1

    code, scaled = api.call("PATCH", path, {"spec": {"replicas": 2}}, content_type=MERGE)
    assert code == 200 and _generation(scaled) == 2 and scaled["spec"]["replicas"] == 2
    code, same = api.call("PATCH", path, {"spec": {"replicas": 2}}, content_type=MERGE)
    assert code == 200 and _generation(same) == 2  # no change, no bump
    code, labelled = api.call("PATCH", path, {"metadata": {"labels": {"x": "y"}, "annotations": {
        "a": "b"}, "generation": 99}}, content_type=MERGE)
    assert code == 200 and _generation(labelled) == 2 and labelled["metadata"]["labels"]["x"]
    code, status = api.call("PATCH", f"{path}/status", {"status": {
        "observedGeneration": 2, "replicas": 2}}, content_type=MERGE)
    assert code == 200 and _generation(status) == 2 and status["status"]["replicas"] == 2
    code, ignored = api.call("PATCH", path, {"status": {"replicas": 7}}, content_type=MERGE)
    assert code == 200 and _generation(ignored) == 2 and ignored["status"]["replicas"] == 2

    code, image = api.call("PATCH", path, [{"op": "replace", "path": "/spec/template/spec/"
                                            "containers/0/image", "value": "nginx:2"}],
                           content_type="application/json-patch+json")
    assert code == 200 and _generation(image) == 3
    code, strategic = api.call("PATCH", path, {"spec": {"template": {"spec": {"containers": [
        {"name": "c", "image": "nginx:3"}]}}}},
        content_type="application/strategic-merge-patch+json")
    assert code == 200 and _generation(strategic) == 4
    stale = {**strategic, "spec": {**strategic["spec"], "replicas": 3}}
    stale["metadata"] = {**strategic["metadata"], "generation": 99}
    code, updated = api.call("PUT", path, stale)
    assert code == 200 and _generation(updated) == 5, updated
    code, relabelled = api.call("PUT", path, {**updated, "metadata": {
        **updated["metadata"], "labels": {"app": "gen", "z": "1"}, "generation": 1}})
    assert code == 200 and _generation(relabelled) == 5

    manifest = {**deploy, "metadata": {"name": "gen", "namespace": "default",
                                       "labels": {"app": "gen"}, "generation": 99}}
    manifest["spec"] = {**deploy["spec"], "replicas": 4}
    code, applied = api.call("PATCH", f"{path}?fieldManager=test&force=true", manifest,
                             content_type=APPLY)
    assert code == 200 and _generation(applied) == 6 and applied["spec"]["replicas"] == 4
    code, again = api.call("PATCH", f"{path}?fieldManager=test&force=true", manifest,
                           content_type=APPLY)
    assert code == 200 and _generation(again) == 6  # the same manifest changes nothing
    assert _generation(etcd.value("/registry/deployments/default/gen")) == 6
    assert api.call("DELETE", path)[0] == 200


def test_generation_of_kinds_without_spec_and_of_custom_resources(api: ApiServer) -> None:
    base = "/api/v1/namespaces/default/configmaps"
    code, cm = api.call("POST", base, {"metadata": {"name": "gen-cm"}, "data": {"a": "1"}})
    assert code == 201 and _generation(cm) == 1
    code, cm = api.call("PATCH", f"{base}/gen-cm", {"data": {"a": "2"}}, content_type=MERGE)
    assert code == 200 and _generation(cm) == 2
    code, cm = api.call("PATCH", f"{base}/gen-cm", {"metadata": {"labels": {"l": "1"}}},
                        content_type=MERGE)
    assert code == 200 and _generation(cm) == 2
    assert api.call("DELETE", f"{base}/gen-cm")[0] == 200

    path = "/apis/example.com/v1/namespaces/default/gadgets/g1"
    gadget = {"apiVersion": "example.com/v1", "kind": "Gadget",
              "metadata": {"name": "g1", "namespace": "default", "generation": 99},
              "spec": {"size": 1}}
    code, applied = api.call("PATCH", f"{path}?fieldManager=test", gadget, content_type=APPLY)
    assert code == 201 and _generation(applied) == 1, applied  # apply that creates
    code, applied = api.call("PATCH", f"{path}?fieldManager=test",
                             {**gadget, "spec": {"size": 2}}, content_type=APPLY)
    assert code == 200 and _generation(applied) == 2

    # Setting deletionTimestamp (finalizers hold the object) bumps it too, as in the real one.
    code, held = api.call("PATCH", path, {"metadata": {"finalizers": ["example.com/hold"]}},
                          content_type=MERGE)
    assert code == 200 and _generation(held) == 2
    code, deleting = api.call("DELETE", path)
    assert code == 202 and deleting["metadata"]["deletionTimestamp"]
    assert _generation(deleting) == 3
    assert _generation(api.call("DELETE", path)[1]) == 3  # only the first time
    code, _ = api.call("PATCH", path, {"metadata": {"finalizers": None}}, content_type=MERGE)
    assert code == 200 and api.call("GET", path)[0] == 404


# --- etcd outage, bad inputs -------------------------------------------------------------------


def test_etcd_outage_fails_readyz_until_etcd_is_back(api: ApiServer, etcd: Etcd) -> None:
    etcd.stop()
    try:
        _, text = api.wait_for("/readyz", 500)
        assert "[-]etcd failed" in text and "readyz check failed" in text
        assert "[-]etcd failed" in api.call("GET", "/healthz")[1]
        code, status = api.call("GET", "/api/v1/nodes")
        assert code == 500 and status["reason"] == "ServerTimeout"
    finally:
        etcd.start()
    assert api.wait_for("/readyz", 200)[1] == "ok"
    assert api.call("GET", f"/api/v1/nodes/{NODE}")[0] == 200


def _refused(args: list[str], tmp_path: Path) -> str:
    proc = run_standin(args, {"PATH": "/usr/bin:/bin"}, tmp_path / "refused.log")
    try:
        code = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code != 0
    return (tmp_path / "refused.log").read_text()


def test_missing_client_ca_file_exits_non_zero(cluster: Cluster, etcd: Etcd,
                                               tmp_path: Path) -> None:
    args = [a for a in standin_args(cluster, etcd.endpoint, free_port())
            if not a.startswith("--client-ca-file=")]
    assert "--client-ca-file must be specified" in _refused(args, tmp_path)


def test_an_unknown_flag_exits_non_zero(cluster: Cluster, etcd: Etcd, tmp_path: Path) -> None:
    args = [*standin_args(cluster, etcd.endpoint, free_port()), "--insecure-port=8080"]
    assert "Error: unknown flag: --insecure-port" in _refused(args, tmp_path)


def test_unreadable_serving_cert_or_missing_etcd_servers_exit_non_zero(
        cluster: Cluster, etcd: Etcd, tmp_path: Path) -> None:
    args = standin_args(cluster, etcd.endpoint, free_port())
    bad_cert = [f"--tls-cert-file={tmp_path / 'absent.pem'}" if a.startswith("--tls-cert-file=")
                else a for a in args]
    assert "unable to load server certificate" in _refused(bad_cert, tmp_path)
    no_etcd = [a for a in args if not a.startswith("--etcd-servers=")]
    assert "--etcd-servers must be specified" in _refused(no_etcd, tmp_path)


def test_unreachable_etcd_at_start_keeps_serving_unready(cluster: Cluster,
                                                         tmp_path: Path) -> None:
    server = ApiServer(cluster, f"https://127.0.0.1:{free_port()}", tmp_path)  # nothing there
    try:
        _, text = server.wait_for("/healthz", 500)
        assert "[-]etcd failed" in text and "[-]poststarthook/bootstrap-controller" in text
        assert "etcd is not reachable yet" in tail(server.log)
    finally:
        assert server.stop() == 0


def test_the_standin_uses_the_standard_library_only() -> None:
    local = {p.stem for p in STANDINS.glob("*.py")}
    for path in sorted(STANDINS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in local or top == "__future__", (
                    f"{path.name} imports {name}")
