"""An RKE-built cluster for tests: RKE's PKI, its `cluster.rkestate`, and its containers.

The PKI is made here with `cryptography` alone, as RKE v1's `pki` package makes it (one kube-ca
signing everything but the aggregation layer; one shared kube-node; kube-etcd-<ip> per etcd node
naming every etcd node), not with rkel's own PKI code, so the import is tested against material
it did not make. The state file follows RKE's JSON layout (cluster/state.go: desiredState and
currentState with rkeConfig and certificatesBundle; pki.CertificatePKI's JSON names).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from lifecycle.config.model import ClusterConfig
from lifecycle.desired_certs import apiserver_sans, first_service_ips

SSL = "/etc/kubernetes/ssl"
CONTAINER_NAME_LABEL = "io.rancher.rke.container.name"


@dataclass
class Pair:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey = field(repr=False)
    common_name: str = ""
    ou: str = ""

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def key_pem(self) -> str:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption()).decode()


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(cn: str, org: str = "") -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _sans(values: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for v in sorted(set(values)):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(v)))
        except ValueError:
            out.append(x509.DNSName(v))
    return out


def make_ca(cn: str) -> Pair:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, True, True, False, False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    return Pair(cert, key, cn)


def make_leaf(ca: Pair, cn: str, org: str = "", sans: list[str] | None = None,
              server: bool = False) -> Pair:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    usages = [x509.ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.append(x509.ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (x509.CertificateBuilder().subject_name(_name(cn, org)).issuer_name(ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=1))
               .not_valid_after(now + dt.timedelta(days=3650))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(_sans(sans)), critical=False)
    return Pair(builder.sign(ca.key, hashes.SHA256()), key, cn, org)


def dashed(address: str) -> str:
    return address.replace(".", "-").replace(":", "-")


def rke_pki(config: ClusterConfig) -> dict[str, Pair]:
    """RKE's certificatesBundle for `config`, by name."""
    ca = make_ca("kube-ca")
    rh = make_ca("kube-apiserver-requestheader-ca")
    etcd_hosts = config.nodes_with("etcd")
    etcd_sans = ["127.0.0.1", "localhost"] + [v for n in etcd_hosts
                                              for v in (n.address, n.internal, n.name)]
    etcd_sans += first_service_ips(config.services.kube_api.service_cluster_ip_range)
    out = {
        "kube-ca": ca,
        "kube-apiserver": make_leaf(ca, "kube-apiserver", sans=list(apiserver_sans(config)),
                                    server=True),
        "kube-controller-manager": make_leaf(ca, "system:kube-controller-manager"),
        "kube-scheduler": make_leaf(ca, "system:kube-scheduler"),
        "kube-proxy": make_leaf(ca, "system:kube-proxy"),
        "kube-node": make_leaf(ca, "system:node", "system:nodes"),
        "kube-admin": make_leaf(ca, "kube-admin", "system:masters"),
        "kube-service-account-token": make_leaf(ca, "kube-service-account-token"),
        "kube-apiserver-requestheader-ca": rh,
        "kube-apiserver-proxy-client": make_leaf(rh, "kube-apiserver-proxy-client"),
    }
    for node in etcd_hosts:
        out[f"kube-etcd-{dashed(node.internal)}"] = make_leaf(ca, "kube-etcd", sans=etcd_sans,
                                                              server=True)
    return out


def _env_name(name: str) -> str:
    return name.upper().replace("-", "_")


def bundle_entry(name: str, pair: Pair) -> dict[str, Any]:
    """One certificatesBundle entry with RKE's JSON field names."""
    kubeconfig = name not in ("kube-ca", "kube-apiserver-requestheader-ca", "kube-apiserver",
                              "kube-service-account-token") and not name.startswith("kube-etcd-")
    return {
        "certificatePEM": pair.cert_pem,
        "keyPEM": pair.key_pem,
        "config": "",  # RKE fills component kubeconfigs here; rkel does not read them
        "name": name,
        "commonName": pair.common_name,
        "ouName": pair.ou,
        "envName": _env_name(name),
        "path": f"{SSL}/{name}.pem",
        "keyEnvName": _env_name(name) + "_KEY",
        "keyPath": f"{SSL}/{name}-key.pem",
        "configEnvName": _env_name(name) + "_CONFIG" if kubeconfig else "",
        "configPath": f"{SSL}/kubecfg-{name}.yaml" if kubeconfig else "",
    }


def rkestate(config: ClusterConfig, pki: dict[str, Pair], version: str = "") -> dict[str, Any]:
    """RKE's state file for `config` with `pki` (the same in desiredState and currentState)."""
    rke_config = {
        "cluster_name": config.cluster_name,
        "kubernetes_version": version or config.kubernetes_version,
        "nodes": [{"address": n.address, "internal_address": n.internal,
                   "hostname_override": n.name, "user": n.user, "role": list(n.role)}
                  for n in config.nodes],
        "services": {"kube-api": {"service_cluster_ip_range":
                                  config.services.kube_api.service_cluster_ip_range}},
    }
    bundle = {name: bundle_entry(name, pair) for name, pair in sorted(pki.items())}
    state = {"rkeConfig": rke_config, "certificatesBundle": bundle, "encryptionConfig": ""}
    return {"desiredState": state, "currentState": json.loads(json.dumps(state))}


def write_rkestate(path: Path, config: ClusterConfig, pki: dict[str, Pair],
                   version: str = "") -> Path:
    path.write_text(json.dumps(rkestate(config, pki, version), indent=2))
    return path


def node_files(config: ClusterConfig, pki: dict[str, Pair], node_name: str) -> dict[str, bytes]:
    """The certificate files RKE deploys to one node (pki/deploy.go): for controlplane and etcd
    nodes every certificate but kube-admin, CA keys on controlplane nodes only; for workers
    kube-ca, kube-node and kube-proxy (and no CA key)."""
    node = next(n for n in config.nodes if n.name == node_name)
    if "controlplane" in node.role or "etcd" in node.role:
        names = [n for n in pki if n != "kube-admin"]
    else:
        names = ["kube-ca", "kube-node", "kube-proxy"]
    files: dict[str, bytes] = {}
    for name in names:
        files[f"{SSL}/{name}.pem"] = pki[name].cert_pem.encode()
        if not (name == "kube-ca" and "controlplane" not in node.role):
            files[f"{SSL}/{name}-key.pem"] = pki[name].key_pem.encode()
    return files


def key_bodies(pki: dict[str, Pair]) -> list[str]:
    """Every line of every private key's PEM body (what must never appear in clear)."""
    lines = []
    for pair in pki.values():
        lines += [ln for ln in pair.key_pem.splitlines() if ln and not ln.startswith("-----")]
    return lines
