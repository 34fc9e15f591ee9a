"""nginx-proxy stand-in: the TCP balancer rke-tools runs on nodes without a controlplane.

The real one renders CP_HOSTS into an nginx `stream` config (`listen 6443`, `server <host>:6443`
per entry, `proxy_connect_timeout 2s`, `proxy_timeout 30`) and runs nginx. This one does the job
in Python 3.11, standard library only: raw TCP both ways, so TLS passes untouched. Run it as a
script (`python3 nginx_proxy.py`); its modules sit beside it. See README.md.
"""

from __future__ import annotations

import ipaddress
import os
import re
import selectors
import signal
import socket
import sys
import threading
import time

from component_common import StartupError, env_port, env_seconds, setup_logging

NAME = "nginx-proxy"
CONNECT_TIMEOUT = 2.0  # proxy_connect_timeout 2s
BACKLOG = 511  # nginx's default listen backlog on Linux
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")
USAGE = """\
usage: nginx-proxy   (stand-in for rancher/rke-tools nginx-proxy; takes no arguments)

Environment:
  CP_HOSTS  comma-separated controlplane hosts; each is proxied to on port 6443.
            Stand-in extension: host:port or [ipv6]:port entries (for tests).
  STANDIN_NGINX_PROXY_PORT           listen port (default 6443), tests only
  STANDIN_NGINX_PROXY_UPSTREAM_PORT  upstream port (default 6443), tests only
  STANDIN_NGINX_PROXY_TIMEOUT        idle timeout, proxy_timeout (default 30s)
  STANDIN_NGINX_PROXY_FAIL_TIMEOUT   fail_timeout of a failed upstream (default 10s)
"""
LOG = setup_logging(NAME)


def parse_hosts(raw: str | None, default_port: int) -> list[tuple[str, int]]:
    """CP_HOSTS entries as (host, port); empty or invalid entries fail, as nginx's config would."""
    if raw is None or not raw.strip():
        raise StartupError("CP_HOSTS is not set or empty: no controlplane host to proxy to")
    out: list[tuple[str, int]] = []
    for entry in raw.split(","):
        item, host, port = entry.strip(), entry.strip(), str(default_port)
        bracketed = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", item)
        if bracketed:
            host, port = bracketed.group(1), bracketed.group(2) or port
        elif item.count(":") == 1:
            host, port = item.split(":")
        if not host:
            raise StartupError(f'CP_HOSTS={raw!r}: no host in upstream "{item or ":" + port}"')
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if (bracketed or ":" in host) and (ip is None or ip.version != 6):
            raise StartupError(f'CP_HOSTS={raw!r}: invalid IPv6 address in upstream "{item}"')
        if ip is None and not _HOSTNAME.match(host):
            raise StartupError(f'CP_HOSTS={raw!r}: invalid host in upstream "{item}"')
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise StartupError(f'CP_HOSTS={raw!r}: invalid port in upstream "{item}"')
        out.append((host, int(port)))
    return out


class Upstream:
    def __init__(self, family: int, ip: str, port: int) -> None:
        self.family, self.address = family, (ip, port)
        self.name = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        self.down_until = 0.0


def resolve(entries: list[tuple[str, int]]) -> list[Upstream]:
    """Every address of every entry, as nginx resolves `server` names once at start."""
    out: dict[tuple[str, int], Upstream] = {}
    for host, port in entries:
        try:
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise StartupError(f'host not found in upstream "{host}:{port}"') from None
        for family, _, _, _, sockaddr in infos:
            ip = str(sockaddr[0])
            out.setdefault((ip, port), Upstream(family, ip, port))
    return list(out.values())


class Balancer:
    """Round-robin over the upstreams; a failed one is skipped for fail_timeout (max_fails=1).

    With a single upstream nothing is ever marked down (as in nginx). When every upstream is
    down, the connection is closed ("no live upstreams").
    """

    def __init__(self, upstreams: list[Upstream], fail_timeout: float) -> None:
        self.upstreams, self.fail_timeout = upstreams, fail_timeout
        self._next, self._lock = 0, threading.Lock()

    def candidates(self) -> list[Upstream]:
        with self._lock:
            count, start = len(self.upstreams), self._next
            self._next = (start + 1) % count
            order = [self.upstreams[(start + i) % count] for i in range(count)]
            now = time.monotonic()
            return order if count == 1 else [u for u in order if u.down_until <= now]

    def failed(self, upstream: Upstream, context: str) -> None:
        if len(self.upstreams) > 1 and self.fail_timeout > 0:
            with self._lock:
                upstream.down_until = time.monotonic() + self.fail_timeout
            LOG.warning(f"upstream server temporarily disabled while connecting to upstream, "
                        f"{context}")

    def succeeded(self, upstream: Upstream) -> None:
        upstream.down_until = 0.0


def connect(balancer: Balancer, context: str, tried: list[str]) -> socket.socket | None:
    """The first upstream that accepts, in round-robin order (proxy_next_upstream on error)."""
    candidates = balancer.candidates()
    if not candidates:
        LOG.error(f"no live upstreams while connecting to upstream, {context}")
    for upstream in candidates:
        tried.append(upstream.name)
        where = f'{context}, upstream: "{upstream.name}"'
        sock = socket.socket(upstream.family, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(upstream.address)
        except OSError as exc:
            sock.close()
            reason = ("upstream timed out (110: Connection timed out)"
                      if isinstance(exc, TimeoutError) else
                      f"connect() failed ({exc.errno}: {exc.strerror})")
            LOG.error(f"{reason} while connecting to upstream, {where}")
            balancer.failed(upstream, where)
            continue
        balancer.succeeded(upstream)
        return sock
    return None


def pump(client: socket.socket, upstream: socket.socket, idle: float) -> tuple[int, int, str]:
    """Copy bytes both ways until both sides are done (half-closes passed on), an error, or
    `idle` s with no data; (bytes to the client, bytes from the client, how it ended)."""
    counts = {client: 0, upstream: 0}  # bytes read from each side
    ended = "closed"
    with selectors.DefaultSelector() as sel:
        sel.register(client, selectors.EVENT_READ, upstream)
        sel.register(upstream, selectors.EVENT_READ, client)
        while sel.get_map():
            events = sel.select(idle if idle > 0 else None)
            if not events:
                ended = "idle timeout"
                break
            try:
                for key, _ in events:
                    src, dst = key.fileobj, key.data
                    assert isinstance(src, socket.socket)
                    data = src.recv(65536)
                    if data:
                        dst.sendall(data)
                        counts[src] += len(data)
                        continue
                    sel.unregister(src)
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
            except OSError as exc:
                ended = f"{type(exc).__name__}: {exc}"
                break
    return counts[upstream], counts[client], ended


def handle(client: socket.socket, peer: str, listen: str, balancer: Balancer,
           idle: float) -> None:
    start, tried = time.monotonic(), list[str]()
    context = f"client: {peer}, server: {listen}"
    sent = received = 0
    status, ended = 502, "no upstream"
    try:
        upstream = connect(balancer, context, tried)
        if upstream is not None:
            with upstream:
                for sock in (client, upstream):
                    sock.settimeout(idle if idle > 0 else None)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                status = 200
                sent, received, ended = pump(client, upstream, idle)
    except Exception:  # one connection's bug must not end the proxy
        LOG.exception(f"connection failed, {context}")
        status, ended = 500, "internal error"
    finally:
        client.close()
        LOG.info(f'"connection" client="{peer}" upstream="{", ".join(tried)}" status={status} '
                 f"bytes_sent={sent} bytes_received={received} "
                 f'session_time="{time.monotonic() - start:.3f}s" end="{ended}"')


def version(environ: dict[str, str]) -> str:
    image = environ.get("RKEL_IMAGE", "")
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    return environ.get("STANDIN_VERSION") or tag or "unknown"


def main(argv: list[str], environ: dict[str, str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE, end="")
        return 0
    if any(a in ("-v", "--version") for a in argv):
        print(f"{NAME} stand-in (rke-tools {version(environ)})")
        return 0
    if argv:  # the real script ignores its arguments
        LOG.warning(f"ignoring arguments {argv} (nginx-proxy takes none)")
    try:
        port = env_port(environ, "STANDIN_NGINX_PROXY_PORT", None, 6443)
        upstream_port = env_port(environ, "STANDIN_NGINX_PROXY_UPSTREAM_PORT", None, 6443)
        idle = env_seconds(environ, "STANDIN_NGINX_PROXY_TIMEOUT", 30.0)
        fail_timeout = env_seconds(environ, "STANDIN_NGINX_PROXY_FAIL_TIMEOUT", 10.0)
        upstreams = resolve(parse_hosts(environ.get("CP_HOSTS"), upstream_port))
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("0.0.0.0", port))
            listener.listen(BACKLOG)
        except OSError as exc:
            raise StartupError(f"bind() to 0.0.0.0:{port} failed ({exc.errno}: "
                               f"{exc.strerror})") from None
    except StartupError as exc:
        LOG.error(f"[emerg] {exc}")
        return 1
    listen = f"0.0.0.0:{port}"
    balancer = Balancer(upstreams, fail_timeout)
    LOG.info(f"listening on {listen}, upstream kube_apiserver: "
             f"{', '.join(u.name for u in upstreams)} (proxy_connect_timeout "
             f"{CONNECT_TIMEOUT:g}s, proxy_timeout {idle:g}s, max_fails=1 "
             f"fail_timeout={fail_timeout:g}s, version {version(environ)})")
    stop: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda got, _frame: stop.append(got))
    listener.settimeout(0.2)
    with listener:
        while not stop:
            try:
                client, address = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:  # EMFILE and the like: keep serving
                LOG.error(f"accept() failed ({exc.errno}: {exc.strerror})")
                time.sleep(0.1)
                continue
            client.settimeout(None)
            threading.Thread(target=handle, daemon=True,
                             args=(client, f"{address[0]}:{address[1]}", listen, balancer,
                                   idle)).start()
    LOG.info(f"signal {stop[0]} ({signal.Signals(stop[0]).name}) received, exiting")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], dict(os.environ)))
