"""The SSH + Docker backend: real servers reached over one paramiko connection each.

`SSHBackend` opens one SSH connection per host per run (optionally through the cluster's
bastion), pins host keys in the state store on first contact and refuses changed ones, and hands
out `SSHHost`s. An `SSHHost` carries everything over that one connection: the Docker Engine API
(`lifecycle.hosts.docker_ssh`), `docker exec`, files delivered through short-lived helper
containers (so a non-root SSH user in the docker group is enough), and health probes tunnelled
from the node itself. etcd membership goes through etcdctl in an etcd container
(`lifecycle.hosts.etcdctl`). No secret (key, password, certificate key) is ever logged, put in a
message, a container's environment or command, or written to disk.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import paramiko

from lifecycle.config.model import ClusterConfig, Node
from lifecycle.desired_args import has_registry_host, registry_host
from lifecycle.errors import HostError, HostUnreachableError
from lifecycle.hosts import DrainOptions, KubeAPI, KubeNode
from lifecycle.hosts.docker_ssh import (
    DEFAULT_DOCKER_SOCKET,
    DEFAULT_HELPER_IMAGE,
    CertMaterialLike,
    SSHHost,
    TLSLookup,
)
from lifecycle.hosts.etcdctl import EtcdctlAPI
from lifecycle.spec import NodeRef
from lifecycle.versions import version_info
from store import Store, StoreError

__all__ = ["CertMaterialLike", "SSHBackend", "SSHHost", "fingerprint", "known_host_name"]

log = logging.getLogger(__name__)
# paramiko logs a refused tunnel (a probe of a port not open yet) at ERROR; route our transports'
# logs under our name, silent unless the application configures logging.
PARAMIKO_LOG = f"{__name__}.paramiko"
logging.getLogger(PARAMIKO_LOG).addHandler(logging.NullHandler())

CONNECT_TIMEOUT = 10.0  # TCP connect, SSH banner, key exchange and authentication, each
_KEY_CLASSES: tuple[type[paramiko.PKey], ...] = (
    paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey,
)


# ---------------------------------------------------------------------------- host keys
def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint of a public key: `SHA256:<unpadded base64>`."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_host_name(address: str, port: int) -> str:
    """The name a host key is pinned under: OpenSSH's `addr` or `[addr]:port`."""
    return address if port == 22 else f"[{address}]:{port}"


class _PinPolicy(paramiko.MissingHostKeyPolicy):
    """Called by paramiko for a host with no pinned key: pin it, or refuse it."""

    def __init__(self, backend: SSHBackend, node: str) -> None:
        self.backend = backend
        self.node = node

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        self.backend._pin(self.node, hostname, key)


# ---------------------------------------------------------------------------- credentials
@dataclass(frozen=True)
class _Login:
    """How to reach and log in to one SSH server. An inline key is kept out of its repr."""

    node: str  # the name errors carry
    address: str
    port: int
    user: str
    key_text: str = field(repr=False)  # inline PEM, "" when a path or the agent is used
    key_path: str
    key_source: str  # what the key came from, for messages
    agent: bool
    cert: str = ""  # an OpenSSH certificate (path or contents)

    @property
    def where(self) -> str:
        return f"{self.user}@{self.address}:{self.port}"

    def sources(self) -> str:
        parts = [self.key_source] if self.key_source else []
        if self.agent:
            parts.append("ssh-agent")
        return " and ".join(parts) or "no key"


def _parse_key(text: str, source: str, node: str) -> paramiko.PKey:
    """A private key from PEM/OpenSSH text: RSA, ECDSA or ed25519 (whichever parses)."""
    for cls in _KEY_CLASSES:
        try:
            return cls.from_private_key(io.StringIO(text))
        except paramiko.PasswordRequiredException:
            raise HostError(node, f"{source} is protected by a passphrase; rkel cannot prompt for"
                            " it: load the key into ssh-agent and set ssh_agent_auth: true") from None
        except (paramiko.SSHException, ValueError, TypeError, IndexError):
            continue
    raise HostError(node, f"{source} is not a private key rkel can read (RSA, ECDSA or ed25519,"
                    " PEM or OpenSSH format); fix the key or the ssh_key_path")


def _load_key(login: _Login) -> paramiko.PKey | None:
    """The key to offer, or None when only the agent is used."""
    if login.key_text:
        key = _parse_key(login.key_text, login.key_source, login.node)
    elif login.key_path:
        try:
            with open(login.key_path, encoding="utf-8") as fh:
                text = fh.read()
        except FileNotFoundError:
            if login.agent:
                return None
            raise HostError(login.node, f"{login.key_source} does not exist; set ssh_key_path to"
                            " the private key for this host or enable ssh_agent_auth") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise HostError(login.node, f"cannot read {login.key_source}: {exc}") from None
        key = _parse_key(text, login.key_source, login.node)
    else:
        return None
    if login.cert:
        try:
            key.load_certificate(login.cert)
        except (OSError, ValueError, paramiko.SSHException) as exc:
            raise HostError(login.node, f"cannot use the SSH certificate for {login.where}: {exc}"
                            "; check ssh_cert / ssh_cert_path") from None
    return key


# ---------------------------------------------------------------------------- the backend
class SSHBackend:
    """`Backend` for real servers: one SSH connection per host per run, host keys pinned.

    :param trust_new_hosts: pin the key of a host seen for the first time (else refuse it).
    :param tls: client certificate material by name, for HTTPS health probes.
    :param notice: told one line for each host key pinned (the CLI prints it).
    """

    def __init__(self, config: ClusterConfig, store: Store, *, trust_new_hosts: bool = True,
                 tls: TLSLookup | None = None, notice: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.store = store
        self.trust_new_hosts = trust_new_hosts
        self.tls = tls
        self.notice = notice or log.info
        self.connections: Counter[str] = Counter()
        self._hosts: dict[str, SSHHost] = {}
        self._host_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._bastion: paramiko.SSHClient | None = None
        self._bastion_lock = threading.Lock()
        self._etcd: EtcdctlAPI | None = None
        self._kube: KubeAPI | None = None
        self._etcd_nodes: dict[str, NodeRef] = {}
        self.helper_image = helper_image(config)

    # ------------------------------------------------------------------ Backend
    def host(self, node: NodeRef) -> SSHHost:
        """The node's host, connecting on first use (and again if its connection died)."""
        with self._lock:
            lock = self._host_locks.setdefault(node.name, threading.Lock())
            if "etcd" in node.roles:
                self._etcd_nodes.setdefault(node.name, node)
        with lock:
            have = self._hosts.get(node.name)
            if have is not None and have.alive():
                return have
            if have is not None:
                have.close()
            host = self._open_host(node)
            with self._lock:
                self._hosts[node.name] = host
            return host

    def etcd(self) -> EtcdctlAPI:
        """etcdctl through the etcd hosts of cluster.yml and any etcd host reached this run
        (a member being removed is no longer in the file)."""
        with self._lock:
            nodes = {n.name: node_ref(n) for n in self.config.nodes_with("etcd")}
            for name, ref in self._etcd_nodes.items():
                nodes.setdefault(name, ref)
            ordered = sorted(nodes.values(), key=lambda n: n.name)
            if self._etcd is None:
                self._etcd = EtcdctlAPI(self, ordered)
            else:
                self._etcd.nodes = ordered
            return self._etcd

    def kube(self) -> KubeAPI:
        """The Kubernetes API of the cluster, as kube-admin, through any controlplane node."""
        with self._lock:
            if self._kube is None:
                admin = self.tls("kube-admin") if self.tls is not None else None
                if admin is None:
                    return NoKubeAPI()
                from lifecycle.hosts.kube import KubernetesAPI

                servers = [f"https://{n.address}:6443" for n in self.config.nodes_with("controlplane")]
                self._kube = KubernetesAPI(servers, admin)
            return self._kube

    def forget_credentials(self) -> None:
        """The admin certificate or the CAs changed (a rotation): the next `kube()` uses the
        new ones."""
        with self._lock:
            self._kube = None

    def clock(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    def close(self) -> None:
        with self._lock:
            hosts, self._hosts = list(self._hosts.values()), {}
        for host in hosts:
            host.close()
        with self._bastion_lock:
            if self._bastion is not None:
                self._bastion.close()
                self._bastion = None

    # ------------------------------------------------------------------ connecting
    def _node_config(self, ref: NodeRef) -> Node | None:
        by_name = next((n for n in self.config.nodes if n.name == ref.name), None)
        return by_name or next((n for n in self.config.nodes if n.address == ref.address), None)

    def _login(self, ref: NodeRef) -> _Login:
        """RKE's precedence: node ssh_key, node ssh_key_path, cluster ssh_key_path; agent if on.

        A node no longer in cluster.yml (being removed) logs in like the first node that has its
        SSH user: a cluster's nodes almost always share one key, and the file has no other.
        """
        cluster = self.config
        cfg = self._node_config(ref)
        cfg = cfg or next((n for n in cluster.nodes if n.user == ref.user), None)
        lent = f", lent by node {cfg.address}" if cfg and cfg.address != ref.address else ""
        key_text = cfg.ssh_key if cfg else ""
        node_path = cfg.ssh_key_path if cfg else ""
        if key_text and cfg:
            path, source = "", f"the ssh_key of node {cfg.address} in cluster.yml"
        elif node_path and cfg:
            path = os.path.expanduser(node_path)
            source = f"key file {path} (ssh_key_path of node {cfg.address}{lent})"
        elif cluster.ssh_key_path:
            path = os.path.expanduser(cluster.ssh_key_path)
            source = f"key file {path} (cluster ssh_key_path)"
        else:
            path, source = "", ""
        cert = ""
        if cfg and cfg.ssh_cert:
            cert = cfg.ssh_cert
        elif cfg and cfg.ssh_cert_path:
            cert = os.path.expanduser(cfg.ssh_cert_path)
        elif cluster.ssh_cert_path:
            cert = os.path.expanduser(cluster.ssh_cert_path)
        agent = bool((cfg and cfg.ssh_agent_auth) or cluster.ssh_agent_auth)
        return _Login(ref.name, ref.address, ref.port, ref.user, key_text, path, source, agent, cert)

    def _bastion_login(self) -> _Login:
        b, cluster = self.config.bastion_host, self.config
        assert b is not None
        if b.ssh_key:
            path, source = "", f"the ssh_key of bastion_host {b.address} in cluster.yml"
        elif b.ssh_key_path:
            path = os.path.expanduser(b.ssh_key_path)
            source = f"key file {path} (bastion_host ssh_key_path)"
        else:
            path = os.path.expanduser(cluster.ssh_key_path) if cluster.ssh_key_path else ""
            source = f"key file {path} (cluster ssh_key_path)" if path else ""
        user = b.user or (self.config.nodes[0].user if self.config.nodes else "root")
        cert = b.ssh_cert or (os.path.expanduser(b.ssh_cert_path) if b.ssh_cert_path else "")
        agent = b.ssh_agent_auth or cluster.ssh_agent_auth
        return _Login(f"bastion {b.address}", b.address, b.port, user, b.ssh_key, path, source,
                      agent, cert)

    def _open_host(self, ref: NodeRef) -> SSHHost:
        login = self._login(ref)
        if self.config.bastion_host is not None:
            client = self._ssh(login, lambda: self._tunnel(login))
        else:
            client = self._ssh(login, lambda: _dial(login))
        with self._lock:
            self.connections[ref.name] += 1
        cfg = self._node_config(ref)
        try:
            return SSHHost(ref, client,
                           docker_socket=cfg.docker_socket if cfg else DEFAULT_DOCKER_SOCKET,
                           helper_image=self.helper_image,
                           registries=self.config.private_registries, tls=self.tls)
        except BaseException:
            client.close()
            raise

    def _tunnel(self, login: _Login) -> paramiko.Channel:
        """A direct-tcpip channel from the bastion to the node's sshd."""
        bastion = self._bastion_client()
        transport = bastion.get_transport()
        assert transport is not None
        try:
            return transport.open_channel("direct-tcpip", (login.address, login.port),
                                          ("127.0.0.1", 0), timeout=CONNECT_TIMEOUT)
        except paramiko.ChannelException as exc:
            raise HostUnreachableError(login.node, f"the bastion {bastion_name(self.config)} cannot"
                                       f" reach {login.address}:{login.port} ({exc.text}); check"
                                       " the address, that sshd runs there, and that the bastion"
                                       " allows TCP forwarding (AllowTcpForwarding)") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise HostUnreachableError(login.node, f"lost the bastion connection while opening a"
                                       f" tunnel to {login.address}:{login.port}: {exc}") from None

    def _bastion_client(self) -> paramiko.SSHClient:
        with self._bastion_lock:
            have = self._bastion
            transport = have.get_transport() if have else None
            if have is not None and transport is not None and transport.is_active():
                return have
            login = self._bastion_login()
            client = self._ssh(login, lambda: _dial(login))
            with self._lock:
                self.connections[login.address] += 1
            self._bastion = client
            return client

    def _ssh(self, login: _Login, dial: Callable[[], Any]) -> paramiko.SSHClient:
        """SSH over the socket `dial` gives: the server's key checked against the store, then
        authenticated."""
        key = _load_key(login)  # before dialing: a bad key needs no connection
        name = known_host_name(login.address, login.port)
        client = paramiko.SSHClient()
        pinned = self.store.known_host(name)
        if pinned is not None:
            try:
                pkey = paramiko.PKey.from_type_string(pinned.key_type,
                                                      base64.b64decode(pinned.key_b64))
                client.get_host_keys().add(name, pinned.key_type, pkey)
            except (ValueError, paramiko.SSHException) as exc:
                raise HostError(login.node, f"the pinned host key of {name} cannot be read"
                                f" ({exc}); remove it with `rkel hosts forget {name}`") from None
        client.set_missing_host_key_policy(_PinPolicy(self, login.node))
        sock = dial()
        try:
            client.connect(login.address, login.port, username=login.user, pkey=key,
                           allow_agent=login.agent, look_for_keys=False, sock=sock,
                           timeout=CONNECT_TIMEOUT, banner_timeout=CONNECT_TIMEOUT,
                           auth_timeout=CONNECT_TIMEOUT, channel_timeout=CONNECT_TIMEOUT)
        except paramiko.BadHostKeyException as exc:
            client.close()
            sock.close()
            # The fingerprint as pinned (and as `rkel hosts` lists it).
            self._changed_key(login.node, name, exc.expected_key, exc.key,
                              pinned.fingerprint if pinned else "")
        except paramiko.AuthenticationException:
            client.close()
            sock.close()
            raise HostError(login.node, f"authentication as {login.where} failed with"
                            f" {login.sources()}; check the node's user and that the key's"
                            f" public half is in ~{login.user}/.ssh/authorized_keys") from None
        except HostError:
            client.close()
            sock.close()
            raise
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            sock.close()
            raise HostUnreachableError(login.node, f"SSH to {login.address}:{login.port} failed:"
                                       f" {exc or type(exc).__name__}; check that sshd runs"
                                       " there and answers") from None
        transport = client.get_transport()
        assert transport is not None
        self._check_pinned(login.node, name, transport.get_remote_server_key(), client)
        transport.set_keepalive(30)
        transport.set_log_channel(PARAMIKO_LOG)
        return client

    def _pin(self, node: str, name: str, key: paramiko.PKey) -> None:
        """First contact with `name`: pin its key if new hosts are trusted, else refuse."""
        fp = fingerprint(key)
        pinned = self.store.known_host(name)
        if pinned is not None:  # pinned meanwhile (another thread or process): must match
            if (pinned.key_type, pinned.key_b64) != (key.get_name(), key.get_base64()):
                self._changed_key(node, name, None, key, pinned.fingerprint)
            return
        if not self.trust_new_hosts:
            raise HostError(node, f"the host key of {name} is not pinned (it offers {key.get_name()}"
                            f" {fp}); connect once with --trust-new-hosts after checking that"
                            " fingerprint on the host (ssh-keygen -lf /etc/ssh/ssh_host_*.pub),"
                            " or pin it first")
        try:
            self.store.put_known_host(name, key.get_name(), key.get_base64(), fp)
        except StoreError as exc:
            raise HostError(node, f"cannot pin the host key of {name}: {exc}") from None
        self.notice(f"pinned host key of {name}: {fp}")

    def _check_pinned(self, node: str, name: str, key: paramiko.PKey,
                      client: paramiko.SSHClient) -> None:
        """After the handshake: the key the server proved it holds is the pinned one."""
        pinned = self.store.known_host(name)
        if pinned is None or (pinned.key_type, pinned.key_b64) != (key.get_name(), key.get_base64()):
            client.close()
            if pinned is None:
                raise HostError(node, f"the host key of {name} was not pinned; reconnect")
            self._changed_key(node, name, None, key, pinned.fingerprint)

    def _changed_key(self, node: str, name: str, expected: paramiko.PKey | None,
                     got: paramiko.PKey, expected_fp: str = "") -> NoReturn:
        old = expected_fp or (fingerprint(expected) if expected is not None else "?")
        raise HostError(node, f"the host key of {name} CHANGED: pinned {old}, the server now offers"
                        f" {got.get_name()} {fingerprint(got)}. This may be an attack; refusing to"
                        f" connect. If the host was reinstalled, remove the old pin with `rkel"
                        f" hosts forget {name}` and connect again")


def _dial(login: _Login) -> socket.socket:
    """A TCP connection to the SSH server, with the failure named plainly."""
    try:
        return socket.create_connection((login.address, login.port), timeout=CONNECT_TIMEOUT)
    except TimeoutError:
        why = f"no answer within {CONNECT_TIMEOUT:g} s"
    except ConnectionRefusedError:
        why = "connection refused (is sshd running and listening on that port?)"
    except OSError as exc:
        why = exc.strerror or str(exc)
    raise HostUnreachableError(login.node, f"cannot reach {login.address}:{login.port}: {why};"
                               " check the node's address and port, the host and the network")


def node_ref(node: Node) -> NodeRef:
    """How to reach a config node (what backends take)."""
    return NodeRef(node.name, node.address, node.internal, node.port, node.user, tuple(node.role))


def bastion_name(config: ClusterConfig) -> str:
    b = config.bastion_host
    return f"{b.address}:{b.port}" if b else ""


def helper_image(config: ClusterConfig) -> str:
    """The helper image: system_images cert_downloader/alpine, else the version's (or RKE's)."""
    image = config.system_images.get("cert_downloader") or config.system_images.get("alpine")
    if not image:
        try:
            info = version_info(config.version)
            image = info.image("cert_downloader") or info.image("alpine")
        except KeyError:  # an unsupported version is the planner's error to report
            image = ""
    image = image or DEFAULT_HELPER_IMAGE
    default = next((r.url for r in config.private_registries if r.is_default), "")
    if default and not has_registry_host(image):
        image = f"{registry_host(default)}/{image}"
    return image


class NoKubeAPI:
    """Stands in for the Kubernetes API client until it is part of the build."""

    def _missing(self) -> NoReturn:
        raise HostError("kubernetes", "the Kubernetes API client is not part of this build yet")

    def node(self, name: str) -> KubeNode | None:
        self._missing()

    def cordon(self, name: str) -> None:
        self._missing()

    def uncordon(self, name: str) -> None:
        self._missing()

    def drain(self, name: str, options: DrainOptions) -> None:
        self._missing()

    def delete_node(self, name: str) -> None:
        self._missing()

    def sync_node_metadata(self, name: str, labels: dict[str, str],
                           taints: list[tuple[str, str, str]]) -> None:
        self._missing()

    def save_state_secret(self, name: str, namespace: str, data: dict[str, str]) -> None:
        self._missing()

    def apply_manifests(self, docs: list[dict], field_manager: str = "rkel") -> list[str]:
        self._missing()

    def rewrite_secrets(self) -> int:
        self._missing()

    def wait_rollout(self, objects: list[dict], timeout: float) -> None:
        self._missing()
