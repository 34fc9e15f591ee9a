"""rkel brings up whole Kubernetes clusters on the local testbed and tears them down again.

Real: sshd, Docker Engines, registry, etcd, certificates, kubectl, and every container rkel
runs with RKE's names, flags, binds and health checks. Stand-ins: the Kubernetes component
processes inside the rancher/hyperkube and rancher/rke-tools images the testbed builds
(scenarios/standins): they parse the real flags, use rkel's certificates and kubeconfigs, and
serve the real API and health ports.

Two stories on hosts rkn1..rkn3 as the non-root docker-group user `rkel`, one state file:
three nodes with every role (up, kubectl, workload, no-op re-apply, a kubelet flag change that
restarts only the kubelets, remove), then one controlplane+etcd node and two workers (the
workers reach the API through nginx-proxy; pods land on workers only).
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from lifecycle.pki import PKI, load_state_key
from store import Store
from tests.e2e.test_etcd_plane import Story, rkel

pytestmark = pytest.mark.e2e

HOSTS = ("rkn1", "rkn2", "rkn3")
ALL_ROLES = ["controlplane", "etcd", "worker"]
KUBECTL = "/usr/bin/kubectl"
NODE_DIRS = ("etc-kubernetes", "var-lib-etcd", "opt-rke", "var-lib-kubelet")


class Cluster(Story):
    """One workdir (cluster.yml, state, admin kubeconfig) and the testbed hosts it runs on."""

    outputs: list[str]  # everything rkel printed in this story (checked for secrets)

    def rkel(self, *args: str, timeout: float = 900,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        result = rkel(self.workdir, *args, timeout=timeout, env=env)
        if not hasattr(self, "outputs"):
            self.outputs = []
        self.outputs.append(result.stdout + result.stderr)
        return result

    def apply(self, label: str) -> dict[str, Any]:  # type: ignore[override]
        started = time.monotonic()
        result = self.rkel("-o", "json", "apply", "--yes")
        self.timings[label] = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kube_config_cluster.yml"

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        result = subprocess.run([KUBECTL, "--kubeconfig", str(self.kubeconfig), *args],
                                input=stdin, capture_output=True, text=True, timeout=60,
                                check=False)
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result.stdout

    def kube_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def engine(self, host: str) -> docker.DockerClient:
        sock = self.testbed.state_dir / f"n{host[-1]}" / "run" / "docker.sock"
        return docker.DockerClient(base_url=f"unix://{sock}", timeout=30)

    def containers(self, host: str) -> dict[str, str]:
        """name -> container id of every container on the host (running or not)."""
        client = self.engine(host)
        try:
            return {c.name: c.id for c in client.containers.list(all=True)}
        finally:
            client.close()

    def all_containers(self) -> dict[tuple[str, str], str]:
        return {(h, name): cid for h in HOSTS for name, cid in self.containers(h).items()}

    def leftover_files(self, host: str) -> list[str]:
        hdir = self.testbed.state_dir / f"n{host[-1]}"
        return sorted(str(p) for d in NODE_DIRS for p in (hdir / d).rglob("*"))


@pytest.fixture(scope="module")
def cluster(testbed: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    testbed.ensure(("4",))
    c = Cluster(tmp_path_factory.mktemp("cluster"), testbed)
    try:
        yield c
    finally:
        # Whatever happened, leave the hosts empty for the next module.
        if (c.workdir / "cluster.yml").exists():
            c.rkel("remove", "--force")
        for label, seconds in sorted(c.timings.items()):
            print(f"{label}: {seconds:.1f}s wall")


def wait_for(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last!r})")


def ready(node: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in node.get("status", {}).get("conditions", []))


def roles_of(node: dict[str, Any]) -> set[str]:
    prefix = "node-role.kubernetes.io/"
    return {k[len(prefix):] for k in node["metadata"].get("labels", {}) if k.startswith(prefix)}


PODS = "".join(
    f"""---
apiVersion: v1
kind: Pod
metadata: {{name: web-{i}, namespace: default, labels: {{app: web}}}}
spec:
  containers: [{{name: web, image: "10.77.0.1:5000/rkel-test/base:py311"}}]
"""
    for i in range(4)
)


def ready_nodes(c: Cluster, count: int, also: Any = lambda node: True) -> list[dict[str, Any]]:
    """The Node objects, once there are `count` of them, all Ready (and passing `also`)."""
    def check() -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = c.kube_json("get", "nodes")["items"]
        ok = len(items) == count and all(ready(n) and also(n) for n in items)
        return items if ok else None
    return wait_for(f"{count} Ready nodes", check)  # type: ignore[no-any-return]


def running_pods(c: Cluster) -> dict[str, str] | None:
    """pod -> node, once every web pod runs."""
    pods = c.kube_json("get", "pods", "-n", "default", "-l", "app=web")["items"]
    if len(pods) == 4 and all(p["status"].get("phase") == "Running" for p in pods):
        return {p["metadata"]["name"]: p["spec"]["nodeName"] for p in pods}
    return None


# ---------------------------------------------------------------------------- three all-role nodes
def test_apply_brings_up_three_nodes_with_every_role(cluster: Cluster) -> None:
    cluster.write({h: ALL_ROLES for h in HOSTS})
    data = cluster.apply("apply-3-all-roles")
    assert data["connections"] == {"rkn1": 1, "rkn2": 1, "rkn3": 1}
    assert data["kubeconfig"] == str(cluster.kubeconfig)
    assert cluster.kubeconfig.stat().st_mode & 0o777 == 0o600


def test_status_lists_every_node_and_service_running_with_its_image(cluster: Cluster) -> None:
    result = cluster.rkel("-o", "json", "status")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    nodes = {n["name"]: n for n in data["nodes"]}
    assert sorted(nodes) == list(HOSTS)
    want = {"etcd", "etcd-rolling-snapshots", "service-sidekick", "kube-apiserver",
            "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy"}
    for name, node in nodes.items():
        assert node["state"] == "running", name
        services = {s["name"]: s for s in data["services"] if s["node"] == name}
        assert set(services) == want, name
        assert all(s["state"] == "running" for s in services.values()), services
        assert services["kubelet"]["image"] == "10.77.0.1:5000/rancher/hyperkube:v1.30.5-rancher1"
    # and on the hosts, every long-running container really runs
    for host in HOSTS:
        client = cluster.engine(host)
        try:
            states = {c.name: c.status for c in client.containers.list(all=True)}
        finally:
            client.close()
        assert {n: s for n, s in states.items() if n != "service-sidekick"} == {
            n: "running" for n in want - {"service-sidekick"}}, host
        assert states["service-sidekick"] == "exited"  # it only carries /opt/rke-tools


def test_kubectl_shows_every_node_ready_with_its_roles(cluster: Cluster) -> None:
    nodes = ready_nodes(cluster, 3)
    for node in nodes:
        assert roles_of(node) == {"controlplane", "etcd", "worker"}
        assert node["status"]["nodeInfo"]["kubeletVersion"] == "v1.30.5"
        assert not node["spec"].get("taints")  # worker role: RKE adds no role taint
    table = cluster.kubectl("get", "nodes")
    assert table.count(" Ready ") == 3 and "controlplane,etcd,worker" in table


def test_the_default_addons_rolled_out(cluster: Cluster) -> None:
    # canal (RKE's default network plugin) on every node, CoreDNS on the cluster DNS address;
    canal = cluster.kube_json("get", "daemonset", "-n", "kube-system", "canal")
    assert canal["status"]["numberAvailable"] == 3
    assert canal["status"]["desiredNumberScheduled"] == 3
    coredns = cluster.kube_json("get", "deployment", "-n", "kube-system", "coredns")
    assert coredns["status"]["availableReplicas"] >= 1
    dns = cluster.kube_json("get", "service", "-n", "kube-system", "kube-dns")
    assert dns["spec"]["clusterIP"] == "10.43.0.10"
    pods = cluster.kube_json("get", "pods", "-n", "kube-system", "-l", "k8s-app=canal")["items"]
    assert sorted(p["spec"]["nodeName"] for p in pods) == list(HOSTS)
    # metrics-server (RKE's default monitoring), registered as the metrics.k8s.io API
    metrics = cluster.kube_json("get", "deployment", "-n", "kube-system", "metrics-server")
    assert metrics["status"]["availableReplicas"] >= 1
    api = cluster.kube_json("get", "apiservice", "v1beta1.metrics.k8s.io")
    assert api["spec"]["service"]["name"] == "metrics-server"
    # ingress-nginx (RKE's default ingress): the controller on every worker, its certificate
    # Jobs complete, the default backend up, `nginx` the default IngressClass
    ingress = cluster.kube_json("get", "daemonset", "-n", "ingress-nginx",
                                "nginx-ingress-controller")
    assert ingress["status"]["numberAvailable"] == 3
    for job in ("ingress-nginx-admission-create", "ingress-nginx-admission-patch"):
        assert cluster.kube_json("get", "job", "-n", "ingress-nginx", job)["status"].get(
            "succeeded") == 1, job
    backend = cluster.kube_json("get", "deployment", "-n", "ingress-nginx", "default-http-backend")
    assert backend["status"]["availableReplicas"] >= 1
    klass = cluster.kube_json("get", "ingressclass", "nginx")
    assert klass["metadata"]["annotations"]["ingressclass.kubernetes.io/is-default-class"] == "true"


def test_a_copy_of_the_state_is_kept_in_kube_system_without_keys(cluster: Cluster) -> None:
    secret = cluster.kube_json("get", "secret", "-n", "kube-system", "rkel-cluster-state")
    state = json.loads(base64.b64decode(secret["data"]["state.json"]))
    assert sorted(n["name"] for n in state["nodes"]) == list(HOSTS)
    assert any(c["name"] == "kube-ca" for c in state["certificates"])
    assert "PRIVATE KEY" not in json.dumps(state)


def test_a_workload_of_standin_pods_is_scheduled_and_runs(cluster: Cluster) -> None:
    cluster.kubectl("create", "-f", "-", stdin=PODS)
    placed = wait_for("4 running web pods", lambda: running_pods(cluster))
    assert set(placed.values()) <= set(HOSTS)
    assert len(set(placed.values())) >= 2  # spread, not all on one node


def test_reapply_is_a_noop(cluster: Cluster) -> None:
    before = cluster.all_containers()
    plan = cluster.rkel("plan")
    assert "No changes" in plan.stdout, plan.stdout
    again = cluster.rkel("-o", "json", "apply", "--yes")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"changed": False}
    assert cluster.all_containers() == before  # nothing recreated


def test_a_kubelet_flag_change_restarts_only_the_kubelets(cluster: Cluster) -> None:
    before = cluster.all_containers()
    cluster.write({h: ALL_ROLES for h in HOSTS},
                  services={"kubelet": {"extra_args": {"max-pods": "150"}}})
    plan = json.loads(cluster.rkel("-o", "json", "plan").stdout)
    changed = [s for g in plan["groups"] for u in g["units"] for s in u["steps"]
               if s["action"] in ("start", "replace", "remove-service")]
    assert sorted((s["node"], s["service"], s["action"]) for s in changed) == [
        (h, "kubelet", "replace") for h in HOSTS]
    assert all("--max-pods=150" in s["args_added"] for s in changed)
    cluster.apply("kubelet-flag-change")
    after = cluster.all_containers()
    restarted = sorted(k for k in before if before[k] != after.get(k))
    assert restarted == [(h, "kubelet") for h in HOSTS]
    nodes = ready_nodes(cluster, 3, lambda n: n["status"]["capacity"]["pods"] == "150")
    assert all(not n["spec"].get("unschedulable") for n in nodes)  # uncordoned again


def test_no_private_key_is_in_clear_anywhere_rkel_writes_but_the_node_files(
        cluster: Cluster) -> None:
    """Every private key rkel generated (and the SSH key it logs in with), looked for by a line
    of its PEM body in: the state database, a snapshot and its state copy, everything rkel
    printed in this story (text and JSON, errors included), every container's `docker inspect`
    on every host (env, command, labels), and the kube-system state Secret."""
    bad = cluster.rkel("-o", "json", "snapshot", "verify", "no-such-snapshot")
    assert bad.returncode != 0  # an error message is checked too
    saved = cluster.rkel("-o", "json", "snapshot", "save", "--name", "secrets-check")
    assert saved.returncode == 0, saved.stderr
    for args in (("-o", "json", "status"), ("-o", "json", "history"), ("history", "1"),
                 ("-o", "json", "plan"), ("-o", "json", "snapshot", "list")):
        assert cluster.rkel(*args).returncode == 0, args
    with Store.open(cluster.state) as store:
        pki = PKI(store, load_state_key(cluster.state))
        keys = {row.name: pki.material(row.name).key_pem.decode() for row in store.certificates()
                if row.key_encrypted is not None}
    keys["ssh login key"] = Path(cluster.key).read_text()
    assert len(keys) > 10
    needles = {name: _pem_lines(pem) for name, pem in keys.items()}
    assert all(needles.values()), [n for n, lines in needles.items() if not lines]
    needles["state key"] = [load_state_key(cluster.state).decode()]
    info = json.loads(saved.stdout)
    places: dict[str, str] = {
        "state database": _read_all(cluster.state),
        "snapshot file": Path(info["local"]).read_bytes().decode("latin-1"),
        "snapshot state copy": Path(info["state_copy"]).read_bytes().decode("latin-1"),
        "rkel output": "\n".join(cluster.outputs),
    }
    for host in HOSTS:
        client = cluster.engine(host)
        try:
            for c in client.containers.list(all=True):
                config = c.attrs["Config"]
                places[f"docker inspect {host}/{c.name}"] = json.dumps(
                    [config.get("Env"), config.get("Cmd"), config.get("Entrypoint"),
                     config.get("Labels"), c.attrs.get("Args")])
        finally:
            client.close()
    secret = cluster.kube_json("get", "secret", "-n", "kube-system", "rkel-cluster-state")
    places["kube-system/rkel-cluster-state"] = "".join(
        base64.b64decode(v).decode("latin-1") for v in secret["data"].values())
    found = [f"{name} in {where}" for where, text in places.items()
             for name, lines in needles.items() if any(line in text for line in lines)]
    assert found == [], found
    assert "PRIVATE KEY" not in places["rkel output"]


def _pem_lines(pem: str) -> list[str]:
    """The full base64 lines of a PEM body (64 characters each; 70 in OpenSSH's format)."""
    return [line for line in pem.splitlines() if len(line) >= 60 and "-" not in line]


def _read_all(db: Path) -> str:
    """The database and its write-ahead log, as bytes seen as text."""
    parts = [p.read_bytes() for p in (db, db.with_name(db.name + "-wal")) if p.exists()]
    return b"".join(parts).decode("latin-1")


def test_remove_leaves_no_container_and_no_file(cluster: Cluster) -> None:
    result = cluster.rkel("remove", "--force")
    assert result.returncode == 0, result.stdout + result.stderr
    for host in HOSTS:
        assert cluster.containers(host) == {}, host
        assert cluster.leftover_files(host) == [], host
    assert not cluster.kubeconfig.exists()
    status = json.loads(cluster.rkel("-o", "json", "status").stdout)
    assert status["nodes"] == []


# ---------------------------------------------------------------------------- 1 cp+etcd, 2 workers
def test_one_controlplane_and_two_workers(cluster: Cluster) -> None:
    cluster.write({"rkn1": ["controlplane", "etcd"], "rkn2": ["worker"], "rkn3": ["worker"]})
    cluster.apply("apply-1cp-2workers")
    nodes = ready_nodes(cluster, 3)
    by_name = {n["metadata"]["name"]: n for n in nodes}
    assert roles_of(by_name["rkn1"]) == {"controlplane", "etcd"}
    assert roles_of(by_name["rkn2"]) == roles_of(by_name["rkn3"]) == {"worker"}
    taints = {(t["key"], t["effect"]) for t in by_name["rkn1"]["spec"]["taints"]}
    assert taints == {("node-role.kubernetes.io/controlplane", "NoSchedule"),
                      ("node-role.kubernetes.io/etcd", "NoExecute")}
    # The workers' kubelets reach the API through their local nginx-proxy.
    for host in ("rkn2", "rkn3"):
        names = set(cluster.containers(host))
        assert {"nginx-proxy", "kubelet", "kube-proxy"} <= names
        assert not names & {"etcd", "kube-apiserver"}
    cluster.kubectl("create", "-f", "-", stdin=PODS)
    placed = wait_for("4 running web pods", lambda: running_pods(cluster))
    assert set(placed.values()) == {"rkn2", "rkn3"}  # the controlplane node is tainted


def test_remove_after_the_second_shape(cluster: Cluster) -> None:
    result = cluster.rkel("remove", "--force")
    assert result.returncode == 0, result.stdout + result.stderr
    for host in HOSTS:
        assert cluster.containers(host) == {}, host
        assert cluster.leftover_files(host) == [], host
