"""Catalog-like tables of `Store`: the run lock, snapshots, certificates, pinned host keys.

These change rarely and never as part of a journaled step (certificates can: see PutCertificate).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from store.base import StoreBase, now
from store.ops import apply_op
from store.seal import seal, seal_problem
from store.rows import (
    SNAPSHOT_KINDS,
    CertificateRow,
    KnownHostRow,
    LockHeld,
    LockInfo,
    PutCertificate,
    SnapshotRow,
    StoreError,
    dumps,
)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class CatalogStore(StoreBase):
    """The lock, snapshot catalog, certificates and known hosts of a state database."""

    # --- lock ----------------------------------------------------------------------------------

    def acquire_lock(self, run_id: int | None, command: str) -> LockInfo | None:
        """Take the run lock; return the stale holder taken over (dead pid, this host) or None.

        :raises LockHeld: the holder is alive, or on another host where liveness is unknowable.
        """
        host, pid = socket.gethostname(), os.getpid()
        with self._write("taking the run lock") as conn:
            row = conn.execute(
                "SELECT pid, hostname, started_at, run_id, command FROM lock WHERE id = 1"
            ).fetchone()
            stale: LockInfo | None = None
            if row is not None:
                holder = LockInfo(*row)
                if holder.hostname == host and not _pid_alive(holder.pid):
                    stale = holder
                else:
                    raise LockHeld(
                        holder.pid,
                        holder.hostname,
                        holder.started_at,
                        holder.run_id,
                        holder.command,
                    )
            conn.execute(
                "INSERT OR REPLACE INTO lock (id, pid, hostname, started_at, run_id, command)"
                " VALUES (1, ?, ?, ?, ?, ?)",
                [pid, host, now(), run_id, command],
            )
        return stale

    def set_lock_run(self, run_id: int | None) -> None:
        """Record which run the lock this process holds is for."""
        with self._write("updating the run lock") as conn:
            cur = conn.execute(
                "UPDATE lock SET run_id = ? WHERE id = 1 AND pid = ? AND hostname = ?",
                [run_id, os.getpid(), socket.gethostname()],
            )
            if cur.rowcount != 1:
                raise StoreError("this process does not hold the run lock")

    def release_lock(self) -> bool:
        """Release the run lock if this process holds it; return whether it did."""
        with self._write("releasing the run lock") as conn:
            cur = conn.execute(
                "DELETE FROM lock WHERE id = 1 AND pid = ? AND hostname = ?",
                [os.getpid(), socket.gethostname()],
            )
            return cur.rowcount == 1

    def break_lock(self) -> LockInfo | None:
        """Remove the run lock whoever holds it (an operator's decision); return the holder."""
        with self._write("breaking the run lock") as conn:
            row = conn.execute(
                "SELECT pid, hostname, started_at, run_id, command FROM lock WHERE id = 1"
            ).fetchone()
            conn.execute("DELETE FROM lock WHERE id = 1")
        return LockInfo(*row) if row else None

    def lock_holder(self) -> LockInfo | None:
        """Who holds the run lock, or None."""
        row = self._query_one("SELECT * FROM lock WHERE id = 1")
        return LockInfo.from_db(row) if row else None

    # --- snapshot catalog ----------------------------------------------------------------------

    def add_snapshot(
        self,
        name: str,
        *,
        kind: str,
        sha256: str,
        size: int,
        location: Mapping[str, Any],
        versions: Mapping[str, Any],
        config: Mapping[str, Any],
        run_id: int | None = None,
        status: str = "ok",
        created_at: str | None = None,
    ) -> SnapshotRow:
        """Catalog a snapshot; refused if the name is taken.

        :param created_at: when it was taken (ISO 8601, UTC), if not now: a recurring
            snapshot is catalogued after the fact.
        """
        if kind not in SNAPSHOT_KINDS:
            raise ValueError(f"snapshot kind must be one of {SNAPSHOT_KINDS}, not {kind!r}")
        created = created_at or now()
        fields = [name, created, run_id, kind, sha256, size, dict(location), dict(versions),
                  dict(config), status]
        values = [*fields[:6], *(dumps(v) for v in fields[6:9]), status,
                  seal(fields, self._seal_key())]
        with self._write(f"cataloguing snapshot {name}") as conn:
            if conn.execute("SELECT 1 FROM snapshots WHERE name = ?", [name]).fetchone():
                raise StoreError(f"a snapshot named {name!r} already exists; pick another name")
            conn.execute(
                "INSERT INTO snapshots (name, created_at, run_id, kind, sha256, size, location,"
                " versions, config_json, status, seal) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
        row = self.snapshot(name)
        assert row is not None
        return row

    def set_snapshot_status(self, name: str, status: str) -> None:
        """Record a snapshot's status (e.g. after verifying it), sealing the row again, unless
        its seal was already broken: an edited row must not be blessed by the next update."""
        key = self._seal_key()
        with self._write(f"updating snapshot {name}") as conn:
            row = self._snapshot_in(conn, name)
            if row is None:
                raise StoreError(f"no snapshot named {name!r}")
            sealed = row.seal
            if seal_problem(row.seal, row.sealed_fields(), key) is None:
                sealed = seal([*row.sealed_fields()[:-1], status], key)
            conn.execute(
                "UPDATE snapshots SET status = ?, seal = ? WHERE name = ?", [status, sealed, name]
            )

    def catalogue_problems(self, name: str | None = None) -> list[str]:
        """Why catalogue rows (of one snapshot when given) cannot be trusted; empty when every
        seal holds. A restore must refuse a snapshot listed here."""
        key = self._seal_key()
        rows = self.snapshots() if name is None else [r for r in [self.snapshot(name)] if r]
        problems = []
        for row in rows:
            why = seal_problem(row.seal, row.sealed_fields(), key)
            if why is not None:
                problems.append(f"snapshot {row.name}: its catalogue row {why}")
        return problems

    def _snapshot_in(self, conn: Any, name: str) -> SnapshotRow | None:
        cur = conn.execute("SELECT * FROM snapshots WHERE name = ?", [name])
        found = cur.fetchone()
        if found is None:
            return None
        return SnapshotRow.from_db(dict(zip([c[0] for c in cur.description], found)))

    def snapshots(self) -> list[SnapshotRow]:
        """Every cataloged snapshot, oldest first (ties by name)."""
        rows = self._query("SELECT * FROM snapshots ORDER BY created_at, name")
        return [SnapshotRow.from_db(r) for r in rows]

    def snapshot(self, name: str) -> SnapshotRow | None:
        """One snapshot by name, or None."""
        row = self._query_one("SELECT * FROM snapshots WHERE name = ?", [name])
        return SnapshotRow.from_db(row) if row else None

    def delete_snapshot(self, name: str) -> bool:
        """Remove a snapshot from the catalog (not its file); return whether it existed."""
        with self._write(f"deleting snapshot {name}") as conn:
            return conn.execute("DELETE FROM snapshots WHERE name = ?", [name]).rowcount == 1

    # --- certificates and host keys ------------------------------------------------------------

    def put_certificate(
        self,
        name: str,
        cert_pem: str,
        key_encrypted: bytes | None,
        *,
        expires_at: str = "",
        sans: Sequence[str] = (),
        hash: str = "",
    ) -> None:
        """Store or replace a certificate; the key must already be encrypted by the caller."""
        op = PutCertificate(name, cert_pem, key_encrypted, expires_at, tuple(sans), hash)
        with self._write(f"storing certificate {name}") as conn:
            apply_op(conn, op, now())

    def certificate(self, name: str) -> CertificateRow | None:
        """One certificate by name, or None."""
        row = self._query_one("SELECT * FROM certificates WHERE name = ?", [name])
        return CertificateRow.from_db(row) if row else None

    def certificates(self) -> list[CertificateRow]:
        """Every certificate, sorted by name."""
        rows = self._query("SELECT * FROM certificates ORDER BY name")
        return [CertificateRow.from_db(r) for r in rows]

    def put_known_host(
        self, host: str, key_type: str, key_b64: str, fingerprint: str, *, replace: bool = False
    ) -> KnownHostRow:
        """Pin a host key; a different key already pinned is refused unless `replace`."""
        with self._write(f"pinning the host key of {host}") as conn:
            old = conn.execute(
                "SELECT key_type, key_b64 FROM known_hosts WHERE host = ?", [host]
            ).fetchone()
            if old is not None and tuple(old) != (key_type, key_b64) and not replace:
                raise StoreError(
                    f"{host} already has a different pinned host key ({old[0]}); if the host was"
                    " rebuilt, remove the old key explicitly"
                )
            if old is None or replace:
                conn.execute(
                    "INSERT OR REPLACE INTO known_hosts (host, key_type, fingerprint, key_b64,"
                    " first_seen) VALUES (?, ?, ?, ?, ?)",
                    [host, key_type, fingerprint, key_b64, now()],
                )
        row = self.known_host(host)
        assert row is not None
        return row

    def known_host(self, host: str) -> KnownHostRow | None:
        """The pinned key of one host, or None."""
        row = self._query_one("SELECT * FROM known_hosts WHERE host = ?", [host])
        return KnownHostRow.from_db(row) if row else None

    def known_hosts(self) -> list[KnownHostRow]:
        """Every pinned host key, sorted by host."""
        rows = self._query("SELECT * FROM known_hosts ORDER BY host")
        return [KnownHostRow.from_db(r) for r in rows]

    def delete_known_host(self, host: str) -> bool:
        """Unpin a host key; return whether one was pinned."""
        with self._write(f"unpinning the host key of {host}") as conn:
            return conn.execute("DELETE FROM known_hosts WHERE host = ?", [host]).rowcount == 1
