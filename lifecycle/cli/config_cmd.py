"""`rkel config [flags]`: write a cluster.yml by asking questions, as `rke config` does; also
`--empty`, `--print`, `--list-versions` and `--system-images [--version V]`.

The answers become a `ConfigDraft` (a value); `render_draft` turns it into RKE-format YAML that
rkel's own loader reads back without a warning, and `draft_from_config` reads a draft back out of
a loaded file (the round trip the tests check). No secret is asked for: nodes log in with key
files named by path (or the SSH agent), never with a key or password typed here.
"""

from __future__ import annotations

import io
import ipaddress
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from lifecycle.config import load_config_text
from lifecycle.config.model import DEFAULT_KUBERNETES_VERSION, ROLES, ClusterConfig
from lifecycle.errors import ConfigError, RkelError
from lifecycle.versions import supported_versions, version_info

# The network plugins rkel deploys (README: calico and weave are not deployed yet).
PLUGINS = ("canal", "flannel", "none")
DEFAULT_SOCKET = "/var/run/docker.sock"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HOST = re.compile(r"[A-Za-z0-9:.\[\]_-]+")
T = TypeVar("T")


@dataclass(frozen=True)
class NodeDraft:
    address: str
    user: str
    roles: tuple[str, ...]  # sorted, from ROLES
    port: int = 22
    ssh_key_path: str = ""  # "" : the cluster's ssh_key_path
    hostname_override: str = ""
    internal_address: str = ""
    docker_socket: str = DEFAULT_SOCKET


@dataclass(frozen=True)
class ConfigDraft:
    """What `rkel config` asks for; everything else keeps RKE's defaults."""

    nodes: tuple[NodeDraft, ...] = ()
    cluster_name: str = "local"
    kubernetes_version: str = DEFAULT_KUBERNETES_VERSION
    ssh_key_path: str = "~/.ssh/id_rsa"
    network_plugin: str = "canal"
    cluster_domain: str = "cluster.local"
    service_cluster_ip_range: str = "10.43.0.0/16"
    cluster_cidr: str = "10.42.0.0/16"
    cluster_dns_server: str = "10.43.0.10"


# ---------------------------------------------------------------------------- rendering (pure)
HEADER = """\
# cluster.yml written by `rkel config` (RKE v1 format: `rke up` reads it too).
# Check it with `rkel config validate`, then `rkel doctor` and `rkel plan`.
"""

EMPTY = f"""\
# An empty cluster.yml for rkel (RKE v1 format). Fill in each node's address and SSH user,
# give every node its roles (at least one etcd and one controlplane node; 3 etcd nodes for HA),
# add a node entry per server, then run `rkel config validate`.
cluster_name: local
kubernetes_version: {DEFAULT_KUBERNETES_VERSION}
ssh_key_path: ~/.ssh/id_rsa   # the private key rkel logs in with (or per node: ssh_key_path)
nodes:
  - address: ""               # IP or DNS name rkel reaches the node at over SSH
    port: 22
    user: ""                  # an SSH user in the node's docker group
    role: [controlplane, etcd, worker]
network:
  plugin: canal               # canal, flannel or none
"""


def render_draft(draft: ConfigDraft) -> str:
    """The cluster.yml text for `draft`."""
    doc = CommentedMap()
    doc["cluster_name"] = draft.cluster_name
    doc["kubernetes_version"] = draft.kubernetes_version
    doc["ssh_key_path"] = draft.ssh_key_path
    nodes = CommentedSeq()
    for n in draft.nodes:
        node = CommentedMap()
        node["address"] = n.address
        node["port"] = n.port
        node["user"] = n.user
        role = CommentedSeq(list(n.roles))
        role.fa.set_flow_style()
        node["role"] = role
        for key in ("ssh_key_path", "hostname_override", "internal_address"):
            if getattr(n, key):
                node[key] = getattr(n, key)
        if n.docker_socket != DEFAULT_SOCKET:
            node["docker_socket"] = n.docker_socket
        nodes.append(node)
    doc["nodes"] = nodes
    doc["network"] = {"plugin": draft.network_plugin}
    doc["services"] = {
        "kube-api": {"service_cluster_ip_range": draft.service_cluster_ip_range},
        "kube-controller": {"cluster_cidr": draft.cluster_cidr,
                            "service_cluster_ip_range": draft.service_cluster_ip_range},
        "kubelet": {"cluster_domain": draft.cluster_domain,
                    "cluster_dns_server": draft.cluster_dns_server},
    }
    doc["authorization"] = {"mode": "rbac"}
    yaml = YAML()
    yaml.default_flow_style = False
    yaml.indent(mapping=2, sequence=4, offset=2)
    out = io.StringIO()
    yaml.dump(doc, out)
    return HEADER + out.getvalue()


def draft_from_config(config: ClusterConfig) -> ConfigDraft:
    """The draft a loaded cluster.yml holds (the fields `rkel config` asks for)."""
    return ConfigDraft(
        nodes=tuple(
            NodeDraft(n.address, n.user, tuple(sorted(n.role)), n.port, n.ssh_key_path,
                      n.hostname_override, n.internal_address, n.docker_socket)
            for n in config.nodes
        ),
        cluster_name=config.cluster_name,
        kubernetes_version=config.kubernetes_version,
        ssh_key_path=config.ssh_key_path,
        network_plugin=config.network.plugin,
        cluster_domain=config.services.kubelet.cluster_domain,
        service_cluster_ip_range=config.services.kube_api.service_cluster_ip_range,
        cluster_cidr=config.services.kube_controller.cluster_cidr,
        cluster_dns_server=config.services.kubelet.cluster_dns_server,
    )


# ---------------------------------------------------------------------------- answers
def _name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError("use letters, digits, `.`, `_` and `-`, starting with a letter or digit")
    return value


def _count(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 1000:
        raise ValueError(f"`{value}` is not a number of hosts from 1 to 1000")
    return int(value)


def _port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ValueError(f"`{value}` is not a port from 1 to 65535")
    return int(value)


def _host(value: str) -> str:
    if not _HOST.fullmatch(value):
        raise ValueError("give an IP address or a DNS name, without spaces")
    return value


def _optional(check: Callable[[str], str]) -> Callable[[str], str]:
    return lambda value: "" if value.lower() in ("", "none") else check(value)


def _path(value: str) -> str:
    if not value:
        raise ValueError("give a file path")
    return value


def _network(value: str) -> str:
    value = value.lower()
    if value not in PLUGINS:
        more = " (rkel does not deploy it yet)" if value in ("calico", "weave", "aci") else ""
        raise ValueError(f"`{value}`{more}: choose one of {', '.join(PLUGINS)}")
    return value


def _version(value: str) -> str:
    known = supported_versions()
    if value not in known:
        raise ValueError(f"rkel knows {', '.join(known)}")
    return value


def _cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"`{value}` is not a CIDR range like 10.43.0.0/16") from None
    return value


def _domain(value: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", value):
        raise ValueError(f"`{value}` is not a DNS domain like cluster.local")
    return value


class EndOfInput(Exception):
    """stdin ended before every question was answered."""


class Asker:
    """Questions on stderr, answers from stdin: stdout stays clean for --print (click's prompt
    would write a space to stdout for each question)."""

    def _line(self, text: str) -> str:
        typer.echo(text, nl=False, err=True)
        try:
            return input().strip()
        except EOFError:
            raise EndOfInput() from None

    def ask(self, text: str, default: Any, check: Callable[[str], T]) -> T:
        """Ask until `check` accepts the answer (it raises ValueError saying what is wrong);
        `default` (None: no default) on a bare Enter."""
        shown = f" [{default}]" if default is not None else ""
        while True:
            answer = self._line(f"{text}{shown}: ") or ("" if default is None else str(default))
            try:
                return check(answer)
            except ValueError as exc:
                self.say(f"Error: {exc}")

    def yes(self, text: str, default: bool) -> bool:
        while True:
            answer = self._line(f"{text} [{'Y/n' if default else 'y/N'}]: ").lower()
            if not answer:
                return default
            if answer in ("y", "yes", "n", "no"):
                return answer.startswith("y")
            self.say("Error: answer y or n")

    def say(self, text: str) -> None:
        typer.echo(text, err=True)


def ask_draft(asker: Asker) -> ConfigDraft:
    """Ask every question `rke config` asks that rkel uses; re-ask a bad answer."""
    d = ConfigDraft()
    name = asker.ask("Cluster name", d.cluster_name, _name)
    key = asker.ask("Cluster level SSH private key path", d.ssh_key_path, _path)
    if not os.path.exists(os.path.expanduser(key)):
        asker.say(f"note: {key} does not exist on this machine; create it or fix the path "
                  "before `rkel apply`")
    count = asker.ask("Number of hosts", 1, _count)
    nodes: list[NodeDraft] = []
    for i in range(1, count + 1):
        nodes.append(_ask_node(asker, i, count, nodes))
    nodes = _ensure_role(asker, nodes, "etcd")
    nodes = _ensure_role(asker, nodes, "controlplane")
    plugin = asker.ask(f"Network plugin ({', '.join(PLUGINS)})", d.network_plugin, _network)
    version = asker.ask(f"Kubernetes version ({', '.join(supported_versions())})",
                        d.kubernetes_version, _version)
    domain = asker.ask("Cluster domain", d.cluster_domain, _domain)
    services = asker.ask("Service cluster IP range", d.service_cluster_ip_range, _cidr)
    pods = asker.ask("Cluster network CIDR (pods)", d.cluster_cidr, _cidr)
    dns_default = _dns_default(services, d.cluster_dns_server)
    dns = asker.ask("Cluster DNS service IP", dns_default, lambda v: _dns(v, services))
    return ConfigDraft(tuple(nodes), name, version, key, plugin, domain, services, pods, dns)


def _ask_node(asker: Asker, i: int, count: int, before: list[NodeDraft]) -> NodeDraft:
    taken = {n.address.lower(): k for k, n in enumerate(before, 1)}

    def address(value: str) -> str:
        _host(value)
        if value.lower() in taken:
            raise ValueError(f"{value} is already the address of host ({taken[value.lower()]})")
        return value

    addr = asker.ask(f"SSH address of host ({i})", None, address)
    port = asker.ask(f"SSH port of host ({i})", 22, _port)
    user = asker.ask(f"SSH user of host ({i})", "ubuntu", _name)
    key = asker.ask(f"SSH private key path of host ({i}) (none: the cluster's)", "none",
                    _optional(_path))
    while True:
        defaults = {"controlplane": i == 1, "etcd": i == 1, "worker": count == 1 or i > 1}
        roles = tuple(r for r in ROLES if asker.yes(
            f"Is host ({i}) {'an' if r == 'etcd' else 'a'} {r} host?", defaults[r]))
        if roles:
            break
        asker.say(f"host ({i}) needs at least one role")
    hostname = asker.ask(f"Override hostname of host ({i})", "none", _optional(_host))
    internal = asker.ask(f"Internal address of host ({i})", "none", _optional(_host))
    socket = asker.ask(f"Docker socket path on host ({i})", DEFAULT_SOCKET, _path)
    return NodeDraft(addr, user, tuple(sorted(roles)), port, key, hostname.lower(), internal,
                     socket)


def _ensure_role(asker: Asker, nodes: list[NodeDraft], role: str) -> list[NodeDraft]:
    if any(role in n.roles for n in nodes):
        return nodes

    def pick(value: str) -> int:
        if not value.isdigit() or not 1 <= int(value) <= len(nodes):
            raise ValueError(f"give a host number from 1 to {len(nodes)}")
        return int(value)

    asker.say(f"No host has the {role} role, and a cluster needs one.")
    which = asker.ask(f"Which host (1-{len(nodes)}) should be {'an' if role == 'etcd' else 'a'}"
                      f" {role} host?", 1, pick)
    n = nodes[which - 1]
    chosen = NodeDraft(n.address, n.user, tuple(sorted({*n.roles, role})), n.port,
                       n.ssh_key_path, n.hostname_override, n.internal_address, n.docker_socket)
    return [chosen if k == which - 1 else m for k, m in enumerate(nodes)]


def _dns_default(services: str, fallback: str) -> str:
    try:
        net = ipaddress.ip_network(services, strict=False)
        return str(net.network_address + 10) if net.num_addresses > 11 else fallback
    except ValueError:
        return fallback


def _dns(value: str, services: str) -> str:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"`{value}` is not an IP address") from None
    if ip not in ipaddress.ip_network(services, strict=False):
        raise ValueError(f"{value} is not in the service range {services}")
    return value


# ---------------------------------------------------------------------------- writing
def check_loads(text: str, source: str) -> None:
    """Refuse (ConfigError) a file rkel itself would not load cleanly."""
    loaded = load_config_text(text, source)
    if loaded.warnings:
        raise ConfigError(list(loaded.warnings), source)


def write_file(path: Path, text: str) -> None:
    """Replace `path` atomically (mode 0644 less the umask)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RkelError(f"cannot write {path}: {exc.strerror or exc}; choose another file "
                        "with --name") from None


# ---------------------------------------------------------------------------- the command
def config(
    ctx: typer.Context,
    name: Annotated[Path | None, typer.Option(
        "--name", help="The file to write (default: the -c/--config path, cluster.yml).")] = None,
    empty: Annotated[bool, typer.Option(
        "--empty", help="Write an empty template to fill in, without questions.")] = False,
    print_: Annotated[bool, typer.Option(
        "--print", help="Print the file to stdout instead of writing it.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Overwrite an existing file without asking.")] = False,
    list_versions: Annotated[bool, typer.Option(
        "--list-versions", help="List the Kubernetes versions rkel knows.")] = False,
    system_images: Annotated[bool, typer.Option(
        "--system-images", help="List the images of a Kubernetes version (see --version).")
    ] = False,
    version: Annotated[str | None, typer.Option(
        "--version", help="With --system-images: the version (default: rkel's default).")
    ] = None,
) -> None:
    """Write a cluster.yml by asking questions (as `rke config` does), or list what rkel knows.

    Subcommands: `rkel config validate` checks a cluster.yml."""
    from lifecycle.cli import _emit, _fail

    g = ctx.obj
    given = [flag for flag, on in (("--name", name is not None), ("--empty", empty),
                                   ("--print", print_), ("--force", force),
                                   ("--list-versions", list_versions),
                                   ("--system-images", system_images),
                                   ("--version", version is not None)) if on]
    if ctx.invoked_subcommand is not None:
        if given:
            _usage(f"{' and '.join(given)}: an option of `rkel config` itself; it does not go "
                   f"with `rkel config {ctx.invoked_subcommand}`")
        return
    if list_versions and system_images:
        _usage("give either --list-versions or --system-images")
    if version is not None and not system_images:
        _usage("--version goes with --system-images")
    listing = list_versions or system_images
    if listing and len(given) > 1 + (version is not None):
        _usage(f"{given[0]} takes no other option than --version")
    if print_ and name is not None:
        _usage("--print writes no file: leave out --name")
    if list_versions:
        known = supported_versions()
        _emit(g, "\n".join(v + ("  (default)" if v == DEFAULT_KUBERNETES_VERSION else "")
                           for v in known),
              {"versions": known, "default": DEFAULT_KUBERNETES_VERSION})
        return
    if system_images:
        wanted = version or DEFAULT_KUBERNETES_VERSION
        try:
            images = version_info(wanted).images
        except KeyError:
            typer.echo(f"error: rkel has no data for Kubernetes {wanted}; it knows "
                       f"{', '.join(supported_versions())} (`rkel config --list-versions`)",
                       err=True)
            raise typer.Exit(2) from None
        _emit(g, "\n".join(sorted(set(images.values()))),
              {"version": wanted, "images": dict(sorted(images.items()))})
        return
    target = Path(name or g.config)
    try:
        if not print_ and target.exists() and not force:
            if target.is_dir():
                raise RkelError(f"{target} is a directory; give a file name with --name")
            if not _confirm_overwrite(target):
                typer.echo(f"Left {target} as it was; nothing written (--name FILE writes "
                           "another file, --force overwrites without asking).", err=True)
                raise typer.Exit(1)
        text = EMPTY if empty else render_draft(ask_draft(Asker()))
        if not empty:
            check_loads(text, str(target))
        if print_:
            if g.output.value == "json":
                _emit(g, "", {"cluster_yml": text, "empty": empty})
            else:
                typer.echo(text, nl=False)
            return
        write_file(target, text)
    except EndOfInput:
        typer.echo("\nerror: the input ended before every question was answered; nothing "
                   "written", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("\ninterrupted; nothing written", err=True)
        raise typer.Exit(130) from None
    except RkelError as exc:
        raise _fail(g, exc) from None
    what = "an empty template" if empty else "the cluster"
    nxt = "fill it in, then run `rkel config validate`" if empty else (
        f"check it with `rkel -c {target} doctor`, then `rkel -c {target} plan`")
    _emit(g, f"Wrote {what} to {target}; {nxt}.", {"written": str(target), "empty": empty})


def _usage(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _confirm_overwrite(target: Path) -> bool:
    """Ask before replacing an existing file; off a terminal too (the answer comes from stdin),
    and end of input means no."""
    try:
        return Asker().yes(f"{target} exists. Overwrite it?", False)
    except EndOfInput:
        return False

