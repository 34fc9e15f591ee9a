"""Tests of the desired-state compiler (lifecycle.desired) and the version catalog.

The golden test writes every component's full argument list out literally: it is the record of
what rkel runs. A change to it must be a deliberate change of behaviour.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lifecycle.config.model import (
    DEFAULT_KUBERNETES_VERSION,
    Authentication,
    Authorization,
    BackupConfig,
    ClusterConfig,
    DrainInput,
    EtcdService,
    KubeAPIService,
    KubeControllerService,
    KubeletService,
    KubeproxyService,
    Node,
    PrivateRegistry,
    SchedulerService,
    Services,
    Taint,
    UpgradeStrategy,
)
from lifecycle.desired import compile_desired, recurring_snapshots
from lifecycle.desired_certs import is_ca
from lifecycle.errors import PlanError
from lifecycle.spec import Desired, ServiceSpec
from lifecycle.versions import (
    VersionCatalog,
    semver_key,
    supported_versions,
    version_info,
)

REPO = Path(__file__).resolve().parents[1]

TLS = (
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,"
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305,TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,"
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305"
)
ADMISSION = (
    "NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,DefaultTolerationSeconds,"
    "MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ResourceQuota,NodeRestriction,Priority,"
    "TaintNodesByCondition,PersistentVolumeClaimResize"
)

CP = Node("10.0.0.1", "rke", ("controlplane", "etcd", "worker"), hostname_override="cp1")
ETCD = Node("10.0.0.2", "rke", ("etcd",))  # no override: the name is the address
WORKER = Node(
    "203.0.113.3", "rke", ("worker",), internal_address="10.0.0.3", hostname_override="W1"
)


def config(*nodes: Node, **kw) -> ClusterConfig:
    return ClusterConfig(nodes=nodes or (CP, ETCD, WORKER), **kw)


def spec(d: Desired, node: str, service: str) -> ServiceSpec:
    n = d.node(node)
    assert n is not None, node
    s = n.service(service)
    assert s is not None, (node, service)
    return s


def flag(s: ServiceSpec, name: str) -> list[str]:
    return [a.split("=", 1)[1] for a in s.args if a.split("=", 1)[0] == f"--{name}"]


# --- golden ----------------------------------------------------------------------------------

ETCD_CP1 = [
    "--advertise-client-urls=https://10.0.0.1:2379",
    "--cert-file=/etc/kubernetes/ssl/kube-etcd-10-0-0-1.pem",
    "--cipher-suites=TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "--client-cert-auth=true",
    "--data-dir=/var/lib/rancher/etcd",
    "--election-timeout=5000",
    "--heartbeat-interval=500",
    "--initial-advertise-peer-urls=https://10.0.0.1:2380",
    "--key-file=/etc/kubernetes/ssl/kube-etcd-10-0-0-1-key.pem",
    "--listen-client-urls=https://0.0.0.0:2379",
    "--listen-peer-urls=https://0.0.0.0:2380",
    "--name=etcd-cp1",
    "--peer-cert-file=/etc/kubernetes/ssl/kube-etcd-10-0-0-1.pem",
    "--peer-client-cert-auth=true",
    "--peer-key-file=/etc/kubernetes/ssl/kube-etcd-10-0-0-1-key.pem",
    "--peer-trusted-ca-file=/etc/kubernetes/ssl/kube-etcd-ca.pem",
    "--trusted-ca-file=/etc/kubernetes/ssl/kube-etcd-ca.pem",
]
ETCD_ETCD1 = [
    "--advertise-client-urls=https://10.0.0.2:2379",
    "--cert-file=/etc/kubernetes/ssl/kube-etcd-10-0-0-2.pem",
    "--cipher-suites=TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "--client-cert-auth=true",
    "--data-dir=/var/lib/rancher/etcd",
    "--election-timeout=5000",
    "--heartbeat-interval=500",
    "--initial-advertise-peer-urls=https://10.0.0.2:2380",
    "--key-file=/etc/kubernetes/ssl/kube-etcd-10-0-0-2-key.pem",
    "--listen-client-urls=https://0.0.0.0:2379",
    "--listen-peer-urls=https://0.0.0.0:2380",
    "--name=etcd-10.0.0.2",
    "--peer-cert-file=/etc/kubernetes/ssl/kube-etcd-10-0-0-2.pem",
    "--peer-client-cert-auth=true",
    "--peer-key-file=/etc/kubernetes/ssl/kube-etcd-10-0-0-2-key.pem",
    "--peer-trusted-ca-file=/etc/kubernetes/ssl/kube-etcd-ca.pem",
    "--trusted-ca-file=/etc/kubernetes/ssl/kube-etcd-ca.pem",
]
ETCD_BOOTSTRAP = [
    "--initial-cluster=etcd-10.0.0.2=https://10.0.0.2:2380,etcd-cp1=https://10.0.0.1:2380",
    "--initial-cluster-state=new",
    "--initial-cluster-token=etcd-cluster-1",
]
APISERVER_CP1 = [
    "--advertise-address=10.0.0.1",
    "--allow-privileged=true",
    "--anonymous-auth=false",
    "--api-audiences=unknown",
    "--authorization-mode=Node,RBAC",
    "--bind-address=0.0.0.0",
    "--client-ca-file=/etc/kubernetes/ssl/kube-ca.pem",
    f"--enable-admission-plugins={ADMISSION}",
    "--etcd-cafile=/etc/kubernetes/ssl/kube-etcd-ca.pem",
    "--etcd-certfile=/etc/kubernetes/ssl/kube-apiserver-etcd-client.pem",
    "--etcd-keyfile=/etc/kubernetes/ssl/kube-apiserver-etcd-client-key.pem",
    "--etcd-prefix=/registry",
    "--etcd-servers=https://10.0.0.1:2379,https://10.0.0.2:2379",
    "--kubelet-client-certificate=/etc/kubernetes/ssl/kube-apiserver.pem",
    "--kubelet-client-key=/etc/kubernetes/ssl/kube-apiserver-key.pem",
    "--kubelet-preferred-address-types=InternalIP,ExternalIP,Hostname",
    "--profiling=false",
    "--proxy-client-cert-file=/etc/kubernetes/ssl/kube-apiserver-proxy-client.pem",
    "--proxy-client-key-file=/etc/kubernetes/ssl/kube-apiserver-proxy-client-key.pem",
    "--requestheader-allowed-names=kube-apiserver-proxy-client",
    "--requestheader-client-ca-file=/etc/kubernetes/ssl/kube-apiserver-requestheader-ca.pem",
    "--requestheader-extra-headers-prefix=X-Remote-Extra-",
    "--requestheader-group-headers=X-Remote-Group",
    "--requestheader-username-headers=X-Remote-User",
    "--secure-port=6443",
    "--service-account-issuer=rke",
    "--service-account-key-file=/etc/kubernetes/ssl/kube-service-account-token-key.pem",
    "--service-account-lookup=true",
    "--service-account-signing-key-file=/etc/kubernetes/ssl/kube-service-account-token-key.pem",
    "--service-cluster-ip-range=10.43.0.0/16",
    "--service-node-port-range=30000-32767",
    "--storage-backend=etcd3",
    "--tls-cert-file=/etc/kubernetes/ssl/kube-apiserver.pem",
    f"--tls-cipher-suites={TLS}",
    "--tls-private-key-file=/etc/kubernetes/ssl/kube-apiserver-key.pem",
]
CONTROLLER_CP1 = [
    "--allocate-node-cidrs=true",
    "--allow-untagged-cloud=true",
    "--authentication-kubeconfig=/etc/kubernetes/ssl/kubecfg-kube-controller-manager.yaml",
    "--authorization-kubeconfig=/etc/kubernetes/ssl/kubecfg-kube-controller-manager.yaml",
    "--cluster-cidr=10.42.0.0/16",
    "--configure-cloud-routes=false",
    "--enable-hostpath-provisioner=false",
    "--kubeconfig=/etc/kubernetes/ssl/kubecfg-kube-controller-manager.yaml",
    "--leader-elect=true",
    "--node-monitor-grace-period=40s",
    "--profiling=false",
    "--root-ca-file=/etc/kubernetes/ssl/kube-ca.pem",
    "--service-account-private-key-file=/etc/kubernetes/ssl/kube-service-account-token-key.pem",
    "--service-cluster-ip-range=10.43.0.0/16",
    "--terminated-pod-gc-threshold=1000",
    "--use-service-account-credentials=true",
    "--v=2",
]
SCHEDULER_CP1 = [
    "--authentication-kubeconfig=/etc/kubernetes/ssl/kubecfg-kube-scheduler.yaml",
    "--authorization-kubeconfig=/etc/kubernetes/ssl/kubecfg-kube-scheduler.yaml",
    "--kubeconfig=/etc/kubernetes/ssl/kubecfg-kube-scheduler.yaml",
    "--leader-elect=true",
    "--profiling=false",
    "--v=2",
]


def kubelet_args(name: str, node_ip: str | None = None) -> list[str]:
    # Only the node name and --node-ip differ between the three nodes; the list stays literal.
    args = [
        "--address=0.0.0.0",
        "--anonymous-auth=false",
        "--authentication-token-webhook=true",
        "--authorization-mode=Webhook",
        "--cgroups-per-qos=True",
        "--client-ca-file=/etc/kubernetes/ssl/kube-ca.pem",
        "--cluster-dns=10.43.0.10",
        "--cluster-domain=cluster.local",
        "--container-runtime-endpoint=unix:///var/run/cri-dockerd.sock",
        "--event-qps=0",
        "--fail-swap-on=false",
        f"--hostname-override={name}",
        "--kubeconfig=/etc/kubernetes/ssl/kubecfg-kube-node.yaml",
        "--make-iptables-util-chains=true",
        "--pod-infra-container-image=rancher/mirrored-pause:3.7",
        "--read-only-port=0",
        "--resolv-conf=/etc/resolv.conf",
        "--root-dir=/var/lib/kubelet",
        "--streaming-connection-idle-timeout=30m",
        f"--tls-cipher-suites={TLS}",
        "--v=2",
        "--volume-plugin-dir=/var/lib/kubelet/volumeplugins",
    ]
    if node_ip:
        args.insert(
            args.index("--pod-infra-container-image=rancher/mirrored-pause:3.7"),
            f"--node-ip={node_ip}",
        )
    return args


def proxy_args(name: str) -> list[str]:
    return [
        "--cluster-cidr=10.42.0.0/16",
        "--healthz-bind-address=127.0.0.1",
        f"--hostname-override={name}",
        "--kubeconfig=/etc/kubernetes/ssl/kubecfg-kube-proxy.yaml",
        "--v=2",
    ]


KUBELET_BINDS = [
    "/var/lib/cri-dockerd:/var/lib/cri-dockerd",
    "/etc/kubernetes:/etc/kubernetes",
    "/etc/cni:/etc/cni:rw",
    "/opt/cni:/opt/cni:rw",
    "/var/lib/cni:/var/lib/cni",
    "/var/lib/calico:/var/lib/calico",
    "/etc/resolv.conf:/etc/resolv.conf",
    "/sys:/sys:rprivate",
    "/var/lib/docker:/var/lib/docker:rw,rslave",
    "/var/lib/kubelet:/var/lib/kubelet:shared",
    "/var/lib/rancher:/var/lib/rancher:shared",
    "/var/run:/var/run:rw,rprivate",
    "/run:/run:rprivate",
    "/etc/ceph:/etc/ceph",
    "/dev:/host/dev:rprivate",
    "/var/log/containers:/var/log/containers",
    "/var/log/pods:/var/log/pods",
    "/usr:/host/usr:ro",
    "/etc:/host/etc:ro",
]


def test_golden_three_nodes():
    d = compile_desired(config())
    assert d.kubernetes_version == "v1.30.5-rancher1-1"
    assert [n.name for n in d.nodes] == ["10.0.0.2", "cp1", "w1"]
    order = {n.name: [s.name for s in n.services] for n in d.nodes}
    assert order == {
        "cp1": [
            "etcd",
            "etcd-rolling-snapshots",
            "service-sidekick",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubelet",
            "kube-proxy",
        ],
        "10.0.0.2": [
            "etcd", "etcd-rolling-snapshots", "service-sidekick", "nginx-proxy", "kubelet",
            "kube-proxy",
        ],
        "w1": ["service-sidekick", "nginx-proxy", "kubelet", "kube-proxy"],
    }

    # cp1: controlplane + etcd + worker
    etcd = spec(d, "cp1", "etcd")
    assert list(etcd.args) == ETCD_CP1
    assert list(etcd.bootstrap_args) == ETCD_BOOTSTRAP
    assert etcd.command == ("/usr/local/bin/etcd",)
    assert etcd.image == "rancher/mirrored-coreos-etcd:v3.5.12"
    assert etcd.binds == ("/var/lib/etcd:/var/lib/rancher/etcd", "/etc/kubernetes:/etc/kubernetes")
    assert etcd.env == (
        "ETCDCTL_API=3",
        "ETCDCTL_CACERT=/etc/kubernetes/ssl/kube-etcd-ca.pem",
        "ETCDCTL_CERT=/etc/kubernetes/ssl/kube-etcd-10-0-0-1.pem",
        "ETCDCTL_KEY=/etc/kubernetes/ssl/kube-etcd-10-0-0-1-key.pem",
        "ETCDCTL_ENDPOINTS=https://127.0.0.1:2379",
    )
    assert etcd.health is not None
    assert etcd.health.url == "https://10.0.0.1:2379/health"
    assert etcd.health.client_cert == "kube-apiserver-etcd-client"
    assert etcd.health.expect == '"health":"true"'

    api = spec(d, "cp1", "kube-apiserver")
    assert list(api.args) == APISERVER_CP1
    assert api.command == ("/opt/rke-tools/entrypoint.sh", "kube-apiserver")
    # entrypoint.sh comes from the sidekick's /opt/rke-tools volume, as with RKE
    assert api.volumes_from == ("service-sidekick",)
    sidekick = spec(d, "cp1", "service-sidekick")
    assert (sidekick.image, sidekick.command, sidekick.network_mode, sidekick.restart) == (
        "rancher/rke-tools:v0.1.102", ("/bin/true",), "none", "no")
    assert all(spec(d, n, c).volumes_from == ("service-sidekick",)
               for n, c in [("w1", "kubelet"), ("w1", "kube-proxy"), ("cp1", "kube-scheduler")])
    assert spec(d, "w1", "nginx-proxy").volumes_from == ()
    assert api.image == "rancher/hyperkube:v1.30.5-rancher1"
    assert api.binds == ("/etc/kubernetes:/etc/kubernetes",)
    assert api.health is not None
    assert (api.health.url, api.health.client_cert) == (
        "https://127.0.0.1:6443/healthz",
        "kube-admin",
    )

    kcm = spec(d, "cp1", "kube-controller-manager")
    assert list(kcm.args) == CONTROLLER_CP1
    assert kcm.health is not None and kcm.health.url == "https://127.0.0.1:10257/healthz"
    sched = spec(d, "cp1", "kube-scheduler")
    assert list(sched.args) == SCHEDULER_CP1
    assert sched.health is not None and sched.health.url == "https://127.0.0.1:10259/healthz"

    kubelet = spec(d, "cp1", "kubelet")
    assert list(kubelet.args) == kubelet_args("cp1")
    assert list(kubelet.binds) == KUBELET_BINDS
    assert kubelet.env == ("RKE_KUBELET_CRIDOCKERD=true",)
    assert (kubelet.privileged, kubelet.pid_mode, kubelet.network_mode) == (True, "host", "host")
    assert kubelet.health is not None and kubelet.health.url == "http://127.0.0.1:10248/healthz"

    proxy = spec(d, "cp1", "kube-proxy")
    assert list(proxy.args) == proxy_args("cp1")
    assert proxy.binds == (
        "/etc/kubernetes:/etc/kubernetes",
        "/run:/run",
        "/lib/modules:/lib/modules:ro",
    )
    assert proxy.privileged
    assert proxy.health is not None and proxy.health.url == "http://127.0.0.1:10256/healthz"

    # 10.0.0.2: etcd only
    assert list(spec(d, "10.0.0.2", "etcd").args) == ETCD_ETCD1
    assert list(spec(d, "10.0.0.2", "etcd").bootstrap_args) == ETCD_BOOTSTRAP
    assert list(spec(d, "10.0.0.2", "kubelet").args) == kubelet_args("10.0.0.2")
    assert list(spec(d, "10.0.0.2", "kube-proxy").args) == proxy_args("10.0.0.2")

    # w1: worker whose internal address differs from its address
    assert list(spec(d, "w1", "kubelet").args) == kubelet_args("w1", node_ip="10.0.0.3")
    assert list(spec(d, "w1", "kube-proxy").args) == proxy_args("w1")
    nginx = spec(d, "w1", "nginx-proxy")
    assert nginx.image == "rancher/rke-tools:v0.1.102"
    assert nginx.env == ("CP_HOSTS=10.0.0.1",)
    assert nginx.args == ()

    for n in d.nodes:
        for s in n.services:
            labels = dict(s.labels)
            assert labels["io.rancher.rke.container.name"] == s.name
            # every service that reads a certificate carries the hash of what it reads
            assert ("io.rkel.certs" in labels) == (s.name not in ("nginx-proxy", "service-sidekick"))
            if s.name != "service-sidekick":
                assert s.network_mode == "host" and s.restart == "always"


def test_golden_node_identity_roles_labels_taints():
    d = compile_desired(config())
    cp, etcd, w = d.node("cp1"), d.node("10.0.0.2"), d.node("w1")
    assert cp is not None and etcd is not None and w is not None
    assert cp.roles == ("controlplane", "etcd", "worker")
    assert (w.address, w.internal_address, w.port, w.user) == ("203.0.113.3", "10.0.0.3", 22, "rke")
    assert cp.taints == ()
    assert etcd.taints == (("node-role.kubernetes.io/etcd", "true", "NoExecute"),)
    assert w.labels == (("node-role.kubernetes.io/worker", "true"),)


# --- argument precedence -----------------------------------------------------------------------

CATALOG_YAML = """
base:
  images:
    etcd: example/etcd:1
    nginx_proxy: example/tools:1
    pod_infra_container: example/pause:1
  flags:
    kube-scheduler:
      profiling: "false"
      v: "2"
    kube-apiserver:
      profiling: "false"
versions:
  v1.30.5-rancher1-1:
    images: {kubernetes: example/kube:v1.30.5}
    flags:
      kube-scheduler:
        profiling:            # an empty value deletes the base default
        v: "4"                # and a version may override one
      kube-apiserver:
        advertise-address: "" # an empty value deletes a built-in flag too
  v1.29.9-rancher1-1:
    images: {kubernetes: example/kube:v1.29.9}
"""


def test_version_default_deleted_by_empty_value_and_overridden():
    catalog = VersionCatalog.from_text(CATALOG_YAML)
    d = compile_desired(config(CP), catalog=catalog)
    sched = spec(d, "cp1", "kube-scheduler")
    assert flag(sched, "profiling") == []
    assert flag(sched, "v") == ["4"]
    api = spec(d, "cp1", "kube-apiserver")
    assert flag(api, "advertise-address") == []
    assert flag(api, "profiling") == ["false"]
    # the other version keeps the base
    old = compile_desired(config(CP, kubernetes_version="v1.29.9-rancher1-1"), catalog=catalog)
    assert flag(spec(old, "cp1", "kube-scheduler"), "profiling") == ["false"]
    assert spec(old, "cp1", "kube-scheduler").image == "example/kube:v1.29.9"


def test_extra_args_override_delete_and_array_append():
    services = Services(
        kube_api=KubeAPIService(
            extra_args={"profiling": "true", "anonymous-auth": "", "--audit-log-maxage": "5"},
            extra_args_array={
                "tls-sni-cert-key": ["/a.pem,/a-key.pem", "/b.pem,/b-key.pem"],
                "feature-gates": ["A=true"],
            },
        ),
        kubelet=KubeletService(extra_args={"hostname-override": "custom"}),
    )
    d = compile_desired(config(CP, services=services))
    api = spec(d, "cp1", "kube-apiserver")
    assert flag(api, "profiling") == ["true"]  # a version default overridden
    assert flag(api, "anonymous-auth") == []  # deleted by an empty value
    assert flag(api, "audit-log-maxage") == ["5"]  # leading dashes tolerated
    # array flags come after the sorted map flags, by flag name, values in the given order
    assert list(api.args[-3:]) == [
        "--feature-gates=A=true",
        "--tls-sni-cert-key=/a.pem,/a-key.pem",
        "--tls-sni-cert-key=/b.pem,/b-key.pem",
    ]
    map_part = list(api.args[:-3])
    assert map_part == sorted(map_part)
    assert flag(spec(d, "cp1", "kubelet"), "hostname-override") == ["custom"]  # built-in overridden


def test_extra_args_array_keeps_a_map_flag_of_the_same_name():
    services = Services(scheduler=SchedulerService(extra_args_array={"v": ["5"]}))
    sched = spec(compile_desired(config(CP, services=services)), "cp1", "kube-scheduler")
    assert flag(sched, "v") == ["2", "5"]


def test_extra_binds_and_env_are_appended_deduplicated():
    services = Services(
        kube_api=KubeAPIService(
            extra_binds=["/var/log/audit:/var/log/audit", "/etc/kubernetes:/etc/kubernetes"],
            extra_env=["HTTP_PROXY=http://proxy:3128"],
        ),
        etcd=EtcdService(extra_env=["GOMAXPROCS=2"]),
    )
    d = compile_desired(config(CP, services=services))
    api = spec(d, "cp1", "kube-apiserver")
    assert api.binds == ("/etc/kubernetes:/etc/kubernetes", "/var/log/audit:/var/log/audit")
    assert api.env == ("HTTP_PROXY=http://proxy:3128",)
    assert spec(d, "cp1", "etcd").env[-1] == "GOMAXPROCS=2"


def test_etcd_bootstrap_flags_from_extra_args_stay_out_of_args():
    services = Services(etcd=EtcdService(extra_args={"initial-cluster-token": "mytoken"}))
    etcd = spec(compile_desired(config(CP, services=services)), "cp1", "etcd")
    assert "--initial-cluster-token=mytoken" in etcd.bootstrap_args
    assert not [a for a in etcd.args if a.startswith("--initial-cluster")]


# --- images and registries ---------------------------------------------------------------------


def test_image_precedence():
    legacy = Services(
        etcd=EtcdService(image="legacy/etcd:1"),
        kube_api=KubeAPIService(image="legacy/kube:1"),
        kubelet=KubeletService(image="legacy/kubelet:1", infra_container_image="legacy/pause:1"),
    )
    d = compile_desired(config(CP, WORKER, services=legacy))
    assert spec(d, "cp1", "etcd").image == "legacy/etcd:1"
    assert spec(d, "cp1", "kube-apiserver").image == "legacy/kube:1"
    assert spec(d, "cp1", "kubelet").image == "legacy/kubelet:1"
    assert spec(d, "cp1", "kube-scheduler").image == "rancher/hyperkube:v1.30.5-rancher1"
    assert flag(spec(d, "cp1", "kubelet"), "pod-infra-container-image") == ["legacy/pause:1"]

    pinned = {
        "etcd": "pin/etcd:2",
        "kubernetes": "pin/kube:2",
        "nginx_proxy": "pin/tools:2",
        "pod_infra_container": "pin/pause:2",
    }
    d = compile_desired(config(CP, WORKER, services=legacy, system_images=pinned))
    assert spec(d, "cp1", "etcd").image == "pin/etcd:2"
    for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet"):
        assert spec(d, "cp1", name).image == "pin/kube:2"
    assert spec(d, "w1", "nginx-proxy").image == "pin/tools:2"
    assert flag(spec(d, "w1", "kubelet"), "pod-infra-container-image") == ["pin/pause:2"]


def test_default_private_registry_prefixes_images_without_a_host():
    registries = (
        PrivateRegistry("other.example.com", user="u", password="hunter2-not-default"),
        PrivateRegistry("https://registry.example.com:5000/", "me", "s3cret-pw", is_default=True),
    )
    pinned = {"etcd": "quay.io/coreos/etcd:v3.5.12", "nginx_proxy": "localhost/tools:1"}
    d = compile_desired(config(private_registries=registries, system_images=pinned))
    assert spec(d, "cp1", "kube-apiserver").image == (
        "registry.example.com:5000/rancher/hyperkube:v1.30.5-rancher1"
    )
    assert spec(d, "cp1", "etcd").image == "quay.io/coreos/etcd:v3.5.12"
    assert spec(d, "w1", "nginx-proxy").image == "localhost/tools:1"
    assert flag(spec(d, "w1", "kubelet"), "pod-infra-container-image") == [
        "registry.example.com:5000/rancher/mirrored-pause:3.7"
    ]
    text = json.dumps([s.to_dict() for n in d.nodes for s in n.services]) + repr(d)
    assert "s3cret-pw" not in text and "hunter2" not in text


def test_non_default_registry_changes_nothing():
    registries = (PrivateRegistry("registry.example.com", "me", "pw"),)
    d = compile_desired(config(CP, private_registries=registries))
    assert spec(d, "cp1", "etcd").image == "rancher/mirrored-coreos-etcd:v3.5.12"


# --- per-node rules ----------------------------------------------------------------------------


def test_kubelet_node_ip_only_when_internal_address_differs():
    same = Node("10.0.0.7", "rke", ("worker",), internal_address="10.0.0.7")
    d = compile_desired(config(CP, same, WORKER))
    assert flag(spec(d, "10.0.0.7", "kubelet"), "node-ip") == []
    assert flag(spec(d, "cp1", "kubelet"), "node-ip") == []
    assert flag(spec(d, "w1", "kubelet"), "node-ip") == ["10.0.0.3"]


def test_nginx_proxy_only_on_non_controlplane_nodes_with_every_cp_host():
    cp2 = Node("198.51.100.5", "rke", ("controlplane",), internal_address="10.0.0.5")
    d = compile_desired(config(cp2, CP, ETCD, WORKER))
    for n in d.nodes:
        has_proxy = n.service("nginx-proxy") is not None
        assert has_proxy == (not n.has("controlplane")), n.name
    assert spec(d, "w1", "nginx-proxy").env == ("CP_HOSTS=10.0.0.1,10.0.0.5",)
    assert spec(d, "10.0.0.2", "nginx-proxy").env == ("CP_HOSTS=10.0.0.1,10.0.0.5",)


def test_controlplane_only_node_registers_with_taint_and_config_labels_taints():
    cp_only = Node(
        "10.0.0.9",
        "rke",
        ("controlplane",),
        hostname_override="cp9",
        labels={"zone": "a", "app": "db", "node-role.kubernetes.io/special": "true"},
        taints=(Taint("dedicated", "db", "NoExecute"), Taint("gpu", "", "NoSchedule")),
    )
    d = compile_desired(config(cp_only, ETCD))
    kubelet = spec(d, "cp9", "kubelet")
    assert flag(kubelet, "register-with-taints") == [
        "dedicated=db:NoExecute,gpu:NoSchedule,node-role.kubernetes.io/controlplane=true:NoSchedule"
    ]
    # kubelet refuses node-role.kubernetes.io labels; they go through the API (NodeDesired.labels)
    assert flag(kubelet, "node-labels") == ["app=db,zone=a"]
    n = d.node("cp9")
    assert n is not None
    assert n.labels == (
        ("app", "db"),
        ("node-role.kubernetes.io/controlplane", "true"),
        ("node-role.kubernetes.io/special", "true"),
        ("zone", "a"),
    )
    assert n.taints == (
        ("dedicated", "db", "NoExecute"),
        ("gpu", "", "NoSchedule"),
        ("node-role.kubernetes.io/controlplane", "true", "NoSchedule"),
    )
    assert flag(spec(compile_desired(config()), "cp1", "kubelet"), "register-with-taints") == []


def test_prefix_path_prefixes_host_side_of_binds():
    d = compile_desired(config(CP, prefix_path="/opt/rke/"))
    assert spec(d, "cp1", "etcd").binds == (
        "/opt/rke/var/lib/etcd:/var/lib/rancher/etcd",
        "/opt/rke/etc/kubernetes:/etc/kubernetes",
    )
    assert spec(d, "cp1", "kube-apiserver").binds == ("/opt/rke/etc/kubernetes:/etc/kubernetes",)
    kubelet = spec(d, "cp1", "kubelet")
    assert flag(kubelet, "root-dir") == ["/opt/rke/var/lib/kubelet"]
    assert "/opt/rke/var/lib/kubelet:/opt/rke/var/lib/kubelet:shared" in kubelet.binds
    assert "/opt/rke/var/lib/cni:/var/lib/cni" in kubelet.binds
    assert (
        kubelet.binds[-1] == "/var/lib/kubelet/volumeplugins:/var/lib/kubelet/volumeplugins:shared"
    )
    # in-container paths are unchanged
    assert flag(kubelet, "kubeconfig") == ["/etc/kubernetes/ssl/kubecfg-kube-node.yaml"]


ROLLING = "etcd-rolling-snapshots"


@pytest.mark.parametrize(
    ("snapshot", "backup", "on"),
    [
        (None, None, True),  # RKE's default: snapshot true
        (True, None, True),
        (False, None, False),
        (False, BackupConfig(), True),  # a backup_config not disabled turns them on
        (False, BackupConfig(enabled=True), True),
        (False, BackupConfig(enabled=False), False),
        (None, BackupConfig(enabled=False), True),  # snapshot still defaults to true
        (True, BackupConfig(enabled=False), True),
    ],
)
def test_recurring_snapshots_rule(snapshot, backup, on):
    etcd = EtcdService(snapshot=snapshot, backup_config=backup)
    assert recurring_snapshots(etcd) is on
    d = compile_desired(config(services=Services(etcd=etcd)))
    with_it = sorted(n.name for n in d.nodes if n.service(ROLLING) is not None)
    assert with_it == (["10.0.0.2", "cp1"] if on else [])


def test_rolling_snapshots_spec_creation_and_retention():
    d = compile_desired(config())
    cp1 = spec(d, "cp1", ROLLING)
    assert cp1.command == (
        "/opt/rke-tools/rke-etcd-backup", "etcd-backup", "save",
        "--cacert", "/etc/kubernetes/ssl/kube-etcd-ca.pem",
        "--cert", "/etc/kubernetes/ssl/kube-etcd-10-0-0-1.pem",
        "--key", "/etc/kubernetes/ssl/kube-etcd-10-0-0-1-key.pem",
        "--name", "etcd-rolling-snapshots",
        "--endpoints=10.0.0.1:2379",  # as RKE: the internal address
        "--retention=72h", "--creation=12h",
    )
    assert cp1.args == ()
    assert cp1.image == "rancher/rke-tools:v0.1.102"  # system_images.alpine
    assert cp1.binds == ("/opt/rke/etcd-snapshots:/backup", "/etc/kubernetes:/etc/kubernetes")
    assert cp1.health is None
    assert (cp1.restart, cp1.network_mode, cp1.privileged) == ("always", "host", False)
    assert cp1.volumes_from == ()
    # the certificates it reads are in its hash: a rotation replaces it
    assert dict(cp1.labels).get("io.rkel.certs")
    other = spec(d, "10.0.0.2", ROLLING)
    assert "--cert" in other.command and "/etc/kubernetes/ssl/kube-etcd-10-0-0-2.pem" in other.command
    assert spec(d, "w1", "kubelet") and d.node("w1").service(ROLLING) is None


def test_rolling_snapshots_backup_config_env_prefix_and_image():
    etcd = EtcdService(
        creation="6h", retention="24h", extra_env=["HTTPS_PROXY=http://proxy:3128"],
        extra_binds=["/srv/etcd-extra:/extra"],
        backup_config=BackupConfig(interval_hours=3, retention=10),
    )
    node = Node("198.51.100.8", "rke", ("etcd", "controlplane"), internal_address="10.0.0.8")
    d = compile_desired(config(node, services=Services(etcd=etcd), prefix_path="/opt/p/",
                               system_images={"alpine": "example.com/rke-tools:v9"}))
    s = spec(d, "198.51.100.8", ROLLING)
    assert s.command[-3:] == ("--endpoints=10.0.0.8:2379", "--interval-hours=3", "--retention=10")
    assert not any(c.startswith("--creation") for c in s.command)
    assert s.env == ("HTTPS_PROXY=http://proxy:3128",)
    assert s.binds == ("/opt/p/opt/rke/etcd-snapshots:/backup", "/opt/p/etc/kubernetes:/etc/kubernetes")
    assert s.image == "example.com/rke-tools:v9"
    # backup_config disabled with snapshot on: services.etcd's durations instead
    off = replace_backup(etcd, BackupConfig(enabled=False, interval_hours=3, retention=10))
    d = compile_desired(config(node, services=Services(etcd=off)))
    assert spec(d, "198.51.100.8", ROLLING).command[-2:] == ("--retention=24h", "--creation=6h")


def replace_backup(etcd: EtcdService, backup: BackupConfig) -> EtcdService:
    return dataclasses.replace(etcd, backup_config=backup)


def test_rolling_snapshots_setting_change_changes_only_its_hash():
    before = compile_desired(config())
    after = compile_desired(config(services=Services(etcd=EtcdService(creation="6h"))))
    changed = {(n.name, s.name) for n in after.nodes for s in n.services
               if before.node(n.name).service(s.name).hash != s.hash}
    assert changed == {("cp1", ROLLING), ("10.0.0.2", ROLLING)}


def test_etcd_listens_on_internal_address_when_it_differs():
    node = Node("198.51.100.8", "rke", ("etcd", "controlplane"), internal_address="10.0.0.8")
    d = compile_desired(config(node))
    etcd = spec(d, "198.51.100.8", "etcd")
    assert flag(etcd, "listen-client-urls") == ["https://10.0.0.8:2379"]
    assert flag(etcd, "listen-peer-urls") == ["https://10.0.0.8:2380"]
    assert flag(etcd, "advertise-client-urls") == ["https://10.0.0.8:2379"]
    assert "ETCDCTL_ENDPOINTS=https://10.0.0.8:2379" in etcd.env
    assert flag(spec(d, "198.51.100.8", "kube-apiserver"), "etcd-servers") == [
        "https://10.0.0.8:2379"
    ]


def test_config_values_reach_flags():
    services = Services(
        kube_api=KubeAPIService(
            service_cluster_ip_range="10.96.0.0/12",
            service_node_port_range="31000-32000",
            always_pull_images=True,
        ),
        kube_controller=KubeControllerService(
            cluster_cidr="10.244.0.0/16", service_cluster_ip_range="10.96.0.0/12"
        ),
        kubelet=KubeletService(
            cluster_domain="corp.local", cluster_dns_server="10.96.0.10", fail_swap_on=True
        ),
        kubeproxy=KubeproxyService(),
    )
    d = compile_desired(config(CP, services=services, authorization=Authorization(mode="none")))
    api = spec(d, "cp1", "kube-apiserver")
    assert flag(api, "service-cluster-ip-range") == ["10.96.0.0/12"]
    assert flag(api, "service-node-port-range") == ["31000-32000"]
    assert flag(api, "enable-admission-plugins")[0].endswith(",AlwaysPullImages")
    assert flag(api, "authorization-mode") == []
    kcm = spec(d, "cp1", "kube-controller-manager")
    assert flag(kcm, "cluster-cidr") == ["10.244.0.0/16"]
    assert flag(kcm, "use-service-account-credentials") == []
    kubelet = spec(d, "cp1", "kubelet")
    assert flag(kubelet, "cluster-domain") == ["corp.local"]
    assert flag(kubelet, "cluster-dns") == ["10.96.0.10"]
    assert flag(kubelet, "fail-swap-on") == ["true"]
    assert flag(spec(d, "cp1", "kube-proxy"), "cluster-cidr") == ["10.244.0.0/16"]


def test_cri_dockerd_off_when_disabled_explicitly():
    kubelet = spec(compile_desired(config(CP, enable_cri_dockerd=False)), "cp1", "kubelet")
    assert flag(kubelet, "container-runtime-endpoint") == []
    assert kubelet.env == ()
    assert "/var/lib/cri-dockerd:/var/lib/cri-dockerd" not in kubelet.binds


def test_external_etcd():
    services = Services(
        etcd=EtcdService(external_urls=["https://etcd-b:2379", "https://etcd-a:2379"], path="/k8s")
    )
    d = compile_desired(
        config(Node("10.0.0.1", "rke", ("controlplane", "worker")), services=services)
    )
    api = spec(d, "10.0.0.1", "kube-apiserver")
    assert flag(api, "etcd-servers") == ["https://etcd-b:2379,https://etcd-a:2379"]
    assert flag(api, "etcd-prefix") == ["/k8s"]
    assert flag(api, "etcd-certfile") == ["/etc/kubernetes/ssl/kube-etcd-client.pem"]
    assert flag(api, "etcd-cafile") == ["/etc/kubernetes/ssl/kube-etcd-client-ca.pem"]


# --- certificates ------------------------------------------------------------------------------


def test_apiserver_sans():
    cp2 = Node(
        "198.51.100.5",
        "rke",
        ("controlplane",),
        internal_address="10.0.0.5",
        hostname_override="Master-2",
    )
    services = Services(
        kube_api=KubeAPIService(service_cluster_ip_range="10.96.0.0/12"),
        kubelet=KubeletService(cluster_domain="corp.local"),
    )
    d = compile_desired(
        config(
            CP,
            cp2,
            ETCD,
            WORKER,
            services=services,
            authentication=Authentication(sans=["api.example.com", "10.0.0.1"]),
        )
    )
    n = d.node("cp1")
    assert n is not None
    api = next(c for c in n.certs if c.name == "kube-apiserver")
    assert api.sans == (
        "10.0.0.1",
        "10.0.0.5",
        "10.96.0.1",
        "127.0.0.1",
        "198.51.100.5",
        "api.example.com",
        "cp1",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.corp.local",
        "localhost",
        "master-2",
    )
    assert api.ca == "kube-ca"


def test_etcd_cert_sans_and_names():
    etcd3 = Node("198.51.100.6", "rke", ("etcd",), internal_address="10.0.0.6")
    d = compile_desired(config(CP, ETCD, etcd3, WORKER))
    # Each member's certificate names only that member (and loopback), so a membership change
    # leaves the other members' certificates, and their containers, untouched.
    expected = {
        "cp1": ("10.0.0.1", "127.0.0.1", "cp1", "localhost"),
        "198.51.100.6": ("10.0.0.6", "127.0.0.1", "198.51.100.6", "localhost"),
    }
    for node, cert in (("cp1", "kube-etcd-10-0-0-1"), ("198.51.100.6", "kube-etcd-10-0-0-6")):
        n = d.node(node)
        assert n is not None
        req = next(c for c in n.certs if c.name == cert)
        assert req.sans == expected[node]
        assert req.ca == "kube-etcd-ca"
        assert flag(spec(d, node, "etcd"), "cert-file") == [f"/etc/kubernetes/ssl/{cert}.pem"]


def test_membership_change_keeps_other_members_specs():
    before = compile_desired(config(CP, ETCD, WORKER))
    extra = Node("10.0.0.9", "rke", ("etcd",))
    after = compile_desired(config(CP, ETCD, WORKER, extra))
    assert spec(before, "cp1", "etcd").hash == spec(after, "cp1", "etcd").hash


def test_san_change_restarts_only_the_apiserver():
    base = config(CP, ETCD, WORKER)
    before = compile_desired(base)
    after = compile_desired(dataclasses.replace(base, authentication=Authentication(sans=["api.example.com"])))
    changed = sorted(
        s.name for n in after.nodes for s in n.services
        if s.hash != spec(before, n.name, s.name).hash
    )
    assert changed == ["kube-apiserver"]


def test_cert_sets_per_role():
    d = compile_desired(config())
    names = {n.name: [c.name for c in n.certs] for n in d.nodes}
    # kube-admin is rkel's own identity: kept in the state, never put on a node
    assert [c.name for c in d.cluster_certs] == ["kube-admin"]
    assert names == {
        "cp1": [
            "kube-apiserver",
            "kube-apiserver-etcd-client",
            "kube-apiserver-proxy-client",
            "kube-apiserver-requestheader-ca",
            "kube-ca",
            "kube-controller-manager",
            "kube-etcd-10-0-0-1",
            "kube-etcd-ca",
            "kube-node-cp1",
            "kube-proxy",
            "kube-scheduler",
            "kube-service-account-token",
        ],
        "10.0.0.2": [
            "kube-ca",
            "kube-etcd-10-0-0-2",
            "kube-etcd-ca",
            "kube-node-10.0.0.2",
            "kube-proxy",
        ],
        "w1": ["kube-ca", "kube-node-w1", "kube-proxy"],
    }
    by_name = {c.name: c for n in d.nodes for c in n.certs}
    assert (by_name["kube-node-w1"].common_name, by_name["kube-node-w1"].organizations) == (
        "system:node:w1",
        ("system:nodes",),
    )
    assert d.cluster_certs[0].organizations == ("system:masters",)
    assert by_name["kube-proxy"].common_name == "system:kube-proxy"
    assert by_name["kube-controller-manager"].common_name == "system:kube-controller-manager"
    assert by_name["kube-scheduler"].common_name == "system:kube-scheduler"
    assert by_name["kube-apiserver-etcd-client"].ca == "kube-etcd-ca"
    assert by_name["kube-apiserver-proxy-client"].ca == "kube-apiserver-requestheader-ca"
    cas = sorted(c.name for c in by_name.values() if is_ca(c))
    assert cas == ["kube-apiserver-requestheader-ca", "kube-ca", "kube-etcd-ca"]


def test_kubelet_serving_certificate():
    services = Services(kubelet=KubeletService(generate_serving_certificate=True))
    d = compile_desired(config(services=services))
    kubelet = spec(d, "w1", "kubelet")
    assert flag(kubelet, "tls-cert-file") == ["/etc/kubernetes/ssl/kube-kubelet-10-0-0-3.pem"]
    n = d.node("w1")
    assert n is not None
    req = next(c for c in n.certs if c.name == "kube-kubelet-10-0-0-3")
    assert req.sans == ("10.0.0.3", "203.0.113.3", "w1")
    assert flag(spec(d, "cp1", "kube-apiserver"), "kubelet-certificate-authority") == [
        "/etc/kubernetes/ssl/kube-ca.pem"
    ]


# --- hashes ------------------------------------------------------------------------------------


def _hashes(d: Desired) -> dict[str, dict[str, str]]:
    return {n.name: {s.name: s.hash for s in n.services} for n in d.nodes}


def test_hash_stable_across_runs_and_processes():
    cfg = config(
        services=Services(
            kube_api=KubeAPIService(
                extra_args={"b": "1", "a": "2"}, extra_args_array={"z": ["1"], "y": ["2"]}
            )
        ),
    )
    assert _hashes(compile_desired(cfg)) == _hashes(compile_desired(cfg))
    # dict order of extra_args does not matter
    swapped = dataclasses.replace(
        cfg,
        services=Services(
            kube_api=KubeAPIService(
                extra_args={"a": "2", "b": "1"}, extra_args_array={"y": ["2"], "z": ["1"]}
            )
        ),
    )
    assert _hashes(compile_desired(swapped)) == _hashes(compile_desired(cfg))
    # another process with another hash seed computes the same fingerprint
    code = (
        "from tests.test_desired import config; from lifecycle.desired import compile_desired;"
        "print(compile_desired(config()).fingerprint)"
    )
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        outs.add(out.stdout.strip())
    assert outs == {compile_desired(config()).fingerprint}


def test_hash_changes_when_an_arg_changes():
    base = compile_desired(config())
    changed = compile_desired(
        config(services=Services(kube_api=KubeAPIService(extra_args={"v": "4"})))
    )
    assert spec(base, "cp1", "kube-apiserver").hash != spec(changed, "cp1", "kube-apiserver").hash
    assert spec(base, "cp1", "kubelet").hash == spec(changed, "cp1", "kubelet").hash


def test_etcd_membership_change_does_not_change_existing_member_hash():
    before = compile_desired(config())
    new_member = Node("10.0.0.4", "rke", ("etcd",))
    after = compile_desired(config(CP, ETCD, WORKER, new_member))
    for node in ("cp1", "10.0.0.2"):
        old, new = spec(before, node, "etcd"), spec(after, node, "etcd")
        assert old.hash == new.hash
        assert old.bootstrap_args != new.bootstrap_args
    assert "etcd-10.0.0.4=https://10.0.0.4:2380" in spec(after, "cp1", "etcd").bootstrap_args[0]
    # the apiserver's etcd server list legitimately changes
    assert spec(before, "cp1", "kube-apiserver").hash != spec(after, "cp1", "kube-apiserver").hash
    # workers are untouched
    assert _hashes(before)["w1"] == _hashes(after)["w1"]


# --- versions ----------------------------------------------------------------------------------


def test_unsupported_version_raises_plan_error_listing_supported():
    with pytest.raises(PlanError) as err:
        compile_desired(config(kubernetes_version="v1.18.20-rancher1-1"))
    msg = str(err.value)
    assert "v1.18.20-rancher1-1" in msg
    for v in ("v1.29.9-rancher1-1", "v1.30.5-rancher1-1", "v1.31.1-rancher1-1"):
        assert v in msg
    assert "system_images" in msg


@pytest.mark.parametrize("version", supported_versions())
def test_every_supported_version_compiles(version):
    d = compile_desired(config(kubernetes_version=version))
    assert d.kubernetes_version == version
    tag = version.rsplit("-", 1)[0]  # v1.30.5-rancher1-1 -> v1.30.5-rancher1
    assert spec(d, "cp1", "kube-apiserver").image == f"rancher/hyperkube:{tag}"
    assert spec(d, "cp1", "etcd").image.startswith("rancher/mirrored-coreos-etcd:v3.5.")


def test_supported_versions_and_default():
    versions = supported_versions()
    assert versions == sorted(versions, key=semver_key)
    assert {"v1.29.9-rancher1-1", "v1.30.5-rancher1-1", "v1.31.1-rancher1-1"} <= set(versions)
    assert DEFAULT_KUBERNETES_VERSION in versions
    assert compile_desired(config()).kubernetes_version == DEFAULT_KUBERNETES_VERSION


def test_semver_key_orders_numerically():
    names = [
        "v1.30.5-rancher1-10",
        "v1.9.0-rancher1-1",
        "v1.30.5-rancher1-2",
        "v1.30.10-rancher1-1",
    ]
    assert sorted(names, key=semver_key) == [
        "v1.9.0-rancher1-1",
        "v1.30.5-rancher1-2",
        "v1.30.5-rancher1-10",
        "v1.30.10-rancher1-1",
    ]


def test_version_info_images_and_flags():
    info = version_info("v1.30.5-rancher1-1")
    assert info.images["kubernetes"] == "rancher/hyperkube:v1.30.5-rancher1"
    assert info.images["etcd"] == "rancher/mirrored-coreos-etcd:v3.5.12"
    assert info.images["pod_infra_container"] == "rancher/mirrored-pause:3.7"
    assert info.images["nginx_proxy"].startswith("rancher/rke-tools:v0.1.")
    assert set(info.flags) == {
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
        "kube-proxy",
    }
    info.flags["kube-apiserver"]["profiling"] = "mutated"  # callers get copies
    assert version_info("v1.30.5-rancher1-1").flags["kube-apiserver"]["profiling"] == "false"
    with pytest.raises(KeyError):
        version_info("v0.0.1")


@pytest.mark.parametrize(
    "text, problem",
    [
        ("base: {}\nversions: {}\n", "non-empty"),
        ("versions:\n  v1.30.5-rancher1-1: {images: {etcd: x}}\n", "images.kubernetes"),
        ("versions:\n  v1.30.5-rancher1-1: {images: {kubernetes: x, etcdd: y}}\n", "etcdd"),
        (
            "versions:\n  v1.30.5-rancher1-1: {images: {kubernetes: x}, flags: {kubeapi: {}}}\n",
            "kubeapi",
        ),
        ("versions:\n  latest: {images: {kubernetes: x}}\n", "not a version name"),
    ],
)
def test_catalog_rejects_bad_data(text, problem):
    with pytest.raises(ValueError, match=problem):
        VersionCatalog.from_text(text)


def test_strategy_copied_from_upgrade_strategy():
    us = UpgradeStrategy(
        max_unavailable_worker="25%",
        max_unavailable_controlplane="2",
        drain=True,
        node_drain_input=DrainInput(
            force=True,
            ignore_daemonsets=False,
            delete_local_data=True,
            grace_period=30,
            timeout=600,
        ),
    )
    s = compile_desired(config(upgrade_strategy=us)).strategy
    assert (s.max_unavailable_worker, s.max_unavailable_controlplane, s.drain) == ("25%", "2", True)
    assert (s.drain_force, s.drain_ignore_daemonsets, s.drain_delete_local_data) == (
        True,
        False,
        True,
    )
    assert (s.drain_grace_period, s.drain_timeout) == (30, 600)
