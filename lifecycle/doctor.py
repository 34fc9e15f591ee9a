"""`rkel doctor`: preflight checks of every node before (or between) runs; nothing is changed.

Facts are observed on each host with a few read-only shell commands over its SSH connection
(`run_command`: the Docker version and root dir, /proc/net/tcp, `date`, `df`), each paired with a
pure parser; the checks are pure functions of those facts and the node's roles
(`evaluate`). Hosts are observed in parallel and every host's outcome is reported, with what
to do for each failure. A port already held by rkel's own running container for it counts as
fine: on a running cluster that is where the component listens.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from lifecycle.config.model import ClusterConfig, Node
from lifecycle.effects import OLD_PREFIX
from lifecycle.errors import HostError
from lifecycle.hosts import SERVICE_PORTS, Container
from lifecycle.spec import NodeRef

MIN_DOCKER = (20, 10)  # the oldest Docker Engine rkel supports (Debian 12 ships 20.10)
MAX_CLOCK_SKEW = 1.0  # seconds; etcd complains of peers further apart, and TLS needs it too
MIN_FREE_ETCD = 2 << 30  # etcd's default space quota: its data must be able to reach it
MIN_FREE_DOCKER = 5 << 30  # one Kubernetes version's images with room to pull the next
ETCD_DATA = "/var/lib/etcd"
DEFAULT_DOCKER_ROOT = "/var/lib/docker"
COMMAND_TIMEOUT = 30.0
DEFAULT_WORKERS = 16

PORTS_CMDS = ("cat /proc/net/tcp", "cat /proc/net/tcp6")  # the second is absent without IPv6
CLOCK_CMD = "date +%s.%N"


class CommandHost(Protocol):
    """What doctor needs of a host: its containers and a shell command over SSH."""

    name: str

    def containers(self) -> dict[str, Container]: ...

    def run_command(self, command: str, timeout: float = 60) -> tuple[int, str, str]: ...


class DoctorBackend(Protocol):
    def host(self, node: NodeRef) -> CommandHost: ...


# ---------------------------------------------------------------------------- values
@dataclass(frozen=True)
class Facts:
    """What was observed on one host; a fact that could not be read is None, with `errors`
    saying why."""

    docker_version: str | None = None
    docker_root: str = DEFAULT_DOCKER_ROOT
    listening: frozenset[int] | None = None
    rkel_running: frozenset[str] = frozenset()  # names of rkel's running containers
    clock_skew: float | None = None  # seconds the host is ahead of this machine
    clock_uncertainty: float = 0.0
    free: dict[str, int | None] = field(default_factory=dict)  # path -> free bytes
    errors: dict[str, str] = field(default_factory=dict)  # fact -> why it is missing


@dataclass(frozen=True)
class Check:
    """One check of one host: passed or not, what was seen, and what to do when it failed."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    skipped: bool = False

    @property
    def result(self) -> str:
        return "skip" if self.skipped else "ok" if self.ok else "FAIL"

    def to_dict(self) -> dict[str, object]:
        return {"check": self.name, "ok": self.ok, "result": self.result.lower(),
                "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True)
class HostReport:
    node: str
    address: str
    roles: tuple[str, ...]
    reachable: bool
    checks: tuple[Check, ...]

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.ok and not c.skipped)

    def to_dict(self) -> dict[str, object]:
        return {"node": self.node, "address": self.address, "roles": list(self.roles),
                "reachable": self.reachable, "ok": not self.failed,
                "checks": [c.to_dict() for c in self.checks]}


@dataclass(frozen=True)
class Report:
    hosts: tuple[HostReport, ...]  # sorted by node name

    @property
    def unreachable(self) -> tuple[HostReport, ...]:
        return tuple(h for h in self.hosts if not h.reachable)

    @property
    def exit_code(self) -> int:
        """0 all passed; 6 a host could not be reached (or refused); 7 a check failed."""
        if self.unreachable:
            return 6
        return 7 if any(h.failed for h in self.hosts) else 0

    def to_dict(self) -> dict[str, object]:
        return {"ok": self.exit_code == 0, "exit_code": self.exit_code,
                "hosts": [h.to_dict() for h in self.hosts]}


# ---------------------------------------------------------------------------- parsers (pure)
def parse_listening(text: str) -> frozenset[int]:
    """The TCP ports in state LISTEN in /proc/net/tcp and /proc/net/tcp6 content."""
    ports = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or not parts[0].rstrip(":").isdigit() or parts[3] != "0A":
            continue
        _, _, port = parts[1].rpartition(":")
        try:
            ports.add(int(port, 16))
        except ValueError:
            continue
    return frozenset(ports)


def parse_epoch(text: str) -> tuple[float, float] | None:
    """`date +%s.%N` output -> (seconds, resolution); busybox's date prints no nanoseconds."""
    text = text.strip()
    if re.fullmatch(r"\d+\.\d+", text):
        return float(text), 0.0
    whole = re.match(r"(\d+)(?:\.|$)", text)
    return (float(whole.group(1)), 1.0) if whole else None


def parse_df(text: str) -> int | None:
    """Free bytes from `df -Pk PATH` output (its last line, column 4 in KiB)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        return None
    parts = lines[-1].split()
    if len(parts) < 6 or not parts[3].isdigit():
        return None
    return int(parts[3]) * 1024


def parse_docker_version(text: str) -> tuple[int, ...] | None:
    """"20.10.24+dfsg1" -> (20, 10, 24); None when it is not a version."""
    found = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    if not found:
        return None
    return tuple(int(g) for g in found.groups() if g is not None)


# ---------------------------------------------------------------------------- what is needed
def required_ports(roles: Sequence[str]) -> dict[int, str]:
    """port -> the rkel container that will listen there, for a node with `roles`."""
    names = ["kubelet", "kube-proxy"]  # every node
    if "etcd" in roles:
        names.append("etcd")
    if "controlplane" in roles:
        names += ["kube-apiserver", "kube-controller-manager", "kube-scheduler"]
    else:
        names.append("nginx-proxy")
    return dict(sorted((port, name) for name in names for port in SERVICE_PORTS[name]))


def etcd_data_dir(config: ClusterConfig) -> str:
    """Where etcd keeps its data on a node (RKE's prefix_path applies)."""
    return config.prefix_path.rstrip("/") + ETCD_DATA


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB"


# ---------------------------------------------------------------------------- checks (pure)
def evaluate(node: Node, facts: Facts, config: ClusterConfig) -> tuple[Check, ...]:
    """Every check of `node` from what was observed on it."""
    checks = [Check("ssh", True, f"{node.user}@{node.address}:{node.port}, Docker API answers")]
    checks.append(_docker_check(facts, config))
    checks.append(_ports_check(node, facts))
    checks.append(_clock_check(facts))
    if "etcd" in node.role:
        checks.append(_disk_check(etcd_data_dir(config), MIN_FREE_ETCD, "etcd needs", facts))
    checks.append(_disk_check(facts.docker_root, MIN_FREE_DOCKER, "Docker needs for images",
                              facts))
    return tuple(checks)


def _docker_check(facts: Facts, config: ClusterConfig) -> Check:
    minimum = ".".join(map(str, MIN_DOCKER))
    if facts.docker_version is None:
        why = facts.errors.get("docker")
        return Check("docker", False, f"cannot read the Docker version: {why}",
                     "check that the SSH user can run `docker version` on the node")
    version = parse_docker_version(facts.docker_version)
    if version is None:
        return Check("docker", False,
                     f"cannot tell the Docker version from {facts.docker_version!r}",
                     f"install Docker Engine {minimum} or newer")
    if version[:2] >= MIN_DOCKER:
        return Check("docker", True,
                     f"Docker {facts.docker_version} (supported: {minimum} or newer)")
    if config.ignore_docker_version:
        return Check("docker", True, f"Docker {facts.docker_version} is older than {minimum}; "
                     "not checked (ignore_docker_version: true)")
    return Check("docker", False, f"Docker {facts.docker_version} is older than {minimum}, the "
                 "oldest rkel supports",
                 f"upgrade Docker Engine to {minimum} or newer (or set ignore_docker_version: true "
                 "in cluster.yml to go ahead at your own risk)")


def _ports_check(node: Node, facts: Facts) -> Check:
    wanted = required_ports(node.role)
    listed = " ".join(map(str, wanted))
    if facts.listening is None:
        why = facts.errors.get("ports")
        return Check("ports", False, f"cannot read the listening ports: {why}",
                     "check that /proc/net/tcp is readable on the node")
    busy, ours = [], []
    for port, _service in wanted.items():
        if port not in facts.listening:
            continue
        owners = [n for n, ports in SERVICE_PORTS.items() if port in ports]
        if any(o in facts.rkel_running for o in owners):
            ours.append(port)
        else:
            busy.append(port)
    if busy:
        who = ", ".join(f"{p} ({wanted[p]})" for p in busy)
        shown = " or ".join(f"sport = :{p}" for p in busy)
        return Check("ports", False, f"in use by something other than rkel: {who}",
                     f"stop what listens on port(s) {', '.join(map(str, busy))} on "
                     f"{node.address} (`sudo ss -ltnp '{shown}'` shows it); rkel's "
                     "components need them")
    detail = f"free: {listed}" if not ours else (
        f"{' '.join(map(str, ours))} used by rkel's running containers"
        + (f", free: {' '.join(str(p) for p in wanted if p not in ours)}"
           if len(ours) < len(wanted) else ""))
    return Check("ports", True, detail)


def _clock_check(facts: Facts) -> Check:
    if facts.clock_skew is None:
        return Check("clock", False, f"cannot read the clock: {facts.errors.get('clock')}",
                     "check that `date` works on the node")
    skew = facts.clock_skew
    detail = f"{abs(skew):.2f}s {'ahead of' if skew >= 0 else 'behind'} this machine's clock"
    if abs(skew) <= MAX_CLOCK_SKEW + facts.clock_uncertainty:
        return Check("clock", True, detail)
    return Check("clock", False, detail + f" (more than {MAX_CLOCK_SKEW:.0f}s)",
                 "synchronise the node's clock with NTP (e.g. `timedatectl set-ntp true`, "
                 "chrony); etcd and certificate checks need clocks that agree")


def _disk_check(path: str, minimum: int, what: str, facts: Facts) -> Check:
    name = f"disk {path}"
    free = facts.free.get(path)
    if free is None:
        return Check(name, False, f"cannot read free space: {facts.errors.get(name)}",
                     f"check that `df -Pk {path}` works on the node")
    detail = f"{_gib(free)} free"
    if free >= minimum:
        return Check(name, True, detail)
    return Check(name, False, detail + f", less than the {_gib(minimum)} {what} need",
                 f"free space on the file system of {path} (at least {_gib(minimum)})")


# ---------------------------------------------------------------------------- observing (effects)
def _run(host: CommandHost, command: str) -> tuple[bool, str]:
    """(succeeded, stdout or why not)."""
    code, out, err = host.run_command(command, timeout=COMMAND_TIMEOUT)
    if code != 0:
        return False, (err.strip().splitlines() or [f"exit status {code}"])[-1]
    return True, out


def _free_space(host: CommandHost, path: str) -> tuple[int | None, str]:
    """Free bytes where `path` is, or would be once created (its nearest existing parent)."""
    probe = path
    while True:
        ok, out = _run(host, f"df -Pk {shlex.quote(probe)}")
        if ok:
            free = parse_df(out)
            return (free, "") if free is not None else (None, f"unexpected df output {out!r}")
        if probe in ("/", ""):
            return None, out
        probe = probe.rstrip("/").rpartition("/")[0] or "/"


def observe(host: CommandHost, node: Node, config: ClusterConfig,
            now: Callable[[], float] = time.time, managed: Collection[str] = ()) -> Facts:
    """Read every fact `evaluate` needs; HostError when the connection is lost meanwhile.
    `managed`: containers the state records on this node (adopted ones carry no rkel label)."""
    errors: dict[str, str] = {}
    socket = shlex.quote("unix://" + (node.docker_socket or "/var/run/docker.sock"))
    ok, out = _run(host, f"docker -H {socket} version --format '{{{{.Server.Version}}}}'")
    docker_version = out.strip() if ok else None
    if not ok:
        errors["docker"] = out
    ok, out = _run(host, f"docker -H {socket} info --format '{{{{.DockerRootDir}}}}'")
    docker_root = out.strip() if ok and out.strip().startswith("/") else DEFAULT_DOCKER_ROOT
    ok, out = _run(host, PORTS_CMDS[0])
    listening = parse_listening(out) if ok else None
    if not ok:
        errors["ports"] = out
    ok6, out6 = _run(host, PORTS_CMDS[1])
    if listening is not None and ok6:
        listening |= parse_listening(out6)
    # rkel's own: its containers, and the `old-<name>` copies a replacement sets aside (after a
    # host died mid-replacement, restart=always brings the old copy back on the port)
    rkel_running = frozenset(c.name.removeprefix(OLD_PREFIX) for c in host.containers().values()
                             if c.running and (c.spec_hash or c.name in managed))
    before = now()
    ok, out = _run(host, CLOCK_CMD)
    after = now()
    epoch = parse_epoch(out) if ok else None
    if epoch is None:
        errors["clock"] = out if not ok else f"unexpected date output {out.strip()!r}"
    skew = None if epoch is None else epoch[0] - (before + after) / 2
    uncertainty = (after - before) / 2 + (epoch[1] if epoch else 0.0)
    paths = [docker_root] + ([etcd_data_dir(config)] if "etcd" in node.role else [])
    free: dict[str, int | None] = {}
    for path in paths:
        free[path], why = _free_space(host, path)
        if free[path] is None:
            errors[f"disk {path}"] = why
    return Facts(docker_version, docker_root, listening, rkel_running, skew, uncertainty, free,
                 errors)


def node_ref(node: Node) -> NodeRef:
    return NodeRef(node.name, node.address, node.internal, node.port, node.user, tuple(node.role))


def check_host(backend: DoctorBackend, node: Node, config: ClusterConfig,
               now: Callable[[], float] = time.time, managed: Collection[str] = ()) -> HostReport:
    """Connect to `node`, observe it and run every check; an unreachable host gets one failed
    `ssh` check and the others skipped."""
    roles = tuple(node.role)
    try:
        host = backend.host(node_ref(node))
        facts = observe(host, node, config, now, managed)
    except HostError as exc:
        fix = ("check the node's address, port, user and SSH key in cluster.yml, that sshd and "
               "Docker run on it and that this machine can reach it; then run `rkel doctor` again")
        checks = [Check("ssh", False, str(exc), fix)]
        checks += [Check(name, False, "not checked: the host was not reached", skipped=True)
                   for name in ("docker", "ports", "clock")]
        return HostReport(node.name, node.address, roles, False, tuple(checks))
    return HostReport(node.name, node.address, roles, True, evaluate(node, facts, config))


def run_doctor(backend: DoctorBackend, config: ClusterConfig, *, workers: int = DEFAULT_WORKERS,
               now: Callable[[], float] = time.time, skip: Collection[str] = (),
               managed: Mapping[str, Collection[str]] | None = None) -> Report:
    """Check every node of `config` but those named in `skip`, all at once (up to `workers`),
    sorted by node name. `managed`: per node, the containers the state records there."""
    nodes = sorted((n for n in config.nodes if n.name not in skip), key=lambda n: n.name)
    if not nodes:
        return Report(())
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(nodes)))) as pool:
        reports = list(pool.map(
            lambda n: check_host(backend, n, config, now, (managed or {}).get(n.name, ())), nodes))
    return Report(tuple(reports))


def report_text(report: Report) -> str:
    """The table (one row per host and check), then what to do for each failure, then a
    summary line."""
    rows = [(h.node, c.name, c.result, c.detail) for h in report.hosts for c in h.checks]
    widths = [max([len(head)] + [len(r[i]) for r in rows]) for i, head in
              enumerate(("HOST", "CHECK", "RESULT"))]
    def line(cells: tuple[str, str, str, str]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(cells[:3], widths)) + "  " + cells[3]
    lines = [line(("HOST", "CHECK", "RESULT", "DETAIL")).rstrip()]
    lines += [line(r) for r in rows]
    fixes = [(h.node, c) for h in report.hosts for c in h.failed if c.fix]
    if fixes:
        lines += ["", "To fix:"]
        lines += [f"  {node} {c.name}: {c.fix}" for node, c in fixes]
    failed = sum(len(h.failed) for h in report.hosts)
    if report.exit_code == 0:
        lines += ["", f"All checks passed on {len(report.hosts)} host(s)."]
    else:
        bad = [h.node for h in report.hosts if h.failed]
        summary = f"{failed} check(s) failed on {', '.join(bad)}"
        if report.unreachable:
            summary += f" ({', '.join(h.node for h in report.unreachable)} not reached)"
        lines += ["", summary + "."]
    return "\n".join(lines)
