"""A small etcd v3 client for the kube-apiserver stand-in, from the standard library only.

It speaks etcd's gRPC-gateway JSON API (`POST /v3/kv/range`, `/v3/kv/put`, `/v3/kv/txn`,
`/v3/kv/deleterange`; served by etcd 3.4 and 3.5) over HTTPS with a client certificate, the way
the real kube-apiserver reaches etcd with `--etcd-certfile/--etcd-keyfile/--etcd-cafile`. Keys
and values travel base64-encoded. Every call tries the servers of `--etcd-servers` in turn,
starting with the last one that answered, until one does; when none does, `EtcdUnavailable`
says what each one replied.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any

__all__ = ["KV", "Etcd3", "EtcdError", "EtcdUnavailable", "prefix_end"]


class EtcdError(Exception):
    """etcd answered, but refused the request (a malformed request, a compacted revision)."""


class EtcdUnavailable(EtcdError):
    """No etcd server answered (refused connection, TLS failure, timeout, no leader)."""


@dataclass(frozen=True)
class KV:
    """One key as etcd returns it."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: str) -> bytes:
    """The range end that selects every key starting with `prefix` (etcd's `--prefix`)."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"
    raw[-1] += 1
    return bytes(raw)


def _kv(item: dict[str, Any]) -> KV:
    return KV(
        key=_unb64(item.get("key", "")).decode(),
        value=_unb64(item.get("value", "")),
        create_revision=int(item.get("create_revision", 0)),
        mod_revision=int(item.get("mod_revision", 0)),
    )


def _endpoint(url: str) -> tuple[bool, str, int]:
    """(TLS?, host, port) of an etcd server URL."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        raise ValueError(f"not an etcd server URL (scheme://ip:port): {url!r}")
    return parsed.scheme == "https", parsed.hostname, parsed.port or 2379


class Etcd3:
    """etcd v3 over the JSON gateway: https:// servers with `tls` (mutual TLS), http:// plain."""

    def __init__(self, servers: list[str], tls: ssl.SSLContext, timeout: float = 5.0) -> None:
        self._servers = [(url, *_endpoint(url)) for url in servers]
        self._tls = tls
        self._timeout = timeout
        self._preferred = 0
        self._lock = threading.Lock()

    # --- transport -----------------------------------------------------------------------------

    def _call_one(self, secure: bool, host: str, port: int, path: str, body: bytes
                  ) -> tuple[int, bytes]:
        if secure:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=self._timeout, context=self._tls
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self._timeout)
        try:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def call(self, path: str, request: dict[str, Any]) -> dict[str, Any]:
        """POST `request` to `path` (e.g. /v3/kv/range) on the first server that answers.

        :raises EtcdUnavailable: no server answered with a usable reply.
        :raises EtcdError: a server refused the request itself (4xx).
        """
        body = json.dumps(request).encode()
        with self._lock:
            start = self._preferred
        errors = []
        for offset in range(len(self._servers)):
            index = (start + offset) % len(self._servers)
            url, secure, host, port = self._servers[index]
            try:
                status, data = self._call_one(secure, host, port, path, body)
            except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
                errors.append(f"{url}: {exc}")
                continue
            if status >= 500:  # no leader, shutting down, ...: another member may do better
                errors.append(f"{url}: HTTP {status}: {data[:200].decode(errors='replace')}")
                continue
            with self._lock:
                self._preferred = index
            reply: dict[str, Any] = json.loads(data or b"{}")
            if status != 200:
                raise EtcdError(f"{url}: {reply.get('message') or reply.get('error') or status}")
            return reply
        raise EtcdUnavailable("; ".join(errors) or "no etcd servers configured")

    # --- key-value -----------------------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        """The key, or None when it does not exist."""
        reply = self.call("/v3/kv/range", {"key": _b64(key)})
        kvs = reply.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    def range_prefix(
        self, prefix: str, revision: int = 0, start: str = ""
    ) -> tuple[list[KV], int]:
        """Every key under `prefix` (from `start` on, at `revision` if not 0), and the revision."""
        request: dict[str, Any] = {
            "key": _b64(start or prefix),
            "range_end": _b64(prefix_end(prefix)),
        }
        if revision:
            request["revision"] = str(revision)
        reply = self.call("/v3/kv/range", request)
        kvs = [_kv(item) for item in reply.get("kvs") or []]
        return kvs, int(reply.get("header", {}).get("revision", 0))

    def revision(self) -> int:
        """The store's current revision (a cheap range of nothing); doubles as a health check."""
        reply = self.call("/v3/kv/range", {"key": _b64("/"), "count_only": True})
        return int(reply.get("header", {}).get("revision", 0))

    def put(self, key: str, value: bytes) -> int:
        """Write `key` unconditionally; return the new revision."""
        reply = self.call("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
        return int(reply.get("header", {}).get("revision", 0))

    def _txn(self, compare: dict[str, Any], success: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        reply = self.call("/v3/kv/txn", {"compare": [compare], "success": [success]})
        return bool(reply.get("succeeded", False)), reply

    def create(self, key: str, value: bytes) -> int | None:
        """Write `key` only if it does not exist: the new revision, or None if it exists."""
        compare = {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        ok, reply = self._txn(compare, {"request_put": {"key": _b64(key), "value": _b64(value)}})
        return int(reply.get("header", {}).get("revision", 0)) if ok else None

    def update(self, key: str, value: bytes, mod_revision: int) -> int | None:
        """Write `key` only if it is still at `mod_revision`: the new revision, or None."""
        compare = {
            "key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(mod_revision)
        }
        ok, reply = self._txn(compare, {"request_put": {"key": _b64(key), "value": _b64(value)}})
        return int(reply.get("header", {}).get("revision", 0)) if ok else None

    def delete(self, key: str, mod_revision: int = 0) -> int | None:
        """Delete `key` (only if still at `mod_revision` when given): the revision, or None."""
        request = {"request_delete_range": {"key": _b64(key)}}
        if mod_revision:
            compare = {
                "key": _b64(key), "target": "MOD", "result": "EQUAL",
                "mod_revision": str(mod_revision),
            }
        else:
            compare = {"key": _b64(key), "target": "CREATE", "result": "GREATER",
                       "create_revision": "0"}
        ok, reply = self._txn(compare, request)
        return int(reply.get("header", {}).get("revision", 0)) if ok else None

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix`; return how many were deleted."""
        reply = self.call(
            "/v3/kv/deleterange",
            {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))},
        )
        return int(reply.get("deleted", 0))
