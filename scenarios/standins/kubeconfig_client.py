"""A kubeconfig reader and a small JSON client for the stand-ins (standard library only).

`load_kubeconfig` reads the subset of YAML kubeconfigs are written in: block mappings and
sequences of scalars (plain, 'single' or "double" quoted, as `lifecycle.kubeconfig` writes
them). It resolves the current context to the server URL, the CA and the client certificate
and key (file paths, or the *-data fields, written to private temporary files). `ApiClient`
speaks JSON to the apiserver over mutual TLS with them.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import ssl
import tempfile
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar


class KubeconfigError(Exception):
    """The kubeconfig or a file it names is missing or unusable."""


class KlogFormatter(logging.Formatter):
    """klog's line format: `I0102 15:04:05.000000    1234 name] message`."""

    LEVELS: ClassVar[dict[int, str]] = {logging.DEBUG: "I", logging.INFO: "I",
                                        logging.WARNING: "W", logging.ERROR: "E",
                                        logging.CRITICAL: "F"}

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%m%d %H:%M:%S.%f")
        text = f"{self.LEVELS.get(record.levelno, 'I')}{stamp} {record.process:>7} " \
               f"{record.name}] {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


# --- the YAML subset -------------------------------------------------------------------------

_ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "n": "\n", "v": "\v", "f": "\f",
            "r": "\r", "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\", "N": "\x85",
            "_": "\xa0", "L": "\u2028", "P": "\u2029"}


def _scalar(text: str) -> str:
    text = text.strip()
    if text.startswith('"'):
        if len(text) < 2 or not text.endswith('"'):
            raise KubeconfigError(f"unterminated string: {text}")
        body, out, i = text[1:-1], [], 0
        while i < len(body):
            ch = body[i]
            if ch != "\\":
                out.append(ch)
                i += 1
                continue
            code = body[i + 1:i + 2]
            width = {"x": 2, "u": 4, "U": 8}.get(code)
            if width:
                out.append(chr(int(body[i + 2:i + 2 + width], 16)))
                i += 2 + width
            elif code in _ESCAPES:
                out.append(_ESCAPES[code])
                i += 2
            else:
                raise KubeconfigError(f"bad escape in {text}")
        return "".join(out)
    if text.startswith("'"):
        if len(text) < 2 or not text.endswith("'"):
            raise KubeconfigError(f"unterminated string: {text}")
        return text[1:-1].replace("''", "'")
    if " #" in text:
        text = text.split(" #", 1)[0].rstrip()
    return text


def _split_key(text: str) -> tuple[str, str] | None:
    """`key: value` -> (key, value); None when the line is not a mapping entry."""
    if text.startswith(('"', "'")):
        quote = text[0]
        end = text.find(quote, 1)
        while quote == "'" and end != -1 and text[end + 1:end + 2] == "'":
            end = text.find(quote, end + 2)
        if end == -1 or not text[end + 1:].lstrip().startswith(":"):
            return None
        rest = text[end + 1:].lstrip()[1:]
        return _scalar(text[:end + 1]), rest
    if ": " in text or text.endswith(":"):
        key, _, rest = text.partition(":")
        return key.strip(), rest
    return None


def parse_yaml(text: str) -> Any:
    """Block mappings, block sequences and scalars; enough for kubeconfig files."""
    lines: list[tuple[int, str]] = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#") or stripped in ("---", "..."):
            continue
        if "\t" in raw[:len(raw) - len(raw.lstrip())]:
            raise KubeconfigError("tabs are not allowed for indentation")
        lines.append((len(raw) - len(raw.lstrip(" ")), stripped))
    pos = 0

    def block(indent: int) -> Any:
        nonlocal pos
        if pos >= len(lines):
            return None
        if lines[pos][1].startswith("- ") or lines[pos][1] == "-":
            items: list[Any] = []
            while pos < len(lines) and lines[pos][0] == indent and (
                    lines[pos][1].startswith("- ") or lines[pos][1] == "-"):
                rest = lines[pos][1][1:].lstrip()
                if not rest:
                    pos += 1
                    items.append(block(lines[pos][0]) if pos < len(lines)
                                 and lines[pos][0] > indent else None)
                    continue
                # "- key: value" opens a mapping whose entries sit at indent + 2 + extra
                inner = indent + (len(lines[pos][1]) - len(rest))
                lines[pos] = (inner, rest)
                items.append(block(inner) if _split_key(rest) else _take_scalar(inner))
            return items
        mapping: dict[str, Any] = {}
        while pos < len(lines) and lines[pos][0] == indent:
            entry = _split_key(lines[pos][1])
            if entry is None:
                raise KubeconfigError(f"cannot parse line: {lines[pos][1]}")
            key, rest = entry
            pos += 1
            if rest.strip():
                mapping[key] = _scalar(rest)
            elif pos < len(lines) and (lines[pos][0] > indent or (
                    lines[pos][0] == indent and lines[pos][1].startswith("-"))):
                mapping[key] = block(lines[pos][0])
            else:
                mapping[key] = None
        if pos < len(lines) and lines[pos][0] > indent:
            raise KubeconfigError(f"bad indentation: {lines[pos][1]}")
        return mapping

    def _take_scalar(indent: int) -> str:
        nonlocal pos
        value = _scalar(lines[pos][1])
        pos += 1
        return value

    result = block(lines[0][0]) if lines else None
    if pos < len(lines):
        raise KubeconfigError(f"cannot parse line: {lines[pos][1]}")
    return result


# --- kubeconfig ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kubeconfig:
    server: str
    ca_file: str
    cert_file: str
    key_file: str
    user: str


def _named(items: Any, name: str, kind: str, path: str) -> dict[str, Any]:
    for item in items or []:
        if isinstance(item, dict) and item.get("name") == name:
            return item.get(kind) or {}
    raise KubeconfigError(f"invalid configuration: {kind} {name!r} not found in {path}")


def _materialise(section: dict[str, Any], field: str, base: str, private: bool) -> str:
    """The file for `field` (relative paths are relative to the kubeconfig), else the
    `<field>-data` written to a temporary file."""
    if section.get(field):
        value = str(section[field])
        return value if os.path.isabs(value) else os.path.join(base, value)
    data = section.get(f"{field}-data")
    if not data:
        return ""
    fd, name = tempfile.mkstemp(prefix="standin-", suffix=".pem")
    with os.fdopen(fd, "wb") as out:
        out.write(base64.b64decode(data))
    os.chmod(name, 0o600 if private else 0o644)
    return name


def load_kubeconfig(path: str) -> Kubeconfig:
    """The current context of `path`, its files checked readable.

    :raises KubeconfigError: missing, unparsable, or a file it names is unreadable.
    """
    try:
        with open(path, encoding="utf-8") as src:
            doc = parse_yaml(src.read())
    except OSError as err:
        raise KubeconfigError(f"invalid kubeconfig: {err.strerror}: {path}") from err
    if not isinstance(doc, dict):
        raise KubeconfigError(f"invalid kubeconfig {path}: not a mapping")
    current = doc.get("current-context") or ""
    if not current:
        raise KubeconfigError(f"invalid configuration: no current-context in {path}")
    context = _named(doc.get("contexts"), current, "context", path)
    cluster = _named(doc.get("clusters"), context.get("cluster", ""), "cluster", path)
    user = _named(doc.get("users"), context.get("user", ""), "user", path)
    base = os.path.dirname(os.path.abspath(path))
    config = Kubeconfig(
        server=str(cluster.get("server") or ""),
        ca_file=_materialise(cluster, "certificate-authority", base, False),
        cert_file=_materialise(user, "client-certificate", base, True),
        key_file=_materialise(user, "client-key", base, True),
        user=str(context.get("user", "")),
    )
    parsed = urllib.parse.urlsplit(config.server)
    if parsed.scheme != "https" or not parsed.hostname:
        raise KubeconfigError(f"invalid configuration: server {config.server!r} in {path} "
                              "is not an https URL")
    for label, name in (("certificate-authority", config.ca_file),
                        ("client-certificate", config.cert_file),
                        ("client-key", config.key_file)):
        if not name:
            raise KubeconfigError(f"invalid configuration: no {label} for the current "
                                  f"context of {path}")
        try:
            with open(name, "rb") as src:
                if b"-----BEGIN " not in src.read():
                    raise KubeconfigError(f"{label} {name} (from {path}) is not PEM")
        except OSError as err:
            raise KubeconfigError(f"unable to read {label} {name} (from {path}): "
                                  f"{err.strerror}") from err
    return config


# --- client ----------------------------------------------------------------------------------


class ApiError(Exception):
    """A non-2xx answer from the apiserver (`code`, and the Status message)."""

    def __init__(self, code: int, message: str, reason: str = "") -> None:
        super().__init__(f"{code} {reason}: {message}" if reason else f"{code}: {message}")
        self.code, self.message, self.reason = code, message, reason


class ApiClient:
    """JSON over HTTPS with the kubeconfig's client certificate; one connection per call."""

    def __init__(self, config: Kubeconfig, timeout: float = 10.0, agent: str = "standin"
                 ) -> None:
        self.config = config
        parsed = urllib.parse.urlsplit(config.server)
        self.host, self.port = parsed.hostname or "", parsed.port or 443
        self.prefix = parsed.path.rstrip("/")
        self.timeout, self.agent = timeout, agent
        try:
            ctx = ssl.create_default_context(cafile=config.ca_file)
            ctx.load_cert_chain(config.cert_file, config.key_file)
        except (ssl.SSLError, OSError) as err:
            raise KubeconfigError(f"unable to load the kubeconfig's certificates: {err}") from err
        self.context = ctx

    def call(self, method: str, path: str, body: Any = None,
             content_type: str = "application/json") -> Any:
        """The decoded JSON answer. :raises ApiError: non-2xx; OSError: unreachable."""
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                           context=self.context)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, self.prefix + path, data, {
                "Content-Type": content_type, "Accept": "application/json",
                "User-Agent": self.agent})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = raw.decode(errors="replace")
        if not 200 <= resp.status < 300:
            if isinstance(doc, dict):
                raise ApiError(resp.status, str(doc.get("message", "")), str(doc.get("reason", "")))
            raise ApiError(resp.status, str(doc)[:300])
        return doc
