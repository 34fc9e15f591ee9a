"""Network of the testbed: bridges, one network namespace per host, veths, iptables rules.

Layout (TESTBED.md): bridge rkelbr0 = 10.77.0.1/24 in the machine's namespace; host rknI has
eth0 = 10.77.0.(10+I) behind veth rkvI. With a bastion, the private hosts sit on rkelbr1
(10.78.0.0/24), a bridge with no address here, so the machine has no route to them (an
`unreachable` route makes sure nothing leaks towards the default gateway); the bastion rkn0 has
10.77.0.10 on eth0 and 10.78.0.10 on eth1. Forwarding from a testbed bridge to any other interface
is dropped: testbed traffic stays on loopback and the testbed's own addresses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from procs import TestbedError, log, run

PUBLIC_BRIDGE = "rkelbr0"
PRIVATE_BRIDGE = "rkelbr1"
PUBLIC_NET = "10.77.0"
PRIVATE_NET = "10.78.0"
GATEWAY = f"{PUBLIC_NET}.1"
REGISTRY_PORT = 5000
AUTH_REGISTRY_PORT = 5001  # same storage, HTTP basic auth (images.AUTH_USER)
RULE_TAG = "rkel-testbed"
NS_RE = re.compile(r"^rkn\d+$")
VETH_RE = re.compile(r"^rkv\d+b?$")


@dataclass(frozen=True)
class Link:
    """One veth pair: `veth` on `bridge` in the machine's namespace, `ifname` inside the host."""

    bridge: str
    veth: str
    ifname: str
    address: str


@dataclass(frozen=True)
class Host:
    """A testbed host: namespace rknI, its links, and how the machine reaches its sshd."""

    index: int
    links: tuple[Link, ...]
    gateway: str
    private: bool = False  # reachable only through the bastion
    bastion: bool = False

    @property
    def name(self) -> str:
        return f"rkn{self.index}"

    @property
    def address(self) -> str:
        """The address rkel uses for this host (the public one for the bastion)."""
        return self.links[0].address

    @property
    def netns(self) -> Path:
        return Path("/run/netns") / self.name


def topology(n: int, bastion: bool) -> list[Host]:
    """The hosts of an N-host testbed, bastion (rkn0) first when there is one."""
    if not 1 <= n <= 200:
        raise TestbedError(f"N must be between 1 and 200, not {n}")
    if not bastion:
        return [
            Host(i, (Link(PUBLIC_BRIDGE, f"rkv{i}", "eth0", f"{PUBLIC_NET}.{10 + i}"),), GATEWAY)
            for i in range(1, n + 1)
        ]
    gate = Host(0, (
        Link(PUBLIC_BRIDGE, "rkv0", "eth0", f"{PUBLIC_NET}.10"),
        Link(PRIVATE_BRIDGE, "rkv0b", "eth1", f"{PRIVATE_NET}.10"),
    ), GATEWAY, bastion=True)
    # The private hosts' default route points at the bastion, which does not forward.
    private = [
        Host(i, (Link(PRIVATE_BRIDGE, f"rkv{i}", "eth0", f"{PRIVATE_NET}.{10 + i}"),),
             f"{PRIVATE_NET}.10", private=True)
        for i in range(1, n + 1)
    ]
    return [gate, *private]


def forward_rules(bridges: list[str]) -> list[list[str]]:
    """FORWARD rules (without -I/-D FORWARD): accept within a bridge, drop towards elsewhere."""
    rules: list[list[str]] = []
    for br in bridges:
        tag = ["-m", "comment", "--comment", RULE_TAG]
        rules.append(["-i", br, "-o", br, *tag, "-j", "ACCEPT"])
        rules.append(["-i", br, "!", "-o", br, *tag, "-j", "DROP"])
    return rules


def create(hosts: list[Host]) -> None:
    """Create bridges, namespaces, veths, addresses, routes and the FORWARD rules."""
    bridges = sorted({link.bridge for h in hosts for link in h.links})
    for br in bridges:
        run(["ip", "link", "add", br, "type", "bridge"])
        if br == PUBLIC_BRIDGE:
            run(["ip", "addr", "add", f"{GATEWAY}/24", "dev", br])
        run(["ip", "link", "set", br, "up"])
    if PRIVATE_BRIDGE in bridges:
        run(["ip", "route", "replace", "unreachable", f"{PRIVATE_NET}.0/24"])
    for rule in forward_rules(bridges):
        if run(["iptables", "-C", "FORWARD", *rule], check=False).returncode != 0:
            run(["iptables", "-I", "FORWARD", *rule])
    for host in hosts:
        _create_host(host)


def _create_host(host: Host) -> None:
    ns = host.name
    run(["ip", "netns", "add", ns])
    for link in host.links:
        run(["ip", "link", "add", link.veth, "type", "veth", "peer", "name", link.ifname, "netns", ns])
        run(["ip", "link", "set", link.veth, "master", link.bridge, "up"])
        run(["ip", "-n", ns, "addr", "add", f"{link.address}/24", "dev", link.ifname])
        run(["ip", "-n", ns, "link", "set", link.ifname, "up"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "-n", ns, "route", "add", "default", "via", host.gateway])


def namespaces() -> list[str]:
    """Testbed namespaces present now (rkn*), sorted by index."""
    out = run(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return sorted((n for n in names if NS_RE.match(n)), key=lambda n: int(n[3:]))


def remove_all() -> None:
    """Remove every testbed namespace, veth, bridge, route and FORWARD rule (idempotent)."""
    for ns in namespaces():
        run(["ip", "netns", "delete", ns], check=False)
    links = run(["ip", "-o", "link", "show"], check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if VETH_RE.match(name) or name in (PUBLIC_BRIDGE, PRIVATE_BRIDGE):
            run(["ip", "link", "delete", name], check=False)
    run(["ip", "route", "del", "unreachable", f"{PRIVATE_NET}.0/24"], check=False)
    removed = _remove_tagged_rules()
    if removed:
        log(f"removed {removed} iptables FORWARD rule(s) tagged {RULE_TAG}")


def _remove_tagged_rules() -> int:
    """Delete every FORWARD rule carrying the testbed's comment tag."""
    removed = 0
    listing = run(["iptables", "-S", "FORWARD"], check=False).stdout
    for line in listing.splitlines():
        if line.startswith("-A FORWARD ") and f"--comment {RULE_TAG}" in line:
            args = line.split()[2:]
            if run(["iptables", "-D", "FORWARD", *args], check=False).returncode == 0:
                removed += 1
    return removed


def set_link(host: Host, up: bool) -> None:
    """Partition (`up=False`) or heal a host by taking its machine-side veth(s) down or up."""
    for link in host.links:
        run(["ip", "link", "set", link.veth, "up" if up else "down"])


def link_state(host: Host) -> bool:
    """True when every machine-side veth of the host is administratively up."""
    for link in host.links:
        out = run(["ip", "-o", "link", "show", link.veth], check=False).stdout
        flags = re.search(r"<([^>]*)>", out)
        if flags is None or "UP" not in flags.group(1).split(","):
            return False
    return True
