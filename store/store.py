"""`Store`: one cluster's state database: nodes, services, meta, runs and the journal.

A journal row and the state operations it records commit in one transaction; the
`after_journal_write` hook runs after that commit so tests can "die" at any journal write.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from store.base import default_state_path, now
from store.catalog import CatalogStore
from store.journal import GENESIS_HASH, row_hash, verify_rows
from store.ops import apply_op
from store.rows import (
    JOURNAL_PHASES,
    JournalRow,
    NodeRow,
    RunRow,
    ServiceRow,
    SetMeta,
    StateOp,
    StoreError,
    dumps,
    loads,
)

__all__ = ["Store", "default_state_path"]

_UNFINISHED = ("running", "interrupted")
_FINAL = ("done", "failed", "abandoned")


class Store(CatalogStore):
    """A cluster's state: nodes, services, runs, journal, snapshot catalog, certificates, lock.

    Open with `Store.open(path)`; use as a context manager or call `close()`.
    """

    # --- state ---------------------------------------------------------------------------------

    def apply_ops(self, ops: Iterable[StateOp]) -> None:
        """Apply state operations in one transaction: all of them or none."""
        ops = list(ops)
        at = now()
        with self._write("state update") as conn:
            for op in ops:
                apply_op(conn, op, at)

    def nodes(self) -> list[NodeRow]:
        """Every node, sorted by name."""
        return [NodeRow.from_db(r) for r in self._query("SELECT * FROM nodes ORDER BY name")]

    def node(self, name: str) -> NodeRow | None:
        """One node by name, or None."""
        row = self._query_one("SELECT * FROM nodes WHERE name = ?", [name])
        return NodeRow.from_db(row) if row else None

    def services(self, node: str | None = None) -> list[ServiceRow]:
        """Every service (of one node when given), sorted by (node, name)."""
        if node is None:
            rows = self._query("SELECT * FROM services ORDER BY node, name")
        else:
            rows = self._query("SELECT * FROM services WHERE node = ? ORDER BY name", [node])
        return [ServiceRow.from_db(r) for r in rows]

    def service(self, node: str, name: str) -> ServiceRow | None:
        """One service by node and name, or None."""
        row = self._query_one("SELECT * FROM services WHERE node = ? AND name = ?", [node, name])
        return ServiceRow.from_db(row) if row else None

    def get_meta(self, key: str, default: Any = None) -> Any:
        """A cluster-level value (JSON-decoded), or `default` when unset."""
        row = self._query_one("SELECT value FROM cluster WHERE key = ?", [key])
        return loads(row["value"]) if row else default

    def set_meta(self, key: str, value: Any) -> None:
        """Set a cluster-level value (stored as JSON)."""
        self.apply_ops([SetMeta(key, value)])

    def meta(self) -> dict[str, Any]:
        """Every cluster-level value, keys sorted."""
        rows = self._query("SELECT key, value FROM cluster ORDER BY key")
        return {r["key"]: loads(r["value"]) for r in rows}

    # --- journal -------------------------------------------------------------------------------

    def write_journal(
        self,
        run_id: int,
        step_id: str,
        phase: str,
        detail: Mapping[str, Any] | None = None,
        ops: Iterable[StateOp] = (),
    ) -> int:
        """Append a journal row and apply `ops` in one transaction; return the row's seq.

        After the commit, `after_journal_write(count)` runs (count = journal rows written by this
        Store, 1-based); whatever it raises propagates, and the committed row stays.
        """
        if phase not in JOURNAL_PHASES:
            raise ValueError(f"journal phase must be one of {JOURNAL_PHASES}, not {phase!r}")
        detail_text = dumps(dict(detail or {}))
        ops = list(ops)
        at = now()
        with self._lock:
            with self._write(f"journal write ({step_id} {phase})") as conn:
                last = conn.execute(
                    "SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1"
                ).fetchone()
                issued = conn.execute(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'journal'"
                ).fetchone()
                seq = max(last[0] if last else 0, issued[0] if issued else 0) + 1
                prev_hash = last[1] if last else GENESIS_HASH
                conn.execute(
                    "INSERT INTO journal (seq, run_id, step_id, phase, at, detail, prev_hash, hash)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        seq,
                        run_id,
                        step_id,
                        phase,
                        at,
                        detail_text,
                        prev_hash,
                        row_hash(prev_hash, seq, run_id, step_id, phase, detail_text),
                    ],
                )
                for op in ops:
                    apply_op(conn, op, at)
            self._journal_writes += 1
            count = self._journal_writes
        if self._after_journal_write is not None:
            self._after_journal_write(count)
        return seq

    def journal(self, run_id: int | None = None) -> list[JournalRow]:
        """Journal rows (of one run when given), sorted by seq."""
        if run_id is None:
            rows = self._query("SELECT * FROM journal ORDER BY seq")
        else:
            rows = self._query("SELECT * FROM journal WHERE run_id = ? ORDER BY seq", [run_id])
        return [JournalRow.from_db(r) for r in rows]

    def verify_journal(self) -> list[str]:
        """Check the journal's hash chain; one message per broken row, empty when intact."""
        with self._lock:
            rows = self._query("SELECT * FROM journal ORDER BY seq")
            issued = self._query_one("SELECT seq FROM sqlite_sequence WHERE name = 'journal'")
        return verify_rows(rows, issued["seq"] if issued else None)

    # --- runs ----------------------------------------------------------------------------------

    def start_run(self, kind: str, plan: Mapping[str, Any], fingerprint: str, command: str) -> int:
        """Record a new running run (this pid and hostname); refused while another is unfinished."""
        plan_text = dumps(dict(plan))
        with self._write("starting a run") as conn:
            other = conn.execute(
                "SELECT id, kind, status FROM runs WHERE status IN (?, ?)", _UNFINISHED
            ).fetchone()
            if other:
                raise StoreError(
                    f"run {other[0]} ({other[1]}) is {other[2]}; resume it with"
                    " `rkel apply --resume` or abandon it first"
                )
            cur = conn.execute(
                "INSERT INTO runs (kind, status, started_at, plan_json, fingerprint, pid,"
                " hostname, command) VALUES (?, 'running', ?, ?, ?, ?, ?, ?)",
                [kind, now(), plan_text, fingerprint, os.getpid(), socket.gethostname(), command],
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def finish_run(self, run_id: int, status: str, error: str | None = None) -> None:
        """End a run as done, failed, abandoned or interrupted (the last keeps it resumable)."""
        if status not in (*_FINAL, "interrupted"):
            raise ValueError(f"a run ends done, failed, abandoned or interrupted, not {status!r}")
        with self._write(f"finishing run {run_id}") as conn:
            row = conn.execute("SELECT status FROM runs WHERE id = ?", [run_id]).fetchone()
            if row is None:
                raise StoreError(f"no run {run_id} in {self.path}")
            if row[0] not in _UNFINISHED:
                raise StoreError(f"run {run_id} already ended as {row[0]}")
            if status == "interrupted" and row[0] != "running":
                return
            conn.execute(
                "UPDATE runs SET status = ?, finished_at = ?, error = ? WHERE id = ?",
                [status, None if status == "interrupted" else now(), error, run_id],
            )

    def mark_interrupted(self, run_id: int) -> None:
        """Mark a running run interrupted (stopped before the end, resumable)."""
        self.finish_run(run_id, "interrupted")

    def resume_run(self, run_id: int) -> RunRow:
        """Make an unfinished run running again, owned by this process; return it."""
        with self._write(f"resuming run {run_id}") as conn:
            cur = conn.execute(
                "UPDATE runs SET status = 'running', pid = ?, hostname = ?, error = NULL"
                " WHERE id = ? AND status IN (?, ?)",
                [os.getpid(), socket.gethostname(), run_id, *_UNFINISHED],
            )
            if cur.rowcount != 1:
                raise StoreError(f"run {run_id} is not unfinished; there is nothing to resume")
        run = self.run(run_id)
        assert run is not None
        return run

    def run(self, run_id: int) -> RunRow | None:
        """One run by id, or None."""
        row = self._query_one("SELECT * FROM runs WHERE id = ?", [run_id])
        return RunRow.from_db(row) if row else None

    def runs(self) -> list[RunRow]:
        """Every run, newest first."""
        return [RunRow.from_db(r) for r in self._query("SELECT * FROM runs ORDER BY id DESC")]

    def unfinished_run(self) -> RunRow | None:
        """The run that is running or interrupted (at most one exists), or None."""
        row = self._query_one(
            "SELECT * FROM runs WHERE status IN (?, ?) ORDER BY id DESC LIMIT 1", _UNFINISHED
        )
        return RunRow.from_db(row) if row else None
