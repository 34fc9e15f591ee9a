"""State bundles: the state database and its state key in one file, encrypted with a passphrase.

The state key decrypts every private key in the state (the cluster's CAs among them); losing it
loses the cluster's identity. A bundle is what to keep elsewhere: a consistent copy of the
database (SQLite's online backup) and the key, packed as a tar, encrypted with Fernet under a
key derived from a passphrase (scrypt, n=2^15, r=8, p=1, a random salt), with the sha256 of
each member inside. `unpack` checks those before writing anything, and never overwrites.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import secrets
import sqlite3
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from lifecycle.errors import StateError
from lifecycle.pki_key import check_key, load_state_key, state_key_path
from store import Store

FORMAT = "rkel-state-bundle/1"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
MIN_PASSPHRASE = 12
MEMBERS = ("state.db", "state.key")


def _fernet(passphrase: str, salt: bytes) -> Fernet:
    key = Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(
        passphrase.encode())
    return Fernet(base64.urlsafe_b64encode(key))


def check_passphrase(passphrase: str) -> str:
    if len(passphrase) < MIN_PASSPHRASE:
        raise StateError(f"the passphrase must have at least {MIN_PASSPHRASE} characters")
    return passphrase


def export_bundle(store: Store, out: Path, passphrase: str) -> dict[str, object]:
    """Write the bundle of `store` (and its key) to `out` (0600, refused if it exists)."""
    check_passphrase(passphrase)
    key = load_state_key(Path(store.path), create=False)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "state.db"
        src, dst = sqlite3.connect(str(store.path)), sqlite3.connect(str(copy))
        try:
            with dst:
                src.backup(dst)
        finally:
            src.close()
            dst.close()
        members = {"state.db": copy.read_bytes(), "state.key": key + b"\n"}
    manifest = {"format": FORMAT, "created": datetime.now(UTC).isoformat(),
                "sha256": {n: hashlib.sha256(d).hexdigest() for n, d in members.items()}}
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w:gz") as tar:
        for name, data in [("manifest.json", json.dumps(manifest).encode()), *members.items()]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    salt = secrets.token_bytes(16)
    document = {"format": FORMAT, "kdf": {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R,
                                          "p": SCRYPT_P, "salt": base64.b64encode(salt).decode()},
                "data": _fernet(passphrase, salt).encrypt(packed.getvalue()).decode()}
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise StateError(f"{out} already exists; choose another --out") from None
    except OSError as exc:
        raise StateError(f"cannot write {out}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w") as fh:
        json.dump(document, fh)
    return {"path": str(out), "created": manifest["created"], "sha256": manifest["sha256"]}


def unpack_bundle(bundle: Path, passphrase: str, state: Path) -> dict[str, object]:
    """Write the bundle's database to `state` and its key beside it (`<state>.key`), both 0600;
    refused if either exists, or if the passphrase or any checksum is wrong."""
    try:
        document = json.loads(bundle.read_text())
        if document.get("format") != FORMAT:
            raise ValueError(f"format {document.get('format')!r}")
        kdf = document["kdf"]
        salt = base64.b64decode(kdf["salt"])
        if (kdf["name"], kdf["n"], kdf["r"], kdf["p"]) != ("scrypt", SCRYPT_N, SCRYPT_R, SCRYPT_P):
            raise ValueError("unknown key derivation")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{bundle} is not an rkel state bundle ({exc})") from None
    try:
        packed = _fernet(passphrase, salt).decrypt(str(document["data"]).encode())
    except InvalidToken:
        raise StateError(f"{bundle}: wrong passphrase, or the bundle was changed") from None
    with tarfile.open(fileobj=io.BytesIO(packed), mode="r:gz") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()  # type: ignore[union-attr]
                 if m.isfile()}
    manifest = json.loads(files.get("manifest.json", b"{}"))
    for name in MEMBERS:
        if hashlib.sha256(files.get(name, b"")).hexdigest() != manifest.get("sha256", {}).get(name):
            raise StateError(f"{bundle}: {name} does not match its checksum; nothing written")
    check_key(files["state.key"], f"the key in {bundle}")
    key_path = state_key_path(state)
    for path in (state, key_path):
        if path.exists():
            raise StateError(f"{path} already exists; unpack somewhere else (--state) and move"
                             " the files into place yourself")
    for path, data in ((key_path, files["state.key"]), (state, files["state.db"])):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return {"state": str(state), "key": str(key_path), "created": manifest.get("created", "")}
