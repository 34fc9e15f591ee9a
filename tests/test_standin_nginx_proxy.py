"""The nginx-proxy and rke-tools entrypoint stand-ins (scenarios/standins/).

Real processes on 127.0.0.1 only: small echo servers (plain TCP, or TLS demanding a client
certificate from a throwaway CA made with lifecycle.pki_x509) as controlplanes, and the proxy
stand-in as a subprocess. CP_HOSTS entries are host:port (a stand-in extension: the real
nginx-proxy takes hosts and always uses port 6443); the listen port comes from
STANDIN_NGINX_PROXY_PORT.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lifecycle.config.model import ClusterConfig, Node
from lifecycle.desired import compile_desired
from lifecycle.pki_x509 import issue_ca, issue_leaf, load_cert, load_key
from lifecycle.spec import CertRequest
from tests.test_standin_apiserver import PYTHON, STANDINS, free_port, tail

PROXY = STANDINS / "nginx_proxy.py"
ENTRYPOINT = STANDINS / "rke_tools_entrypoint.sh"


def common_name(tls: ssl.SSLSocket) -> str:
    """The CN of the peer's certificate."""
    subject: Any = (tls.getpeercert() or {}).get("subject", ())
    return next(str(value) for rdn in subject for key, value in rdn if key == "commonName")


class EchoServer:
    """Answers `<name>\\n` (TLS: `<name> <client CN>\\n`), then echoes until EOF."""

    def __init__(self, name: str, tls: ssl.SSLContext | None = None, port: int = 0) -> None:
        self.name, self.tls = name, tls
        self.sock = socket.create_server(("127.0.0.1", port))
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            greeting = self.name
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
                greeting += f" {common_name(conn)}"
            conn.sendall(greeting.encode() + b"\n")
            while data := conn.recv(65536):
                conn.sendall(data)
            if self.tls is None:
                conn.shutdown(socket.SHUT_WR)
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        """Stop listening now (shutdown wakes the blocked accept(); close alone would not)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class Proxy:
    """The stand-in as a subprocess, stopped by its Popen handle."""

    def __init__(self, workdir: Path, cp_hosts: str | None, **env: str) -> None:
        self.port = free_port()
        self.log = workdir / f"nginx-proxy-{self.port}.log"
        environ = {"PATH": "/usr/bin:/bin", "STANDIN_NGINX_PROXY_PORT": str(self.port), **env}
        if cp_hosts is not None:
            environ["CP_HOSTS"] = cp_hosts
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([PYTHON, "-E", "-s", str(PROXY)], env=environ,
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while "listening on" not in tail(self.log):
            assert self.proc.poll() is None, f"nginx-proxy exited:\n{tail(self.log)}"
            assert time.monotonic() < deadline, tail(self.log)
            time.sleep(0.05)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def log_lines(self, needle: str, count: int) -> list[str]:
        """The log lines with `needle`, once there are `count` of them (logged at close)."""
        deadline = time.monotonic() + 5
        while True:
            lines = [line for line in tail(self.log, 100_000).splitlines() if needle in line]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture()
def start(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    started: list[Proxy] = []

    def run(cp_hosts: str | None, **env: str) -> Proxy:
        started.append(Proxy(tmp_path, cp_hosts, **env))
        return started[-1]

    yield run
    for proxy in started:
        proxy.stop()


@pytest.fixture()
def upstreams() -> Iterator[list[EchoServer]]:
    servers = [EchoServer("cp-a"), EchoServer("cp-b")]
    yield servers
    for server in servers:
        server.close()


def hosts(servers: list[EchoServer]) -> str:
    return ",".join(f"127.0.0.1:{s.port}" for s in servers)


def exchange(sock: socket.socket, payload: bytes) -> tuple[str, bytes]:
    """Send `payload` (from a thread, so big payloads cannot deadlock), half-close, read all:
    (the server's greeting, what came back after it)."""
    def send() -> None:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sender.join()
    greeting, _, rest = data.partition(b"\n")
    return greeting.decode(), rest


def test_bytes_round_trip_round_robin(start: Callable[..., Proxy],
                                      upstreams: list[EchoServer]) -> None:
    proxy = start(hosts(upstreams))
    payload = os.urandom(1 << 20)
    names = []
    for _ in range(4):
        with proxy.connect() as sock:
            name, echoed = exchange(sock, payload)
        assert echoed == payload
        names.append(name)
    assert names[0] != names[1] and names[0::2] == [names[0]] * 2 and names[1::2] == [names[1]] * 2
    lines = proxy.log_lines('"connection"', 4)
    assert len(lines) == 4, tail(proxy.log)
    assert all("status=200" in line and f"bytes_received={len(payload)}" in line and
               f"bytes_sent={len(payload) + 5}" in line for line in lines), lines
    ports = {line.split('upstream="127.0.0.1:')[1].split('"')[0] for line in lines}
    assert ports == {str(s.port) for s in upstreams}


def test_many_concurrent_connections(start: Callable[..., Proxy],
                                     upstreams: list[EchoServer]) -> None:
    proxy = start(hosts(upstreams))
    socks = [proxy.connect() for _ in range(50)]  # all open at once
    try:
        got = [exchange(sock, f"hello {i}".encode()) for i, sock in enumerate(socks)]
    finally:
        for sock in socks:
            sock.close()
    assert [rest for _, rest in got] == [f"hello {i}".encode() for i in range(50)]
    assert sorted(s.accepted for s in upstreams) == [25, 25]


def test_a_closed_upstream_is_skipped_then_retried_after_fail_timeout(
        start: Callable[..., Proxy], upstreams: list[EchoServer]) -> None:
    proxy = start(hosts(upstreams), STANDIN_NGINX_PROXY_FAIL_TIMEOUT="1")
    down = upstreams[1]
    down.close()
    names = []
    for _ in range(4):
        with proxy.connect() as sock:
            names.append(exchange(sock, b"x")[0])
    assert names == ["cp-a"] * 4
    # Tried once, then marked down for fail_timeout (nginx max_fails=1): no second attempt.
    refused = proxy.log_lines("connect() failed (111: Connection refused)", 1)
    assert len(refused) == 1 and f'upstream: "127.0.0.1:{down.port}"' in refused[0]
    assert proxy.log_lines("upstream server temporarily disabled", 1)
    revived = EchoServer("cp-b", port=down.port)
    try:
        time.sleep(1.2)
        names = []
        for _ in range(2):
            with proxy.connect() as sock:
                names.append(exchange(sock, b"x")[0])
        assert sorted(names) == ["cp-a", "cp-b"]
    finally:
        revived.close()


def test_no_reachable_upstream_closes_the_connection(start: Callable[..., Proxy],
                                                     upstreams: list[EchoServer]) -> None:
    proxy = start(hosts(upstreams))
    for server in upstreams:
        server.close()
    for _ in range(2):
        with proxy.connect() as sock:
            assert sock.recv(100) == b""
    lines = proxy.log_lines('"connection"', 2)
    assert all("status=502" in line for line in lines), lines
    assert proxy.log_lines("no live upstreams while connecting to upstream", 1)


def test_idle_connections_end_after_proxy_timeout(start: Callable[..., Proxy],
                                                  upstreams: list[EchoServer]) -> None:
    proxy = start(hosts(upstreams), STANDIN_NGINX_PROXY_TIMEOUT="0.5")
    with proxy.connect() as sock:
        began = time.monotonic()
        assert sock.recv(100).endswith(b"\n")
        assert sock.recv(100) == b""
        assert 0.3 < time.monotonic() - began < 3
    assert 'end="idle timeout"' in proxy.log_lines('"connection"', 1)[0]


def test_tls_with_client_certificates_passes_through(start: Callable[..., Proxy],
                                                     tmp_path: Path) -> None:
    ca = issue_ca(CertRequest("kube-ca", "kube-ca"))
    ca_cert, ca_key = load_cert(ca.cert_pem), load_key(ca.key_pem)
    files = {"ca.pem": ca.cert_pem}
    for name, cn, sans in (("server", "kube-apiserver", ("127.0.0.1",)),
                           ("client", "system:node:n1", ())):
        leaf = issue_leaf(CertRequest(name, cn, ("system:nodes",), sans), ca_cert, ca_key)
        files |= {f"{name}.pem": leaf.cert_pem, f"{name}-key.pem": leaf.key_pem}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server-key.pem")
    server_ctx.load_verify_locations(tmp_path / "ca.pem")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    servers = [EchoServer("cp-a", server_ctx), EchoServer("cp-b", server_ctx)]
    try:
        proxy = start(hosts(servers))
        client_ctx = ssl.create_default_context(cafile=tmp_path / "ca.pem")
        client_ctx.load_cert_chain(tmp_path / "client.pem", tmp_path / "client-key.pem")
        seen = []
        for _ in range(2):
            with client_ctx.wrap_socket(proxy.connect(), server_hostname="127.0.0.1") as tls:
                assert common_name(tls) == "kube-apiserver"
                tls.sendall(b"GET /healthz\n")
                data = b""
                while data.count(b"\n") < 2:
                    data += tls.recv(1000)
                greeting, _, echoed = data.partition(b"\n")
                name, cn = greeting.decode().split(" ")
                assert cn == "system:node:n1" and echoed == b"GET /healthz\n"
                seen.append(name)
        assert sorted(seen) == ["cp-a", "cp-b"]
        # Without a client certificate the upstream itself refuses the handshake.
        bare = ssl.create_default_context(cafile=tmp_path / "ca.pem")
        with (pytest.raises((ssl.SSLError, OSError)),
              bare.wrap_socket(proxy.connect(), server_hostname="127.0.0.1") as tls):
            tls.sendall(b"x")
            tls.recv(100)
            tls.recv(100)
    finally:
        for server in servers:
            server.close()


@pytest.mark.parametrize(("cp_hosts", "message"), [
    (None, "CP_HOSTS is not set or empty"),
    (" ", "CP_HOSTS is not set or empty"),
    ("10.0.0.1,,10.0.0.2", "no host in upstream"),
    ("10.0.0.1,", "no host in upstream"),
    ("10.0.0.1:http", "invalid port"),
    ("bad_name!", "invalid host"),
    ("[10.0.0.1]", "invalid IPv6 address"),
])
def test_missing_or_invalid_cp_hosts_exit_1(cp_hosts: str | None, message: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "STANDIN_NGINX_PROXY_PORT": str(free_port())}
    if cp_hosts is not None:
        env["CP_HOSTS"] = cp_hosts
    done = subprocess.run([PYTHON, "-E", "-s", str(PROXY)], env=env, capture_output=True,
                          text=True, timeout=10, check=False)
    assert done.returncode == 1, done.stderr
    assert message in done.stderr and "[emerg]" in done.stderr


def test_rkel_cp_hosts_and_sigterm_exit_0(start: Callable[..., Proxy],
                                          upstreams: list[EchoServer]) -> None:
    config = ClusterConfig(nodes=(
        Node(address="10.77.0.11", user="u", role=("etcd", "controlplane")),
        Node(address="10.77.0.12", user="u", role=("controlplane",)),
        Node(address="10.77.0.13", user="u", role=("worker",))))
    worker = next(n for n in compile_desired(config).nodes if n.name == "10.77.0.13")
    spec = worker.service("nginx-proxy")
    assert spec is not None and spec.command == ("nginx-proxy",)
    cp_hosts = dict(e.split("=", 1) for e in spec.env)["CP_HOSTS"]
    # rkel's CP_HOSTS is parsed and nothing is dialled until a client connects.
    proxy = start(cp_hosts)
    assert "upstream kube_apiserver: 10.77.0.11:6443, 10.77.0.12:6443" in tail(proxy.log)
    # An open connection does not hold up the exit.
    other = start(hosts(upstreams))
    with other.connect() as sock:
        assert sock.recv(100) in (b"cp-a\n", b"cp-b\n")
        began = time.monotonic()
        other.proc.send_signal(signal.SIGTERM)
        assert other.proc.wait(timeout=5) == 0
    assert time.monotonic() - began < 5
    assert "signal 15 (SIGTERM) received, exiting" in tail(other.log)
    proxy.proc.send_signal(signal.SIGINT)
    assert proxy.proc.wait(timeout=5) == 0


def test_help_and_version() -> None:
    env = {"PATH": "/usr/bin:/bin", "RKEL_IMAGE": "rancher/rke-tools:v0.1.102"}
    for flag, text in (("--help", "CP_HOSTS"), ("--version", "rke-tools v0.1.102")):
        done = subprocess.run([PYTHON, "-E", "-s", str(PROXY), flag], env=env,
                              capture_output=True, text=True, timeout=10, check=False)
        assert done.returncode == 0 and text in done.stdout, done


SHELLS = [["/bin/sh"]] + ([["busybox", "sh"]] if shutil.which("busybox") else [])


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: " ".join(s))
def test_entrypoint(shell: list[str], tmp_path: Path) -> None:
    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*shell, str(ENTRYPOINT), *args], capture_output=True, text=True,
                              timeout=10, check=False,
                              env={"PATH": f"{tmp_path}:/usr/bin:/bin", **env})

    done = run()
    assert done.returncode == 2 and "usage:" in done.stderr
    done = run("echo", "hi")
    assert (done.returncode, done.stdout) == (0, "hi\n")
    assert "rke-tools entrypoint (stand-in): starting echo" in done.stderr
    kubelet = tmp_path / "kubelet"  # a component on PATH that prints its arguments
    kubelet.write_text('#!/bin/sh\nfor a in "$@"; do echo "[$a]"; done\nexit 3\n')
    kubelet.chmod(0o755)
    done = run("kubelet", "--node-labels=a=b c", "--v=2", RKE_KUBELET_CRIDOCKERD="true")
    assert (done.returncode, done.stdout) == (3, "[--node-labels=a=b c]\n[--v=2]\n")
    assert "cri-dockerd is not started by the stand-in" in done.stderr
    assert "cri-dockerd" not in run("kubelet").stderr
    assert run("no-such-component").returncode == 127
