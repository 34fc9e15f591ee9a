"""Cluster add-ons as data: ClusterConfig -> the Kubernetes objects rkel applies once nodes are up.

`compile_addons(config, base_dir)` returns them as `Addon`s in the order RKE deploys them: the
network plugin, DNS, the inline `addons`, then one Addon per `addons_include` file. It applies
nothing and talks to no host; the only thing it reads is the addons_include files (relative to
`base_dir`, the folder of cluster.yml). Every problem found is reported at once, as an AddonError.

What rkel deploys, and what it does not (yet):
- network.plugin: `canal` (RKE's default: Calico v3.28 policy + flannel v0.25) and `flannel`
  (v0.25.1), after RKE v1.6's manifests for Kubernetes 1.30, in kube-system. Honoured: the
  cluster_cidr (one IPv4 range), network.mtu (canal), network.node_selector, update_strategy,
  tolerations (canal's calico-kube-controllers only, as RKE) and the options flannel_iface,
  flannel_backend_type/_port/_vni, kube_flannel_priority_class_name, canal_iface,
  canal_flannel_backend_type, canal_priority_class_name and
  calico_kube_controllers_priority_class_name. Canal is reduced in one way: Calico's 18 CRDs
  carry no OpenAPI validation schema (see data/addons/calico-crds.yml). `none` deploys nothing
  (bring a CNI through addons_include); calico, weave and aci are refused.
- dns.provider: `coredns` (the default) with its autoscaler; `none` deploys nothing; kube-dns is
  refused. Honoured: services.kubelet.cluster_domain and cluster_dns_server, upstreamnameservers,
  reversecidrs, node_selector, tolerations, update_strategy, linear_autoscaler_params and the
  options coredns_priority_class_name / coredns_autoscaler_priority_class_name. Refused:
  stubdomains (RKE ignores them for CoreDNS) and nodelocal (not deployed, while the kubelet
  would point at it).
- ingress.provider: `nginx` (RKE's default, also when no provider is named) after RKE v1.6's
  manifests (the ingress-nginx 1.10 line), in the ingress-nginx namespace; `none` deploys
  nothing; another provider is refused (a plan warning). Honoured: options, node_selector,
  extra_args, dns_policy, extra_envs, extra_volumes, extra_volume_mounts, update_strategy,
  http_port, https_port, network_mode (hostNetwork, hostPort, none), tolerations,
  default_backend, default_ingress_class and both priority classes.
- monitoring.provider: `metrics-server` (RKE's default, also for an unknown name) after RKE
  v1.6's manifests (upstream's components.yaml with --kubelet-insecure-tls), in kube-system,
  behind the v1beta1.metrics.k8s.io APIService; `none` deploys nothing. Honoured: replicas,
  node_selector, tolerations, update_strategy, metrics_server_priority_class_name and options
  (each `key: value` a `--key=value` flag, replacing a default of the same name).
- addons / addons_include: multi-document YAML; every object needs apiVersion, kind and
  metadata.name; `kind: List` is flattened. Read as YAML 1.1 like kubectl (0644 is octal,
  yes/on are booleans), keeping timestamps and 1:30-style numbers as text as yaml.v2 does.
  URLs are refused: rkel downloads nothing.

Manifests live in lifecycle/data/addons/*.yml; values are put in as whole YAML nodes on the
loaded structure (see the placeholder syntax at the top of those files), never as text.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from functools import cache, partial
from importlib import resources
from itertools import zip_longest
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.constructor import SafeConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import DocumentStartEvent
from ruamel.yaml.resolver import VersionedResolver

from lifecycle.config.issues import ConfigIssue
from lifecycle.config.model import ClusterConfig
from lifecycle.desired_args import has_registry_host, registry_host
from lifecycle.errors import ConfigError, PlanError
from lifecycle.spec import canonical_json, sha256_hex
from lifecycle.versions import VersionCatalog, VersionInfo, default_catalog

NETWORK_PLUGINS = ("canal", "flannel", "none")
DNS_PROVIDERS = ("coredns", "none")
# system_images keys each add-on uses, in display order.
ADDON_IMAGES = {
    "canal": ("canal_node", "canal_cni", "canal_flannel", "canal_controllers"),
    "flannel": ("flannel", "flannel_cni"),
    "coredns": ("coredns", "coredns_autoscaler"),
    "metrics-server": ("metrics_server",),
    "nginx": ("ingress", "ingress_backend", "ingress_webhook"),
}
INGRESS_NETWORK_MODES = ("hostNetwork", "hostPort", "none")
DNS_POLICIES = ("ClusterFirst", "ClusterFirstWithHostNet", "Default", "None")
# metrics-server's command before monitoring.options (an option of the same name replaces one).
METRICS_SERVER_ARGS = {
    "cert-dir": "/tmp",
    "secure-port": "10250",
    "kubelet-insecure-tls": "true",
    "kubelet-preferred-address-types": "InternalIP",
    "kubelet-use-node-status-port": "true",
    "metric-resolution": "15s",
}
FLANNEL_BACKENDS = (
    "vxlan", "host-gw", "wireguard", "udp", "ipip", "ipsec", "alloc", "extension",
    "aws-vpc", "gce", "ali-vpc", "tencent-vpc",
)  # fmt: skip
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
DEFAULT_AUTOSCALER_PARAMS = {
    "coresPerReplica": 128,
    "nodesPerReplica": 4,
    "min": 1,
    "preventSinglePointFailure": True,
}


class AddonError(ConfigError):
    """An add-on (network plugin, DNS, addons, addons_include) cannot be compiled; see `issues`."""


@dataclass(frozen=True)
class Addon:
    """One unit rkel applies: a name and its Kubernetes objects (JSON-able), in apply order."""

    name: str  # "network-canal", "dns-coredns", "user-addons", "include:<path as written>"
    docs: tuple[dict[str, Any], ...]

    @property
    def hash(self) -> str:
        """What the planner compares: the same objects always give the same 16 hex digits."""
        return sha256_hex(canonical_json(list(self.docs)))[:16]

    def __hash__(self) -> int:  # the docs are dicts: hash by content, so Addons fit in sets
        return hash((self.name, self.hash))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "docs": list(self.docs)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Addon:
        return cls(name=data["name"], docs=tuple(data["docs"]))


class _Problem(Exception):
    """Internal: the issues that stop one add-on; compile_addons gathers them all."""

    def __init__(self, *issues: ConfigIssue) -> None:
        self.issues = list(issues)


class _Unsupported(_Problem):
    """Internal: the config asks for something rkel does not deploy yet. With `warnings`,
    compile_addons leaves that add-on out and warns instead of refusing the whole plan."""


def _issue(path: str, message: str) -> ConfigIssue:
    return ConfigIssue(path=path, line=None, message=message)


def compile_addons(
    config: ClusterConfig,
    base_dir: Path,
    catalog: VersionCatalog | None = None,
    source: str = "cluster.yml",
    warnings: list[str] | None = None,
) -> tuple[Addon, ...]:
    """The add-ons `config` wants, in RKE's deploy order; addons_include paths are relative to
    `base_dir`. Raises AddonError listing every problem, PlanError for an unsupported version.

    When `warnings` is a list, what rkel does not deploy yet (a network plugin, DNS provider or
    ingress controller it has no manifests for) is left out with a warning appended there,
    instead of being an error: the rest of the cluster can still be managed."""
    images = _Images(config, _version_info(config, catalog or default_catalog()))
    issues: list[ConfigIssue] = []
    addons: list[Addon] = []
    steps: list[Callable[[], Addon | None]] = [
        partial(_network, config, images),
        partial(_dns, config, images),
        partial(_monitoring, config, images),
        partial(_ingress, config, images),
        partial(_user_addons, config),
    ]
    steps += [
        partial(_include, config, i, Path(base_dir)) for i in range(len(config.addons_include))
    ]
    for step in steps:
        try:
            addon = step()
        except _Unsupported as problem:
            if warnings is None:
                issues += problem.issues
            else:
                warnings += [f"{i.path}: {i.message} (not deployed)" for i in problem.issues]
            continue
        except _Problem as problem:
            issues += problem.issues
            continue
        if addon is not None:
            addons.append(addon)
    if issues:
        raise AddonError(issues, source=source)
    return tuple(addons)


def addon_images(config: ClusterConfig, catalog: VersionCatalog | None = None) -> dict[str, str]:
    """system_images key -> image for the network plugin and DNS `config` would deploy (for plan
    display; unsupported choices and versions contribute nothing, compile_addons says why)."""
    catalog = catalog or default_catalog()
    if not catalog.has(config.version):
        return {}
    images = _Images(config, catalog.info(config.version))
    provider = (config.dns or {}).get("provider") or "coredns"
    extra: tuple[str, ...] = ("metrics-server",) if _monitoring_wanted(config) else ()
    extra += ("nginx",) if _ingress_provider(config) == "nginx" else ()
    keys = ADDON_IMAGES.get(config.network.plugin, ()) + ADDON_IMAGES.get(provider, ()) + tuple(
        key for m in extra for key in ADDON_IMAGES[m])
    out = {}
    for key in keys:
        try:
            out[key] = images(key)
        except _Problem:
            continue
    return out


def _version_info(config: ClusterConfig, catalog: VersionCatalog) -> VersionInfo:
    if not catalog.has(config.version):
        raise PlanError(
            f"kubernetes_version {config.version} is not supported; supported versions: "
            f"{', '.join(catalog.supported())}. Set kubernetes_version to one of them."
        )
    return catalog.info(config.version)


class _Images:
    """Add-on images as desired.py resolves the others: system_images > the version's default,
    then the default private registry in front of a reference that names no registry host."""

    def __init__(self, config: ClusterConfig, info: VersionInfo) -> None:
        default = next((r.url for r in config.private_registries if r.is_default), "")
        self.registry = registry_host(default)
        self.pinned = config.system_images
        self.info = info

    def __call__(self, key: str) -> str:
        image = self.pinned.get(key) or self.info.image(key)
        if not image:
            raise _Problem(
                _issue(
                    f"system_images.{key}",
                    f"rkel has no default image `{key}` for {self.info.version}; "
                    f"set system_images.{key}",
                )
            )
        if self.registry and not has_registry_host(image):
            return f"{self.registry}/{image}"
        return image


# --- templates ------------------------------------------------------------------------------

_DROP = object()
_PLACEHOLDER = re.compile(r"^\$([a-z][a-z0-9_]*)$")


@cache
def _template(name: str) -> tuple[Any, ...]:
    """The documents of lifecycle/data/addons/<name>, parsed once (callers must not mutate)."""
    text = resources.files("lifecycle").joinpath(f"data/addons/{name}").read_text()
    return tuple(YAML(typ="safe").load_all(text))


def _fill(node: Any, params: dict[str, Any]) -> Any:
    """A fresh copy of a template node with its placeholders replaced (a KeyError is a template
    bug: every placeholder must be given, None meaning "leave it out")."""
    if isinstance(node, str):
        match = _PLACEHOLDER.match(node)
        if not match:
            return node
        value = params[match.group(1)]
        return _DROP if value is None else copy.deepcopy(value)
    if isinstance(node, list):
        items = (_fill(item, params) for item in node)
        return [item for item in items if item is not _DROP]
    if isinstance(node, dict):
        if "$param" in node:
            value = params[node["$param"]]
            if value is None:
                return _fill(node["$default"], params) if "$default" in node else _DROP
            return copy.deepcopy(value)
        out = {}
        for key, item in node.items():
            if key == "$merge":
                continue
            value = _fill(item, params)
            if value is not _DROP:
                out[key] = value
        if "$merge" in node:
            out.update(copy.deepcopy(params[node["$merge"]] or {}))
        return out
    return node


def _render(name: str, params: dict[str, Any], rbac: bool) -> tuple[dict[str, Any], ...]:
    """Template `name` filled with `params`; without RBAC, no RBAC objects or service accounts."""
    docs: list[dict[str, Any]] = []
    for doc in _template(name):
        value = _fill(doc, params)
        if value is _DROP:
            continue
        docs.extend(value if isinstance(value, list) else [value])
    if not rbac:
        docs = [d for d in docs if d.get("kind") not in RBAC_KINDS]
        for doc in docs:
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            pod.pop("serviceAccountName", None)
    return tuple(docs)


def _calico_crds() -> list[dict[str, Any]]:
    (data,) = _template("calico-crds.yml")
    return [
        _fill(
            data["skeleton"],
            {
                "name": f"{k['plural']}.crd.projectcalico.org",
                "kind": k["kind"],
                "list_kind": f"{k['kind']}List",
                "plural": k["plural"],
                "singular": k["kind"].lower(),
                "scope": k["scope"],
            },
        )
        for k in data["kinds"]
    ]


# --- network --------------------------------------------------------------------------------


def _network(config: ClusterConfig, images: _Images) -> Addon | None:
    network = config.network
    plugin = network.plugin or "canal"
    if plugin == "none":
        return None
    if plugin not in NETWORK_PLUGINS:
        raise _Unsupported(
            _issue(
                "network.plugin",
                f"`{plugin}` is not supported by rkel yet (supported: "
                f"{', '.join(NETWORK_PLUGINS)}). Set `network.plugin: none` and deploy your own "
                "CNI manifest through addons_include (a local file).",
            )
        )
    options, extra = network.options, network.extra
    cidr = _pod_cidr(config, plugin)
    common: dict[str, Any] = {
        "node_selector": dict(extra.get("node_selector") or {}) or None,
        "update_strategy": _update_strategy(
            extra.get("update_strategy"), "network.update_strategy", ("RollingUpdate", "OnDelete")
        ),
    }
    rbac = config.authorization.mode == "rbac"
    if plugin == "flannel":
        backend = _backend(options, "flannel_backend_type")
        net_conf = {
            "Network": cidr,
            "EnableNFTables": False,
            "Backend": {
                "Type": backend,
                "VNI": _int_option(options, "flannel_backend_vni", 1, 0, 16777215),
                "Port": _int_option(options, "flannel_backend_port", 8472, 1, 65535),
            },
        }
        iface = options.get("flannel_iface") or ""
        params: dict[str, Any] = {
            **common,
            "net_conf": json.dumps(net_conf, indent=2) + "\n",
            "iface_arg": f"--iface={iface}" if iface else None,
            "priority_class": options.get("kube_flannel_priority_class_name") or None,
            "flannel_image": images("flannel"),
            "cni_image": images("flannel_cni"),
        }
        return Addon("network-flannel", _render("flannel.yml", params, rbac))
    if network.mtu < 0:
        raise _Problem(_issue("network.mtu", f"`{network.mtu}` must be 0 (automatic) or more"))
    net_conf = {
        "Network": cidr,
        "Backend": {"Type": _backend(options, "canal_flannel_backend_type")},
    }
    params = {
        **common,
        "canal_iface": options.get("canal_iface") or "",
        "veth_mtu": str(network.mtu or 1450),
        "net_conf": json.dumps(net_conf, indent=2) + "\n",
        "tolerations": list(extra.get("tolerations") or []) or None,
        "priority_class": options.get("canal_priority_class_name") or None,
        "controllers_priority_class": (
            options.get("calico_kube_controllers_priority_class_name") or None
        ),
        "calico_crds": _calico_crds(),
        "node_image": images("canal_node"),
        "cni_image": images("canal_cni"),
        "flannel_image": images("canal_flannel"),
        "controllers_image": images("canal_controllers"),
    }
    return Addon("network-canal", _render("canal.yml", params, rbac))


def _pod_cidr(config: ClusterConfig, plugin: str) -> str:
    # kube-controller-manager allocates node ranges from its effective flag, extra_args included.
    service = config.services.kube_controller
    cidr, path = service.cluster_cidr, "services.kube-controller.cluster_cidr"
    if service.extra_args.get("cluster-cidr"):
        cidr, path = service.extra_args["cluster-cidr"], "services.kube-controller.extra_args"
    try:
        network = ipaddress.ip_network(cidr)
    except ValueError:
        network = None
    if network is None or network.version != 4:
        raise _Problem(
            _issue(
                path,
                f"{plugin} as rkel deploys it needs one IPv4 range like 10.42.0.0/16, not "
                f"`{cidr}`; for IPv6 or dual-stack use `network.plugin: none` and your own CNI "
                "through addons_include",
            )
        )
    return str(network)


def _backend(options: dict[str, str], key: str) -> str:
    backend = options.get(key) or "vxlan"
    if backend not in FLANNEL_BACKENDS:
        raise _Problem(
            _issue(
                f"network.options.{key}",
                f"`{backend}` is not a flannel backend (valid: {', '.join(FLANNEL_BACKENDS)})",
            )
        )
    return backend


def _int_option(options: dict[str, str], key: str, default: int, low: int, high: int) -> int:
    raw = options.get(key)
    if raw is None or str(raw).strip() == "":
        return default
    text = str(raw).strip()
    if not text.isdigit() or not low <= int(text) <= high:
        raise _Problem(
            _issue(f"network.options.{key}", f"`{raw}` must be a whole number from {low} to {high}")
        )
    return int(text)


def _update_strategy(raw: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any] | None:
    """RKE's {strategy, rollingUpdate} as a Kubernetes strategy; None for the template default."""
    if not raw:
        return None
    if not isinstance(raw, dict):
        raise _Problem(_issue(path, "must be a mapping like {strategy: RollingUpdate}"))
    kind = raw.get("strategy") or raw.get("type") or "RollingUpdate"
    if kind not in allowed:
        raise _Problem(_issue(f"{path}.strategy", f"`{kind}` must be one of {', '.join(allowed)}"))
    out: dict[str, Any] = {"type": kind}
    rolling = raw.get("rollingUpdate") or raw.get("rolling_update")
    if kind == "RollingUpdate" and rolling:
        if not isinstance(rolling, dict):
            raise _Problem(_issue(f"{path}.rollingUpdate", "must be a mapping"))
        out["rollingUpdate"] = dict(rolling)
    return out


# --- DNS and ingress ------------------------------------------------------------------------

_LABEL = r"[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
_AUTOSCALER_KEYS = (
    ("cores_per_replica", "coresPerReplica"),
    ("nodes_per_replica", "nodesPerReplica"),
    ("min", "min"),
    ("max", "max"),
    ("prevent_single_point_failure", "preventSinglePointFailure"),
)


def _dns(config: ClusterConfig, images: _Images) -> Addon | None:
    dns = config.dns or {}
    provider = dns.get("provider") or "coredns"
    if provider == "none":
        return None
    if provider != "coredns":
        what = "is not supported by rkel" if provider == "kube-dns" else "is not a DNS provider"
        choices = " or ".join(DNS_PROVIDERS)
        raise _Unsupported(
            _issue("dns.provider", f"`{provider}` {what}; use {choices} (coredns is RKE's default)")
        )
    issues = []
    if dns.get("stubdomains"):
        issues.append(
            _issue(
                "dns.stubdomains",
                "RKE applies stubdomains to kube-dns only and rkel deploys CoreDNS; remove them "
                "(or set dns.provider: none and deploy your own CoreDNS Corefile via addons)",
            )
        )
    if (dns.get("nodelocal") or {}).get("ip_address"):
        issues.append(
            _issue(
                "dns.nodelocal.ip_address",
                "NodeLocal DNSCache is not deployed by rkel yet, but the kubelet would send every "
                "pod's DNS to it; remove dns.nodelocal",
            )
        )
    kubelet = config.services.kubelet
    domain, server = kubelet.cluster_domain, kubelet.cluster_dns_server
    if not _DOMAIN.match(domain):
        issues.append(_issue("services.kubelet.cluster_domain", f"`{domain}` is not a DNS domain"))
    api = config.services.kube_api
    service_range = api.extra_args.get("service-cluster-ip-range") or api.service_cluster_ip_range
    if not _in_service_range(server, service_range):
        issues.append(
            _issue(
                "services.kubelet.cluster_dns_server",
                f"`{server}` is outside the service range {service_range} (kube-api's "
                "service_cluster_ip_range), so the kube-dns Service cannot take it",
            )
        )
    upstreams = [str(u) for u in dns.get("upstreamnameservers") or []]
    issues += [
        _issue(f"dns.upstreamnameservers[{i}]", f"`{u}` is not an IP address (optionally :port)")
        for i, u in enumerate(upstreams)
        if not _nameserver(u)
    ]
    reverse = [str(c) for c in dns.get("reversecidrs") or []]
    issues += [
        _issue(f"dns.reversecidrs[{i}]", f"`{c}` is not a CIDR range like 10.43.0.0/16")
        for i, c in enumerate(reverse)
        if not _cidr(c)
    ]
    if issues:
        raise _Problem(*issues)
    options = dns.get("options") or {}
    params = {
        "corefile": _corefile(domain, reverse, upstreams),
        "cluster_dns_server": server,
        "node_selector": dict(dns.get("node_selector") or {}) or None,
        "tolerations": list(dns.get("tolerations") or []) or None,
        "update_strategy": _update_strategy(
            dns.get("update_strategy"), "dns.update_strategy", ("RollingUpdate", "Recreate")
        ),
        "priority_class": options.get("coredns_priority_class_name") or None,
        "autoscaler_priority_class": options.get("coredns_autoscaler_priority_class_name") or None,
        "autoscaler_params_arg": "--default-params="
        + json.dumps({"linear": _autoscaler_params(dns)}, separators=(",", ":")),
        "coredns_image": images("coredns"),
        "autoscaler_image": images("coredns_autoscaler"),
    }
    return Addon("dns-coredns", _render("coredns.yml", params, config.authorization.mode == "rbac"))


def _monitoring_wanted(config: ClusterConfig) -> bool:
    """RKE deploys metrics-server unless `monitoring.provider: none` (an unknown provider name
    gets its default too, with a warning from the loader)."""
    return ((config.monitoring or {}).get("provider") or "") != "none"


def _monitoring(config: ClusterConfig, images: _Images) -> Addon | None:
    if not _monitoring_wanted(config):
        return None
    monitoring = config.monitoring or {}
    replicas = monitoring.get("replicas")
    if replicas is not None and not (isinstance(replicas, int) and 1 <= replicas <= 100):
        raise _Problem(_issue("monitoring.replicas", f"`{replicas}` is not a number of replicas"
                              " from 1 to 100 (RKE's default is 1)"))
    flags = dict(METRICS_SERVER_ARGS)
    flags.update({str(k).removeprefix("--"): str(v)
                  for k, v in (monitoring.get("options") or {}).items()})
    params = {
        "image": images("metrics_server"),
        "command": ["/metrics-server", *(f"--{k}={v}" for k, v in sorted(flags.items()))],
        "replicas": replicas,
        "node_selector": dict(monitoring.get("node_selector") or {}) or None,
        "tolerations": list(monitoring.get("tolerations") or []) or None,
        "update_strategy": _update_strategy(
            monitoring.get("update_strategy"), "monitoring.update_strategy",
            ("RollingUpdate", "Recreate")),
        "priority_class": monitoring.get("metrics_server_priority_class_name") or None,
    }
    return Addon("monitoring-metrics-server",
                 _render("metrics-server.yml", params, config.authorization.mode == "rbac"))


def _corefile(domain: str, reverse: list[str], upstreams: list[str]) -> str:
    zones = " ".join(reverse) if reverse else "in-addr.arpa ip6.arpa"
    forward = " ".join(upstreams) if upstreams else '"/etc/resolv.conf"'
    return "\n".join(
        [
            ".:53 {",
            "    errors",
            "    health {",
            "      lameduck 5s",
            "    }",
            "    ready",
            f"    kubernetes {domain} {zones} {{",
            "      pods insecure",
            "      fallthrough in-addr.arpa ip6.arpa",
            "    }",
            "    prometheus :9153",
            f"    forward . {forward}",
            "    cache 30",
            "    loop",
            "    reload",
            "    loadbalance",
            "}",
            "",
        ]
    )


def _autoscaler_params(dns: dict[str, Any]) -> dict[str, Any]:
    given = dns.get("linear_autoscaler_params") or {}
    if not given:
        return dict(DEFAULT_AUTOSCALER_PARAMS)
    return {
        out: int(value) if isinstance(value, float) and value.is_integer() else value
        for key, out in _AUTOSCALER_KEYS
        if (value := given.get(key)) is not None
    }


def _nameserver(value: str) -> bool:
    """An upstream as CoreDNS' forward takes it: [dns://|tls://]IP[:port] ([IPv6]:port)."""
    for scheme in ("dns://", "tls://"):
        value = value.removeprefix(scheme)
    host, port = value, None
    if value.startswith("["):
        host, closed, rest = value[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            return False
        port = rest[1:] if rest else None
    elif value.count(":") == 1:
        host, port = value.split(":")
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _cidr(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


def _in_service_range(server: str, ranges: str) -> bool:
    try:
        ip = ipaddress.ip_address(server)
        nets = [ipaddress.ip_network(r.strip(), strict=False) for r in ranges.split(",")]
    except ValueError:
        return True  # the config validator reports malformed values; nothing to add here
    return any(ip.version == n.version and ip in n for n in nets)


def _ingress_provider(config: ClusterConfig) -> str:
    """RKE's rule: no provider named means nginx."""
    return str((config.ingress or {}).get("provider") or "nginx")


def _ingress(config: ClusterConfig, images: _Images) -> Addon | None:
    ingress = config.ingress or {}
    provider = _ingress_provider(config)
    if provider == "none":
        return None
    if provider != "nginx":
        raise _Unsupported(_issue("ingress.provider", f"`{provider}` is not an ingress provider"
                                  " rkel deploys; use nginx (RKE's default) or none"))
    issues = []
    mode = str(ingress.get("network_mode") or "hostNetwork")
    if mode not in INGRESS_NETWORK_MODES:
        issues.append(_issue("ingress.network_mode", f"`{mode}` is not one of"
                             f" {', '.join(INGRESS_NETWORK_MODES)} (RKE's default: hostNetwork)"))
    ports = {}
    for key, default in (("http_port", 80), ("https_port", 443)):
        value = ingress.get(key) or default
        if not isinstance(value, int) or not 1 <= value <= 65535:
            issues.append(_issue(f"ingress.{key}", f"`{value}` is not a port number"))
        ports[key] = value
    dns_policy = str(ingress.get("dns_policy") or "ClusterFirst")
    if dns_policy not in DNS_POLICIES:
        issues.append(_issue("ingress.dns_policy", f"`{dns_policy}` is not a pod dnsPolicy"
                             f" ({', '.join(DNS_POLICIES)})"))
    extras = {}
    for key in ("extra_envs", "extra_volumes", "extra_volume_mounts"):
        items = ingress.get(key) or []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                issues.append(_issue(f"ingress.{key}[{i}]", "each item is a mapping with a"
                                     " `name`, as in a pod spec"))
        try:
            extras[key] = _jsonable(list(items), f"ingress.{key}")
        except ValueError as exc:
            issues.append(_issue(f"ingress.{key}", str(exc)))
    if issues:
        raise _Problem(*issues)
    backend = ingress.get("default_backend") is not False  # RKE: on unless false
    args = {
        "election-id": "ingress-controller-leader",
        "controller-class": "k8s.io/ingress-nginx",
        "configmap": "$(POD_NAMESPACE)/ingress-nginx-controller",
        "tcp-services-configmap": "$(POD_NAMESPACE)/tcp-services",
        "udp-services-configmap": "$(POD_NAMESPACE)/udp-services",
        "annotations-prefix": "nginx.ingress.kubernetes.io",
        "validating-webhook": ":8443",
        "validating-webhook-certificate": "/usr/local/certificates/cert",
        "validating-webhook-key": "/usr/local/certificates/key",
        "watch-ingress-without-class": "true",
    }
    if backend:
        args["default-backend-service"] = "$(POD_NAMESPACE)/default-http-backend"
    if mode == "hostNetwork":  # the controller itself listens on the node's ports
        args.update({k: str(v) for k, v in (("http-port", ports["http_port"]),
                                            ("https-port", ports["https_port"])) if v not in (80, 443)})
    args.update({str(k).removeprefix("--"): str(v)
                 for k, v in (ingress.get("extra_args") or {}).items()})
    container_ports = [
        {"name": "http", "containerPort": ports["http_port"] if mode == "hostNetwork" else 80,
         "protocol": "TCP"},
        {"name": "https", "containerPort": ports["https_port"] if mode == "hostNetwork" else 443,
         "protocol": "TCP"},
        {"name": "webhook", "containerPort": 8443, "protocol": "TCP"},
    ]
    if mode == "hostPort":
        container_ports[0]["hostPort"] = ports["http_port"]
        container_ports[1]["hostPort"] = ports["https_port"]
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "POD_NAMESPACE",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
           {"name": "LD_PRELOAD", "value": "/usr/local/lib/libmimalloc.so"},
           *extras["extra_envs"]]
    default_class = ingress.get("default_ingress_class") is not False  # RKE: on unless false
    options = ingress.get("options") or {}
    params = {
        "options": {str(k): str(v) for k, v in options.items()} or None,
        "update_strategy": _update_strategy(
            ingress.get("update_strategy"), "ingress.update_strategy",
            ("RollingUpdate", "OnDelete")),
        "host_network": True if mode == "hostNetwork" else None,
        "dns_policy": dns_policy,
        "node_selector": dict(ingress.get("node_selector") or {}) or None,
        "priority_class": ingress.get("nginx_ingress_controller_priority_class_name") or None,
        "tolerations": list(ingress.get("tolerations") or []) or None,
        "image": images("ingress"),
        "webhook_image": images("ingress_webhook"),
        "args": ["/nginx-ingress-controller", *(f"--{k}={v}" for k, v in args.items())],
        "env": env,
        "ports": container_ports,
        "volume_mounts": [{"name": "webhook-cert", "mountPath": "/usr/local/certificates/",
                           "readOnly": True}, *extras["extra_volume_mounts"]],
        "volumes": [{"name": "webhook-cert", "secret": {"secretName": "ingress-nginx-admission"}},
                    *extras["extra_volumes"]],
        "class_annotations": ({"ingressclass.kubernetes.io/is-default-class": "true"}
                              if default_class else None),
        "backend_deployment": _default_backend(ingress, images) if backend else None,
        "backend_service": _DEFAULT_BACKEND_SERVICE if backend else None,
    }
    return Addon("ingress-nginx",
                 _render("ingress-nginx.yml", params, config.authorization.mode == "rbac"))


_DEFAULT_BACKEND_SERVICE = {
    "apiVersion": "v1", "kind": "Service",
    "metadata": {"name": "default-http-backend", "namespace": "ingress-nginx",
                 "labels": {"app": "default-http-backend"}},
    "spec": {"ports": [{"port": 80, "targetPort": 8080}],
             "selector": {"app": "default-http-backend"}},
}


def _default_backend(ingress: dict[str, Any], images: _Images) -> dict[str, Any]:
    """The Deployment answering 404 for what no Ingress routes (RKE's default-http-backend)."""
    pod: dict[str, Any] = {
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "node-role.kubernetes.io/worker", "operator": "Exists"}]}]}}},
        "terminationGracePeriodSeconds": 60,
        "tolerations": list(ingress.get("tolerations") or [])
        or [{"effect": "NoExecute", "operator": "Exists"},
            {"effect": "NoSchedule", "operator": "Exists"}],
        "containers": [{
            "name": "default-http-backend",
            "image": images("ingress_backend"),
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"},
                              "initialDelaySeconds": 30, "timeoutSeconds": 5},
            "ports": [{"containerPort": 8080}],
            "resources": {"limits": {"cpu": "10m", "memory": "20Mi"},
                          "requests": {"cpu": "10m", "memory": "20Mi"}},
            "securityContext": {"runAsUser": 65534},
        }],
    }
    priority = ingress.get("default_http_backend_priority_class_name")
    if priority:
        pod["priorityClassName"] = priority
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "default-http-backend", "namespace": "ingress-nginx",
                     "labels": {"app": "default-http-backend"}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "default-http-backend"}},
                 "template": {"metadata": {"labels": {"app": "default-http-backend"}},
                              "spec": pod}},
    }


# --- user addons ----------------------------------------------------------------------------


def _user_addons(config: ClusterConfig) -> Addon | None:
    if not config.addons.strip():
        return None
    docs = _manifests(config.addons, "addons", "the `addons` text")
    return Addon("user-addons", docs) if docs else None


def _include(config: ClusterConfig, index: int, base_dir: Path) -> Addon:
    entry = config.addons_include[index]
    path = f"addons_include[{index}]"
    if "://" in entry:
        raise _Problem(
            _issue(
                path,
                f"`{entry}` is a URL: rkel does not download addons_include URLs. Download the "
                "file (e.g. `curl -fsSLo manifest.yaml <url>`), review it, and list its local "
                "path here instead",
            )
        )
    earlier = config.addons_include[:index]
    if entry in earlier:
        raise _Problem(
            _issue(path, f"`{entry}` is listed twice (also addons_include[{earlier.index(entry)}])")
        )
    file = Path(entry).expanduser()
    if not file.is_absolute():
        file = base_dir / file
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _Problem(_issue(path, f"{file} does not exist")) from None
    except IsADirectoryError:
        raise _Problem(_issue(path, f"{file} is a folder; list the manifest files")) from None
    except UnicodeDecodeError:
        raise _Problem(_issue(path, f"{file} is not UTF-8 text")) from None
    except OSError as exc:
        raise _Problem(_issue(path, f"{file} cannot be read: {exc.strerror}")) from None
    docs = _manifests(text, path, str(file))
    if not docs:
        raise _Problem(_issue(path, f"{file} holds no Kubernetes objects"))
    return Addon(f"include:{entry}", docs)


class _KubectlConstructor(SafeConstructor):
    """YAML 1.1 values as kubectl's yaml.v2 gives them: timestamps and sexagesimals stay text."""

    def construct_yaml_timestamp(self, node: Any, values: Any = None) -> Any:
        return self.construct_scalar(node)

    def construct_yaml_int(self, node: Any) -> Any:
        if ":" in str(node.value):
            return self.construct_scalar(node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: Any) -> Any:
        if ":" in str(node.value):
            return self.construct_scalar(node)
        return super().construct_yaml_float(node)


for _tag, _method in (
    ("timestamp", _KubectlConstructor.construct_yaml_timestamp),
    ("int", _KubectlConstructor.construct_yaml_int),
    ("float", _KubectlConstructor.construct_yaml_float),
):
    _KubectlConstructor.add_constructor(f"tag:yaml.org,2002:{_tag}", _method)


class _Yaml11Resolver(VersionedResolver):
    """YAML 1.1 for every document (ruamel's `version` only holds until the next `---`)."""

    @property
    def processing_version(self) -> Any:
        return (1, 1)


def _kubectl_yaml() -> YAML:
    yaml = YAML(typ="safe", pure=True)
    yaml.Resolver = _Yaml11Resolver
    yaml.Constructor = _KubectlConstructor
    return yaml


def _manifests(text: str, path: str, label: str) -> tuple[dict[str, Any], ...]:
    """The Kubernetes objects of a multi-document YAML text, checked; `label` names it."""
    try:
        raw = list(_kubectl_yaml().load_all(text))
        starts = [
            after.start_mark.line + 1
            for event, after in _pairs(_kubectl_yaml().parse(text))
            if isinstance(event, DocumentStartEvent)
        ]
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "syntax error"
        raise _Problem(_issue(path, f"{label} is not valid YAML{where}: {what}")) from None
    except YAMLError as exc:
        raise _Problem(_issue(path, f"{label} is not valid YAML: {exc}")) from None
    docs: list[dict[str, Any]] = []
    issues: list[ConfigIssue] = []
    for number, (doc, line) in enumerate(zip_longest(raw, starts), start=1):
        if doc is None:
            continue
        where = f"{label}: document {number}" + (f" at line {line}" if line else "")
        for obj, at in _flatten(doc, where):
            problem = _check_object(obj, at)
            if problem:
                issues.append(_issue(path, problem))
                continue
            try:
                docs.append(_jsonable(obj, at))
            except ValueError as exc:
                issues.append(_issue(path, str(exc)))
    if issues:
        raise _Problem(*issues)
    return tuple(docs)


def _pairs(events: Iterator[Any]) -> Iterator[tuple[Any, Any]]:
    """Each event with the one after it (the first node of a document gives its line)."""
    previous = None
    for event in events:
        if previous is not None:
            yield previous, event
        previous = event


def _flatten(doc: Any, where: str) -> Iterator[tuple[Any, str]]:
    """The objects of a document: itself, or the items of a `kind: List` (recursively)."""
    if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
        for number, item in enumerate(doc["items"], start=1):
            yield from _flatten(item, f"{where}, List item {number}")
        return
    yield doc, where


def _check_object(doc: Any, where: str) -> str:
    """Why `doc` is not a Kubernetes object kubectl can apply ("" when it is one)."""
    if not isinstance(doc, dict):
        return (
            f"{where} is a {type(doc).__name__}, not a Kubernetes object "
            "(a mapping with apiVersion, kind and metadata.name)"
        )
    if doc.get("kind") == "List":  # _flatten took it apart when it had items
        return f"{where} is a kind: List without an `items` list"
    missing = [k for k in ("apiVersion", "kind") if not _text(doc.get(k))]
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict) or not _text(metadata.get("name")):
        missing.append("metadata.name")
    if not missing:
        return ""
    kind = f" (kind: {doc['kind']})" if _text(doc.get("kind")) else ""
    return (
        f"{where}{kind} is missing {', '.join(missing)}; every object needs apiVersion, kind "
        "and metadata.name"
    )


def _text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _jsonable(value: Any, where: str) -> Any:
    """`value` as JSON values, keys as text (as kubectl converts YAML); ValueError otherwise."""
    if isinstance(value, dict):
        return {_key(k): _jsonable(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} holds {value}, which JSON cannot carry; quote it")
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, date):
        return value.isoformat()
    raise ValueError(
        f"{where} holds a YAML {type(value).__name__} value, which Kubernetes objects cannot "
        "carry; write it as text"
    )


def _key(key: Any) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    return str(key)
