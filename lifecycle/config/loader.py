"""Read cluster.yml into a `ClusterConfig`, reporting every problem at once.

Steps: read and decode the file (size limit) -> compose the node tree in one pass (ruamel.yaml, no
Python objects built; value-count and depth limits, syntax errors with a line) -> walk it against
the schema (`walk`, `schema`; alias expansion limit) -> build the typed model with RKE's defaults
-> semantic checks (`validate`).
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
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    DocumentStartEvent,
    ScalarEvent,
)
from ruamel.yaml.nodes import MappingNode, Node
from ruamel.yaml.parser import RoundTripParser
from ruamel.yaml.reader import ReaderError

from lifecycle.config import model
from lifecycle.config.issues import ConfigIssue, LoadedConfig
from lifecycle.config.schema import CLUSTER
from lifecycle.config.validate import Locator, validate
from lifecycle.config.walk import INVALID, LimitExceeded, Walker, describe, is_null
from lifecycle.errors import ConfigError

# The largest real file is ~25 KB with ~600 YAML values. RKE keeps the whole cluster.yml in its
# full-cluster-state object in Kubernetes, which cannot exceed 1 MiB, so nothing larger ever
# worked with RKE; the limits also keep every load well under two seconds.
MAX_BYTES = 1024 * 1024
MAX_VALUES = 20_000  # values as written (scalars, collections, aliases)
MAX_NODES = 100_000  # values visited by the walk, where an `*alias` counts each time it is used
MAX_DEPTH = 64
MAX_ISSUES = 100  # a hostile file can hold thousands of errors; the first ones are enough

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
        raise _too_big(source, f"the file is {len(data)} bytes")
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
        raise _too_big(source, f"the text is {len(text)} characters")
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
        raise ConfigError(_capped(errors), source)
    everything = sorted(warnings + walker.warnings + more_warnings, key=ConfigIssue.sort_key)
    return LoadedConfig(config=config, warnings=tuple(everything), source=source)


def _fail(source: str, message: str, line: int | None = None) -> ConfigError:
    return ConfigError([ConfigIssue("", line, message)], source)


def _too_big(source: str, size: str) -> ConfigError:
    return ConfigError(
        [
            ConfigIssue(
                "",
                None,
                f"{size}; rkel refuses a cluster.yml over 1 MiB (RKE could not keep one that "
                "large in its cluster state either)",
                hint="check that this is the right file; large add-on manifests belong in "
                "files listed under `addons_include`",
            )
        ],
        source,
    )


def _capped(issues: list[ConfigIssue]) -> list[ConfigIssue]:
    """The first MAX_ISSUES issues, and a last one saying how many more there are."""
    if len(issues) <= MAX_ISSUES:
        return issues
    rest = len(issues) - MAX_ISSUES
    return issues[:MAX_ISSUES] + [
        ConfigIssue(
            "",
            None,
            f"... and {rest} more error(s) not shown",
            hint="fix the ones above (they often cause the rest) and check again",
        )
    ]


def _yaml_error(source: str, exc: YAMLError) -> ConfigError:
    """A syntax error as a ConfigError that points at the line and column."""
    if isinstance(exc, MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        return ConfigError(
            [
                ConfigIssue(
                    "",
                    int(mark.line) + 1,
                    f"YAML syntax error at column {int(mark.column) + 1}: {problem}{context}",
                    _syntax_hint(problem),
                )
            ],
            source,
        )
    return _fail(source, f"YAML syntax error: {exc}")


# What to do about ruamel's most common complaints, by a fragment of its message.
_SYNTAX_HINTS = (
    ("'\\t'", "YAML does not allow tabs for indentation; use spaces"),
    ("\t", "YAML does not allow tabs for indentation; use spaces"),
    ("undefined alias", "define the anchor (`&name`) before using `*name`, or quote the value"),
    ("cannot start any token", "quote the value: a plain value cannot start with this character"),
    ("mapping values are not allowed", "quote a value that contains `: `, or fix the indentation"),
    ("end of stream", "a quote or a bracket opened above is never closed"),
    ("expected ',' or", "a bracket is not closed, or a comma is missing between items"),
    ("expected ':'", "a key needs `: ` after it on the same line (and at most 1024 characters)"),
)
_SYNTAX_HINT = "check the indentation, quotes and brackets on this line and the one before"


def _syntax_hint(problem: str) -> str:
    return next((hint for fragment, hint in _SYNTAX_HINTS if fragment in problem), _SYNTAX_HINT)


class _LimitedParser(RoundTripParser):
    """ruamel's parser, counting values and collection depth as the composer pulls events, so a
    huge or runaway-deep document stops at the event that crosses the limit: ruamel's composer
    recurses once per level, and every value costs time (ruamel parses ~30k values a second)."""

    def __init__(self, loader: Any) -> None:
        super().__init__(loader)
        # not in reset_parser: compose_all's `finally: dispose()` would wipe them
        self.values = 0
        self.depth = 0
        self.document_lines: list[int] = []

    def get_event(self) -> Any:
        event = super().get_event()
        if isinstance(event, DocumentStartEvent):
            self.document_lines.append(int(event.start_mark.line) + 1)
        elif isinstance(event, CollectionEndEvent):
            self.depth -= 1
        elif isinstance(event, (CollectionStartEvent, ScalarEvent, AliasEvent)):
            self.values += 1
            if self.values > MAX_VALUES:
                raise LimitExceeded(
                    ConfigIssue(
                        "",
                        int(event.start_mark.line) + 1,
                        f"the document has more than {MAX_VALUES} YAML values (a real cluster.yml "
                        "has a few hundred, a 100-node one about 2000); rkel stops reading here",
                        hint="check that this is the right file; large add-on manifests belong in "
                        "files listed under `addons_include`",
                    )
                )
            if isinstance(event, CollectionStartEvent):
                self.depth += 1
                if self.depth > MAX_DEPTH:
                    raise LimitExceeded(
                        ConfigIssue(
                            "",
                            int(event.start_mark.line) + 1,
                            f"values are nested more than {MAX_DEPTH} levels deep; a cluster.yml "
                            "never needs that",
                            hint="check the indentation and the brackets from this line on",
                        )
                    )
        return event


def _compose(text: str, source: str, warnings: list[ConfigIssue]) -> Node | None:
    """The first document's node tree, composed in one pass under the value and depth limits;
    later documents are read (syntax errors count) and dropped, as RKE does."""
    yaml = YAML(typ="rt")
    yaml.Parser = _LimitedParser
    yaml.composer.warn_double_anchors = False  # legal YAML (the later one wins), as in yaml.v2
    first: Node | None = None
    documents = 0
    try:
        for node in yaml.compose_all(text):
            if documents == 0:
                first = node
            documents += 1
    except LimitExceeded as exc:
        raise ConfigError([exc.issue], source) from None
    except ReaderError as exc:
        raise _reader_error(source, text, exc) from None
    except YAMLError as exc:
        raise _yaml_error(source, exc) from None
    except RecursionError:  # belt and braces: the depth limit above should stop this first
        raise _fail(source, f"values are nested too deeply (over {MAX_DEPTH} levels)") from None
    if documents > 1:
        # yaml.v2's Unmarshal (RKE) reads the first document only.
        lines = yaml.parser.document_lines if isinstance(yaml.parser, _LimitedParser) else []
        warnings.append(
            ConfigIssue(
                "",
                lines[1] if len(lines) > 1 else None,
                f"the file holds {documents} YAML documents; RKE reads only the first, "
                "and so does rkel",
                hint="remove the `---` and what follows, or merge the documents",
            )
        )
    return first


def _reader_error(source: str, text: str, exc: ReaderError) -> ConfigError:
    """A character YAML does not allow (NUL, other control characters, a lone surrogate), at its
    line and column."""
    position = int(exc.position) if isinstance(exc.position, int) else 0
    position = max(0, min(position, len(text)))
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    code = exc.character if isinstance(exc.character, int) else 0
    if code == 0 or 0xD800 <= code <= 0xDFFF:
        what = "a NUL byte" if code == 0 else f"U+{code:04X}, a lone surrogate,"
        hint = "remove it; is this a binary file?"
    else:
        what = f"the non-printable character U+{code:04X}"
        hint = 'remove it, or write it as an escape like "\\x07" inside double quotes'
    return ConfigError(
        [
            ConfigIssue(
                "",
                line,
                f"YAML syntax error at column {column}: {what} is not allowed in a YAML file",
                hint=hint,
            )
        ],
        source,
    )


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
