"""`rkel state verify`: check that the state database can be trusted, one line per check.

Checks SQLite's own integrity, the journal's hash chain (and its append-only triggers), the seals
of the snapshot catalogue, and every certificate row against the state key: the private key
decrypts, the certificate is the one that key belongs to, and a leaf is signed by a CA in the
state. Opens the database without the journal check every other command makes, so a damaged
state is reported instead of refused. Never prints key material. Registered on `state_app` by
`lifecycle.cli`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from lifecycle.bundle import check_passphrase, export_bundle, unpack_bundle
from lifecycle.cli import _emit, _fail, _g, state_app
from lifecycle.errors import RkelError, StateError
from lifecycle.pki_key import load_state_key
from lifecycle.pki_x509 import issued_by, load_cert
from store import Store, StoreError, default_state_path

SHOWN = 3  # problems shown on a check's line; -o json lists all of them


@dataclass
class Check:
    """One check's outcome: its name, what it found, what to do when it failed."""

    name: str
    detail: str = ""
    problems: list[str] = field(default_factory=list)
    todo: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        if self.ok:
            return f"ok    {self.name}: {self.detail}"
        shown = "; ".join(self.problems[:SHOWN])
        more = f" (and {len(self.problems) - SHOWN} more)" if len(self.problems) > SHOWN else ""
        return f"FAIL  {self.name}: {shown}{more}; {self.todo}"


RESTORE = ("restore the state file from a backup (each `rkel snapshot save` keeps one, "
           "<snapshot>.rkel.db, beside the snapshot)")


def check_sqlite(store: Store) -> Check:
    result = store.integrity_check()
    check = Check("sqlite integrity", "PRAGMA integrity_check: ok",
                  todo=f"the file is damaged: {RESTORE}")
    if result != "ok":
        check.problems = result.splitlines()
    return check


def check_journal(store: Store) -> Check:
    rows = len(store.journal())
    check = Check("journal chain", f"{rows} row(s), every hash chained to the one before",
                  todo=f"rows were edited or removed outside rkel: {RESTORE}")
    check.problems = store.verify_journal()
    check.problems += [f"the append-only trigger {t} was removed"
                       for t in store.missing_journal_triggers()]
    return check


def check_catalogue(store: Store) -> Check:
    count = len(store.snapshots())
    check = Check("snapshot catalogue", f"{count} row(s), every seal holds",
                  todo="do not restore from these snapshots: take a new one (`rkel snapshot "
                       "save`) and find out who edited the state")
    check.problems = store.catalogue_problems()
    return check


def check_certificates(store: Store) -> Check:
    rows = store.certificates()
    check = Check("certificates", f"{len(rows)} certificate(s): keys decrypt with the state "
                  "key and match their certificates, leaves are signed by a CA in the state",
                  todo="do not deliver these certificates: restore the state (or the right "
                       "state key) from a backup")
    if not rows:
        check.detail = "none yet (`rkel apply` makes them)"
        return check
    try:
        fernet = Fernet(load_state_key(store.path, create=False))
    except RkelError as exc:
        check.problems.append(str(exc))
        return check
    certs: dict[str, Any] = {}
    for row in rows:
        try:
            certs[row.name] = load_cert(row.cert_pem)
        except ValueError:
            check.problems.append(f"{row.name}: the certificate is not valid PEM")
            continue
        if row.key_encrypted is None:
            continue
        try:
            # the public half is compared with the certificate below; skipping OpenSSL's slow
            # private-key consistency check keeps this at milliseconds per key
            key = serialization.load_pem_private_key(fernet.decrypt(row.key_encrypted), None,
                                                     unsafe_skip_rsa_key_validation=True)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise TypeError("not RSA")
        except InvalidToken:
            check.problems.append(f"{row.name}: the private key does not decrypt with the state "
                                  "key (the row was edited, or this is another state's key)")
            continue
        except (ValueError, TypeError):
            check.problems.append(f"{row.name}: the decrypted private key is not an RSA key")
            continue
        if key.public_key().public_numbers() != certs[row.name].public_key().public_numbers():
            check.problems.append(f"{row.name}: the certificate does not belong to its private "
                                  "key (the certificate was replaced)")
    cas = [c for c in certs.values() if c.issuer == c.subject]
    for name, cert in sorted(certs.items()):
        if cert.issuer == cert.subject:
            if not issued_by(cert, cert):
                check.problems.append(f"{name}: the CA certificate's self-signature is invalid")
        elif not any(issued_by(cert, ca) for ca in cas):
            check.problems.append(f"{name}: not signed by any CA in the state")
    return check


def check_encryption_keys(store: Store) -> Check:
    """The secrets encryption keyring decrypts and holds every key in use."""
    from lifecycle.encryption import ACTIVE, KEYRING, Keyring

    active = [str(n) for n in store.get_meta(ACTIVE) or []]
    check = Check("secrets encryption keys", f"{', '.join(active) or 'none'} in use; the "
                  "keyring decrypts with the state key and holds them",
                  todo="the API servers' encryption.yaml cannot be written again: restore the "
                       "state (or the right state key) from a backup")
    try:
        ring = Keyring.unseal(store.get_meta(KEYRING), load_state_key(store.path, create=False))
    except RkelError as exc:
        check.problems.append(str(exc))
        return check
    check.problems += [f"key {n} is in use but not in the keyring" for n in active
                       if n not in ring.keys]
    return check


def verify_state(store: Store) -> list[Check]:
    """Every check, in a fixed order (the keyring's when the state has one)."""
    checks = [check_sqlite(store), check_journal(store), check_catalogue(store),
              check_certificates(store)]
    from lifecycle.encryption import KEYRING

    if store.get_meta(KEYRING):
        checks.append(check_encryption_keys(store))
    return checks


@state_app.command("verify")
def state_verify(ctx: typer.Context) -> None:
    """Check the state can be trusted: SQLite integrity, journal chain, snapshot catalogue
    seals, certificates against the state key. Exit 0 when all pass, 4 otherwise."""
    g = _g(ctx)
    path = g.state or default_state_path(g.config)
    if not path.is_file():
        raise _fail(g, StateError(f"there is no state at {path}; pass --state, or -c the "
                                  "cluster.yml it belongs to"))
    try:
        with Store.open(path, check_journal=False) as store:
            checks = verify_state(store)
    except StoreError as exc:
        raise _fail(g, StateError(f"{path}: {exc}")) from None
    _emit(g, "\n".join(c.line() for c in checks),
          {"state": str(path), "ok": all(c.ok for c in checks),
           "checks": [{"check": c.name, "ok": c.ok, "problems": c.problems} for c in checks]})
    if not all(c.ok for c in checks):
        raise typer.Exit(StateError.exit_code)



# ---------------------------------------------------------------------------- bundles
PASSPHRASE_ENV = "RKEL_BUNDLE_PASSPHRASE"
PASSPHRASE_FILE = Annotated[Optional[Path], typer.Option(
    help=f"Read the passphrase from this file (else ${PASSPHRASE_ENV}, else a prompt).")]


def _passphrase(source: Path | None, confirm: bool) -> str:
    if source is not None:
        try:
            return source.read_text().rstrip("\n")
        except OSError as exc:
            raise StateError(f"cannot read the passphrase file {source}: {exc.strerror}") from None
    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV]
    if not sys.stdin.isatty():
        raise StateError(f"no passphrase: give --passphrase-file or set {PASSPHRASE_ENV}"
                         " (not on a terminal, so rkel cannot ask)")
    return str(typer.prompt("Bundle passphrase", hide_input=True,
                            confirmation_prompt=confirm, err=True))


@state_app.command("export")
def state_export(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="The bundle file to write (refused if it exists).")],
    passphrase_file: PASSPHRASE_FILE = None,
) -> None:
    """Write the state and its state key into one passphrase-encrypted bundle (keep it away
    from this machine: without the key, the cluster's private keys cannot be recovered)."""
    g = _g(ctx)
    path = g.state or default_state_path(g.config)
    try:
        if not path.is_file():
            raise StateError(f"there is no state at {path}; pass --state, or -c its cluster.yml")
        secret = check_passphrase(_passphrase(passphrase_file, confirm=True))
        with Store.open(path) as store:
            info = export_bundle(store, out, secret)
    except RkelError as exc:
        raise _fail(g, exc) from None
    _emit(g, f"Wrote the state bundle {out} (mode 0600; state and key, encrypted with the"
             " passphrase). Unpack it with `rkel --state PATH state unpack BUNDLE`.", info)


@state_app.command("unpack")
def state_unpack(
    ctx: typer.Context,
    bundle: Annotated[Path, typer.Argument(help="A bundle written by `rkel state export`.")],
    passphrase_file: PASSPHRASE_FILE = None,
) -> None:
    """Write a bundle's state (to --state, default beside cluster.yml) and its state key
    beside it; refused if either exists."""
    g = _g(ctx)
    path = g.state or default_state_path(g.config)
    try:
        info = unpack_bundle(bundle, _passphrase(passphrase_file, confirm=False), path)
    except RkelError as exc:
        raise _fail(g, exc) from None
    _emit(g, f"Unpacked {bundle}: state {info['state']}, key {info['key']} (both 0600).", info)
