"""Read cluster.yml into a `ClusterConfig`, reporting every problem at once.

Steps: read and decode the file -> scan the YAML events (depth guard, syntax errors with a line)
-> compose the node tree (ruamel.yaml, no Python objects built) -> walk it against the schema
(`walk`, `schema`) -> build the typed model with RKE's defaults -> semantic checks (`validate`).
Errors from every step are collected and raised together as one `ConfigError`; warnings (what RKE
would have ignored) travel with the result.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, TypeVar

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import (
    CollectionEndEvent,
    CollectionStartEvent,
    DocumentStartEvent,
)
from ruamel.yaml.nodes import MappingNode, Node

from lifecycle.config import model
from lifecycle.config.issues import ConfigIssue, LoadedConfig
from lifecycle.config.schema import CLUSTER
from lifecycle.config.validate import Locator, validate
from lifecycle.config.walk import INVALID, LimitExceeded, Walker, describe, is_null
from lifecycle.errors import ConfigError

MAX_BYTES = 10 * 1024 * 1024  # the largest real file is ~25 KB; anything this big is a mistake
MAX_NODES = 200_000
MAX_DEPTH = 64

T = TypeVar("T")


def load_config(path: str | Path) -> LoadedConfig:
    """Load and check the cluster.yml at `path`; raise ConfigError listing every problem."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise _fail(
            source, f"file not found: {source}; pass the path of your cluster.yml"
        ) from None
    except IsADirectoryError:
        raise _fail(
            source, f"{source} is a directory; pass the path of the cluster.yml file"
        ) from None
    except OSError as exc:
        raise _fail(source, f"cannot read {source}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise _fail(source, f"the file is {len(data)} bytes; a cluster.yml over 10 MB is refused")
    try:
        text = data.decode("utf-8-sig")  # a leading BOM is harmless; drop it
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            [
                ConfigIssue(
                    "",
                    line,
                    f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                    f"{exc.start})",
                    hint="save it as UTF-8",
                )
            ],
            source,
        ) from None
    return load_config_text(text, source)


def load_config_text(text: str, source: str = "cluster.yml") -> LoadedConfig:
    """Load and check cluster.yml content; `source` names it in messages."""
    if len(text) > MAX_BYTES:
        raise _fail(
            source, f"the text is {len(text)} characters; a cluster.yml over 10 MB is refused"
        )
    warnings: list[ConfigIssue] = []
    root = _compose(text, source, warnings)
    walker = Walker(max_nodes=MAX_NODES, max_depth=MAX_DEPTH)
    walker.lines[""] = 1
    if root is None or is_null(root):
        raise _fail(source, "the file is empty: it needs at least a `nodes:` list", line=1)
    if not isinstance(root, MappingNode):
        raise _fail(
            source,
            f"the top level must be a mapping (nodes:, services:, ...), found {describe(root)}",
            line=int(root.start_mark.line) + 1,
        )
    try:
        raw = walker.walk(root, CLUSTER, "")
    except LimitExceeded as exc:
        raise ConfigError([exc.issue], source) from None
    config = build_config(raw if isinstance(raw, dict) else {})
    errors, more_warnings = validate(config, Locator(walker.lines, walker.aliases))
    errors = sorted(walker.errors + errors, key=ConfigIssue.sort_key)
    if errors:
        raise ConfigError(errors, source)
    everything = sorted(warnings + walker.warnings + more_warnings, key=ConfigIssue.sort_key)
    return LoadedConfig(config=config, warnings=tuple(everything), source=source)


def _fail(source: str, message: str, line: int | None = None) -> ConfigError:
    return ConfigError([ConfigIssue("", line, message)], source)


def _yaml_error(source: str, exc: YAMLError) -> ConfigError:
    """A syntax error as a ConfigError that points at the line and column."""
    if isinstance(exc, MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        hint = ""
        if "\\t" in problem or "\t" in problem:
            hint = "YAML does not allow tabs for indentation; use spaces"
        return ConfigError(
            [
                ConfigIssue(
                    "",
                    int(mark.line) + 1,
                    f"YAML syntax error at column {int(mark.column) + 1}: {problem}{context}",
                    hint,
                )
            ],
            source,
        )
    return _fail(source, f"YAML syntax error: {exc}")


def _compose(text: str, source: str, warnings: list[ConfigIssue]) -> Node | None:
    """The first document's node tree; the depth guard runs on the event stream first, because
    ruamel's composer recurses (1000 nested brackets would otherwise hit Python's stack)."""
    yaml = YAML(typ="rt")
    documents = 0
    second_line = 0
    depth = 0
    try:
        for event in yaml.parse(text):
            if isinstance(event, DocumentStartEvent):
                documents += 1
                if documents == 2:
                    second_line = int(event.start_mark.line) + 1
            elif isinstance(event, CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise _fail(
                        source,
                        f"values are nested more than {MAX_DEPTH} levels deep; a cluster.yml "
                        "never needs that",
                        line=int(event.start_mark.line) + 1,
                    )
            elif isinstance(event, CollectionEndEvent):
                depth -= 1
        if documents > 1:
            # yaml.v2's Unmarshal (RKE) reads the first document only.
            warnings.append(
                ConfigIssue(
                    "",
                    second_line,
                    f"the file holds {documents} YAML documents; RKE reads only the first, "
                    "and so does rkel",
                    hint="remove the `---` and what follows, or merge the documents",
                )
            )
        stream = YAML(typ="rt").compose_all(text)
        return next(iter(stream), None)
    except YAMLError as exc:
        raise _yaml_error(source, exc) from None
    except RecursionError:  # belt and braces: the event scan above should already catch this
        raise _fail(source, f"values are nested too deeply (over {MAX_DEPTH} levels)") from None


# -- building the typed model ---------------------------------------------------------------


def _make(cls: type[T], raw: Any, **given: Any) -> T:
    """An instance of dataclass `cls` from a walked mapping, with RKE's defaulting: a missing or
    null value, an empty string where the default is not empty, and 0 where the default is a
    positive number (addon_job_timeout, interval_hours, ...) all mean "use the default"."""
    raw = raw if isinstance(raw, dict) else {}
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in given:
            kwargs[f.name] = given[f.name]
            continue
        default = f.default if f.default is not MISSING else None
        value = raw.get(f.name, INVALID)
        if value is INVALID or value is None:
            if f.default is MISSING and f.default_factory is MISSING:
                kwargs[f.name] = ""  # a required string (address, user, url): checked later
            continue
        if value == "" and isinstance(default, str) and default:
            continue
        if type(value) is int and value == 0 and type(default) is int and default > 0:
            continue
        kwargs[f.name] = tuple(value) if isinstance(value, list) and f.name in _TUPLES else value
    return cls(**kwargs)


_TUPLES = {"role", "taints", "nodes", "private_registries"}


def _node(raw: Any) -> model.Node:
    raw = raw if isinstance(raw, dict) else {}
    taints = tuple(
        model.Taint(
            key=t.get("key") or "",
            value=t.get("value") or "",
            # a missing effect takes the model default; an empty one is kept so it is reported
            effect=t["effect"] if t.get("effect") is not None else model.Taint.effect,
        )
        for t in (raw.get("taints") or [])
        if isinstance(t, dict)
    )
    return _make(model.Node, raw, taints=taints)


def _services(raw: Any) -> model.Services:
    raw = raw if isinstance(raw, dict) else {}
    etcd = raw.get("etcd") or {}
    backup = etcd.get("backup_config")
    backup_config = None
    if isinstance(backup, dict):
        s3 = backup.get("s3backupconfig")
        s3config = _make(model.S3BackupConfig, s3) if isinstance(s3, dict) else None
        backup_config = _make(model.BackupConfig, backup, s3backupconfig=s3config)
    return model.Services(
        etcd=_make(model.EtcdService, etcd, backup_config=backup_config),
        kube_api=_make(model.KubeAPIService, raw.get("kube-api")),
        kube_controller=_make(model.KubeControllerService, raw.get("kube-controller")),
        scheduler=_make(model.SchedulerService, raw.get("scheduler")),
        kubelet=_make(model.KubeletService, raw.get("kubelet")),
        kubeproxy=_make(model.KubeproxyService, raw.get("kubeproxy")),
    )


def _network(raw: Any) -> model.Network:
    raw = raw if isinstance(raw, dict) else {}
    typed = {"plugin", "options", "mtu"}
    extra = {k: v for k, v in raw.items() if k not in typed}
    return _make(model.Network, raw, extra=extra)


def _bastion(raw: Any) -> model.BastionHost | None:
    # `rke config` dumps carry a bastion_host with every field empty: that means "no bastion".
    if not isinstance(raw, dict) or not raw.get("address"):
        return None
    return _make(model.BastionHost, raw)


def _upgrade_strategy(raw: Any) -> model.UpgradeStrategy:
    raw = raw if isinstance(raw, dict) else {}
    drain = _make(model.DrainInput, raw.get("node_drain_input"))
    return _make(model.UpgradeStrategy, raw, node_drain_input=drain)


def build_config(raw: dict[str, Any]) -> model.ClusterConfig:
    """The typed model of a walked cluster.yml, with RKE's defaults filled in."""
    images = raw.get("system_images") or {}
    return _make(
        model.ClusterConfig,
        raw,
        nodes=tuple(_node(n) for n in raw.get("nodes") or []),
        services=_services(raw.get("services")),
        network=_network(raw.get("network")),
        authentication=_make(model.Authentication, raw.get("authentication")),
        authorization=_make(model.Authorization, raw.get("authorization")),
        # a null or empty image means "RKE's default for this version"
        system_images={k: v for k, v in images.items() if v},
        bastion_host=_bastion(raw.get("bastion_host")),
        private_registries=tuple(
            _make(model.PrivateRegistry, r) for r in raw.get("private_registries") or []
        ),
        ingress=raw.get("ingress") or {},
        monitoring=raw.get("monitoring") or {},
        restore=raw.get("restore") or {},
        upgrade_strategy=_upgrade_strategy(raw.get("upgrade_strategy")),
    )
