"""Semantic checks on a loaded `ClusterConfig`: the rules RKE enforces, and a few it should have.

Runs on the typed model (defaults already applied) and points each issue at the file through a
`Locator` built by the walker. Returns every error and warning; never raises.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from dataclasses import dataclass, field

from lifecycle.config.issues import ConfigIssue
from lifecycle.config.model import NETWORK_PLUGINS, ROLES, ClusterConfig, Node

TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
AUTHORIZATION_MODES = ("rbac", "none")
AUTHENTICATION_STRATEGIES = ("x509", "webhook")
_VERSION = re.compile(r"v[0-9]+\.[0-9]+\.[0-9]+(-rancher[0-9]+(-[0-9]+)?)?")
_PLACEHOLDER = re.compile(r"\$(\{[A-Za-z_][A-Za-z0-9_]*\}|[A-Za-z_][A-Za-z0-9_]*)")
_PERCENT = re.compile(r"([0-9]+)%")
_DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() takes "²", which int() refuses
_PARENT = re.compile(r"(.*?)(\.[^.\[\]]+|\[[^\]]*\])$")

# Providers RKE knows for each add-on; anything else is deployed as RKE's default (a warning).
KNOWN_PROVIDERS = {
    "ingress": ("nginx", "none"),
    "dns": ("coredns", "kube-dns", "none"),
    "monitoring": ("metrics-server", "none"),
}


@dataclass(frozen=True)
class Locator:
    """Finds the line of a YAML path, falling back to its nearest parent that has one."""

    lines: dict[str, int]
    aliases: dict[str, str] = field(default_factory=dict)  # canonical prefix -> as written

    def where(self, path: str) -> tuple[str, int | None]:
        """(the path as the user wrote it, its line or None)."""
        shown = path
        for canonical, written in self.aliases.items():
            if path == canonical or path.startswith((canonical + ".", canonical + "[")):
                shown = written + path[len(canonical) :]
        probe = shown
        while True:
            if probe in self.lines:
                return shown, self.lines[probe]
            match = _PARENT.fullmatch(probe)
            if not match or not match.group(1):
                return shown, self.lines.get(probe) if probe else None
            probe = match.group(1)

    def given(self, path: str) -> bool:
        """Whether `path` was written in the file (not a default)."""
        shown, _ = self.where(path)
        return shown in self.lines


class _Report:
    def __init__(self, locator: Locator) -> None:
        self.locator = locator
        self.errors: list[ConfigIssue] = []
        self.warnings: list[ConfigIssue] = []

    def error(self, path: str, message: str, hint: str = "") -> None:
        shown, line = self.locator.where(path)
        self.errors.append(ConfigIssue(shown, line, message, hint))

    def warn(self, path: str, message: str, hint: str = "") -> None:
        shown, line = self.locator.where(path)
        self.warnings.append(ConfigIssue(shown, line, message, hint))

    def line(self, path: str) -> int | None:
        return self.locator.where(path)[1]


def validate(
    config: ClusterConfig, locator: Locator
) -> tuple[list[ConfigIssue], list[ConfigIssue]]:
    """(errors, warnings) for `config`; paths and lines come from `locator`."""
    report = _Report(locator)
    _check_nodes(config, report)
    _check_cluster_roles(config, report)
    _check_services(config, report)
    _check_cluster(config, report)
    return report.errors, report.warnings


def _close(word: str, choices: tuple[str, ...]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean `{match[0]}`?" if match else ""


_FILL_HINT = "fill in the template (e.g. with envsubst) before running rkel"


def _placeholders(report: _Report, path: str, value: str) -> bool:
    """Warn about `$ip0`-style template variables left in a value; True if there were any."""
    found = _PLACEHOLDER.search(value)
    if found:
        report.warn(path, f"`{value}` looks like an unfilled template placeholder", _FILL_HINT)
    return bool(found)


def _check_nodes(config: ClusterConfig, report: _Report) -> None:
    if not config.nodes:
        report.error("nodes", "no nodes: list at least one under `nodes:` (address, user, role)")
        return
    by_address: dict[str, int] = {}
    by_name: dict[str, int] = {}
    for i, node in enumerate(config.nodes):
        here = f"nodes[{i}]"
        _check_node(node, i, report)
        if node.address:
            address = node.address.lower()
            if address in by_address:
                j = by_address[address]
                report.error(
                    f"{here}.address",
                    f"address `{node.address}` is also used by nodes[{j}] (line "
                    f"{report.line(f'nodes[{j}].address')}); each node needs its own address",
                )
            else:
                by_address[address] = i
        name = node.name
        if not name:
            continue
        if name in by_name:
            j = by_name[name]
            other = config.nodes[j]
            if not node.hostname_override and not other.hostname_override:
                continue  # the same address twice: already reported above
            field_ = "hostname_override" if node.hostname_override else "address"
            report.error(
                f"{here}.{field_}",
                f"node name `{name}` is also the name of nodes[{j}] (line "
                f"{report.line(f'nodes[{j}]')}); the Kubernetes node name (hostname_override, "
                "else address, lower-cased) must be unique",
                hint="give one of them a different `hostname_override`",
            )
        else:
            by_name[name] = i


def _check_node(node: Node, i: int, report: _Report) -> None:
    here = f"nodes[{i}]"
    number = i + 1  # RKE counts hosts from 1 in its messages
    if not node.address:
        report.error(
            here, f"host ({number}) has no `address`: add the IP or DNS name rkel should SSH to"
        )
    if not node.user:
        report.error(
            here,
            f"User for host ({number}) is not provided: add `user: <ssh user>` to this node",
        )
    # Template files (rancher/rancher's test clusters) leave `$ip0`-style variables: one
    # warning per node, at the first one, keeps the list readable.
    templated = [
        (key, getattr(node, key))
        for key in ("address", "internal_address", "hostname_override", "user", "ssh_key_path")
        if _PLACEHOLDER.search(getattr(node, key))
    ]
    if templated:
        shown = ", ".join(f"{key} `{value}`" for key, value in templated)
        verb = "looks like an unfilled template placeholder"
        if len(templated) > 1:
            verb = "look like unfilled template placeholders"
        report.warn(f"{here}.{templated[0][0]}", f"{shown}: {verb}", _FILL_HINT)
    if not node.role:
        report.error(
            f"{here}.role" if report.locator.given(f"{here}.role") else here,
            f"host ({number}) has no roles: give `role:` a list of {', '.join(ROLES)}",
        )
    for j, role in enumerate(node.role):
        if role not in ROLES:
            report.error(
                f"{here}.role[{j}]",
                f"unknown role `{role}` (valid: {', '.join(ROLES)})",
                _close(role, ROLES),
            )
    for j, taint in enumerate(node.taints):
        if not taint.key:
            report.error(f"{here}.taints[{j}]", "a taint needs a `key`")
        if taint.effect not in TAINT_EFFECTS:
            report.error(
                f"{here}.taints[{j}].effect",
                f"unknown taint effect `{taint.effect}` (valid: {', '.join(TAINT_EFFECTS)})",
                _close(taint.effect, TAINT_EFFECTS),
            )


def _check_cluster_roles(config: ClusterConfig, report: _Report) -> None:
    if not config.nodes:
        return
    etcd = config.services.etcd
    if etcd.external_urls:
        if config.nodes_with("etcd"):
            report.error(
                "services.etcd.external_urls",
                "external etcd is configured, but some nodes also have the etcd role; "
                "use one or the other",
            )
        for key in ("ca_cert", "cert", "key"):
            if not getattr(etcd, key):
                report.error(f"services.etcd.{key}", f"external etcd needs `{key}`")
    elif not config.nodes_with("etcd"):
        report.error(
            "nodes", "no node has the `etcd` role: give at least one node `etcd` (3 for HA)"
        )
    if not config.nodes_with("controlplane"):
        report.error(
            "nodes", "no node has the `controlplane` role: give at least one node `controlplane`"
        )


def _number(text: str) -> int | None:
    """`text` (stripped) as a non-negative whole number of ASCII digits, else None."""
    text = text.strip()
    return int(text) if _DIGITS.fullmatch(text) else None


def _check_cidr(report: _Report, path: str, value: str) -> None:
    """One CIDR, or two (IPv4 and IPv6) separated by a comma for dual-stack."""
    parts = [p.strip() for p in value.split(",")]
    families = set()
    for part in parts:
        try:
            families.add(ipaddress.ip_network(part, strict=False).version)
        except ValueError:
            report.error(path, f"`{part}` is not a CIDR range like 10.43.0.0/16")
            return
    if len(parts) > 2 or len(families) != len(parts):
        report.error(
            path, f"`{value}`: give one CIDR, or one IPv4 and one IPv6 CIDR for dual-stack"
        )


def _check_services(config: ClusterConfig, report: _Report) -> None:
    services = config.services
    _check_cidr(
        report,
        "services.kube-api.service_cluster_ip_range",
        services.kube_api.service_cluster_ip_range,
    )
    _check_cidr(
        report, "services.kube-controller.cluster_cidr", services.kube_controller.cluster_cidr
    )
    _check_cidr(
        report,
        "services.kube-controller.service_cluster_ip_range",
        services.kube_controller.service_cluster_ip_range,
    )
    dns_server = services.kubelet.cluster_dns_server
    try:
        ipaddress.ip_address(dns_server)
    except ValueError:
        report.error("services.kubelet.cluster_dns_server", f"`{dns_server}` is not an IP address")

    path = "services.kube-api.service_node_port_range"
    value = services.kube_api.service_node_port_range
    low_text, _, high_text = value.partition("-")
    low, high = _number(low_text), _number(high_text)
    if low is None or high is None or not 1 <= low < high <= 65535:
        report.error(
            path,
            f"`{value}` is not a port range: use `A-B` with 1 <= A < B <= 65535, e.g. 30000-32767",
        )

    backup = services.etcd.backup_config
    if backup is not None and backup.s3backupconfig is not None:
        s3 = backup.s3backupconfig
        base = "services.etcd.backup_config.s3backupconfig"
        if not s3.bucket_name:
            report.error(f"{base}.bucket_name", "S3 backups need `bucket_name`")
        if not s3.endpoint:
            report.error(f"{base}.endpoint", "S3 backups need `endpoint` (e.g. s3.amazonaws.com)")


def _check_unavailable(report: _Report, path: str, value: str) -> None:
    text = value.strip()
    percent = _PERCENT.fullmatch(text)
    number = _number(percent.group(1) if percent else text)
    ok = number is not None and (1 <= number <= 100 if percent else number >= 1)
    if not ok:
        report.error(path, f"`{value}` is not a node count (>= 1) or a percentage from 1% to 100%")


def _check_cluster(config: ClusterConfig, report: _Report) -> None:
    plugin = config.network.plugin
    if plugin not in NETWORK_PLUGINS:
        report.error(
            "network.plugin",
            f"unknown network plugin `{plugin}` (valid: {', '.join(NETWORK_PLUGINS)})",
            _close(plugin, NETWORK_PLUGINS),
        )
    mode = config.authorization.mode
    if mode not in AUTHORIZATION_MODES:
        report.error(
            "authorization.mode",
            f"unknown authorization mode `{mode}` (valid: rbac, none)",
            _close(mode, AUTHORIZATION_MODES),
        )
    strategy = config.authentication.strategy
    parts = strategy.split("|")
    if "x509" not in parts or any(p not in AUTHENTICATION_STRATEGIES for p in parts):
        report.error(
            "authentication.strategy",
            f"unknown authentication strategy `{strategy}` (valid: x509, or x509|webhook)",
        )
    version = config.kubernetes_version
    templated = bool(version) and _placeholders(report, "kubernetes_version", version)
    if version and not templated and not _VERSION.fullmatch(version):
        report.error(
            "kubernetes_version", f"`{version}` is not a Kubernetes version like v1.30.5-rancher1-1"
        )
    if config.ssh_key_path:
        _placeholders(report, "ssh_key_path", config.ssh_key_path)
    strategy_ = config.upgrade_strategy
    _check_unavailable(
        report, "upgrade_strategy.max_unavailable_worker", strategy_.max_unavailable_worker
    )
    _check_unavailable(
        report,
        "upgrade_strategy.max_unavailable_controlplane",
        strategy_.max_unavailable_controlplane,
    )
    sections = {"ingress": config.ingress, "dns": config.dns or {}, "monitoring": config.monitoring}
    for section, known in KNOWN_PROVIDERS.items():
        provider = sections[section].get("provider") or ""
        if provider and provider not in known:
            report.warn(
                f"{section}.provider",
                f"`{provider}` is not a {section} provider RKE knows ({', '.join(known)}); "
                "RKE deploys its default one",
                _close(provider, known),
            )
    if config.bastion_host is not None and not config.bastion_host.user:
        report.error("bastion_host.user", "the bastion host needs a `user`")
