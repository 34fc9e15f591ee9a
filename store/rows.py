"""Values that cross the store's boundary: errors, row dataclasses and state operations.

Rows come out of the database as frozen dataclasses with their JSON columns already decoded.
State changes go in as data (`StateOp` values), so a journal row and the change it records can
be handed to the store together and committed in one transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


class StoreError(Exception):
    """The state database cannot be opened, read or written (damaged, locked, newer, not SQLite)."""


class LockHeld(StoreError):
    """Another live rkel process holds the run lock on this state database."""

    def __init__(
        self, pid: int, hostname: str, started_at: str, run_id: int | None, command: str
    ) -> None:
        self.pid = pid
        self.hostname = hostname
        self.started_at = started_at
        self.run_id = run_id
        self.command = command
        run = f", run {run_id}" if run_id is not None else ""
        super().__init__(
            f"the state is locked by pid {pid} on {hostname} since {started_at}"
            f" ({command or 'unknown command'}{run}); wait for it to finish, or stop it"
            " and retry"
        )


JOURNAL_PHASES = ("intent", "done", "failed", "note")
RUN_STATUSES = ("running", "done", "failed", "interrupted", "abandoned")
SNAPSHOT_KINDS = ("manual", "auto", "recurring")


def dumps(value: Any) -> str:
    """Canonical JSON text: sorted keys, no whitespace, so equal values give equal text."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"value is not JSON-serialisable: {exc}") from exc


def loads(text: str | None, default: Any = None) -> Any:
    """Decode a JSON column; NULL gives `default`."""
    if text is None:
        return default
    return json.loads(text)


@dataclass(frozen=True)
class NodeRow:
    """One node as last recorded."""

    name: str
    address: str
    internal_address: str
    port: int
    user: str
    roles: tuple[str, ...]
    state: str
    certs_hash: str | None
    labels: dict[str, Any]
    updated_at: str
    taints: tuple[tuple[str, str, str], ...] = ()

    @classmethod
    def from_db(cls, row: dict[str, Any]) -> NodeRow:
        """Build from a `nodes` row."""
        return cls(
            name=row["name"],
            address=row["address"],
            internal_address=row["internal_address"],
            port=int(row["port"]),
            user=row["user"],
            roles=tuple(loads(row["roles"], [])),
            state=row["state"],
            certs_hash=row["certs_hash"],
            labels=loads(row["labels"], {}),
            updated_at=row["updated_at"],
            taints=tuple(tuple(t) for t in loads(row.get("taints", "[]"), [])),  # type: ignore[misc]
        )


@dataclass(frozen=True)
class ServiceRow:
    """One service (container) on one node as last recorded."""

    node: str
    name: str
    state: str
    spec_hash: str | None
    image: str | None
    spec: dict[str, Any]
    updated_at: str

    @classmethod
    def from_db(cls, row: dict[str, Any]) -> ServiceRow:
        """Build from a `services` row."""
        return cls(
            node=row["node"],
            name=row["name"],
            state=row["state"],
            spec_hash=row["spec_hash"],
            image=row["image"],
            spec=loads(row["spec"], {}),
            updated_at=row["updated_at"],
        )


@dataclass(frozen=True)
class RunRow:
    """One run of a command that changes the cluster (apply, rollback, remove...)."""

    id: int
    kind: str
    status: str
    started_at: str
    finished_at: str | None
    plan: dict[str, Any]
    fingerprint: str
    error: str | None
    pid: int
    hostname: str
    command: str

    @classmethod
    def from_db(cls, row: dict[str, Any]) -> RunRow:
        """Build from a `runs` row."""
        return cls(
            id=row["id"],
            kind=row["kind"],
            status=row["status"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            plan=loads(row["plan_json"], {}),
            fingerprint=row["fingerprint"],
            error=row["error"],
            pid=row["pid"],
            hostname=row["hostname"],
            command=row["command"],
        )


@dataclass(frozen=True)
class JournalRow:
    """One append-only journal entry, chained to the previous one by hash."""

    seq: int
    run_id: int
    step_id: str
    phase: str
    at: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str

    @classmethod
    def from_db(cls, row: dict[str, Any]) -> JournalRow:
        """Build from a `journal` row."""
        return cls(
            seq=row["seq"],
            run_id=row["run_id"],
            step_id=row["step_id"],
            phase=row["phase"],
            at=row["at"],
            detail=loads(row["detail"], {}),
            prev_hash=row["prev_hash"],
            hash=row["hash"],
        )


@dataclass(frozen=True)
class SnapshotRow:
    """One etcd snapshot in the catalog, with what is needed to roll back to it."""

    name: str
    created_at: str
    run_id: int | None
    kind: str
    sha256: str
    size: int
    location: dict[str, Any]
    versions: dict[str, Any]
    config: dict[str, Any]
    status: str
    seal: str = ""  # see store.seal; checked by Store.catalogue_problems

    @classmethod
    def from_db(cls, row: dict[str, Any]) -> SnapshotRow:
        """Build from a `snapshots` row."""
        return cls(
            name=row["name"],
            created_at=row["created_at"],
            run_id=row["run_id"],
            kind=row["kind"],
            sha256=row["sha256"],
            size=row["size"],
            location=loads(row["location"], {}),
            versions=loads(row["versions"], {}),
            config=loads(row["config_json"], {}),
            status=row["status"],
            seal=row.get("seal") or "",
        )

    def sealed_fields(self) -> list[Any]:
        """What the row's seal covers: every column but the seal."""
        return [self.name, self.created_at, self.run_id, self.kind, self.sha256, self.size,
                self.location, self.versions, self.config, self.status]


@dataclass(frozen=True)
class CertificateRow:
    """A certificate and its private key, the key encrypted by the caller before storing."""

    name: str
    cert_pem: str
    key_encrypted: bytes | None = field(repr=False)
    created_at: str
    expires_at: str
    sans: tuple[str, ...]
    hash: str

    @classmethod
    def from_db(cls, row: dict[str, Any]) -> CertificateRow:
        """Build from a `certificates` row."""
        key = row["key_encrypted"]
        return cls(
            name=row["name"],
            cert_pem=row["cert_pem"],
            key_encrypted=bytes(key) if key is not None else None,
            created_at=row["created_at"],
            expires_at=row["expires_at"],
            sans=tuple(loads(row["sans"], [])),
            hash=row["hash"],
        )


@dataclass(frozen=True)
class KnownHostRow:
    """A pinned SSH host key."""

    host: str
    key_type: str
    fingerprint: str
    key_b64: str
    first_seen: str

    @classmethod
    def from_db(cls, row: dict[str, Any]) -> KnownHostRow:
        """Build from a `known_hosts` row."""
        return cls(
            host=row["host"],
            key_type=row["key_type"],
            fingerprint=row["fingerprint"],
            key_b64=row["key_b64"],
            first_seen=row["first_seen"],
        )


@dataclass(frozen=True)
class LockInfo:
    """Who holds (or held) the run lock."""

    pid: int
    hostname: str
    started_at: str
    run_id: int | None
    command: str

    @classmethod
    def from_db(cls, row: dict[str, Any]) -> LockInfo:
        """Build from the `lock` row."""
        return cls(
            pid=row["pid"],
            hostname=row["hostname"],
            started_at=row["started_at"],
            run_id=row["run_id"],
            command=row["command"],
        )


# --- state operations -------------------------------------------------------------------------

NODE_FIELDS = (
    "address", "internal_address", "port", "user", "roles", "state", "certs_hash", "labels", "taints",
)
SERVICE_FIELDS = ("state", "spec_hash", "image", "spec")


@dataclass(frozen=True)
class UpsertNode:
    """Create the node if absent, then set the given fields (others keep their values)."""

    name: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class DeleteNode:
    """Forget a node and, by cascade, its services."""

    name: str


@dataclass(frozen=True)
class UpsertService:
    """Create the service if absent (its node must exist), then set the given fields."""

    node: str
    name: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class DeleteService:
    """Forget one service of one node."""

    node: str
    name: str


@dataclass(frozen=True)
class SetMeta:
    """Set one cluster-level key (name, desired_json, desired_fingerprint...) to a JSON value."""

    key: str
    value: Any


@dataclass(frozen=True)
class PutCertificate:
    """Store (or replace) a certificate; `key_encrypted` must already be encrypted."""

    name: str
    cert_pem: str
    key_encrypted: bytes | None = field(repr=False)
    expires_at: str = ""
    sans: tuple[str, ...] = ()
    hash: str = ""


@dataclass(frozen=True)
class DeleteCertificate:
    """Forget one certificate and its key (a CA dropped at the end of a CA rotation)."""

    name: str


StateOp = (UpsertNode | DeleteNode | UpsertService | DeleteService | SetMeta | PutCertificate
           | DeleteCertificate)
