"""The add-on compiler: network plugin, DNS, user addons and addons_include, as Kubernetes objects.

The real cluster.yml files live in /work/shared/rke-configs (RKEL_RKE_CONFIGS points elsewhere);
every one that loads must either compile or fail with an AddonError that says what to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from lifecycle.addons import Addon, AddonError, addon_images, compile_addons
from lifecycle.config import load_config, load_config_text
from lifecycle.config.model import DEFAULT_KUBERNETES_VERSION, ClusterConfig
from lifecycle.errors import ConfigError, PlanError
from lifecycle.versions import default_catalog

NODE = """nodes:
  - address: 10.0.0.1
    user: rke
    role: [controlplane, etcd, worker]
"""


METRICS = "monitoring-metrics-server"
NGINX = "ingress-nginx"


def config(extra: str = "") -> ClusterConfig:
    return load_config_text(NODE + extra, source="test.yml").config


def compile_(extra: str = "", base_dir: Path = Path("."),
             monitoring: bool = False) -> tuple[Addon, ...]:
    """The add-ons of NODE + `extra`; without metrics-server and ingress-nginx unless
    `monitoring` (most tests here are about the others; those two have their own)."""
    addons = compile_addons(config(extra), base_dir)
    return tuple(a for a in addons if monitoring or a.name not in (METRICS, NGINX))


def error(extra: str = "", base_dir: Path = Path(".")) -> str:
    with pytest.raises(AddonError) as info:
        compile_addons(config(extra), base_dir)
    return str(info.value)


def by_name(addons: tuple[Addon, ...]) -> dict[str, Addon]:
    return {a.name: a for a in addons}


def obj(addon: Addon, kind: str, name: str) -> dict[str, Any]:
    found = [d for d in addon.docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} in {addon.name}"
    return found[0]


def containers(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    pod = workload["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod.get("initContainers", []) + pod["containers"]}


def images_of(addon: Addon) -> set[str]:
    return {
        c["image"]
        for d in addon.docs
        if d["kind"] in ("DaemonSet", "Deployment")
        for c in containers(d).values()
    }


# -- defaults ---------------------------------------------------------------------------------


def test_defaults_are_canal_and_coredns_with_rke_images_and_cidrs() -> None:
    addons = compile_(monitoring=True)
    assert [a.name for a in addons] == ["network-canal", "dns-coredns", METRICS, NGINX]
    canal, dns, _, _ = addons

    net_conf = json.loads(obj(canal, "ConfigMap", "canal-config")["data"]["net-conf.json"])
    assert net_conf == {"Network": "10.42.0.0/16", "Backend": {"Type": "vxlan"}}
    assert obj(canal, "ConfigMap", "canal-config")["data"]["veth_mtu"] == "1450"
    node = containers(obj(canal, "DaemonSet", "canal"))
    assert node["calico-node"]["image"] == "rancher/mirrored-calico-node:v3.28.1"
    assert node["install-cni"]["image"] == "rancher/calico-cni:v3.28.1-rancher1"
    assert node["kube-flannel"]["image"] == "rancher/mirrored-flannel-flannel:v0.25.1"
    controllers = containers(obj(canal, "Deployment", "calico-kube-controllers"))
    assert controllers["calico-kube-controllers"]["image"] == (
        "rancher/mirrored-calico-kube-controllers:v3.28.1"
    )
    crds = [d for d in canal.docs if d["kind"] == "CustomResourceDefinition"]
    assert len(crds) == 18 and {c["spec"]["group"] for c in crds} == {"crd.projectcalico.org"}
    assert obj(canal, "CustomResourceDefinition", "ippools.crd.projectcalico.org")["spec"][
        "names"
    ] == {"kind": "IPPool", "listKind": "IPPoolList", "plural": "ippools", "singular": "ippool"}
    assert all(d["metadata"].get("namespace", "kube-system") == "kube-system" for d in canal.docs)

    assert obj(dns, "Service", "kube-dns")["spec"]["clusterIP"] == "10.43.0.10"
    corefile = obj(dns, "ConfigMap", "coredns")["data"]["Corefile"]
    assert "kubernetes cluster.local in-addr.arpa ip6.arpa {" in corefile
    assert 'forward . "/etc/resolv.conf"' in corefile
    assert images_of(dns) == {
        "rancher/mirrored-coredns-coredns:1.11.1",
        "rancher/mirrored-cluster-proportional-autoscaler:v1.8.9",
    }
    deployment = obj(dns, "Deployment", "coredns")
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it; Kubernetes starts 1
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "coredns"
    for addon in addons:
        for doc in addon.docs:
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]
            text = json.dumps(doc).replace("$(POD_NAMESPACE)", "")  # Kubernetes' own $(VAR)
            assert "$" not in text, f"unfilled placeholder in {doc['kind']}"


def test_services_cidr_and_domain_are_the_configs() -> None:
    canal, dns = compile_(
        """services:
  kube-controller: {cluster_cidr: 10.200.0.0/16}
  kube-api: {service_cluster_ip_range: 10.96.0.0/16}
  kubelet: {cluster_domain: k8s.test.net, cluster_dns_server: 10.96.0.53}
dns:
  upstreamnameservers: [1.1.1.1, "9.9.9.9:53"]
  reversecidrs: [10.0.0.0/8]
"""
    )
    net_conf = json.loads(obj(canal, "ConfigMap", "canal-config")["data"]["net-conf.json"])
    assert net_conf["Network"] == "10.200.0.0/16"
    corefile = obj(dns, "ConfigMap", "coredns")["data"]["Corefile"]
    assert "kubernetes k8s.test.net 10.0.0.0/8 {" in corefile
    assert "forward . 1.1.1.1 9.9.9.9:53" in corefile
    assert obj(dns, "Service", "kube-dns")["spec"]["clusterIP"] == "10.96.0.53"


def test_kubernetes_version_outside_the_catalog_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="v1.19.9-rancher1-1 is not supported"):
        compile_("kubernetes_version: v1.19.9-rancher1-1\n")


def test_addon_error_is_a_config_error_with_its_exit_code() -> None:
    with pytest.raises(AddonError) as info:
        compile_("network: {plugin: weave}\n")
    assert isinstance(info.value, ConfigError) and info.value.exit_code == 2
    assert [i.path for i in info.value.issues] == ["network.plugin"]


# -- network ----------------------------------------------------------------------------------


def test_flannel_backend_options() -> None:
    (flannel, _) = compile_(
        """network:
  plugin: flannel
  options: {flannel_backend_type: host-gw, flannel_iface: vlan.99, flannel_backend_port: "4789"}
"""
    )
    assert flannel.name == "network-flannel"
    net_conf = json.loads(obj(flannel, "ConfigMap", "kube-flannel-cfg")["data"]["net-conf.json"])
    assert net_conf == {
        "Network": "10.42.0.0/16",
        "EnableNFTables": False,
        "Backend": {"Type": "host-gw", "VNI": 1, "Port": 4789},
    }
    daemonset = obj(flannel, "DaemonSet", "kube-flannel")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["serviceAccountName"] == "flannel"
    assert {"operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    flanneld = containers(daemonset)["kube-flannel"]
    assert flanneld["args"] == ["--ip-masq", "--kube-subnet-mgr", "--iface=vlan.99"]
    assert flanneld["image"] == "rancher/mirrored-flannel-flannel:v0.25.1"
    assert containers(daemonset)["install-cni"]["image"] == "rancher/flannel-cni:v1.4.1-rancher1"
    assert {d["kind"] for d in flannel.docs} == {
        "ClusterRole",
        "ClusterRoleBinding",
        "ServiceAccount",
        "ConfigMap",
        "DaemonSet",
    }


def test_flannel_defaults_to_vxlan_without_iface() -> None:
    (flannel, _) = compile_("network: {plugin: flannel}\n")
    net_conf = json.loads(obj(flannel, "ConfigMap", "kube-flannel-cfg")["data"]["net-conf.json"])
    assert net_conf["Backend"] == {"Type": "vxlan", "VNI": 1, "Port": 8472}
    assert containers(obj(flannel, "DaemonSet", "kube-flannel"))["kube-flannel"]["args"] == [
        "--ip-masq",
        "--kube-subnet-mgr",
    ]


def test_bad_flannel_options_are_named() -> None:
    text = error(
        "network:\n  plugin: flannel\n"
        "  options: {flannel_backend_type: hostgw, flannel_backend_vni: one}\n"
    )
    assert "network.options.flannel_backend_type: `hostgw` is not a flannel backend" in text


def test_network_settings_are_honoured() -> None:
    (canal, _) = compile_(
        """network:
  plugin: canal
  mtu: 1400
  options: {canal_iface: eth1, canal_flannel_backend_type: host-gw}
  node_selector: {pool: net}
  update_strategy: {strategy: RollingUpdate, rollingUpdate: {maxUnavailable: 3}}
  tolerations: [{key: special, operator: Exists}]
"""
    )
    data = obj(canal, "ConfigMap", "canal-config")["data"]
    assert (data["canal_iface"], data["veth_mtu"]) == ("eth1", "1400")
    assert json.loads(data["net-conf.json"])["Backend"] == {"Type": "host-gw"}
    daemonset = obj(canal, "DaemonSet", "canal")
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 3},
    }
    assert daemonset["spec"]["template"]["spec"]["nodeSelector"] == {
        "kubernetes.io/os": "linux",
        "pool": "net",
    }
    controllers = obj(canal, "Deployment", "calico-kube-controllers")
    assert controllers["spec"]["template"]["spec"]["tolerations"] == [
        {"key": "special", "operator": "Exists"}
    ]


def test_a_value_from_cluster_yml_cannot_add_structure() -> None:
    (canal, _) = compile_('network:\n  options: {canal_iface: "eth0\\nmasquerade: false"}\n')
    data = obj(canal, "ConfigMap", "canal-config")["data"]
    assert data["canal_iface"] == "eth0\nmasquerade: false" and data["masquerade"] == "true"


@pytest.mark.parametrize("plugin", ["calico", "weave", "aci"])
def test_unsupported_plugin_says_what_to_do(plugin: str) -> None:
    text = error(f"network: {{plugin: {plugin}}}\n")
    assert f"network.plugin: `{plugin}` is not supported by rkel yet" in text
    assert "supported: canal, flannel, none" in text
    assert "network.plugin: none" in text and "addons_include" in text


def test_what_rkel_does_not_deploy_is_a_warning_when_planning() -> None:
    # How `rkel plan` calls it: the rest of the cluster is still managed, the plan warns.
    notes: list[str] = []
    addons = compile_addons(config("network: {plugin: calico}\ningress: {provider: traefik}\n"),
                            Path("."), warnings=notes)
    assert [a.name for a in addons] == ["dns-coredns", METRICS]
    assert len(notes) == 2
    assert notes[0].startswith("network.plugin: `calico` is not supported by rkel yet")
    assert notes[1].startswith("ingress.provider:") and notes[1].endswith("(not deployed)")
    # a malformed manifest is still an error, warnings or not
    with pytest.raises(AddonError):
        compile_addons(config("addons: 'kind: Pod'\n"), Path("."), warnings=[])


def test_dual_stack_cidr_is_refused_for_canal() -> None:
    text = error("services:\n  kube-controller: {cluster_cidr: '10.42.0.0/16,fd00::/56'}\n")
    assert "services.kube-controller.cluster_cidr" in text and "one IPv4 range" in text


def test_without_rbac_no_rbac_objects_or_service_accounts() -> None:
    for addon in compile_("authorization: {mode: none}\n"):
        kinds = {d["kind"] for d in addon.docs}
        assert not kinds & {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}, addon.name
        for doc in addon.docs:
            assert "serviceAccountName" not in doc.get("spec", {}).get("template", {}).get(
                "spec", {}
            )


# -- DNS and ingress --------------------------------------------------------------------------


def test_plugin_none_and_provider_none_leave_only_user_addons() -> None:
    addons = compile_(
        """network: {plugin: none}
dns: {provider: none}
addons: |
  apiVersion: v1
  kind: Namespace
  metadata: {name: team}
"""
    )
    assert [a.name for a in addons] == ["user-addons"]
    assert addons[0].docs == (
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}},
    )


def test_dns_settings_are_honoured() -> None:
    (_, dns) = compile_(
        """dns:
  provider: coredns
  node_selector: {dns: "yes"}
  tolerations: [{key: dns, operator: Exists}]
  linear_autoscaler_params: {cores_per_replica: 64, nodes_per_replica: 2, min: 2, max: 5}
  options: {coredns_priority_class_name: high}
"""
    )
    pod = obj(dns, "Deployment", "coredns")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "dns": "yes"}
    assert pod["tolerations"] == [{"key": "dns", "operator": "Exists"}]
    assert pod["priorityClassName"] == "high"
    command = containers(obj(dns, "Deployment", "coredns-autoscaler"))["autoscaler"]["command"]
    assert (
        '--default-params={"linear":{"coresPerReplica":64,"nodesPerReplica":2,"min":2,"max":5}}'
        in command
    )


@pytest.mark.parametrize(
    ("extra", "path", "text"),
    [
        ("dns: {provider: kube-dns}\n", "dns.provider", "`kube-dns` is not supported by rkel"),
        (
            "dns: {provider: bind}\n",
            "dns.provider",
            "use coredns or none (coredns is RKE's default)",
        ),
        (
            "dns: {nodelocal: {ip_address: 169.254.20.10}}\n",
            "dns.nodelocal.ip_address",
            "NodeLocal",
        ),
        ("dns: {stubdomains: {corp: [10.0.0.2]}}\n", "dns.stubdomains", "kube-dns only"),
        ("dns: {upstreamnameservers: [dns.google]}\n", "dns.upstreamnameservers[0]", "not an IP"),
        (
            "services:\n  kubelet: {cluster_dns_server: 10.99.0.10}\n",
            "services.kubelet.cluster_dns_server",
            "outside the service range 10.43.0.0/16",
        ),
    ],
)
def test_dns_problems(extra: str, path: str, text: str) -> None:
    message = error(extra)
    assert f"{path}: " in message and text in message, message


def test_ingress_provider_none_deploys_none_and_an_unknown_one_is_refused() -> None:
    names = [a.name for a in compile_("ingress: {provider: none}\n", monitoring=True)]
    assert NGINX not in names
    # RKE's default: no provider named (or an empty section) means nginx
    for extra in ("", 'ingress: {provider: "", options: {}, http_port: 0}\n'):
        assert NGINX in [a.name for a in compile_(extra, monitoring=True)]
    text = error("ingress: {provider: traefik}\n")
    assert "ingress.provider: `traefik` is not an ingress provider rkel deploys" in text


# -- user addons ------------------------------------------------------------------------------


def test_user_addons_multi_document_with_list_flattening() -> None:
    addons = compile_(
        """network: {plugin: none}
dns: {provider: none}
addons: |-
  ---
  apiVersion: v1
  kind: Namespace
  metadata: {name: one}
  ---
  # an empty document
  ---
  apiVersion: v1
  kind: List
  items:
    - {apiVersion: v1, kind: ConfigMap, metadata: {name: two, namespace: one}}
    - apiVersion: v1
      kind: List
      items:
        - {apiVersion: v1, kind: Secret, metadata: {name: three, namespace: one}}
  ---
  apiVersion: v1
  kind: Secret
  metadata: {name: four, namespace: one}
  data:
    mode: 0644
"""
    )
    (user,) = addons
    assert [(d["kind"], d["metadata"]["name"]) for d in user.docs] == [
        ("Namespace", "one"),
        ("ConfigMap", "two"),
        ("Secret", "three"),
        ("Secret", "four"),
    ]
    assert user.docs[3]["data"]["mode"] == 420  # YAML 1.1, as kubectl reads it


def test_bad_yaml_gives_the_line() -> None:
    text = error("addons: |\n  apiVersion: v1\n  kind: Pod\n  metadata:\n    name: [a\n")
    assert "addons: the `addons` text is not valid YAML at line 5" in text


def test_missing_kind_is_named_with_document_and_line() -> None:
    text = error(
        """addons: |
  apiVersion: v1
  kind: Namespace
  metadata: {name: fine}
  ---
  apiVersion: v1
  metadata:
    name: nokind
  ---
  - not
  - an object
"""
    )
    assert "document 2 at line 5 is missing kind" in text
    assert "every object needs apiVersion, kind and metadata.name" in text
    assert "document 3 at line 9 is a list, not a Kubernetes object" in text


def test_missing_name_in_a_list_item() -> None:
    text = error(
        "addons: |\n  apiVersion: v1\n  kind: List\n  items:\n    - {apiVersion: v1, kind: Pod}\n"
    )
    assert "document 1 at line 1, List item 1 (kind: Pod) is missing metadata.name" in text


# -- addons_include ---------------------------------------------------------------------------


def test_addons_include_relative_to_the_cluster_yml_folder(tmp_path: Path) -> None:
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "app.yml").write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: app}\n"
    )
    absolute = tmp_path / "abs.yml"
    absolute.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: abs}\n")
    addons = compile_(
        f"addons_include:\n  - manifests/app.yml\n  - {absolute}\n", base_dir=tmp_path
    )
    named = by_name(addons)
    assert list(named) == [
        "network-canal",
        "dns-coredns",
        "include:manifests/app.yml",
        f"include:{absolute}",
    ]
    assert named["include:manifests/app.yml"].docs[0]["metadata"]["name"] == "app"


def test_addons_include_url_is_refused_with_what_to_do() -> None:
    text = error("addons_include:\n  - https://docs.projectcalico.org/manifests/calico.yaml\n")
    assert "addons_include[0]:" in text
    assert "rkel does not download addons_include URLs" in text
    assert "Download the file" in text and "local path" in text


def test_addons_include_problems_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.yml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\nkind: [\n"
    )
    (tmp_path / "empty.yml").write_text("# nothing yet\n")
    text = error(
        "addons_include: [missing.yml, bad.yml, empty.yml, missing.yml]\n", base_dir=tmp_path
    )
    assert f"addons_include[0]: {tmp_path / 'missing.yml'} does not exist" in text
    assert f"addons_include[1]: {tmp_path / 'bad.yml'} is not valid YAML at line" in text
    assert "addons_include[2]:" in text and "holds no Kubernetes objects" in text
    assert "addons_include[3]: `missing.yml` is listed twice" in text


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(AddonError) as info:
        compile_(
            "network: {plugin: calico}\ndns: {provider: kube-dns}\n"
            "addons_include: [http://example.com/a.yml]\n"
        )
    assert [i.path for i in info.value.issues] == [
        "network.plugin",
        "dns.provider",
        "addons_include[0]",
    ]


# -- hashes and images ------------------------------------------------------------------------


def test_hash_is_stable_and_follows_the_cluster_cidr() -> None:
    first, second = compile_(), compile_()
    assert [a.hash for a in first] == [a.hash for a in second]
    assert all(len(a.hash) == 16 for a in first)
    reordered = Addon(first[0].name, tuple(dict(reversed(d.items())) for d in first[0].docs))
    assert reordered.hash == first[0].hash
    other = compile_("services:\n  kube-controller: {cluster_cidr: 10.99.0.0/16}\n")
    assert other[0].hash != first[0].hash and other[1].hash == first[1].hash
    assert Addon.from_dict(json.loads(json.dumps(first[0].to_dict()))).hash == first[0].hash


def test_private_registry_prefixes_addon_images() -> None:
    canal, dns = compile_(
        """private_registries:
  - {url: "https://registry.example.com:5000", is_default: true}
system_images:
  coredns: quay.io/me/coredns:1.11.3
  canal_flannel: mirror/flannel:v0.25.1
"""
    )
    assert images_of(canal) == {
        "registry.example.com:5000/rancher/mirrored-calico-node:v3.28.1",
        "registry.example.com:5000/rancher/calico-cni:v3.28.1-rancher1",
        "registry.example.com:5000/mirror/flannel:v0.25.1",
        "registry.example.com:5000/rancher/mirrored-calico-kube-controllers:v3.28.1",
    }
    assert images_of(dns) == {
        "quay.io/me/coredns:1.11.3",  # names its registry host: left as written
        "registry.example.com:5000/rancher/mirrored-cluster-proportional-autoscaler:v1.8.9",
    }


def test_addon_images_for_display() -> None:
    assert addon_images(config("network: {plugin: flannel}\n")) == {
        "flannel": "rancher/mirrored-flannel-flannel:v0.25.1",
        "flannel_cni": "rancher/flannel-cni:v1.4.1-rancher1",
        "coredns": "rancher/mirrored-coredns-coredns:1.11.1",
        "coredns_autoscaler": "rancher/mirrored-cluster-proportional-autoscaler:v1.8.9",
        "metrics_server": "rancher/mirrored-metrics-server:v0.7.1",
        "ingress": "rancher/nginx-ingress-controller:nginx-1.10.4-rancher1",
        "ingress_backend": "rancher/mirrored-nginx-ingress-controller-defaultbackend:1.5-rancher1",
        "ingress_webhook": "rancher/mirrored-ingress-nginx-kube-webhook-certgen:v1.4.1",
    }
    assert addon_images(config("network: {plugin: none}\ndns: {provider: none}\n"
                               "monitoring: {provider: none}\ningress: {provider: none}\n")) == {}


def test_every_supported_version_has_the_addon_images() -> None:
    catalog = default_catalog()
    for version in catalog.supported():
        info = catalog.info(version)
        for key in ("coredns", "coredns_autoscaler", "flannel", "flannel_cni", "canal_node"):
            assert info.image(key), (version, key)


# -- the real files ---------------------------------------------------------------------------


def _configs_dir() -> Path:
    override = os.environ.get("RKEL_RKE_CONFIGS")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared" / "rke-configs"


CONFIG_FILES = sorted(_configs_dir().glob("*.yml")) if _configs_dir().is_dir() else []
CALICO = "network.plugin"
# file number -> the addon names it compiles to, or the issue paths its AddonError lists.
REAL: dict[str, list[str]] = {
    "01": ["network-flannel", "dns-coredns", METRICS, NGINX, "user-addons"],
    "04": ["network-canal", "dns-coredns", METRICS, NGINX],
    "05": ["network-canal", "dns-coredns", METRICS, NGINX],
    "06": ["network-canal", "dns-coredns", METRICS, NGINX],
    "07": ["network-flannel", "dns-coredns", METRICS, NGINX],
    "09": ["network-flannel", "dns-coredns", METRICS, NGINX],
    "10": ["dns-coredns", METRICS, NGINX, "user-addons"],
    "11": ["network-canal", "dns-coredns", METRICS],
    "13": [CALICO],
    "15": [CALICO, "addons_include[0]"],
    "16": [CALICO],
    "19": ["network-canal", "dns-coredns", METRICS, NGINX, "user-addons"],
    "20": ["network-canal", "dns-coredns", METRICS, NGINX],
}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name[:2])
def test_real_file_compiles_or_says_why(path: Path) -> None:
    try:
        loaded = load_config(path)
    except ConfigError:
        assert path.name[:2] not in REAL  # 02 does not load (see test_config.py)
        return
    cfg = loaded.config
    if not default_catalog().has(cfg.version):  # an old version is compile_desired's PlanError
        cfg = dataclasses.replace(cfg, kubernetes_version=DEFAULT_KUBERNETES_VERSION)
    expected = REAL.get(path.name[:2])
    try:
        addons = compile_addons(cfg, path.parent, source=str(path))
    except AddonError as exc:
        paths = [i.path for i in exc.issues]
        assert expected is None or paths == expected, str(exc)
        for issue in exc.issues:
            assert "rkel" in issue.message or "`" in issue.message, issue  # says what and why
        return
    assert expected is None or [a.name for a in addons] == expected
    if path.name.startswith("09"):
        flannel = addons[0]
        conf = json.loads(obj(flannel, "ConfigMap", "kube-flannel-cfg")["data"]["net-conf.json"])
        assert conf["Backend"]["Type"] == "host-gw"
        assert (
            "--iface=vlan.99"
            in containers(obj(flannel, "DaemonSet", "kube-flannel"))["kube-flannel"]["args"]
        )
    if path.name.startswith("01"):
        assert by_name(addons)["user-addons"].docs[0]["kind"] == "Pod"
        dns = by_name(addons)["dns-coredns"]
        assert obj(dns, "Service", "kube-dns")["spec"]["clusterIP"] == "10.233.0.3"


def test_the_real_files_are_there() -> None:
    assert CONFIG_FILES, f"no real cluster.yml files in {_configs_dir()} (set RKEL_RKE_CONFIGS)"
    assert {p.name[:2] for p in CONFIG_FILES} >= set(REAL)


# -- metrics-server ---------------------------------------------------------------------------


def test_metrics_server_is_deployed_by_default_as_rke_does() -> None:
    (metrics,) = [a for a in compile_(monitoring=True) if a.name == METRICS]
    kinds = [d["kind"] for d in metrics.docs]
    assert kinds[-1] == "APIService" and "Deployment" in kinds and "ServiceAccount" in kinds
    api = obj(metrics, "APIService", "v1beta1.metrics.k8s.io")
    assert api["spec"]["service"] == {"name": "metrics-server", "namespace": "kube-system"}
    deployment = obj(metrics, "Deployment", "metrics-server")
    assert "replicas" not in deployment["spec"]  # Kubernetes' 1, as RKE
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "rancher/mirrored-metrics-server:v0.7.1"
    assert "--kubelet-insecure-tls=true" in container["command"]  # RKE's self-signed kubelets
    assert "--secure-port=10250" in container["command"]
    assert pod["serviceAccountName"] == "metrics-server"
    assert pod["priorityClassName"] == "system-cluster-critical"
    # its emptyDir is scratch: a drain without delete_local_data may evict it
    assert deployment["spec"]["template"]["metadata"]["annotations"] == {
        "cluster-autoscaler.kubernetes.io/safe-to-evict": "true"}
    # an unknown provider name gets RKE's default too (the loader warns of the name)
    assert METRICS in [a.name for a in compile_("monitoring: {provider: metric-server}\n",
                                                monitoring=True)]
    assert METRICS not in [a.name for a in compile_("monitoring: {provider: none}\n",
                                                    monitoring=True)]


def test_metrics_server_settings_are_honoured() -> None:
    (metrics,) = [a for a in compile_(
        """monitoring:
  replicas: 2
  node_selector: {disk: ssd}
  tolerations: [{key: dedicated, operator: Equal, value: infra, effect: NoSchedule}]
  update_strategy: {strategy: Recreate}
  metrics_server_priority_class_name: high
  options: {metric-resolution: 30s, kubelet-preferred-address-types: "InternalIP,Hostname"}
""", monitoring=True) if a.name == METRICS]
    deployment = obj(metrics, "Deployment", "metrics-server")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "disk": "ssd"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "infra",
                                   "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "high"
    command = pod["containers"][0]["command"]
    assert "--metric-resolution=30s" in command and "--metric-resolution=15s" not in command
    assert "--kubelet-preferred-address-types=InternalIP,Hostname" in command
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    without_rbac = [a for a in compile_("authorization: {mode: none}\n", monitoring=True)
                    if a.name == METRICS][0]
    assert {d["kind"] for d in without_rbac.docs} == {"Service", "Deployment", "APIService"}


@pytest.mark.parametrize("replicas", [0, -1, 1000])  # "two" is the loader's error
def test_metrics_server_replicas_must_make_sense(replicas: object) -> None:
    message = error(f"monitoring: {{replicas: {json.dumps(replicas)}}}\n")
    assert "monitoring.replicas: " in message


# -- ingress-nginx ----------------------------------------------------------------------------


def nginx(extra: str = "") -> Addon:
    (addon,) = [a for a in compile_(extra, monitoring=True) if a.name == NGINX]
    return addon


def controller(addon: Addon) -> dict:
    return obj(addon, "DaemonSet", "nginx-ingress-controller")


def test_ingress_nginx_is_deployed_by_default_as_rke_does() -> None:
    addon = nginx()
    pod = controller(addon)["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirst"
    (container,) = pod["containers"]
    assert container["image"] == "rancher/nginx-ingress-controller:nginx-1.10.4-rancher1"
    args = container["args"]
    assert args[0] == "/nginx-ingress-controller"
    assert "--default-backend-service=$(POD_NAMESPACE)/default-http-backend" in args
    assert "--watch-ingress-without-class=true" in args
    assert not [a for a in args if a.startswith(("--http-port", "--https-port"))]
    assert [p["containerPort"] for p in container["ports"]] == [80, 443, 8443]
    klass = obj(addon, "IngressClass", "nginx")
    assert klass["metadata"]["annotations"] == {"ingressclass.kubernetes.io/is-default-class": "true"}
    assert obj(addon, "Deployment", "default-http-backend")["spec"]["template"]["spec"][
        "containers"][0]["image"] == "rancher/mirrored-nginx-ingress-controller-defaultbackend:1.5-rancher1"
    jobs = [d for d in addon.docs if d["kind"] == "Job"]
    assert [j["metadata"]["name"] for j in jobs] == ["ingress-nginx-admission-create",
                                                     "ingress-nginx-admission-patch"]
    assert all(j["spec"]["template"]["spec"]["containers"][0]["image"]
               == "rancher/mirrored-ingress-nginx-kube-webhook-certgen:v1.4.1" for j in jobs)
    assert "data" not in obj(addon, "ConfigMap", "ingress-nginx-controller")


def test_ingress_settings_are_honoured() -> None:
    addon = nginx("""ingress:
  provider: nginx
  options: {use-forwarded-headers: "true"}
  node_selector: {app: ingress}
  extra_args: {enable-ssl-passthrough: ""}
  dns_policy: ClusterFirstWithHostNet
  extra_envs: [{name: TZ, value: UTC}]
  extra_volumes: [{name: extra, emptyDir: {}}]
  extra_volume_mounts: [{name: extra, mountPath: /extra}]
  update_strategy: {strategy: OnDelete}
  http_port: 8080
  https_port: 8443
  tolerations: [{key: edge, operator: Exists, effect: NoSchedule}]
  default_backend: false
  nginx_ingress_controller_priority_class_name: edge-critical
  default_ingress_class: false
""")
    assert obj(addon, "ConfigMap", "ingress-nginx-controller")["data"] == {
        "use-forwarded-headers": "true"}
    daemonset = controller(addon)
    assert daemonset["spec"]["updateStrategy"] == {"type": "OnDelete"}
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "app": "ingress"}
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["tolerations"] == [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "edge-critical"
    assert {"name": "extra", "emptyDir": {}} in pod["volumes"]
    (container,) = pod["containers"]
    assert {"name": "TZ", "value": "UTC"} in container["env"]
    assert {"name": "extra", "mountPath": "/extra"} in container["volumeMounts"]
    args = container["args"]
    assert "--enable-ssl-passthrough=" in args and "--http-port=8080" in args
    assert "--https-port=8443" in args
    assert not [a for a in args if a.startswith("--default-backend-service")]
    assert not [d for d in addon.docs if d["metadata"]["name"] == "default-http-backend"]
    assert "annotations" not in obj(addon, "IngressClass", "nginx")["metadata"]


def test_ingress_host_port_mode_publishes_the_ports_on_the_node() -> None:
    pod = controller(nginx("ingress: {network_mode: hostPort, http_port: 81}\n"))["spec"][
        "template"]["spec"]
    assert "hostNetwork" not in pod
    ports = {p["name"]: p for p in pod["containers"][0]["ports"]}
    assert (ports["http"]["containerPort"], ports["http"]["hostPort"]) == (80, 81)
    assert (ports["https"]["containerPort"], ports["https"]["hostPort"]) == (443, 443)
    assert "hostPort" not in ports["webhook"]


@pytest.mark.parametrize(("extra", "path"), [
    ("ingress: {network_mode: bridge}\n", "ingress.network_mode"),
    ("ingress: {http_port: 70000}\n", "ingress.http_port"),
    ("ingress: {dns_policy: Sometimes}\n", "ingress.dns_policy"),
])
def test_ingress_settings_that_cannot_work_are_refused(extra: str, path: str) -> None:
    assert f"{path}: " in error(extra)


@pytest.mark.parametrize("extra", ["ingress: {extra_envs: [TZ=UTC]}\n",
                                   "ingress: {extra_volumes: [{emptyDir: {}}]}\n",
                                   "ingress: {extra_volume_mounts: [{mountPath: /x}]}\n"])
def test_ingress_extra_pod_items_must_be_pod_spec_items(extra: str) -> None:
    message = error(extra)
    assert "ingress.extra_" in message
