#!/usr/bin/env python3
"""kube-apiserver STAND-IN for rkel's end-to-end tests; not Kubernetes, never a default.

Real Kubernetes server binaries cannot be had on the test machines, so this program stands in
for kube-apiserver and honours its contract with the inputs rkel gives it: it takes the real
flags (and refuses unknown ones, as the real binary does), reaches the real etcd over mutual
TLS with `--etcd-certfile/--etcd-keyfile/--etcd-cafile` and stores objects as JSON under
`--etcd-prefix`, serves HTTPS on `--bind-address:--secure-port` with `--tls-cert-file`, and
accepts only clients whose certificate is signed by `--client-ca-file` (CN -> user, O ->
groups). /healthz, /livez and /readyz fail with `[-]etcd failed` while etcd does not answer.
/version reports the version of its image tag: $STANDIN_VERSION, else the tag of $RKEL_IMAGE
(rancher/hyperkube:v1.30.5-rancher1 -> v1.30.5). See README.md for what it serves.

Standard library only (Python 3.11): it runs in an image that has nothing else. Run it as a
script, `python3 kube_apiserver.py --etcd-servers=... ...`; its modules sit beside it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import platform
import re
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

from apiserver_flags import (
    CIPHERS,
    FlagError,
    Options,
    duration_seconds,
    parse_args,
    usage,
    validate,
)
from apiserver_encryption import EncryptionError, load_encryption_config
from apiserver_kinds import RESOURCES, User
from apiserver_objects import ApiError, now, status_failure
from apiserver_rest import Api, Reply, Request, ServerInfo
from apiserver_store import Storage
from etcd3 import Etcd3, EtcdError
from kubeconfig_client import KlogFormatter

NAME = "kube-apiserver-standin"
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 90.0
MAX_BODY = 16 * 1024 * 1024


class StartupError(Exception):
    """An input is missing or unusable: the stand-in exits non-zero, as the real one does."""


LOG = logging.getLogger(NAME)


def setup_logging() -> None:
    """Every stand-in module logs through `logging`, to stderr, in klog's format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KlogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


# --- version -----------------------------------------------------------------------------------


def git_version(environ: dict[str, str]) -> str:
    """$STANDIN_VERSION, else vX.Y.Z from the tag of $RKEL_IMAGE, else "" (unknown)."""
    if environ.get("STANDIN_VERSION"):
        return environ["STANDIN_VERSION"]
    image = environ.get("RKEL_IMAGE", "")
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    match = re.match(r"v?(\d+)\.(\d+)\.(\d+)", tag)
    return f"v{match.group(1)}.{match.group(2)}.{match.group(3)}" if match else ""


def version_info(git: str) -> dict[str, str]:
    """The /version document, shaped like the real one."""
    match = re.match(r"v(\d+)\.(\d+)", git)
    major, minor = match.groups() if match else ("0", "0")
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return {"major": major, "minor": minor, "gitVersion": git,
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z",
            "goVersion": f"python{platform.python_version()} (kube-apiserver stand-in)",
            "compiler": "gc", "platform": f"linux/{arch}"}


# --- inputs --------------------------------------------------------------------------------------


def _readable(path: str, what: str, marker: bytes) -> None:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise StartupError(f"{what}: open {path}: {(exc.strerror or str(exc)).lower()}") from None
    if marker not in data:
        raise StartupError(f"{what}: {path}: data does not contain any valid PEM "
                           f"{marker.decode().strip('- ')} block")


def check_files(options: Options) -> None:
    """Every key and certificate file the real server loads at start must be usable."""
    pem = b"-----BEGIN "
    for flag, what, marker in (
        ("service-account-signing-key-file", "failed to parse service-account-issuer-key-file",
         b"PRIVATE KEY-----"),
        ("requestheader-client-ca-file", "unable to load request-header client CA provider",
         b"CERTIFICATE-----"),
        ("kubelet-client-certificate", "unable to load kubelet client certificate",
         b"CERTIFICATE-----"),
        ("kubelet-client-key", "unable to load kubelet client key", b"PRIVATE KEY-----"),
        ("proxy-client-cert-file", "failed to load proxy client certificate",
         b"CERTIFICATE-----"),
        ("proxy-client-key-file", "failed to load proxy client key", b"PRIVATE KEY-----"),
    ):
        if options.has(flag):
            _readable(options.get(flag), what, marker)
    for path in options.strings("service-account-key-file"):
        _readable(path, "failed to parse service-account-key-file", pem)


def serving_context(options: Options) -> ssl.SSLContext:
    """The HTTPS server's TLS: our certificate, client certificates checked against the CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    versions = {"VersionTLS10": ssl.TLSVersion.TLSv1, "VersionTLS11": ssl.TLSVersion.TLSv1_1,
                "VersionTLS12": ssl.TLSVersion.TLSv1_2, "VersionTLS13": ssl.TLSVersion.TLSv1_3}
    ctx.minimum_version = versions[options.get("tls-min-version")]
    cert, key = options.get("tls-cert-file"), options.get("tls-private-key-file")
    for path in (cert, key):
        _readable(path, "unable to load server certificate", b"-----BEGIN ")
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f"unable to load server certificate: {cert}, {key}: {exc}") from None
    ca = options.get("client-ca-file")
    _readable(ca, "unable to load client CA provider", b"CERTIFICATE-----")
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f'unable to load client CA file "{ca}": {exc}') from None
    ctx.verify_mode = ssl.CERT_OPTIONAL if options.flag("anonymous-auth") else ssl.CERT_REQUIRED
    suites = [CIPHERS[s] for s in options.strings("tls-cipher-suites") if CIPHERS[s]]
    if suites:
        ctx.set_ciphers(":".join(suites))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def etcd_context(options: Options) -> ssl.SSLContext:
    """The etcd client's TLS: --etcd-certfile/--etcd-keyfile, servers checked by --etcd-cafile."""
    ca = options.get("etcd-cafile")
    if ca:
        _readable(ca, "failed to load etcd CA file", b"CERTIFICATE-----")
    ctx = ssl.create_default_context(cafile=ca or None)
    cert, key = options.get("etcd-certfile"), options.get("etcd-keyfile")
    if cert or key:
        _readable(cert, "failed to load etcd client certificate", b"CERTIFICATE-----")
        _readable(key, "failed to load etcd client key", b"PRIVATE KEY-----")
        try:
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise StartupError(f"failed to load etcd client key pair: {exc}") from None
    return ctx


# --- health ----------------------------------------------------------------------------------


class Health:
    """/healthz, /livez, /readyz: etcd answers (checked at most once a second) + bootstrap."""

    CHECKS: ClassVar[dict[str, tuple[str, ...]]] = {
        "healthz": ("ping", "log", "etcd", "poststarthook/bootstrap-controller"),
        "livez": ("ping", "log", "etcd", "poststarthook/bootstrap-controller"),
        "readyz": ("ping", "log", "etcd", "etcd-readiness", "informer-sync",
                   "poststarthook/bootstrap-controller", "shutdown"),
    }

    def __init__(self, etcd: Etcd3) -> None:
        self.etcd = etcd
        self.bootstrapped = threading.Event()
        self.shutting_down = threading.Event()
        self._lock = threading.Lock()
        self._checked = (0.0, False, "")

    def etcd_ok(self) -> tuple[bool, str]:
        with self._lock:
            stamp, ok, err = self._checked
            if time.monotonic() - stamp < 1.0:
                return ok, err
            try:
                self.etcd.revision()
                ok, err = True, ""
            except EtcdError as exc:
                ok, err = False, str(exc)
            self._checked = (time.monotonic(), ok, err)
            return ok, err

    def _passes(self, check: str) -> bool:
        if check in ("etcd", "etcd-readiness"):
            return self.etcd_ok()[0]
        if check == "poststarthook/bootstrap-controller":
            return self.bootstrapped.is_set()
        if check == "shutdown":
            return not self.shutting_down.is_set()
        return True

    def __call__(self, path: str, verbose: bool) -> tuple[int, str]:
        """(HTTP code, text) for a health path such as /readyz or /healthz/etcd."""
        kind, _, only = path.strip("/").partition("/")
        checks = self.CHECKS.get(kind, ())
        if only:
            if only not in checks:
                return 404, "404 page not found\n"
            if self._passes(only):
                return 200, "ok"
            return 500, f"internal server error: {only} check failed\n"
        results = [(check, self._passes(check)) for check in checks]
        failed = any(not ok for _, ok in results)
        if not failed and not verbose:
            return 200, "ok"
        lines = [f"[+]{c} ok" if ok else f"[-]{c} failed: reason withheld" for c, ok in results]
        lines.append(f"{kind} check {'failed' if failed else 'passed'}")
        return (500 if failed else 200), "\n".join(lines) + "\n"


def bootstrap(storage: Storage, info: ServerInfo, health: Health) -> None:
    """The bootstrap controller: system namespaces and the `kubernetes` Service, retried until
    etcd answers (the real server's poststarthook/bootstrap-controller)."""
    namespaces = next(r for r in RESOURCES if r.name == "namespaces")
    services = next(r for r in RESOURCES if r.name == "services")
    last_error = ""
    while not health.shutting_down.is_set():
        try:
            for name in ("default", "kube-system", "kube-public", "kube-node-lease"):
                if storage.get(namespaces, "", name) is None:
                    _create_quietly(storage, namespaces, {
                        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
                        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
            if storage.get(services, "default", "kubernetes") is None:
                _create_quietly(storage, services, kubernetes_service(info))
            health.bootstrapped.set()
            LOG.info("bootstrap-controller: system namespaces and the kubernetes service exist")
            return
        except ApiError as exc:
            if str(exc) != last_error:
                LOG.error(f"bootstrap-controller: {exc}; retrying every second")
                last_error = str(exc)
        health.shutting_down.wait(1.0)


def _create_quietly(storage: Storage, res: Any, obj: dict[str, Any]) -> None:
    obj["metadata"].update({"uid": str(uuid.uuid4()), "creationTimestamp": now()})
    try:
        storage.create(res, obj)
    except ApiError as exc:
        if exc.reason != "AlreadyExists":
            raise


def kubernetes_service(info: ServerInfo) -> dict[str, Any]:
    """default/kubernetes on the first IP of --service-cluster-ip-range."""
    network = ipaddress.ip_network(info.service_cidrs[0], strict=False)
    ip = str(network.network_address + 1)
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"name": "https", "port": 443, "protocol": "TCP",
                                "targetPort": info.port}],
                     "sessionAffinity": "None"}}


# --- HTTPS -------------------------------------------------------------------------------------


def identity(cert: dict[str, Any] | None) -> User:
    """CN -> user name, every O -> a group (plus system:authenticated); no cert: anonymous."""
    if not cert:
        return User("system:anonymous", ("system:unauthenticated",))
    fields = [(k, v) for rdn in cert.get("subject", ()) for k, v in rdn]
    name = next((v for k, v in fields if k == "commonName"), "")
    groups = tuple(v for k, v in fields if k == "organizationName")
    return User(name, (*groups, "system:authenticated"))


class TLSServer(ThreadingHTTPServer):
    """A threaded HTTPS server; the TLS handshake runs in the request's own thread."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], api: Api, tls: ssl.SSLContext) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)
        self.api = api
        self.tls = tls

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the address (slow without DNS)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            LOG.info(f"http: TLS handshake error from {client_address[0]}:{client_address[1]}: "
                     f"{exc}")
            return
        conn.settimeout(IDLE_TIMEOUT)
        try:
            Handler(conn, client_address, self)
        except (ssl.SSLError, OSError) as exc:
            LOG.info(f"http: connection from {client_address[0]} ended: {exc}")
        finally:
            conn.close()


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; every request goes to `Api.handle`."""

    protocol_version = "HTTP/1.1"
    server_version = "kube-apiserver-standin"
    server: TLSServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request is written by _serve

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
                if len(data) > MAX_BODY:
                    raise ApiError(413, "request entity too large", "RequestEntityTooLarge")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ApiError(413, "request entity too large", "RequestEntityTooLarge")
        return self.rfile.read(length) if length else b""

    def _reply(self, user: User) -> Reply:
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        try:
            body = self._body()
        except (ApiError, ValueError) as exc:
            self.close_connection = True
            code, reason = (exc.code, exc.reason) if isinstance(exc, ApiError) else (
                400, "BadRequest")
            return Reply(code, json.dumps(status_failure(code, reason, str(exc))).encode())
        req = Request(self.command, url.path, query, user, self.headers.get("Accept", ""),
                      self.headers.get("Content-Type", ""), body)
        try:
            return self.server.api.handle(req)
        except Exception as exc:  # a stand-in bug must not drop the connection silently
            LOG.exception(f"{self.command} {self.path}: internal error")
            return Reply(500, json.dumps(status_failure(
                500, "InternalError", f"Internal error occurred: {exc!r}")).encode())

    def _serve(self) -> None:
        started = time.monotonic()
        user = identity(self.connection.getpeercert())
        reply = self._reply(user)
        self.send_response(reply.code)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)
        took = (time.monotonic() - started) * 1000
        LOG.info(f"{self.command} {self.path} {reply.code} user={user.name} "
                 f"{took:.1f}ms")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve


# --- main --------------------------------------------------------------------------------------


def build(options: Options, environ: dict[str, str]) -> tuple[TLSServer, Health, Storage,
                                                                 ServerInfo]:
    """Load every input and bind the port; raises StartupError for an unusable input."""
    check_files(options)
    tls = serving_context(options)
    etcd_tls = etcd_context(options)
    etcd = Etcd3(options.strings("etcd-servers"), etcd_tls)
    encryption = None
    if options.has("encryption-provider-config") and options.get("encryption-provider-config"):
        path = options.get("encryption-provider-config")
        try:
            encryption = load_encryption_config(path)
        except EncryptionError as exc:
            raise StartupError(str(exc)) from None
        LOG.info("encryption at rest from %s: %s (keys %s)", path,
                 ", ".join(sorted(encryption.resources)), ", ".join(encryption.key_names()))
    storage = Storage(etcd, options.get("etcd-prefix"), encryption)
    git = git_version(environ)
    if not git:
        LOG.warning("neither STANDIN_VERSION nor an RKEL_IMAGE tag names a version: "
                 "reporting v0.0.0")
        git = "v0.0.0"
    ports = options.get("service-node-port-range")  # N1-N2, or N+size
    first, last = (int(x) for x in re.split(r"[-+]", ports))
    if "+" in ports:
        last = first + last - 1
    bind = options.get("bind-address")
    port = int(options.get("secure-port"))
    advertise = options.get("advertise-address") or (bind if bind not in ("0.0.0.0", "::")
                                                     else "127.0.0.1")
    info = ServerInfo(version_info(git), tuple(options.strings("authorization-mode")),
                      tuple(options.strings("service-cluster-ip-range")), (first, last),
                      advertise, port)
    timeout = duration_seconds(options.get("etcd-healthcheck-timeout")) or 2.0
    health = Health(Etcd3(options.strings("etcd-servers"), etcd_tls, timeout=timeout))
    try:
        server = TLSServer((bind, port), Api(storage, info, health), tls)
    except OSError as exc:
        raise StartupError(f"failed to create listener: failed to listen on {bind}:{port}: "
                           f"listen tcp {bind}:{port}: bind: {(exc.strerror or str(exc)).lower()}") from None
    return server, health, storage, info


def main(argv: list[str], environ: dict[str, str]) -> int:
    """Run the stand-in until SIGTERM/SIGINT; the exit code, like the real binary's."""
    setup_logging()
    try:
        options = parse_args(argv)
    except FlagError as exc:
        print(f"Error: {exc}\n{usage()}\n\nError: {exc}", file=sys.stderr)
        return 1
    if options.flag("help"):
        print(usage())
        return 0
    if options.has("version") and options.get("version") != "false":
        git = git_version(environ) or "v0.0.0"
        if options.get("version") == "raw":
            print(json.dumps(version_info(git), indent=2))
        else:
            print(f"Kubernetes {git} (kube-apiserver stand-in)")
        return 0
    errors = validate(options)
    if errors:
        LOG.error(f'"command failed" err="[{", ".join(errors)}]"')
        return 1
    try:
        server, health, storage, info = build(options, environ)
    except StartupError as exc:
        LOG.error(f'"command failed" err="{exc}"')
        return 1
    if options.ignored():
        LOG.info(f"accepted and not used by the stand-in: --{', --'.join(options.ignored())}")
    return serve(server, health, storage, info, options)


def serve(server: TLSServer, health: Health, storage: Storage, info: ServerInfo,
          options: Options) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=bootstrap, args=(storage, info, health), daemon=True).start()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                     daemon=True).start()
    ok, err = health.etcd_ok()
    if not ok:
        LOG.warning(f"etcd is not reachable yet ({err}); serving, /readyz fails until it answers")
    LOG.info(f"Serving securely on {options.get('bind-address')}:{info.port} "
             f"(kube-apiserver stand-in {info.version['gitVersion']}, etcd "
             f"{','.join(options.strings('etcd-servers'))} prefix {options.get('etcd-prefix')})")
    while not stop.wait(0.5):
        pass
    LOG.info("[graceful-termination] received SIGTERM, shutting down")
    health.shutting_down.set()
    server.shutdown()
    server.server_close()
    LOG.info("[graceful-termination] apiserver is exiting")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], dict(os.environ)))
