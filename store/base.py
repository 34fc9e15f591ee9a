"""The plumbing under `Store`: opening, migrating, transactions, reads, closing.

Every write runs in its own `BEGIN IMMEDIATE` transaction under one re-entrant thread lock, so
the executor's worker threads can share one connection. PRAGMA synchronous=FULL in WAL mode
means a committed row survives kill -9 and power loss; an uncommitted one is simply not there.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sqlite_utils import Database

from store.rows import StoreError
from store.schema import KNOWN_MIGRATIONS, MIGRATIONS_TABLE, migrations

DEFAULT_BUSY_TIMEOUT_MS = 10_000


def default_state_path(config_path: str | os.PathLike[str]) -> Path:
    """Where the state of a cluster lives by default: `<config dir>/<config stem>.rkel.db`.

    `cluster.yml` -> `cluster.rkel.db`, `/srv/prod/edge.yaml` -> `/srv/prod/edge.rkel.db`.
    """
    config = Path(config_path)
    return config.with_name(f"{config.stem}.rkel.db")


def now() -> str:
    """The current UTC time as ISO 8601 text, the format of every timestamp in the store."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


class StoreBase:
    """Connection, transactions and schema; the tables' methods live in subclasses."""

    def __init__(
        self,
        db: Database,
        path: Path,
        after_journal_write: Callable[[int], None] | None = None,
    ) -> None:
        """Wrap an already configured and migrated database; use `Store.open` instead."""
        self._db = db
        self._conn = db.conn
        self.path = path
        self._after_journal_write = after_journal_write
        self._lock = threading.RLock()
        self._journal_writes = 0
        self._closed = False

    # --- opening and closing -------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        after_journal_write: Callable[[int], None] | None = None,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    ) -> Self:
        """Open (creating if needed) the state database at `path` and bring its schema up to date.

        :param after_journal_write: called with the count of journal rows this Store has written,
          right after each journal commit (crash-injection hook for tests).
        :param busy_timeout_ms: how long to wait for another process's write to finish.
        """
        db_path = Path(path)
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                str(db_path), timeout=busy_timeout_ms / 1000, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open state database {db_path}: {exc}") from exc
        try:
            db = Database(conn, execute_plugins=False)
            db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            db.execute("PRAGMA foreign_keys = ON")
            _check_compatible(db, db_path)  # before enable_wal changes a file that is not ours
            db.enable_wal()
            db.execute("PRAGMA synchronous = FULL")
            if db.journal_mode != "wal":
                raise StoreError(
                    f"{db_path}: SQLite refused WAL mode (journal_mode={db.journal_mode});"
                    " put the state on a local filesystem"
                )
            _migrate(db, db_path)
        except sqlite3.DatabaseError as exc:
            conn.close()
            if "not a database" in str(exc) or "encrypted" in str(exc):
                raise StoreError(
                    f"{db_path} is not an rkel state database (not a SQLite file);"
                    " point --state at the right file or move this one away"
                ) from exc
            raise StoreError(f"cannot open state database {db_path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return cls(db, db_path, after_journal_write)

    def close(self) -> None:
        """Close the database connection; further calls raise StoreError."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Store {self.path}{' (closed)' if self._closed else ''}>"

    # --- plumbing ------------------------------------------------------------------------------

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken with BEGIN IMMEDIATE under the thread lock."""
        with self._lock:
            self._check_open()
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"{what}: cannot start a transaction: {exc}") from exc
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException as exc:
                if self._conn.in_transaction:
                    try:
                        self._conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"{what} failed: {exc}") from exc
                raise

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            self._check_open()
            try:
                return list(self._db.query(sql, list(params)))
            except sqlite3.Error as exc:
                raise StoreError(f"reading the state database failed: {exc}") from exc

    def _query_one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self._query(sql, params)
        return rows[0] if rows else None

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"state database {self.path} is closed")

    # --- schema and health ---------------------------------------------------------------------

    def migrations_applied(self) -> list[str]:
        """Names of the migrations recorded in this database, in the order applied."""
        with self._lock:
            self._check_open()
            return [m.name for m in migrations.applied(self._db)]

    def integrity_check(self) -> str:
        """SQLite's PRAGMA integrity_check result ("ok" when the file is sound)."""
        rows = self._query("PRAGMA integrity_check")
        return "\n".join(str(next(iter(r.values()))) for r in rows)

    def settings(self) -> dict[str, Any]:
        """The connection's journal_mode, synchronous, foreign_keys and busy_timeout pragmas."""
        names = ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
        with self._lock:
            self._check_open()
            return {n: self._conn.execute(f"PRAGMA {n}").fetchone()[0] for n in names}


def _check_compatible(db: Database, path: Path) -> None:
    """Refuse a database made by a newer rkel, or a SQLite file that is not rkel state at all."""
    applied = [m.name for m in migrations.applied(db)]
    unknown = [name for name in applied if name not in KNOWN_MIGRATIONS]
    if unknown:
        raise StoreError(
            f"{path} was made by a newer rkel (unknown migrations: {', '.join(unknown)});"
            " upgrade rkel to use this state"
        )
    if not applied:
        foreign = [t for t in db.table_names() if t != MIGRATIONS_TABLE]
        if foreign:
            raise StoreError(
                f"{path} is a SQLite database but not an rkel state database (it has tables"
                f" {', '.join(sorted(foreign)[:5])}); point --state at the right file"
            )


def _migrate(db: Database, path: Path) -> None:
    """Apply pending migrations in one IMMEDIATE transaction (re-checking under the lock)."""
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        _check_compatible(db, path)
        migrations.apply(db)
        db.conn.execute("COMMIT")
    except BaseException:
        if db.conn.in_transaction:
            db.conn.execute("ROLLBACK")
        raise
