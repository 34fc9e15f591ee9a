"""kube-proxy stand-in: health only (no iptables/ipvs rules are programmed).

Python 3.11 standard library only. Run as a script with rkel's flags, verbatim. See README.md.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import threading

from component_common import (
    BOOL,
    COMMON_FLAGS,
    DURATION,
    INT,
    STRING,
    ApiClient,
    IdentityProbe,
    StartupError,
    env_port,
    flags_or_exit,
    health_server,
    help_or_version,
    read_kubeconfig,
    run_until_signal,
    setup_logging,
)

NAME = "kube-proxy"
FLAGS: dict[str, str] = {
    **COMMON_FLAGS,
    **{k: STRING for k in (
        "cluster-cidr", "healthz-bind-address", "metrics-bind-address", "hostname-override",
        "bind-address", "proxy-mode", "config", "write-config-to", "cleanup-iptables",
        "ipvs-scheduler", "ipvs-exclude-cidrs", "nodeport-addresses", "detect-local-mode",
        "pod-bridge-interface", "pod-interface-name-prefix", "proxy-port-range",
        "iptables-masquerade-bit", "oom-score-adj", "conntrack-max-per-core", "conntrack-min",
        "init-only", "show-hidden-metrics-for-version", "ipvs-tcp-timeout",
        "ipvs-tcpfin-timeout", "ipvs-udp-timeout", "conntrack-tcp-timeout-established",
        "conntrack-tcp-timeout-close-wait", "conntrack-udp-timeout",
        "conntrack-udp-timeout-stream", "iptables-sync-period", "iptables-min-sync-period",
        "ipvs-sync-period", "ipvs-min-sync-period", "config-sync-period")},
    **{k: BOOL for k in (
        "masquerade-all", "cleanup", "ipvs-strict-arp", "iptables-localhost-nodeports",
        "bind-address-hard-fail", "conntrack-tcp-be-liberal")},
    "healthz-port": INT, "metrics-port": INT, "udp-timeout": DURATION,
}
LOG = setup_logging(NAME)


def healthz_address(flags: dict[str, str], environ: dict[str, str]) -> tuple[str, int]:
    """--healthz-bind-address (`ip` or `ip:port`, default 0.0.0.0:10256); env port override."""
    raw = flags.get("healthz-bind-address", "0.0.0.0:10256")
    host, port = raw, ""
    if raw.startswith("["):
        host, _, port = raw[1:].partition("]")
        port = port.lstrip(":")
    elif raw.count(":") == 1:
        host, port = raw.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise StartupError(f"--healthz-bind-address {raw!r}: not an IP address") from None
    return host, env_port(environ, "STANDIN_KUBE_PROXY_PORT", port or flags.get("healthz-port"),
                          10256)


def main(argv: list[str], environ: dict[str, str]) -> int:
    flags = flags_or_exit(NAME, argv, FLAGS)
    if help_or_version(NAME, flags, environ):
        return 0
    try:
        cidr = flags.get("cluster-cidr", "")
        for part in filter(None, cidr.split(",")):
            try:
                ipaddress.ip_network(part.strip())
            except ValueError as exc:
                raise StartupError(f"--cluster-cidr {cidr!r}: {exc}") from None
        kubeconfig = read_kubeconfig(flags.get("kubeconfig", ""))
        client = ApiClient(kubeconfig)
        host, port = healthz_address(flags, environ)
        probe = IdentityProbe(client, {"verb": "list", "resource": "endpointslices",
                                       "group": "discovery.k8s.io"})
        server = health_server(host, port, probe.check, None)
    except StartupError as exc:
        LOG.error(f'"command failed" err="{exc}"')
        return 1
    node = flags.get("hostname-override", "") or os.uname().nodename
    LOG.info(f'"Using cluster CIDR" clusterCIDR="{cidr or "(none)"}" node="{node}"')
    LOG.info(f"Serving healthz on http://{host}:{port}/healthz; API {kubeconfig['server']} as "
             f"{client.user!r} (stand-in: no proxy rules are programmed)")
    probe.check()

    def round(stop: threading.Event) -> None:
        probe.check()  # logs when the API stops (or starts again) answering as us

    return run_until_signal(round, 5.0, [server])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], dict(os.environ)))
