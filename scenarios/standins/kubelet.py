#!/usr/bin/env python3
"""kubelet STAND-IN for rkel's end-to-end tests; not Kubernetes, never a default.

It takes the real kubelet's flags (an unknown one is refused with exit 1, as the real binary
does), reads `--kubeconfig` and reaches the apiserver with the client certificate it names,
registers its Node (name from `--hostname-override`, labels from `--node-labels`, taints from
`--register-with-taints`, address from `--node-ip`), reports Ready every few seconds, serves
`http://127.0.0.1:10248/healthz`, marks pods bound to it Running, and on SIGTERM reports
NotReady (reason KubeletStopped) and exits 0. See README.md.

Standard library only (Python 3.11). Run it as a script; its modules sit beside it.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import signal
import socket
import sys
import threading
import urllib.parse
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kubeconfig_client import (
    ApiClient,
    ApiError,
    KlogFormatter,
    KubeconfigError,
    load_kubeconfig,
)

NAME = "kubelet-standin"
LOG = logging.getLogger(NAME)


def _words(text: str) -> list[str]:
    return text.split()


# The kubelet 1.29-1.31 command line (kubelet flags, the deprecated ones still accepted, klog
# and component-base flags). Booleans may be given without a value.
BOOLS = frozenset(_words("""
add-dir-header alsologtostderr anonymous-auth authentication-token-webhook cgroups-per-qos
contention-profiling cpu-cfs-quota enable-controller-attach-detach enable-debugging-handlers
enable-server exit-on-lock-contention experimental-allocatable-ignore-eviction
fail-swap-on help kernel-memcg-notification keep-terminated-pod-volumes
local-storage-capacity-isolation log-json-split-stream log-text-split-stream logtostderr
make-iptables-util-chains one-output protect-kernel-defaults register-node
register-schedulable rotate-certificates rotate-server-certificates runonce seccomp-default
serialize-image-pulls skip-headers skip-log-headers version
experimental-check-node-capabilities-before-mount
"""))
VALUED = frozenset(_words("""
address allowed-unsafe-sysctls authentication-token-webhook-cache-ttl authorization-mode
authorization-webhook-cache-authorized-ttl authorization-webhook-cache-unauthorized-ttl
azure-container-registry-config bootstrap-kubeconfig cert-dir cgroup-driver cgroup-root
client-ca-file cloud-config cloud-provider cluster-dns cluster-domain config config-dir
container-log-max-files container-log-max-size container-log-max-workers
container-log-monitor-interval container-runtime-endpoint cpu-cfs-quota-period
cpu-manager-policy cpu-manager-policy-options cpu-manager-reconcile-period
enforce-node-allocatable event-burst event-qps eviction-hard eviction-max-pod-grace-period
eviction-minimum-reclaim eviction-pressure-transition-period eviction-soft
eviction-soft-grace-period experimental-mounter-path feature-gates file-check-frequency
hairpin-mode healthz-bind-address healthz-port hostname-override http-check-frequency
image-credential-provider-bin-dir image-credential-provider-config image-gc-high-threshold
image-gc-low-threshold image-max-gc-age image-service-endpoint kube-api-burst
kube-api-content-type kube-api-qps kube-reserved kube-reserved-cgroup kubeconfig
kubelet-cgroups lock-file log-backtrace-at log-dir log-file log-file-max-size
log-flush-frequency log-json-info-buffer-size log-text-info-buffer-size logging-format
manifest-url manifest-url-header max-open-files max-pods maximum-dead-containers
maximum-dead-containers-per-container memory-manager-policy minimum-container-ttl-duration
minimum-image-ttl-duration node-ip node-labels node-status-max-images
node-status-update-frequency oom-score-adj pod-cidr pod-infra-container-image
pod-manifest-path pod-max-pids pods-per-core port provider-id qos-reserved read-only-port
register-with-taints registry-burst registry-qps reserved-cpus reserved-memory resolv-conf
root-dir runtime-cgroups runtime-request-timeout stderrthreshold
streaming-connection-idle-timeout sync-frequency system-cgroups system-reserved
system-reserved-cgroup tls-cert-file tls-cipher-suites tls-min-version tls-private-key-file
topology-manager-policy topology-manager-policy-options topology-manager-scope v
vmodule volume-plugin-dir volume-stats-agg-period
"""))
SHORTHANDS = {"v": "v", "h": "help"}
# Files the kubelet loads at start: unreadable -> exit 1.
FILES = ("client-ca-file", "tls-cert-file", "tls-private-key-file")
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
LABEL_PART = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


class FlagError(Exception):
    """The message the real binary prints after "Error: "."""


def parse_args(argv: list[str]) -> dict[str, str]:
    """pflag-style: `--name=value`, `--name value`, `--bool`; `_` is read as `-`."""
    options: dict[str, str] = {}
    words = list(argv)
    while words:
        word = words.pop(0)
        if word == "--":
            break
        if not word.startswith("-") or word == "-":
            continue  # the real kubelet ignores positional arguments
        long_form = word.startswith("--")
        body = word[2:] if long_form else word[1:]
        name, has_value, value = body.partition("=")
        name = name.replace("_", "-")
        if not long_form:
            if name not in SHORTHANDS:
                raise FlagError(f"unknown shorthand flag: {name[:1]!r} in {word}")
            name = SHORTHANDS[name]
        if name not in BOOLS and name not in VALUED:
            raise FlagError(f"unknown flag: --{name}")
        if not has_value:
            if name in BOOLS:
                value = "true"
            elif words:
                value = words.pop(0)
            else:
                raise FlagError(f"flag needs an argument: --{name}")
        if name in BOOLS and value.lower() not in ("1", "t", "true", "0", "f", "false"):
            raise FlagError(f'invalid argument "{value}" for "--{name}" flag: '
                            f'strconv.ParseBool: parsing "{value}": invalid syntax')
        options[name] = value
    return options


def parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key or not LABEL_PART.match(value):
            raise FlagError(f'invalid argument "{text}" for "--node-labels" flag: '
                            f"invalid label {item!r}")
        labels[key] = value
    return labels


def parse_taints(text: str) -> list[dict[str, str]]:
    taints = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        spec, colon, effect = item.rpartition(":")
        key, eq, value = spec.partition("=")
        if not colon or effect not in EFFECTS or not key:
            raise FlagError(f'invalid argument "{text}" for "--register-with-taints" flag: '
                            f"invalid taint spec: {item}")
        taint = {"key": key, "effect": effect}
        if eq:
            taint["value"] = value
        taints.append(taint)
    return taints


def version_from_env(environ: dict[str, str]) -> str:
    """$STANDIN_VERSION, else vX.Y.Z from the tag of $RKEL_IMAGE, else ""."""
    if environ.get("STANDIN_VERSION"):
        return environ["STANDIN_VERSION"]
    tag = environ.get("RKEL_IMAGE", "").rsplit("/", 1)[-1].partition(":")[2]
    match = re.match(r"v?(\d+)\.(\d+)\.(\d+)", tag)
    return f"v{match.group(1)}.{match.group(2)}.{match.group(3)}" if match else ""


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read(path: str, default: str = "") -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as src:
            return src.read().strip()
    except OSError:
        return default


def _os_image() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.partition("=")[2].strip().strip('"')
    return "Linux"


def _arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
            "s390x": "s390x"}.get(machine, machine or "amd64")


def _node_ip(hostname: str) -> str:
    """What the real kubelet does without --node-ip: the host name's address, else the
    address of the default route's interface."""
    try:
        for info in socket.getaddrinfo(hostname, None, socket.AF_INET):
            address = str(info[4][0])
            if not address.startswith("127."):
                return address
    except OSError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))  # no packet is sent
            return str(sock.getsockname()[0])
    except OSError:
        return ""


def _memory_kib() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 4 * 1024 * 1024


class Kubelet:
    def __init__(self, options: dict[str, str], environ: dict[str, str]) -> None:
        self.options = options
        override = options.get("hostname-override", "").strip()
        self.name = (override or socket.gethostname()).lower()
        self.hostname = self.name
        self.version = version_from_env(environ) or "v0.0.0"
        self.labels = parse_labels(options.get("node-labels", ""))
        self.taints = parse_taints(options.get("register-with-taints", ""))
        self.node_ip = options.get("node-ip", "").split(",")[0].strip() or _node_ip(self.name)
        self.heartbeat = float(environ.get("STANDIN_HEARTBEAT_SECONDS") or 5)
        self.pod_poll = float(environ.get("STANDIN_POD_POLL_SECONDS") or min(self.heartbeat, 3))
        self.healthz_port = int(environ.get("STANDIN_HEALTHZ_PORT")
                                or options.get("healthz-port") or 10248)
        self.healthz_bind = options.get("healthz-bind-address") or "127.0.0.1"
        self.stop = threading.Event()
        self.registered = False
        self.boot = now()
        self.ready_state: tuple[bool, str] | None = None
        self.ready_since = self.boot
        try:
            kubeconfig = load_kubeconfig(options["kubeconfig"])
        except KeyError:
            raise KubeconfigError("--kubeconfig must be specified: the stand-in has no "
                                  "standalone mode") from None
        self.api = ApiClient(kubeconfig, agent=f"kubelet/{self.version} (linux/{_arch()}) "
                             "kubernetes/standin")
        self.server = kubeconfig.server

    # --- the Node --------------------------------------------------------------------------

    def node_info(self) -> dict[str, str]:
        machine_id = _read("/etc/machine-id") or uuid.uuid5(uuid.NAMESPACE_DNS, self.name).hex
        system_uuid = _read("/sys/class/dmi/id/product_uuid") or str(
            uuid.UUID(hex=machine_id[:32].ljust(32, "0")))
        endpoint = self.options.get("container-runtime-endpoint", "")
        runtime = "docker" if "cri-dockerd" in endpoint or "docker" in endpoint else "containerd"
        return {
            "machineID": machine_id, "systemUUID": system_uuid,
            "bootID": _read("/proc/sys/kernel/random/boot_id") or str(uuid.uuid4()),
            "kernelVersion": platform.release() or "unknown", "osImage": _os_image(),
            "containerRuntimeVersion": os.environ.get("STANDIN_RUNTIME_VERSION")
            or f"{runtime}://standin",
            "kubeletVersion": self.version, "kubeProxyVersion": self.version,
            "operatingSystem": "linux", "architecture": _arch(),
        }

    def conditions(self, ready: bool, reason: str, message: str) -> list[dict[str, str]]:
        stamp = now()
        out = [{"type": kind, "status": "False", "reason": f"KubeletHasSufficient{what}",
                "message": f"kubelet has sufficient {what.lower()} available",
                "lastHeartbeatTime": stamp, "lastTransitionTime": self.boot}
               for kind, what in (("MemoryPressure", "Memory"), ("DiskPressure", "Disk"),
                                  ("PIDPressure", "PID"))]
        if self.ready_state != (ready, reason):  # the transition time moves on changes only
            self.ready_state, self.ready_since = (ready, reason), stamp
        out.append({"type": "Ready", "status": "True" if ready else "False", "reason": reason,
                    "message": message, "lastHeartbeatTime": stamp,
                    "lastTransitionTime": self.ready_since})
        return out

    def status(self) -> dict[str, Any]:
        addresses = [{"type": "InternalIP", "address": self.node_ip}] if self.node_ip else []
        addresses.append({"type": "Hostname", "address": self.hostname})
        capacity = {"cpu": str(os.cpu_count() or 1), "memory": f"{_memory_kib()}Ki",
                    "pods": self.options.get("max-pods", "110"),
                    "ephemeral-storage": "61255492Ki", "hugepages-2Mi": "0"}
        return {"addresses": addresses, "nodeInfo": self.node_info(), "capacity": capacity,
                "allocatable": dict(capacity),
                "daemonEndpoints": {"kubeletEndpoint": {
                    "Port": int(self.options.get("port") or 10250)}},
                "conditions": self.conditions(True, "KubeletReady",
                                              "kubelet is posting ready status")}

    def register(self) -> bool:
        labels = {**self.labels, "kubernetes.io/hostname": self.hostname,
                  "kubernetes.io/os": "linux", "kubernetes.io/arch": _arch(),
                  "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": _arch()}
        spec: dict[str, Any] = {}
        if self.taints:
            spec["taints"] = self.taints
        if self.options.get("register-schedulable", "true").lower() in ("false", "0", "f"):
            spec["unschedulable"] = True
        if self.options.get("provider-id"):
            spec["providerID"] = self.options["provider-id"]
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.name, "labels": labels,
                             "annotations": {"volumes.kubernetes.io/controller-managed-attach-"
                                             "detach": "true"}},
                "spec": spec}
        try:
            self.api.call("POST", "/api/v1/nodes", node)
            LOG.info('"Successfully registered node" node="%s"', self.name)
        except ApiError as err:
            if err.code != 409:
                LOG.error('"Unable to register node with API server" err="%s" node="%s"',
                          err, self.name)
                return False
            LOG.info('"Node was previously registered" node="%s"', self.name)
        self.patch_status(self.status())
        return True

    def patch_status(self, status: dict[str, Any]) -> None:
        self.api.call("PATCH", f"/api/v1/nodes/{urllib.parse.quote(self.name)}/status",
                      {"status": status}, "application/strategic-merge-patch+json")

    def report(self, ready: bool, reason: str, message: str) -> None:
        self.patch_status({"conditions": self.conditions(ready, reason, message)})

    # --- pods ------------------------------------------------------------------------------

    def sync_pods(self) -> None:
        selector = urllib.parse.quote(f"spec.nodeName={self.name}")
        pods = self.api.call("GET", f"/api/v1/pods?fieldSelector={selector}")
        for pod in (pods or {}).get("items") or []:
            meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
            if (pod.get("status") or {}).get("phase", "Pending") != "Pending" or \
                    meta.get("deletionTimestamp"):
                continue
            stamp = now()
            ready = [{"type": t, "status": "True", "lastProbeTime": None,
                      "lastTransitionTime": stamp}
                     for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")]
            containers = [{"name": c.get("name", ""), "image": c.get("image", ""),
                           "imageID": "", "containerID": f"docker://{uuid.uuid4().hex}",
                           "ready": True, "started": True, "restartCount": 0,
                           "state": {"running": {"startedAt": stamp}}}
                          for c in spec.get("containers") or []]
            status: dict[str, Any] = {"phase": "Running", "conditions": ready,
                                      "startTime": stamp, "containerStatuses": containers}
            if self.node_ip:
                status["hostIP"] = self.node_ip
                status["hostIPs"] = [{"ip": self.node_ip}]
                if spec.get("hostNetwork"):
                    status["podIP"] = self.node_ip
                    status["podIPs"] = [{"ip": self.node_ip}]
            ns, name = meta.get("namespace", "default"), meta.get("name", "")
            try:
                self.api.call("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status",
                              {"status": status}, "application/strategic-merge-patch+json")
                LOG.info('"Pod is running" pod="%s/%s"', ns, name)
            except ApiError as err:
                LOG.warning('"Failed to update pod status" pod="%s/%s" err="%s"', ns, name, err)

    # --- loops -----------------------------------------------------------------------------

    def node_loop(self) -> None:
        while not self.stop.is_set():
            try:
                if not self.registered:
                    self.registered = self.register()
                else:
                    self.report(True, "KubeletReady", "kubelet is posting ready status")
            except ApiError as err:
                LOG.error('"Error updating node status, will retry" err="%s"', err)
                if err.code == 404:
                    self.registered = False  # the Node was deleted: register again
            except OSError as err:
                LOG.error('"Error updating node status, will retry" err="%s: %s" server="%s"',
                          type(err).__name__, err, self.server)
            self.stop.wait(self.heartbeat if self.registered else min(self.heartbeat, 2))

    def pod_loop(self) -> None:
        while not self.stop.wait(self.pod_poll):
            if not self.registered:
                continue
            try:
                self.sync_pods()
            except (ApiError, OSError) as err:
                LOG.warning('"Failed to list pods bound to the node" err="%s"', err)

    def shutdown(self) -> None:
        self.stop.set()
        if not self.registered:
            return
        try:
            self.report(False, "KubeletStopped", "kubelet stopped (stand-in received SIGTERM)")
            LOG.info('"Reported the node NotReady" node="%s"', self.name)
        except (ApiError, OSError) as err:
            LOG.error('"Could not report the node NotReady" err="%s"', err)


class Healthz(BaseHTTPRequestHandler):
    server_version = "kubelet-standin"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        code, body = (200, b"ok") if path in ("/healthz", "/healthz/ping", "/healthz/syncloop") \
            else (404, b"404 page not found\n")
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def check_files(options: dict[str, str]) -> None:
    for flag in FILES:
        path = options.get(flag)
        if not path:
            continue
        try:
            with open(path, "rb") as src:
                if b"-----BEGIN " not in src.read():
                    raise KubeconfigError(f"--{flag} {path} is not PEM")
        except OSError as err:
            raise KubeconfigError(f"unable to load --{flag} {path}: {err.strerror}") from err


def main(argv: list[str]) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KlogFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        options = parse_args(argv)
    except FlagError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    if options.get("help", "false").lower() in ("true", "1", "t"):
        print("Usage of the kubelet stand-in: the real kubelet's flags; see README.md.")
        return 0
    if options.get("version", "false").lower() in ("true", "1", "t"):
        print(f"Kubernetes {version_from_env(dict(os.environ)) or 'v0.0.0'}")
        return 0
    try:
        check_files(options)
        kubelet = Kubelet(options, dict(os.environ))
    except (KubeconfigError, FlagError) as err:
        LOG.error('"command failed" err="failed to run Kubelet: %s"', err)
        return 1
    ignored = sorted(set(options) - {"kubeconfig", "hostname-override", "node-labels",
                                     "register-with-taints", "node-ip", "healthz-port",
                                     "healthz-bind-address", "max-pods", "port",
                                     "register-schedulable", "provider-id",
                                     "container-runtime-endpoint", *FILES})
    LOG.info('"kubelet stand-in starting" version="%s" node="%s" server="%s" '
             'accepted-and-ignored="%s"', kubelet.version, kubelet.name, kubelet.server,
             ",".join(ignored))
    try:
        httpd = ThreadingHTTPServer((kubelet.healthz_bind, kubelet.healthz_port), Healthz)
    except OSError as err:
        LOG.error('"command failed" err="failed to listen on %s:%s: %s"', kubelet.healthz_bind,
                  kubelet.healthz_port, err)
        return 1
    httpd.daemon_threads = True
    done = threading.Event()
    # a kubelet that takes its time to start (tests inject faults in that window)
    serving = threading.Event()

    def serve() -> None:
        serving.set()
        httpd.serve_forever()

    healthz = threading.Timer(float(os.environ.get("STANDIN_HEALTHZ_DELAY_SECONDS") or 0), serve)
    healthz.daemon = True
    healthz.start()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    workers = [threading.Thread(target=kubelet.node_loop, name="node", daemon=True),
               threading.Thread(target=kubelet.pod_loop, name="pods", daemon=True)]
    for worker in workers:
        worker.start()
    done.wait()
    LOG.info('"Received a termination signal: stopping"')
    kubelet.stop.set()
    for worker in workers:
        worker.join(timeout=12)
    kubelet.shutdown()
    healthz.cancel()
    if serving.is_set():
        httpd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
