"""RKE's state file (`cluster.rkestate`), read and checked for `rkel import`.

The file is JSON: `desiredState` and `currentState`, each with `rkeConfig` (the cluster.yml RKE
last used, as JSON) and `certificatesBundle`, a map from certificate name (`kube-ca`,
`kube-apiserver`, `kube-etcd-10-0-0-1`, ...) to an object with `certificatePEM`, `keyPEM`,
`config`, `name`, `commonName`, `ouName`, `envName`, `path`, `keyEnvName`, `keyPath`,
`configEnvName` and `configPath`. `currentState` is what RKE last deployed; `desiredState` is
used only when RKE never recorded a current one.

Everything is checked before anything is written: the JSON, every certificate the adopted
cluster needs, that each private key belongs to its certificate, and that each leaf is signed by
its CA. Private keys are held in memory only, never in a repr or a message.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from lifecycle.errors import RkelError
from lifecycle.pki import STICKY
from lifecycle.pki_x509 import issued_by, load_cert
from lifecycle.spec import CertRequest

MAX_BYTES = 16 * 1024 * 1024  # RKE keeps it in a Kubernetes object too: far below this


class RkeStateError(RkelError):
    """RKE's state file cannot be read, or does not describe a cluster rkel can adopt."""

    exit_code = 2


@dataclass(frozen=True)
class RkeCertificate:
    """One entry of RKE's certificatesBundle: the certificate and its private key (PEM)."""

    name: str
    cert_pem: str
    key_pem: bytes = field(repr=False)
    not_after: str = ""


@dataclass(frozen=True)
class RkeState:
    """What `rkel import` takes from RKE's state file."""

    path: Path
    sha256: str
    kubernetes_version: str  # what RKE last deployed ("" when it does not say)
    node_addresses: tuple[str, ...]  # the nodes RKE's state lists, by address
    certificates: Mapping[str, RkeCertificate] = field(repr=False)


def read_rke_state(path: Path) -> RkeState:
    """Read and parse RKE's state file (the certificates are not checked yet: see `check`).

    :raises RkeStateError: missing, unreadable, too large, not JSON, or without certificates.
    """
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise RkeStateError(
                f"{path} is {size} bytes, more than an RKE state file can be "
                f"({MAX_BYTES} bytes); give the cluster.rkestate that `rke up` wrote"
            )
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RkeStateError(
            f"RKE's state file {path} does not exist; give the cluster.rkestate that `rke up` "
            "wrote beside cluster.yml (`rke util get-state-file` fetches it from the cluster)"
        ) from None
    except OSError as exc:
        raise RkeStateError(f"cannot read RKE's state file {path}: {exc.strerror}") from None
    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RkeStateError(
            f"{path} is not an RKE state file: it is not JSON ({str(exc)[:120]}); give the "
            "cluster.rkestate that `rke up` wrote"
        ) from None
    if not isinstance(doc, dict):
        raise RkeStateError(f"{path} is not an RKE state file: its JSON is not an object")
    state = _pick_state(path, doc)
    bundle = state.get("certificatesBundle")
    found = state.get("rkeConfig")
    config: dict[str, Any] = found if isinstance(found, dict) else {}
    listed = config.get("nodes")
    nodes: list[Any] = listed if isinstance(listed, list) else []
    return RkeState(
        path=path,
        sha256=hashlib.sha256(raw).hexdigest(),
        kubernetes_version=str(config.get("kubernetes_version") or ""),
        node_addresses=tuple(sorted(str(n.get("address")) for n in nodes
                                    if isinstance(n, dict) and n.get("address"))),
        certificates=_bundle(path, bundle),
    )


def _pick_state(path: Path, doc: dict[str, Any]) -> dict[str, Any]:
    for key in ("currentState", "desiredState"):
        state = doc.get(key)
        if isinstance(state, dict) and isinstance(state.get("certificatesBundle"), dict) \
                and state["certificatesBundle"]:
            return state
    raise RkeStateError(
        f"{path} is not an RKE state file rkel can import: neither currentState nor "
        "desiredState holds a certificatesBundle. Give the cluster.rkestate of a cluster "
        "RKE has brought up (RKE v0.2 or later)"
    )


def _bundle(path: Path, bundle: Any) -> dict[str, RkeCertificate]:
    out: dict[str, RkeCertificate] = {}
    for name, entry in sorted(bundle.items()):
        if not isinstance(entry, dict):
            raise RkeStateError(f"{path}: certificatesBundle.{name} is not an object")
        cert = entry.get("certificatePEM")
        key = entry.get("keyPEM") or ""
        if not isinstance(cert, str) or not isinstance(key, str):
            raise RkeStateError(
                f"{path}: certificatesBundle.{name} has no certificatePEM (or a keyPEM that is "
                "not text); the file is damaged: fetch it again with `rke util get-state-file`"
            )
        out[str(name)] = RkeCertificate(str(name), cert, key.encode())
    return out


def check(state: RkeState, requests: Mapping[str, CertRequest]) -> dict[str, RkeCertificate]:
    """The certificates the adopted cluster uses (`requests`, by name), each checked: present,
    parsable, with the private key of its certificate, and signed by its CA.

    :raises RkeStateError: listing every problem found, none of which is fixed here.
    """
    problems: list[str] = []
    checked: dict[str, RkeCertificate] = {}
    parsed: dict[str, Any] = {}
    for name in sorted(requests):
        entry = state.certificates.get(name)
        if entry is None:
            problems.append(f"{name}: missing from the certificatesBundle")
            continue
        try:
            cert = load_cert(entry.cert_pem)
        except ValueError:
            problems.append(f"{name}: certificatePEM is not a PEM certificate")
            continue
        parsed[name] = cert
        if not entry.key_pem.strip():
            problems.append(f"{name}: keyPEM is empty (rkel needs every key RKE made)")
            continue
        try:
            key = serialization.load_pem_private_key(entry.key_pem, password=None)
        except (ValueError, TypeError):
            problems.append(f"{name}: keyPEM is not an unencrypted PEM private key")
            continue
        if not isinstance(key, rsa.RSAPrivateKey):
            problems.append(f"{name}: keyPEM is not an RSA key (RKE makes RSA keys)")
            continue
        if key.public_key().public_numbers() != _public_numbers(cert):
            problems.append(f"{name}: keyPEM is not the private key of its certificatePEM")
            continue
        not_after = cert.not_valid_after_utc.astimezone(UTC).isoformat()
        checked[name] = RkeCertificate(name, entry.cert_pem, entry.key_pem, not_after)
    for name, req in sorted(requests.items()):
        leaf, ca = parsed.get(name), parsed.get(req.ca)
        if leaf is None or ca is None or name in STICKY:
            continue  # reported above (the service-account key pair is only a key)
        if not issued_by(leaf, ca):
            what = "is not self-signed" if req.ca == name else f"is not signed by {req.ca}"
            problems.append(f"{name}: the certificate {what}")
    if problems:
        raise RkeStateError(
            f"{state.path} cannot be imported, nothing was written:\n  "
            + "\n  ".join(problems)
            + "\nGive the cluster.rkestate of the running cluster (`rke util get-state-file` "
            "fetches it), and a cluster.yml with the same nodes and roles"
        )
    return checked


def _public_numbers(cert: Any) -> Any:
    public = cert.public_key()
    return public.public_numbers() if isinstance(public, rsa.RSAPublicKey) else None

