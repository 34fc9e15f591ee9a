"""The desired-state compiler: ClusterConfig -> Desired, a pure function.

For every node it computes the containers it should run (ServiceSpecs, in start order) and the
certificates it needs (see `lifecycle.desired_certs`), following RKE v1.6 (cluster/plan.go and
its metadata). Per-version images and default flags come from data (`lifecycle.versions`).

Flag precedence per component, as RKE: built-in flags (computed here) < per-version defaults (an
empty value deletes) < `extra_args` (an empty value deletes too) < `extra_args_array`
(appended, one `--flag=value` per value). Flags render as `--flag=value`, sorted, so a spec and
its hash are the same on every run. etcd's `--initial-cluster*` flags go to `bootstrap_args`,
outside the hash, so a membership change does not restart existing members.

Deliberate RKE v1.6 behaviours kept: binds carry no `:z` (RKE drops SELinux relabelling from
Kubernetes 1.22 on); etcd listens on 0.0.0.0 when a node has no separate internal address (a
DNATed public address cannot be bound); enable_cri_dockerd defaults to true. Never in a spec:
passwords (registry credentials), private keys, or anything read from a host.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, TypeVar

from lifecycle import desired_certs as certs
from lifecycle import encryption, rke_layout
from lifecycle.config.model import BaseService, ClusterConfig, EtcdService, KubeAPIService, Node
from lifecycle.desired_args import (
    CONTROLPLANE_TAINT,
    flag_overrides,
    has_registry_host,
    kubelet_may_set_label,
    merge_flags,
    node_labels,
    node_taints,
    registry_host,
    render,
    render_args,
    taint_text,
    unique,
)
from lifecycle.errors import PlanError
from lifecycle.spec import (
    CertRequest,
    Desired,
    HealthCheck,
    NodeDesired,
    ServiceSpec,
    Strategy,
    cert_hash,
    gc_paused,
    sha256_hex,
)
from lifecycle.versions import (  # noqa: F401  (supported_versions, version_info: re-exported)
    VersionCatalog,
    VersionInfo,
    default_catalog,
    supported_versions,
    version_info,
)

CONTAINER_NAME_LABEL = "io.rancher.rke.container.name"
RKE_TOOLS_ENTRYPOINT = "/opt/rke-tools/entrypoint.sh"
ETCD_DATA_DIR = "/var/lib/rancher/etcd"  # inside the container; the host side is /var/lib/etcd
SIDEKICK = "service-sidekick"  # carries /opt/rke-tools (entrypoint.sh) to the components
ROLLING_SNAPSHOTS = "etcd-rolling-snapshots"  # RKE's recurring snapshots, beside etcd
RKE_ETCD_BACKUP = "/opt/rke-tools/rke-etcd-backup"  # in the rke-tools image
SNAPSHOT_DIR = "/opt/rke/etcd-snapshots"  # RKE's snapshot folder on every etcd node
ETCD_BOOTSTRAP_FLAGS = ("initial-cluster", "initial-cluster-state", "initial-cluster-token")
ETCD_CLUSTER_TOKEN = "etcd-cluster-1"
DOCKER_ROOT_DIR = "/var/lib/docker"  # RKE reads it from `docker info`; the spec stays host-free
# The same on every node (values: shared rather than built again for each of thousands).
_APISERVER_HEALTH = HealthCheck(
    url="https://127.0.0.1:6443/healthz", client_cert=certs.KUBE_ADMIN, expect="ok"
)
_CONTROLLER_MANAGER_HEALTH = HealthCheck(url="https://127.0.0.1:10257/healthz", expect="ok")
_SCHEDULER_HEALTH = HealthCheck(url="https://127.0.0.1:10259/healthz", expect="ok")
_KUBELET_HEALTH = HealthCheck(url="http://127.0.0.1:10248/healthz", expect="ok")
_KUBE_PROXY_HEALTH = HealthCheck(url="http://127.0.0.1:10256/healthz")

V = TypeVar("V")


@gc_paused
def compile_desired(config: ClusterConfig, catalog: VersionCatalog | None = None,
                    encryption_keys: tuple[str, ...] | None = None,
                    pki_layout: str = "rkel",
                    rotations: Mapping[str, int] | None = None) -> Desired:
    """The whole cluster as `config` wants it. Pure: same config, same Desired, same hashes.

    `catalog` defaults to the versions shipped with rkel (tests pass their own).
    `encryption_keys`: the names of the generated secrets encryption keys in use, first one
    encrypting (default: a new cluster's first key; see `lifecycle.encryption`).
    `pki_layout`: "rkel" (rkel's certificates) or "rke" (a cluster adopted from RKE keeps
    RKE's, see `lifecycle.rke_layout`).
    `rotations`: certificate name -> how many times `rkel cert rotate` renewed it (the state
    records it, see `lifecycle.rotate`); none for a cluster never rotated.
    Raises PlanError when config.kubernetes_version has no data in the catalog.
    """
    catalog = catalog or default_catalog()
    version = config.version
    if not catalog.has(version):
        supported = catalog.supported()
        raise PlanError(
            f"kubernetes_version {version} is not supported; supported versions: "
            f"{', '.join(supported)}. Set kubernetes_version to one of them (the closest one "
            f"gives the right flags) and use system_images to pin other images, e.g. "
            f"system_images.kubernetes: rancher/hyperkube:<tag>."
        )
    ctx = _Context(config, catalog.info(version), pki_layout)
    ctx.encryption = encryption.desired(
        config.services.kube_api.secrets_encryption_config, encryption_keys)
    ctx.rotations = dict(rotations or {})
    nodes = tuple(sorted((_node_desired(ctx, n) for n in config.nodes), key=lambda n: n.name))
    return Desired(
        cluster_name=config.cluster_name,
        kubernetes_version=version,
        nodes=nodes,
        strategy=_strategy(config),
        cluster_certs=tuple(_rotated(r, ctx.rotations) for r in certs.cluster_certs()),
        prefix_path=config.prefix_path.rstrip("/"),
        encryption=ctx.encryption.providers if ctx.encryption else (),
        encryption_hash=ctx.encryption.hash if ctx.encryption else "",
    )


class _Context:
    """What every per-node builder needs: the config, the version data and resolved images."""

    def __init__(self, config: ClusterConfig, info: VersionInfo, layout: str = "rkel") -> None:
        self.config = config
        self.info = info
        self.layout = layout
        self.etcd_ca = rke_layout.etcd_ca(layout)
        self.etcd_client = rke_layout.apiserver_etcd_client(layout)
        self.prefix = config.prefix_path.rstrip("/")
        default_registry = next((r.url for r in config.private_registries if r.is_default), "")
        self.registry = registry_host(default_registry)
        s, pinned = config.services, config.system_images
        # system_images > the service's legacy `image:` > the version's default.
        kube_image = pinned.get("kubernetes") or ""
        kube_services: dict[str, BaseService] = {
            "kube-apiserver": s.kube_api,
            "kube-controller-manager": s.kube_controller,
            "kube-scheduler": s.scheduler,
            "kubelet": s.kubelet,
            "kube-proxy": s.kubeproxy,
        }
        self.images = {
            name: self._image(kube_image or svc.image or info.image("kubernetes"))
            for name, svc in kube_services.items()
        }
        self.images["etcd"] = self._image(pinned.get("etcd") or s.etcd.image or info.image("etcd"))
        self.images["nginx-proxy"] = self._image(
            pinned.get("nginx_proxy") or info.image("nginx_proxy")
        )
        self.images[ROLLING_SNAPSHOTS] = self._image(pinned.get("alpine") or info.image("alpine"))
        self.images[SIDEKICK] = self._image(
            pinned.get("kubernetes_services_sidecar") or info.image("kubernetes_services_sidecar")
        )
        self.images["pod-infra"] = self._image(
            pinned.get("pod_infra_container")
            or s.kubelet.infra_container_image
            or info.image("pod_infra_container")
        )
        self.etcd_nodes = sorted(config.nodes_with("etcd"), key=lambda n: n.name)
        self.cp_nodes = sorted(config.nodes_with("controlplane"), key=lambda n: n.name)
        self.rbac = config.authorization.mode == "rbac"
        self.snapshots = recurring_snapshots(s.etcd)
        self.cri_dockerd = config.enable_cri_dockerd is not False  # RKE: true from 1.24 on
        # Per-version defaults and extra_args, normalised once per compile (see flag_overrides).
        self.flags = {
            name: flag_overrides(
                _apiserver_defaults(info, s.kube_api) if name == "kube-apiserver"
                else info.component_flags(name),
                svc,
            )
            for name, svc in {**kube_services, "etcd": s.etcd}.items()
        }
        self._shared: dict[Any, Any] = {}
        self._unique: dict[tuple[str, ...], tuple[str, ...]] = {}
        # The same on every node: built once, shared by the nodes (values, so sharing is safe;
        # and a diff then hashes them once).
        self.sidekick = _sidekick(self)
        self.nginx_proxy = _nginx_proxy(self)
        self.kubelet_mounts = _kubelet_mounts(self)
        self._certs: dict[CertRequest, tuple[CertRequest, str]] = {}
        self.encryption: encryption.Encryption | None = None
        self.rotations: dict[str, int] = {}

    def shared(self, value: V) -> V:
        """One object per distinct value: binds, env, labels, roles... are the same on most
        nodes, and thousands of equal tuples would cost memory and the garbage collector's
        time (every pass visits each of their items)."""
        return self._shared.setdefault(value, value)  # type: ignore[no-any-return]

    def unique(self, items: list[str]) -> tuple[str, ...]:
        """`unique(items)`, shared: computed once per distinct list (most nodes' binds and env
        are the same), then a dict look-up."""
        key = tuple(items)
        hit = self._unique.get(key)
        if hit is None:
            hit = self._unique[key] = self.shared(unique(key))
        return hit

    def cert(self, request: CertRequest) -> tuple[CertRequest, str]:
        """One shared object per distinct certificate request, with its hash (each computed
        once per compile: most requests, such as kube-ca's, are the same on every node)."""
        hit = self._certs.get(request)
        if hit is None:
            hit = self._certs[request] = (request, cert_hash(request))
        return hit

    def _image(self, image: str) -> str:
        """Prefix the default private registry when the reference names no registry host."""
        if not self.registry or has_registry_host(image):
            return image
        return f"{self.registry}/{image}"

    def host(self, path: str) -> str:
        """A host path under prefix_path (RKE's path.Join(prefix, path))."""
        return f"{self.prefix}{path}" if self.prefix else path


def _spec(
    ctx: _Context,
    name: str,
    service: BaseService | None,
    cert_hashes: Mapping[str, str],
    **fields: Any,
) -> ServiceSpec:
    """A ServiceSpec with the service's extra binds and env appended, and its labels (see
    `_labels`; `cert_hashes`: the node's certificates, by name).

    Its tuples are shared with the nodes' equal ones (all but the arguments, which name the
    node, are the same on most nodes)."""
    binds = list(fields.pop("binds", ()))
    env = list(fields.pop("env", ()))
    if service is not None:
        binds += service.extra_binds
        env += service.extra_env
    for key in ("command", "volumes_from"):
        if key in fields:
            fields[key] = ctx.shared(fields[key])
    shared_env = ctx.unique(env)
    reads = fields.get("args", ()) + shared_env + fields.get("command", ())
    return ServiceSpec(
        name=name,
        image=ctx.images[name],
        binds=ctx.unique(binds),
        env=shared_env,
        labels=ctx.shared(_labels(name, reads, cert_hashes)),
        **fields,
    )


_CERT_FILE = re.compile(r"/etc/kubernetes/ssl/(?:kubecfg-)?([A-Za-z0-9.-]+?)(?:-key)?\.(?:pem|yaml)")


def _labels(
    name: str, reads: tuple[str, ...], cert_hashes: Mapping[str, str]
) -> tuple[tuple[str, str], ...]:
    """RKE's container-name label and, when the container reads certificates (named in
    `reads`: its arguments, env and command), the hash of those: a certificate change (a new
    SAN, a rotation) then restarts exactly the services that use it, health-gated."""
    labels = ((CONTAINER_NAME_LABEL, name),)
    used = set(_CERT_FILE.findall(" ".join(reads)))
    if "kube-node" in used:  # kubecfg-kube-node.yaml points at the node's own identity
        used |= {cert for cert in cert_hashes if cert.startswith("kube-node-")}
    hashes = sorted(f"{cert}={cert_hashes[cert]}" for cert in used if cert in cert_hashes)
    if not hashes:
        return labels
    return tuple(sorted(labels + (("io.rkel.certs", sha256_hex(",".join(hashes))[:16]),)))


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _entrypoint(component: str) -> tuple[str, ...]:
    return (RKE_TOOLS_ENTRYPOINT, component)


def _component(
    ctx: _Context,
    name: str,
    service: BaseService | None,
    cert_hashes: Mapping[str, str],
    **fields: Any,
) -> ServiceSpec:
    """A Kubernetes component: run through rke-tools' entrypoint, which the sidekick carries."""
    return _spec(
        ctx, name, service, cert_hashes, command=_entrypoint(name), volumes_from=(SIDEKICK,),
        **fields,
    )


# --- services ------------------------------------------------------------------------------


def _etcd(ctx: _Context, node: Node, cert_hashes: Mapping[str, str]) -> ServiceSpec:
    svc = ctx.config.services.etcd
    own = certs.etcd_cert_name(node)
    listen = "0.0.0.0" if node.address == node.internal else node.internal
    builtin = {
        "name": f"etcd-{node.name}",
        "data-dir": ETCD_DATA_DIR,
        "listen-client-urls": f"https://{listen}:2379",
        "listen-peer-urls": f"https://{listen}:2380",
        "advertise-client-urls": f"https://{node.internal}:2379",
        "initial-advertise-peer-urls": f"https://{node.internal}:2380",
        "trusted-ca-file": certs.cert_path(ctx.etcd_ca),
        "peer-trusted-ca-file": certs.cert_path(ctx.etcd_ca),
        "cert-file": certs.cert_path(own),
        "key-file": certs.key_path(own),
        "peer-cert-file": certs.cert_path(own),
        "peer-key-file": certs.key_path(own),
        # The "new cluster of every desired member" case; the executor replaces these at first
        # start from the live membership (existing cluster: state=existing, current members).
        "initial-cluster": ",".join(
            f"etcd-{n.name}=https://{n.internal}:2380" for n in ctx.etcd_nodes
        ),
        "initial-cluster-state": "new",
        "initial-cluster-token": ETCD_CLUSTER_TOKEN,
    }
    merged = merge_flags(builtin, ctx.flags["etcd"])
    bootstrap = {k: merged.pop(k) for k in ETCD_BOOTSTRAP_FLAGS if k in merged}
    endpoint = "127.0.0.1" if listen == "0.0.0.0" else node.internal
    return _spec(
        ctx,
        "etcd",
        svc,
        cert_hashes,
        command=("/usr/local/bin/etcd",),
        args=render(merged, svc),
        bootstrap_args=tuple(f"--{k}={bootstrap[k]}" for k in sorted(bootstrap)),
        env=[
            "ETCDCTL_API=3",
            f"ETCDCTL_CACERT={certs.cert_path(ctx.etcd_ca)}",
            f"ETCDCTL_CERT={certs.cert_path(own)}",
            f"ETCDCTL_KEY={certs.key_path(own)}",
            f"ETCDCTL_ENDPOINTS=https://{endpoint}:2379",
        ],
        binds=[
            f"{ctx.host('/var/lib/etcd')}:{ETCD_DATA_DIR}",
            f"{ctx.host('/etc/kubernetes')}:/etc/kubernetes",
        ],
        health=HealthCheck(
            url=f"https://{node.internal}:2379/health",
            client_cert=ctx.etcd_client,
            expect='"health":"true"',
        ),
    )


def recurring_snapshots(etcd: EtcdService) -> bool:
    """Whether RKE would run `etcd-rolling-snapshots` for these settings.

    RKE's defaults (cluster/defaults.go): `snapshot` unset means true, and a `backup_config`
    whose `enabled` is not false turns snapshots on too. So they are off only when `snapshot:
    false` and `backup_config` is absent or says `enabled: false`."""
    backup = etcd.backup_config
    return etcd.snapshot is not False or (backup is not None and backup.enabled is not False)


def _backup_flags(etcd: EtcdService) -> tuple[str, ...]:
    """The schedule and retention flags of RKE's rolling snapshots: backup_config's interval
    (hours) and retention (a count of files) when it is set and enabled, else services.etcd's
    creation and retention (durations, 12h and 72h by default)."""
    backup = etcd.backup_config
    if backup is not None and backup.enabled is not False:
        return (f"--interval-hours={backup.interval_hours}", f"--retention={backup.retention}")
    return (f"--retention={etcd.retention}", f"--creation={etcd.creation}")


def _rolling_snapshots(ctx: _Context, node: Node, cert_hashes: Mapping[str, str]) -> ServiceSpec:
    """RKE's `etcd-rolling-snapshots` (RunEtcdSnapshotSave, not once): rke-tools'
    rke-etcd-backup saving a snapshot of this node's member into the node's snapshot folder on
    a schedule and pruning old ones. etcd's own certificate files (those its ETCDCTL_*
    environment names), the member at the node's internal address (as RKE: an RKE-built
    container then matches at import), etcd's extra_env; no health check (RKE has none)."""
    svc = ctx.config.services.etcd
    own = certs.etcd_cert_name(node)
    return _spec(
        ctx,
        ROLLING_SNAPSHOTS,
        None,  # etcd's extra_binds are etcd's; RKE gives this container only its env
        cert_hashes,
        command=(
            RKE_ETCD_BACKUP, "etcd-backup", "save",
            "--cacert", certs.cert_path(ctx.etcd_ca),
            "--cert", certs.cert_path(own),
            "--key", certs.key_path(own),
            "--name", ROLLING_SNAPSHOTS,
            f"--endpoints={node.internal}:2379",  # as RKE: the internal address
            *_backup_flags(svc),
        ),
        env=svc.extra_env,
        binds=[
            f"{ctx.host(SNAPSHOT_DIR)}:/backup",
            f"{ctx.host('/etc/kubernetes')}:/etc/kubernetes",
        ],
    )


def _apiserver_defaults(info: VersionInfo, api: KubeAPIService) -> dict[str, str]:
    """kube-apiserver's per-version default flags, as RKE adjusts them: AlwaysPullImages
    appended to whatever list the version gives. (EventRateLimit is not added: it needs an
    admission configuration file, which nothing delivers yet.)"""
    defaults = info.component_flags("kube-apiserver")
    if api.always_pull_images and defaults.get("enable-admission-plugins"):
        defaults["enable-admission-plugins"] += ",AlwaysPullImages"
    return defaults


def _kube_apiserver(ctx: _Context, node: Node, cert_hashes: Mapping[str, str]) -> ServiceSpec:
    cfg = ctx.config
    api = cfg.services.kube_api
    etcd = cfg.services.etcd
    if etcd.external_urls:
        etcd_servers = ",".join(etcd.external_urls)
        etcd_prefix = etcd.path or "/registry"
        etcd_ca, etcd_client = certs.EXTERNAL_ETCD_CA, certs.EXTERNAL_ETCD_CLIENT
    else:
        etcd_servers = ",".join(sorted(f"https://{n.internal}:2379" for n in ctx.etcd_nodes))
        etcd_prefix = "/registry"
        etcd_ca, etcd_client = ctx.etcd_ca, ctx.etcd_client
    builtin = {
        "client-ca-file": certs.cert_path(certs.KUBE_CA),
        "etcd-cafile": certs.cert_path(etcd_ca),
        "etcd-certfile": certs.cert_path(etcd_client),
        "etcd-keyfile": certs.key_path(etcd_client),
        "etcd-prefix": etcd_prefix,
        "etcd-servers": etcd_servers,
        "kubelet-client-certificate": certs.cert_path(certs.KUBE_APISERVER),
        "kubelet-client-key": certs.key_path(certs.KUBE_APISERVER),
        "proxy-client-cert-file": certs.cert_path(certs.PROXY_CLIENT),
        "proxy-client-key-file": certs.key_path(certs.PROXY_CLIENT),
        "requestheader-allowed-names": certs.PROXY_CLIENT,
        "requestheader-client-ca-file": certs.cert_path(certs.REQUESTHEADER_CA),
        "service-account-key-file": certs.key_path(certs.SERVICE_ACCOUNT_TOKEN),
        "service-cluster-ip-range": api.service_cluster_ip_range,
        "service-node-port-range": api.service_node_port_range,
        "tls-cert-file": certs.cert_path(certs.KUBE_APISERVER),
        "tls-private-key-file": certs.key_path(certs.KUBE_APISERVER),
    }
    if _is_ip(node.internal):  # RKE advertises only an IP address
        builtin["advertise-address"] = node.internal
    if ctx.rbac:
        builtin["authorization-mode"] = "Node,RBAC"
    if cfg.services.kubelet.generate_serving_certificate:
        builtin["kubelet-certificate-authority"] = certs.cert_path(certs.KUBE_CA)
    if ctx.encryption is not None:  # the file is delivered with the certificates, 0600
        builtin[encryption.ENCRYPTION_FLAG] = encryption.ENCRYPTION_FILE
    return _component(
        ctx,
        "kube-apiserver",
        api,
        cert_hashes,
        args=render_args(builtin, ctx.flags["kube-apiserver"], api),
        binds=[f"{ctx.host('/etc/kubernetes')}:/etc/kubernetes"],
        health=_APISERVER_HEALTH,
    )


def _kube_controller_manager(
    ctx: _Context, node: Node, cert_hashes: Mapping[str, str]
) -> ServiceSpec:
    svc = ctx.config.services.kube_controller
    kubeconfig = certs.kubeconfig_path(certs.KUBE_CONTROLLER_MANAGER)
    builtin = {
        "cluster-cidr": svc.cluster_cidr,
        "kubeconfig": kubeconfig,
        "authentication-kubeconfig": kubeconfig,
        "authorization-kubeconfig": kubeconfig,
        "root-ca-file": certs.cert_path(certs.KUBE_CA),
        "service-account-private-key-file": certs.key_path(certs.SERVICE_ACCOUNT_TOKEN),
        "service-cluster-ip-range": svc.service_cluster_ip_range,
    }
    if ctx.rbac:
        builtin["use-service-account-credentials"] = "true"
    return _component(
        ctx,
        "kube-controller-manager",
        svc,
        cert_hashes,
        args=render_args(builtin, ctx.flags["kube-controller-manager"], svc),
        binds=[f"{ctx.host('/etc/kubernetes')}:/etc/kubernetes"],
        health=_CONTROLLER_MANAGER_HEALTH,
    )


def _kube_scheduler(ctx: _Context, node: Node, cert_hashes: Mapping[str, str]) -> ServiceSpec:
    svc = ctx.config.services.scheduler
    kubeconfig = certs.kubeconfig_path(certs.KUBE_SCHEDULER)
    builtin = {
        "kubeconfig": kubeconfig,
        "authentication-kubeconfig": kubeconfig,
        "authorization-kubeconfig": kubeconfig,
    }
    return _component(
        ctx,
        "kube-scheduler",
        svc,
        cert_hashes,
        args=render_args(builtin, ctx.flags["kube-scheduler"], svc),
        binds=[f"{ctx.host('/etc/kubernetes')}:/etc/kubernetes"],
        health=_SCHEDULER_HEALTH,
    )


def _sidekick(ctx: _Context) -> ServiceSpec:
    """RKE's service-sidekick: created from rke-tools and run once (it exits at once); the
    components mount its /opt/rke-tools volume with volumes_from."""
    return _spec(
        ctx,
        SIDEKICK,
        None,
        {},  # reads no certificate: the same on every node
        command=("/bin/true",),
        network_mode="none",
        restart="no",
    )


def _nginx_proxy(ctx: _Context) -> ServiceSpec:
    cp_hosts = ",".join(sorted({n.internal for n in ctx.cp_nodes}))
    # A local TCP balancer on 127.0.0.1:6443; its env changes (and the container is replaced)
    # whenever the controlplane set changes. No HTTP health check: it speaks plain TCP.
    return _spec(
        ctx,
        "nginx-proxy",
        None,
        {},  # reads no certificate: the same on every node
        command=("nginx-proxy",),
        env=[f"CP_HOSTS={cp_hosts}"],
    )


def _kubelet_mounts(ctx: _Context) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The kubelet's binds and env: the same on every node, so built once per compile."""
    binds: list[str] = []
    env: list[str] = []
    if ctx.cri_dockerd:
        binds.append(f"{ctx.host('/var/lib/cri-dockerd')}:/var/lib/cri-dockerd")
        env.append("RKE_KUBELET_CRIDOCKERD=true")
    kubelet_dir = ctx.host("/var/lib/kubelet")
    binds += [
        f"{ctx.host('/etc/kubernetes')}:/etc/kubernetes",
        "/etc/cni:/etc/cni:rw",
        "/opt/cni:/opt/cni:rw",
        f"{ctx.host('/var/lib/cni')}:/var/lib/cni",
        "/var/lib/calico:/var/lib/calico",
        "/etc/resolv.conf:/etc/resolv.conf",
        "/sys:/sys:rprivate",
        f"{DOCKER_ROOT_DIR}:{DOCKER_ROOT_DIR}:rw,rslave",
        f"{kubelet_dir}:{kubelet_dir}:shared",
        "/var/lib/rancher:/var/lib/rancher:shared",
        "/var/run:/var/run:rw,rprivate",
        "/run:/run:rprivate",
        f"{ctx.host('/etc/ceph')}:/etc/ceph",
        "/dev:/host/dev:rprivate",
        "/var/log/containers:/var/log/containers",
        "/var/log/pods:/var/log/pods",
        "/usr:/host/usr:ro",
        "/etc:/host/etc:ro",
    ]
    if kubelet_dir != "/var/lib/kubelet":
        # RKE's special case so flex volume plugins keep working under a prefix.
        binds.append("/var/lib/kubelet/volumeplugins:/var/lib/kubelet/volumeplugins:shared")
    return tuple(binds), tuple(env)


def _kubelet(ctx: _Context, node: Node, cert_hashes: Mapping[str, str]) -> ServiceSpec:
    cfg = ctx.config
    svc = cfg.services.kubelet
    builtin = {
        "client-ca-file": certs.cert_path(certs.KUBE_CA),
        "cluster-dns": svc.cluster_dns_server,
        "cluster-domain": svc.cluster_domain,
        "fail-swap-on": "true" if svc.fail_swap_on else "false",
        "hostname-override": node.name,
        "kubeconfig": certs.kubeconfig_path(certs.KUBE_NODE_KUBECONFIG),
        "pod-infra-container-image": ctx.images["pod-infra"],
        "root-dir": ctx.host("/var/lib/kubelet"),
    }
    taints = [taint_text(t.key, t.value, t.effect) for t in node.taints]
    if "controlplane" in node.role and "worker" not in node.role:
        taints.append(taint_text(*CONTROLPLANE_TAINT))
    if taints:
        builtin["register-with-taints"] = ",".join(sorted(set(taints)))
    labels = [f"{k}={v}" for k, v in node.labels.items() if kubelet_may_set_label(k)]
    if labels:
        builtin["node-labels"] = ",".join(sorted(labels))
    if node.address != node.internal:
        builtin["node-ip"] = node.internal
    if svc.generate_serving_certificate:
        serving = certs.kubelet_serving_cert_name(node)
        builtin["tls-cert-file"] = certs.cert_path(serving)
        builtin["tls-private-key-file"] = certs.key_path(serving)
    if ctx.cri_dockerd:
        builtin["container-runtime-endpoint"] = "unix:///var/run/cri-dockerd.sock"
    nodelocal = ((cfg.dns or {}).get("nodelocal") or {}).get("ip_address")
    if nodelocal:
        builtin["cluster-dns"] = str(nodelocal)
    binds, env = ctx.kubelet_mounts
    return _component(
        ctx,
        "kubelet",
        svc,
        cert_hashes,
        args=render_args(builtin, ctx.flags["kubelet"], svc),
        env=env,
        binds=binds,
        privileged=True,
        pid_mode="host",
        health=_KUBELET_HEALTH,
    )


def _kube_proxy(ctx: _Context, node: Node, cert_hashes: Mapping[str, str]) -> ServiceSpec:
    svc = ctx.config.services.kubeproxy
    builtin = {
        "cluster-cidr": ctx.config.services.kube_controller.cluster_cidr,
        "hostname-override": node.name,
        "kubeconfig": certs.kubeconfig_path(certs.KUBE_PROXY),
    }
    return _component(
        ctx,
        "kube-proxy",
        svc,
        cert_hashes,
        args=render_args(builtin, ctx.flags["kube-proxy"], svc),
        binds=[
            f"{ctx.host('/etc/kubernetes')}:/etc/kubernetes",
            "/run:/run",
            "/lib/modules:/lib/modules:ro",
        ],
        privileged=True,
        pid_mode="host",
        health=_KUBE_PROXY_HEALTH,
    )


# --- nodes ---------------------------------------------------------------------------------


def _services(
    ctx: _Context, node: Node, cert_hashes: Mapping[str, str]
) -> tuple[ServiceSpec, ...]:
    """The node's containers in start order: etcd and its rolling snapshots, the sidekick,
    control plane, local proxy, kubelet, proxy. `cert_hashes`: the node's certificates, by
    name."""
    roles = set(node.role)
    out: list[ServiceSpec] = []
    if "etcd" in roles:
        out.append(_etcd(ctx, node, cert_hashes))
        if ctx.snapshots:
            out.append(_rolling_snapshots(ctx, node, cert_hashes))
    out.append(ctx.sidekick)
    if "controlplane" in roles:
        out += [
            _kube_apiserver(ctx, node, cert_hashes),
            _kube_controller_manager(ctx, node, cert_hashes),
            _kube_scheduler(ctx, node, cert_hashes),
        ]
    else:
        out.append(ctx.nginx_proxy)
    out += [_kubelet(ctx, node, cert_hashes), _kube_proxy(ctx, node, cert_hashes)]
    return tuple(out)


def _rotated(request: CertRequest, rotations: Mapping[str, int]) -> CertRequest:
    count = rotations.get(request.name, 0)
    return replace(request, rotation=count) if count else request


def _node_desired(ctx: _Context, node: Node) -> NodeDesired:
    inventory = rke_layout.node_certs if ctx.layout == rke_layout.RKE else certs.node_certs
    requests = inventory(ctx.config, node)
    if ctx.rotations:
        requests = tuple(_rotated(r, ctx.rotations) for r in requests)
    shared = [ctx.cert(c) for c in requests]
    node_certs = tuple(c for c, _ in shared)
    cert_hashes = {c.name: h for c, h in shared}
    if ctx.rotations:
        # Once a CA was rotated, a leaf's label hash also carries its CA's: each stage of a CA
        # rotation then restarts every service that verifies peers against that CA, including
        # those that name only their own kubeconfig.
        for c in node_certs:
            if c.ca != c.name and ctx.rotations.get(c.ca) and c.ca in cert_hashes:
                cert_hashes[c.name] = sha256_hex(f"{cert_hashes[c.name]}/{cert_hashes[c.ca]}")[:16]
    node_encryption = ""
    if ctx.encryption is not None and "controlplane" in node.role:
        # counted with the certificates: a new key restarts exactly the apiservers, in turn
        node_encryption = cert_hashes[encryption.CERT_NAME] = ctx.encryption.hash
    return NodeDesired(
        name=node.name,
        address=node.address,
        internal_address=node.internal,
        port=node.port,
        user=node.user,
        roles=ctx.shared(tuple(sorted(set(node.role)))),
        services=_services(ctx, node, cert_hashes),
        certs=node_certs,
        labels=ctx.shared(node_labels(node)),
        taints=ctx.shared(node_taints(node)),
        encryption=node_encryption,
    )


def _strategy(config: ClusterConfig) -> Strategy:
    us = config.upgrade_strategy
    drain = us.node_drain_input
    return Strategy(
        max_unavailable_worker=str(us.max_unavailable_worker),
        max_unavailable_controlplane=str(us.max_unavailable_controlplane),
        drain=us.drain,
        drain_force=drain.force,
        drain_ignore_daemonsets=drain.ignore_daemonsets,
        drain_delete_local_data=drain.delete_local_data,
        drain_grace_period=drain.grace_period,
        drain_timeout=drain.timeout,
    )
