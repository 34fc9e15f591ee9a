"""Which certificates each node needs, and where their files live on the node.

Part of the desired-state compiler (`lifecycle.desired`): pure functions of the config that name
certificates, their subjects and SANs. Generating keys and signing is the PKI code's job.

Names are file stems under /etc/kubernetes/ssl (`<name>.pem`, `<name>-key.pem`). A request whose
`ca` equals its own `name` is a self-signed CA (see `is_ca`). CA private keys are never delivered
to nodes: a node receives only the CA certificate, so a stolen node cannot mint identities.

Beyond RKE: etcd has its own CA (`kube-etcd-ca`) and the apiserver talks to etcd with its own
client certificate (`kube-apiserver-etcd-client`); every kubelet has its own identity
(`kube-node-<node name>`, CN system:node:<node name>) instead of one shared system:node cert. The
kubelet's kubeconfig keeps RKE's file name (kubecfg-kube-node.yaml) but points at the node's own
certificate.
"""

from __future__ import annotations

import ipaddress

from lifecycle.config.model import ClusterConfig, Node
from lifecycle.spec import CertRequest

SSL_DIR = "/etc/kubernetes/ssl"

KUBE_CA = "kube-ca"
ETCD_CA = "kube-etcd-ca"
REQUESTHEADER_CA = "kube-apiserver-requestheader-ca"
KUBE_APISERVER = "kube-apiserver"
KUBE_CONTROLLER_MANAGER = "kube-controller-manager"
KUBE_SCHEDULER = "kube-scheduler"
KUBE_PROXY = "kube-proxy"
KUBE_ADMIN = "kube-admin"
SERVICE_ACCOUNT_TOKEN = "kube-service-account-token"
PROXY_CLIENT = "kube-apiserver-proxy-client"
APISERVER_ETCD_CLIENT = "kube-apiserver-etcd-client"
# The kubeconfig name RKE gives the kubelet; the file references the node's own certificate.
KUBE_NODE_KUBECONFIG = "kube-node"
# For `services.etcd.external_urls`: material the user supplies (RKE's names).
EXTERNAL_ETCD_CLIENT = "kube-etcd-client"
EXTERNAL_ETCD_CA = "kube-etcd-client-ca"


def cert_path(name: str) -> str:
    return f"{SSL_DIR}/{name}.pem"


def key_path(name: str) -> str:
    return f"{SSL_DIR}/{name}-key.pem"


def kubeconfig_path(name: str) -> str:
    return f"{SSL_DIR}/kubecfg-{name}.yaml"


def is_ca(req: CertRequest) -> bool:
    """A self-signed CA: only its certificate goes to nodes, never its key."""
    return req.ca == req.name


def _dashed(address: str) -> str:
    return address.replace(".", "-").replace(":", "-")


def etcd_cert_name(node: Node) -> str:
    """kube-etcd-<internal address with dashes>, as RKE names it."""
    return f"kube-etcd-{_dashed(node.internal)}"


def node_cert_name(node: Node) -> str:
    """The kubelet's own client identity: kube-node-<node name>."""
    return f"kube-node-{node.name}"


def kubelet_serving_cert_name(node: Node) -> str:
    """kube-kubelet-<internal address with dashes> (only with generate_serving_certificate)."""
    return f"kube-kubelet-{_dashed(node.internal)}"


def first_service_ips(cidrs: str) -> list[str]:
    """The first usable IP of each comma-separated service CIDR (10.43.0.0/16 -> 10.43.0.1)."""
    out = []
    for cidr in cidrs.split(","):
        cidr = cidr.strip()
        if cidr:
            net = ipaddress.ip_network(cidr, strict=False)
            out.append(str(net.network_address + 1))
    return out


def _sorted_unique(values: list[str]) -> tuple[str, ...]:
    return tuple(sorted({v for v in values if v}))


def apiserver_sans(config: ClusterConfig) -> tuple[str, ...]:
    """SANs of kube-apiserver, as RKE computes them; sorted and deduplicated."""
    cluster_domain = config.services.kubelet.cluster_domain
    sans: list[str] = []
    for node in config.nodes_with("controlplane"):
        sans += [node.address, node.internal, node.name]
    sans += list(config.authentication.sans)
    sans += ["127.0.0.1", "localhost"]
    sans += first_service_ips(config.services.kube_api.service_cluster_ip_range)
    sans += [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        f"kubernetes.default.svc.{cluster_domain}",
    ]
    return _sorted_unique(sans)


def etcd_sans(node: Node) -> tuple[str, ...]:
    """SANs of one member's certificate: its own addresses and name, plus loopback.

    RKE lists every etcd node in every member's certificate, so adding or removing a member
    changes all of them and restarts every member. A member's certificate only needs the names
    it is reached by: membership changes leave the others untouched."""
    sans = [node.address, node.internal, node.name, "127.0.0.1", "localhost"]
    return _sorted_unique(sans)


def cluster_certs() -> tuple[CertRequest, ...]:
    """Certificates rkel itself uses and no node gets: the admin identity (kubeconfig, health
    checks run through the SSH connection). RKE copies kube-admin to every controlplane node."""
    return (CertRequest(KUBE_ADMIN, KUBE_ADMIN, ("system:masters",)),)


def node_certs(config: ClusterConfig, node: Node) -> tuple[CertRequest, ...]:
    """Every certificate `node` needs, sorted by name."""
    reqs: list[CertRequest] = [
        CertRequest(KUBE_CA, KUBE_CA, ca=KUBE_CA),
        CertRequest(node_cert_name(node), f"system:node:{node.name}", ("system:nodes",)),
        CertRequest(KUBE_PROXY, "system:kube-proxy"),
    ]
    if config.services.kubelet.generate_serving_certificate:
        reqs.append(
            CertRequest(
                kubelet_serving_cert_name(node),
                node.name,
                sans=_sorted_unique([node.address, node.internal, node.name]),
            )
        )
    if "controlplane" in node.role:
        reqs += [
            CertRequest(KUBE_APISERVER, KUBE_APISERVER, sans=apiserver_sans(config)),
            CertRequest(KUBE_CONTROLLER_MANAGER, "system:kube-controller-manager"),
            CertRequest(KUBE_SCHEDULER, "system:kube-scheduler"),
            CertRequest(SERVICE_ACCOUNT_TOKEN, SERVICE_ACCOUNT_TOKEN),
            CertRequest(REQUESTHEADER_CA, REQUESTHEADER_CA, ca=REQUESTHEADER_CA),
            CertRequest(PROXY_CLIENT, PROXY_CLIENT, ca=REQUESTHEADER_CA),
        ]
        if not config.services.etcd.external_urls:
            # The apiserver checks etcd's serving certs against the etcd CA (certificate only).
            reqs += [
                CertRequest(ETCD_CA, ETCD_CA, ca=ETCD_CA),
                CertRequest(APISERVER_ETCD_CLIENT, APISERVER_ETCD_CLIENT, ca=ETCD_CA),
            ]
    if "etcd" in node.role:
        reqs += [
            CertRequest(ETCD_CA, ETCD_CA, ca=ETCD_CA),
            CertRequest(
                etcd_cert_name(node), etcd_cert_name(node), sans=etcd_sans(node), ca=ETCD_CA
            ),
        ]
    unique = {r.name: r for r in reqs}
    return tuple(unique[name] for name in sorted(unique))
