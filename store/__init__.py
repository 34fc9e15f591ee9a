"""rkel's durable state: one SQLite database per cluster (sqlite-utils, WAL, synchronous=FULL).

`Store.open(path)` gives nodes, services, runs, the append-only hash-chained journal, the
snapshot catalog, certificates, pinned host keys and the run lock. Imports nothing from
`lifecycle`; `lifecycle` maps `StoreError` and `LockHeld` to its own errors.
"""

from __future__ import annotations

from store.rows import (
    CertificateRow,
    DeleteNode,
    DeleteService,
    JournalRow,
    KnownHostRow,
    LockHeld,
    LockInfo,
    NodeRow,
    PutCertificate,
    DeleteCertificate,
    RunRow,
    ServiceRow,
    SetMeta,
    SnapshotRow,
    StateOp,
    StoreError,
    UpsertNode,
    UpsertService,
)
from store.base import JournalBroken
from store.store import Store, default_state_path

__all__ = [
    "CertificateRow",
    "DeleteNode",
    "DeleteService",
    "JournalBroken",
    "JournalRow",
    "KnownHostRow",
    "LockHeld",
    "LockInfo",
    "NodeRow",
    "PutCertificate",
    "DeleteCertificate",
    "RunRow",
    "ServiceRow",
    "SetMeta",
    "SnapshotRow",
    "StateOp",
    "Store",
    "StoreError",
    "UpsertNode",
    "UpsertService",
    "default_state_path",
]
