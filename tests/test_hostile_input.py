"""Hostile cluster.yml files: whatever the bytes, rkel answers with a clear error, never a traceback.

Documents come from Hypothesis: a wrong type at a schema position, huge numbers and strings,
unicode of every kind (surrogates, NUL, bidi overrides, emoji) in keys and values, alias bombs,
thousands of nesting levels, duplicate keys, non-mapping top levels, binary garbage, tabs and
invalid UTF-8. Each goes through the library loader and a sample through the CLI (`rkel config
validate`, `rkel plan`). What must hold for every one of them:

- it finishes quickly (CPU time per load bounded; a watchdog turns a hang into a failure);
- it loads, or raises ConfigError (exit code 2) and nothing else;
- every issue points at the file (a YAML path or a line; syntax errors give line and column),
  says what to do, is short, and is safe to print (no control or bidi characters, no
  megabytes of echoed value).

CI runs a fixed set of examples (derandomized); RKEL_HOSTILE_EXAMPLES=N runs N random ones per
property instead.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from lifecycle.cli import app
from lifecycle.config import LoadedConfig, load_config, load_config_text
from lifecycle.config.schema import CLUSTER, Free, MapOf, Scalar, Seq, Spec, Struct
from lifecycle.errors import ConfigError

EXAMPLES = os.environ.get("RKEL_HOSTILE_EXAMPLES")


def hostile(examples: int) -> Any:
    """Hypothesis settings: `examples` fixed ones in CI, RKEL_HOSTILE_EXAMPLES random ones."""
    return settings(
        max_examples=int(EXAMPLES) if EXAMPLES else examples,
        derandomize=EXAMPLES is None,
        database=None,
        deadline=None,  # time is bounded by `timed` below, in CPU seconds
        # no explain phase: its line tracing slows loads tenfold, tripping the time bounds
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )


CPU_LIMIT = 2.0  # seconds of CPU per load: the largest real file takes ~0.05
WATCHDOG = 30.0  # wall seconds after which a load counts as hung
def node(**fields: Any) -> dict[str, Any]:
    """A valid node mapping (a fresh one each time: documents are edited in place)."""
    return {"address": "10.0.0.1", "user": "rke", "role": ["controlplane", "etcd", "worker"],
            **fields}


# What a printed message must not contain: terminal controls, bidi controls, surrogates.
UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
# Words of a message that tells the user what is expected or what to do.
GUIDANCE = re.compile(
    r"expected|use |give |add |remove|refus|must|valid|did you mean|is not a|needs|check|"
    r"rename|write|each |only|at most|at least|need|too large|stops reading|nested more"
)


class Hang(BaseException):
    """A load ran past the watchdog (BaseException: nothing in rkel may swallow it)."""


@contextmanager
def watchdog(seconds: float = WATCHDOG) -> Iterator[None]:
    def fire(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_error(exc: ConfigError) -> None:
    """Every issue of a refused file is located, actionable, short and safe to print."""
    assert exc.issues, "a ConfigError with no issue"
    assert len(exc.issues) <= 101, f"{len(exc.issues)} issues: the list should be capped"
    for issue in exc.issues:
        shown = str(issue)
        summary = issue.message.startswith("... and ")  # the count of issues not shown
        assert issue.line is not None or issue.path or summary, f"not located: {shown}"
        assert len(shown) <= 2500, f"issue of {len(shown)} characters: {shown[:200]}..."
        assert not UNSAFE.search(shown), f"unsafe character in {shown!r}"
        assert issue.hint or GUIDANCE.search(issue.message), f"says nothing to do: {shown}"
        if "syntax error" in issue.message:
            assert issue.line is not None and "column" in issue.message, shown
    assert not UNSAFE.search(str(exc).replace("\n", " ")), repr(str(exc))


def _load(text: str) -> tuple[LoadedConfig | ConfigError, float]:
    start = time.process_time()
    try:
        with watchdog():
            result: LoadedConfig | ConfigError = load_config_text(text, "hostile.yml")
    except ConfigError as exc:
        result = exc
    return result, time.process_time() - start


def timed_load(text: str) -> LoadedConfig | ConfigError:
    """Load `text` under the CPU bound and watchdog; a ConfigError is returned, checked."""
    result, spent = _load(text)
    for _ in range(2):  # a busy machine inflates one measurement; a slow loader is slow each time
        if spent < CPU_LIMIT:
            break
        spent = min(spent, _load(text)[1])
    assert spent < CPU_LIMIT, f"load took {spent:.2f}s of CPU for {len(text)} characters"
    if isinstance(result, ConfigError):
        check_error(result)
    else:
        for warning in result.warnings:
            assert not UNSAFE.search(str(warning)) and len(str(warning)) <= 2500, str(warning)
    return result


def paths_of(result: LoadedConfig | ConfigError) -> list[str]:
    return [i.path for i in result.issues] if isinstance(result, ConfigError) else []


# ---------------------------------------------------------------------------- writing YAML
@dataclass(frozen=True)
class Raw:
    """YAML text put into a document as it is: anchors, tags, 5000-digit numbers, bombs."""

    text: str


def flow(value: Any, ascii_only: bool = False) -> str:
    """`value` as flow YAML (JSON-like); strings double-quoted with JSON's escapes, which YAML
    shares, so any character can be written; with `ascii_only` every non-ASCII one is escaped."""
    if isinstance(value, Raw):
        return value.text
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return ".nan" if value != value else ".inf" if value == float("inf") else \
            "-.inf" if value == float("-inf") else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=ascii_only)
    if isinstance(value, list):
        return "[" + ", ".join(flow(v, ascii_only) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{flow(k, ascii_only)}: {flow(v, ascii_only)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(value)


def block(value: Any, indent: int = 0, ascii_only: bool = False) -> str:
    """`value` as block YAML (one key or item a line), scalars and Raw text in flow style."""
    pad = "  " * indent
    nested = (dict, list)
    if isinstance(value, dict) and value:
        lines = []
        for k, v in value.items():
            key = flow(k, ascii_only)
            if isinstance(v, nested) and v:
                lines.append(f"{pad}{key}:\n{block(v, indent + 1, ascii_only)}")
            else:
                lines.append(f"{pad}{key}: {flow(v, ascii_only)}")
        return "\n".join(lines)
    if isinstance(value, list) and value:
        lines = []
        for v in value:
            if isinstance(v, nested) and v:
                lines.append(f"{pad}-\n{block(v, indent + 1, ascii_only)}")
            else:
                lines.append(f"{pad}- {flow(v, ascii_only)}")
        return "\n".join(lines)
    return pad + flow(value, ascii_only)


def emit(doc: Any, style: str) -> str:
    if style == "flow":
        return flow(doc) + "\n"
    if style == "flow-ascii":
        return flow(doc, ascii_only=True) + "\n"
    return block(doc) + "\n"


STYLES = st.sampled_from(["block", "flow", "flow-ascii"])


# ---------------------------------------------------------------------------- the schema
Part = str | int


def positions(spec: Spec, parts: tuple[Part, ...] = ()) -> Iterator[tuple[tuple[Part, ...], Spec]]:
    """Every position of the schema below `parts` with its spec; a Free sub-tree is one."""
    if parts:
        yield parts, spec
    if isinstance(spec, Struct):
        for name, sub in spec.fields.items():
            yield from positions(sub, (*parts, name))
    elif isinstance(spec, Seq):
        yield from positions(spec.item, (*parts, 0))
    elif isinstance(spec, MapOf):
        yield from positions(spec.value, (*parts, "some-key"))


POSITIONS = list(positions(CLUSTER))


def yaml_path(parts: tuple[Part, ...]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out


def base_doc() -> dict[str, Any]:
    return {"nodes": [node()]}


def put(doc: dict[str, Any], parts: tuple[Part, ...], value: Any) -> dict[str, Any]:
    """`doc` with `value` at `parts`, creating the mappings and one-item lists on the way."""
    here: Any = doc
    for part, following in zip(parts, parts[1:]):
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(part, int):
            while len(here) <= part:
                here.append(empty)
            if not isinstance(here[part], (list, dict)):
                here[part] = empty
        elif not isinstance(here.get(part), (list, dict)):
            here[part] = empty
        here = here[part]
    last = parts[-1]
    if isinstance(last, int):
        while len(here) <= last:
            here.append(None)
    here[last] = value
    return doc


def wrong_kind(spec: Spec) -> list[Any]:
    """Values of a kind the position can never take (null aside, which means "default")."""
    if isinstance(spec, Scalar):
        wrong: list[Any] = [{"a": 1}, [1]]
        if spec.kind == "bool":
            wrong.append("maybe")
        elif spec.kind in ("int", "float"):
            wrong.append("twelve")
        return wrong
    if isinstance(spec, Seq):
        return ["text", {"a": 1}]
    if isinstance(spec, (Struct, MapOf)):
        return ["text", [1, 2]]
    return []


def is_wrong_kind(spec: Spec, value: Any) -> bool:
    collection = isinstance(value, (list, dict))
    if isinstance(spec, Scalar):
        return collection
    if isinstance(spec, Seq):
        return isinstance(value, dict) or (not collection and value is not None
                                            and not isinstance(value, Raw))
    if isinstance(spec, (Struct, MapOf)):
        return isinstance(value, list) or (not collection and value is not None
                                           and not isinstance(value, Raw))
    return False


# ---------------------------------------------------------------------------- hostile values
SPECIAL = [
    "\x00", "\ud800", "\udfff", "\u202e", "\u2066", "\u200f", "\x1b[2J", "\x1b]0;pwned\x07",
    "\x7f", "\x85", "\x9b", "\u2028", "\ufeff", "\ufffe", "\U0001f600", "\U0001f469\u200d\U0001f467",
    "\t", "\r", "\n", "\\", '"', "'", "`", ": ", "- ", " #", "&a ", "*a", "!!", "%", "@", "{", "]",
    "\u0301", "\u0130", "\u00df", "\U0001d7d8", "\u00b2", "\u0661\u0662", "~", "null", "yes",
]
TEXT = st.lists(st.one_of(st.characters(), st.sampled_from(SPECIAL)), max_size=12).map("".join)
KEYS = st.one_of(TEXT, st.sampled_from(["nodes", "address", "<<", "", "role", "kube-api"]))
HUGE_NUMBERS = [
    10**100, -(10**100), 2**63, 2**63 - 1, -(2**63) - 1, 2**64, 65536, 0, -1,
]
RAW = st.sampled_from(
    [
        Raw("9" * 5000), Raw("-" + "1" * 4400), Raw("1e400"), Raw("-1e400"), Raw(".inf"),
        Raw(".nan"), Raw("0x" + "f" * 200), Raw("0o777"), Raw("1_000"), Raw("~"),
        Raw("!!binary aGVsbG8="), Raw('!!python/object/apply:os.system ["true"]'),
        Raw("!custom-tag x"), Raw("&anchor x"), Raw("*undefined"), Raw("!!int x"),
        Raw("!!float nope"), Raw("!!map [1]"), Raw("{<<: [1, 2]}"), Raw("{<<: *nowhere}"),
        Raw("&self [*self]"), Raw("&m {k: *m}"), Raw("? [a, b]\n"), Raw("'unterminated"),
        Raw("[1, 2"), Raw("{a: 1"), Raw("|\n  block text"), Raw("@reserved"),
    ]
)
NUMBERS = st.one_of(
    st.integers(),
    st.sampled_from(HUGE_NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT, RAW)


def deep(depth: int, kind: str) -> Raw:
    if kind == "list":
        return Raw("[" * depth + "]" * depth)
    return Raw("{a: " * depth + "1" + "}" * depth)


def bomb(levels: int, fanout: int) -> Raw:
    """Billion laughs: each level a list of `fanout` aliases of the level below."""
    rows = ["&l0 [" + ", ".join(["lol"] * fanout) + "]"]
    rows += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * fanout) + "]" for i in range(1, levels)]
    return Raw("[" + ", ".join(rows) + "]")


DEEP = st.builds(deep, st.integers(50, 3000), st.sampled_from(["list", "map"]))
BOMBS = st.builds(bomb, st.integers(2, 14), st.integers(2, 12))
VALUES = st.recursive(
    st.one_of(SCALARS, DEEP, BOMBS),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)
    ),
    max_leaves=10,
)


# ---------------------------------------------------------------------------- every position
def test_a_wrong_kind_at_every_schema_position_is_named_by_path_and_line() -> None:
    """Deterministic sweep: each position of the schema, given a value of a kind it can never
    take, is refused with an issue at exactly that path, with a line."""
    checked = 0
    for parts, spec in POSITIONS:
        for value in wrong_kind(spec):
            for style in ("block", "flow"):
                text = emit(put(base_doc(), parts, value), style)
                result = timed_load(text)
                path = yaml_path(parts)
                assert isinstance(result, ConfigError), f"{path} = {value!r} loaded"
                mine = [i for i in result.issues if i.path == path]
                assert mine, f"{path} = {value!r}: no issue at the path, only {paths_of(result)}"
                assert all(i.line is not None for i in mine)
                assert any("expected" in i.message for i in mine), [str(i) for i in mine]
                checked += 1
    assert checked > 500  # the schema has ~300 positions


@hostile(120)
@given(position=st.sampled_from(POSITIONS), value=VALUES, style=STYLES)
@example(position=((("services", "etcd", "uid"), Scalar("int"))), value=Raw("9" * 5000),
         style="block")
@example(position=((("upgrade_strategy", "max_unavailable_worker"), Scalar("str"))),
         value="\u00b2", style="block")
@example(position=((("services", "kube-api", "service_node_port_range"), Scalar("str"))),
         value="1" * 5000 + "-2", style="block")
@example(position=((("nodes", 0, "labels", "some-key"), Scalar("str"))), value="\x00",
         style="flow-ascii")
@example(position=((("cluster_name",), Scalar("str"))), value="\ud83d\ude00", style="flow-ascii")
@example(position=((("cluster_name",), Scalar("str"))), value="\ud800", style="flow")
def test_any_value_at_any_position_loads_or_is_refused_clearly(
    position: tuple[tuple[Part, ...], Spec], value: Any, style: str
) -> None:
    parts, spec = position
    text = emit(put(base_doc(), parts, value), style)
    result = timed_load(text)
    if is_wrong_kind(spec, value):
        # named by its path, unless the whole document was refused first (syntax, limits)
        assert isinstance(result, ConfigError), f"{yaml_path(parts)} = {value!r} loaded"
        whole = [i for i in result.issues if not i.path and i.line is not None]
        assert yaml_path(parts) in paths_of(result) or whole, (yaml_path(parts), str(result))


@hostile(40)
@given(keys=st.lists(KEYS, min_size=1, max_size=5), value=VALUES, style=STYLES)
@example(keys=["\x1b[2J\x1b]0;pwned\x07"], value=1, style="flow")
@example(keys=["\u202eevil"], value="\u202e", style="block")
@example(keys=["\U0001f600"], value="\U0001f600", style="block")
def test_hostile_keys_are_refused_with_a_printable_message(
    keys: list[str], value: Any, style: str
) -> None:
    for key in reversed(keys[1:]):
        value = {key: value}
    doc: dict[str, Any] = {**base_doc(), keys[0]: value}
    result = timed_load(emit(doc, style))
    if keys[0] not in CLUSTER.fields and keys[0] not in ("auth", "<<"):
        assert isinstance(result, ConfigError), "an unknown top-level key must be refused"


# ---------------------------------------------------------------------------- whole documents
@hostile(40)
@given(top=st.one_of(SCALARS, st.lists(SCALARS, max_size=5)), style=STYLES)
def test_a_top_level_that_is_not_a_mapping_is_refused(top: Any, style: str) -> None:
    result = timed_load(emit(top, style))
    assert isinstance(result, ConfigError)


@hostile(60)
@given(data=st.binary(max_size=2000))
@example(data=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
@example(data=b"\x7fELF\x02\x01\x01\x00")
@example(data=b"\xff\xfen\x00o\x00")
def test_binary_garbage_is_refused(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "cluster.yml"
    path.write_bytes(data)
    start = time.process_time()
    with watchdog(), pytest.raises(ConfigError) as info:
        load_config(path)
    assert time.process_time() - start < CPU_LIMIT
    check_error(info.value)


def valid_text() -> str:
    return (
        "cluster_name: demo\n"
        "nodes:\n"
        "  - address: 10.0.0.1\n"
        "    user: rke\n"
        "    role: [controlplane, etcd, worker]\n"
        "    labels:\n"
        "      app: web\n"
        "services:\n"
        "  kube-api:\n"
        "    service_node_port_range: 30000-32767\n"
        "    extra_args:\n"
        "      v: '2'\n"
        "  kubelet:\n"
        "    fail_swap_on: false\n"
        "network:\n"
        "  plugin: canal\n"
        "upgrade_strategy:\n"
        "  max_unavailable_worker: 10%\n"
    )


@hostile(60)
@given(offset=st.integers(0, len(valid_text().encode())),
       junk=st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\x80\x80",
                             b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"]))
def test_invalid_utf8_is_refused_at_its_line(tmp_path: Path, offset: int, junk: bytes) -> None:
    data = valid_text().encode()
    bad = data[:offset] + junk + data[offset:]
    path = tmp_path / "cluster.yml"
    path.write_bytes(bad)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    check_error(info.value)
    (issue,) = info.value.issues
    assert issue.line == bad.count(b"\n", 0, offset) + 1, str(issue)
    assert "not UTF-8" in issue.message and "save it as UTF-8" in issue.hint


@hostile(60)
@given(line=st.integers(0, len(valid_text().splitlines()) - 1), tabs=st.integers(1, 3),
       where=st.sampled_from(["indent", "after-colon", "end"]))
def test_tabs_load_or_get_a_syntax_error_that_says_tabs(line: int, tabs: int, where: str) -> None:
    lines = valid_text().splitlines()
    text = lines[line]
    if where == "indent":
        stripped = text.lstrip(" ")
        text = "\t" * tabs + stripped
    elif where == "after-colon" and ": " in text:
        text = text.replace(": ", ":" + "\t" * tabs, 1)
    else:
        text += "\t" * tabs
    lines[line] = text
    result = timed_load("\n".join(lines) + "\n")
    if isinstance(result, ConfigError):
        for issue in result.issues:
            if "'\\t'" in issue.message:
                assert "tabs" in issue.hint and issue.line == line + 1, str(issue)


@hostile(15)
@given(levels=st.integers(2, 16), fanout=st.integers(2, 16), style=STYLES,
       where=st.sampled_from([("cloud_provider", "awsCloudProvider"), ("addons_include",),
                              ("nodes", 0, "role"), ("services", "kube-api", "audit_log",
                                                     "configuration")]))
@example(levels=9, fanout=10, style="block", where=("cloud_provider", "awsCloudProvider"))
def test_alias_bombs_are_refused_quickly(
    levels: int, fanout: int, style: str, where: tuple[Part, ...]
) -> None:
    result = timed_load(emit(put(base_doc(), where, bomb(levels, fanout)), style))
    if fanout**levels > 200_000:
        assert isinstance(result, ConfigError)
        if where[0] == "cloud_provider":  # free-form: only the expansion limit can stop it
            assert any("alias" in i.message for i in result.issues), str(result)


@hostile(30)
@given(depth=st.integers(65, 5000), kind=st.sampled_from(["list", "map", "block-map",
                                                          "block-list"]))
@example(depth=1000, kind="list")
@example(depth=5000, kind="block-map")
def test_deep_nesting_is_refused_at_its_line(depth: int, kind: str) -> None:
    if kind.startswith("block"):
        depth = min(depth, 400)  # two spaces a level: 400 levels are 160 KB already
        step = "-" if kind == "block-list" else "k:"
        rows = ["  " * (i + 2) + step for i in range(depth)]
        text = (block(base_doc()) + "\ncloud_provider:\n  awsCloudProvider:\n"
                + "\n".join(rows) + " 1\n")
    else:
        text = emit(put(base_doc(), ("cloud_provider", "awsCloudProvider"), deep(depth, kind)),
                    "block")
    result = timed_load(text)
    assert isinstance(result, ConfigError)
    assert any("nested more than 64 levels" in i.message and i.line for i in result.issues), \
        str(result)


@hostile(40)
@given(data=st.data())
def test_duplicate_keys_load_as_rke_does_with_a_warning_naming_both_lines(
    data: st.DataObject,
) -> None:
    """yaml.v2 (RKE) lets the later key win; rkel does the same, and warns (real files carry
    duplicates, so refusing them would refuse files RKE accepts)."""
    lines = valid_text().splitlines()
    scalar_lines = [i for i, text in enumerate(lines) if re.fullmatch(r" *[a-z_-]+: \S.*", text)]
    index = data.draw(st.sampled_from(scalar_lines), label="line to repeat")
    key = lines[index].split(":")[0]
    lines.insert(index + 1, lines[index])
    result = timed_load("\n".join(lines) + "\n")
    assert isinstance(result, LoadedConfig), str(result)
    warned = [w for w in result.warnings if "given twice" in w.message]
    assert warned and f"`{key.strip()}`" in warned[0].message, result.warnings
    assert f"lines {index + 1} and {index + 2}" in warned[0].message


# ---------------------------------------------------------------------------- the limits
@pytest.mark.parametrize("size", [300_000, 1_000_000])
@pytest.mark.parametrize("where", [("cluster_name",), ("nodes", 0, "address"),
                                   ("nodes", 0, "labels", "app"), ("nodes", 0, "port")])
def test_megabyte_strings_load_or_are_refused_quickly(size: int, where: tuple[Part, ...]) -> None:
    value = "\u00e9" * size
    result = timed_load(emit(put(base_doc(), where, value), "block"))
    if where[-1] == "port":
        assert isinstance(result, ConfigError) and len(str(result)) < 2000


@pytest.mark.parametrize("size", [300_000, 1_000_000])
def test_megabyte_keys_are_refused_quickly_with_a_short_message(size: int) -> None:
    result = timed_load(block(base_doc()) + "\n" + "k" * size + ": 1\n")
    assert isinstance(result, ConfigError) and len(str(result)) < 2000



def test_a_large_but_real_inline_addon_still_loads() -> None:
    manifest = "".join(f"    # line {i} of a long manifest\n" for i in range(25_000))
    text = block(base_doc()) + "\naddons: |\n" + manifest
    assert 700_000 < len(text) < 1024 * 1024
    result = timed_load(text)
    assert isinstance(result, LoadedConfig), str(result)
    assert len(result.config.addons) > 700_000


def test_a_file_over_one_mebibyte_is_refused_saying_where_big_manifests_go(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yml"
    path.write_text(block(base_doc()) + "\naddons: |\n" + "  x\n" * 300_000)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (issue,) = info.value.issues
    assert "over 1 MiB" in issue.message and "addons_include" in issue.hint


def test_a_300_node_cluster_loads_but_a_flood_of_values_is_cut_short() -> None:
    many = {"nodes": [node(address=f"10.0.{i // 250}.{i % 250}") for i in range(300)]}
    result = timed_load(block(many))
    assert isinstance(result, LoadedConfig) and len(result.config.nodes) == 300
    flood = "nodes:\n" + "".join(f"  - {{address: a{i}, user: u, role: [etcd]}}\n"
                                 for i in range(6000))
    result = timed_load(flood)
    assert isinstance(result, ConfigError)
    (issue,) = result.issues
    assert "more than 20000 YAML values" in issue.message and issue.line is not None


def test_thousands_of_errors_are_capped_with_a_count() -> None:
    many = {"nodes": [node(port="x", address=f"10.1.0.{i}") for i in range(200)]}
    result = timed_load(block(many))
    assert isinstance(result, ConfigError)
    assert len(result.issues) == 101 and "100 more error(s)" in result.issues[-1].message


# ---------------------------------------------------------------------------- the CLI
runner = CliRunner()
CLI_DOCS = st.one_of(
    st.builds(lambda p, v, s: emit(put(base_doc(), p[0], v), s), st.sampled_from(POSITIONS),
              VALUES, STYLES),
    st.builds(lambda v, s: emit(v, s), SCALARS, STYLES),
    st.builds(lambda lv, f: emit(put(base_doc(), ("addons_include",), bomb(lv, f)), "block"),
              st.integers(6, 12), st.integers(6, 10)),
)


def run_cli(tmp_path: Path, text: str, *args: str) -> Any:
    config = tmp_path / "cluster.yml"
    config.write_text(text, encoding="utf-8", errors="surrogatepass")
    start = time.process_time()
    with watchdog():
        result = runner.invoke(app, ["-c", str(config), "--state", str(tmp_path / "s.db"), *args])
    assert time.process_time() - start < CPU_LIMIT + 1
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"rkel {' '.join(args)} crashed") from result.exception
    assert "Traceback" not in result.output + result.stderr
    return result


@hostile(25)
@given(text=CLI_DOCS)
@example(text=block(base_doc()) + '\n"\\e[31mred": 1\n')
@example(text="nodes:\n  - address: 10.0.0.1\n    port: " + "9" * 5000 + "\n")
def test_rkel_config_validate_exits_2_with_located_errors(tmp_path: Path, text: str) -> None:
    result = run_cli(tmp_path, text, "config", "validate")
    assert result.exit_code in (0, 2), (result.exit_code, result.stderr)
    if result.exit_code == 2:
        assert result.stderr.startswith("error: ") and not UNSAFE.search(
            result.stderr.replace("\n", " ")), repr(result.stderr[:500])
        lines = result.stderr.splitlines()[1:]
        located = re.compile(r"  (line \d+: |[\w\[\"]|\.\.\. and )")
        assert lines and all(located.match(line) for line in lines), lines
        as_json = run_cli(tmp_path, text, "-o", "json", "config", "validate")
        assert as_json.exit_code == 2
        issues = json.loads(as_json.stdout)["issues"]
        assert issues and all(i["line"] is not None or i["path"] for i in issues)


# Printable but odd: any letters, marks, symbols, emoji, bidi controls; no C0/C1 controls or
# surrogates (the loader refuses those, so they would never reach the planner).
ODD = st.one_of(
    st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=16),
    st.sampled_from(["\u202eevil", "\U0001f600", "n\u00f6de-1", "\u540d\u524d", "a b", "-x",
                     "--flag=1", "$(reboot)", "; rm -rf /", "10.0.0.1\u200b", "x" * 5000]),
)
ODD_NUMBERS = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False,
                                                                     allow_infinity=False))
VALID_BUT_ODD = st.fixed_dictionaries(
    {
        "cluster_name": ODD,
        "nodes": st.lists(
            st.fixed_dictionaries(
                {"address": st.one_of(ODD, st.just("10.0.0.1")), "user": ODD,
                 "role": st.just(["controlplane", "etcd", "worker"])},
                optional={"hostname_override": ODD, "port": st.integers(1, 65535),
                          "internal_address": ODD,
                          "labels": st.dictionaries(ODD, ODD, max_size=3),
                          "taints": st.lists(st.fixed_dictionaries(
                              {"key": ODD, "value": ODD, "effect": st.just("NoSchedule")}),
                              max_size=2)}),
            min_size=1, max_size=3),
    },
    optional={
        "services": st.fixed_dictionaries({"kube-api": st.fixed_dictionaries(
            {"extra_args": st.dictionaries(ODD, ODD, max_size=3),
             "extra_env": st.lists(ODD, max_size=2),
             "extra_binds": st.lists(ODD, max_size=2)})}),
        "addon_job_timeout": st.integers(-(2**63), 2**63 - 1),
        "dns": st.fixed_dictionaries({"linear_autoscaler_params": st.fixed_dictionaries(
            {"cores_per_replica": ODD_NUMBERS, "min": st.integers(-(2**63), 2**63 - 1)})}),
        "cloud_provider": st.fixed_dictionaries({"name": ODD, "awsCloudProvider": VALUES}),
        "addons": ODD,
        "authentication": st.fixed_dictionaries({"sans": st.lists(ODD, max_size=3)}),
        "private_registries": st.lists(st.fixed_dictionaries(
            {"url": ODD, "user": ODD, "password": ODD}), max_size=2),
    },
)


@hostile(25)
@given(doc=VALID_BUT_ODD, style=st.sampled_from(["block", "flow"]))
def test_rkel_plan_never_crashes_on_odd_values(tmp_path: Path, doc: dict[str, Any],
                                               style: str) -> None:
    """Values that pass the loader's checks still have to plan, or be refused, cleanly."""
    result = run_cli(tmp_path, emit(doc, style), "plan", "--backend", "simulated")
    assert result.exit_code in (0, 2, 3), (result.exit_code, result.output, result.stderr)
    if result.exit_code:
        assert result.stderr.startswith("error: ")
