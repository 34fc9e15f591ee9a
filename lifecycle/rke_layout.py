"""RKE's own certificate layout, kept for a cluster adopted from RKE (`rkel import`).

An adopted cluster runs with the certificates RKE made and delivered: one CA (`kube-ca`) that
etcd trusts too, one `kube-node` certificate (CN system:node) shared by every kubelet and used
by the apiserver as its etcd client, and `kube-etcd-<ip>` member certificates naming every etcd
node. Changing any of that would restart every component with new trust, so an adopted cluster
keeps this layout (the state records `pki_layout: rke`) and the compiler builds its specs on it.
Pure functions of the config, like `lifecycle.desired_certs`.
"""

from __future__ import annotations

from typing import Any

from lifecycle import desired_certs as certs
from lifecycle.config.model import ClusterConfig, Node
from lifecycle.spec import CertRequest

RKEL = "rkel"
RKE = "rke"
LAYOUTS = (RKEL, RKE)
LAYOUT_META = "pki_layout"  # the state's cluster key that records the layout

KUBE_NODE = "kube-node"  # one client certificate for every kubelet (CN system:node)


def etcd_ca(layout: str) -> str:
    """The CA etcd trusts: kube-ca in RKE's layout, the separate etcd CA in rkel's."""
    return certs.KUBE_CA if layout == RKE else certs.ETCD_CA


def apiserver_etcd_client(layout: str) -> str:
    """The apiserver's client certificate towards etcd (RKE uses the shared kube-node one)."""
    return KUBE_NODE if layout == RKE else certs.APISERVER_ETCD_CLIENT


def etcd_member_sans(config: ClusterConfig) -> tuple[str, ...]:
    """SANs of every member's certificate, as RKE makes them: every etcd node, plus loopback."""
    sans: list[str] = ["127.0.0.1", "localhost"]
    for node in config.nodes_with("etcd"):
        sans += [node.address, node.internal, node.name]
    return tuple(sorted({s for s in sans if s}))


def node_certs(config: ClusterConfig, node: Node) -> tuple[CertRequest, ...]:
    """Every certificate `node` needs in RKE's layout, sorted by name."""
    reqs: list[CertRequest] = [
        CertRequest(certs.KUBE_CA, certs.KUBE_CA, ca=certs.KUBE_CA),
        CertRequest(KUBE_NODE, "system:node", ("system:nodes",)),
        CertRequest(certs.KUBE_PROXY, "system:kube-proxy"),
    ]
    if config.services.kubelet.generate_serving_certificate:
        reqs.append(
            CertRequest(
                certs.kubelet_serving_cert_name(node),
                node.name,
                sans=tuple(sorted({node.address, node.internal, node.name})),
            )
        )
    if "controlplane" in node.role:
        reqs += [
            CertRequest(certs.KUBE_APISERVER, certs.KUBE_APISERVER,
                        sans=certs.apiserver_sans(config)),
            CertRequest(certs.KUBE_CONTROLLER_MANAGER, "system:kube-controller-manager"),
            CertRequest(certs.KUBE_SCHEDULER, "system:kube-scheduler"),
            CertRequest(certs.SERVICE_ACCOUNT_TOKEN, certs.SERVICE_ACCOUNT_TOKEN),
            CertRequest(certs.REQUESTHEADER_CA, certs.REQUESTHEADER_CA,
                        ca=certs.REQUESTHEADER_CA),
            CertRequest(certs.PROXY_CLIENT, certs.PROXY_CLIENT, ca=certs.REQUESTHEADER_CA),
        ]
    if "etcd" in node.role:
        name = certs.etcd_cert_name(node)
        reqs.append(CertRequest(name, name, sans=etcd_member_sans(config)))
    unique = {r.name: r for r in reqs}
    return tuple(unique[name] for name in sorted(unique))


def layout_of(store: Any) -> str:
    """The certificate layout a state's cluster runs with: "rkel", or "rke" once adopted."""
    return str(store.get_meta(LAYOUT_META, RKEL) or RKEL)
