"""The Simulated backend: in-memory hosts, a Kubernetes API and an etcd cluster, with a latency
model and fault injection.

It exists for property tests, scale benchmarks and `--simulate` rehearsals — never in place of
the real path in end-to-end tests. Time is virtual: every operation advances the calling thread's
clock by its modelled latency and `sleep` advances it too, so a 100-node rehearsal takes
milliseconds yet reports the duration the real run would roughly take. The world also records
what an observer of the real cluster would check: quorum losses, how many nodes of each group
were unschedulable at once, how often each container was created.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import posixpath
import random
import shlex
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

from lifecycle.errors import HostError, HostUnreachableError
from lifecycle.hosts import (
    SERVICE_PORTS,
    Container,
    ContainerConfig,
    DrainOptions,
    EtcdMember,
    KubeNode,
)
from lifecycle.hosts.kube import (
    API,
    apply_failed,
    identity,
    manifest_order,
    merge_patch,
    node_metadata_patch,
    not_registered,
    object_key,
    rollout_pending,
    rollout_timeout,
    state_secret,
    unknown_kind,
)
from lifecycle.encryption import ENCRYPTION_FILE
from lifecycle.spec import SPEC_HASH_LABEL, NodeRef, ServiceSpec


@dataclass(frozen=True)
class Latency:
    """Modelled seconds per operation (rough figures for a LAN and a warm image cache)."""

    connect: float = 0.25
    inspect: float = 0.05
    run_container: float = 2.0
    start: float = 0.5
    stop: float = 1.5
    remove: float = 0.5
    rename: float = 0.05
    probe: float = 0.2
    put_files: float = 0.3
    cordon: float = 0.2
    drain: float = 8.0
    delete_node: float = 0.2
    kube_write: float = 0.1  # one API write (label, Secret, one applied manifest)
    rollout: float = 20.0  # from applying a workload until its pods are all available
    etcd: float = 0.3
    # Seconds from a kubelet's (re)creation until its Node reports Ready, spent by the first
    # look at the Node after it (the wait-ready step); 0: Ready at once, as before.
    node_ready: float = 0.0
    jitter: float = 0.0  # +- fraction, drawn from a seeded generator
    seed: int = 0


# What the simulated API server serves ("discovery"): (apiVersion, kind) -> namespaced.
SIM_KINDS: dict[tuple[str, str], bool] = {
    **{("v1", k): True for k in ("ConfigMap", "Secret", "ServiceAccount", "Service", "Pod",
                                 "Endpoints", "PersistentVolumeClaim", "LimitRange",
                                 "ResourceQuota", "Event")},
    **{("v1", k): False for k in ("Namespace", "Node", "PersistentVolume")},
    **{("apps/v1", k): True for k in ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet")},
    **{("batch/v1", k): True for k in ("Job", "CronJob")},
    ("rbac.authorization.k8s.io/v1", "Role"): True,
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): True,
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): False,
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): False,
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): False,
    ("policy/v1", "PodDisruptionBudget"): True,
    ("networking.k8s.io/v1", "NetworkPolicy"): True,
    ("networking.k8s.io/v1", "Ingress"): True,
    ("networking.k8s.io/v1", "IngressClass"): False,
    ("storage.k8s.io/v1", "StorageClass"): False,
    ("scheduling.k8s.io/v1", "PriorityClass"): False,
    ("coordination.k8s.io/v1", "Lease"): True,
    ("discovery.k8s.io/v1", "EndpointSlice"): True,
    ("autoscaling/v2", "HorizontalPodAutoscaler"): True,
    ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration"): False,
    ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration"): False,
    ("apiregistration.k8s.io/v1", "APIService"): False,
}
# On a simulated Secret: the sha256 of the controlplane's encryption file when it was last
# written (what a real server would have encrypted it with).
SIM_ENCRYPTION = "sim.rkel.io/encrypted-with"
BUILTIN_NAMESPACES = ("default", "kube-node-lease", "kube-public", "kube-system")
WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet", "Job")


@dataclass
class SimContainer:
    name: str
    image: str
    spec_hash: str
    running: bool
    args: list[str] = field(default_factory=list)
    # How a container made by someone else (RKE) was made, as `inspect_container` reports it
    # (ContainerConfig's fields but name, image and running); empty for rkel's own, which
    # report their arguments and spec hash only.
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class SimHost:
    name: str
    roles: list[str] = field(default_factory=list)
    containers: dict[str, SimContainer] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # path -> sha of content (no secrets)
    reachable: bool = True
    ops: int = 0
    fail_ops: list[int] = field(default_factory=list)  # op numbers that fail
    never_healthy: list[str] = field(default_factory=list)  # services whose probe never passes
    # Files with content (etcd snapshots and their copies): path -> base64; also in `files`.
    blobs: dict[str, str] = field(default_factory=dict)
    # What `rkel doctor` reads through `run_command`: the Docker Engine's version, TCP ports
    # listened on besides those of running rkel containers, seconds the host's clock is ahead
    # of this machine's, and free bytes by mount point (default: plenty on /).
    docker_version: str = "24.0.9"
    listening: list[int] = field(default_factory=list)
    clock_offset: float = 0.0
    disk_free: dict[str, int] = field(default_factory=dict)


class SimWorld:
    """The simulated cluster. Thread-safe; optionally persisted to a JSON file after each change."""

    def __init__(self, latency: Latency | None = None, path: Path | None = None) -> None:
        self.latency = latency or Latency()
        self.path = path
        self.hosts: dict[str, SimHost] = {}
        # name -> {schedulable, version, labels, annotations, taints}
        self.kube_nodes: dict[str, dict[str, Any]] = {}
        self.kube_objects: dict[str, dict[str, Any]] = {}  # "kind/ns/name" -> object, no status
        self.kube_rollouts: dict[str, float] = {}  # workload key -> clock when rolled out
        self.stuck_rollouts: list[str] = []  # workload keys that never roll out
        self.etcd: dict[str, dict[str, Any]] = {}  # name -> {peer_url, learner}
        self.creations: Counter[str] = Counter()  # "host/name@hash" -> times created
        self.quorum_violations: list[str] = []
        self.max_unschedulable: dict[str, int] = {}
        self.connections: Counter[str] = Counter()
        # Hosts whose kubelet was recreated and whose Node was not seen Ready since
        # (Latency.node_ready); not persisted: a new process finds the Nodes Ready.
        self.turning_ready: set[str] = set()
        # The Nodes of kube_nodes that are not schedulable, kept up to date by set_schedulable
        # so that a cordon need not scan every Node; recomputed by `backend()` and `from_dict`
        # (after kube_nodes was filled in directly).
        self._cordoned: dict[str, None] = {}
        self._lock = threading.RLock()
        self._local = threading.local()
        self._rng = random.Random(self.latency.seed)

    # ------------------------------------------------------------------ time
    def clock(self) -> float:
        return float(getattr(self._local, "now", 0.0))

    def sleep(self, seconds: float) -> None:
        self._local.now = self.clock() + max(0.0, seconds)

    def _spend(self, seconds: float) -> None:
        if self.latency.jitter:
            with self._lock:
                seconds *= 1 + self._rng.uniform(-self.latency.jitter, self.latency.jitter)
        self.sleep(seconds)

    # ------------------------------------------------------------------ faults
    def fail_nth_op(self, host: str, n: int) -> None:
        """The host's n-th operation from now raises HostError."""
        with self._lock:
            h = self._host(host)
            h.fail_ops.append(h.ops + n)

    def set_reachable(self, host: str, reachable: bool) -> None:
        with self._lock:
            self._host(host).reachable = reachable
            self._save()

    def set_never_healthy(self, host: str, service: str, value: bool = True) -> None:
        with self._lock:
            h = self._host(host)
            if value and service not in h.never_healthy:
                h.never_healthy.append(service)
            if not value and service in h.never_healthy:
                h.never_healthy.remove(service)

    def set_host_facts(self, host: str, *, docker_version: str | None = None,
                       listening: Sequence[int] | None = None, clock_offset: float | None = None,
                       disk_free: Mapping[str, int] | None = None) -> None:
        """Set what the host's commands report (see `SimHost`); None leaves a fact as it is."""
        with self._lock:
            h = self._host(host)
            if docker_version is not None:
                h.docker_version = docker_version
            if listening is not None:
                h.listening = sorted(set(listening))
            if clock_offset is not None:
                h.clock_offset = clock_offset
            if disk_free is not None:
                h.disk_free = dict(disk_free)
            self._save()

    def set_rollout_stuck(self, key: str, value: bool = True) -> None:
        """The workload "kind/namespace/name" never finishes rolling out (or does again)."""
        with self._lock:
            if value and key not in self.stuck_rollouts:
                self.stuck_rollouts.append(key)
            if not value and key in self.stuck_rollouts:
                self.stuck_rollouts.remove(key)

    # ------------------------------------------------------------------ bookkeeping
    def _host(self, name: str) -> SimHost:
        if name not in self.hosts:
            self.hosts[name] = SimHost(name)
        return self.hosts[name]

    def _op(self, host: str, seconds: float) -> SimHost:
        """Count one operation on `host`, spend its latency, and apply injected faults."""
        with self._lock:
            h = self._host(host)
            if not h.reachable:
                raise HostUnreachableError(host, "no route to host (simulated)")
            h.ops += 1
            failing = h.ops in h.fail_ops
        self._spend(seconds)
        if failing:
            raise HostError(host, f"operation {h.ops} failed (injected fault)")
        return h

    def _group(self, name: str) -> str:
        roles = self._host(name).roles
        if "controlplane" in roles:
            return "controlplane"
        return "etcd" if "etcd" in roles else "worker"

    def _recount_cordoned(self) -> None:
        with self._lock:
            self._cordoned = {name: None for name, node in self.kube_nodes.items()
                              if not node["schedulable"]}

    def _check_schedulable(self) -> None:
        counts = Counter(self._group(name) for name in self._cordoned)
        for group, count in counts.items():
            self.max_unschedulable[group] = max(self.max_unschedulable.get(group, 0), count)

    def voting_started(self) -> tuple[int, int]:
        """(voting members, voting members whose etcd container runs)."""
        voting = [n for n, m in self.etcd.items() if not m["learner"]]
        started = [n for n in voting if self._etcd_running(n)]
        return len(voting), len(started)

    def _etcd_running(self, member: str) -> bool:
        host = self.hosts.get(member.removeprefix("etcd-"))
        c = host.containers.get("etcd") if host else None
        return bool(host and c and c.running and "etcd" not in host.never_healthy)

    def _check_quorum(self, why: str) -> None:
        voting, started = self.voting_started()
        # A cluster of one or two members cannot keep quorum while a member restarts; only a
        # loss that a careful order could have avoided counts.
        if voting >= 3 and started < voting // 2 + 1:
            self.quorum_violations.append(f"{why}: {started}/{voting} voting members running")

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), sort_keys=True))
        os.replace(tmp, self.path)

    # ------------------------------------------------------------------ containers
    def containers(self, host: str) -> dict[str, Container]:
        h = self._op(host, self.latency.inspect)
        with self._lock:
            return {
                c.name: Container(c.name, c.image, c.spec_hash, c.running)
                for c in h.containers.values()
            }

    def inspect_container(self, host: str, name: str) -> ContainerConfig | None:
        self._op(host, self.latency.inspect)
        with self._lock:
            c = self.hosts[host].containers.get(name)
            if c is None:
                return None
            made = c.config or {"labels": {SPEC_HASH_LABEL: c.spec_hash}}
            return ContainerConfig(
                name=c.name,
                image=c.image,
                argv=tuple(made.get("argv", c.args)),
                env=tuple(made.get("env", ())),
                binds=tuple(made.get("binds", ())),
                privileged=bool(made.get("privileged", False)),
                network_mode=str(made.get("network_mode", "")),
                pid_mode=str(made.get("pid_mode", "")),
                restart=str(made.get("restart", "")),
                volumes_from=tuple(made.get("volumes_from", ())),
                labels=tuple(sorted((str(k), str(v)) for k, v in made.get("labels", {}).items())),
                running=c.running,
            )

    def run_container(self, host: str, spec: ServiceSpec, extra_args: Sequence[str]) -> None:
        h = self._op(host, self.latency.run_container)
        with self._lock:
            if spec.name in h.containers:
                raise HostError(host, f"container name {spec.name!r} is already in use")
            h.containers[spec.name] = SimContainer(
                spec.name, spec.image, spec.hash, True, list(spec.args) + list(extra_args)
            )
            self.creations[f"{host}/{spec.name}@{spec.hash}"] += 1
            member = f"etcd-{host}"
            if spec.name == "etcd" and "--initial-cluster-state=new" in extra_args:
                # A member started as a new cluster forms one (its data dir was empty).
                if self.etcd and member not in self.etcd:
                    raise HostError(host, "etcd started as a new cluster beside an existing one")
                initial = next(a for a in extra_args if a.startswith("--initial-cluster="))
                peer_url = initial.split("=", 2)[2]
                self.etcd.setdefault(member, {"peer_url": peer_url, "learner": False})
            if spec.name == "kubelet":
                # as a kubelet does: register the Node once; labels/taints of an existing one stay
                node = self.kube_nodes.setdefault(
                    host, {"schedulable": True, "version": "",
                           **_registration(host, [*spec.args, *extra_args])})
                node["version"] = spec.image.rsplit(":", 1)[-1]
                if self.latency.node_ready > 0:
                    self.turning_ready.add(host)
            self._save()

    def set_running(self, host: str, name: str, running: bool) -> None:
        h = self._op(host, self.latency.start if running else self.latency.stop)
        with self._lock:
            if name not in h.containers:
                raise HostError(host, f"no container {name!r}")
            h.containers[name].running = running
            if name == "etcd" and not running:
                self._check_quorum(f"stopping etcd on {host}")
            self._save()

    def remove_container(self, host: str, name: str) -> None:
        h = self._op(host, self.latency.remove)
        with self._lock:
            gone = h.containers.pop(name, None)
            if gone is not None and name == "etcd" and gone.running and host in self.etcd:
                self._check_quorum(f"removing etcd on {host}")
            self._save()

    def rename_container(self, host: str, old: str, new: str) -> None:
        h = self._op(host, self.latency.rename)
        with self._lock:
            if old not in h.containers:
                raise HostError(host, f"no container {old!r}")
            if new in h.containers:
                raise HostError(host, f"container name {new!r} is already in use")
            c = h.containers.pop(old)
            c.name = new
            h.containers[new] = c
            if old == "etcd":
                self._check_quorum(f"renaming etcd on {host}")
            self._save()

    def probe(self, host: str, spec: ServiceSpec) -> bool:
        h = self._op(host, self.latency.probe)
        with self._lock:
            c = h.containers.get(spec.name)
            return bool(c and c.running and spec.name not in h.never_healthy)

    def put_files(self, host: str, files: Mapping[str, bytes]) -> None:
        import hashlib

        h = self._op(host, self.latency.put_files)
        with self._lock:
            for path, content in files.items():
                h.files[path] = hashlib.sha256(content).hexdigest()
            self._save()

    def remove_paths(self, host: str, paths: Sequence[str]) -> None:
        h = self._op(host, self.latency.remove)
        with self._lock:
            for path in paths:
                for known in [p for p in h.files if p == path or p.startswith(path + "/")]:
                    del h.files[known]
                    h.blobs.pop(known, None)
            self._save()

    def move_paths(self, host: str, root: str, moves: Sequence[tuple[str, str]],
                   replace: bool) -> None:
        """Files only: the simulated hosts keep files, not directories."""
        h = self._op(host, self.latency.remove)
        with self._lock:
            for src, dst in moves:
                s, d = posixpath.join(root, src), posixpath.join(root, dst)
                under = lambda base: [p for p in h.files if p == base or p.startswith(base + "/")]
                if not under(s) or (under(d) and not replace):
                    continue
                for p in under(d):
                    del h.files[p]
                    h.blobs.pop(p, None)
                for p in under(s):
                    h.files[d + p[len(s):]] = h.files.pop(p)
                    if p in h.blobs:
                        h.blobs[d + p[len(s):]] = h.blobs.pop(p)
            self._save()

    # ------------------------------------------------------------------ one-shot containers, files
    def run_once(self, host: str, image: str, command: Sequence[str], binds: Sequence[str],
                 host_network: bool) -> tuple[int, str]:
        """A one-shot container: only etcdctl's `snapshot save|status` is modelled."""
        self._op(host, self.latency.run_container)
        with self._lock:
            return _sim_etcdctl(self, host, image, list(command), list(binds), host_network)

    def run_command(self, host: str, command: str) -> tuple[int, str, str]:
        """A shell command over SSH: only the read-only ones `rkel doctor` runs are modelled."""
        h = self._op(host, self.latency.inspect)
        with self._lock:
            return _sim_command(h, command)

    def file_sha256(self, host: str, path: str) -> str | None:
        h = self._op(host, self.latency.inspect)
        with self._lock:
            return h.files.get(path)

    def fetch_file(self, host: str, path: str, out: BinaryIO) -> int:
        h = self._op(host, self.latency.put_files)
        with self._lock:
            if path not in h.blobs:
                raise HostError(host, f"reading {path}: no such file")
            data = base64.b64decode(h.blobs[path])
        out.write(data)
        return len(data)

    def list_files(self, host: str, directory: str) -> dict[str, int]:
        h = self._op(host, self.latency.inspect)
        prefix = directory.rstrip("/") + "/"
        with self._lock:
            return {p[len(prefix):]: len(base64.b64decode(b)) for p, b in sorted(h.blobs.items())
                    if p.startswith(prefix) and "/" not in p[len(prefix):]}

    def put_file(self, host: str, path: str, src: BinaryIO, size: int) -> None:
        data = src.read(size)
        self.write_blob(host, path, data, self.latency.put_files)

    def write_blob(self, host: str, path: str, data: bytes, seconds: float = 0.0) -> None:
        """Put a file with content on a host (also what tests use to tamper with one)."""
        h = self._op(host, seconds)
        with self._lock:
            h.blobs[path] = base64.b64encode(data).decode()
            h.files[path] = hashlib.sha256(data).hexdigest()
            self._save()

    def read_blob(self, host: str, path: str) -> bytes | None:
        with self._lock:
            blob = self._host(host).blobs.get(path)
        return None if blob is None else base64.b64decode(blob)

    # ------------------------------------------------------------------ kubernetes
    def kube_node(self, name: str) -> KubeNode | None:
        self._spend(self.latency.inspect)
        with self._lock:
            node = self.kube_nodes.get(name)
            if node is None:
                return None
            h = self.hosts.get(name)
            kubelet = h.containers.get("kubelet") if h else None
            ready = bool(
                h and h.reachable and kubelet and kubelet.running
                and "kubelet" not in h.never_healthy
            )
            turning = ready and name in self.turning_ready
            if turning:
                self.turning_ready.discard(name)
            result = KubeNode(name, ready, node["schedulable"], node["version"])
        if turning:
            self._spend(self.latency.node_ready)  # the wait until the kubelet reports Ready
        return result

    def set_schedulable(self, name: str, schedulable: bool) -> None:
        self._spend(self.latency.cordon)
        with self._lock:
            node = self.kube_nodes.get(name)
            if node is None:
                return  # never registered: nothing to cordon
            node["schedulable"] = schedulable
            if schedulable:
                self._cordoned.pop(name, None)
            else:
                self._cordoned[name] = None
            self._check_schedulable()
            self._save()

    def drain(self, name: str) -> None:
        self._spend(self.latency.drain)

    def delete_kube_node(self, name: str) -> None:
        self._spend(self.latency.delete_node)
        with self._lock:
            self.kube_nodes.pop(name, None)
            self._cordoned.pop(name, None)
            self._save()

    def sync_node_metadata(self, name: str, labels: dict[str, str],
                           taints: list[tuple[str, str, str]]) -> None:
        self._spend(self.latency.kube_write)
        with self._lock:
            node = self.kube_nodes.get(name)
            if node is None:
                raise not_registered(name)
            view = {"metadata": {"labels": node.get("labels") or {},
                                 "annotations": node.get("annotations") or {}},
                    "spec": {"taints": node.get("taints") or []}}
            patch = node_metadata_patch(view, labels, taints, name)
            if patch is None:
                return
            new = merge_patch(view, patch)
            node["labels"] = dict(new["metadata"].get("labels") or {})
            node["annotations"] = dict(new["metadata"].get("annotations") or {})
            node["taints"] = list((new.get("spec") or {}).get("taints") or [])
            self._save()

    def _namespaces(self) -> set[str]:
        made = {o["metadata"]["name"] for o in self.kube_objects.values()
                if o.get("kind") == "Namespace"}
        return set(BUILTIN_NAMESPACES) | made

    def save_state_secret(self, name: str, namespace: str, data: dict[str, str]) -> None:
        self._spend(self.latency.kube_write)
        with self._lock:
            if namespace not in self._namespaces():
                raise HostError(API, f'save Secret {namespace}/{name}: 404 Not Found: namespaces '
                                f'"{namespace}" not found')
            self.kube_objects[object_key("Secret", namespace, name)] = \
                self._stored(state_secret(name, namespace, data))
            self._save()

    def rewrite_secrets(self) -> int:
        """Every Secret stored again: each records the encryption config it was written
        under (the hash delivered to the controlplane nodes' encryption file)."""
        self._spend(self.latency.kube_write)
        with self._lock:
            secrets = [o for o in self.kube_objects.values() if o.get("kind") == "Secret"]
            for obj in secrets:
                self._stored(obj)
            self._save()
            return len(secrets)

    def _stored(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A Secret as a write stores it: under the encryption config in use then."""
        if obj.get("kind") == "Secret":
            annotations = obj.setdefault("metadata", {}).setdefault("annotations", {})
            annotations.pop(SIM_ENCRYPTION, None)
            if self.encryption_in_use():
                annotations[SIM_ENCRYPTION] = self.encryption_in_use()
        return obj

    def encryption_in_use(self) -> str:
        """The encryption config the controlplane nodes hold ("" none; several: sorted)."""
        seen = sorted({h.files[ENCRYPTION_FILE] for h in self.hosts.values()
                       if ENCRYPTION_FILE in h.files})
        return ",".join(seen)

    def _kinds(self) -> dict[tuple[str, str], bool]:
        """SIM_KINDS plus what applied CustomResourceDefinitions define."""
        kinds = dict(SIM_KINDS)
        for obj in self.kube_objects.values():
            if obj.get("kind") != "CustomResourceDefinition":
                continue
            spec = obj.get("spec") or {}
            kind = (spec.get("names") or {}).get("kind", "")
            for version in spec.get("versions") or []:
                if version.get("served", True) and spec.get("group") and kind:
                    kinds[(f"{spec['group']}/{version.get('name')}", kind)] = \
                        spec.get("scope", "Namespaced") == "Namespaced"
        return kinds

    def _locate(self, doc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        api_version, kind, name = identity(doc)
        given = (doc.get("metadata") or {}).get("namespace") or ""
        namespaced = self._kinds().get((api_version, kind))
        if namespaced is None:
            raise unknown_kind(api_version, kind, given, name)
        obj = json.loads(json.dumps(doc))
        obj.pop("status", None)  # status is the controllers' (a subresource on the real API)
        meta = obj.setdefault("metadata", {})
        if namespaced:
            meta["namespace"] = given or "default"
        else:
            meta.pop("namespace", None)
        return object_key(kind, meta.get("namespace", ""), name), obj

    def apply_manifests(self, docs: list[dict]) -> list[str]:
        ordered = manifest_order(docs)
        applied, failed = [], []
        for doc in ordered:
            self._spend(self.latency.kube_write)
            with self._lock:
                try:
                    key, obj = self._locate(doc)
                except HostError as exc:
                    failed.append(str(exc).removeprefix(f"{API}: "))
                    continue
                namespace = obj["metadata"].get("namespace")
                if namespace and namespace not in self._namespaces():
                    failed.append(f'{key}: 404 Not Found: namespaces "{namespace}" not found')
                    continue
                obj = self._stored(obj)
                if self.kube_objects.get(key) != obj:  # unchanged: nothing rolls out again
                    self.kube_objects[key] = obj
                    if obj["kind"] in WORKLOADS:
                        self.kube_rollouts[key] = self.clock() + self.latency.rollout
                applied.append(key)
        with self._lock:
            self._save()
        if failed:
            raise apply_failed(failed, len(ordered))
        return applied

    def _observed(self, key: str) -> dict[str, Any] | None:
        """The object as the API would return it, status filled in by the simulated controllers."""
        obj = self.kube_objects.get(key)
        if obj is None or obj.get("kind") not in WORKLOADS:
            return obj
        done = key not in self.stuck_rollouts and self.clock() >= self.kube_rollouts.get(key, 0.0)
        want = (obj.get("spec") or {}).get("replicas", 1)
        have = want if done else 0
        status: dict[str, Any] = {
            "Deployment": {"replicas": have, "updatedReplicas": have, "availableReplicas": have},
            "StatefulSet": {"replicas": want, "readyReplicas": have},
            "Job": {"succeeded": 1} if done else {"active": 1},
        }.get(obj["kind"], {})
        if obj["kind"] == "DaemonSet":
            nodes = len(self.kube_nodes)
            status = {"desiredNumberScheduled": nodes,
                      "updatedNumberScheduled": nodes if done else 0,
                      "numberAvailable": nodes if done else 0}
        return {**obj, "status": status}

    def wait_rollout(self, objects: list[dict], timeout: float, poll: float = 2.0) -> None:
        with self._lock:
            keys = [self._locate(doc)[0] for doc in manifest_order(objects)]
        deadline = self.clock() + timeout
        while True:
            self._spend(self.latency.inspect)
            with self._lock:
                pending = {}
                for key in keys:
                    obj = self._observed(key)
                    why = "not found" if obj is None else rollout_pending(obj)
                    if why:
                        pending[key] = why
            if not pending:
                return
            if self.clock() >= deadline:
                raise rollout_timeout(pending, timeout)
            keys = list(pending)
            self.sleep(poll)

    # ------------------------------------------------------------------ etcd
    def _etcd_reachable(self) -> None:
        voting, started = self.voting_started()
        if voting and started < voting // 2 + 1:
            raise HostUnreachableError("etcd", f"no quorum: {started}/{voting} members running")

    def etcd_members(self) -> list[EtcdMember]:
        self._spend(self.latency.etcd)
        with self._lock:
            self._etcd_reachable()
            return [
                EtcdMember(n, m["peer_url"], self._etcd_running(n), m["learner"])
                for n, m in sorted(self.etcd.items())
            ]

    def etcd_add(self, name: str, peer_url: str) -> None:
        self._spend(self.latency.etcd)
        with self._lock:
            self._etcd_reachable()
            if name in self.etcd:
                raise HostError("etcd", f"member {name} already exists")
            self.etcd[name] = {"peer_url": peer_url, "learner": bool(self.etcd)}
            self._save()

    def etcd_promote(self, name: str) -> None:
        self._spend(self.latency.etcd)
        with self._lock:
            self._etcd_reachable()
            if name not in self.etcd:
                raise HostError("etcd", f"no member {name}")
            if not self._etcd_running(name):
                raise HostError("etcd", f"learner {name} is not in sync yet")
            self.etcd[name]["learner"] = False
            self._save()

    def etcd_remove(self, name: str) -> None:
        self._spend(self.latency.etcd)
        with self._lock:
            self._etcd_reachable()
            self.etcd.pop(name, None)
            self._check_quorum(f"removing member {name}")
            self._save()

    def etcd_health(self) -> dict[str, bool]:
        self._spend(self.latency.etcd)
        with self._lock:
            self._etcd_reachable()
            return {n: self._etcd_running(n) for n in sorted(self.etcd)}

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "latency": asdict(self.latency),
            "hosts": {n: asdict(h) for n, h in sorted(self.hosts.items())},
            "kube_nodes": self.kube_nodes,
            "kube_objects": self.kube_objects,
            "kube_rollouts": self.kube_rollouts,
            "stuck_rollouts": self.stuck_rollouts,
            "etcd": self.etcd,
            "creations": dict(self.creations),
            "quorum_violations": self.quorum_violations,
            "max_unschedulable": self.max_unschedulable,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | None = None) -> SimWorld:
        world = cls(Latency(**data.get("latency", {})), path)
        for name, h in data.get("hosts", {}).items():
            containers = {k: SimContainer(**c) for k, c in h.pop("containers", {}).items()}
            world.hosts[name] = SimHost(**h, containers=containers)
        world.kube_nodes = dict(data.get("kube_nodes", {}))
        world.kube_objects = dict(data.get("kube_objects", {}))
        world.kube_rollouts = dict(data.get("kube_rollouts", {}))
        world.stuck_rollouts = list(data.get("stuck_rollouts", []))
        world.etcd = dict(data.get("etcd", {}))
        world.creations = Counter(data.get("creations", {}))
        world.quorum_violations = list(data.get("quorum_violations", []))
        world.max_unschedulable = dict(data.get("max_unschedulable", {}))
        world._recount_cordoned()
        return world

    @classmethod
    def load(cls, path: Path) -> SimWorld:
        """The world saved at `path`, or a new empty one that will be saved there."""
        if path.exists():
            return cls.from_dict(json.loads(path.read_text()), path)
        return cls(path=path)

    def backend(self) -> SimBackend:
        self._recount_cordoned()  # kube_nodes may have been filled in directly
        return SimBackend(self)


SIM_SNAPSHOT_MAGIC = b"rkel-simulated-etcd-snapshot\n"


def _bound(binds: list[str], inside: str, write: bool) -> str | None:
    """The host path a container path maps to through `binds` (None: not bound, or read-only
    for a write)."""
    for bind in binds:
        host_dir, _, rest = bind.partition(":")
        target, _, mode = rest.partition(":")
        if inside == target or inside.startswith(target.rstrip("/") + "/"):
            if write and "ro" in mode.split(","):
                return None
            return host_dir.rstrip("/") + inside[len(target.rstrip("/")):]
    return None


def _sim_etcdctl(world: SimWorld, host: str, image: str, cmd: list[str], binds: list[str],
                 host_network: bool) -> tuple[int, str]:
    """`etcdctl [--flag=value...] snapshot save|status FILE` as the real one behaves, with
    its arguments checked: certificate files on the node, bound paths, a running member."""
    if not image or not cmd or posixpath.basename(cmd[0]) != "etcdctl":
        return 127, f"{cmd[:1]}: not simulated (only etcdctl snapshot save|status is)"
    flags = dict(a[2:].partition("=")[::2] for a in cmd[1:] if a.startswith("--"))
    words = [a for a in cmd[1:] if not a.startswith("-")]
    if words[:1] != ["snapshot"] or len(words) < 3 or words[1] not in ("save", "status", "restore"):
        return 1, f"Error: unknown command {' '.join(words)!r} (simulated)"
    h = world._host(host)
    path = _bound(binds, words[2], write=words[1] == "save")
    if path is None:
        return 1, f"Error: open {words[2]}: no such file or directory (not bound writable)"
    if words[1] == "restore":
        return _sim_restore(world, host, path, flags, binds)
    if words[1] == "status":
        data = world.read_blob(host, path)
        if data is None:
            return 1, f"Error: stat {words[2]}: no such file or directory"
        body, _, digest = data.removeprefix(SIM_SNAPSHOT_MAGIC).rpartition(b"\n")
        if not data.startswith(SIM_SNAPSHOT_MAGIC) or \
                hashlib.sha256(body).hexdigest().encode() != digest:
            return 1, "Error: snapshot file integrity check failed (simulated)"
        info = json.loads(body)
        return 0, json.dumps({"hash": int(digest[:8], 16), "revision": info["revision"],
                              "totalKey": len(info["members"]), "totalSize": len(data)})
    for flag in ("cert", "key", "cacert", "endpoints"):
        if not flags.get(flag):
            return 1, f"Error: --{flag} is required (simulated: no anonymous client)"
    for flag in ("cert", "cacert"):
        on_host = _bound(binds, flags[flag], write=False)
        if on_host is None or on_host not in h.files:
            return 1, f"Error: open {flags[flag]}: no such file or directory"
    if not host_network:
        return 1, f"Error: dial tcp {flags['endpoints']}: connect: network is unreachable"
    if not world._etcd_running(f"etcd-{host}"):
        return 1, f"Error: context deadline exceeded (no etcd member answers on {host})"
    world._etcd_reachable()
    revision = 1 + sum(len(other.blobs) for other in world.hosts.values())
    body = json.dumps({"host": host, "members": sorted(world.etcd), "at": world.clock(),
                       "revision": revision}, sort_keys=True).encode()
    data = SIM_SNAPSHOT_MAGIC + body + b"\n" + hashlib.sha256(body).hexdigest().encode()
    h.blobs[path] = base64.b64encode(data).decode()
    h.files[path] = hashlib.sha256(data).hexdigest()
    world._save()
    return 0, f"Snapshot saved at {words[2]}"


def _sim_restore(world: SimWorld, host: str, path: str, flags: dict[str, str],
                 binds: list[str]) -> tuple[int, str]:
    """`etcdctl snapshot restore`: the snapshot, checked, becomes <data-dir>/member/snap/db."""
    data = world.read_blob(host, path)
    if data is None or not data.startswith(SIM_SNAPSHOT_MAGIC):
        return 1, "Error: snapshot file integrity check failed (simulated)"
    for flag in ("name", "initial-cluster", "initial-cluster-token", "initial-advertise-peer-urls",
                 "data-dir"):
        if not flags.get(flag):
            return 1, f"Error: --{flag} is required (simulated)"
    target = _bound(binds, flags["data-dir"], write=True)
    if target is None:
        return 1, f"Error: mkdir {flags['data-dir']}: read-only or not bound"
    h = world._host(host)
    if any(p.startswith(target.rstrip("/") + "/") for p in h.files):
        return 1, f"Error: data-dir {flags['data-dir']} exists"
    h.blobs[f"{target}/member/snap/db"] = base64.b64encode(data).decode()
    h.files[f"{target}/member/snap/db"] = hashlib.sha256(data).hexdigest()
    world._save()
    return 0, f"restored snapshot into {flags['data-dir']}"


def _sim_command(h: SimHost, command: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `command` on `h`, as the real tools print them:
    `docker [-H URL] version|info --format ...`, `cat /proc/net/tcp` (and `tcp6`, empty),
    `date +%s.%N` and `df -Pk PATH`. Anything else exits 127, as an unknown command would."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        return 2, "", f"sh: syntax error: {exc}\n"
    if argv[:1] == ["docker"]:
        words = argv[3:] if argv[1:2] == ["-H"] else argv[1:]
        if words == ["version", "--format", "{{.Server.Version}}"]:
            return 0, h.docker_version + "\n", ""
        if words == ["info", "--format", "{{.DockerRootDir}}"]:
            return 0, "/var/lib/docker\n", ""
    if argv[:1] == ["cat"] and argv[1:] in (["/proc/net/tcp"], ["/proc/net/tcp6"]):
        ports: set[int] = set()
        if argv[1] == "/proc/net/tcp":  # IPv4 only: every listener of the model is there
            ports.update(h.listening)
            for c in h.containers.values():
                if c.running:
                    ports.update(SERVICE_PORTS.get(c.name, ()))
        lines = ["  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
                 "   uid  timeout inode"]
        lines += [f"{i:4}: 00000000:{port:04X} 00000000:0000 0A 00000000:00000000 00:00000000"
                  f" 00000000     0        0 {1000 + i} 1 0000000000000000 100 0 0 10 0"
                  for i, port in enumerate(sorted(ports))]
        return 0, "\n".join(lines) + "\n", ""
    if argv == ["date", "+%s.%N"]:
        return 0, f"{time.time() + h.clock_offset:.9f}\n", ""
    if len(argv) == 3 and argv[:2] == ["df", "-Pk"] and argv[2].startswith("/"):
        mounts = {"/": 100 << 30, **h.disk_free}
        mount = max((m for m in mounts if argv[2] == m or argv[2].startswith(m.rstrip("/") + "/")),
                    key=len)
        total = max(mounts[mount], 1 << 30) * 2 // 1024
        free = mounts[mount] // 1024
        return 0, ("Filesystem     1024-blocks      Used Available Capacity Mounted on\n"
                   f"/dev/sim       {total} {total - free} {free} 50% {mount}\n"), ""
    return 127, "", f"sh: 1: {argv[0] if argv else command}: not found (simulated)\n"


def _registration(host: str, args: list[str]) -> dict[str, Any]:
    """The labels and taints a kubelet registers its Node with (its own plus --node-labels
    and --register-with-taints)."""
    labels = {"kubernetes.io/hostname": host, "kubernetes.io/os": "linux",
              "kubernetes.io/arch": "amd64"}
    taints = []
    for arg in args:
        flag, _, value = arg.partition("=")
        items = [item for item in value.split(",") if item]
        if flag == "--node-labels":
            for item in items:
                key, _, val = item.partition("=")
                labels[key] = val
        elif flag == "--register-with-taints":
            for item in items:
                pair, _, effect = item.rpartition(":")
                key, _, val = pair.partition("=")
                taints.append({"key": key, **({"value": val} if val else {}), "effect": effect})
    return {"labels": labels, "annotations": {}, "taints": taints}


def foreign_container(spec: ServiceSpec, labels: dict[str, str],
                      extra_args: Sequence[str] = (), running: bool = True) -> SimContainer:
    """A container made from `spec` by another tool (RKE), with only `labels`: it carries no
    spec hash, and `inspect_container` reports how it was made."""
    return SimContainer(spec.name, spec.image, "", running, [*spec.args, *extra_args], {
        "argv": [*spec.command, *spec.args, *extra_args],
        "env": list(spec.env),
        "binds": list(spec.binds),
        "privileged": spec.privileged,
        "network_mode": spec.network_mode,
        "pid_mode": spec.pid_mode,
        "restart": spec.restart,
        "volumes_from": list(spec.volumes_from),
        "labels": dict(labels),
    })


class SimHostHandle:
    """A `Host` for one simulated node."""

    def __init__(self, world: SimWorld, node: NodeRef) -> None:
        self.world = world
        self.name = node.name

    def containers(self) -> dict[str, Container]:
        return self.world.containers(self.name)

    def inspect_container(self, name: str) -> ContainerConfig | None:
        return self.world.inspect_container(self.name, name)

    def run_container(self, spec: ServiceSpec, extra_args: Sequence[str] = ()) -> None:
        self.world.run_container(self.name, spec, extra_args)

    def start_container(self, name: str) -> None:
        self.world.set_running(self.name, name, True)

    def stop_container(self, name: str) -> None:
        self.world.set_running(self.name, name, False)

    def remove_container(self, name: str) -> None:
        self.world.remove_container(self.name, name)

    def rename_container(self, old: str, new: str) -> None:
        self.world.rename_container(self.name, old, new)

    def probe(self, spec: ServiceSpec) -> bool:
        return self.world.probe(self.name, spec)

    def put_files(self, files: Mapping[str, bytes]) -> None:
        self.world.put_files(self.name, files)

    def remove_paths(self, paths: Sequence[str]) -> None:
        self.world.remove_paths(self.name, paths)

    def move_paths(self, root: str, moves: Sequence[tuple[str, str]], *, replace: bool) -> None:
        self.world.move_paths(self.name, root, moves, replace)

    def run_once(self, image: str, command: Sequence[str], *, binds: Sequence[str] = (),
                 host_network: bool = False, env: Sequence[str] = (),
                 timeout: float = 600.0) -> tuple[int, str]:
        return self.world.run_once(self.name, image, command, binds, host_network)

    def file_sha256(self, path: str) -> str | None:
        return self.world.file_sha256(self.name, path)

    def run_command(self, command: str, timeout: float = 60) -> tuple[int, str, str]:
        """Like `SSHHost.run_command`: (exit status, stdout, stderr)."""
        return self.world.run_command(self.name, command)

    def fetch_file(self, path: str, out: BinaryIO) -> int:
        return self.world.fetch_file(self.name, path, out)

    def put_file(self, path: str, src: BinaryIO, size: int) -> None:
        self.world.put_file(self.name, path, src, size)

    def list_files(self, directory: str) -> dict[str, int]:
        return self.world.list_files(self.name, directory)

    def exec(self, container: str, cmd: list[str]) -> tuple[int, str]:
        """Simulated containers run nothing: succeed (empty output) if the container runs."""
        have = self.world.containers(self.name).get(container)
        if have is None or not have.running:
            raise HostError(self.name, f"container {container} is not running")
        return 0, ""

    def close(self) -> None:
        pass


class SimKube:
    """The Kubernetes API. In a world that has kube-apiserver containers, it answers only while
    one of them runs (the real client fails over between the API servers and gives up when none
    answers); a bare world made to test the API alone always answers."""

    def __init__(self, world: SimWorld) -> None:
        self.world = world

    def _serving(self, what: str) -> SimWorld:
        with self.world._lock:
            servers = [c.running for h in self.world.hosts.values()
                       for n, c in h.containers.items() if n == "kube-apiserver"]
        if servers and not any(servers):
            raise HostUnreachableError(API, f"{what}: no API server answered (no kube-apiserver"
                                            " is running); check the controlplane nodes, then"
                                            " run `rkel apply` again")
        return self.world

    def node(self, name: str) -> KubeNode | None:
        return self._serving(f"get node {name}").kube_node(name)

    def cordon(self, name: str) -> None:
        self._serving(f"cordon {name}").set_schedulable(name, False)

    def uncordon(self, name: str) -> None:
        self._serving(f"uncordon {name}").set_schedulable(name, True)

    def drain(self, name: str, options: DrainOptions) -> None:
        self._serving(f"drain {name}").drain(name)

    def delete_node(self, name: str) -> None:
        self._serving(f"delete node {name}").delete_kube_node(name)

    def sync_node_metadata(self, name: str, labels: dict[str, str],
                           taints: list[tuple[str, str, str]]) -> None:
        self._serving(f"labels of {name}").sync_node_metadata(name, labels, taints)

    def save_state_secret(self, name: str, namespace: str, data: dict[str, str]) -> None:
        self._serving(f"save {namespace}/{name}").save_state_secret(name, namespace, data)

    def apply_manifests(self, docs: list[dict], field_manager: str = "rkel") -> list[str]:
        return self._serving("apply add-ons").apply_manifests(docs)

    def rewrite_secrets(self) -> int:
        return self._serving("rewrite secrets").rewrite_secrets()

    def wait_rollout(self, objects: list[dict], timeout: float) -> None:
        self._serving("wait for rollout").wait_rollout(objects, timeout)


class SimEtcd:
    def __init__(self, world: SimWorld) -> None:
        self.world = world

    def members(self) -> list[EtcdMember]:
        return self.world.etcd_members()

    def add_member(self, name: str, peer_url: str) -> None:
        self.world.etcd_add(name, peer_url)

    def promote_member(self, name: str) -> None:
        self.world.etcd_promote(name)

    def remove_member(self, name: str) -> None:
        self.world.etcd_remove(name)

    def healthy(self) -> dict[str, bool]:
        return self.world.etcd_health()


class SimBackend:
    """`Backend` over a SimWorld: one handle (one 'connection') per host per run."""

    def __init__(self, world: SimWorld) -> None:
        self.world = world
        self._hosts: dict[str, SimHostHandle] = {}
        self._lock = threading.Lock()

    def host(self, node: NodeRef) -> SimHostHandle:
        with self._lock:
            handle = self._hosts.get(node.name)
            if handle is None:
                with self.world._lock:
                    self.world._host(node.name).roles = list(node.roles)
                self.world._op(node.name, self.world.latency.connect)
                self.world.connections[node.name] += 1
                handle = self._hosts[node.name] = SimHostHandle(self.world, node)
            return handle

    def kube(self) -> SimKube:
        return SimKube(self.world)

    def etcd(self) -> SimEtcd:
        return SimEtcd(self.world)

    @property
    def connections(self) -> dict[str, int]:
        return dict(self.world.connections)

    def clock(self) -> float:
        return self.world.clock()

    def sleep(self, seconds: float) -> None:
        self.world.sleep(seconds)

    def close(self) -> None:
        self._hosts.clear()


class SimulatedCerts:
    """Certificate files for simulated hosts: a description of each requested certificate.

    Simulated hosts check only that the files arrive; real key material comes from the PKI
    (`lifecycle.pki`) on the SSH backend.
    """

    def files_for(self, node: str, certs: list[Any]) -> dict[str, bytes]:
        files = {}
        for cert in certs:
            body = json.dumps(asdict(cert), sort_keys=True).encode()
            files[f"/etc/kubernetes/ssl/{cert.name}.pem"] = body
        return files

    def encryption_config(self, enc: Any) -> bytes:
        """Simulated hosts get the provider names and hash, never key material."""
        return json.dumps({"providers": list(enc.providers), "hash": enc.hash}).encode()
