"""One host over one SSH connection: the Docker Engine API on our transport, and what rkel does
with it.

The Docker SDK's own `ssh://` support opens a second SSH connection of its own (and trusts
~/.ssh/known_hosts). Here every HTTP connection of a `docker.APIClient` is instead a session
channel on rkel's paramiko Transport running `docker system dial-stdio` on the host (the command
the docker CLI and the SDK use): one SSH connection per host carries the Docker API, `docker exec`
and the TCP tunnels of health probes alike. `SSHHost` (the `Host` protocol) builds on it: files
arrive through never-started helper containers fed by `put_archive`, so a non-root SSH user in
the docker group is enough and no secret appears in a command, an environment or a local file.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import posixpath
import secrets
import shlex
import ssl
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, BinaryIO, NoReturn, Protocol

import docker
import paramiko
import requests
from docker.transport.basehttpadapter import BaseHTTPAdapter
from docker.transport.sshconn import SSHConnection, SSHConnectionPool

from lifecycle.config.model import PrivateRegistry
from lifecycle.desired_args import has_registry_host, registry_host
from lifecycle.errors import HostError, HostUnreachableError
from lifecycle.hosts import Container, ContainerConfig
from lifecycle.spec import SPEC_HASH_LABEL, HealthCheck, NodeRef, ServiceSpec

log = logging.getLogger(__name__)

DEFAULT_DOCKER_SOCKET = "/var/run/docker.sock"
# Only used to build the client: the real version is asked of the engine right after.
BOOTSTRAP_API_VERSION = "1.41"
CHANNEL_TIMEOUT = 10.0
PROBE_TIMEOUT = 5.0
LOST_GRACE = 1.0  # seconds to let the SSH transport notice its connection is gone
STOP_TIMEOUT = 10  # seconds Docker waits after SIGTERM before SIGKILL
HELPER_LABEL = "io.rkel.helper"
DEFAULT_HELPER_IMAGE = "rancher/rke-tools:v0.1.102"
# `list_files`: $1 (an absolute path on the node) is walked below /rkel/0, where the node's / is
# bound, following each symbolic link as the node would (an absolute target is taken from the
# node's /), then each regular file printed as <size>/<name>. Missing: nothing, exit 0.
LIST_SCRIPT = r"""p=/rkel/0; IFS=/; set -f
for part in $1; do
  [ -n "$part" ] || continue; p="$p/$part"; n=0
  while [ -L "$p" ] && [ $n -lt 40 ]; do
    t=$(readlink "$p"); n=$((n + 1))
    case "$t" in /*) p="/rkel/0$t" ;; *) p="${p%/*}/$t" ;; esac
  done
done
unset IFS; set +f
[ -e "$p" ] || exit 0
cd "$p" || exit 3
for f in * .[!.]*; do
  if [ -f "$f" ] && [ ! -L "$f" ]; then printf '%s/%s\n' "$(stat -c %s -- "./$f")" "$f"; fi
done"""
_MAX_RESPONSE = 1 << 20
CHUNK = 1 << 20  # bytes per read when streaming big files
ONCE_TIMEOUT = 600.0  # seconds a one-shot container may run
_DOCKER_HUB = ("docker.io", "index.docker.io", "registry-1.docker.io")


class CertMaterialLike(Protocol):
    """A client certificate, its key and the CA that signs the servers it talks to (PEM)."""

    @property
    def cert_pem(self) -> bytes: ...

    @property
    def key_pem(self) -> bytes: ...

    @property
    def ca_pem(self) -> bytes: ...


TLSLookup = Callable[[str], "CertMaterialLike | None"]


# ------------------------------------------------------------------ Docker over our transport
def dial_stdio_command(docker_socket: str = DEFAULT_DOCKER_SOCKET) -> str:
    """The remote command that bridges a channel to the Docker socket."""
    if not docker_socket or docker_socket == DEFAULT_DOCKER_SOCKET:
        return "docker system dial-stdio"
    return f"docker -H {shlex.quote('unix://' + docker_socket)} system dial-stdio"


class _ChannelConnection(SSHConnection):
    """An HTTP connection whose socket is a dial-stdio channel on our transport."""

    def __init__(self, transport: paramiko.Transport, command: str, timeout: float) -> None:
        super().__init__(ssh_transport=transport, timeout=timeout)
        self._command = command

    def connect(self) -> None:
        channel = self.ssh_transport.open_session(timeout=self.timeout)
        channel.settimeout(self.timeout)
        channel.exec_command(self._command)
        self.sock = channel


class _ChannelPool(SSHConnectionPool):
    """The SDK's SSH pool (it avoids urllib3's fileno()-based liveness checks), fed our channels."""

    def __init__(self, transport: paramiko.Transport, command: str, timeout: float,
                 maxsize: int) -> None:
        super().__init__(ssh_client=None, timeout=timeout, maxsize=maxsize)
        self.ssh_transport = transport
        self._command = command

    def _new_conn(self) -> _ChannelConnection:
        return _ChannelConnection(self.ssh_transport, self._command, self.timeout)


class TransportAdapter(BaseHTTPAdapter):
    """A requests adapter for `http+docker://ssh` URLs over an existing paramiko Transport.

    Closing it closes the pooled channels only; the transport belongs to the caller.
    """

    def __init__(self, transport: paramiko.Transport, docker_socket: str, timeout: float = 60,
                 max_pool_size: int = 4) -> None:
        self.transport = transport
        self.command = dial_stdio_command(docker_socket)
        self.timeout = timeout
        self.max_pool_size = max_pool_size
        self._pool: _ChannelPool | None = None
        self._lock = threading.Lock()
        super().__init__()

    def get_connection(self, url: Any, proxies: Any = None) -> _ChannelPool:
        # One pool for every URL (the SDK keeps one per URL, each holding a channel open, and
        # sshd allows only MaxSessions, 10 by default, per connection).
        with self._lock:
            if self._pool is None:
                self._pool = _ChannelPool(self.transport, self.command, self.timeout,
                                          self.max_pool_size)
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        super().close()


def api_client(transport: paramiko.Transport, docker_socket: str = DEFAULT_DOCKER_SOCKET,
               timeout: float = 60) -> docker.APIClient:
    """A low-level Docker client whose every request travels over `transport`.

    `use_ssh_client=True` keeps the SDK from opening an SSH connection of its own (that mode
    only shells out on first use, and we replace its adapter before any use). The API version
    is then asked of the engine through our adapter. Raises what the first request raises
    (requests/docker errors) when the engine cannot be reached; callers translate.
    """
    client = docker.APIClient(base_url="ssh://rkel", version=BOOTSTRAP_API_VERSION,
                              use_ssh_client=True, timeout=timeout)
    shell_adapter = client.adapters.get("http+docker://ssh")
    adapter = TransportAdapter(transport, docker_socket, timeout)
    client.mount("http+docker://ssh", adapter)
    client._custom_adapter = adapter  # what the SDK's own ssh:// setup sets too
    if isinstance(shell_adapter, requests.adapters.BaseAdapter):
        shell_adapter.close()
    client._version = client.version(api_version=False)["ApiVersion"]
    return client


# ---------------------------------------------------------------------------- the host
class SSHHost:
    """`Host` over one SSH connection: Docker API, exec, helper containers, tunnelled probes."""

    def __init__(self, ref: NodeRef, client: paramiko.SSHClient, *,
                 docker_socket: str = DEFAULT_DOCKER_SOCKET,
                 helper_image: str = DEFAULT_HELPER_IMAGE,
                 registries: Sequence[PrivateRegistry] = (),
                 tls: TLSLookup | None = None) -> None:
        """Wrap an authenticated SSH client; raises HostError when Docker is not usable."""
        self.name = ref.name
        self.ref = ref
        self.client = client
        self.helper_image = helper_image
        self.registries = tuple(registries)
        self.tls = tls
        transport = client.get_transport()
        assert transport is not None
        self.transport: paramiko.Transport = transport
        self.docker_socket = docker_socket or DEFAULT_DOCKER_SOCKET
        try:
            self.api = api_client(transport, self.docker_socket)
        except (requests.exceptions.RequestException, docker.errors.DockerException,
                paramiko.SSHException, OSError, EOFError, KeyError, ValueError):
            self._docker_unusable()
        self._remove_leftover_helpers()

    # ------------------------------------------------------------------ plumbing
    def alive(self) -> bool:
        return self.transport.is_active()

    def close(self) -> None:
        try:
            if hasattr(self, "api"):
                self.api.close()
        finally:
            self.client.close()

    def run_command(self, command: str, timeout: float = 60) -> tuple[int, str, str]:
        """Run a command over SSH (as the SSH user): (exit status, stdout, stderr)."""
        try:
            channel = self.transport.open_session(timeout=CHANNEL_TIMEOUT)
            channel.settimeout(timeout)
            channel.exec_command(command)
            out = channel.makefile("rb").read()
            err = channel.makefile_stderr("rb").read()
            code = channel.recv_exit_status()
            channel.close()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise HostUnreachableError(
                self.name, f"running a command over SSH on {self.ref.address} failed ({exc}); "
                "check that the node is up and sshd runs on it, then run `rkel apply` again") from None
        return code, out.decode(errors="replace"), err.decode(errors="replace")

    def _docker_unusable(self) -> NoReturn:
        """The Docker API did not answer: ask the docker CLI why, and say what to do."""
        sock, user, addr = self.docker_socket, self.ref.user, self.ref.address
        code, _out, err = self.run_command(
            f"docker -H {shlex.quote('unix://' + sock)} version"
            " --format '{{.Server.APIVersion}}'", timeout=30)
        self.client.close()
        low = err.lower()
        if "permission denied" in low:
            raise HostError(self.name, f"user {user} cannot use the Docker socket on {addr}"
                            f" ({sock}); add it to the docker group: usermod -aG docker {user}"
                            " (then reconnect)")
        if code == 127 or "command not found" in low or "docker: not found" in low:
            raise HostError(self.name, f"the docker CLI is missing on {addr}; rkel needs Docker"
                            " Engine with its CLI (`docker system dial-stdio`) on every node")
        if "cannot connect" in low or "daemon running" in low or "no such file" in low:
            raise HostUnreachableError(self.name, f"the Docker Engine on {addr} does not answer"
                                       f" on {sock}; start it (systemctl start docker) or set the"
                                       " node's docker_socket")
        detail = err.strip().splitlines()[-1] if err.strip() else f"exit status {code}"
        raise HostUnreachableError(self.name, f"the Docker API on {addr} did not answer: {detail}")

    @contextmanager
    def _docker(self, what: str) -> Iterator[None]:
        """Translate Docker SDK and transport errors into HostErrors naming the operation."""
        try:
            yield
        except docker.errors.APIError as exc:
            said = exc.explanation or exc
            if exc.is_server_error() and not self._engine_answers():
                # an engine shutting down answers in-flight calls with errors of its own
                # ("database not open"): that is the engine stopping, not a bad request
                raise HostUnreachableError(self.name, f"{what}: {self._engine_stopped(said)}") from None
            raise HostError(self.name, f"{what}: {said}") from None
        except (requests.exceptions.Timeout, TimeoutError):
            raise HostUnreachableError(
                self.name, f"{what}: no answer from {self.ref.address} in time (the host, its "
                "Docker Engine or the network to it may be down); check the node, then run "
                "`rkel apply` again") from None
        except (requests.exceptions.ConnectionError, paramiko.SSHException, EOFError,
                OSError) as exc:
            raise HostUnreachableError(self.name, f"{what}: {self._lost(exc)}") from None
        except docker.errors.DockerException as exc:
            raise HostError(self.name, f"{what}: {exc}") from None

    def _lost(self, exc: BaseException) -> str:
        """Why a Docker API call lost its channel, and what to do: the SSH connection itself went
        (host down, sshd stopped, network cut), or only the Docker Engine behind it stopped."""
        addr = f"{self.ref.address}:{self.ref.port}"
        deadline = time.monotonic() + LOST_GRACE
        while self.transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)  # the transport's reader notices a closed connection shortly
        if not self.transport.is_active():
            return (f"lost the SSH connection to {addr} (the host went down, its sshd stopped or "
                    "the network dropped it); check that the node is up and sshd runs on it, "
                    "then run `rkel apply` again")
        return self._engine_stopped(exc)

    def _engine_stopped(self, said: object) -> str:
        return (f"the Docker Engine on {self.ref.address} stopped answering over SSH ({said}); "
                "start it (systemctl start docker), then run `rkel apply` again")

    def _engine_answers(self, tries: int = 2) -> bool:
        """Whether the engine still answers a ping (asked twice, a second apart: an engine that
        is shutting down may answer the first)."""
        for attempt in range(tries):
            if attempt:
                time.sleep(1.0)
            try:
                self.api.ping()
            except (requests.exceptions.RequestException, docker.errors.DockerException,
                    paramiko.SSHException, OSError, EOFError):
                return False
        return True

    def _remove_leftover_helpers(self) -> None:
        """Helpers an interrupted earlier run left behind (never a running one)."""
        with self._docker("listing leftover helper containers"):
            leftovers = self.api.containers(all=True, filters={"label": f"{HELPER_LABEL}=1"})
        for c in leftovers:
            if c.get("State") in ("created", "exited", "dead"):
                with self._docker("removing a leftover helper container"):
                    self.api.remove_container(c["Id"], force=True, v=True)

    # ------------------------------------------------------------------ containers
    def containers(self) -> dict[str, Container]:
        with self._docker("listing containers"):
            found = self.api.containers(all=True)
        out = {}
        for c in found:
            name = (c.get("Names") or ["/"])[0].lstrip("/")
            labels = c.get("Labels") or {}
            out[name] = Container(name, c.get("Image", ""), labels.get(SPEC_HASH_LABEL, ""),
                                  c.get("State") == "running")
        return dict(sorted(out.items()))

    def inspect_container(self, name: str) -> ContainerConfig | None:
        try:
            with self._docker(f"inspecting container {name}"):
                info = self.api.inspect_container(name)
        except HostError as exc:
            if "No such container" in str(exc):
                return None
            raise
        config = info.get("Config") or {}
        host = info.get("HostConfig") or {}
        image = config.get("Image", "")
        try:
            with self._docker(f"inspecting image {image}"):
                image_env = set((self.api.inspect_image(image).get("Config") or {}).get("Env") or ())
        except HostError:
            image_env = set()  # the image is gone: every variable counts as the container's
        return ContainerConfig(
            name=name,
            image=image,
            argv=tuple(config.get("Entrypoint") or ()) + tuple(config.get("Cmd") or ()),
            env=tuple(e for e in config.get("Env") or () if e not in image_env),
            binds=tuple(host.get("Binds") or ()),
            privileged=bool(host.get("Privileged")),
            network_mode=host.get("NetworkMode") or "",
            pid_mode=host.get("PidMode") or "",
            restart=(host.get("RestartPolicy") or {}).get("Name") or "",
            volumes_from=tuple(host.get("VolumesFrom") or ()),
            labels=tuple(sorted((config.get("Labels") or {}).items())),
            running=bool((info.get("State") or {}).get("Running")),
        )

    def run_container(self, spec: ServiceSpec, extra_args: Sequence[str] = ()) -> None:
        self.ensure_image(spec.image)
        command = [*spec.command, *spec.args, *extra_args]
        labels = dict(spec.labels)
        labels[SPEC_HASH_LABEL] = spec.hash
        with self._docker(f"creating container {spec.name} from {spec.image}"):
            host_config = self.api.create_host_config(
                binds=list(spec.binds) or None,
                privileged=spec.privileged,
                network_mode=spec.network_mode or None,
                pid_mode=spec.pid_mode or None,
                restart_policy={"Name": spec.restart} if spec.restart else None,
                volumes_from=list(spec.volumes_from) or None,
            )
            self.api.create_container(
                spec.image,
                command=command or None,
                # With a command of our own the image's entrypoint must not be prepended.
                entrypoint=[] if spec.command else None,
                environment=list(spec.env) or None,
                labels=labels,
                name=spec.name,
                host_config=host_config,
            )
        with self._docker(f"starting container {spec.name}"):
            self.api.start(spec.name)

    def start_container(self, name: str, tries: int = 5) -> None:
        """Start it. An engine that has just come back starts its restart=always containers
        itself, and a start of ours meanwhile fails with "task ... already exists": then the
        container is (or is about to be) running, which is what was asked."""
        for attempt in range(tries):
            try:
                with self._docker(f"starting container {name}"):
                    self.api.start(name)
                return
            except HostError as exc:
                if "already exists" not in str(exc) or attempt + 1 == tries:
                    raise
            time.sleep(1.0)
            with self._docker(f"inspecting container {name}"):
                if ((self.api.inspect_container(name).get("State") or {}).get("Running")):
                    return

    def stop_container(self, name: str) -> None:
        with self._docker(f"stopping container {name}"):
            self.api.stop(name, timeout=STOP_TIMEOUT)

    def remove_container(self, name: str) -> None:
        try:
            with self._docker(f"removing container {name}"):
                self.api.remove_container(name, force=True, v=True)
        except HostError as exc:
            if "No such container" not in str(exc):
                raise

    def rename_container(self, old: str, new: str) -> None:
        with self._docker(f"renaming container {old} to {new}"):
            self.api.rename(old, new)

    def exec(self, container: str, cmd: list[str]) -> tuple[int, str]:
        """Run `cmd` in a running container: (exit code, stdout followed by stderr)."""
        with self._docker(f"running {cmd[0] if cmd else '?'} in container {container}"):
            exec_id = self.api.exec_create(container, cmd, stdout=True, stderr=True)["Id"]
            out, err = self.api.exec_start(exec_id, demux=True)
            code = self.api.exec_inspect(exec_id).get("ExitCode")
        text = (out or b"").decode(errors="replace") + (err or b"").decode(errors="replace")
        return (code if code is not None else -1), text

    def ensure_image(self, image: str) -> None:
        """Pull `image` unless the engine has it, with private_registries credentials."""
        try:
            with self._docker(f"inspecting image {image}"):
                self.api.inspect_image(image)
            return
        except HostError as exc:
            if "No such image" not in str(exc) and "not found" not in str(exc).lower():
                raise
        # {} and not None: with None, docker-py would send this machine's own
        # ~/.docker/config.json credentials to the node's engine.
        auth = registry_auth(self.registries, image) or {}
        hint = ("check the image reference, the registry and the private_registries credentials"
                " in cluster.yml")
        try:
            with self._docker(f"pulling image {image}"):
                for event in self.api.pull(image, stream=True, decode=True, auth_config=auth):
                    if isinstance(event, dict) and event.get("error"):
                        raise HostError(self.name, f"pulling image {image} failed:"
                                        f" {event['error']}; {hint}")
        except HostError as exc:
            if hint in str(exc):
                raise
            raise HostError(self.name, f"{str(exc).removeprefix(self.name + ': ')}; {hint}") from None

    # ------------------------------------------------------------------ files
    def put_files(self, files: Mapping[str, bytes]) -> None:
        """Write files root-owned 0600 through a helper container (works for a non-root user).

        Each file's directory is bind-mounted into a created-but-never-started helper (Docker
        creates missing directories 0755) and the files arrive by `put_archive`: their content
        never appears in a command line, an environment or a file on this machine.
        """
        if not files:
            return
        groups: dict[str, list[tuple[str, bytes]]] = {}
        for path, content in sorted(files.items()):
            clean = _absolute(self.name, path)
            groups.setdefault(posixpath.dirname(clean), []).append(
                (posixpath.basename(clean), content))
        dirs = sorted(groups)
        binds = [f"{d}:/rkel/{i}" for i, d in enumerate(dirs)]
        helper = self._create_helper("put", binds, ["true"])
        try:
            for i, d in enumerate(dirs):
                with self._docker(f"writing files into {d}"):
                    if not self.api.put_archive(helper, f"/rkel/{i}", _tar(groups[d])):
                        raise HostError(self.name, f"writing files into {d} was refused")
        finally:
            self.remove_container(helper)

    def remove_paths(self, paths: Sequence[str]) -> None:
        """`rm -rf` each path (a mount point is emptied) in a helper container."""
        clean = sorted({_absolute(self.name, p) for p in paths})
        if not clean:
            return
        parents = sorted({posixpath.dirname(p) for p in clean})
        index = {d: i for i, d in enumerate(parents)}
        binds = [f"{d}:/rkel/{i}" for d, i in index.items()]
        inside = [f"/rkel/{index[posixpath.dirname(p)]}/{posixpath.basename(p)}" for p in clean]
        script = ('for p; do rm -rf "$p" 2>/dev/null; if [ -e "$p" ] && [ -n "$(ls -A "$p")" ];'
                  ' then echo "could not remove ${p#/rkel/}" >&2; exit 1; fi; done')
        self._run_helper("rm", binds, ["sh", "-c", script, "rm", *inside],
                         f"removing {', '.join(clean)}", 120)

    def _run_helper(self, purpose: str, binds: list[str], command: list[str], what: str,
                    timeout: float) -> None:
        """Run a helper container to completion; HostError naming `what` if it fails."""
        helper = self._create_helper(purpose, binds, command)
        try:
            with self._docker(what):
                self.api.start(helper)
                status = self.api.wait(helper, timeout=timeout).get("StatusCode", -1)
                logs = self.api.logs(helper).decode(errors="replace").strip()
        finally:
            self.remove_container(helper)
        if status != 0:
            raise HostError(self.name, f"{what} failed ({logs or status})")

    def move_paths(self, root: str, moves: Sequence[tuple[str, str]], *, replace: bool) -> None:
        """`mv` each (src, dst) below `root` in a helper container (see `Host.move_paths`)."""
        clean = _absolute(self.name, root)
        words: list[str] = []
        for src, dst in moves:
            for rel in (src, dst):
                if rel.startswith("/") or ".." in rel.split("/") or not rel.strip("/"):
                    raise HostError(self.name, f"refusing path {rel!r}: a path below {clean}"
                                    " is required")
            words += [src, dst]
        existing = 'rm -rf "$d"' if replace else "continue"
        script = ('cd /rkel/0 || exit 1; while [ $# -gt 0 ]; do s=$1; d=$2; shift 2;'
                  f' [ -e "$s" ] || continue; if [ -e "$d" ]; then {existing}; fi;'
                  ' mv "$s" "$d" || exit 1; done')
        self._run_helper("mv", [f"{clean}:/rkel/0"], ["sh", "-c", script, "mv", *words],
                         f"moving {', '.join(f'{a} -> {b}' for a, b in moves)} in {clean}", 300)

    # ------------------------------------------------------------------ one-shot containers, big files
    def run_once(self, image: str, command: Sequence[str], *, binds: Sequence[str] = (),
                 host_network: bool = False, env: Sequence[str] = (),
                 timeout: float = ONCE_TIMEOUT) -> tuple[int, str]:
        """Run a short-lived container to completion, then remove it: (exit code, output).

        The command and env must hold no secret (they show in `docker inspect`): pass paths of
        files already on the node instead."""
        self.ensure_image(image)
        name = f"rkel-helper-once-{secrets.token_hex(4)}"
        with self._docker(f"creating container {name} from {image}"):
            self.api.create_container(
                image, command=list(command), entrypoint=[], name=name,
                environment=list(env) or None, labels={HELPER_LABEL: "1"},
                host_config=self.api.create_host_config(
                    binds=list(binds) or None, network_mode="host" if host_network else "none"),
            )
        try:
            with self._docker(f"running {command[0] if command else '?'} in {name}"):
                self.api.start(name)
                status = self.api.wait(name, timeout=timeout).get("StatusCode", -1)
                out = self.api.logs(name, stdout=True, stderr=True).decode(errors="replace")
        finally:
            self.remove_container(name)
        return int(status), out

    def file_sha256(self, path: str) -> str | None:
        """The sha256 of a node file, computed on the node; None when there is no such file."""
        clean = _absolute(self.name, path)
        script = 'if [ -f "$1" ]; then sha256sum "$1" | cut -d" " -f1; else echo missing; fi'
        inside = f"/rkel/0/{posixpath.basename(clean)}"
        code, out = self.run_once(self.helper_image, ["sh", "-c", script, "sha", inside],
                                  binds=[f"{posixpath.dirname(clean)}:/rkel/0:ro"])
        words = out.split()
        if code == 0 and words == ["missing"]:
            return None
        if code == 0 and len(words) == 1 and len(words[0]) == 64:
            return words[0].lower()
        raise HostError(self.name, f"computing the sha256 of {clean} failed"
                        f" ({' '.join(words)[:200] or f'exit status {code}'})")

    def list_files(self, directory: str) -> dict[str, int]:
        """The regular files in `directory` with their sizes, listed on the node: a helper
        container with the node's / bound read-only, so that nothing is created (a missing
        directory is empty). Symbolic links on the way are followed as on the node."""
        clean = _absolute(self.name, directory).rstrip("/") or "/"
        code, out = self.run_once(self.helper_image, ["sh", "-c", LIST_SCRIPT, "ls", clean],
                                  binds=["/:/rkel/0:ro"])
        if code != 0:
            raise HostError(self.name, f"listing {clean} failed ({out.strip()[:200]})")
        files: dict[str, int] = {}
        for line in out.splitlines():
            size, _, name = line.partition("/")
            if size.isdigit() and name:
                files[name] = int(size)
        return files

    def fetch_file(self, path: str, out: BinaryIO) -> int:
        """Stream one node file into `out` (Docker `get_archive`, never whole in memory)."""
        clean = _absolute(self.name, path)
        helper = self._create_helper("get", [f"{posixpath.dirname(clean)}:/rkel/0:ro"], ["true"])
        try:
            with self._docker(f"reading {clean}"):
                stream, stat = self.api.get_archive(helper, f"/rkel/0/{posixpath.basename(clean)}",
                                                    chunk_size=CHUNK)
                if not stat or int(stat.get("mode", 0)) & (1 << 31):  # os.ModeDir in Go
                    raise HostError(self.name, f"{clean} is not a regular file")
                with tarfile.open(fileobj=_IterReader(stream), mode="r|") as tar:
                    member = tar.next()
                    source = tar.extractfile(member) if member is not None else None
                    if member is None or source is None:
                        raise HostError(self.name, f"{clean} is not a regular file")
                    size = 0
                    while chunk := source.read(CHUNK):
                        out.write(chunk)
                        size += len(chunk)
        finally:
            self.remove_container(helper)
        return size

    def put_file(self, path: str, src: BinaryIO, size: int) -> None:
        """Write one (large) file root-owned 0600, streamed from `src` as a tar by `put_archive`."""
        clean = _absolute(self.name, path)
        helper = self._create_helper("put", [f"{posixpath.dirname(clean)}:/rkel/0"], ["true"])
        try:
            with self._docker(f"writing {clean}"):
                if not self.api.put_archive(helper, "/rkel/0",
                                            _tar_stream(posixpath.basename(clean), src, size)):
                    raise HostError(self.name, f"writing {clean} was refused")
        finally:
            self.remove_container(helper)

    def _create_helper(self, purpose: str, binds: list[str], command: list[str]) -> str:
        image = self.helper_image
        self.ensure_image(image)
        name = f"rkel-helper-{purpose}-{secrets.token_hex(4)}"
        with self._docker(f"creating helper container {name}"):
            self.api.create_container(
                image, command=command, entrypoint=[], name=name, labels={HELPER_LABEL: "1"},
                host_config=self.api.create_host_config(binds=binds, network_mode="none"),
            )
        return name

    # ------------------------------------------------------------------ health
    def probe(self, spec: ServiceSpec) -> bool:
        """One GET of the health URL as seen from the node (tunnelled over our SSH connection)."""
        if spec.health is None:
            try:
                have = self.containers().get(spec.name)
            except HostError:
                return False
            return bool(have and have.running)
        try:
            status, body = self.http_get(spec.health)
        except Exception as exc:  # noqa: BLE001 - any failure means "not healthy (yet)"
            if not self.transport.is_active():  # ... unless the host itself is gone
                raise HostUnreachableError(
                    self.name, f"health check of {spec.name}: {self._lost(exc)}") from None
            log.debug("%s: probe of %s failed: %s", self.name, spec.health.url, exc)
            return False
        return status == 200 and spec.health.expect in body

    def http_get(self, health: HealthCheck) -> tuple[int, str]:
        """(status, body) of one GET of `health.url`, from the node's point of view."""
        url = urllib.parse.urlsplit(health.url)
        https = url.scheme == "https"
        host = url.hostname or "127.0.0.1"
        port = url.port or (443 if https else 80)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        request = (f"GET {path} HTTP/1.1\r\nHost: {url.netloc}\r\nUser-Agent: rkel\r\n"
                   "Accept: */*\r\nConnection: close\r\n\r\n").encode()
        context = self._tls_context(health) if https else None
        channel = self.transport.open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0),
                                              timeout=PROBE_TIMEOUT)
        try:
            channel.settimeout(PROBE_TIMEOUT)
            if context is not None:
                raw = _tls_exchange(channel, context, host, request)
            else:
                channel.sendall(request)
                raw = _read_all(channel)
        finally:
            channel.close()
        return _parse_response(raw)

    def _tls_context(self, health: HealthCheck) -> ssl.SSLContext:
        if not health.client_cert:
            # kube-controller-manager and kube-scheduler serve self-signed certificates; RKE
            # probes them without verification, and so does rkel.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        material = self.tls(health.client_cert) if self.tls else None
        if material is None:
            raise HostError(self.name, f"no certificate {health.client_cert} for {health.url}")
        context = ssl.create_default_context(cadata=material.ca_pem.decode())
        _load_cert_chain(context, material.cert_pem, material.key_pem)
        return context


# ---------------------------------------------------------------------------- helpers
def registry_auth(registries: Sequence[PrivateRegistry], image: str) -> dict[str, str] | None:
    """Docker auth_config for the registry `image` comes from, when cluster.yml has one."""
    host = image.partition("/")[0] if has_registry_host(image) else "docker.io"
    for reg in registries:
        reg_host = registry_host(reg.url)
        same = reg_host == host or (reg_host in _DOCKER_HUB and host in _DOCKER_HUB)
        if same and reg.user:
            return {"username": reg.user, "password": reg.password, "serveraddress": reg_host}
    return None


def _absolute(node: str, path: str) -> str:
    clean = posixpath.normpath(path)
    if not path.startswith("/") or clean in ("/", "//") or ".." in path.split("/"):
        raise HostError(node, f"refusing path {path!r}: an absolute path below / is required")
    return clean


def _tar(entries: list[tuple[str, bytes]]) -> bytes:
    """A tar of regular files owned by root, mode 0600."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(content), 0o600, 0, 0
            info.uname = info.gname = "root"
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


class _IterReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks (what `get_archive` streams)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(target), len(self._buf))
        target[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _tar_stream(name: str, src: BinaryIO, size: int) -> Iterator[bytes]:
    """A tar of one root-owned 0600 file read from `src`, produced chunk by chunk."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid = size, 0o600, 0, 0
    info.uname = info.gname = "root"
    info.mtime = int(time.time())
    yield info.tobuf(format=tarfile.PAX_FORMAT)
    left = size
    while left > 0:
        chunk = src.read(min(CHUNK, left))
        if not chunk:
            raise OSError(f"{name}: the file ended {left} bytes early")
        left -= len(chunk)
        yield chunk
    pad = (-size) % tarfile.BLOCKSIZE
    yield b"\0" * pad + b"\0" * (2 * tarfile.BLOCKSIZE)


def _load_cert_chain(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """load_cert_chain from memory: memfd files, never a private key on disk."""
    fds = [os.memfd_create("rkel-cert", os.MFD_CLOEXEC), os.memfd_create("rkel-key", os.MFD_CLOEXEC)]
    try:
        for fd, data in zip(fds, (cert_pem, key_pem), strict=True):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)


def _read_all(channel: paramiko.Channel) -> bytes:
    chunks, size = [], 0
    while size < _MAX_RESPONSE:
        data = channel.recv(65536)
        if not data:
            break
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


def _tls_exchange(channel: paramiko.Channel, context: ssl.SSLContext, host: str,
                  request: bytes) -> bytes:
    """Send `request` over TLS on the channel and read the reply (ssl.MemoryBIO, no socket)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=host)

    def flush() -> None:
        data = outgoing.read()
        if data:
            channel.sendall(data)

    def fill() -> bool:
        data = channel.recv(65536)
        if data:
            incoming.write(data)
        else:
            incoming.write_eof()
        return bool(data)

    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            flush()
            if not fill():
                raise ConnectionError("the server closed the connection during the TLS handshake")
    tls.write(request)
    flush()
    chunks, size = [], 0
    while size < _MAX_RESPONSE:
        try:
            data = tls.read(65536)
        except ssl.SSLWantReadError:
            flush()
            fill()
            continue
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            break
        if not data:
            break
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


class _Canned:
    """Just enough of a socket for http.client to parse a response already read."""

    def __init__(self, raw: bytes) -> None:
        self._file = io.BytesIO(raw)

    def makefile(self, *_args: Any, **_kwargs: Any) -> io.BytesIO:
        return self._file


def _parse_response(raw: bytes) -> tuple[int, str]:
    response = http.client.HTTPResponse(_Canned(raw))  # type: ignore[arg-type]
    response.begin()
    try:
        body = response.read()
    except http.client.IncompleteRead as exc:
        body = exc.partial
    return response.status, body.decode(errors="replace")
