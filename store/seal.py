"""Integrity seals for snapshot catalogue rows, keyed from the state key.

A catalogue row says which file a restore may trust (its sha256 and size) and where the copies
are. The journal's hash chain does not cover it, and a plain checksum beside the row can be
recomputed by whoever edits the row, so each row carries an HMAC-SHA256 seal under a key derived
from the state key: editing a row without that key is detected. The state key is found where
`lifecycle.pki_key` keeps it (RKEL_STATE_KEY, else `<state>.key`); it is never created here.
Without any state key a row gets an unkeyed sha256 seal, which still catches an edit of the row
alone but not a careful forger; once a key exists, such a row is not trusted. Pure functions.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from store.rows import dumps

STATE_KEY_ENV = "RKEL_STATE_KEY"  # the same places lifecycle.pki_key reads the key from
_CONTEXT = b"rkel snapshot catalogue seal v1"  # the derived key is used for nothing else
KEYED = "hmac-sha256:"
UNKEYED = "sha256:"


def find_state_key(db_path: Path, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The state key of the database at `db_path` (RKEL_STATE_KEY, else `<db>.key`), or None."""
    env = os.environ if environ is None else environ
    value = env.get(STATE_KEY_ENV, "").strip()
    if value:
        return value.encode()
    try:
        text = db_path.with_name(db_path.name + ".key").read_bytes().strip()
    except OSError:
        return None
    return text or None


def seal_key(state_key: bytes) -> bytes:
    """The catalogue's own key, derived from the state key (so neither reveals the other)."""
    return hmac.new(state_key.strip(), _CONTEXT, hashlib.sha256).digest()


def seal(fields: Sequence[Any], key: bytes | None) -> str:
    """The seal of a row's `fields` (JSON values): keyed when `key` (a `seal_key`) is given."""
    framed = dumps(list(fields)).encode("utf-8", "surrogatepass")
    if key is None:
        return UNKEYED + hashlib.sha256(framed).hexdigest()
    return KEYED + hmac.new(key, framed, hashlib.sha256).hexdigest()


def seal_problem(stored: str, fields: Sequence[Any], key: bytes | None) -> str | None:
    """Why a row sealed `stored` cannot be trusted (None when the seal holds)."""
    if not stored:
        return "has no integrity seal (catalogued by an older rkel, or the seal was removed)"
    if stored.startswith(KEYED):
        if key is None:
            return (
                "is sealed with the state key, which is not available here (the `.key` file "
                f"beside the state, or {STATE_KEY_ENV}), so it cannot be checked"
            )
        good = hmac.compare_digest(stored, seal(fields, key))
    elif stored.startswith(UNKEYED):
        if key is not None:
            return "was sealed without the state key, so an edit cannot be ruled out"
        good = hmac.compare_digest(stored, seal(fields, None))
    else:
        return "has a seal rkel does not know"
    return None if good else "was changed outside rkel: its seal does not match its contents"
