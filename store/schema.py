"""The state database's schema as named, append-only migrations.

Never edit or reorder a migration that has shipped: add a new one at the end. Every migration
applied is recorded by name in `_sqlite_migrations` (sqlite-utils' own table); a database that
records a name this module does not know was written by a newer rkel and is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlite_utils import Database, Migrations

_Fn = TypeVar("_Fn", bound=Callable[[Database], None])

MIGRATION_SET = "rkel"
MIGRATIONS_TABLE = Migrations.migrations_table

migrations = Migrations(MIGRATION_SET)
KNOWN_MIGRATIONS: list[str] = []


def _migration(name: str) -> Callable[[_Fn], _Fn]:
    """Register a migration under `name`, remembering the name for the newer-rkel check."""
    KNOWN_MIGRATIONS.append(name)
    return migrations(name=name)


def _run(db: Database, statements: list[str]) -> None:
    for sql in statements:
        db.execute(sql)


@_migration("0001_initial_schema")
def _initial_schema(db: Database) -> None:
    _run(
        db,
        [
            """CREATE TABLE cluster (
                key TEXT PRIMARY KEY,
                value TEXT NOT NULL
            )""",
            """CREATE TABLE nodes (
                name TEXT PRIMARY KEY,
                address TEXT NOT NULL DEFAULT '',
                internal_address TEXT NOT NULL DEFAULT '',
                port INTEGER NOT NULL DEFAULT 22,
                user TEXT NOT NULL DEFAULT '',
                roles TEXT NOT NULL DEFAULT '[]',
                state TEXT NOT NULL DEFAULT 'absent',
                certs_hash TEXT,
                labels TEXT NOT NULL DEFAULT '{}',
                updated_at TEXT NOT NULL
            )""",
            """CREATE TABLE services (
                node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
                name TEXT NOT NULL,
                state TEXT NOT NULL DEFAULT 'absent',
                spec_hash TEXT,
                image TEXT,
                spec TEXT NOT NULL DEFAULT '{}',
                updated_at TEXT NOT NULL,
                PRIMARY KEY (node, name)
            )""",
            """CREATE TABLE runs (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                kind TEXT NOT NULL,
                status TEXT NOT NULL CHECK (status IN
                    ('running', 'done', 'failed', 'interrupted', 'abandoned')),
                started_at TEXT NOT NULL,
                finished_at TEXT,
                plan_json TEXT NOT NULL DEFAULT '{}',
                fingerprint TEXT NOT NULL DEFAULT '',
                error TEXT,
                pid INTEGER NOT NULL,
                hostname TEXT NOT NULL,
                command TEXT NOT NULL DEFAULT ''
            )""",
            # At most one run can be unfinished: resuming is only unambiguous that way.
            """CREATE UNIQUE INDEX runs_one_unfinished ON runs ((1))
                WHERE status IN ('running', 'interrupted')""",
            """CREATE TABLE journal (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                run_id INTEGER NOT NULL REFERENCES runs(id),
                step_id TEXT NOT NULL,
                phase TEXT NOT NULL CHECK (phase IN ('intent', 'done', 'failed', 'note')),
                at TEXT NOT NULL,
                detail TEXT NOT NULL DEFAULT '{}',
                prev_hash TEXT NOT NULL,
                hash TEXT NOT NULL
            )""",
            "CREATE INDEX journal_run ON journal (run_id, seq)",
            """CREATE TABLE snapshots (
                name TEXT PRIMARY KEY,
                created_at TEXT NOT NULL,
                run_id INTEGER REFERENCES runs(id),
                kind TEXT NOT NULL CHECK (kind IN ('manual', 'auto')),
                sha256 TEXT NOT NULL DEFAULT '',
                size INTEGER NOT NULL DEFAULT 0,
                location TEXT NOT NULL DEFAULT '{}',
                versions TEXT NOT NULL DEFAULT '{}',
                config_json TEXT NOT NULL DEFAULT '{}',
                status TEXT NOT NULL DEFAULT 'ok'
            )""",
            """CREATE TABLE known_hosts (
                host TEXT PRIMARY KEY,
                key_type TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                key_b64 TEXT NOT NULL,
                first_seen TEXT NOT NULL
            )""",
            """CREATE TABLE certificates (
                name TEXT PRIMARY KEY,
                cert_pem TEXT NOT NULL,
                key_encrypted BLOB,
                created_at TEXT NOT NULL,
                expires_at TEXT NOT NULL DEFAULT '',
                sans TEXT NOT NULL DEFAULT '[]',
                hash TEXT NOT NULL DEFAULT ''
            )""",
            """CREATE TABLE lock (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                pid INTEGER NOT NULL,
                hostname TEXT NOT NULL,
                started_at TEXT NOT NULL,
                run_id INTEGER,
                command TEXT NOT NULL DEFAULT ''
            )""",
        ],
    )


@_migration("0002_journal_append_only")
def _journal_append_only(db: Database) -> None:
    # The journal is evidence of what happened; a row, once written, is never changed.
    _run(
        db,
        [
            """CREATE TRIGGER journal_no_update BEFORE UPDATE ON journal
               BEGIN SELECT RAISE(ABORT, 'journal is append-only: rows cannot be updated'); END""",
            """CREATE TRIGGER journal_no_delete BEFORE DELETE ON journal
               BEGIN SELECT RAISE(ABORT, 'journal is append-only: rows cannot be deleted'); END""",
        ],
    )


@_migration("0003_node_taints")
def _node_taints(db: Database) -> None:
    # What rkel last applied to the Kubernetes Node: `labels` (a dict) and now `taints`, a list
    # of [key, value, effect].
    _run(db, ["ALTER TABLE nodes ADD COLUMN taints TEXT NOT NULL DEFAULT '[]'"])


@_migration("0004_snapshot_seal")
def _snapshot_seal(db: Database) -> None:
    # An HMAC over each catalogue row (store.seal): an edited checksum is found, not trusted.
    # Rows from before stay unsealed and are reported as such.
    _run(db, ["ALTER TABLE snapshots ADD COLUMN seal TEXT NOT NULL DEFAULT ''"])


@_migration("0005_recurring_snapshot_kind")
def _recurring_snapshot_kind(db: Database) -> None:
    # A file of the etcd-rolling-snapshots container, catalogued so it can be restored: kind
    # 'recurring'. SQLite cannot change a CHECK constraint in place, so the table is rebuilt
    # (same columns, same rows, same seals).
    _run(
        db,
        [
            """CREATE TABLE snapshots_0005 (
                name TEXT PRIMARY KEY,
                created_at TEXT NOT NULL,
                run_id INTEGER REFERENCES runs(id),
                kind TEXT NOT NULL CHECK (kind IN ('manual', 'auto', 'recurring')),
                sha256 TEXT NOT NULL DEFAULT '',
                size INTEGER NOT NULL DEFAULT 0,
                location TEXT NOT NULL DEFAULT '{}',
                versions TEXT NOT NULL DEFAULT '{}',
                config_json TEXT NOT NULL DEFAULT '{}',
                status TEXT NOT NULL DEFAULT 'ok',
                seal TEXT NOT NULL DEFAULT ''
            )""",
            """INSERT INTO snapshots_0005 (name, created_at, run_id, kind, sha256, size, location,
                                           versions, config_json, status, seal)
               SELECT name, created_at, run_id, kind, sha256, size, location, versions,
                      config_json, status, seal FROM snapshots""",
            "DROP TABLE snapshots",
            "ALTER TABLE snapshots_0005 RENAME TO snapshots",
        ],
    )
