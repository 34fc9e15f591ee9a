"""Walk a composed YAML node tree against the schema, the way RKE's yaml.v2 would read it.

Produces plain Python values (dicts, lists, str/int/bool) that follow the schema, every issue with
its YAML path and line, and the line of every path (so later checks can point at the file). The
yaml.v2 rules kept on purpose: a scalar in a string field keeps its literal text, null means
"not given", a duplicate key overrides (mappings merge, lists and scalars are replaced) — each
duplicate also gets a warning. A bad value is reported and dropped, so that one walk finds every
problem in the file.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from typing import Any

from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from lifecycle.config.issues import ConfigIssue
from lifecycle.config.schema import (
    LEGACY,
    Free,
    Legacy,
    MapOf,
    Scalar,
    Seq,
    Spec,
    Struct,
)

NULL_TAG = "tag:yaml.org,2002:null"
MERGE_TAG = "tag:yaml.org,2002:merge"
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_INT = re.compile(r"[-+]?[0-9]+")
_FLOAT = re.compile(r"[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?")
# yaml.v2 resolves these plain words to booleans (YAML 1.1); quoted, only true/false are taken.
_TRUE = {"true", "yes", "on", "y"}
_FALSE = {"false", "no", "off", "n"}
_KIND_WORDS = {"str": "a string", "int": "a number", "bool": "true or false", "float": "a number"}
# RKE reads whole numbers into Go ints (64-bit); anything wider fails there too.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Characters a YAML file may only hold as escapes ("\0", "\ud800"): a NUL ends a C string and a
# lone surrogate is not text at all, so no file, database, container or terminal can take them.
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


class _Invalid:
    """Marks a value that was reported as wrong and must be left out."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID: Any = _Invalid()


class LimitExceeded(Exception):
    """The document is too deep or expands to too many nodes; walking stops at once."""

    def __init__(self, issue: ConfigIssue) -> None:
        super().__init__(str(issue))
        self.issue = issue


def join(path: str, key: str) -> str:
    """The YAML path of `key` under `path`; odd keys are quoted: labels["app.kubernetes.io/x"]."""
    if _SAFE_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def shorten(path: str, limit: int = 100) -> str:
    """A path cut in the middle, for runaway nesting where the full path would fill the screen."""
    if len(path) <= limit:
        return path
    half = (limit - 3) // 2
    return f"{path[:half]}...{path[-half:]}"


def line_of(node: Node) -> int:
    return int(node.start_mark.line) + 1


def is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == NULL_TAG


def describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return "a scalar"


def _is_empty(value: Any) -> bool:
    return value is None or value is INVALID or value is False or value in ("", {}, [])


def _deep_merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """yaml.v2 decodes a repeated mapping into the same struct: nested mappings merge too."""
    merged = dict(old)
    for key, value in new.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class Walker:
    """One pass over one document; collects errors, warnings and the line of every path."""

    def __init__(self, max_nodes: int = 200_000, max_depth: int = 64) -> None:
        self.max_nodes = max_nodes
        self.max_depth = max_depth
        self.errors: list[ConfigIssue] = []
        self.warnings: list[ConfigIssue] = []
        self.lines: dict[str, int] = {}
        # canonical path -> path as written, for sections loaded under another name (`auth`)
        self.aliases: dict[str, str] = {}
        self._visited = 0

    # -- bookkeeping ------------------------------------------------------------------------

    def _count(self, node: Node, path: str, depth: int) -> None:
        """Every node visit counts, so aliases that fan out (an alias bomb) hit the cap fast."""
        self._visited += 1
        if self._visited > self.max_nodes:
            raise LimitExceeded(
                ConfigIssue(
                    shorten(path),
                    line_of(node),
                    f"the document expands to more than {self.max_nodes} YAML nodes (through "
                    "`*alias` references); refusing to load it — is this an alias bomb?",
                )
            )
        if depth > self.max_depth:
            raise LimitExceeded(
                ConfigIssue(
                    shorten(path),
                    line_of(node),
                    f"values are nested more than {self.max_depth} levels deep (or an alias "
                    "refers to itself); a cluster.yml never needs that",
                )
            )

    def _storable(self, node: ScalarNode, path: str, what: str = "this value") -> bool:
        """False (after reporting it) when the scalar holds a NUL or a surrogate, which YAML can
        only write as an escape and nothing downstream (file, database, host) can store."""
        bad = _UNSTORABLE.search(str(node.value))
        if bad is None:
            return True
        if bad.group() == "\x00":
            char, hint = "a NUL character", 'remove the "\\0" or "\\x00" escape'
        else:
            char = f"U+{ord(bad.group()):04X}, a UTF-16 surrogate"
            hint = ('write the character itself, or as an 8-digit escape like "\\U0001F600"; '
                    '"\\uD83D\\uDE00"-style pairs are not decoded')
        self.error(
            path, line_of(node), f"{what} contains {char} (character {bad.start() + 1})", hint
        )
        return False

    def error(self, path: str, line: int | None, message: str, hint: str = "") -> None:
        self.errors.append(ConfigIssue(path, line, message, hint))

    def warn(self, path: str, line: int | None, message: str, hint: str = "") -> None:
        self.warnings.append(ConfigIssue(path, line, message, hint))

    # -- the walk ---------------------------------------------------------------------------

    def walk(self, node: Node, spec: Spec, path: str, depth: int = 0) -> Any:
        """The value of `node` read as `spec`, or INVALID after reporting why it is not."""
        self._count(node, path, depth)
        if isinstance(spec, Free):
            return self._free(node, path, depth)
        if is_null(node):
            return None  # yaml.v2: null leaves the zero value, i.e. "use the default"
        if isinstance(node, ScalarNode) and not self._storable(node, path):
            return INVALID
        if isinstance(spec, Scalar):
            return self._scalar(node, spec, path)
        if isinstance(spec, Seq):
            return self._seq(node, spec, path, depth)
        if not isinstance(node, MappingNode):
            self.error(
                path,
                line_of(node),
                f"expected a mapping (`key: value` lines), found {describe(node)}",
            )
            return INVALID
        if isinstance(spec, MapOf):
            return self._map(node, spec, path, depth)
        return self._struct(node, spec, path, depth)

    def _scalar(self, node: Node, spec: Scalar, path: str) -> Any:
        want = _KIND_WORDS[spec.kind]
        if not isinstance(node, ScalarNode):
            self.error(path, line_of(node), f"expected {want}, found {describe(node)}")
            return INVALID
        text = str(node.value)
        if spec.kind == "str":
            return text  # literal text, as yaml.v2 gives a string field: `v: 4` -> "4"
        shown = "the value given" if spec.secret else f"`{text}`"
        if spec.kind == "bool":
            low = text.strip().lower()
            plain = node.style is None
            if low in _TRUE and (plain or low == "true"):
                return True
            if low in _FALSE and (plain or low == "false"):
                return False
            self.error(path, line_of(node), f"expected true or false, got {shown}")
            return INVALID
        stripped = text.strip()
        if stripped == "":
            return None  # `port: ""` in `rke config` dumps means "not set"
        if spec.kind == "float":
            number_ = float(stripped) if _FLOAT.fullmatch(stripped) else None
            if number_ is not None and math.isfinite(number_):
                return number_
            problem = "is too large" if number_ is not None else "is not a number"
            self.error(path, line_of(node), f"expected a number, got {shown}, which {problem}")
            return INVALID
        if not _INT.fullmatch(stripped):
            self.error(
                path, line_of(node), f"expected a whole number{self._range(spec)}, got {shown}"
            )
            return INVALID
        # int() refuses over 4300 digits; anything past 19 is out of every range anyway
        digits = stripped.lstrip("+-").lstrip("0")
        number = int(stripped) if len(digits) <= 19 else None
        if number is None or not INT64_MIN <= number <= INT64_MAX:
            self.error(
                path,
                line_of(node),
                f"{shown} is too large for a number{self._range(spec)}: RKE reads whole numbers "
                f"as 64-bit (at most {INT64_MAX})",
            )
            return INVALID
        too_low = spec.minimum is not None and number < spec.minimum
        too_high = spec.maximum is not None and number > spec.maximum
        if too_low or too_high:
            self.error(
                path, line_of(node), f"{number} is out of range: use a number{self._range(spec)}"
            )
            return INVALID
        return number

    @staticmethod
    def _range(spec: Scalar) -> str:
        if spec.minimum is not None and spec.maximum is not None:
            return f" from {spec.minimum} to {spec.maximum}"
        return ""

    def _seq(self, node: Node, spec: Seq, path: str, depth: int) -> Any:
        if not isinstance(node, SequenceNode):
            self.error(
                path,
                line_of(node),
                f"expected a list, found {describe(node)}",
                hint="write the items as `- item` lines or `[a, b]`",
            )
            return INVALID
        items: list[Any] = []
        for index, item in enumerate(node.value):
            child = f"{path}[{index}]"
            self.lines[child] = line_of(item)
            value = self.walk(item, spec.item, child, depth + 1)
            if value is None and isinstance(spec.item, Scalar) and spec.item.kind == "str":
                value = ""  # yaml.v2 gives a null list item the zero string
            if value is not INVALID:
                items.append(value)
        return items

    def _entries(self, node: MappingNode, path: str, depth: int) -> list[tuple[str, Node, Node]]:
        """(key text, key node, value node) in file order, with `<<: *anchor` merges expanded."""
        explicit: list[tuple[str, Node, Node]] = []
        merged: list[tuple[str, Node, Node]] = []
        for key, value in node.value:
            if isinstance(key, ScalarNode) and key.tag == MERGE_TAG:
                sources = value.value if isinstance(value, SequenceNode) else [value]
                for source in sources:
                    self._count(source, path, depth + 1)
                    if isinstance(source, MappingNode):
                        merged.extend(self._entries(source, path, depth + 1))
                    else:
                        self.error(
                            path, line_of(key), "`<<` must merge a mapping or a list of mappings"
                        )
                continue
            if not isinstance(key, ScalarNode):
                self.error(path, line_of(key), f"a key must be a plain word, found {describe(key)}")
                continue
            if not self._storable(key, path, "a key here"):
                continue
            explicit.append((str(key.value), key, value))
        # Explicit keys win over merged ones, and an earlier merge source over a later one.
        taken = {name for name, _, _ in explicit}
        entries: list[tuple[str, Node, Node]] = []
        for entry in merged:
            if entry[0] not in taken:
                taken.add(entry[0])
                entries.append(entry)
        return entries + explicit

    def _store(
        self, into: dict[str, Any], seen: dict[str, int], key: str, value: Any, path: str, line: int
    ) -> None:
        """Put `value` under `key`, applying (and warning about) yaml.v2's duplicate-key rules."""
        if value is INVALID:
            return
        if key not in seen:
            into[key] = value
            seen[key] = line
            return
        if isinstance(into.get(key), dict) and isinstance(value, dict):
            into[key] = _deep_merge(into[key], value)
            how = "the two mappings are merged, later keys winning"
        elif isinstance(value, list):
            into[key] = value
            how = "the later list replaces the earlier one"
        else:
            into[key] = value
            how = "the later value is used"
        self.warn(
            path,
            line,
            f"`{key}` is given twice (lines {seen[key]} and {line}); as in RKE, {how}",
            hint="remove one of them",
        )
        seen[key] = line

    def _map(self, node: MappingNode, spec: MapOf, path: str, depth: int) -> Any:
        result: dict[str, Any] = {}
        seen: dict[str, int] = {}
        for name, key, value in self._entries(node, path, depth):
            child = join(path, name)
            self.lines[child] = line_of(key)
            walked = self.walk(value, spec.value, child, depth + 1)
            if walked is None and isinstance(spec.value, Scalar) and spec.value.kind == "str":
                walked = ""  # `flag:` with no value: an empty string (deletes a default flag)
            elif walked is None and isinstance(spec.value, Seq):
                walked = []  # yaml.v2 leaves a nil slice
            self._store(result, seen, name, walked, child, line_of(key))
        return result

    def _struct(self, node: MappingNode, spec: Struct, path: str, depth: int) -> Any:
        legacy = LEGACY.get(spec.legacy, {})
        entries = self._entries(node, path, depth)
        given = {name for name, _, _ in entries}
        result: dict[str, Any] = {}
        seen: dict[str, int] = {}
        for name, key, value in entries:
            child = join(path, name)
            line = line_of(key)
            self.lines[child] = line
            if name in spec.fields:
                walked = self.walk(value, spec.fields[name], child, depth + 1)
                self._store(result, seen, name, walked, child, line)
            elif name in legacy:
                self._legacy(legacy[name], name, value, path, line, given, result, seen, depth)
            else:
                self._unknown(spec, name, child, line)
        return result

    def _legacy(
        self,
        entry: Legacy,
        name: str,
        value: Node,
        path: str,
        line: int,
        given: set[str],
        result: dict[str, Any],
        seen: dict[str, int],
        depth: int,
    ) -> None:
        child = join(path, name)
        target = entry.load_as
        if target and target != name and target in given:
            self.warn(child, line, f"ignored because `{target}` is also given", hint="remove it")
            self.walk(value, Free(), child, depth + 1)  # still counted against the limits
            return
        walked = self.walk(value, entry.spec, child, depth + 1)
        if not (entry.quiet_when_empty and _is_empty(walked)):
            self.warn(child, line, entry.message, entry.hint)
        if target:
            canonical = join(path, target)
            if canonical != child:
                self.aliases[canonical] = child
            self._store(result, seen, target, walked, child, line)

    def _unknown(self, spec: Struct, name: str, path: str, line: int) -> None:
        valid = sorted(spec.fields)
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        if close:
            hint = f"did you mean `{close[0]}`?"
        elif len(valid) <= 12:
            hint = "valid keys here: " + ", ".join(valid)
        else:
            hint = "check the spelling and the indentation"
        self.error(path, line, f"unknown key `{name}` (RKE would silently ignore it)", hint)

    def _free(self, node: Node, path: str, depth: int) -> Any:
        """A pass-through value, typed as YAML resolves it; still counted against the limits."""
        if isinstance(node, MappingNode):
            result: dict[str, Any] = {}
            seen: dict[str, int] = {}
            for name, key, value in self._entries(node, path, depth):
                child = join(path, name)
                self._count(value, child, depth + 1)
                self._store(
                    result, seen, name, self._free(value, child, depth + 1), child, line_of(key)
                )
            return result
        if isinstance(node, SequenceNode):
            items = []
            for index, item in enumerate(node.value):
                self._count(item, path, depth + 1)
                value = self._free(item, f"{path}[{index}]", depth + 1)
                if value is not INVALID:
                    items.append(value)
            return items
        if isinstance(node, ScalarNode) and not self._storable(node, path):
            return INVALID
        return resolve_scalar(node)


def resolve_scalar(node: Node) -> Any:
    """A scalar as the YAML resolver typed it: None, bool, int, float or the text."""
    text = str(node.value)
    tag = str(node.tag)
    if tag == NULL_TAG:
        return None
    if tag.endswith(":bool"):
        return text.lower() == "true"
    try:
        if tag.endswith(":int") and len(text) <= 100:  # int() refuses over 4300 digits
            return int(text.replace("_", ""), 0)
        if tag.endswith(":float"):
            number = float(text.replace("_", ""))
            # inf and nan have no JSON form: keep what was written, as for any other odd value
            return number if math.isfinite(number) else text
    except ValueError:
        pass
    return text
