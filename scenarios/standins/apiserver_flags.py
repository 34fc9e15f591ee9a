"""Command-line flags of the kube-apiserver stand-in: the real flag set, parsed like pflag.

The real kube-apiserver (1.29-1.31) refuses any flag it does not know, so the stand-in does too:
`FLAGS` lists every flag of the real binary (name -> value type) that a cluster.yml may pass
through rkel's built-in args, version defaults or `extra_args`. Flags in `HONOURED` change what
the stand-in does; the others are accepted, type-checked and otherwise ignored (the startup log
lists them). Parsing follows pflag: `--name=value`, `--name value`, a bare `--name` for a
boolean (which never consumes the next word), last value wins, positional arguments refused.
Then `validate` checks the inputs the stand-in needs, with the wording the real server uses.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, field

__all__ = [
    "FLAGS", "HONOURED", "FlagError", "Options", "duration_seconds", "parse_args", "usage",
    "validate",
]

B, S, I, D, L, M, F = "bool", "string", "int", "duration", "strings", "mapStringString", "float"

FLAGS: dict[str, str] = {
    # generic server
    "advertise-address": S, "cors-allowed-origins": L, "debug-socket-path": S,
    "default-not-ready-toleration-seconds": I, "default-unreachable-toleration-seconds": I,
    "emulated-version": L, "external-hostname": S, "feature-gates": M, "goaway-chance": F,
    "livez-grace-period": D, "max-mutating-requests-inflight": I, "max-requests-inflight": I,
    "min-request-timeout": I, "request-timeout": D, "shutdown-delay-duration": D,
    "shutdown-send-retry-after": B, "shutdown-watch-termination-grace-period": D,
    "storage-initialization-timeout": D, "strict-transport-security-directives": L,
    # etcd
    "default-watch-cache-size": I, "delete-collection-workers": I,
    "enable-garbage-collector": B, "encryption-provider-config": S,
    "encryption-provider-config-automatic-reload": B, "etcd-cafile": S, "etcd-certfile": S,
    "etcd-compaction-interval": D, "etcd-count-metric-poll-period": D,
    "etcd-db-metric-poll-interval": D, "etcd-healthcheck-timeout": D, "etcd-keyfile": S,
    "etcd-prefix": S, "etcd-readycheck-timeout": D, "etcd-servers": L,
    "etcd-servers-overrides": L, "lease-reuse-duration-seconds": I, "storage-backend": S,
    "storage-media-type": S, "watch-cache": B, "watch-cache-sizes": L,
    # secure serving
    "bind-address": S, "cert-dir": S, "disable-http2-serving": B,
    "http2-max-streams-per-connection": I, "permit-address-sharing": B,
    "permit-port-sharing": B, "secure-port": I, "tls-cert-file": S, "tls-cipher-suites": L,
    "tls-min-version": S, "tls-private-key-file": S, "tls-sni-cert-key": L,
    # auditing
    "audit-log-batch-buffer-size": I, "audit-log-batch-max-size": I,
    "audit-log-batch-max-wait": D, "audit-log-batch-throttle-burst": I,
    "audit-log-batch-throttle-enable": B, "audit-log-batch-throttle-qps": F,
    "audit-log-compress": B, "audit-log-format": S, "audit-log-maxage": I,
    "audit-log-maxbackup": I, "audit-log-maxsize": I, "audit-log-mode": S, "audit-log-path": S,
    "audit-log-truncate-enabled": B, "audit-log-truncate-max-batch-size": I,
    "audit-log-truncate-max-event-size": I, "audit-log-version": S, "audit-policy-file": S,
    "audit-webhook-batch-buffer-size": I, "audit-webhook-batch-max-size": I,
    "audit-webhook-batch-max-wait": D, "audit-webhook-batch-throttle-burst": I,
    "audit-webhook-batch-throttle-enable": B, "audit-webhook-batch-throttle-qps": F,
    "audit-webhook-config-file": S, "audit-webhook-initial-backoff": D,
    "audit-webhook-mode": S, "audit-webhook-truncate-enabled": B,
    "audit-webhook-truncate-max-batch-size": I, "audit-webhook-truncate-max-event-size": I,
    "audit-webhook-version": S,
    # features
    "contention-profiling": B, "enable-priority-and-fairness": B, "profiling": B,
    # authentication
    "anonymous-auth": B, "api-audiences": L, "authentication-config": S,
    "authentication-token-webhook-cache-ttl": D, "authentication-token-webhook-config-file": S,
    "authentication-token-webhook-version": S, "client-ca-file": S,
    "enable-bootstrap-token-auth": B, "oidc-ca-file": S, "oidc-client-id": S,
    "oidc-groups-claim": S, "oidc-groups-prefix": S, "oidc-issuer-url": S,
    "oidc-required-claim": M, "oidc-signing-algs": L, "oidc-username-claim": S,
    "oidc-username-prefix": S, "requestheader-allowed-names": L,
    "requestheader-client-ca-file": S, "requestheader-extra-headers-prefix": L,
    "requestheader-group-headers": L, "requestheader-username-headers": L,
    "service-account-extend-token-expiration": B, "service-account-issuer": L,
    "service-account-jwks-uri": S, "service-account-key-file": L,
    "service-account-lookup": B, "service-account-max-token-expiration": D,
    "token-auth-file": S,
    # authorization
    "authorization-config": S, "authorization-mode": L, "authorization-policy-file": S,
    "authorization-webhook-cache-authorized-ttl": D,
    "authorization-webhook-cache-unauthorized-ttl": D, "authorization-webhook-config-file": S,
    "authorization-webhook-version": S,
    # API enablement, egress, admission
    "runtime-config": M, "egress-selector-config-file": S, "admission-control": L,
    "admission-control-config-file": S, "disable-admission-plugins": L,
    "enable-admission-plugins": L,
    # metrics, logs, traces
    "allow-metric-labels": M, "allow-metric-labels-manifest": S, "disabled-metrics": L,
    "show-hidden-metrics-for-version": S, "log-flush-frequency": D,
    "log-json-info-buffer-size": S, "log-json-split-stream": B,
    "log-text-info-buffer-size": S, "log-text-split-stream": B, "logging-format": S, "v": I,
    "vmodule": S, "tracing-config-file": S,
    # misc
    "aggregator-reject-forwarding-redirect": B, "allow-privileged": B, "apiserver-count": I,
    "cloud-config": S, "cloud-provider": S, "cloud-provider-gce-l7lb-src-cidrs": S,
    "cloud-provider-gce-lb-src-cidrs": S, "enable-aggregator-routing": B,
    "enable-logs-handler": B, "endpoint-reconciler-type": S, "event-ttl": D,
    "identity-lease-duration-seconds": I, "identity-lease-renew-interval-seconds": I,
    "kubelet-certificate-authority": S, "kubelet-client-certificate": S,
    "kubelet-client-key": S, "kubelet-preferred-address-types": L, "kubelet-timeout": D,
    "kubernetes-service-node-port": I, "max-connection-bytes-per-sec": I,
    "peer-advertise-ip": S, "peer-advertise-port": S, "peer-ca-file": S,
    "proxy-client-cert-file": S, "proxy-client-key-file": S,
    "service-account-signing-key-file": S, "service-cluster-ip-range": S,
    "service-node-port-range": S,
    # global
    "help": B, "version": S,
}
SHORTHANDS = {"h": "help", "v": "v"}

# Flags whose value changes what the stand-in does (the rest are checked and ignored).
HONOURED = frozenset({
    "advertise-address", "anonymous-auth", "authorization-mode", "bind-address",
    "client-ca-file", "encryption-provider-config", "etcd-cafile", "etcd-certfile", "etcd-keyfile", "etcd-prefix",
    "etcd-healthcheck-timeout", "etcd-servers", "kubelet-client-certificate", "kubelet-client-key", "proxy-client-cert-file",
    "proxy-client-key-file", "requestheader-client-ca-file", "secure-port",
    "service-account-issuer", "service-account-key-file", "service-account-signing-key-file",
    "service-cluster-ip-range", "service-node-port-range", "storage-backend", "tls-cert-file",
    "tls-cipher-suites", "tls-min-version", "tls-private-key-file", "help", "version",
})
# The defaults of the real binary, for the flags the stand-in reads.
DEFAULTS: dict[str, str] = {
    "anonymous-auth": "true", "authorization-mode": "AlwaysAllow", "bind-address": "0.0.0.0",
    "etcd-healthcheck-timeout": "2s", "etcd-prefix": "/registry", "storage-backend": "etcd3",
    "service-node-port-range": "30000-32767", "tls-min-version": "VersionTLS12",
}
# Go cipher suite names -> OpenSSL names (TLS 1.2; TLS 1.3 suites are not configurable in Go
# either, so their names are accepted and change nothing).
CIPHERS = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_AES_128_GCM_SHA256": "", "TLS_AES_256_GCM_SHA384": "",
    "TLS_CHACHA20_POLY1305_SHA256": "",
}
TLS_VERSIONS = ("VersionTLS10", "VersionTLS11", "VersionTLS12", "VersionTLS13")
AUTHZ_MODES = ("AlwaysAllow", "AlwaysDeny", "ABAC", "Webhook", "RBAC", "Node")
_DURATION = re.compile(r"^[-+]?(0|((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+)$")
_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
          "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(text: str) -> float:
    """A Go duration ("1m30s", "500ms", "0") in seconds."""
    total = 0.0 + sum(float(num) * _UNITS[unit]
                for num, unit in re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)", text))
    return -total if text.startswith("-") else total


class FlagError(Exception):
    """The command line cannot be parsed (unknown flag, missing or malformed value)."""


@dataclass
class Options:
    """Parsed flags: the values given (as text), and the real binary's defaults for the rest."""

    given: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> str:
        return self.given.get(name, DEFAULTS.get(name, ""))

    def has(self, name: str) -> bool:
        return bool(self.given.get(name))

    def flag(self, name: str) -> bool:
        return _BOOLS.get(self.get(name) or "false", False)

    def strings(self, name: str) -> list[str]:
        return [part.strip() for part in self.get(name).split(",") if part.strip()]

    def ignored(self) -> list[str]:
        """Given flags that the stand-in accepts but does not act on, sorted."""
        return sorted(name for name in self.given if name not in HONOURED)


def _check_value(name: str, value: str) -> None:
    kind = FLAGS[name]
    bad = f'invalid argument "{value}" for "--{name}" flag: '
    if kind == B and value not in _BOOLS:
        raise FlagError(bad + f'strconv.ParseBool: parsing "{value}": invalid syntax')
    if kind == I and not re.fullmatch(r"[-+]?\d+", value):
        raise FlagError(bad + f'strconv.ParseInt: parsing "{value}": invalid syntax')
    if kind == F and not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value):
        raise FlagError(bad + f'strconv.ParseFloat: parsing "{value}": invalid syntax')
    if kind == D and not _DURATION.match(value):
        raise FlagError(bad + f'time: invalid duration "{value}"')
    if kind == M and value and any("=" not in p for p in value.split(",") if p):
        raise FlagError(bad + f"{value} must be formatted as key=value")


def _accumulate(options: Options, name: str, value: str) -> None:
    """Last value wins, except for the one flag meant to be repeated."""
    if name == "tls-sni-cert-key" and name in options.given:
        options.given[name] += "," + value
    else:
        options.given[name] = value


def parse_args(argv: list[str]) -> Options:
    """Parse `argv` (without the program name) like pflag does for kube-apiserver.

    :raises FlagError: with the message the real binary prints after "Error: ".
    """
    options = Options()
    words = list(argv)
    while words:
        word = words.pop(0)
        if word == "--":
            if words:
                raise FlagError(f'"kube-apiserver" does not take any arguments, got {words!r}')
            break
        if not word.startswith("-") or word == "-":
            raise FlagError(f'"kube-apiserver" does not take any arguments, got [{word!r}]')
        long_form = word.startswith("--")
        body = word[2:] if long_form else word[1:]
        name, has_value, value = body.partition("=")
        if not long_form:
            if name not in SHORTHANDS:
                raise FlagError(f"unknown shorthand flag: {name[:1]!r} in {word}")
            name = SHORTHANDS[name]
        if name not in FLAGS:
            raise FlagError(f"unknown flag: --{name}")
        if not has_value:
            if FLAGS[name] == B or name == "version":
                value = "true"
            elif words:
                value = words.pop(0)
            else:
                raise FlagError(f"flag needs an argument: --{name}")
        _check_value(name, value)
        _accumulate(options, name, value)
    return options


def _check_url_list(options: Options, errors: list[str]) -> None:
    for url in options.strings("etcd-servers"):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            errors.append(f"--etcd-servers: {url!r} is not a URL of the form scheme://ip:port")


def _check_cidrs(options: Options, errors: list[str]) -> None:
    cidrs = options.strings("service-cluster-ip-range")
    if not cidrs:
        errors.append("--service-cluster-ip-range must be specified")
        return
    if len(cidrs) > 2:
        errors.append("--service-cluster-ip-range and --secondary-service-cluster-ip-range "
                      "can not be more than 2 CIDRs")
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            errors.append(f"service-cluster-ip-range[0] is not a valid cidr: {cidr}")


def _check_serving(options: Options, errors: list[str]) -> None:
    port = options.get("secure-port")
    if not port:
        errors.append("--secure-port must be specified (the stand-in has no default port)")
    elif not 1 <= int(port) <= 65535:
        errors.append(f"--secure-port {port} must be between 1 and 65535, inclusive. "
                      "It cannot be turned off afterwards")
    for name in ("bind-address", "advertise-address"):
        if options.has(name):
            try:
                ipaddress.ip_address(options.get(name))
            except ValueError:
                errors.append(f'invalid argument "{options.get(name)}" for "--{name}" flag: '
                              f'failed to parse IP: "{options.get(name)}"')
    if not (options.has("tls-cert-file") and options.has("tls-private-key-file")):
        errors.append("--tls-cert-file and --tls-private-key-file must be specified (the "
                      "stand-in does not self-sign a serving certificate into --cert-dir)")
    for suite in options.strings("tls-cipher-suites"):
        if suite not in CIPHERS:
            errors.append(f"cipher suite {suite} not supported or doesn't exist")
    if options.get("tls-min-version") not in TLS_VERSIONS:
        errors.append(f"unexpected TLS version {options.get('tls-min-version')} (must be one "
                      f"of: {', '.join(TLS_VERSIONS)})")


def _check_auth(options: Options, errors: list[str]) -> None:
    if not options.has("client-ca-file"):
        errors.append("--client-ca-file must be specified: the stand-in authenticates clients "
                      "by certificates signed by that CA only")
    for mode in options.strings("authorization-mode"):
        if mode not in AUTHZ_MODES:
            errors.append(f"authorization-mode {mode!r} is not a valid mode")
    if not options.strings("service-account-issuer"):
        errors.append("service-account-issuer is a required flag")
    if not options.has("service-account-signing-key-file"):
        errors.append("--service-account-signing-key-file and --service-account-issuer are "
                      "required flags")


def validate(options: Options) -> list[str]:
    """Every problem with the inputs, in the real server's words where it has them."""
    errors: list[str] = []
    if not options.strings("etcd-servers"):
        errors.append("--etcd-servers must be specified")
    _check_url_list(options, errors)
    if options.get("storage-backend") != "etcd3":
        errors.append("--storage-backend invalid, allowed values: etcd3. If not specified, "
                      "it will default to 'etcd3'")
    if not options.get("etcd-prefix").startswith("/"):
        errors.append("--etcd-prefix must be an absolute path (start with /)")
    _check_cidrs(options, errors)
    _check_serving(options, errors)
    _check_auth(options, errors)
    ports = options.get("service-node-port-range")
    if not re.fullmatch(r"\d+-\d+|\d+\+\d+", ports):
        errors.append(f'invalid argument "{ports}" for "--service-node-port-range" flag: '
                      "unable to parse port range")
    return errors


def usage() -> str:
    """A pflag-like usage text (flag names and types)."""
    lines = ["Usage:", "  kube-apiserver [flags]   (stand-in)", "", "Flags:"]
    for name in sorted(FLAGS):
        kind = FLAGS[name]
        lines.append(f"      --{name}" + ("" if kind == B else f" {kind}"))
    return "\n".join(lines)
