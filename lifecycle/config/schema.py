"""Every key RKE v1.6 accepts in cluster.yml, as data, plus the table of keys RKE ignores.

Taken from rancher/rke `types/rke_types.go` (the `yaml:` tags; where a field has only a `json:` tag
RKE's yaml.v2 reads the lower-cased Go field name, and where RKE re-parses a section through JSON
the json name is accepted too). The walker (`lifecycle.config.walk`) checks a file against this
tree; nothing here runs any logic. `LEGACY`, at the end, is the table of keys RKE ignores; each
`Struct` names its row.

Sub-trees that are Kubernetes API objects (update strategies, extra volumes, audit policies,
admission plugin configurations, cloud provider configs) are `FREE`: rkel hands them on as given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeAlias


@dataclass(frozen=True)
class Scalar:
    """A scalar of one kind: "str" keeps the literal text (as yaml.v2 does), others are parsed."""

    kind: str  # "str" | "int" | "bool" | "float"
    minimum: int | None = None
    maximum: int | None = None
    secret: bool = False  # never echo the value in a message


@dataclass(frozen=True)
class Seq:
    """A YAML list whose items all follow `item`."""

    item: Spec


@dataclass(frozen=True)
class MapOf:
    """A mapping with free key names (labels, extra_args) whose values follow `value`."""

    value: Spec


@dataclass(frozen=True)
class Free:
    """Anything at all: a pass-through sub-tree."""


@dataclass(frozen=True)
class Legacy:
    """A key RKE ignores (or once spelled differently) that real files carry: a warning only."""

    message: str  # what RKE did with it
    hint: str = ""  # what the user probably wants
    load_as: str | None = None  # load the value under this key instead of dropping it
    spec: Spec = field(default_factory=Free)
    quiet_when_empty: bool = False  # no warning when the value is false / empty / null


@dataclass(frozen=True)
class Struct:
    """A mapping with a fixed set of keys (a Go struct)."""

    fields: Mapping[str, Spec]
    legacy: str = ""  # the row of LEGACY that lists the ignored keys of this struct


Spec: TypeAlias = Scalar | Seq | MapOf | Struct | Free

STR = Scalar("str")
SECRET = Scalar("str", secret=True)
INT = Scalar("int")
FLOAT = Scalar("float")
BOOL = Scalar("bool")
PORT = Scalar("int", minimum=1, maximum=65535)
FREE = Free()
STR_LIST = Seq(STR)
STR_MAP = MapOf(STR)

# Current RKE system_images keys (RKESystemImages).
SYSTEM_IMAGE_KEYS = (
    "etcd", "alpine", "nginx_proxy", "cert_downloader", "kubernetes_services_sidecar", "kubedns",
    "dnsmasq", "kubedns_sidecar", "kubedns_autoscaler", "coredns", "coredns_autoscaler",
    "nodelocal", "kubernetes", "flannel", "flannel_cni", "calico_node", "calico_cni",
    "calico_controllers", "calico_ctl", "calico_flexvol", "canal_node", "canal_cni",
    "canal_controllers", "canal_flannel", "canal_flexvol", "weave_node", "weave_cni",
    "pod_infra_container", "ingress", "ingress_backend", "ingress_webhook", "metrics_server",
    "windows_pod_infra_container", "aci_cni_deploy_container", "aci_host_container",
    "aci_opflex_container", "aci_mcast_container", "aci_ovs_container", "aci_controller_container",
    "aci_gbp_server_container", "aci_opflex_server_container",
)  # fmt: skip


def _old_image(new: str) -> Legacy:
    return Legacy(
        "an old system_images key that RKE no longer reads, so it uses its default image instead",
        hint=f"did you mean `{new}`?",
    )


def _gone_image(what: str) -> Legacy:
    return Legacy(f"RKE no longer deploys {what}, so it ignores this image", hint="remove it")


TOLERATIONS = Seq(
    Struct({"key": STR, "operator": STR, "value": STR, "effect": STR, "tolerationSeconds": INT})
)

BASE_SERVICE: dict[str, Spec] = {
    "image": STR,
    "extra_args": STR_MAP,
    "extra_args_array": MapOf(STR_LIST),
    "extra_binds": STR_LIST,
    "extra_env": STR_LIST,
    "win_extra_args": STR_MAP,
    "win_extra_args_array": MapOf(STR_LIST),
    "win_extra_binds": STR_LIST,
    "win_extra_env": STR_LIST,
}

S3_BACKUP = Struct(
    {
        "access_key": STR,
        "secret_key": SECRET,
        "bucket_name": STR,
        "region": STR,
        "endpoint": STR,
        "custom_ca": STR,
        "folder": STR,
    }
)

ETCD = Struct(
    {
        **BASE_SERVICE,
        "external_urls": STR_LIST,
        "ca_cert": STR,
        "cert": STR,
        "key": SECRET,
        "path": STR,
        "uid": INT,
        "gid": INT,
        "snapshot": BOOL,
        "retention": STR,
        "creation": STR,
        "backup_config": Struct(
            {
                "enabled": BOOL,
                "interval_hours": INT,
                "retention": INT,
                "s3backupconfig": S3_BACKUP,
                "safe_timestamp": BOOL,
                "timeout": INT,
            }
        ),
    }
)

KUBE_API = Struct(
    {
        **BASE_SERVICE,
        "service_cluster_ip_range": STR,
        "service_node_port_range": STR,
        "pod_security_configuration": STR,
        "always_pull_images": BOOL,
        "secrets_encryption_config": Struct({"enabled": BOOL, "custom_config": FREE}),
        "audit_log": Struct({"enabled": BOOL, "configuration": FREE}),
        "admission_configuration": Struct(
            {
                "apiVersion": STR,
                "kind": STR,
                "plugins": Seq(Struct({"name": STR, "path": STR, "configuration": FREE})),
            }
        ),
        "event_rate_limit": Struct({"enabled": BOOL, "configuration": FREE}),
    },
    legacy="kube-api",
)

SERVICES = Struct(
    {
        "etcd": ETCD,
        "kube-api": KUBE_API,
        "kube-controller": Struct(
            {**BASE_SERVICE, "cluster_cidr": STR, "service_cluster_ip_range": STR}
        ),
        "scheduler": Struct(BASE_SERVICE),
        "kubelet": Struct(
            {
                **BASE_SERVICE,
                "cluster_domain": STR,
                "infra_container_image": STR,
                "cluster_dns_server": STR,
                "fail_swap_on": BOOL,
                "generate_serving_certificate": BOOL,
            }
        ),
        "kubeproxy": Struct(BASE_SERVICE),
    },
    legacy="services",
)

NODE = Struct(
    {
        "nodeName": STR,
        "address": STR,
        "port": PORT,
        "internal_address": STR,
        "role": STR_LIST,
        "hostname_override": STR,
        "user": STR,
        "docker_socket": STR,
        "ssh_agent_auth": BOOL,
        "ssh_key": SECRET,
        "ssh_key_path": STR,
        "ssh_cert": SECRET,
        "ssh_cert_path": STR,
        "labels": STR_MAP,
        "taints": Seq(Struct({"key": STR, "value": STR, "effect": STR, "timeAdded": STR})),
    }
)

NETWORK = Struct(
    {
        "plugin": STR,
        "options": STR_MAP,
        "mtu": INT,
        # yaml.v2 reads the lower-cased Go name; the docs spell it cloud_provider.
        "calico_network_provider": Struct({"cloud_provider": STR, "cloudprovider": STR}),
        "canal_network_provider": Struct({"iface": STR, "blackhole_route": STR}),
        "flannel_network_provider": Struct({"iface": STR}),
        "weave_network_provider": Struct({"password": SECRET}),
        "aci_network_provider": FREE,  # ~100 Cisco ACI settings, passed through
        "node_selector": STR_MAP,
        "update_strategy": FREE,
        "tolerations": TOLERATIONS,
        "enable_br_netfilter": BOOL,
    }
)

AUTHENTICATION = Struct(
    {
        "strategy": STR,
        "sans": STR_LIST,
        "webhook": Struct({"config_file": STR, "cache_timeout": STR}),
    },
    legacy="authentication",
)

INGRESS = Struct(
    {
        "provider": STR,
        "options": STR_MAP,
        "node_selector": STR_MAP,
        "extra_args": STR_MAP,
        "dns_policy": STR,
        "extra_envs": Seq(FREE),
        "extra_volumes": Seq(FREE),
        "extra_volume_mounts": Seq(FREE),
        "update_strategy": FREE,
        "http_port": INT,
        "https_port": INT,
        "network_mode": STR,
        "tolerations": TOLERATIONS,
        "default_backend": BOOL,
        "default_http_backend_priority_class_name": STR,
        "nginx_ingress_controller_priority_class_name": STR,
        "default_ingress_class": BOOL,
    }
)

DNS = Struct(
    {
        "provider": STR,
        "options": STR_MAP,
        "upstreamnameservers": STR_LIST,
        "reversecidrs": STR_LIST,
        "stubdomains": MapOf(STR_LIST),
        "node_selector": STR_MAP,
        "nodelocal": Struct(
            {
                "ip_address": STR,
                "update_strategy": FREE,
                "node_selector": STR_MAP,
                "node_local_dns_priority_class_name": STR,
            }
        ),
        "update_strategy": FREE,
        "linear_autoscaler_params": Struct(
            {
                "cores_per_replica": FLOAT,
                "nodes_per_replica": FLOAT,
                "min": INT,
                "max": INT,
                "prevent_single_point_failure": BOOL,
            }
        ),
        "tolerations": TOLERATIONS,
    }
)

MONITORING = Struct(
    {
        "provider": STR,
        "options": STR_MAP,
        "node_selector": STR_MAP,
        "update_strategy": FREE,
        "replicas": INT,
        "tolerations": TOLERATIONS,
        "metrics_server_priority_class_name": STR,
    }
)

CLOUD_PROVIDER = Struct(
    {
        "name": STR,
        "useInstanceMetadataHostname": BOOL,
        "awsCloudProvider": FREE,
        "azureCloudProvider": FREE,
        "openstackCloudProvider": FREE,
        "vsphereCloudProvider": FREE,
        "harvesterCloudProvider": FREE,
        "customCloudProvider": STR,
    }
)

BASTION_HOST = Struct(
    {
        "address": STR,
        "port": PORT,
        "user": STR,
        "ssh_agent_auth": BOOL,
        "ssh_key": SECRET,
        "ssh_key_path": STR,
        "ssh_cert": SECRET,
        "ssh_cert_path": STR,
        "ignore_proxy_env_vars": BOOL,
    }
)

PRIVATE_REGISTRY = Struct(
    {
        "url": STR,
        "user": STR,
        "password": SECRET,
        "is_default": BOOL,
        "ecr_credential_plugin": Struct(
            {
                "aws_access_key_id": STR,
                "aws_secret_access_key": SECRET,
                "aws_session_token": SECRET,
            }
        ),
    },
    legacy="private_registry",
)

UPGRADE_STRATEGY = Struct(
    {
        "max_unavailable_worker": STR,
        "max_unavailable_controlplane": STR,
        "drain": BOOL,
        "node_drain_input": Struct(
            {
                "force": BOOL,
                "ignore_daemonsets": BOOL,
                "delete_local_data": BOOL,
                "grace_period": INT,
                "timeout": INT,
            }
        ),
    }
)

CLUSTER = Struct(
    {
        "nodes": Seq(NODE),
        "services": SERVICES,
        "network": NETWORK,
        "authentication": AUTHENTICATION,
        "addons": STR,
        "addons_include": STR_LIST,
        "system_images": Struct({key: STR for key in SYSTEM_IMAGE_KEYS}, legacy="system_images"),
        "ssh_key_path": STR,
        "ssh_cert_path": STR,
        "ssh_agent_auth": BOOL,
        "authorization": Struct({"mode": STR, "options": STR_MAP}),
        "ignore_docker_version": BOOL,
        "enable_cri_dockerd": BOOL,
        "kubernetes_version": STR,
        "private_registries": Seq(PRIVATE_REGISTRY),
        "ingress": INGRESS,
        "cluster_name": STR,
        "cloud_provider": CLOUD_PROVIDER,
        "prefix_path": STR,
        "win_prefix_path": STR,
        "addon_job_timeout": INT,
        "bastion_host": BASTION_HOST,
        "monitoring": MONITORING,
        "restore": Struct({"restore": BOOL, "snapshot_name": STR}),
        "rotate_certificates": FREE,  # set by `rke cert rotate`, not by hand
        "rotate_encryption_key": BOOL,
        "dns": DNS,
        "upgrade_strategy": UPGRADE_STRATEGY,
        "cri_dockerd_stream_server_address": STR,
        "cri_dockerd_stream_server_port": STR,
    },
    legacy="cluster",
)


# The keys real files carry that RKE ignores (or, for `auth`, once spelled differently), by the
# struct they appear in. Each loads with a warning instead of failing the file.
LEGACY: dict[str, dict[str, Legacy]] = {
    "cluster": {
        # Renamed to `authentication` in Jan 2018; rkel still honours it (RKE now ignores it).
        "auth": Legacy(
            "`auth` is the pre-2018 spelling of `authentication`; current RKE ignores it, "
            "rkel loads it as `authentication`",
            hint="rename it to `authentication`",
            load_as="authentication",
            spec=AUTHENTICATION,
        ),
    },
    "authentication": {
        "options": Legacy(
            "`options` was removed from authentication; RKE ignores it",
            hint="remove it",
            quiet_when_empty=True,
        ),
    },
    "services": {
        "etcd-snapshot": Legacy(
            "`etcd-snapshot` is not an RKE key and RKE ignored it, so no recurring snapshots "
            "were configured by it",
            hint="use services.etcd.snapshot/creation/retention, or "
            "services.etcd.backup_config (enabled, interval_hours, retention)",
        ),
    },
    "kube-api": {
        # A real field until RKE v1.4; Kubernetes 1.25 removed PodSecurityPolicy.
        "pod_security_policy": Legacy(
            "PodSecurityPolicy was removed in Kubernetes 1.25 and RKE v1.6 ignores this key",
            hint="use `pod_security_configuration` or `admission_configuration` instead",
            load_as="pod_security_policy",
            spec=BOOL,
            quiet_when_empty=True,
        ),
    },
    "private_registry": {
        "username": Legacy(
            "RKE ignores `username`, so this registry is used WITHOUT credentials",
            hint="did you mean `user`?",
        ),
    },
    "system_images": {
        **{f"{key}_image": _old_image(key) for key in SYSTEM_IMAGE_KEYS},
        # The real yaml tag of weave_node until Nov 2018; older `rke config` dumps still have it.
        "wave_node": _old_image("weave_node"),
        "wave_cni": _old_image("weave_cni"),
        "dashboard": _gone_image("the Kubernetes dashboard"),
        "heapster": _gone_image("heapster"),
        "grafana": _gone_image("grafana (heapster)"),
        "influxdb": _gone_image("influxdb (heapster)"),
        "tiller": _gone_image("tiller"),
    },
}
