"""`EtcdAPI` through etcdctl inside a running etcd container (`docker exec etcd etcdctl ...`).

The etcd container carries ETCDCTL_API, ETCDCTL_CACERT/CERT/KEY and ETCDCTL_ENDPOINTS in its
environment (see `lifecycle.desired`), so an exec inherits the member's own client credentials
and nothing secret crosses the wire in a command line. Requests go to the first etcd host whose
container answers; a host that cannot answer (down, container stopped, member not serving) is
skipped, a refusal by the etcd server itself is reported. Output is `-w json`, which etcd 3.4 and
3.5 print alike; member IDs are uint64 (exact as Python ints) and go back to etcdctl in hex.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Sequence
from typing import Any, Protocol

from lifecycle.errors import HostError, HostUnreachableError
from lifecycle.hosts import EtcdMember
from lifecycle.spec import NodeRef

ETCD_CONTAINER = "etcd"
# etcd refuses `member add` until every member has been connected for a few seconds
# (--strict-reconfig-check): how long add_member waits that out.
ADD_RETRY_SECONDS = 30.0
ADD_RETRY_INTERVAL = 2.0
# etcd-server errors that a different member may not give (no leader yet, a timeout): try on.
_RETRYABLE = ("request timed out", "leader changed", "no leader", "not capable",
              "too many requests", "server stopped", "rpc not supported for learner",
              "unhealthy cluster")


class _ExecHost(Protocol):
    def exec(self, container: str, cmd: list[str]) -> tuple[int, str]: ...


class _HostSource(Protocol):
    def host(self, node: NodeRef) -> Any: ...

    def clock(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


def member_name(node: NodeRef) -> str:
    """The member name rkel gives a node (as `lifecycle.effects.etcd_member_name`)."""
    return f"etcd-{node.name}"


class EtcdctlAPI:
    """etcd membership and health via etcdctl in the `etcd` container of an etcd host."""

    def __init__(self, backend: _HostSource, etcd_nodes: Sequence[NodeRef],
                 container: str = ETCD_CONTAINER) -> None:
        self.backend = backend
        self.nodes = list(etcd_nodes)
        self.container = container
        self._last_good: str | None = None
        self._added: dict[str, str] = {}  # peer URL -> name, for members not started yet

    # ------------------------------------------------------------------ running etcdctl
    def _order(self) -> list[NodeRef]:
        return sorted(self.nodes, key=lambda n: (n.name != self._last_good, n.name))

    def _etcdctl(self, *args: str, json_out: type | None = None) -> tuple[str, Any]:
        """Run etcdctl on the first host that answers: (output, parsed JSON or None).

        With `json_out` (dict or list: the shape `-w json` prints), a non-zero exit that still
        printed that JSON counts as an answer (`endpoint health` exits 1 when any member is
        unhealthy); the client library's JSON log lines on stderr never do.
        """
        tried: list[str] = []
        for node in self._order():
            try:
                host: _ExecHost = self.backend.host(node)
                code, out = host.exec(self.container, ["etcdctl", *args])
            except HostError as exc:
                tried.append(f"{node.name}: {_short(str(exc))}")
                continue
            data = _json(out, json_out) if json_out else None
            if code == 0 or data is not None:
                self._last_good = node.name
                return out, data
            text = _error_text(out)
            if "etcdserver:" in out and not any(r in out for r in _RETRYABLE):
                raise HostError("etcd", f"etcdctl {' '.join(args[:2])} refused by the etcd server"
                                f" (asked through {node.name}): {text}")
            tried.append(f"{node.name}: {text}")
        raise HostUnreachableError("etcd", "no etcd member answered"
                                   f" ({'; '.join(tried) or 'no etcd nodes'}); check the etcd"
                                   " containers (`rkel status`, `docker logs etcd`) and quorum")

    def _raw_members(self) -> list[dict[str, Any]]:
        _out, data = self._etcdctl("member", "list", "-w", "json", json_out=dict)
        if not isinstance(data, dict):
            raise HostError("etcd", "etcdctl member list printed no JSON")
        return list(data.get("members") or [])

    def _name(self, member: dict[str, Any]) -> str:
        """A member's name; a member not started yet has none in etcd: ours, by peer URL."""
        if member.get("name"):
            return str(member["name"])
        for url in member.get("peerURLs") or []:
            if url in self._added:
                return self._added[url]
            host = urllib.parse.urlsplit(url).hostname
            for node in self.nodes:
                if host in (node.internal_address, node.address):
                    return member_name(node)
        return ""

    def _id_of(self, name: str) -> int | None:
        for m in self._raw_members():
            if self._name(m) == name:
                return int(m["ID"])
        return None

    # ------------------------------------------------------------------ EtcdAPI
    def members(self) -> list[EtcdMember]:
        out = []
        for m in self._raw_members():
            peers = m.get("peerURLs") or [""]
            out.append(EtcdMember(self._name(m), str(peers[0]), bool(m.get("name")),
                                  bool(m.get("isLearner", False))))
        return sorted(out, key=lambda m: m.name)

    def add_member(self, name: str, peer_url: str) -> None:
        """`member add --learner`: the new member does not count towards quorum until promoted.

        A cluster that etcd calls unhealthy for reconfiguration (members connected for under 5 s,
        an election) is waited out for up to ADD_RETRY_SECONDS; a member already added with this
        peer URL (an earlier attempt that did succeed) counts as done.
        """
        self._added[peer_url] = name
        deadline = self.backend.clock() + ADD_RETRY_SECONDS
        while True:
            try:
                self._etcdctl("member", "add", name, f"--peer-urls={peer_url}", "--learner")
                return
            except HostError as exc:
                if "already exists" in str(exc) and any(
                    peer_url in (m.get("peerURLs") or []) for m in self._raw_members()
                ):
                    return
                if not isinstance(exc, HostUnreachableError) or self.backend.clock() > deadline:
                    raise
            self.backend.sleep(ADD_RETRY_INTERVAL)

    def promote_member(self, name: str) -> None:
        member_id = self._id_of(name)
        if member_id is None:
            raise HostError("etcd", f"no etcd member {name} to promote")
        self._etcdctl("member", "promote", format(member_id, "x"))

    def remove_member(self, name: str) -> None:
        member_id = self._id_of(name)
        if member_id is not None:
            self._etcdctl("member", "remove", format(member_id, "x"))

    def healthy(self) -> dict[str, bool]:
        """Every member's health by name, each asked on its own client URLs."""
        raw = self._raw_members()
        by_url: dict[str, str] = {}
        result: dict[str, bool] = {}
        for m in raw:
            name = self._name(m) or format(int(m["ID"]), "x")
            result[name] = False
            for url in m.get("clientURLs") or []:
                by_url[url.rstrip("/")] = name
        if not by_url:
            return dict(sorted(result.items()))
        _out, data = self._etcdctl("endpoint", "health", "--cluster", "-w", "json", json_out=list)
        answered: set[str] = set()
        for entry in data if isinstance(data, list) else []:
            who = by_url.get(str(entry.get("endpoint", "")).rstrip("/"))
            if who is None:
                continue
            # A member with several client URLs is healthy only if every one of them answers.
            ok = bool(entry.get("health"))
            result[who] = ok and (result[who] or who not in answered)
            answered.add(who)
        return dict(sorted(result.items()))


def _json(text: str, shape: type) -> Any:
    """The first line of `text` that is JSON of `shape` and not a log record of etcd's client
    library (`{"level": ..., "msg": ...}` lines on stderr)."""
    for line in text.splitlines():
        line = line.strip()
        if line[:1] not in ("{", "["):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and "level" in value and "msg" in value:
            continue
        if isinstance(value, shape):
            return value
    return None


def _error_text(output: str) -> str:
    """etcdctl's own `Error: ...` line, without the client library's JSON log lines."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    plain = [line for line in lines if not line.startswith("{")]
    return _short((errors or plain or lines or ["no output"])[-1])


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
