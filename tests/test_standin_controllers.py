"""The kube-controller-manager stand-in's workload controllers, in a small live cluster.

Real processes on 127.0.0.1 only: Debian's etcd and the kube-apiserver stand-in (as in
tests/test_standin_apiserver.py), two kubelet stand-ins (n1 with rkel's kube-node-n1
certificate, n2 with a kube-node-n2 certificate issued here by the cluster's kube-ca), the
kube-scheduler stand-in and the kube-controller-manager stand-in, each with the flags
`lifecycle.desired` gives it and short periods from STANDIN_* variables.

The controller-manager runs as system:kube-controller-manager when the stand-in apiserver's
fixed RBAC lets that identity write what the workload controllers write (ReplicaSets, the
status of Deployments, ReplicaSets, DaemonSets and Jobs); otherwise as kube-admin, so the
controllers themselves are still tested (see `controller_identity`).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lifecycle.desired_certs import SSL_DIR
from lifecycle.pki import LOCAL_SERVER, PKI
from lifecycle.pki_x509 import issue_leaf, load_cert, load_key
from lifecycle.spec import CertRequest
from store import Store
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
from tests.test_standin_components import (
    PORT_ENV,
    Component,
    add_node,
    kubeconfig_for,
    rkel_args,
)

OTHER = "n2"
PERIOD = "0.3"
ELECTION = ("--leader-elect-lease-duration=2s", "--leader-elect-renew-deadline=1s",
            "--leader-elect-retry-period=0.3s")
# What the workload controllers write, beyond pods (which the fixed RBAC already allows).
WORKLOAD_WRITES = (("create", "apps", "replicasets", ""), ("update", "apps", "replicasets", ""),
                   ("update", "apps", "replicasets", "status"),
                   ("update", "apps", "deployments", "status"),
                   ("update", "apps", "daemonsets", "status"),
                   ("update", "batch", "jobs", "status"))


# --- the cluster -------------------------------------------------------------------------------


class Kubelet:
    def __init__(self, cluster: Cluster, api: ApiServer, name: str, workdir: Path) -> None:
        text = (cluster.ssl / "kubecfg-kube-node.yaml").read_text()
        text = text.replace(LOCAL_SERVER, api.url).replace(f"kube-node-{NODE}", f"kube-node-{name}")
        kubeconfig = workdir / f"kubecfg-kube-node-{name}.yaml"
        kubeconfig.write_text(text.replace(SSL_DIR + "/", f"{cluster.ssl}/"))
        args = []
        for arg in cluster.service("kubelet").args:
            if arg.startswith("--kubeconfig="):
                arg = f"--kubeconfig={kubeconfig}"
            elif arg.startswith("--hostname-override="):
                arg = f"--hostname-override={name}"
            args.append(arg.replace(SSL_DIR + "/", f"{cluster.ssl}/"))
        self.log = workdir / f"kubelet-{name}.log"
        env = {"PATH": "/usr/bin:/bin", "RKEL_IMAGE": cluster.service("kubelet").image,
               "STANDIN_HEARTBEAT_SECONDS": "1", "STANDIN_POD_POLL_SECONDS": PERIOD,
               "STANDIN_HEALTHZ_PORT": str(free_port())}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [PYTHON, "-E", "-s", str(STANDINS / "kubelet.py"), *args, "--node-ip=127.0.0.1"],
                env=env, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def issue_node_cert(cluster: Cluster, name: str) -> None:
    """kube-node-<name> (CN system:node:<name>, O system:nodes), signed by the cluster's CA."""
    with Store.open(cluster.state) as store:
        ca = PKI(store, cluster.key).material("kube-ca")
    leaf = issue_leaf(CertRequest(f"kube-node-{name}", f"system:node:{name}", ("system:nodes",)),
                      load_cert(ca.cert_pem), load_key(ca.key_pem))
    cluster.write(f"kube-node-{name}.pem", leaf.cert_pem)
    cluster.write(f"kube-node-{name}-key.pem", leaf.key_pem)


def controller_identity(api: ApiServer) -> str:
    """The controller-manager's own certificate when RBAC allows its writes, else kube-admin."""
    for verb, group, resource, sub in WORKLOAD_WRITES:
        code, review = api.call("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": "system:kube-controller-manager", "groups": ["system:authenticated"],
                     "resourceAttributes": {"verb": verb, "group": group, "resource": resource,
                                            "subresource": sub, "namespace": "default"}}})
        assert code == 201, review
        if not review["status"]["allowed"]:
            return "kube-admin"
    return "kube-controller-manager"


class Live:
    """The running cluster: the apiserver, the components, and the controller-managers."""

    def __init__(self, cluster: Cluster, api: ApiServer, workdir: Path) -> None:
        self.cluster, self.api, self.workdir = cluster, api, workdir
        self.identity = controller_identity(api)
        self.components: list[Component] = []
        self.kubelets = [Kubelet(cluster, api, name, workdir) for name in (NODE, OTHER)]
        self.scheduler = self.component("kube-scheduler", {"STANDIN_SCHEDULER_PERIOD": PERIOD})
        self.kcm = self.controller_manager()

    def component(self, name: str, env: dict[str, str], extra: tuple[str, ...] = (),
                  cert: str | None = None) -> Component:
        port = free_port()
        path = kubeconfig_for(self.cluster, self.api, name, self.workdir, cert)
        proc = Component(name, [*rkel_args(self.cluster, name, path), *extra],
                         {"PATH": "/usr/bin:/bin", PORT_ENV[name]: str(port), **env},
                         self.workdir, port)
        self.components.append(proc)
        return proc

    def controller_manager(self) -> Component:
        cert = None if self.identity == "kube-controller-manager" else \
            str(self.cluster.ssl / self.identity)
        index = sum(1 for c in self.components if c.name == "kube-controller-manager")
        workdir = self.workdir / f"kcm-{index}"
        workdir.mkdir()
        saved, self.workdir = self.workdir, workdir
        try:
            return self.component("kube-controller-manager", {
                "STANDIN_CONTROLLER_PERIOD": PERIOD, "STANDIN_JOB_SECONDS": "1",
                "STANDIN_NODE_MONITOR_PERIOD": "1"}, ELECTION, cert)
        finally:
            self.workdir = saved

    def stop(self) -> None:
        for proc in self.components:
            proc.stop()
        for kubelet in self.kubelets:
            kubelet.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {c.name} ---\n{tail(c.log)}" for c in self.components)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    cluster = Cluster(tmp_path_factory.mktemp("controllers-pki"))
    issue_node_cert(cluster, OTHER)
    with running_api(cluster, tmp_path_factory, "controllers") as api:
        running = Live(cluster, api, tmp_path_factory.mktemp("controllers"))
        try:
            running.kcm.wait_health(200)
            wait(running, lambda: all(ready(api, n) for n in (NODE, OTHER)), "nodes Ready")
            yield running
        finally:
            running.stop()


# --- helpers -----------------------------------------------------------------------------------


def wait(live: Live, what: Callable[[], Any], description: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out: {description}\n{live.logs()}"
        time.sleep(0.2)


def ready(api: ApiServer, node: str) -> bool:
    code, got = api.call("GET", f"/api/v1/nodes/{node}")
    return code == 200 and any(c["type"] == "Ready" and c["status"] == "True"
                               for c in got.get("status", {}).get("conditions", []))


def namespace(api: ApiServer, name: str) -> str:
    code, got = api.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                        "metadata": {"name": name}})
    assert code in (201, 409), got
    return name


def items(api: ApiServer, path: str) -> list[dict[str, Any]]:
    code, got = api.call("GET", path)
    assert code == 200, got
    return list(got["items"])


def pods(api: ApiServer, ns: str) -> list[dict[str, Any]]:
    return [p for p in items(api, f"/api/v1/namespaces/{ns}/pods")
            if not p["metadata"].get("deletionTimestamp")]


def running(api: ApiServer, ns: str) -> list[dict[str, Any]]:
    return [p for p in pods(api, ns) if p["status"].get("phase") == "Running"]


def get(api: ApiServer, path: str) -> dict[str, Any]:
    code, got = api.call("GET", path)
    assert code == 200, got
    return dict(got)


def template(labels: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {"metadata": {"labels": labels},
            "spec": {"containers": [{"name": "c", "image": "nginx"}], **spec}}


def deployment(api: ApiServer, ns: str, name: str, count: int) -> None:
    labels = {"app": name}
    code, got = api.call("POST", f"/apis/apps/v1/namespaces/{ns}/deployments", {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": count, "selector": {"matchLabels": labels},
                 "template": template(labels)}})
    assert code == 201, got


def available(api: ApiServer, ns: str, name: str, count: int) -> dict[str, Any] | None:
    got = get(api, f"/apis/apps/v1/namespaces/{ns}/deployments/{name}")
    status = got.get("status") or {}
    ok = (status.get("availableReplicas") == count and status.get("updatedReplicas") == count
          and status.get("replicas") == count and len(running(api, ns)) == count)
    return got if ok else None


def evict(api: ApiServer, pod: dict[str, Any]) -> None:
    m = pod["metadata"]
    code, got = api.call("POST", f"/api/v1/namespaces/{m['namespace']}/pods/{m['name']}/eviction",
                         {"apiVersion": "policy/v1", "kind": "Eviction",
                          "metadata": {"name": m["name"], "namespace": m["namespace"]}})
    assert code == 201, got


def cordon(api: ApiServer, node: str, on: bool) -> None:
    code, got = api.call("PATCH", f"/api/v1/nodes/{node}", {"spec": {"unschedulable": on}},
                         content_type="application/merge-patch+json")
    assert code == 200, got


# --- Deployment and ReplicaSet -----------------------------------------------------------------


def test_a_deployment_gets_its_pods_running_and_replaces_a_deleted_one(live: Live) -> None:
    api, ns = live.api, namespace(live.api, "deploy")
    deployment(api, ns, "web", 3)
    got = wait(live, lambda: available(api, ns, "web", 3), "3 available")
    status = got["status"]
    assert status["readyReplicas"] == 3 and status["observedGeneration"] == 1
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Available"]["status"] == "True"
    assert conditions["Progressing"]["reason"] == "NewReplicaSetAvailable"
    (rs,) = items(api, f"/apis/apps/v1/namespaces/{ns}/replicasets")
    hash_ = rs["metadata"]["labels"]["pod-template-hash"]
    assert rs["metadata"]["name"] == f"web-{hash_}"
    owner = rs["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "Deployment", "web", got["metadata"]["uid"], True)
    assert rs["status"]["availableReplicas"] == 3
    placed = running(api, ns)
    assert {p["spec"]["nodeName"] for p in placed} == {NODE, OTHER}
    for pod in placed:
        assert pod["metadata"]["name"].startswith(f"web-{hash_}-")
        assert pod["metadata"]["labels"] == {"app": "web", "pod-template-hash": hash_}
        assert pod["metadata"]["ownerReferences"][0]["uid"] == rs["metadata"]["uid"]
    # A deleted pod is replaced.
    victim = placed[0]["metadata"]["name"]
    assert api.call("DELETE", f"/api/v1/namespaces/{ns}/pods/{victim}")[0] == 200
    wait(live, lambda: available(api, ns, "web", 3) and victim not in
         {p["metadata"]["name"] for p in running(api, ns)}, "a replacement pod")
    assert f'"Created pod" pod="{ns}/' in tail(live.kcm.log, 20000)


def test_a_template_change_rolls_out_a_new_replica_set(live: Live) -> None:
    api, ns = live.api, namespace(live.api, "rollout")
    deployment(api, ns, "app", 2)
    wait(live, lambda: available(api, ns, "app", 2), "2 available")
    code, got = api.call("PATCH", f"/apis/apps/v1/namespaces/{ns}/deployments/app",
                         {"spec": {"template": {"spec": {"containers": [
                             {"name": "c", "image": "nginx:2"}]}}}},
                         content_type="application/strategic-merge-patch+json")
    assert code == 200, got

    def rolled() -> bool:
        sets = items(api, f"/apis/apps/v1/namespaces/{ns}/replicasets")
        new = [s for s in sets if s["spec"]["template"]["spec"]["containers"][0]["image"]
               == "nginx:2"]
        return bool(available(api, ns, "app", 2)) and len(sets) == 2 and len(new) == 1 and \
            all(p["spec"]["containers"][0]["image"] == "nginx:2" for p in running(api, ns)) \
            and all(s["spec"]["replicas"] == 0 for s in sets if s not in new)

    wait(live, rolled, "the new template rolled out")
    sets = items(api, f"/apis/apps/v1/namespaces/{ns}/replicasets")
    revisions = sorted(s["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
                       for s in sets)
    assert revisions == ["1", "2"]


def test_recreate_stops_the_old_pods_before_starting_new_ones(live: Live) -> None:
    api, ns = live.api, namespace(live.api, "recreate")
    deployment(api, ns, "db", 2)
    wait(live, lambda: available(api, ns, "db", 2), "2 available")
    code, got = api.call("PATCH", f"/apis/apps/v1/namespaces/{ns}/deployments/db",
                         {"spec": {"strategy": {"type": "Recreate"}, "template": {"spec": {
                             "containers": [{"name": "c", "image": "postgres"}]}}}},
                         content_type="application/strategic-merge-patch+json")
    assert code == 200, got
    deadline = time.monotonic() + 20
    while True:
        images = {p["spec"]["containers"][0]["image"] for p in pods(api, ns)}
        assert images != {"nginx", "postgres"}, "old and new pods at the same time"
        if images == {"postgres"} and available(api, ns, "db", 2):
            break
        assert time.monotonic() < deadline, live.logs()
        time.sleep(0.1)


def test_a_drain_moves_the_pods_to_the_other_node(live: Live) -> None:
    api, ns = live.api, namespace(live.api, "drain")
    deployment(api, ns, "moved", 4)
    wait(live, lambda: available(api, ns, "moved", 4), "4 available")
    cordon(api, OTHER, True)
    try:
        on_other = [p for p in running(api, ns) if p["spec"]["nodeName"] == OTHER]
        assert on_other
        for pod in on_other:
            evict(api, pod)
        wait(live, lambda: available(api, ns, "moved", 4) and all(
            p["spec"]["nodeName"] == NODE for p in running(api, ns)), "all 4 pods on n1")
    finally:
        cordon(api, OTHER, False)


def test_deleting_a_deployment_deletes_its_replica_sets_and_pods(live: Live) -> None:
    api, ns = live.api, namespace(live.api, "gc")
    deployment(api, ns, "gone", 2)
    wait(live, lambda: available(api, ns, "gone", 2), "2 available")
    code, got = api.call("DELETE", f"/apis/apps/v1/namespaces/{ns}/deployments/gone")
    assert code == 200, got
    wait(live, lambda: not items(api, f"/apis/apps/v1/namespaces/{ns}/replicasets")
         and not items(api, f"/api/v1/namespaces/{ns}/pods"), "replica sets and pods gone")
    assert "Deleted object whose owners are gone" in tail(live.kcm.log, 20000)


# --- DaemonSet -----------------------------------------------------------------------------------


def test_a_daemonset_runs_on_each_eligible_node_cordoned_included(live: Live) -> None:
    api, ns = live.api, namespace(live.api, "daemons")
    add_node(api, "tainted", spec={"taints": [{"key": "dedicated", "value": "db",
                                               "effect": "NoSchedule"}]})
    cordon(api, NODE, True)
    try:
        for name, tolerations in (("agent", []), ("everywhere", [{"operator": "Exists"}])):
            labels = {"app": name}
            code, got = api.call("POST", f"/apis/apps/v1/namespaces/{ns}/daemonsets", {
                "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": name},
                "spec": {"selector": {"matchLabels": labels},
                         "template": template(labels, tolerations=tolerations)}})
            assert code == 201, got

        def status(name: str) -> dict[str, Any]:
            return dict(get(api, f"/apis/apps/v1/namespaces/{ns}/daemonsets/{name}")
                        .get("status") or {})

        wait(live, lambda: status("agent").get("numberAvailable") == 2, "agent on n1 and n2")
        agent = status("agent")
        assert (agent["desiredNumberScheduled"], agent["currentNumberScheduled"],
                agent["numberReady"], agent["updatedNumberScheduled"]) == (2, 2, 2, 2)
        placed = {p["spec"]["nodeName"]: p for p in pods(api, ns)
                  if p["metadata"]["labels"]["app"] == "agent"}
        assert sorted(placed) == [NODE, OTHER]  # the cordoned n1 too, the tainted node not
        assert placed[NODE]["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet"
        wait(live, lambda: status("everywhere").get("desiredNumberScheduled") == 3 and
             status("everywhere").get("numberAvailable") == 2, "everywhere on 3 nodes")
        # An evicted daemon pod comes back on its (cordoned) node.
        evict(api, placed[NODE])

        def back() -> bool:
            now = {p["spec"]["nodeName"]: p for p in running(api, ns)
                   if p["metadata"]["labels"]["app"] == "agent"}
            return NODE in now and now[NODE]["metadata"]["uid"] != \
                placed[NODE]["metadata"]["uid"]

        wait(live, back, "the agent pod back on n1")
        # A template change replaces the pods (RollingUpdate, maxUnavailable 1).
        code, got = api.call("PATCH", f"/apis/apps/v1/namespaces/{ns}/daemonsets/agent",
                             {"spec": {"template": {"metadata": {"labels": {"v": "2"}}}}},
                             content_type="application/strategic-merge-patch+json")
        assert code == 200, got

        def updated() -> bool:
            agents = [p for p in running(api, ns) if p["metadata"]["labels"]["app"] == "agent"]
            return status("agent").get("updatedNumberScheduled") == 2 and \
                status("agent").get("numberAvailable") == 2 and len(agents) == 2 and \
                all(p["metadata"]["labels"].get("v") == "2" for p in agents)

        wait(live, updated, "the agent pods replaced")
    finally:
        cordon(api, NODE, False)
        api.call("DELETE", "/api/v1/nodes/tainted")
    wait(live, lambda: not [p for p in pods(api, ns) if p["spec"].get("nodeName") == "tainted"],
         "the pod of the deleted node gone")


# --- Job -----------------------------------------------------------------------------------------


def test_a_job_completes(live: Live) -> None:
    api, ns = live.api, namespace(live.api, "jobs")
    code, got = api.call("POST", f"/apis/batch/v1/namespaces/{ns}/jobs", {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
        "spec": {"completions": 2, "template": template({}, restartPolicy="Never")}})
    assert code == 201, got

    def complete() -> dict[str, Any] | None:
        job = get(api, f"/apis/batch/v1/namespaces/{ns}/jobs/once")
        conditions = {c["type"]: c["status"] for c in (job.get("status") or {}).get(
            "conditions", [])}
        return job if conditions.get("Complete") == "True" else None

    job = wait(live, complete, "the job Complete")
    assert job["status"]["succeeded"] == 2 and "active" not in job["status"]
    assert job["status"]["completionTime"] and job["status"]["startTime"]
    finished = pods(api, ns)
    assert [p["status"]["phase"] for p in finished] == ["Succeeded", "Succeeded"]
    for pod in finished:
        assert pod["metadata"]["labels"]["job-name"] == "once"
        assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] == \
            "Completed"


def test_a_job_fails_when_its_pods_fail_past_the_backoff_limit(live: Live) -> None:
    api, ns = live.api, namespace(live.api, "failing")
    code, got = api.call("POST", f"/apis/batch/v1/namespaces/{ns}/jobs", {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "broken"},
        "spec": {"backoffLimit": 0, "template": template(
            {}, restartPolicy="Never", nodeSelector={"no": "such-node"})}})
    assert code == 201, got
    (pod,) = wait(live, lambda: pods(api, ns), "the job's pod")
    for _ in range(20):  # the scheduler may mark it Unschedulable in between: 409, read again
        pod["status"]["phase"] = "Failed"  # what a kubelet reports for a container that exited 1
        path = f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}"
        code, got = api.call("PUT", f"{path}/status", pod)
        if code != 409:
            break
        pod = get(api, path)
    assert code == 200, got

    def failed() -> dict[str, Any] | None:
        job = get(api, f"/apis/batch/v1/namespaces/{ns}/jobs/broken")
        conditions = {c["type"]: c for c in (job.get("status") or {}).get("conditions", [])}
        return job if conditions.get("Failed", {}).get("status") == "True" else None

    job = wait(live, failed, "the job Failed")
    cond = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == "BackoffLimitExceeded"
    assert job["status"]["failed"] == 1 and "active" not in job["status"]
    time.sleep(1)
    assert len(pods(api, ns)) == 1  # no new pod after the limit


# --- leader election (last: it stops the first controller-manager) -------------------------------


def test_only_the_lease_holder_runs_the_controllers_and_a_successor_takes_over(
        live: Live) -> None:
    api = live.api
    lease = get(api, "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/"
                     "kube-controller-manager")
    first = lease["spec"]["holderIdentity"]
    assert first and f"lease kube-system/kube-controller-manager as {first}" in tail(
        live.kcm.log, 100000)
    second = live.controller_manager()
    second.wait_health(200)
    wait(live, lambda: "lock is held by" in tail(second.log), "the second one waiting")
    ns = namespace(api, "failover")
    deployment(api, ns, "ha", 2)
    wait(live, lambda: available(api, ns, "ha", 2), "2 available")
    assert "Created pod" not in tail(second.log, 100000)
    assert live.kcm.stop() == 0
    assert "released lease kube-system/kube-controller-manager" in tail(live.kcm.log)
    wait(live, lambda: "successfully acquired lease" in tail(second.log, 100000),
         "the second one leading", timeout=10)
    victim = running(api, ns)[0]["metadata"]["name"]
    assert api.call("DELETE", f"/api/v1/namespaces/{ns}/pods/{victim}")[0] == 200
    wait(live, lambda: available(api, ns, "ha", 2) and victim not in
         {p["metadata"]["name"] for p in running(api, ns)}, "replaced by the new leader")
    assert '"Created pod"' in tail(second.log, 100000)
