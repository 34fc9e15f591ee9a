"""The state key: the Fernet key that encrypts every private key kept in the state database.

It lives beside the state (`cluster.rkel.db` -> `cluster.rkel.db.key`, mode 0600) or comes from
the RKEL_STATE_KEY environment variable. It is never stored in the database: a copy of the
database alone gives no private key. Losing the key while the state holds keys is fatal for
those keys, so that case is an error with directions, never a silently minted new CA.
"""

from __future__ import annotations

import binascii
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.fernet import Fernet

from lifecycle.errors import StateError
from store import Store, StoreError

STATE_KEY_ENV = "RKEL_STATE_KEY"


def state_key_path(state_path: Path) -> Path:
    """Where the key file of `state_path` lives: the same name plus `.key`."""
    return state_path.with_name(state_path.name + ".key")


def check_key(key: bytes, source: str) -> bytes:
    """`key` stripped, if it is a Fernet key (32 bytes, url-safe base64); else StateError."""
    key = key.strip()
    try:
        Fernet(key)
    except (ValueError, binascii.Error):
        raise StateError(
            f"{source} is not a valid rkel state key (it must be 32 bytes in url-safe base64, "
            "as rkel writes it); restore the right key from a backup"
        ) from None
    return key


def _state_holds_keys(state_path: Path) -> bool:
    """True when the state database exists and holds at least one encrypted private key."""
    if not state_path.exists():
        return False
    try:
        with Store.open(state_path) as store:
            return any(row.key_encrypted for row in store.certificates())
    except StoreError as exc:
        raise StateError(str(exc)) from exc


def _lost_key_error(state_path: Path, key_path: Path) -> StateError:
    return StateError(
        f"the state {state_path} holds encrypted private keys (the cluster's CAs among them) "
        f"but its state key is missing: expected it in {key_path} or in {STATE_KEY_ENV}. "
        f"Without it the private keys cannot be recovered. Restore {key_path} from a backup "
        f"of the state key (a bundle of `rkel state export`: `rkel --state NEW state unpack "
        f"BUNDLE` writes both), or set {STATE_KEY_ENV} to the key; rkel will not mint a new CA "
        "over a running cluster"
    )


def _create_key_file(key_path: Path) -> bytes | None:
    """Write a new key to `key_path` (0600 from the start); None if the file appeared first."""
    key = Fernet.generate_key()
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None  # another process won the race: use its key
    except OSError as exc:
        raise StateError(f"cannot create the state key {key_path}: {exc}") from exc
    try:
        os.write(fd, key + b"\n")
        os.fsync(fd)  # the key must be durable before anything encrypted with it is
    finally:
        os.close(fd)
    dir_fd = os.open(key_path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return key


def load_state_key(
    state_path: Path, *, create: bool = True, environ: Mapping[str, str] | None = None
) -> bytes:
    """The Fernet key for the state at `state_path`.

    RKEL_STATE_KEY wins when set; otherwise `<state_path>.key` is read, or created (mode 0600)
    when `create` and the state holds no private keys yet.

    :param environ: the environment to read RKEL_STATE_KEY from (default: os.environ).
    :raises StateError: the key is malformed, or missing while the state holds keys (or while
      `create` is false).
    """
    env = os.environ if environ is None else environ
    value = env.get(STATE_KEY_ENV)
    if value:
        return check_key(value.encode(), STATE_KEY_ENV)
    key_path = state_key_path(Path(state_path))
    for _ in range(2):
        try:
            return check_key(key_path.read_bytes(), str(key_path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StateError(f"cannot read the state key {key_path}: {exc}") from exc
        if _state_holds_keys(Path(state_path)):
            raise _lost_key_error(Path(state_path), key_path)
        if not create:
            raise StateError(
                f"no state key yet ({key_path} does not exist and {STATE_KEY_ENV} is not set); "
                "run `rkel apply` to create the cluster's certificates first"
            )
        key = _create_key_file(key_path)
        if key is not None:
            return key
    raise StateError(f"the state key {key_path} keeps disappearing; check who removes it")
