"""How each `StateOp` becomes SQL, inside a transaction the caller already opened.

Column names are checked against a fixed list before they reach SQL, so a misspelt field is a
ValueError here rather than a silently ignored key or an injected identifier.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from store.rows import (
    NODE_FIELDS,
    SERVICE_FIELDS,
    DeleteCertificate,
    DeleteNode,
    DeleteService,
    PutCertificate,
    SetMeta,
    StateOp,
    UpsertNode,
    UpsertService,
    dumps,
)

_NODE_JSON = {"roles": list, "labels": dict, "taints": list}
_SERVICE_JSON = {"spec": dict}


def _encode(
    fields: Mapping[str, Any], allowed: Sequence[str], json_cols: Mapping[str, type], what: str
) -> dict[str, Any]:
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {unknown}; allowed: {list(allowed)}")
    out: dict[str, Any] = {}
    for key in allowed:  # fixed order: stable SQL text
        if key not in fields:
            continue
        value = fields[key]
        if key in json_cols:
            kind = json_cols[key]
            if kind is list and isinstance(value, (str, bytes)):
                raise ValueError(f"{what}: {key} must be a list of strings, not {value!r}")
            value = dumps(kind(value))
        out[key] = value
    return out


def _upsert(
    conn: sqlite3.Connection, table: str, keys: dict[str, Any], values: dict[str, Any], at: str
) -> None:
    row = {**keys, **values, "updated_at": at}
    cols = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    sets = ", ".join(f"{c} = excluded.{c}" for c in [*values, "updated_at"])
    conn.execute(
        f"INSERT INTO {table} ({cols}) VALUES ({marks})"
        f" ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sets}",
        list(row.values()),
    )


def apply_op(conn: sqlite3.Connection, op: StateOp, at: str) -> None:
    """Run one state operation on `conn` (inside the caller's transaction), stamped `at`."""
    if isinstance(op, UpsertNode):
        values = _encode(op.fields, NODE_FIELDS, _NODE_JSON, f"UpsertNode({op.name!r})")
        _upsert(conn, "nodes", {"name": op.name}, values, at)
    elif isinstance(op, DeleteNode):
        conn.execute("DELETE FROM nodes WHERE name = ?", [op.name])
    elif isinstance(op, UpsertService):
        what = f"UpsertService({op.node!r}, {op.name!r})"
        values = _encode(op.fields, SERVICE_FIELDS, _SERVICE_JSON, what)
        _upsert(conn, "services", {"node": op.node, "name": op.name}, values, at)
    elif isinstance(op, DeleteService):
        conn.execute("DELETE FROM services WHERE node = ? AND name = ?", [op.node, op.name])
    elif isinstance(op, SetMeta):
        conn.execute(
            "INSERT INTO cluster (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [op.key, dumps(op.value)],
        )
    elif isinstance(op, PutCertificate):
        conn.execute(
            "INSERT OR REPLACE INTO certificates"
            " (name, cert_pem, key_encrypted, created_at, expires_at, sans, hash)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                op.name,
                op.cert_pem,
                op.key_encrypted,
                at,
                op.expires_at,
                dumps(list(op.sans)),
                op.hash,
            ],
        )
    elif isinstance(op, DeleteCertificate):
        conn.execute("DELETE FROM certificates WHERE name = ?", [op.name])
    else:
        raise TypeError(f"not a state operation: {op!r}")
