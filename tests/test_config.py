"""cluster.yml loading: the 14 real RKE files, the schema, the semantic rules and the limits.

The real files live in /work/shared/rke-configs (see SOURCES.md there); RKEL_RKE_CONFIGS points
the suite at another copy.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import lifecycle.config as config_pkg
from lifecycle.config import ConfigIssue, LoadedConfig, load_config, load_config_text
from lifecycle.config.model import ClusterConfig
from lifecycle.errors import ConfigError


def _configs_dir() -> Path:
    override = os.environ.get("RKEL_RKE_CONFIGS")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared" / "rke-configs"


CONFIGS = _configs_dir()
CONFIG_FILES = sorted(CONFIGS.glob("*.yml")) if CONFIGS.is_dir() else []

NODE = """nodes:
  - address: 10.0.0.1
    user: rke
    role: [controlplane, etcd, worker]
"""


def load(text: str) -> LoadedConfig:
    return load_config_text(text, source="test.yml")


def errors_of(text: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        load(text)
    return list(info.value.issues)


def find(
    issues: list[ConfigIssue] | tuple[ConfigIssue, ...], path: str, fragment: str
) -> ConfigIssue:
    """The issue at `path` whose text contains `fragment` (fails listing what there was)."""
    for issue in issues:
        if issue.path == path and fragment in str(issue):
            return issue
    raise AssertionError(
        f"no issue at {path!r} containing {fragment!r}; got:\n" + "\n".join(map(str, issues))
    )


# -- the real files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """What loading one real file must give."""

    nodes: int = 0
    warnings: dict[str, str] = field(default_factory=dict)  # path -> text the warning contains
    check: Callable[[ClusterConfig], None] | None = None
    error: tuple[str, int, str] | None = None  # (path, line, text) of the only error


def _check_01(c: ClusterConfig) -> None:
    assert c.services.kube_api.extra_args == {"v": "4"}
    assert c.services.kube_api.service_cluster_ip_range == "10.233.0.0/18"
    assert c.services.kube_controller.cluster_cidr == "10.233.64.0/18"
    assert c.services.kubelet.cluster_dns_server == "10.233.0.3"
    assert c.services.etcd.image == "quay.io/coreos/etcd:latest"
    assert c.nodes[2].name == "node3" and c.nodes[2].internal == "192.168.1.6"
    assert c.nodes[1].ssh_key.startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert c.authentication.strategy == "x509"  # read from the legacy `auth:`
    assert c.network.plugin == "flannel"
    assert c.ssh_key_path == "~/.ssh/test"
    assert "kubedns_image" not in c.system_images and c.system_images["alpine"] == "alpine:latest"
    assert "kind: Pod" in c.addons


def _check_04(c: ClusterConfig) -> None:
    assert c.nodes[0].role == ("controlplane", "etcd", "worker")
    assert [n.name for n in c.nodes_with("worker")] == [
        "192.168.3.31",
        "192.168.3.32",
        "192.168.3.33",
    ]
    # everything else is RKE's defaults
    assert c.network.plugin == "canal" and c.cluster_name == "local"
    assert c.ssh_key_path == "~/.ssh/id_rsa" and c.nodes[0].port == 22
    assert c.services.kube_api.service_cluster_ip_range == "10.43.0.0/16"
    assert c.upgrade_strategy.max_unavailable_worker == "10%"


def _check_05(c: ClusterConfig) -> None:
    etcd = c.services.etcd
    assert (etcd.snapshot, etcd.creation, etcd.retention) == (True, "6h", "24h")
    assert c.ingress["options"] == {"use-forwarded-headers": "true"}


def _check_06(c: ClusterConfig) -> None:
    assert len(c.nodes_with("etcd")) == 3 and len(c.nodes_with("controlplane")) == 2
    assert all(n.role == ("etcd",) for n in c.nodes_with("etcd"))
    backup = c.services.etcd.backup_config
    assert backup is not None and backup.enabled is True
    assert (backup.interval_hours, backup.retention) == (6, 28)
    assert backup.s3backupconfig is not None
    assert backup.s3backupconfig.bucket_name == "im-rancher"
    assert backup.s3backupconfig.region == "eu-central-1"
    assert c.kubernetes_version == "v1.19.9-rancher1-1" and c.cluster_name == "rancher-xchem"


def _check_07(c: ClusterConfig) -> None:
    assert {n.port for n in c.nodes} == {22}  # written as "22"
    assert [n.name for n in c.nodes[:3]] == ["master-1", "master-2", "master-3"]
    assert len(c.nodes_with("worker")) == 10
    assert all(n.labels == {"app": "ingress"} for n in c.nodes_with("worker"))
    assert c.services.kubelet.extra_args["max-pods"] == "250"
    assert c.services.etcd.extra_args["quota-backend-bytes"] == "4294967296"
    registry = c.private_registries[0]
    assert registry.url == "registry.cn-hangzhou.aliyuncs.com" and registry.is_default
    assert registry.user == ""
    assert c.restore == {"restore": False, "snapshot_name": ""}
    assert c.ingress["node_selector"] == {"app": "ingress"}


def _check_09(c: ClusterConfig) -> None:
    assert [n.port for n in c.nodes] == [22, 60022, 60022, 60022, 60022]
    assert c.ssh_agent_auth is True and len(c.nodes_with("etcd")) == 4
    assert c.network.options == {"flannel_backend_type": "host-gw", "flannel_iface": "vlan.99"}
    assert c.services.kubelet.extra_binds == ["/:/host:rslave"]
    assert c.services.kubeproxy.extra_args == {"proxy-mode": "ipvs", "ipvs-scheduler": "rr"}


def _check_10(c: ClusterConfig) -> None:
    assert c.network.plugin == "none"
    assert len(c.addons) > 20_000 and "calico-kube-controllers" in c.addons
    assert "2406:da14:242:f10:2e55:ec8a:852f:e0f6" in c.authentication.sans
    assert c.services.kube_api.extra_args["delete-collection-workers"] == "3"
    assert c.dns == {"provider": "coredns"}


def _check_11(c: ClusterConfig) -> None:
    assert c.nodes[0].port == 2223 and c.nodes[1].port == 22
    assert c.services.kube_api.secrets_encryption_config == {"enabled": True}
    assert c.system_images == {"kubernetes": "rancher/hyperkube:v1.18.9-rancher1"}
    assert c.addon_job_timeout == 60 and c.ignore_docker_version is True
    assert c.services.etcd.backup_config is None  # etcd-snapshot configured nothing


def _check_13(c: ClusterConfig) -> None:
    (registry,) = c.private_registries
    assert registry.url == "registry.omdgrp.ir" and registry.user == ""  # `username` ignored
    assert c.bastion_host is None and c.cloud_provider is None and c.dns is None
    assert c.system_images == {}  # every image null: all defaults
    assert c.addon_job_timeout == 45 and c.network.plugin == "calico"
    assert (
        c.services.etcd.creation == "12h"
        and c.services.kube_api.service_node_port_range == "30000-32767"
    )
    assert c.kubernetes_version == "v1.22.5-rancher1-1"
    assert [n.name for n in c.nodes] == ["rkm1", "rkm2", "rkw1", "rkw2"]


def _check_15(c: ClusterConfig) -> None:
    assert c.network.plugin == "calico" and c.ingress == {"provider": "none"}
    assert c.services.kube_api.service_cluster_ip_range == "10.96.0.0/16"
    assert c.services.kube_controller.cluster_cidr == "10.69.0.0/16"
    assert c.addons_include == ["https://docs.projectcalico.org/manifests/calico.yaml"]
    assert c.services.kubelet.extra_env == []


def _check_16(c: ClusterConfig) -> None:
    assert "weave_node" not in c.system_images and "wave_node" not in c.system_images
    assert c.system_images["weave_cni"] == "weaveworks/weave-npc:2.1.2"
    assert c.services.kubelet.cluster_domain == "k8s.test.net"
    assert [n.name for n in c.nodes] == [f"10.198.1.{i}" for i in range(156, 161)]
    assert c.kubernetes_version == "" and c.version.startswith("v1.")


def _check_19(c: ClusterConfig) -> None:
    assert c.ssh_key_path == "~/.ssh/id_rsa"  # the later `ssh_key_path: ""` wins -> default
    assert c.services.etcd.uid == 52034 and c.services.etcd.gid == 52034
    assert c.services.kube_api.audit_log == {"enabled": True, "configuration": None}
    assert c.services.kube_api.event_rate_limit == {"enabled": True, "configuration": None}
    assert c.services.kubelet.generate_serving_certificate is True
    assert (c.network.plugin, c.authentication.strategy, c.authorization.mode) == (
        "canal",
        "x509",
        "rbac",
    )
    assert c.cluster_name == "local" and c.upgrade_strategy.max_unavailable_controlplane == "1"


def _check_20(c: ClusterConfig) -> None:
    admission = c.services.kube_api.admission_configuration
    assert admission is not None and admission["plugins"][0]["name"] == "PodSecurity"
    exemptions = admission["plugins"][0]["configuration"]["exemptions"]
    assert "kube-system" in exemptions["namespaces"] and exemptions["usernames"] == []
    assert c.authentication.strategy == "x509"
    assert c.ssh_key_path == ".ssh/$AWS_SSH_KEY_NAME"


PLACEHOLDER = "unfilled template placeholder"
EXPECTED: dict[str, Expect] = {
    "01": Expect(
        3,
        {
            "auth": "spelling of `authentication`",
            "auth.options": "RKE ignores it",
            "system_images.kubedns_image": "did you mean `kubedns`?",
            "system_images.dnsmasq_image": "did you mean `dnsmasq`?",
            "system_images.kubedns_sidecar_image": "did you mean `kubedns_sidecar`?",
            "system_images.kubedns_autoscaler_image": "did you mean `kubedns_autoscaler`?",
        },
        _check_01,
    ),
    "02": Expect(
        error=("nodes[2].role[0]", 21, "unknown role `role` (valid: controlplane, etcd, worker)")
    ),
    "04": Expect(3, {}, _check_04),
    "05": Expect(3, {}, _check_05),
    "06": Expect(7, {}, _check_06),
    "07": Expect(13, {}, _check_07),
    "09": Expect(5, {}, _check_09),
    "10": Expect(3, {"monitoring.provider": "did you mean `metrics-server`?"}, _check_10),
    "11": Expect(5, {"services.etcd-snapshot": "services.etcd.backup_config"}, _check_11),
    "13": Expect(
        4,
        {
            "private_registries": "given twice (lines 201 and 202)",
            "private_registries[0].username": "WITHOUT credentials; did you mean `user`?",
        },
        _check_13,
    ),
    "15": Expect(6, {}, _check_15),
    "16": Expect(
        5,
        {
            "services.kube-api.pod_security_policy": "Kubernetes 1.25",
            "system_images.wave_node": "did you mean `weave_node`?",
        },
        _check_16,
    ),
    "19": Expect(
        3,
        {
            "ssh_key_path": "given twice (lines 1 and 190)",
            "nodes[0].address": "`$ip0`",
            "nodes[1].address": PLACEHOLDER,
            "nodes[2].address": PLACEHOLDER,
            "services.kube-api.pod_security_policy": "Kubernetes 1.25",
        },
        _check_19,
    ),
    "20": Expect(
        3,
        {
            "auth": "spelling of `authentication`",
            "ssh_key_path": PLACEHOLDER,
            "kubernetes_version": "`$KUBERNETES_VERSION`",
            "nodes[0].address": "`$ip0`",
            "nodes[1].address": PLACEHOLDER,
            "nodes[2].address": PLACEHOLDER,
        },
        _check_20,
    ),
}


def test_the_real_files_are_there() -> None:
    found = {p.name[:2] for p in CONFIG_FILES}
    assert found >= set(EXPECTED), f"missing in {CONFIGS}: {sorted(set(EXPECTED) - found)}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name[:2])
def test_real_file(path: Path) -> None:
    expect = EXPECTED.get(path.name[:2])
    if expect is None:  # a file added to the corpus without an expectation: it must not crash
        with contextlib.suppress(ConfigError):
            load_config(path)
        return
    if expect.error is not None:
        err_path, line, text = expect.error
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert [(i.path, i.line) for i in info.value.issues] == [(err_path, line)]
        assert text in str(info.value) and f"line {line}: {err_path}:" in str(info.value)
        return
    loaded = load_config(path)
    assert loaded.source == str(path)
    assert len(loaded.config.nodes) == expect.nodes
    assert {w.path for w in loaded.warnings} == set(expect.warnings), "\n".join(
        map(str, loaded.warnings)
    )
    for warn_path, text in expect.warnings.items():
        find(loaded.warnings, warn_path, text)
    assert all(w.line is not None for w in loaded.warnings)
    if expect.check is not None:
        expect.check(loaded.config)


# -- API and messages -------------------------------------------------------------------------


def test_public_api() -> None:
    assert {"ConfigIssue", "LoadedConfig", "load_config", "load_config_text"} <= set(
        config_pkg.__all__
    )
    issue = ConfigIssue(
        "nodes[2].role[0]", 12, "unknown role `role` (valid: controlplane, etcd, worker)"
    )
    assert (
        str(issue)
        == "line 12: nodes[2].role[0]: unknown role `role` (valid: controlplane, etcd, worker)"
    )
    hinted = ConfigIssue("x", None, "unknown key `y`", "did you mean `z`?")
    assert str(hinted) == "x: unknown key `y`; did you mean `z`?"


def test_typo_key_suggests_the_right_one() -> None:
    text = NODE + "    hostname_overide: n1\n"
    with pytest.raises(ConfigError) as info:
        load(text)
    message = str(info.value)
    assert "did you mean `hostname_override`?" in message
    issue = find(info.value.issues, "nodes[0].hostname_overide", "unknown key")
    assert issue.line == 5 and "line 5:" in message


def test_unknown_top_level_key_and_section_keys() -> None:
    issues = errors_of(
        NODE + "pihole: {}\nservices:\n  kube_api: {}\n  kubelet:\n    extra_arg: {}\n"
    )
    find(issues, "pihole", "unknown key `pihole`")
    find(issues, "services.kube_api", "did you mean `kube-api`?")
    find(issues, "services.kubelet.extra_arg", "did you mean `extra_args`?")


def test_every_error_is_reported_at_once() -> None:
    text = """nodes:
  - address: 10.0.0.1
    role: [etcd, master]
    port: abc
  - address: 10.0.0.1
    user: rke
    role: [controlplane]
network:
  plugin: cilium
kubernetes_version: "1.20"
services:
  kube-api:
    service_cluster_ip_range: 10.43.0.0/33
"""
    issues = errors_of(text)
    find(issues, "nodes[0]", "User for host (1) is not provided")
    find(issues, "nodes[0].role[1]", "unknown role `master`")
    find(issues, "nodes[0].port", "got `abc`")
    find(issues, "nodes[1].address", "also used by nodes[0]")
    find(issues, "network.plugin", "unknown network plugin `cilium`")
    find(issues, "kubernetes_version", "`1.20`")
    find(issues, "services.kube-api.service_cluster_ip_range", "not a CIDR")
    assert [i.line for i in issues] == sorted(i.line or 0 for i in issues)  # file order


# -- semantic rules ---------------------------------------------------------------------------


def _node(
    address: str = "10.0.0.1", roles: str = "[controlplane, etcd, worker]", extra: str = ""
) -> str:
    return f"  - address: {address}\n    user: rke\n    role: {roles}\n{extra}"


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        ("nodes: []\n", "nodes", "no nodes"),
        ("services: {}\n", "nodes", "no nodes"),
        (
            "nodes:\n" + _node(roles="[controlplane, worker]"),
            "nodes",
            "no node has the `etcd` role",
        ),
        ("nodes:\n" + _node(roles="[etcd]"), "nodes", "no node has the `controlplane` role"),
        (
            "nodes:\n" + _node() + _node(roles="[worker]"),
            "nodes[1].address",
            "also used by nodes[0] (line 2)",
        ),
        (
            "nodes:\n"
            + _node(extra="    hostname_override: Node-A\n")
            + _node("10.0.0.2", "[worker]", "    hostname_override: node-a\n"),
            "nodes[1].hostname_override",
            "node name `node-a` is also the name of nodes[0]",
        ),
        (
            "nodes:\n" + _node() + _node("10.0.0.2", "[role]"),
            "nodes[1].role[0]",
            "unknown role `role` (valid: controlplane, etcd, worker)",
        ),
        (
            "nodes:\n" + _node() + _node("10.0.0.2", "[workers]"),
            "nodes[1].role[0]",
            "did you mean `worker`?",
        ),
        (
            "nodes:\n" + _node() + "  - address: 10.0.0.2\n    role: [worker]\n",
            "nodes[1]",
            "User for host (2) is not provided",
        ),
        ("nodes:\n" + _node() + _node("10.0.0.2", "[]"), "nodes[1].role", "has no roles"),
        (
            "nodes:\n" + _node() + "  - address: 10.0.0.2\n    user: rke\n",
            "nodes[1]",
            "has no roles",
        ),
        (
            "nodes:\n" + _node() + "  - user: rke\n    role: [worker]\n",
            "nodes[1]",
            "has no `address`",
        ),
        ("nodes:\n" + _node(extra="    port: 0\n"), "nodes[0].port", "out of range"),
        ("nodes:\n" + _node(extra="    port: 65536\n"), "nodes[0].port", "from 1 to 65535"),
        ("nodes:\n" + _node(extra="    port: ssh\n"), "nodes[0].port", "got `ssh`"),
        (
            "nodes:\n"
            + _node(extra="    taints:\n      - {key: a, value: b, effect: NoScheduled}\n"),
            "nodes[0].taints[0].effect",
            "did you mean `NoSchedule`?",
        ),
        (
            "nodes:\n" + _node(extra="    taints:\n      - {key: a, effect: ''}\n"),
            "nodes[0].taints[0].effect",
            "unknown taint effect ``",
        ),
    ],
)
def test_node_rules(text: str, path: str, fragment: str) -> None:
    find(errors_of(text), path, fragment)


@pytest.mark.parametrize(
    ("section", "path", "fragment"),
    [
        (
            "services:\n  kube-api:\n    service_cluster_ip_range: 10.43.0/16\n",
            "services.kube-api.service_cluster_ip_range",
            "not a CIDR",
        ),
        (
            "services:\n  kube-controller:\n    cluster_cidr: 10.42.0.0/99\n",
            "services.kube-controller.cluster_cidr",
            "not a CIDR",
        ),
        (
            "services:\n  kube-controller:\n    cluster_cidr: 10.42.0.0/16,10.44.0.0/16\n",
            "services.kube-controller.cluster_cidr",
            "one IPv6",
        ),
        (
            "services:\n  kubelet:\n    cluster_dns_server: dns\n",
            "services.kubelet.cluster_dns_server",
            "not an IP",
        ),
        (
            "services:\n  kube-api:\n    service_node_port_range: '30000'\n",
            "services.kube-api.service_node_port_range",
            "1 <= A < B <= 65535",
        ),
        (
            "services:\n  kube-api:\n    service_node_port_range: 0-100\n",
            "services.kube-api.service_node_port_range",
            "not a port range",
        ),
        (
            "services:\n  kube-api:\n    service_node_port_range: 200-100\n",
            "services.kube-api.service_node_port_range",
            "not a port range",
        ),
        (
            "services:\n  kube-api:\n    service_node_port_range: 1-70000\n",
            "services.kube-api.service_node_port_range",
            "not a port range",
        ),
        (
            "upgrade_strategy:\n  max_unavailable_worker: 0\n",
            "upgrade_strategy.max_unavailable_worker",
            "`0`",
        ),
        (
            "upgrade_strategy:\n  max_unavailable_worker: 0%\n",
            "upgrade_strategy.max_unavailable_worker",
            "`0%`",
        ),
        (
            "upgrade_strategy:\n  max_unavailable_worker: abc\n",
            "upgrade_strategy.max_unavailable_worker",
            "`abc`",
        ),
        (
            "upgrade_strategy:\n  max_unavailable_worker: 10.5%\n",
            "upgrade_strategy.max_unavailable_worker",
            "`10.5%`",
        ),
        (
            "upgrade_strategy:\n  max_unavailable_controlplane: 101%\n",
            "upgrade_strategy.max_unavailable_controlplane",
            "`101%`",
        ),
        ("network:\n  plugin: cilium\n", "network.plugin", "unknown network plugin `cilium`"),
        ("network:\n  plugin: flanel\n", "network.plugin", "did you mean `flannel`?"),
        (
            "authorization:\n  mode: abac\n",
            "authorization.mode",
            "unknown authorization mode `abac`",
        ),
        (
            "authentication:\n  strategy: oidc\n",
            "authentication.strategy",
            "unknown authentication strategy",
        ),
        ("auth:\n  strategy: oidc\n", "auth.strategy", "unknown authentication strategy"),
        ("kubernetes_version: v1.20\n", "kubernetes_version", "not a Kubernetes version"),
        ("kubernetes_version: 1.20.5\n", "kubernetes_version", "not a Kubernetes version"),
        ("kubernetes_version: v1.20.5-rke2r1\n", "kubernetes_version", "not a Kubernetes version"),
        (
            "services:\n  etcd:\n    backup_config:\n      s3backupconfig: {endpoint: s3.x}\n",
            "services.etcd.backup_config.s3backupconfig.bucket_name",
            "bucket_name",
        ),
        (
            "services:\n  etcd:\n    external_urls: [https://e:2379]\n"
            "    ca_cert: x\n    cert: y\n    key: z\n",
            "services.etcd.external_urls",
            "etcd role",
        ),
        ("bastion_host:\n  address: b.example\n", "bastion_host.user", "needs a `user`"),
    ],
)
def test_cluster_rules(section: str, path: str, fragment: str) -> None:
    find(errors_of(NODE + section), path, fragment)


@pytest.mark.parametrize(
    "section",
    [
        "upgrade_strategy:\n  max_unavailable_worker: 2\n  max_unavailable_controlplane: 100%\n",
        "upgrade_strategy:\n  max_unavailable_worker: '20%'\n  max_unavailable_controlplane: ''\n",
        "kubernetes_version: v1.20.5\n",
        "kubernetes_version: v1.10.1-rancher1\n",
        "kubernetes_version: v1.32.13-rancher1-2\n",
        "services:\n  kube-controller:\n    cluster_cidr: 10.42.0.0/16,fd05::/120\n",
        "authentication:\n  strategy: x509|webhook\n",
        "network:\n  plugin: aci\n",
        "services:\n  kube-api:\n    service_node_port_range: 1-65535\n",
    ],
)
def test_valid_values_load(section: str) -> None:
    assert load(NODE + section).config.nodes


def test_empty_choices_mean_rke_defaults() -> None:
    text = (
        NODE
        + 'network:\n  plugin: ""\nauthorization:\n  mode:\n'
        + 'authentication:\n  strategy: ""\ncluster_name:\n'
    )
    config = load(text).config
    assert config.network.plugin == "canal"
    assert config.authorization.mode == "rbac"
    assert config.authentication.strategy == "x509"
    assert config.cluster_name == "local"


def test_placeholders_warn_but_load() -> None:
    loaded = load(
        "nodes:\n  - address: $ip0\n    user: ${USER}\n    role: [controlplane, etcd, worker]\n"
    )
    warning = find(loaded.warnings, "nodes[0].address", "unfilled template placeholder")
    assert warning.line == 2 and "${USER}" in warning.message
    assert loaded.config.nodes[0].address == "$ip0"


# -- values as yaml.v2 reads them -------------------------------------------------------------


def test_scalars_keep_their_literal_text() -> None:
    text = (
        NODE
        + """services:
  kube-api:
    extra_args:
      v: 4
      profiling: false
      ratio: 1.50
      empty:
    extra_args_array:
      admission-control-config-file: [a, 2]
  kubelet:
    fail_swap_on: "true"
    generate_serving_certificate: yes
cluster_name: 007
"""
    )
    config = load(text).config
    assert config.services.kube_api.extra_args == {
        "v": "4",
        "profiling": "false",
        "ratio": "1.50",
        "empty": "",
    }
    assert config.services.kube_api.extra_args_array == {
        "admission-control-config-file": ["a", "2"]
    }
    assert config.services.kubelet.fail_swap_on is True
    assert config.services.kubelet.generate_serving_certificate is True
    assert config.cluster_name == "007"


def test_numbers_accept_numeric_strings() -> None:
    text = (
        NODE.replace("    user: rke\n", "    user: rke\n    port: '2222'\n")
        + "addon_job_timeout: '90'\n"
    )
    config = load(text).config
    assert config.nodes[0].port == 2222 and config.addon_job_timeout == 90


@pytest.mark.parametrize(
    ("section", "path", "fragment"),
    [
        (
            "services:\n  kubelet:\n    fail_swap_on: maybe\n",
            "services.kubelet.fail_swap_on",
            "expected true or false",
        ),
        (
            "services:\n  kubelet:\n    fail_swap_on: 'yes'\n",
            "services.kubelet.fail_swap_on",
            "expected true or false",
        ),
        ("addon_job_timeout: soon\n", "addon_job_timeout", "expected a whole number"),
        (
            "services:\n  kube-api:\n    extra_args: [--v=4]\n",
            "services.kube-api.extra_args",
            "expected a mapping",
        ),
        (
            "services:\n  kube-api:\n    extra_args:\n      v: {level: 4}\n",
            "services.kube-api.extra_args.v",
            "expected a string",
        ),
        (
            "services:\n  kube-api:\n    extra_args_array:\n      flag: one\n",
            "services.kube-api.extra_args_array.flag",
            "expected a list",
        ),
        (
            "services:\n  kubelet:\n    extra_binds: /a:/b\n",
            "services.kubelet.extra_binds",
            "expected a list",
        ),
        ("addons:\n  apiVersion: v1\n", "addons", "expected a string"),
    ],
)
def test_type_errors(section: str, path: str, fragment: str) -> None:
    find(errors_of(NODE + section), path, fragment)


def test_labels_and_taints() -> None:
    extra = """    labels:
      app: ingress
      tier: 1
    taints:
      - key: dedicated
        value: etcd
        effect: NoExecute
      - key: spare
"""
    node = load("nodes:\n" + _node(extra=extra)).config.nodes[0]
    assert node.labels == {"app": "ingress", "tier": "1"}
    assert [(t.key, t.value, t.effect) for t in node.taints] == [
        ("dedicated", "etcd", "NoExecute"),
        ("spare", "", "NoSchedule"),
    ]


def test_null_sections_mean_defaults() -> None:
    text = (
        NODE
        + "services:\n  scheduler:\n  kubeproxy:\n  etcd:\nnetwork:\n  options:\n"
        + "upgrade_strategy:\n  drain:\n  node_drain_input:\n"
    )
    config = load(text).config
    assert config.services.etcd.creation == "12h" and config.network.options == {}
    assert config.upgrade_strategy.node_drain_input.timeout == 120


def test_duplicate_keys_follow_yaml_v2_and_warn() -> None:
    text = (
        NODE
        + """cluster_name: first
cluster_name: second
services:
  kubelet:
    extra_args: {a: "1", b: "1"}
  kubelet:
    extra_args: {b: "2"}
addons_include: [x, y]
addons_include: [z]
"""
    )
    loaded = load(text)
    config = loaded.config
    assert config.cluster_name == "second"
    assert config.services.kubelet.extra_args == {"a": "1", "b": "2"}  # mappings merge
    assert config.addons_include == ["z"]  # lists are replaced
    find(loaded.warnings, "cluster_name", "given twice (lines 5 and 6)")
    find(loaded.warnings, "services.kubelet", "mappings are merged")
    find(loaded.warnings, "addons_include", "later list replaces")


def test_merge_keys_and_anchors() -> None:
    text = """nodes:
  - &base
    address: 10.0.0.1
    user: rke
    role: [controlplane, etcd, worker]
  - <<: *base
    address: 10.0.0.2
    role: [worker]
"""
    nodes = load(text).config.nodes
    assert [(n.address, n.user, n.role) for n in nodes] == [
        ("10.0.0.1", "rke", ("controlplane", "etcd", "worker")),
        ("10.0.0.2", "rke", ("worker",)),
    ]


def test_legacy_keys_warn_and_load() -> None:
    text = (
        NODE
        + """auth:
  strategy: x509
  sans: [lb.example]
private_registries:
  - url: r.example
    username: me
services:
  etcd-snapshot:
    retention: 3d
"""
    )
    loaded = load(text)
    assert loaded.config.authentication.sans == ["lb.example"]
    assert loaded.config.private_registries[0].user == ""
    find(loaded.warnings, "auth", "rename it to `authentication`")
    find(loaded.warnings, "private_registries[0].username", "did you mean `user`?")
    find(loaded.warnings, "services.etcd-snapshot", "not an RKE key")


def test_auth_is_ignored_when_authentication_is_given() -> None:
    loaded = load(NODE + "auth:\n  sans: [old]\nauthentication:\n  sans: [new]\n")
    assert loaded.config.authentication.sans == ["new"]
    find(loaded.warnings, "auth", "ignored because `authentication` is also given")


def test_free_form_sections_accept_anything() -> None:
    text = (
        NODE
        + """services:
  kube-api:
    audit_log:
      enabled: true
      configuration:
        max_age: 6
        policy: {rules: [{level: Metadata}]}
    event_rate_limit:
      enabled: true
      configuration: {limits: [{type: Server, qps: 500}]}
cloud_provider:
  name: vsphere
  vsphereCloudProvider:
    global: {insecure-flag: true}
    virtual_center: {vc.example: {user: u, datacenters: dc}}
"""
    )
    config = load(text).config
    audit_log = config.services.kube_api.audit_log
    assert audit_log is not None
    assert audit_log["configuration"]["policy"] == {"rules": [{"level": "Metadata"}]}
    assert config.cloud_provider is not None
    assert config.cloud_provider["vsphereCloudProvider"]["global"] == {"insecure-flag": True}


# -- reading the file, and the limits ---------------------------------------------------------


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yml")
    assert "file not found" in str(info.value)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yml"
    path.write_bytes(b"nodes:\n  - address: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.issues[0].line == 2 and "UTF-8" in str(info.value)


def test_syntax_error_reports_the_line() -> None:
    with pytest.raises(ConfigError) as info:
        load(NODE + "services:\n  kubelet: [a, b\n")
    (issue,) = info.value.issues
    assert issue.line is not None and issue.line >= 6 and "YAML syntax error" in issue.message
    with pytest.raises(ConfigError, match="line 2: YAML syntax error"):
        load("nodes:\n  - address: a: b\n")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file(text: str) -> None:
    with pytest.raises(ConfigError, match="empty"):
        load(text)


def test_alias_bomb_stops_quickly() -> None:
    levels = ["    l0: &l0 [" + ", ".join(["lol"] * 10) + "]"]
    levels += [f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    text = NODE + "cloud_provider:\n  awsCloudProvider:\n" + "\n".join(levels) + "\n"
    start = time.monotonic()
    with pytest.raises(ConfigError, match="alias bomb"):
        load(text)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("style", ["flow", "block"])
def test_deep_nesting_stops_quickly(style: str) -> None:
    if style == "flow":
        deep = "[" * 1000 + "]" * 1000
    else:
        deep = "\n" + "".join("  " * (i + 2) + f"k{i}:\n" for i in range(1000))
    start = time.monotonic()
    with pytest.raises(ConfigError, match="nested more than 64 levels"):
        load(NODE + "cloud_provider:\n  awsCloudProvider: " + deep + "\n")
    assert time.monotonic() - start < 5


def test_self_referencing_alias_is_refused() -> None:
    with pytest.raises(ConfigError, match="refers to itself"):
        load(NODE + "cloud_provider:\n  awsCloudProvider: &a {b: *a}\n")


def test_secrets_never_appear_in_repr() -> None:
    key = (
        "-----BEGIN OPENSSH PRIVATE KEY-----\n"
        "      c2VjcmV0LWtleS1tYXRlcmlhbA==\n"
        "      -----END OPENSSH PRIVATE KEY-----"
    )
    text = f"""nodes:
  - address: 10.0.0.1
    user: rke
    role: [controlplane, etcd, worker]
    ssh_key: |-
      {key}
private_registries:
  - url: registry.example
    user: me
    password: hunter2-registry-password
services:
  etcd:
    backup_config:
      s3backupconfig: {{bucket_name: b, endpoint: e, secret_key: s3-secret-value}}
"""
    config = load(text).config
    assert "c2VjcmV0LWtleS1tYXRlcmlhbA" in config.nodes[0].ssh_key
    assert config.private_registries[0].password == "hunter2-registry-password"
    shown = repr(config)
    for secret in ("c2VjcmV0LWtleS1tYXRlcmlhbA", "hunter2-registry-password", "s3-secret-value"):
        assert secret not in shown
    assert "registry.example" in shown  # the repr is still useful


def test_secret_fields_are_not_echoed_in_errors() -> None:
    issues = errors_of(NODE + "private_registries:\n  - url: r\n    password: {hunter2: x}\n")
    issue = find(issues, "private_registries[0].password", "expected a string")
    assert "hunter2" not in str(issue)
