"""Flag merging and rendering, image references, node labels and taints for the compiler.

Helpers of `lifecycle.desired`, kept apart so each module stays readable. Pure functions only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lifecycle.config.model import BaseService, Node

CONTROLPLANE_TAINT = ("node-role.kubernetes.io/controlplane", "true", "NoSchedule")
ETCD_TAINT = ("node-role.kubernetes.io/etcd", "true", "NoExecute")
ROLE_LABELS = {
    "controlplane": "node-role.kubernetes.io/controlplane",
    "etcd": "node-role.kubernetes.io/etcd",
    "worker": "node-role.kubernetes.io/worker",
}

# Labels under these domains are refused by kubelet's --node-labels (NodeRestriction); they are
# applied through the API instead (NodeDesired.labels).
_KUBELET_LABEL_DOMAINS = ("kubernetes.io", "k8s.io")
_KUBELET_ALLOWED_PREFIXES = ("kubelet.kubernetes.io/", "node.kubernetes.io/")
_KUBELET_ALLOWED_LABELS = {
    "kubernetes.io/hostname",
    "kubernetes.io/arch",
    "kubernetes.io/os",
    "beta.kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/instance-type",
    "node.kubernetes.io/instance-type",
    "failure-domain.beta.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
}


def registry_host(url: str) -> str:
    for scheme in ("https://", "http://"):
        url = url.removeprefix(scheme)
    return url.rstrip("/")


def has_registry_host(image: str) -> bool:
    """Docker's rule: the first path part is a host if it has a dot or a port, or is localhost."""
    first, sep, _ = image.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def render_args(
    builtin: Mapping[str, str], overrides: Mapping[str, str], service: BaseService
) -> tuple[str, ...]:
    """RKE's precedence, rendered: sorted `--flag=value` from the merged map, then array flags."""
    return render(merge_flags(builtin, overrides), service)


def flag_overrides(
    version_defaults: Mapping[str, str], service: BaseService
) -> dict[str, str]:
    """The flags the per-version defaults and `extra_args` set, as merged on top of the built-in
    ones (later layers win; "" deletes the flag). They are the same on every node, so the
    compiler normalises them once per component instead of once per node."""
    overrides: dict[str, str] = {}
    for layer in (version_defaults, service.extra_args):
        for key, value in layer.items():
            overrides[key.lstrip("-")] = flag_text(value)
    return overrides


def merge_flags(builtin: Mapping[str, str], overrides: Mapping[str, str]) -> dict[str, str]:
    """RKE's precedence: the built-in flags, then `overrides` (see `flag_overrides`); a flag
    whose last value is "" is absent."""
    return {k: v for k, v in {**builtin, **overrides}.items() if v != ""}


def render(merged: Mapping[str, str], service: BaseService) -> tuple[str, ...]:
    args = [f"--{k}={v}" for k, v in sorted(merged.items())]  # by key: keys are unique
    for key in sorted(service.extra_args_array):
        flag = key.lstrip("-")
        args += [f"--{flag}={flag_text(v)}" for v in service.extra_args_array[key]]
    return tuple(args)


def flag_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def unique(items: Iterable[str]) -> tuple[str, ...]:
    """Order-preserving de-duplication (RKE's getUniqStringList)."""
    return tuple(dict.fromkeys(i for i in items if i))


def kubelet_may_set_label(key: str) -> bool:
    """Whether kubelet accepts `key` in --node-labels (it refuses most kubernetes.io labels)."""
    prefix, sep, _ = key.partition("/")
    if not sep:
        return True
    if not any(prefix == d or prefix.endswith("." + d) for d in _KUBELET_LABEL_DOMAINS):
        return True
    return key in _KUBELET_ALLOWED_LABELS or key.startswith(_KUBELET_ALLOWED_PREFIXES)


def taint_text(key: str, value: str, effect: str) -> str:
    return f"{key}={value}:{effect}" if value else f"{key}:{effect}"


def node_taints(node: Node) -> tuple[tuple[str, str, str], ...]:
    """Config taints plus RKE's role taints for nodes without the worker role."""
    taints = {(t.key, t.value, t.effect) for t in node.taints}
    if "worker" not in node.role:
        if "etcd" in node.role:
            taints.add(ETCD_TAINT)
        if "controlplane" in node.role:
            taints.add(CONTROLPLANE_TAINT)
    return tuple(sorted(taints))


def node_labels(node: Node) -> tuple[tuple[str, str], ...]:
    """Config labels plus RKE's node-role labels (applied through the Kubernetes API)."""
    labels = {str(k): str(v) for k, v in node.labels.items()}
    for role in node.role:
        if role in ROLE_LABELS:
            labels[ROLE_LABELS[role]] = "true"
    return tuple(sorted(labels.items()))
