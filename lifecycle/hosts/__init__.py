"""The Host protocol: what the executor may ask of a node, a Kubernetes API and an etcd cluster.

Two implementations carry it: the SSH + Docker backend for real servers and the Simulated backend
(`lifecycle.hosts.simulated`) for properties, scale and rehearsals. Everything above this module
(effects, executor) is written against these protocols only, so the same planner and executor
drive both. Methods observe or change one thing and raise `HostError` subclasses on failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Mapping, Protocol, Sequence

from lifecycle.spec import NodeRef, ServiceSpec


@dataclass(frozen=True)
class Container:
    """A container as observed on a host."""

    name: str
    image: str
    spec_hash: str  # the io.rkel.spec-hash label ("" when the container is not rkel's)
    running: bool


@dataclass(frozen=True)
class ContainerConfig:
    """How a container was made, as observed on a host (what `docker inspect` shows)."""

    name: str
    image: str
    argv: tuple[str, ...]  # entrypoint followed by the command
    env: tuple[str, ...]  # without the entries the image itself sets
    binds: tuple[str, ...]
    privileged: bool = False
    network_mode: str = ""
    pid_mode: str = ""
    restart: str = ""
    volumes_from: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    running: bool = False


# The TCP ports each rkel container listens on in the host's network namespace (every one runs
# with host networking), as RKE's components do. `rkel doctor` (lifecycle.doctor) checks them;
# the Simulated backend reports them as listened on while the container runs.
SERVICE_PORTS: dict[str, tuple[int, ...]] = {
    "etcd": (2379, 2380),
    "kube-apiserver": (6443,),
    "nginx-proxy": (6443,),  # the local load balancer of nodes without the controlplane role
    "kube-controller-manager": (10257,),
    "kube-scheduler": (10259,),
    "kubelet": (10248, 10250),
    "kube-proxy": (10256,),
}


@dataclass(frozen=True)
class KubeNode:
    """A Kubernetes Node as the API reports it."""

    name: str
    ready: bool
    schedulable: bool
    kubelet_version: str = ""


@dataclass(frozen=True)
class EtcdMember:
    name: str
    peer_url: str
    started: bool  # False between `member add` and the member's first start
    learner: bool = False  # added as a non-voting learner; promoted once it has caught up


@dataclass(frozen=True)
class DrainOptions:
    force: bool = False
    ignore_daemonsets: bool = True
    delete_local_data: bool = False
    grace_period: int = -1
    timeout: int = 120


class Host(Protocol):
    """One node, reached over one connection that lives for the whole run."""

    name: str

    def containers(self) -> dict[str, Container]:
        """Every container on the host, by name."""
        ...

    def inspect_container(self, name: str) -> ContainerConfig | None:
        """How container `name` was made; None when there is no such container."""
        ...

    def run_container(self, spec: ServiceSpec, extra_args: Sequence[str] = ()) -> None:
        """Create and start a container from `spec` (labelled with its hash), named spec.name."""
        ...

    def start_container(self, name: str) -> None: ...

    def stop_container(self, name: str) -> None: ...

    def remove_container(self, name: str) -> None:
        """Stop and delete; no error if it does not exist."""
        ...

    def rename_container(self, old: str, new: str) -> None: ...

    def probe(self, spec: ServiceSpec) -> bool:
        """One health probe of the running service; True when healthy."""
        ...

    def put_files(self, files: Mapping[str, bytes]) -> None:
        """Write files (absolute paths on the node), root-owned, mode 0600."""
        ...

    def remove_paths(self, paths: Sequence[str]) -> None: ...

    def move_paths(self, root: str, moves: Sequence[tuple[str, str]], *, replace: bool) -> None:
        """Rename each (src, dst), both relative to the directory `root`, in order. A missing
        src is skipped; an existing dst is removed first with `replace`, else the move skipped."""
        ...

    def exec(self, container: str, cmd: list[str]) -> tuple[int, str]:
        """Run `cmd` in a running container: (exit code, stdout followed by stderr)."""
        ...

    def run_once(self, image: str, command: Sequence[str], *, binds: Sequence[str] = (),
                 host_network: bool = False, env: Sequence[str] = (),
                 timeout: float = 600.0) -> tuple[int, str]:
        """Run a short-lived container from `image` to completion and remove it:
        (exit code, stdout followed by stderr). No secret in `command` or `env`."""
        ...

    def file_sha256(self, path: str) -> str | None:
        """The sha256 (hex) of a file on the node, computed there; None when it is missing."""
        ...

    def fetch_file(self, path: str, out: BinaryIO) -> int:
        """Stream a file of the node into `out`; the number of bytes written."""
        ...

    def list_files(self, directory: str) -> dict[str, int]:
        """The regular files directly in `directory` on the node, name -> size in bytes
        (empty when there is no such directory)."""
        ...

    def put_file(self, path: str, src: BinaryIO, size: int) -> None:
        """Write `size` bytes streamed from `src` to `path` on the node, root-owned, mode 0600."""
        ...

    def close(self) -> None: ...


class KubeAPI(Protocol):
    """The cluster's Kubernetes API, as used by the executor."""

    def node(self, name: str) -> KubeNode | None: ...

    def cordon(self, name: str) -> None: ...

    def uncordon(self, name: str) -> None: ...

    def drain(self, name: str, options: DrainOptions) -> None: ...

    def delete_node(self, name: str) -> None: ...

    def sync_node_metadata(self, name: str, labels: dict[str, str],
                           taints: list[tuple[str, str, str]]) -> None:
        """Give the Node exactly these cluster.yml labels and (key, value, effect) taints,
        removing ones rkel set before and touching none it did not set (kept in annotations).
        HostError when the kubelet has not registered the Node."""
        ...

    def save_state_secret(self, name: str, namespace: str, data: dict[str, str]) -> None:
        """Create or replace an Opaque Secret with `data` (labelled managed-by rkel)."""
        ...

    def rewrite_secrets(self) -> int:
        """Read and replace every Secret unchanged (as `kubectl replace`), so the API servers
        store each one again with their current first encryption provider; how many were
        rewritten. One written meanwhile by someone else (a conflict) or deleted is skipped:
        that write stored it already."""
        ...

    def apply_manifests(self, docs: list[dict], field_manager: str = "rkel") -> list[str]:
        """Server-side apply each object, CRDs and Namespaces first; returns
        "kind/namespace/name" ("kind/name" when cluster-scoped) of each. HostError naming every
        object that an unknown kind or a server refusal stopped."""
        ...

    def wait_rollout(self, objects: list[dict], timeout: float) -> None:
        """Poll until the Deployments, DaemonSets, StatefulSets and Jobs among `objects` have
        rolled out and the rest exist; HostError naming each unready object on timeout."""
        ...


class EtcdAPI(Protocol):
    """The etcd cluster's membership API (through a healthy member)."""

    def members(self) -> list[EtcdMember]: ...

    def add_member(self, name: str, peer_url: str) -> None:
        """Add as a learner: it does not count towards quorum until promoted."""
        ...

    def promote_member(self, name: str) -> None:
        """Make a caught-up learner a voting member; raises HostError while it is not ready."""
        ...

    def remove_member(self, name: str) -> None: ...

    def healthy(self) -> dict[str, bool]:
        """Health of every member by name (not 'the first one that answers')."""
        ...


class Backend(Protocol):
    """Hands out hosts and cluster APIs for one run; `close` ends every connection."""

    def host(self, node: NodeRef) -> Host: ...

    def kube(self) -> KubeAPI: ...

    def etcd(self) -> EtcdAPI: ...

    def clock(self) -> float:
        """Seconds on this backend's clock (virtual for the Simulated backend)."""
        ...

    def sleep(self, seconds: float) -> None: ...

    def close(self) -> None: ...
