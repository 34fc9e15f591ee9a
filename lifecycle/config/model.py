"""Typed model of RKE's cluster.yml, with RKE's defaults.

Values only: the loader (`lifecycle.config.loader`) builds these from YAML and the validator checks
them. Field names follow the YAML keys (with `-` spelled `_`). Sections rkel passes through without
interpreting (ingress, dns, monitoring, cloud_provider, ...) stay plain dicts of the YAML content.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("controlplane", "etcd", "worker")
NETWORK_PLUGINS = ("canal", "flannel", "calico", "weave", "none", "aci")
DEFAULT_KUBERNETES_VERSION = "v1.30.5-rancher1-1"


@dataclass(frozen=True)
class Taint:
    key: str
    value: str = ""
    effect: str = "NoSchedule"


@dataclass(frozen=True)
class Node:
    address: str
    user: str
    role: tuple[str, ...]
    port: int = 22
    internal_address: str = ""
    hostname_override: str = ""
    docker_socket: str = "/var/run/docker.sock"
    ssh_key: str = field(default="", repr=False)  # a private key: never logged
    ssh_key_path: str = ""
    ssh_cert: str = field(default="", repr=False)
    ssh_cert_path: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    ssh_agent_auth: bool = False

    @property
    def name(self) -> str:
        """The Kubernetes node name: hostname_override, else the address, lower-cased (as RKE)."""
        return (self.hostname_override or self.address).lower()

    @property
    def internal(self) -> str:
        """Address for intra-cluster traffic: internal_address, else address."""
        return self.internal_address or self.address


@dataclass(frozen=True)
class BaseService:
    image: str = ""
    extra_args: dict[str, str] = field(default_factory=dict)
    extra_args_array: dict[str, list[str]] = field(default_factory=dict)
    extra_binds: list[str] = field(default_factory=list)
    extra_env: list[str] = field(default_factory=list)
    # The same for Windows nodes (RKE's win_* keys); rkel keeps them so nothing is dropped silently.
    win_extra_args: dict[str, str] = field(default_factory=dict)
    win_extra_args_array: dict[str, list[str]] = field(default_factory=dict)
    win_extra_binds: list[str] = field(default_factory=list)
    win_extra_env: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class S3BackupConfig:
    access_key: str = ""
    secret_key: str = field(default="", repr=False)
    bucket_name: str = ""
    region: str = ""
    endpoint: str = ""
    custom_ca: str = ""
    folder: str = ""


@dataclass(frozen=True)
class BackupConfig:
    enabled: bool | None = None
    interval_hours: int = 12
    retention: int = 6
    safe_timestamp: bool = False
    timeout: int = 300
    s3backupconfig: S3BackupConfig | None = None


@dataclass(frozen=True)
class EtcdService(BaseService):
    snapshot: bool | None = None
    creation: str = "12h"
    retention: str = "72h"
    backup_config: BackupConfig | None = None
    external_urls: list[str] = field(default_factory=list)
    ca_cert: str = ""
    cert: str = ""
    key: str = field(default="", repr=False)
    path: str = ""
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class KubeAPIService(BaseService):
    service_cluster_ip_range: str = "10.43.0.0/16"
    service_node_port_range: str = "30000-32767"
    pod_security_policy: bool = False
    pod_security_configuration: str = ""
    always_pull_images: bool = False
    secrets_encryption_config: dict[str, Any] | None = None
    audit_log: dict[str, Any] | None = None
    admission_configuration: dict[str, Any] | None = None
    event_rate_limit: dict[str, Any] | None = None


@dataclass(frozen=True)
class KubeControllerService(BaseService):
    cluster_cidr: str = "10.42.0.0/16"
    service_cluster_ip_range: str = "10.43.0.0/16"


@dataclass(frozen=True)
class SchedulerService(BaseService):
    pass


@dataclass(frozen=True)
class KubeletService(BaseService):
    cluster_domain: str = "cluster.local"
    cluster_dns_server: str = "10.43.0.10"
    infra_container_image: str = ""
    fail_swap_on: bool = False
    generate_serving_certificate: bool = False


@dataclass(frozen=True)
class KubeproxyService(BaseService):
    pass


@dataclass(frozen=True)
class Services:
    etcd: EtcdService = field(default_factory=EtcdService)
    kube_api: KubeAPIService = field(default_factory=KubeAPIService)
    kube_controller: KubeControllerService = field(default_factory=KubeControllerService)
    scheduler: SchedulerService = field(default_factory=SchedulerService)
    kubelet: KubeletService = field(default_factory=KubeletService)
    kubeproxy: KubeproxyService = field(default_factory=KubeproxyService)


@dataclass(frozen=True)
class Network:
    plugin: str = "canal"
    options: dict[str, str] = field(default_factory=dict)
    mtu: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # node_selector, tolerations, ... as given


@dataclass(frozen=True)
class DrainInput:
    force: bool = False
    ignore_daemonsets: bool = True
    delete_local_data: bool = False
    grace_period: int = -1
    timeout: int = 120


@dataclass(frozen=True)
class UpgradeStrategy:
    max_unavailable_worker: str = "10%"
    max_unavailable_controlplane: str = "1"
    drain: bool = False
    node_drain_input: DrainInput = field(default_factory=DrainInput)


@dataclass(frozen=True)
class BastionHost:
    address: str
    user: str = ""
    port: int = 22
    ssh_key: str = field(default="", repr=False)
    ssh_key_path: str = ""
    ssh_cert: str = field(default="", repr=False)
    ssh_cert_path: str = ""
    ssh_agent_auth: bool = False
    ignore_proxy_env_vars: bool = False


@dataclass(frozen=True)
class PrivateRegistry:
    url: str
    user: str = ""
    password: str = field(default="", repr=False)  # a secret: never logged or stored in clear
    is_default: bool = False
    # {aws_access_key_id, aws_secret_access_key, aws_session_token}: secrets, never logged
    ecr_credential_plugin: dict[str, str] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Authentication:
    strategy: str = "x509"
    sans: list[str] = field(default_factory=list)
    webhook: dict[str, Any] | None = None


@dataclass(frozen=True)
class Authorization:
    mode: str = "rbac"
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterConfig:
    nodes: tuple[Node, ...]
    services: Services = field(default_factory=Services)
    network: Network = field(default_factory=Network)
    authentication: Authentication = field(default_factory=Authentication)
    authorization: Authorization = field(default_factory=Authorization)
    addons: str = ""
    addons_include: list[str] = field(default_factory=list)
    system_images: dict[str, str] = field(default_factory=dict)
    ssh_key_path: str = "~/.ssh/id_rsa"
    ssh_cert_path: str = ""
    ssh_agent_auth: bool = False
    bastion_host: BastionHost | None = None
    private_registries: tuple[PrivateRegistry, ...] = ()
    ingress: dict[str, Any] = field(default_factory=dict)
    dns: dict[str, Any] | None = None
    monitoring: dict[str, Any] = field(default_factory=dict)
    cluster_name: str = "local"
    kubernetes_version: str = ""
    prefix_path: str = ""
    upgrade_strategy: UpgradeStrategy = field(default_factory=UpgradeStrategy)
    addon_job_timeout: int = 45
    ignore_docker_version: bool | None = None
    enable_cri_dockerd: bool | None = None
    cloud_provider: dict[str, Any] | None = None
    restore: dict[str, Any] = field(default_factory=dict)
    rotate_encryption_key: bool = False
    win_prefix_path: str = ""
    rotate_certificates: dict[str, Any] | None = None
    cri_dockerd_stream_server_address: str = ""
    cri_dockerd_stream_server_port: str = ""

    @property
    def version(self) -> str:
        """kubernetes_version, or rkel's default when the file gives none."""
        return self.kubernetes_version or DEFAULT_KUBERNETES_VERSION

    def nodes_with(self, role: str) -> tuple[Node, ...]:
        """Nodes that have `role`, in file order."""
        return tuple(n for n in self.nodes if role in n.role)
