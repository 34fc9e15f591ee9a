"""The cluster's PKI: generate what the desired state asks for, keep it encrypted, render files.

`PKI.ensure` turns every node's `CertRequest`s into certificates in the store (private keys
encrypted with the state key, see `lifecycle.pki_key`); `PKI.files_for` is the executor's
`CertRenderer`, giving the files one node receives: certificates, its own leaf keys, CA
certificates (never a CA key) and the components' kubeconfigs. The admin kubeconfig is written
beside cluster.yml. Nothing here logs or reprs a private key.
"""

from __future__ import annotations

import binascii
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives.asymmetric import rsa

from lifecycle import desired_certs as names
from lifecycle.desired_certs import cert_path, is_ca, key_path, kubeconfig_path
from lifecycle.encryption import KEYRING, Encryption, Keyring
from lifecycle.encryption import render as render_encryption
from lifecycle.errors import PlanError, StateError
from lifecycle.kubeconfig import file_kubeconfig, inline_kubeconfig
from lifecycle.pki_key import STATE_KEY_ENV, load_state_key, state_key_path
from lifecycle.pki_x509 import (
    Issued,
    issue_ca,
    issue_leaf,
    issued_by,
    load_cert,
    load_key,
)
from lifecycle.spec import CertRequest, Desired
from store import CertificateRow, PutCertificate, Store

__all__ = [
    "CA_ORDER",
    "LOCAL_SERVER",
    "PKI",
    "STATE_KEY_ENV",
    "CertMaterial",
    "admin_kubeconfig_path",
    "collect_requests",
    "load_state_key",
    "state_key_path",
]

CA_ORDER = (names.KUBE_CA, names.ETCD_CA, names.REQUESTHEADER_CA)
# Kept once made, like a CA: regenerating the service-account key would void every token.
STICKY = frozenset({names.SERVICE_ACCOUNT_TOKEN})
# During a CA rotation the incoming CA is kept as `<ca>:next`, then the outgoing one as
# `<ca>:previous` (see `lifecycle.rotate`); a node's `<ca>.pem` is the bundle of all of them.
NEXT, PREVIOUS = ":next", ":previous"
# Components reach the apiserver through the node-local address (apiserver or nginx-proxy).
LOCAL_SERVER = "https://127.0.0.1:6443"
# Components whose kubeconfig is named after their certificate.
_COMPONENT_KUBECONFIGS = (names.KUBE_CONTROLLER_MANAGER, names.KUBE_SCHEDULER, names.KUBE_PROXY)


@dataclass(frozen=True)
class CertMaterial:
    """One certificate with its private key and the certificate of the CA that signed it."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    ca_pem: bytes


def admin_kubeconfig_path(config_path: Path) -> Path:
    """`cluster.yml` -> `kube_config_cluster.yml` in the same directory (RKE's name)."""
    return config_path.with_name(f"kube_config_{config_path.stem}.yml")


def collect_requests(desired: Desired) -> dict[str, CertRequest]:
    """Every node's certificate requests by name, each once.

    :raises PlanError: two nodes ask for the same name with different contents (a bug in the
      desired-state compiler, not in the user's config).
    """
    out: dict[str, CertRequest] = {}
    first: dict[str, str] = {}
    holders = [(n.name, n.certs) for n in desired.nodes] + [("rkel", desired.cluster_certs)]
    for holder, requests in holders:
        for req in requests:
            seen = out.get(req.name)
            if seen is None:
                out[req.name], first[req.name] = req, holder
            elif seen != req:
                raise PlanError(
                    f"certificate {req.name} is requested differently by nodes "
                    f"{first[req.name]} and {holder}; this is a bug in rkel, please report it"
                )
    return out


def _generation_order(requests: dict[str, CertRequest]) -> list[CertRequest]:
    """CAs first (kube-ca, kube-etcd-ca, requestheader CA, then any other), then leaves."""
    cas = sorted(
        (r for r in requests.values() if is_ca(r)),
        key=lambda r: (CA_ORDER.index(r.name) if r.name in CA_ORDER else len(CA_ORDER), r.name),
    )
    leaves = sorted((r for r in requests.values() if not is_ca(r)), key=lambda r: r.name)
    return [*cas, *leaves]


def _is_ca_cert(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` atomically with `data`; the file is mode 0600 from its first byte."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class _Signers:
    """CA certificates and keys for one `ensure` call: fresh ones, else loaded from the store.

    A stored CA's key is decrypted only when something must actually be signed with it.
    """

    def __init__(self, pki: PKI, existing: dict[str, CertificateRow]) -> None:
        self._pki = pki
        self._existing = existing
        self._certs: dict[str, x509.Certificate] = {}
        self._keys: dict[str, rsa.RSAPrivateKey] = {}
        self.replaced: set[str] = set()

    def add(self, name: str, issued: Issued) -> None:
        self._certs[name] = load_cert(issued.cert_pem)
        self._keys[name] = load_key(issued.key_pem)
        self.replaced.add(name)

    def _stored(self, leaf: CertRequest) -> CertificateRow:
        row = self._existing.get(leaf.ca)
        if row is None or not _is_ca_cert(load_cert(row.cert_pem)):
            raise PlanError(
                f"certificate {leaf.name} is to be signed by {leaf.ca}, which is neither "
                "requested nor stored as a CA; this is a bug in rkel, please report it"
            )
        return row

    def cert(self, leaf: CertRequest) -> x509.Certificate:
        if leaf.ca not in self._certs:
            self._certs[leaf.ca] = load_cert(self._stored(leaf).cert_pem)
        return self._certs[leaf.ca]

    def key(self, leaf: CertRequest) -> rsa.RSAPrivateKey:
        if leaf.ca not in self._keys:
            self._keys[leaf.ca] = load_key(self._pki._decrypt(self._stored(leaf)))
        return self._keys[leaf.ca]


class PKI:
    """The cluster's certificates in `store`, private keys encrypted with the state key."""

    def __init__(self, store: Store, key: bytes) -> None:
        """Use `key` (from `load_state_key`) for the keys in `store`.

        :raises StateError: the key is malformed or does not decrypt the keys already stored.
        """
        try:
            self._fernet = Fernet(key)
            self._key = key
        except (ValueError, binascii.Error):
            raise StateError(
                "the state key is not a valid key (32 bytes in url-safe base64); restore it "
                "from a backup"
            ) from None
        self._store = store
        row = next((r for r in store.certificates() if r.key_encrypted), None)
        if row is not None:
            self._decrypt(row)  # fail now, before any step, if the key is not this state's

    def __repr__(self) -> str:
        return f"<PKI {self._store.path}>"

    # --- keys ----------------------------------------------------------------------------------

    def _decrypt(self, row: CertificateRow) -> bytes:
        if row.key_encrypted is None:
            raise StateError(f"certificate {row.name} has no private key in the state")
        try:
            return self._fernet.decrypt(row.key_encrypted)
        except InvalidToken:
            raise StateError(
                f"the state key does not match this state: it cannot decrypt the private key "
                f"of {row.name} in {self._store.path}. Use the key created with this state "
                f"({state_key_path(self._store.path)}, or {STATE_KEY_ENV} set to its "
                "contents); a key from another cluster's state will not do"
            ) from None

    def _put(self, name: str, issued: Issued, req: CertRequest) -> PutCertificate:
        return PutCertificate(
            name=name,
            cert_pem=issued.cert_pem.decode("ascii"),
            key_encrypted=self._fernet.encrypt(issued.key_pem),
            expires_at=issued.not_after.isoformat(),
            sans=req.sans,
            hash=req.hash,
        )

    def adopt(self, req: CertRequest, cert_pem: str, key_pem: bytes,
              expires_at: str) -> PutCertificate:
        """The store op that keeps a certificate made elsewhere (RKE's, on import) as the one
        for `req`, its key encrypted like rkel's own. The caller has checked the pair."""
        return PutCertificate(
            name=req.name,
            cert_pem=cert_pem,
            key_encrypted=self._fernet.encrypt(key_pem),
            expires_at=expires_at,
            sans=req.sans,
            hash=req.hash,
        )

    def _row(self, name: str) -> CertificateRow:
        row = self._store.certificate(name)
        if row is None:
            raise StateError(
                f"certificate {name} is not in the state {self._store.path}; run `rkel apply` "
                "(it generates missing certificates before delivering them)"
            )
        return row

    # --- generation ----------------------------------------------------------------------------

    def ensure(self, desired: Desired) -> list[str]:
        """Generate every missing or outdated certificate `desired` asks for; return their names.

        A leaf is (re)generated when missing, when its request changed, or when it is not signed
        by its CA as stored now. A CA, and the service-account key, is made only when missing:
        an existing one is kept even if its request changed. All new certificates are stored in
        one transaction, so a crash leaves either all of them or none.
        """
        return self.ensure_requests(collect_requests(desired))

    def ensure_requests(self, requests: dict[str, CertRequest], extra_ops: Sequence[Any] = (),
                        existing: dict[str, CertificateRow] | None = None) -> list[str]:
        """`ensure` for requests by name; `extra_ops` are stored in the same transaction (even
        when no certificate is new), and `existing` stands for the stored rows when given."""
        if existing is None:
            existing = {row.name: row for row in self._store.certificates()}
        signers = _Signers(self, existing)
        ops: list[PutCertificate] = []
        for req in _generation_order(requests):
            row = existing.get(req.name)
            if is_ca(req):
                if row is None:
                    issued = issue_ca(req)
                    signers.add(req.name, issued)
                    ops.append(self._put(req.name, issued, req))
                continue
            if not self._leaf_stale(req, row, signers):
                continue
            issued = issue_leaf(req, signers.cert(req), signers.key(req))
            ops.append(self._put(req.name, issued, req))
        if ops or extra_ops:
            self._store.apply_ops([*ops, *extra_ops])
        return sorted(op.name for op in ops)

    def _leaf_stale(self, req: CertRequest, row: CertificateRow | None, signers: _Signers) -> bool:
        if row is None or req.ca in signers.replaced:
            return True
        if req.name in STICKY:
            return False
        if row.hash != req.hash:
            return True
        return not issued_by(load_cert(row.cert_pem), signers.cert(req))

    # --- reading -------------------------------------------------------------------------------

    def material(self, name: str) -> CertMaterial:
        """Certificate `name`, its private key and its signing CA's certificate (PEM).

        :raises StateError: no such certificate, its CA is not in the state, or a wrong key.
        """
        row = self._row(name)
        cert = load_cert(row.cert_pem)
        key = self._decrypt(row) if row.key_encrypted is not None else b""
        own = row.cert_pem.encode("ascii")
        if cert.issuer == cert.subject and issued_by(cert, cert):
            return CertMaterial(own, key, own)  # a CA is its own signer
        return CertMaterial(own, key, self._issuer_pem(name, cert))

    def _issuer_pem(self, name: str, cert: x509.Certificate) -> bytes:
        """The trust bundle of the CA that signed `name` (see `trust_pem`)."""
        for row in self._store.certificates():
            candidate = load_cert(row.cert_pem)
            if candidate.subject == cert.issuer and issued_by(cert, candidate):
                return self.trust_pem(row.name.split(":")[0])
        raise StateError(f"the CA that signed {name} is not in the state {self._store.path}")

    def trust_pem(self, ca: str) -> bytes:
        """CA `ca`'s certificate, followed by the CA replacing it or being replaced by it while a
        CA rotation is under way: everything that verifies against `ca` trusts both then."""
        rows = [self._row(ca)]
        rows += [r for r in (self._store.certificate(ca + NEXT), self._store.certificate(ca + PREVIOUS))
                 if r is not None]
        return b"".join(r.cert_pem.encode("ascii") for r in rows)

    def expiries(self) -> list[tuple[str, datetime]]:
        """(name, notAfter in UTC) of every stored certificate, sorted by name."""
        out = []
        for row in self._store.certificates():
            if row.expires_at:
                expires = datetime.fromisoformat(row.expires_at)
            else:
                expires = load_cert(row.cert_pem).not_valid_after_utc
            out.append((row.name, expires))
        return sorted(out)

    # --- files ---------------------------------------------------------------------------------

    def encryption_config(self, enc: Encryption) -> bytes:
        """The secrets encryption config file for `enc`, from the sealed keyring."""
        return render_encryption(enc, Keyring.unseal(self._store.get_meta(KEYRING), self._key))

    def files_for(self, node: str, certs: Sequence[CertRequest]) -> dict[str, bytes]:
        """The files node `node` receives for `certs` (the executor's CertRenderer), by path.

        Per request: `<name>.pem`, plus `<name>-key.pem` unless it is a CA (a CA key never
        leaves the state). Plus kubecfg-<component>.yaml for the controller manager, scheduler
        and proxy, and kubecfg-kube-node.yaml for the kubelet with the node's own
        kube-node-<node> identity, each for the certificates the node has.

        :raises StateError: a certificate is missing or older than its request (run `ensure`).
        """
        files: dict[str, bytes] = {}
        wanted = {req.name for req in certs}
        for req in certs:
            row = self._row(req.name)
            if not is_ca(req) and req.name not in STICKY and row.hash != req.hash:
                raise StateError(
                    f"certificate {req.name} in the state is older than its request; "
                    "generate certificates (PKI.ensure) before delivering them"
                )
            files[cert_path(req.name)] = (self.trust_pem(req.name) if is_ca(req)
                                          else row.cert_pem.encode("ascii"))
            if not is_ca(req):
                files[key_path(req.name)] = self._decrypt(row)
        kubeconfigs = [(c, c) for c in _COMPONENT_KUBECONFIGS if c in wanted]
        own = f"kube-node-{node}"  # desired_certs.node_cert_name, from the node's name
        if own in wanted:
            kubeconfigs.append((names.KUBE_NODE_KUBECONFIG, own))
        elif names.KUBE_NODE_KUBECONFIG in wanted:  # RKE's layout: one shared kube-node
            kubeconfigs.append((names.KUBE_NODE_KUBECONFIG, names.KUBE_NODE_KUBECONFIG))
        for kubeconfig, cert in kubeconfigs:
            text = file_kubeconfig(
                LOCAL_SERVER,
                kubeconfig,
                ca_path=cert_path(names.KUBE_CA),
                cert_path=cert_path(cert),
                key_path=key_path(cert),
            )
            files[kubeconfig_path(kubeconfig)] = text.encode()
        return dict(sorted(files.items()))

    # --- admin kubeconfig ----------------------------------------------------------------------

    def admin_kubeconfig(self, server: str, cluster_name: str) -> str:
        """The admin's kubeconfig for `server`, with kube-ca and kube-admin embedded."""
        admin = self.material(names.KUBE_ADMIN)
        return inline_kubeconfig(
            server,
            f"kube-admin-{cluster_name}",
            ca_pem=admin.ca_pem,
            cert_pem=admin.cert_pem,
            key_pem=admin.key_pem,
            cluster_name=cluster_name,
        )

    def write_admin_kubeconfig(self, config_path: Path, server: str, cluster_name: str) -> Path:
        """Write kube_config_<config stem>.yml beside `config_path` (mode 0600, atomic)."""
        path = admin_kubeconfig_path(Path(config_path))
        text = self.admin_kubeconfig(server, cluster_name)
        try:
            write_private(path, text.encode())
        except OSError as exc:
            raise StateError(f"cannot write the admin kubeconfig {path}: {exc}") from exc
        return path
