"""The journal's hash chain: how a row's hash is computed and how a whole journal is checked.

Each row's hash covers the previous row's hash, so editing, removing or reordering any row
breaks every check after it. Pure functions over row values; no database access here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

GENESIS_HASH = ""


def row_hash(prev_hash: str, seq: int, run_id: int, step_id: str, phase: str, detail: str) -> str:
    """sha256 over (prev_hash, seq, run_id, step_id, phase, detail text), framed as JSON."""
    framed = json.dumps([prev_hash, seq, run_id, step_id, phase, detail], separators=(",", ":"))
    return hashlib.sha256(framed.encode("utf-8")).hexdigest()


def verify_rows(rows: Iterable[dict[str, Any]], last_assigned_seq: int | None = None) -> list[str]:
    """Check raw journal rows (ordered by seq); one message per broken row, empty when intact.

    `last_assigned_seq` is the highest seq SQLite ever handed out (sqlite_sequence); when the
    last rows are gone it is higher than the last seq present.
    """
    problems: list[str] = []
    expected_seq = 1
    prev_hash = GENESIS_HASH
    for row in rows:
        seq = row["seq"]
        if seq != expected_seq:
            problems.append(f"journal seq {seq}: gap, rows {expected_seq}..{seq - 1} are missing")
        elif row["prev_hash"] != prev_hash:
            problems.append(f"journal seq {seq}: broken chain, prev_hash is not seq {seq - 1}'s")
        expected = row_hash(
            row["prev_hash"], seq, row["run_id"], row["step_id"], row["phase"], row["detail"]
        )
        if row["hash"] != expected:
            problems.append(f"journal seq {seq}: hash mismatch, the row was changed after writing")
        expected_seq = seq + 1
        prev_hash = row["hash"]
    if last_assigned_seq is not None and last_assigned_seq >= expected_seq:
        problems.append(
            f"journal: rows {expected_seq}..{last_assigned_seq} were written and are missing"
        )
    return problems
