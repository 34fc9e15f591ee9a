"""Adopting a cluster RKE built, on the testbed: `rkel import`, `rkel plan`, then an upgrade.

The RKE-built cluster is made the way `rke up` (v1.6) makes one, by this test and not by rkel:

* RKE's PKI and `cluster.rkestate`, made by `tests.rke_fixture` with `cryptography` alone (one
  kube-ca that etcd trusts too, one kube-node for every kubelet, kube-etcd-<ip> per member);
* the files RKE deploys, written into each host's /etc/kubernetes/ssl with RKE's names
  (`<name>.pem`, `<name>-key.pem`, `kubecfg-<name>.yaml` in RKE's kubeconfig format), and RKE's
  admin kubeconfig `kube_config_cluster.yml`;
* the containers, started through each host's Docker Engine with RKE's names, images, binds,
  entrypoints and RKE's `io.rancher.rke.container.name` label only. Their images, arguments,
  environment and binds come from rkel's desired specs compiled with RKE's certificate layout
  (`compile_desired(..., pki_layout="rke")`): rkel's compiler follows RKE v1.6's
  cluster/plan.go, so these are RKE's arguments; that is exactly the claim `rkel import` then
  checks container by container. The entrypoints are set as RKE sets them (the components'
  Entrypoint is rke-tools' entrypoint.sh with the component in Cmd; etcd's Cmd starts with
  /usr/local/bin/etcd), not as rkel does.

Then: `rkel import` (nothing restarted), `rkel plan` (no container or certificate change),
1.30 -> 1.31 in cluster.yml and `rkel apply`: every node Ready at v1.31.1, and the etcd keys
written before the import are still there.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from lifecycle.config import load_config
from lifecycle.desired import SIDEKICK, compile_desired
from lifecycle.spec import ServiceSpec
from tests import rke_fixture as rke
from tests.e2e.test_cluster import ALL_ROLES, Cluster, ready_nodes, wait_for
from tests.e2e.test_etcd_plane import ADDRESSES

pytestmark = pytest.mark.e2e

HOSTS = ("rkn1", "rkn2", "rkn3")
OLD, NEW = "v1.30.5-rancher1-1", "v1.31.1-rancher1-1"
COMPONENT_KUBECONFIGS = ("kube-node", "kube-proxy", "kube-controller-manager", "kube-scheduler")
# RKE's start order: the etcd plane, then the control plane, then the worker plane.
CONTROL = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
WORKER = ("nginx-proxy", "kubelet", "kube-proxy")


def rke_kubeconfig(name: str) -> str:
    """A component kubeconfig as RKE writes it (pki.GetKubeConfigX509)."""
    return (
        "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    api-version: v1\n"
        f"    certificate-authority: {rke.SSL}/kube-ca.pem\n"
        '    server: "https://127.0.0.1:6443"\n  name: "local"\ncontexts:\n- context:\n'
        f'    cluster: "local"\n    user: "{name}-local"\n  name: "local"\n'
        f'current-context: "local"\nusers:\n- name: "{name}-local"\n  user:\n'
        f"    client-certificate: {rke.SSL}/{name}.pem\n"
        f"    client-key: {rke.SSL}/{name}-key.pem\n")


def rke_admin_kubeconfig(server: str, pki: dict[str, rke.Pair]) -> str:
    """kube_config_cluster.yml as RKE writes it (pki.GetKubeConfigX509WithData)."""
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()
    admin = pki["kube-admin"]
    return (
        "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    api-version: v1\n"
        f"    certificate-authority-data: {b64(pki['kube-ca'].cert_pem)}\n"
        f'    server: "{server}"\n  name: "e2e"\ncontexts:\n- context:\n    cluster: "e2e"\n'
        '    user: "kube-admin-e2e"\n  name: "e2e"\ncurrent-context: "e2e"\nusers:\n'
        '- name: "kube-admin-e2e"\n  user:\n'
        f"    client-certificate-data: {b64(admin.cert_pem)}\n"
        f"    client-key-data: {b64(admin.key_pem)}\n")


class RkeBuilt(Cluster):
    pki: dict[str, rke.Pair]

    def etcd_files(self) -> dict[str, Path]:
        """RKE's etcd client material (the apiserver's: kube-node, trusted through kube-ca)."""
        out = {}
        for part, text in (("cert", self.pki["kube-node"].cert_pem),
                           ("key", self.pki["kube-node"].key_pem),
                           ("cacert", self.pki["kube-ca"].cert_pem)):
            path = self.workdir / f"rke-etcd-{part}.pem"
            path.write_text(text)
            path.chmod(0o600)
            out[part] = path
        return out

    def etcd(self, *args: str, check: bool = True) -> Any:
        return self.etcdctl(ADDRESSES["rkn1"], self.etcd_files(), *args, check=check)

    def keys(self, prefix: str) -> list[str]:
        out = self.etcd("get", "--prefix", f"/e2e/{prefix}/", "--keys-only").stdout
        return sorted(k for k in out.split() if k)

    def write_node_files(self, config: Any, host: str) -> None:
        ssl = self.testbed.state_dir / f"n{host[-1]}" / "etc-kubernetes" / "ssl"
        ssl.mkdir(parents=True, exist_ok=True)
        files = rke.node_files(config, self.pki, host)
        node = next(n for n in config.nodes if n.name == host)
        for name in COMPONENT_KUBECONFIGS:
            if name in ("kube-controller-manager", "kube-scheduler") \
                    and "controlplane" not in node.role:
                continue
            files[f"{rke.SSL}/kubecfg-{name}.yaml"] = rke_kubeconfig(name).encode()
        for path, data in files.items():
            target = ssl / Path(path).name
            target.write_bytes(data)
            target.chmod(0o600)

    def run_as_rke(self, host: str, spec: ServiceSpec) -> None:
        """Start `spec` as RKE's docker.DoRunContainer would: RKE's label only."""
        client = self.engine(host)
        try:
            repo, _, tag = spec.image.rpartition(":")
            client.images.pull(repo, tag=tag)
            if spec.command and spec.command[0].endswith("entrypoint.sh"):
                entrypoint: list[str] | None = list(spec.command[:1])
                command = [*spec.command[1:], *spec.args]
            else:
                entrypoint = None  # the image's own, with Cmd naming the binary
                command = [*spec.command, *spec.args, *spec.bootstrap_args]
            made = client.containers.create(
                spec.image, command=command, entrypoint=entrypoint,
                environment=list(spec.env) or None, name=spec.name,
                labels={rke.CONTAINER_NAME_LABEL: spec.name},
                network_mode=spec.network_mode or None, pid_mode=spec.pid_mode or None,
                privileged=spec.privileged, volumes=list(spec.binds) or None,
                volumes_from=list(spec.volumes_from) or None,
                restart_policy={"Name": spec.restart} if spec.restart else None)
            made.start()
        finally:
            client.close()

    def remove_everything(self) -> None:
        for host in HOSTS:
            client = self.engine(host)
            try:
                for container in client.containers.list(all=True):
                    if container.labels.get(rke.CONTAINER_NAME_LABEL) or \
                            container.name.startswith("old-"):
                        container.remove(force=True, v=True)
            finally:
                client.close()


@pytest.fixture
def built(testbed: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RkeBuilt]:
    testbed.ensure(("4",))
    c = RkeBuilt(tmp_path_factory.mktemp("rke-import"), testbed)
    try:
        yield c
    finally:
        if (c.workdir / "cluster.rkel.db").exists():
            c.rkel("remove", "--force")
        c.remove_everything()
        for host in HOSTS:
            c.ssh(host, "rm -rf /etc/kubernetes/ssl /var/lib/etcd/member; true")
        for label, seconds in sorted(c.timings.items()):
            print(f"{label}: {seconds:.1f}s wall")


def rke_up(c: RkeBuilt) -> Any:
    """The cluster as `rke up` leaves it, at OLD."""
    c.write({h: ALL_ROLES for h in HOSTS}, kubernetes_version=OLD)
    config = load_config(c.workdir / "cluster.yml").config
    c.pki = rke.rke_pki(config)
    rke.write_rkestate(c.workdir / "cluster.rkestate", config, c.pki)
    desired = compile_desired(config, pki_layout="rke")
    started = time.monotonic()
    for host in HOSTS:
        c.write_node_files(config, host)
    for node in desired.nodes:
        c.run_as_rke(node.name, node.service("etcd"))  # type: ignore[arg-type]
        # RKE's default: recurring snapshots on, their container right after etcd
        c.run_as_rke(node.name, node.service("etcd-rolling-snapshots"))  # type: ignore[arg-type]
    wait_for("etcd healthy", lambda: c.etcd("endpoint", "health", "--cluster",
                                            check=False).returncode == 0, timeout=90)
    for names in (CONTROL, WORKER):
        for node in desired.nodes:
            for spec in node.services:
                if spec.name == SIDEKICK and names is CONTROL:
                    c.run_as_rke(node.name, spec)
                elif spec.name in names:
                    c.run_as_rke(node.name, spec)
    kubeconfig = c.workdir / "kube_config_cluster.yml"
    kubeconfig.write_text(rke_admin_kubeconfig(f"https://{ADDRESSES['rkn1']}:6443", c.pki))
    kubeconfig.chmod(0o600)
    ready_nodes(c, 3, lambda n: n["status"]["nodeInfo"]["kubeletVersion"] == "v1.30.5")
    c.timings["rke-up-by-the-test"] = time.monotonic() - started
    return config


def test_an_rke_built_cluster_is_adopted_then_upgraded(built: RkeBuilt) -> None:
    c = built
    rke_up(c)
    for i in range(20):
        c.etcd("put", f"/e2e/before/{i}", f"value-{i}")
    before = c.all_containers()

    started = time.monotonic()
    imported = c.rkel("-o", "json", "import", "--rke-state", str(c.workdir / "cluster.rkestate"),
                      "--yes")
    c.timings["rkel-import"] = time.monotonic() - started
    assert imported.returncode == 0, imported.stdout + imported.stderr
    data = json.loads(imported.stdout)
    for host in HOSTS:
        node = data["nodes"][host]
        assert node["differing"] == {}, (host, node["differing"])
        assert node["certificates_match"], host
        assert "kube-apiserver" in node["matching"] and "etcd" in node["matching"]
    assert c.all_containers() == before, "the import restarted or replaced a container"
    # RKE's keys are in the state encrypted only (the state, its WAL), and they check out.
    stored = b"".join(p.read_bytes() for p in c.workdir.glob("cluster.rkel.db*")
                      if not p.name.endswith(".key"))
    assert [ln for ln in rke.key_bodies(c.pki) if ln.encode() in stored] == []
    verify = c.rkel("state", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr

    started = time.monotonic()
    plan = json.loads(c.rkel("-o", "json", "plan").stdout)
    c.timings["rkel-plan-after-import"] = time.monotonic() - started
    actions = {s["action"] for g in plan["groups"] for u in g["units"] for s in u["steps"]}
    assert actions <= {"apply-addon"}, plan["groups"]

    c.write({h: ALL_ROLES for h in HOSTS}, kubernetes_version=NEW)
    upgrade = json.loads(c.rkel("-o", "json", "plan").stdout)
    replaced = {(s["node"], s["service"]) for g in upgrade["groups"] for u in g["units"]
                for s in u["steps"] if s["action"] == "replace"}
    assert {(h, "kube-apiserver") for h in HOSTS} <= replaced
    assert not any(s["action"] == "deliver-certs" for g in upgrade["groups"]
                   for u in g["units"] for s in u["steps"])
    c.apply("upgrade-1.31-after-import")
    ready_nodes(c, 3, lambda n: n["status"]["nodeInfo"]["kubeletVersion"] == "v1.31.1")
    assert c.keys("before") == sorted(f"/e2e/before/{i}" for i in range(20))
    after = c.rkel("plan")
    assert "No changes" in after.stdout, after.stdout
    # Still RKE's PKI: the etcd client RKE made (kube-node, trusted through kube-ca) works.
    assert c.etcd("endpoint", "health", "--cluster", check=False).returncode == 0
    for line in rke.key_bodies(c.pki):
        assert not any(line in out for out in c.outputs), "a private key was printed"
