"""The RKE-format cluster.yml the testbed writes for its hosts (plus the --roles option).

`system_images` name full references into the testbed registry: RKE prefixes the default
registry only to images the file leaves empty, and uses given ones as they are.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from images import IMAGES, REGISTRY
from network import REGISTRY_PORT, Host

ROLE_ALIASES = {"cp": "controlplane", "controlplane": "controlplane", "etcd": "etcd",
                "worker": "worker", "w": "worker"}
ROLE_ORDER = ("controlplane", "etcd", "worker")
DEFAULT_ROLES_HELP = "the first 3 hosts cp,etcd,worker, the others worker"
# Which system_images keys the testbed's images fill (the rest has no testbed image yet).
SYSTEM_IMAGE_KEYS = {
    "etcd": "rancher/mirrored-coreos-etcd",
    "alpine": "rancher/rke-tools",
    "nginx_proxy": "rancher/rke-tools",
    "cert_downloader": "rancher/rke-tools",
    "kubernetes_services_sidecar": "rancher/rke-tools",
}


def default_roles(n: int) -> str:
    """`cp,etcd,worker` on the first three hosts (an etcd quorum of 3), `worker` on the rest."""
    return ";".join(["cp,etcd,worker"] * min(n, 3) + ["worker"] * (n > 3))


def parse_roles(spec: str | None, n: int) -> list[list[str]]:
    """Roles per node from `a,b;c;...` (one `;` entry per node, the last repeats to fill N)."""
    spec = default_roles(n) if spec is None else spec
    entries = [e.strip() for e in spec.split(";") if e.strip()]
    if not entries:
        raise ValueError("--roles is empty; give e.g. 'cp,etcd,worker;etcd;worker'")
    if len(entries) > n:
        raise ValueError(f"--roles names {len(entries)} nodes but the testbed has {n} hosts")
    layout: list[list[str]] = []
    for entry in entries:
        roles = set()
        for word in (w.strip().lower() for w in entry.split(",")):
            if word not in ROLE_ALIASES:
                raise ValueError(f"unknown role {word!r} in --roles (use cp, etcd, worker)")
            roles.add(ROLE_ALIASES[word])
        layout.append([r for r in ROLE_ORDER if r in roles])
    layout += [layout[-1]] * (n - len(layout))
    return layout


def cluster_config(hosts: list[Host], roles: list[list[str]], user: str, key: Path) -> dict[str, Any]:
    """The cluster.yml content (a dict) for the testbed's nodes, bastion and registry."""
    nodes_hosts = [h for h in hosts if not h.bastion]
    bastion = next((h for h in hosts if h.bastion), None)
    # Private hosts pull from the bastion's registry process (same storage, private address).
    registry = f"{bastion.links[1].address}:{REGISTRY_PORT}" if bastion else REGISTRY
    known = {img.repo: img for img in IMAGES}
    cfg: dict[str, Any] = {
        "cluster_name": "rkel-testbed",
        "ssh_key_path": str(key),
        "nodes": [
            {"address": h.address, "hostname_override": h.name, "user": user, "role": r,
             "ssh_key_path": str(key)}
            for h, r in zip(nodes_hosts, roles, strict=True)
        ],
        "private_registries": [{"url": registry, "is_default": True}],
        "system_images": {
            k: f"{registry}/{repo}:{known[repo].tag}" for k, repo in SYSTEM_IMAGE_KEYS.items()
        },
    }
    if bastion is not None:
        cfg["bastion_host"] = {"address": bastion.address, "user": user, "port": 22,
                               "ssh_key_path": str(key)}
    return cfg


_PLAIN = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./:@-]*$|^[0-9]+(\.[0-9]+){2,}(:[0-9]+)?(/.*)?$")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _RESERVED:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_yaml(value: Any, indent: int = 0) -> list[str]:
    """Block-style YAML lines for dicts/lists of scalars (lists of scalars in flow style)."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item and not _flat_list(item):
                lines.append(f"{pad}{key}:")
                lines += to_yaml(item, indent + 2)
            else:
                lines.append(f"{pad}{key}: {_inline(item)}")
    elif isinstance(value, list):
        for item in value:
            sub = to_yaml(item, indent + 2) if isinstance(item, dict) else [pad + "  " + _inline(item)]
            lines.append(f"{pad}- {sub[0].lstrip()}")
            lines += sub[1:]
    return lines


def _flat_list(item: Any) -> bool:
    return isinstance(item, list) and all(not isinstance(x, (dict, list)) for x in item)


def _inline(item: Any) -> str:
    if isinstance(item, list):
        return "[" + ", ".join(_scalar(x) for x in item) + "]"
    if isinstance(item, dict):
        return "{}"
    return _scalar(item)


def write_cluster_yml(path: Path, cfg: dict[str, Any], command: str) -> None:
    """Write cfg as cluster.yml with a header saying where it came from."""
    header = [f"# Generated by `{command}`: the rkel testbed's hosts (see TESTBED.md).",
              "# Regenerated on every `up`; copy it before editing."]
    path.write_text("\n".join(header + to_yaml(cfg)) + "\n")
