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

from store.journal import verify_rows
from store.rows import StoreError
from store.schema import KNOWN_MIGRATIONS, MIGRATIONS_TABLE, migrations
from store.seal import find_state_key, seal_key

DEFAULT_BUSY_TIMEOUT_MS = 10_000
JOURNAL_TRIGGERS = ("journal_no_update", "journal_no_delete")


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
        state_key: bytes | None = None,
    ) -> None:
        """Wrap an already configured and migrated database; use `Store.open` instead."""
        self._db = db
        self._conn = db.conn
        self.path = path
        self._after_journal_write = after_journal_write
        self._state_key = state_key
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
        check_journal: bool = True,
        state_key: bytes | None = None,
    ) -> Self:
        """Open (creating if needed) the state database at `path` and bring its schema up to date.

        :param after_journal_write: called with the count of journal rows this Store has written,
          right after each journal commit (crash-injection hook for tests).
        :param busy_timeout_ms: how long to wait for another process's write to finish.
        :param check_journal: refuse (JournalBroken) a database whose journal hash chain is
          broken; off only for `rkel state verify`, which reports instead of refusing.
        :param state_key: the state key that seals snapshot catalogue rows (default: found
          where lifecycle.pki_key keeps it, see `store.seal.find_state_key`).
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
            if check_journal:
                _check_journal(db, db_path)
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
        return cls(db, db_path, after_journal_write, state_key)

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

    def _seal_key(self) -> bytes | None:
        """The catalogue seal key, from the state key given at open or found beside the state
        now (it may be created after the store was opened)."""
        state_key = self._state_key or find_state_key(self.path)
        return seal_key(state_key) if state_key else None

    def integrity_check(self) -> str:
        """SQLite's PRAGMA integrity_check result ("ok" when the file is sound)."""
        rows = self._query("PRAGMA integrity_check")
        return "\n".join(str(next(iter(r.values()))) for r in rows)

    def missing_journal_triggers(self) -> list[str]:
        """The journal's append-only triggers (migration 0002) that are gone from the schema."""
        rows = self._query("SELECT name FROM sqlite_master WHERE type = 'trigger'")
        present = {r["name"] for r in rows}
        return [t for t in JOURNAL_TRIGGERS if t not in present]

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


class JournalBroken(StoreError):
    """The journal's hash chain is broken: rows were edited, removed or reordered outside rkel."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path  # not in the message: callers prefix the path already
        self.problems = problems
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        super().__init__(
            f"the journal was changed outside rkel: {problems[0]}{more}. rkel does not"
            " trust this state (the journal decides what `apply --resume` redoes). Run `rkel"
            " state verify` to see every problem, then restore the state file from a backup"
            " (`rkel snapshot save` keeps one, <snapshot>.rkel.db, beside each snapshot)"
        )


def _check_journal(db: Database, path: Path) -> None:
    rows = list(db.query("SELECT * FROM journal ORDER BY seq"))
    issued = list(db.query("SELECT seq FROM sqlite_sequence WHERE name = 'journal'"))
    problems = verify_rows(rows, issued[0]["seq"] if issued else None)
    if problems:
        raise JournalBroken(path, problems)


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
