"""Shared code of the kube-controller-manager, kube-scheduler and kube-proxy stand-ins.

Python 3.11 standard library only (the stand-in image has nothing else). What is here:

- `parse_flags`: pflag-like parsing against an allow-list of the real binary's flags; an
  unknown flag is `Error: unknown flag: --x` and exit 1, as the real binaries do.
- `read_kubeconfig`: the subset of a kubeconfig that rkel writes (kubecfg-<component>.yaml):
  server, certificate-authority, client-certificate, client-key (file paths). No YAML library:
  the current context's cluster and user are found line by line.
- `ApiClient`: HTTPS + JSON with the client certificate, the server checked against the CA.
- `IdentityProbe`: asks the API, as the component, whether it may do what it owns (a
  SelfSubjectAccessReview); /healthz is "ok" only while that answers allowed.
- `HealthServer`: /healthz over HTTPS (a self-signed certificate made with the `openssl` CLI,
  or --tls-cert-file/--tls-private-key-file) or plain HTTP (kube-proxy).
- `run_until_signal`: SIGTERM/SIGINT end the component with exit 0.
"""

from __future__ import annotations

import http.client
import http.server
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubeconfig_client import KlogFormatter, KubeconfigError, load_kubeconfig

LOG = logging.getLogger("standin")


class StartupError(Exception):
    """An input is missing or unusable: exit 1 with a clear message."""


def setup_logging(name: str) -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KlogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    global LOG
    LOG = logging.getLogger(name)
    return LOG


# --- flags -------------------------------------------------------------------------------------

BOOL, STRING, INT, DURATION = "bool", "string", "int", "duration"
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h))+$")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class FlagError(Exception):
    pass


def parse_duration(text: str) -> float:
    """A Go duration (`40s`, `1m30s`, `500ms`, `0`) in seconds."""
    if text == "0":
        return 0.0
    if not _DURATION.match(text):
        raise ValueError(f"time: invalid duration {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)",
                                                         text))


def parse_flags(argv: list[str], allowed: dict[str, str]) -> dict[str, str]:
    """`--name=value`, `--name value` (non-bool) and `--bool`; the last one given wins."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            raise FlagError(f"unknown command {arg!r}")
        name, eq, value = arg[2:].partition("=")
        kind = allowed.get(name)
        if kind is None:
            raise FlagError(f"unknown flag: --{name}")
        if not eq:
            if kind == BOOL:
                value = "true"
            elif i < len(argv):
                value, i = argv[i], i + 1
            else:
                raise FlagError(f"flag needs an argument: --{name}")
        if kind == BOOL and value.lower() not in ("true", "false", "1", "0", "t", "f"):
            raise FlagError(f'invalid argument "{value}" for "--{name}" flag: '
                            f"strconv.ParseBool: parsing \"{value}\": invalid syntax")
        if kind == INT and not re.fullmatch(r"-?\d+", value):
            raise FlagError(f'invalid argument "{value}" for "--{name}" flag: '
                            f'strconv.ParseInt: parsing "{value}": invalid syntax')
        if kind == DURATION:
            try:
                parse_duration(value)
            except ValueError as exc:
                raise FlagError(f'invalid argument "{value}" for "--{name}" flag: {exc}') from None
        out[name] = value
    return out


def help_or_version(name: str, flags: dict[str, str], environ: dict[str, str]) -> bool:
    """Answer --help / --version as the real binaries do; True when one was answered."""
    if flags.get("help") == "true":
        print(f"{name} stand-in: see scenarios/standins/README.md")
        return True
    if flags.get("version"):
        print(f"Kubernetes {environ.get('STANDIN_VERSION', 'v0.0.0')} ({name} stand-in)")
        return True
    return False


def flags_or_exit(name: str, argv: list[str], allowed: dict[str, str]) -> dict[str, str]:
    try:
        return parse_flags(argv, allowed)
    except FlagError as exc:
        print(f"Error: {exc}\nUsage of {name} (stand-in): see scenarios/standins/README.md\n"
              f"\nError: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


# The flags every component shares (component-base: logs, leader election, client, serving).
COMMON_FLAGS: dict[str, str] = {
    "help": BOOL, "version": STRING, "v": INT, "vmodule": STRING, "logtostderr": BOOL,
    "alsologtostderr": BOOL, "log-dir": STRING, "log-file": STRING, "stderrthreshold": STRING,
    "log-flush-frequency": DURATION, "logging-format": STRING, "log-json-split-stream": BOOL,
    "log-text-split-stream": BOOL, "skip-headers": BOOL, "one-output": BOOL,
    "add-dir-header": BOOL, "skip-log-headers": BOOL, "log-file-max-size": INT,
    "log-backtrace-at": STRING, "kubeconfig": STRING, "master": STRING, "kube-api-qps": STRING,
    "kube-api-burst": INT, "kube-api-content-type": STRING, "feature-gates": STRING,
    "profiling": BOOL, "contention-profiling": BOOL,
}
SERVING_FLAGS: dict[str, str] = {
    "bind-address": STRING, "secure-port": INT, "cert-dir": STRING, "tls-cert-file": STRING,
    "tls-private-key-file": STRING, "tls-cipher-suites": STRING, "tls-min-version": STRING,
    "tls-sni-cert-key": STRING, "permit-port-sharing": BOOL, "permit-address-sharing": BOOL,
    "http2-max-streams-per-connection": INT,
    "authentication-kubeconfig": STRING, "authorization-kubeconfig": STRING,
    "authentication-skip-lookup": BOOL, "authentication-tolerate-lookup-failure": BOOL,
    "authentication-token-webhook-cache-ttl": DURATION, "client-ca-file": STRING,
    "requestheader-client-ca-file": STRING, "requestheader-allowed-names": STRING,
    "requestheader-extra-headers-prefix": STRING, "requestheader-group-headers": STRING,
    "requestheader-username-headers": STRING, "requestheader-uid-headers": STRING,
    "authorization-always-allow-paths": STRING,
    "authorization-webhook-cache-authorized-ttl": DURATION,
    "authorization-webhook-cache-unauthorized-ttl": DURATION,
    "leader-elect": BOOL, "leader-elect-lease-duration": DURATION,
    "leader-elect-renew-deadline": DURATION, "leader-elect-retry-period": DURATION,
    "leader-elect-resource-lock": STRING, "leader-elect-resource-name": STRING,
    "leader-elect-resource-namespace": STRING, "show-hidden-metrics-for-version": STRING,
    "allow-metric-labels": STRING, "allow-metric-labels-manifest": STRING,
    "disabled-metrics": STRING,
}


def env_port(environ: dict[str, str], name: str, flag_value: str | None, default: int) -> int:
    raw = environ.get(name) or flag_value
    try:
        port = int(raw) if raw else default
    except ValueError:
        raise StartupError(f"invalid port {raw!r} ({name})") from None
    if not 0 < port < 65536:
        raise StartupError(f"invalid port {port} ({name})")
    return port


def env_seconds(environ: dict[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if not raw:
        return default
    try:
        return parse_duration(raw) if not re.fullmatch(r"\d+(\.\d+)?", raw) else float(raw)
    except ValueError:
        raise StartupError(f"invalid duration {raw!r} in ${name}") from None


# --- kubeconfig --------------------------------------------------------------------------------


def read_kubeconfig(path: str) -> dict[str, str]:
    """server, certificate-authority, client-certificate, client-key of the current context
    (read by the kubelet stand-in's reader, so every stand-in reads kubeconfigs alike)."""
    if not path:
        raise StartupError("--kubeconfig must be given (the stand-in has no in-cluster config)")
    try:
        config = load_kubeconfig(path)
    except KubeconfigError as exc:
        raise StartupError(f"unable to read --kubeconfig {path}: {exc}") from None
    return {"server": config.server, "certificate-authority": config.ca_file,
            "client-certificate": config.cert_file, "client-key": config.key_file}


# --- the API client ----------------------------------------------------------------------------


class ApiFailure(Exception):
    """The API did not answer (connection, TLS) or answered an error code."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class ApiClient:
    def __init__(self, kubeconfig: dict[str, str], timeout: float = 5.0) -> None:
        server = kubeconfig["server"].removeprefix("https://").rstrip("/")
        host, _, port = server.rpartition(":") if re.search(r":\d+$", server) else (server, "",
                                                                                    "443")
        self.host, self.port, self.timeout = host.strip("[]"), int(port), timeout
        try:
            ctx = ssl.create_default_context(cafile=kubeconfig["certificate-authority"])
            ctx.load_cert_chain(kubeconfig["client-certificate"], kubeconfig["client-key"])
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"unable to load the kubeconfig's certificates: {exc}") from None
        self.context = ctx
        self.user = cert_subject(kubeconfig["client-certificate"])

    def call(self, method: str, path: str, body: Any = None,
             content_type: str = "application/json") -> Any:
        """The decoded JSON answer of a 2xx; ApiFailure otherwise (with the Status message)."""
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                           context=self.context)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, data, {"Content-Type": content_type,
                                              "Accept": "application/json",
                                              "User-Agent": f"{LOG.name}-standin"})
            resp = conn.getresponse()
            raw = resp.read().decode(errors="replace")
        except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
            raise ApiFailure(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = raw
        if not 200 <= resp.status < 300:
            message = doc.get("message", raw) if isinstance(doc, dict) else raw
            raise ApiFailure(f"{method} {path}: {resp.status} {message}", resp.status)
        return doc


def cert_subject(path: str) -> str:
    """The CN of a PEM certificate (for the logs), via the ssl module's decoder."""
    try:
        decoded = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
        for rdn in decoded.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
    except (OSError, ssl.SSLError, AttributeError, ValueError):
        pass
    return "?"


class IdentityProbe:
    """Whether the API answers us, as us: a SelfSubjectAccessReview for something we own.

    A TLS failure (wrong CA, a certificate from another PKI) or a 401/403 makes it fail; the
    reason is logged when it changes.
    """

    def __init__(self, client: ApiClient, attributes: dict[str, str], period: float = 1.0
                 ) -> None:
        self.client, self.attributes, self.period = client, attributes, period
        self.ok, self.reason = False, "not probed yet"
        self._lock = threading.Lock()
        self._last_check = 0.0

    def check(self) -> tuple[bool, str]:
        with self._lock:
            if time.monotonic() - self._last_check < self.period:
                return self.ok, self.reason
            self._last_check = time.monotonic()
            review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                      "spec": {"resourceAttributes": self.attributes}}
            try:
                got = self.client.call(
                    "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review)
                allowed = bool(((got or {}).get("status") or {}).get("allowed"))
                ok, reason = allowed, ("" if allowed else
                                       f"user {self.client.user!r} may not "
                                       f"{self.attributes.get('verb')} "
                                       f"{self.attributes.get('resource')}")
            except ApiFailure as exc:
                ok, reason = False, str(exc)
            if ok != self.ok or reason != self.reason:
                if ok:
                    LOG.info(f"the API answers as {self.client.user!r}: healthy")
                else:
                    LOG.error(f"unhealthy: the API does not answer as {self.client.user!r}: "
                              f"{reason}")
            self.ok, self.reason = ok, reason
            return ok, reason


# --- health serving ----------------------------------------------------------------------------


def self_signed(name: str, workdir: str) -> tuple[str, str]:
    """A self-signed serving certificate for localhost/127.0.0.1, made with `openssl`."""
    openssl = shutil.which("openssl")
    if not openssl:
        raise StartupError("no openssl on PATH to self-sign a serving certificate; give "
                           "--tls-cert-file and --tls-private-key-file")
    cert, key = os.path.join(workdir, f"{name}.crt"), os.path.join(workdir, f"{name}.key")
    result = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365",
         "-keyout", key, "-out", cert, "-subj", f"/CN={name}@{int(time.time())}",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise StartupError(f"openssl could not self-sign a certificate: {result.stderr.strip()}")
    return cert, key


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HealthHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/healthz", "/livez", "/readyz", "/healthz/ping"):
            ok, reason = self.server.check()
            failed = f"[-]api failed: {reason}\nhealthz check failed"
            code, text = (200, "ok") if ok else (500, failed)
        else:
            code, text = 404, "404 page not found"
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _HealthHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], check: Callable[[], tuple[bool, str]],
                 tls: ssl.SSLContext | None) -> None:
        self.check, self.tls = check, tls
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        if self.tls is not None:
            sock.settimeout(10)
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            if self.tls is not None:
                request.do_handshake()
            super().finish_request(request, client_address)
        except (ssl.SSLError, OSError) as exc:
            LOG.debug(f"health connection from {client_address}: {exc}")


def health_server(address: str, port: int, check: Callable[[], tuple[bool, str]],
                  cert_key: tuple[str, str] | None) -> _HealthHTTPServer:
    tls = None
    if cert_key is not None:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            tls.load_cert_chain(*cert_key)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"unable to load the serving certificate {cert_key[0]}: {exc}"
                               ) from None
    try:
        return _HealthHTTPServer((address, port), check, tls)
    except OSError as exc:
        raise StartupError(f"failed to listen on {address}:{port}: {exc}") from None


def serving_cert(name: str, flags: dict[str, str]) -> tuple[tuple[str, str], str | None]:
    """--tls-cert-file/--tls-private-key-file when given, else self-signed (and its tmp dir)."""
    if flags.get("tls-cert-file") or flags.get("tls-private-key-file"):
        if not (flags.get("tls-cert-file") and flags.get("tls-private-key-file")):
            raise StartupError("--tls-cert-file and --tls-private-key-file go together")
        LOG.info(f"serving /healthz with --tls-cert-file {flags['tls-cert-file']}")
        return (flags["tls-cert-file"], flags["tls-private-key-file"]), None
    workdir = tempfile.mkdtemp(prefix=f"{name}-standin-")
    pair = self_signed(name, workdir)
    LOG.info(f"serving /healthz with a self-signed certificate made by openssl in {workdir}")
    return pair, workdir


def run_until_signal(loop: Callable[[threading.Event], None], period: float,
                     servers: list[_HealthHTTPServer], cleanup: str | None = None) -> int:
    """Serve, run `loop(stop)` every `period` s until SIGTERM/SIGINT; then exit 0."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    for server in servers:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                         daemon=True).start()
    while not stop.is_set():
        try:
            loop(stop)
        except Exception:  # a bug in one round must not kill the component
            LOG.exception("round failed")
        stop.wait(period)
    LOG.info("received SIGTERM, shutting down")
    for server in servers:
        server.shutdown()
        server.server_close()
    if cleanup:
        shutil.rmtree(cleanup, ignore_errors=True)
    return 0


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except (ValueError, AttributeError):
        return None
