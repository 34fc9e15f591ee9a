"""The per-Kubernetes-version catalog: default images and component flags, read from data.

The data lives in `lifecycle/data/versions.yml` (a `base` set plus per-version deltas; see the
comments there). This module only loads, checks and merges it; `lifecycle.desired` decides what
the values mean. An empty flag value in the merged result means "delete this flag".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
)
IMAGE_KEYS = (
    "kubernetes",
    "etcd",
    "nginx_proxy",
    "pod_infra_container",
    "cert_downloader",
    "alpine",
    "kubernetes_services_sidecar",
    # cluster add-ons (lifecycle/addons.py), named as cluster.yml's system_images keys
    "coredns",
    "coredns_autoscaler",
    "flannel",
    "flannel_cni",
    "canal_node",
    "canal_cni",
    "canal_controllers",
    "canal_flannel",
    "metrics_server",
    "ingress",
    "ingress_backend",
    "ingress_webhook",
)

_VERSION_RE = re.compile(r"^v(\d+)\.(\d+)\.(\d+)(?:-(.+))?$")


@dataclass(frozen=True)
class VersionInfo:
    """One supported Kubernetes version: its default images and per-component default flags.

    `flags[component][flag]` is the value without the leading `--`; "" means "delete the flag".
    Every call of `version_info` returns fresh dicts, so callers may not corrupt the catalog.
    """

    version: str
    images: dict[str, str] = field(default_factory=dict)
    flags: dict[str, dict[str, str]] = field(default_factory=dict)

    def image(self, key: str) -> str:
        return self.images.get(key, "")

    def component_flags(self, component: str) -> dict[str, str]:
        return dict(self.flags.get(component, {}))


def semver_key(version: str) -> tuple[Any, ...]:
    """Sort key for RKE version names: v1.30.5-rancher1-1 -> (1, 30, 5, ((0, 'rancher'), (1, 1), ...)).

    Numeric runs in the suffix compare as numbers, so rancher1-10 sorts after rancher1-9.
    Names that are not semver-shaped sort last, by text.
    """
    m = _VERSION_RE.match(version)
    if not m:
        return (1, version)
    major, minor, patch, suffix = m.groups()
    parts = tuple(
        (1, int(tok)) if tok.isdigit() else (0, tok)
        for tok in re.findall(r"\d+|[^\d\-.]+", suffix or "")
    )
    return (0, int(major), int(minor), int(patch), parts)


class VersionCatalog:
    """The parsed data file: every supported version, merged and checked once."""

    def __init__(self, data: Any, source: str = "versions.yml") -> None:
        self.source = source
        if not isinstance(data, dict):
            raise ValueError(f"{source}: top level must be a mapping with `base` and `versions`")
        _only_keys(data, ("base", "versions"), source)
        base = data.get("base") or {}
        _only_keys(base, ("images", "flags"), f"{source}: base")
        base_images = _images(base.get("images"), f"{source}: base.images")
        base_flags = _flags(base.get("flags"), f"{source}: base.flags")
        versions = data.get("versions") or {}
        if not isinstance(versions, dict) or not versions:
            raise ValueError(f"{source}: `versions` must be a non-empty mapping")
        self._infos: dict[str, VersionInfo] = {}
        for name, delta in versions.items():
            where = f"{source}: versions.{name}"
            if not _VERSION_RE.match(str(name)):
                raise ValueError(f"{where}: not a version name like v1.30.5-rancher1-1")
            delta = delta or {}
            _only_keys(delta, ("images", "flags"), where)
            images = {**base_images, **_images(delta.get("images"), f"{where}.images")}
            if not images.get("kubernetes"):
                raise ValueError(f"{where}: images.kubernetes is required")
            flags = {c: dict(f) for c, f in base_flags.items()}
            for component, overrides in _flags(delta.get("flags"), f"{where}.flags").items():
                # An empty override stays in the merged map: it deletes the flag at compile
                # time, including a built-in flag of the same name.
                flags.setdefault(component, {}).update(overrides)
            self._infos[str(name)] = VersionInfo(str(name), images, flags)

    @classmethod
    def from_path(cls, path: str | Path) -> VersionCatalog:
        p = Path(path)
        return cls(YAML(typ="safe").load(p.read_text()), source=str(p))

    @classmethod
    def from_text(cls, text: str, source: str = "versions.yml") -> VersionCatalog:
        return cls(YAML(typ="safe").load(text), source=source)

    def supported(self) -> list[str]:
        return sorted(self._infos, key=semver_key)

    def has(self, version: str) -> bool:
        return version in self._infos

    def info(self, version: str) -> VersionInfo:
        """The merged data for `version`; KeyError if the catalog does not list it."""
        src = self._infos[version]
        return VersionInfo(
            version=src.version,
            images=dict(src.images),
            flags={c: dict(f) for c, f in src.flags.items()},
        )


@lru_cache(maxsize=1)
def default_catalog() -> VersionCatalog:
    """The catalog shipped with rkel (lifecycle/data/versions.yml), parsed once per process."""
    text = resources.files("lifecycle").joinpath("data/versions.yml").read_text()
    return VersionCatalog.from_text(text, source="lifecycle/data/versions.yml")


def supported_versions() -> list[str]:
    """Every Kubernetes version rkel has data for, sorted by semver (oldest first)."""
    return default_catalog().supported()


def version_info(version: str) -> VersionInfo:
    """Default images and per-component default flags for `version`; KeyError if unsupported."""
    return default_catalog().info(version)


def _only_keys(data: Any, allowed: tuple[str, ...], where: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: must be a mapping")
    unknown = sorted(set(map(str, data)) - set(allowed))
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}"
        )


def _scalar(value: Any, where: str) -> str:
    """A flag or image value as text; YAML null (`flag:`) is "", booleans are lower-case."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ValueError(f"{where}: must be a scalar, not {type(value).__name__}")


def _images(data: Any, where: str) -> dict[str, str]:
    if data is None:
        return {}
    _only_keys(data, IMAGE_KEYS, where)
    return {str(k): _scalar(v, f"{where}.{k}") for k, v in data.items()}


def _flags(data: Any, where: str) -> dict[str, dict[str, str]]:
    if data is None:
        return {}
    _only_keys(data, COMPONENTS, where)
    out: dict[str, dict[str, str]] = {}
    for component, flags in data.items():
        flags = flags or {}
        if not isinstance(flags, dict):
            raise ValueError(f"{where}.{component}: must be a mapping of flag: value")
        out[str(component)] = {
            str(k).lstrip("-"): _scalar(v, f"{where}.{component}.{k}") for k, v in flags.items()
        }
    return out
