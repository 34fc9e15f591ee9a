#!/usr/bin/env python3
"""rkel's local multi-host testbed (TESTBED.md): N hosts with their own sshd and dockerd.

Each host rknI is a network + mount + UTS namespace with its own sshd and Docker Engine; a
private registry on 10.77.0.1:5000 serves images built from this machine's own files (and the
same storage on 10.77.0.1:5001 behind HTTP basic auth, user rkel-pull). rkel
reaches the hosts exactly like real servers: SSH with a key, Docker over SSH, images from the
private registry. Needs root and Debian packages (see REQUIRED_COMMANDS); stdlib only.

    testbed.py up N [--nonroot-user NAME] [--bastion] [--roles SPEC] [--install-packages] [--fresh]
    testbed.py down | status [--json] | stop-host I [--hard] | start-host I | partition I | heal I

State (keys, per-host dirs, registry storage, pids) lives in --state-dir, $RKEL_TESTBED_DIR or
/var/lib/rkel-testbed. Only processes the testbed recorded, or that live in its own namespaces
and cgroups, are ever signalled.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import clusteryml  # noqa: E402
import images  # noqa: E402
import network  # noqa: E402
import nodes  # noqa: E402
from network import Host  # noqa: E402
from nodes import HostProcs, StateDir  # noqa: E402
from procs import ProcRecord, TestbedError, alive, log, run, stop_record  # noqa: E402

DEFAULT_STATE_DIR = "/var/lib/rkel-testbed"
DEFAULT_USER = "rkel"
# command -> Debian package that provides it
REQUIRED_COMMANDS = {
    "dockerd": "docker.io", "/usr/bin/docker": "docker.io", "sshd": "openssh-server",
    "ssh-keygen": "openssh-client", "docker-registry": "docker-registry", "etcd": "etcd-server",
    "etcdctl": "etcd-client", "/usr/bin/busybox": "busybox-static", "ip": "iproute2",
    "iptables": "iptables", "nsenter": "util-linux", "unshare": "util-linux",
    "/usr/bin/python3.11": "python3.11", "tar": "tar", "ldd": "libc-bin", "useradd": "passwd",
    images.HTPASSWD: "apache2-utils", "/usr/bin/openssl": "openssl",
}
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])


@dataclass
class State:
    """The state file: what `up` was asked for and every process it started."""

    spec: dict[str, Any] = field(default_factory=dict)
    hosts: dict[str, HostProcs] = field(default_factory=dict)
    registries: dict[str, ProcRecord | None] = field(default_factory=dict)

    @classmethod
    def load(cls, sd: StateDir) -> State:
        try:
            data = json.loads(sd.state_file.read_text())
        except (OSError, ValueError):
            return cls()
        hosts = {name: HostProcs(ProcRecord.from_json(h.get("leader")),
                                 ProcRecord.from_json(h.get("dockerd")))
                 for name, h in data.get("hosts", {}).items()}
        regs = {name: ProcRecord.from_json(r) for name, r in data.get("registries", {}).items()}
        return cls(data.get("spec", {}), hosts, regs)

    def save(self, sd: StateDir) -> None:
        def rec(r: ProcRecord | None) -> dict[str, int] | None:
            return r.to_json() if r else None

        data = {
            "spec": self.spec,
            "hosts": {n: {"leader": rec(h.leader), "dockerd": rec(h.dockerd)} for n, h in self.hosts.items()},
            "registries": {n: rec(r) for n, r in self.registries.items()},
        }
        tmp = sd.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(sd.state_file)

    def topology(self) -> list[Host]:
        if not self.spec:
            return []
        return network.topology(int(self.spec["n"]), bool(self.spec["bastion"]))


def check_root() -> None:
    if os.geteuid() != 0:
        raise TestbedError("the testbed needs root (namespaces, bridges, iptables, dockerd): "
                           "run it as root, e.g. `sudo python3 scenarios/testbed/testbed.py ...`")


def missing_packages() -> list[str]:
    """Debian packages whose commands are missing, sorted."""
    def present(cmd: str) -> bool:
        return Path(cmd).exists() if cmd.startswith("/") else shutil.which(cmd, path=SEARCH_PATH) is not None

    return sorted({pkg for cmd, pkg in REQUIRED_COMMANDS.items() if not present(cmd)})


def check_commands(install: bool) -> None:
    """Make sure every command the testbed runs exists; install the packages if asked."""
    missing = missing_packages()
    if not missing:
        return
    line = "apt-get install -y " + " ".join(missing)
    if not install:
        raise TestbedError(f"missing commands; Debian packages {', '.join(missing)} provide them: "
                           f"run `apt-get update && {line}` (or pass --install-packages)")
    log(f"installing {' '.join(missing)}")
    run(["apt-get", "update"], timeout=900)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "install", "-y", *missing], timeout=1800, env=env)
    still = missing_packages()
    if still:
        raise TestbedError(f"still missing after apt-get install: {', '.join(still)}")


def known_hosts_of(state: State) -> list[Host]:
    """Hosts to tear down: those of the state file plus any rkn* namespace or cgroup left over."""
    hosts = {h.name: h for h in state.topology()}
    for name in network.namespaces():
        hosts.setdefault(name, Host(int(name[3:]), (), network.GATEWAY))
    cg = Path("/sys/fs/cgroup")
    for path in [*cg.glob("rkn*"), *cg.glob("*/rkn*")]:  # cgroup v2, then v1 controllers
        if network.NS_RE.match(path.name) and path.is_dir():
            hosts.setdefault(path.name, Host(int(path.name[3:]), (), network.GATEWAY))
    return sorted(hosts.values(), key=lambda h: h.index)


def teardown(sd: StateDir, state: State) -> None:
    """Stop every host and registry, remove the network; leave keys and registry storage."""
    for name, rec in sorted(state.registries.items()):
        if alive(rec):
            log(f"stopping {name}")
        stop_record(rec)
    hosts = known_hosts_of(state)
    if hosts:
        log(f"stopping {', '.join(h.name for h in hosts)}")
        nodes.stop_hosts(sd, [(h, state.hosts.get(h.name, HostProcs())) for h in hosts])
    network.remove_all()
    sd.state_file.unlink(missing_ok=True)


Wanted = tuple[str, Path | None, bool]


def registries_wanted(hosts: list[Host]) -> dict[str, Wanted]:
    """Registry processes: name -> (listen address, network namespace or None for the machine,
    whether it requires basic auth)."""
    wanted: dict[str, Wanted] = {"registry": (images.REGISTRY, None, False),
                                 "registry-auth": (images.AUTH_REGISTRY, None, True)}
    for h in hosts:
        if h.bastion:
            wanted["registry-bastion"] = (f"{h.links[1].address}:{network.REGISTRY_PORT}", h.netns, False)
    return wanted


def registry_answers(sd: StateDir, state: State, name: str, want: Wanted) -> bool:
    addr, ns, auth = want
    return alive(state.registries.get(name)) and images.registry_up(sd, addr, ns, auth)


def ensure_registries(sd: StateDir, state: State, hosts: list[Host]) -> list[str]:
    """(Re)start every wanted registry that does not answer; returns their names."""
    started = []
    for name, want in registries_wanted(hosts).items():
        if registry_answers(sd, state, name, want):
            continue
        stop_record(state.registries.get(name))
        addr, ns, auth = want
        state.registries[name] = images.start_registry(sd, name, addr, ns, auth)
        state.save(sd)
        started.append(name)
    return started


def healthy(sd: StateDir, state: State, hosts: list[Host]) -> list[str]:
    """What is wrong with a running testbed's hosts (empty when every host answers)."""
    problems = []
    bastion = next((h for h in hosts if h.bastion), None)
    for h in hosts:
        procs = state.hosts.get(h.name, HostProcs())
        if not alive(procs.leader) or not h.netns.exists() or not network.link_state(h):
            problems.append(f"{h.name} is not running")
        elif nodes.ssh_banner(h, bastion if h.private else None) is None:
            problems.append(f"{h.name}: sshd does not answer")
        elif nodes.docker_info(sd, h) is None:
            problems.append(f"{h.name}: dockerd does not answer")
    return problems


def create_testbed(sd: StateDir, spec: dict[str, Any], hosts: list[Host]) -> State:
    """Build the testbed from nothing: keys, users, network, hosts, registries; wait for all."""
    nodes.ensure_keys(sd, hosts)
    pubkey = Path(f"{sd.client_key}.pub")
    for user in sorted({DEFAULT_USER, spec["user"]}):
        nodes.ensure_user(user, pubkey)
    network.create(hosts)
    state = State(spec=spec)
    state.save(sd)  # from here on a failure leaves a state file that `down` can clean
    wanted = {sd.host_dir(h) for h in hosts}
    for stale in (d for d in sd.root.glob("n[0-9]*") if d not in wanted):
        shutil.rmtree(stale)  # a host of an earlier, larger testbed
    for h in hosts:
        nodes.prepare_host(sd, h, wipe=True)
        state.hosts[h.name] = HostProcs(leader=nodes.start_host(sd, h))
    state.save(sd)
    ensure_registries(sd, state, hosts)
    bastion = next((h for h in hosts if h.bastion), None)
    nodes.wait_ready(sd, hosts, bastion)
    for h in hosts:
        state.hosts[h.name] = HostProcs(state.hosts[h.name].leader, nodes.dockerd_record(sd, h))
    state.save(sd)
    return state


def cmd_up(sd: StateDir, args: argparse.Namespace) -> int:
    """`up N`: reuse a healthy testbed of the same shape, else clean up and build it afresh."""
    check_root()
    check_commands(args.install_packages)
    roles = clusteryml.parse_roles(args.roles, args.n)
    spec = {"n": args.n, "bastion": args.bastion, "user": args.nonroot_user or DEFAULT_USER}
    hosts = network.topology(args.n, args.bastion)
    sd.root.mkdir(parents=True, exist_ok=True)
    state = State.load(sd)
    problems = healthy(sd, state, hosts) if state.spec == spec else ["a different testbed"]
    if not problems and not args.fresh:
        log(f"testbed of {args.n} host(s) already up; reusing it")
        # A registry that died (or is new to this version of the testbed) needs no new hosts.
        restarted = ensure_registries(sd, state, hosts)
        if restarted:
            log(f"started {', '.join(restarted)}")
    else:
        if state.spec:
            log(f"rebuilding: {'; '.join(problems) if not args.fresh else '--fresh'}")
        teardown(sd, state)
        state = create_testbed(sd, spec, hosts)
    builder = next((h for h in hosts if h.bastion), hosts[0])  # on 10.77.0.0/24: reaches the registry
    pushed = images.ensure_images(sd, builder)
    log(f"images: {'pushed ' + ', '.join(pushed) if pushed else 'all present in the registry'}")
    known = nodes.write_known_hosts(sd, hosts)
    cfg = clusteryml.cluster_config(hosts, roles, spec["user"], sd.client_key)
    command = "testbed.py up " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    clusteryml.write_cluster_yml(sd.root / "cluster.yml", cfg, command)
    print(f"testbed up: {len(hosts)} host(s); cluster.yml {sd.root / 'cluster.yml'}; "
          f"key {sd.client_key}; known_hosts {known}")
    return 0


def cmd_down(sd: StateDir, _args: argparse.Namespace) -> int:
    """`down`: stop everything the testbed started and remove its network (idempotent)."""
    check_root()
    teardown(sd, State.load(sd))
    print("testbed down")
    return 0


def host_status(sd: StateDir, state: State, host: Host, bastion: Host | None) -> dict[str, Any]:
    procs = state.hosts.get(host.name, HostProcs())
    present = host.netns.exists()
    info = nodes.docker_info(sd, host) if present else None
    sshd = present and nodes.ssh_banner(host, bastion if host.private else None) is not None
    return {
        "name": host.name, "address": host.address, "bastion": host.bastion,
        "netns": present, "link_up": present and network.link_state(host),
        "sshd": sshd, "dockerd": info is not None,
        "containers": info.get("Containers") if info else None,
        "running": info.get("ContainersRunning") if info else None,
        "pid": procs.leader.pid if procs.leader and alive(procs.leader) else None,
    }


def cmd_status(sd: StateDir, args: argparse.Namespace) -> int:
    """`status [--json]`: per host and per registry, whether it answers; exit 1 unless all do."""
    check_root()
    state = State.load(sd)
    hosts = state.topology()
    bastion = next((h for h in hosts if h.bastion), None)
    rows = [host_status(sd, state, h, bastion) for h in hosts]
    regs = [{"name": name, "address": want[0], "auth": want[2],
             "up": registry_answers(sd, state, name, want)}
            for name, want in sorted(registries_wanted(hosts).items())] if hosts else []
    ok = bool(hosts) and all(r["sshd"] and r["dockerd"] for r in rows) and all(r["up"] for r in regs)
    report = {"state_dir": str(sd.root), "up": ok, "hosts": rows, "registries": regs}
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0 if ok else 1
    if not hosts:
        print(f"testbed not up (no state in {sd.root})")
        return 1
    yes = {True: "yes", False: "no"}
    print(f"{'host':6} {'address':11} {'netns':5} {'link':4} {'sshd':4} {'dockerd':7} containers")
    for r in rows:
        count = "-" if r["containers"] is None else f"{r['containers']} ({r['running']} running)"
        print(f"{r['name']:6} {r['address']:11} {yes[r['netns']]:5} {yes[r['link_up']]:4} "
              f"{yes[r['sshd']]:4} {yes[r['dockerd']]:7} {count}")
    for r in regs:
        auth = f" (basic auth, user {images.AUTH_USER})" if r["auth"] else ""
        print(f"{r['name']} {r['address']}: {'up' if r['up'] else 'DOWN'}{auth}")
    return 0 if ok else 1


def pick_host(state: State, index: int) -> Host:
    for h in state.topology():
        if h.index == index:
            return h
    raise TestbedError(f"no host {index} in the testbed (state: {state.spec or 'not up'})")


def cmd_stop_host(sd: StateDir, args: argparse.Namespace) -> int:
    """`stop-host I [--hard]`: stop one host's sshd + dockerd (and its containers)."""
    check_root()
    state = State.load(sd)
    host = pick_host(state, args.index)
    nodes.stop_hosts(sd, [(host, state.hosts.get(host.name, HostProcs()))], graceful=not args.hard)
    state.hosts[host.name] = HostProcs()
    state.save(sd)
    print(f"{host.name} stopped")
    return 0


def cmd_start_host(sd: StateDir, args: argparse.Namespace) -> int:
    """`start-host I`: start a stopped host again, keeping its disks (like a reboot)."""
    check_root()
    state = State.load(sd)
    host = pick_host(state, args.index)
    if alive(state.hosts.get(host.name, HostProcs()).leader):
        print(f"{host.name} already running")
        return 0
    nodes.prepare_host(sd, host, wipe=False)
    leader = nodes.start_host(sd, host)
    state.hosts[host.name] = HostProcs(leader)
    state.save(sd)
    if host.bastion:
        addr, ns, auth = registries_wanted([host])["registry-bastion"]
        state.registries["registry-bastion"] = images.start_registry(sd, "registry-bastion", addr, ns, auth)
    bastion = next((h for h in state.topology() if h.bastion), None)
    nodes.wait_ready(sd, [host], bastion)
    state.hosts[host.name] = HostProcs(leader, nodes.dockerd_record(sd, host))
    state.save(sd)
    print(f"{host.name} started")
    return 0


def cmd_link(sd: StateDir, args: argparse.Namespace) -> int:
    """`partition I` / `heal I`: take the host's veth(s) down or up."""
    check_root()
    host = pick_host(State.load(sd), args.index)
    network.set_link(host, up=args.command == "heal")
    print(f"{host.name} {'healed' if args.command == 'heal' else 'partitioned'}")
    return 0


def running_leader(state: State, host: Host) -> ProcRecord:
    leader = state.hosts.get(host.name, HostProcs()).leader
    if not alive(leader):
        raise TestbedError(f"{host.name} is not running (start-host {host.index} first)")
    assert leader is not None
    return leader


def cmd_daemon(sd: StateDir, args: argparse.Namespace) -> int:
    """`stop-sshd|start-sshd|stop-dockerd|start-dockerd I`: one daemon of a running host."""
    check_root()
    state = State.load(sd)
    host = pick_host(state, args.index)
    leader = running_leader(state, host)
    action, daemon = args.command.split("-")
    if daemon == "sshd":
        bastion = next((h for h in state.topology() if h.bastion), None)
        if action == "stop":
            nodes.stop_sshd(host)
        else:
            nodes.start_sshd(sd, host, leader, bastion)
    else:
        recorded = state.hosts[host.name].dockerd
        if action == "stop":
            nodes.stop_dockerd(sd, host, recorded)
            state.hosts[host.name] = HostProcs(leader)
        else:
            state.hosts[host.name] = HostProcs(leader, nodes.start_dockerd(sd, host, leader))
        state.save(sd)
    print(f"{host.name}: {daemon} {'stopped' if action == 'stop' else 'started'}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="testbed.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-dir", default=os.environ.get("RKEL_TESTBED_DIR", DEFAULT_STATE_DIR),
                   help="state directory (default $RKEL_TESTBED_DIR or %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="bring up N hosts, the registry and the images (idempotent)")
    up.add_argument("n", type=int, help="number of hosts (rkn1..rknN)")
    up.add_argument("--nonroot-user", metavar="NAME", default=None,
                    help=f"SSH user for cluster.yml, created in group docker (default {DEFAULT_USER}, "
                         "which is always created)")
    up.add_argument("--bastion", action="store_true",
                    help="hosts on a private bridge (10.78.0.0/24) reachable only through bastion rkn0")
    up.add_argument("--roles", default=None, metavar="SPEC",
                    help="roles per node, e.g. 'cp,etcd,worker;etcd;worker': ';' between nodes, "
                         f"the last repeats (default: {clusteryml.DEFAULT_ROLES_HELP})")
    up.add_argument("--install-packages", action="store_true",
                    help="apt-get install the Debian packages that are missing")
    up.add_argument("--fresh", action="store_true", help="rebuild even when a healthy testbed is up")
    sub.add_parser("down", help="stop everything the testbed started (idempotent)")
    st = sub.add_parser("status", help="per host: netns, link, sshd, dockerd, containers")
    st.add_argument("--json", action="store_true")
    for name, text in (("stop-host", "stop one host's sshd and dockerd"),
                       ("start-host", "start a stopped host again"),
                       ("partition", "cut a host off the network (veth down)"),
                       ("heal", "reconnect a partitioned host (veth up)"),
                       ("stop-sshd", "kill one host's sshd and its sessions (dockerd stays)"),
                       ("start-sshd", "start a host's sshd again"),
                       ("stop-dockerd", "stop one host's dockerd and its containers (sshd stays)"),
                       ("start-dockerd", "start a host's dockerd again")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("index", type=int, help="host number I (rknI; 0 = bastion)")
        if name == "stop-host":
            cmd.add_argument("--hard", action="store_true", help="SIGKILL at once (power loss)")
    return p


COMMANDS = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "stop-host": cmd_stop_host,
            "start-host": cmd_start_host, "partition": cmd_link, "heal": cmd_link,
            "stop-sshd": cmd_daemon, "start-sshd": cmd_daemon, "stop-dockerd": cmd_daemon,
            "start-dockerd": cmd_daemon}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sd = StateDir(Path(args.state_dir).resolve())
    try:
        if args.command != "status":
            check_root()
            sd.root.mkdir(parents=True, exist_ok=True)
            # One testbed command at a time per state dir (tests may start several).
            lock = open(sd.root / "lock", "w")
            fcntl.flock(lock, fcntl.LOCK_EX)
        return COMMANDS[args.command](sd, args)
    except (TestbedError, ValueError) as exc:
        print(f"testbed: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("testbed: interrupted; run `testbed.py down` to clean up", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
