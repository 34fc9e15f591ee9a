"""Testbed hosts: keys, SSH users, per-host directories, and starting/stopping sshd + dockerd.

A host is `nsenter --net=/run/netns/rknI unshare -m -u --propagation private sh node.sh`, started
as a session leader (its pid is its process group). node.sh bind-mounts the host's own /run,
/etc/kubernetes, /var/lib/etcd and /opt/rke, /etc/hosts (its own name) and /etc/resolv.conf (no
name server), then runs dockerd and sshd (TESTBED.md).
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from network import PRIVATE_NET, PUBLIC_NET, Host
from procs import (
    ProcRecord,
    TestbedError,
    cgroup_pids,
    kill_pids,
    launch,
    log,
    netns_pids,
    record_of,
    remove_cgroups,
    run,
    signal_record,
    wait_gone,
)

SSHD = "/usr/sbin/sshd"
DOCKER_CLI = "/usr/bin/docker"  # Debian's CLI, the same release as the hosts' engines
# Per-host directories over the paths rkel's containers bind (the hosts share one filesystem).
BIND_DIRS = {"etc-kubernetes": "/etc/kubernetes", "var-lib-etcd": "/var/lib/etcd", "opt-rke": "/opt/rke",
             "var-lib-kubelet": "/var/lib/kubelet", "var-lib-rancher": "/var/lib/rancher",
             "var-lib-cni": "/var/lib/cni", "docker": "/var/lib/docker"}


@dataclass(frozen=True)
class StateDir:
    """Where the testbed keeps its keys, host directories, registry storage and state file."""

    root: Path

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def client_key(self) -> Path:
        return self.keys / "id_ed25519"

    @property
    def authorized_keys(self) -> Path:
        return self.keys / "authorized_keys"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def registry_auth(self) -> Path:
        """The auth registry's credentials (0700): `password` (0600, kept) and `htpasswd`."""
        return self.registry / "auth"

    @property
    def registry_password(self) -> Path:
        return self.registry_auth / "password"

    def host_key(self, host: Host) -> Path:
        return self.keys / f"host_{host.name}_ed25519"

    def host_dir(self, host: Host) -> Path:
        return self.root / f"n{host.index}"

    def docker_sock(self, host: Host) -> Path:
        return self.host_dir(host) / "run" / "docker.sock"


def ensure_keys(sd: StateDir, hosts: list[Host]) -> None:
    """Generate the client key pair and each host's host key once; rewrite authorized_keys."""
    sd.keys.mkdir(parents=True, exist_ok=True)
    os.chmod(sd.keys, 0o700)
    wanted = [(sd.client_key, "rkel-testbed-client")] + [(sd.host_key(h), h.name) for h in hosts]
    for path, comment in wanted:
        if not path.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    sd.authorized_keys.write_text(Path(f"{sd.client_key}.pub").read_text())
    os.chmod(sd.authorized_keys, 0o600)


def write_known_hosts(sd: StateDir, hosts: list[Host]) -> Path:
    """A known_hosts file naming every address of every host with its host key."""
    lines = []
    for host in hosts:
        key = " ".join(Path(f"{sd.host_key(host)}.pub").read_text().split()[:2])
        lines += [f"{link.address} {key}" for link in host.links]
    path = sd.root / "known_hosts"
    path.write_text("\n".join(lines) + "\n")
    return path


def ensure_user(name: str, pubkey: Path) -> None:
    """Create (or complete) the non-root SSH user: group docker, unlocked, key authorized."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        run(["useradd", "-m", "-s", "/bin/bash", "-G", "docker", name])
    run(["usermod", "-a", "-G", "docker", name])
    shadow = run(["getent", "shadow", name]).stdout.split(":")
    if len(shadow) > 1 and shadow[1].startswith("!"):
        # sshd (UsePAM no) refuses a locked account; '*' = no password, but not locked.
        run(["usermod", "-p", "*", name])
    entry = pwd.getpwnam(name)
    ssh_dir = Path(entry.pw_dir) / ".ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True)
    auth = ssh_dir / "authorized_keys"
    auth.write_text(pubkey.read_text())
    for path, mode in ((ssh_dir, 0o700), (auth, 0o600)):
        os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chmod(path, mode)


def prepare_host(sd: StateDir, host: Host, wipe: bool) -> None:
    """Create (after wiping, if asked) the host's directories, sshd_config, daemon.json, node.sh."""
    hdir = sd.host_dir(host)
    if wipe and hdir.exists():
        shutil.rmtree(hdir)
    for sub in ["run", "docker", *BIND_DIRS]:
        (hdir / sub).mkdir(parents=True, exist_ok=True)
    (hdir / "sshd_config").write_text(sshd_config(sd, host))
    # Our own daemon.json keeps the machine's /etc/docker/daemon.json out. The runtime is runc
    # behind runc_shim.py, which drops capabilities the machine itself lacks (privileged
    # containers would fail to start otherwise).
    shim = sd.root / "runc_shim.py"
    shutil.copy2(Path(__file__).with_name("runc_shim.py"), shim)
    shim.chmod(0o755)
    daemon = {"runtimes": {"testbed-runc": {"path": str(shim)}}, "default-runtime": "testbed-runc"}
    (hdir / "daemon.json").write_text(json.dumps(daemon, indent=2) + "\n")
    (hdir / "hosts").write_text(f"127.0.0.1 localhost\n{host.address} {host.name}\n")
    (hdir / "resolv.conf").write_text(RESOLV_CONF)
    (hdir / "node.sh").write_text(node_script(sd, host))


# No name server is reachable from a host (the machine's own is not: traffic to it would be
# dropped, and every lookup of a name not in /etc/hosts would wait out resolver timeouts, 2 x 5 s
# by default, in the host and in its containers). Asking 127.0.0.1, where nothing listens, fails
# at once, as on a host whose resolver answers "no such name".
RESOLV_CONF = "# rkel testbed host (generated): no name server\nnameserver 127.0.0.1\noptions timeout:1 attempts:1\n"


def sshd_config(sd: StateDir, host: Host) -> str:
    """sshd_config of a host: key-only logins, root by key, TCP forwarding for bastion use."""
    return "\n".join([
        "# rkel testbed host " + host.name + " (generated)",
        "Port 22",
        f"HostKey {sd.host_key(host)}",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "PidFile none",
        "StrictModes no",
        f"AuthorizedKeysFile {sd.authorized_keys} .ssh/authorized_keys",
        "AllowTcpForwarding yes",
        "PrintMotd no",
        "Subsystem sftp internal-sftp",
        "",
    ])


def node_script(sd: StateDir, host: Host) -> str:
    """The host's init: private mounts, then dockerd and sshd as children; it stays up (and
    with it the host's namespaces) until the host is stopped, whatever its daemons do."""
    h = shlex.quote(str(sd.host_dir(host)))
    binds = "\n".join(f"mount --bind {h}/{src} {dst}" for src, dst in BIND_DIRS.items())
    dockerd = shlex.join(dockerd_command(sd, host))
    return f"""#!/bin/sh
# rkel testbed host {host.name} (generated): runs inside its own net, mount and UTS namespaces.
set -e
hostname {host.name}
mkdir -p {" ".join(BIND_DIRS.values())}
mount --bind {h}/run /run
mkdir -p /run/sshd
chmod 0755 /run/sshd
{binds}
# its own name in /etc/hosts, and no name server (host networking gives containers these too)
mount --bind {h}/hosts /etc/hosts
mount --bind {h}/resolv.conf /etc/resolv.conf
# As on a systemd host, mounts are shared (within this namespace only: it was made private
# first), so the kubelet's `:shared` and `:rslave` binds work.
mount --make-rshared /
{dockerd} >>{h}/dockerd.log 2>&1 &
{shlex.join(sshd_command(sd, host))} >>{h}/sshd.log 2>&1 &
# The host lives on while a daemon is stopped and started again (stop-sshd, stop-dockerd).
while :; do sleep 3600; done
"""


def dockerd_command(sd: StateDir, host: Host) -> list[str]:
    """The host's dockerd, as node.sh starts it (and `start-dockerd` again)."""
    h = str(sd.host_dir(host))
    return [
        "dockerd", f"--config-file={h}/daemon.json", f"--data-root={h}/docker",
        "-H", "unix:///run/docker.sock", "--bridge=none", "--iptables=false", "--ip-masq=false",
        "--exec-root=/run/docker-exec", "--pidfile=/run/docker.pid", f"--cgroup-parent={host.name}",
        f"--insecure-registry={PUBLIC_NET}.0/24", f"--insecure-registry={PRIVATE_NET}.0/24",
    ]


def sshd_command(sd: StateDir, host: Host) -> list[str]:
    """The host's sshd, as node.sh starts it (and `start-sshd` again)."""
    return [SSHD, "-D", "-e", "-f", str(sd.host_dir(host) / "sshd_config")]


def start_host(sd: StateDir, host: Host) -> ProcRecord:
    """Launch the host's node.sh in its namespaces; returns the session leader's record."""
    hdir = sd.host_dir(host)
    for stale in ("docker.pid", "docker.sock"):
        (hdir / "run" / stale).unlink(missing_ok=True)
    cmd = ["nsenter", f"--net={host.netns}", "unshare", "-m", "-u", "--propagation", "private",
           "/bin/sh", str(hdir / "node.sh")]
    return launch(cmd, hdir / "node.log")


def dockerd_record(sd: StateDir, host: Host) -> ProcRecord | None:
    """The host's dockerd from its pid file, only if that pid lives in the host's namespace."""
    try:
        pid = int((sd.host_dir(host) / "run" / "docker.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    if pid not in netns_pids(host.netns):
        return None
    return record_of(pid)


_BANNER_PROBE = (
    "import socket,sys\n"
    "s=socket.create_connection((sys.argv[1],22),timeout=float(sys.argv[2]))\n"
    "s.settimeout(float(sys.argv[2]))\n"
    "print(s.recv(256).decode(errors='replace').strip())\n"
)


def ssh_banner(host: Host, via: Host | None = None, timeout: float = 2.0) -> str | None:
    """sshd's banner on host:22, probed from the machine or from inside the bastion `via`."""
    if via is None:
        try:
            with socket.create_connection((host.address, 22), timeout=timeout) as sock:
                sock.settimeout(timeout)
                banner = sock.recv(256).decode(errors="replace").strip()
        except OSError:
            return None
    else:
        cmd = ["nsenter", f"--net={via.netns}", sys.executable, "-c", _BANNER_PROBE,
               host.address, str(timeout)]
        try:
            banner = run(cmd, check=False, timeout=timeout + 10).stdout.strip()
        except TestbedError:
            return None
    return banner if banner.startswith("SSH-") else None


def docker_info(sd: StateDir, host: Host, timeout: float = 10) -> dict[str, Any] | None:
    """`docker info` of the host's engine through its socket, or None when it does not answer."""
    sock = sd.docker_sock(host)
    if not sock.exists():
        return None
    cmd = [DOCKER_CLI, "-H", f"unix://{sock}", "info", "--format", "{{json .}}"]
    try:
        res = run(cmd, check=False, timeout=timeout)
    except TestbedError:
        return None
    if res.returncode != 0:
        return None
    try:
        info = json.loads(res.stdout)
    except ValueError:
        return None
    return None if info.get("ServerErrors") else info


def wait_ready(sd: StateDir, hosts: list[Host], via: Host | None, timeout: float = 120) -> None:
    """Wait until every host's sshd answers on port 22 and its dockerd answers `docker info`."""
    pending = list(hosts)
    deadline = time.monotonic() + timeout
    while pending:
        pending = [h for h in pending
                   if ssh_banner(h, via if h.private else None) is None or docker_info(sd, h) is None]
        if not pending:
            return
        if time.monotonic() >= deadline:
            names = ", ".join(f"{h.name} (see {sd.host_dir(h)}/*.log)" for h in pending)
            raise TestbedError(f"hosts not ready after {timeout:.0f}s: {names}")
        time.sleep(0.5)


@dataclass(frozen=True)
class HostProcs:
    """What the testbed recorded for a running host: node.sh (session leader) and dockerd."""

    leader: ProcRecord | None = None
    dockerd: ProcRecord | None = None


def stop_hosts(sd: StateDir, entries: list[tuple[Host, HostProcs]], graceful: bool = True,
               timeout: float = 30) -> None:
    """Stop hosts: SIGTERM dockerd (graceful), wait, then SIGKILL the rest of each host.

    The rest = processes in the host's cgroups (containers), its process group (node.sh, sshd)
    and its network namespace (containerd, shims, SSH sessions: they left the process group).
    """
    dockerds = [dockerd_record(sd, host) or procs.dockerd for host, procs in entries]
    if graceful:
        for rec in dockerds:
            signal_record(rec, signal.SIGTERM)
        if not wait_gone(dockerds, timeout):
            log(f"a dockerd did not stop within {timeout:.0f}s; killing it")
    for host, procs in entries:
        kill_pids(cgroup_pids(host.name))
        signal_record(procs.dockerd, signal.SIGKILL)
        signal_record(procs.leader, signal.SIGKILL, group=True)
    wait_gone([p for _, procs in entries for p in (procs.leader, procs.dockerd)], 5)
    leftovers: list[str] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        killed = [k for host, _ in entries
                  for k in kill_pids(cgroup_pids(host.name) | netns_pids(host.netns))]
        if not killed:
            break
        leftovers += killed
        time.sleep(0.3)
    if leftovers:
        log(f"SIGKILLed what was left in the hosts' cgroups and namespaces: {' '.join(leftovers)}")
    for host, _ in entries:
        remove_cgroups(host.name)


def daemon_pids(host: Host, exe: str) -> set[int]:
    """Pids in the host's network namespace running `exe` (sshd: the listener and its sessions)."""
    found = set()
    for pid in netns_pids(host.netns):
        try:
            if os.readlink(f"/proc/{pid}/exe") == exe:
                found.add(pid)
        except OSError:
            continue
    return found


def in_host(leader: ProcRecord, cmd: list[str]) -> list[str]:
    """`cmd` inside a running host's namespaces (network, its private mounts, hostname)."""
    return ["nsenter", f"--target={leader.pid}", "--mount", "--net", "--uts", *cmd]


def stop_sshd(host: Host) -> None:
    """Kill the host's sshd and every SSH session it serves, as a crashed SSH service would."""
    deadline = time.monotonic() + 10
    while pids := daemon_pids(host, SSHD):
        kill_pids(pids)
        if time.monotonic() > deadline:
            raise TestbedError(f"{host.name}: sshd pids {sorted(pids)} survive SIGKILL")
        time.sleep(0.1)


def start_sshd(sd: StateDir, host: Host, leader: ProcRecord, via: Host | None) -> None:
    if daemon_pids(host, SSHD):
        return
    launch(in_host(leader, sshd_command(sd, host)), sd.host_dir(host) / "sshd.log")
    deadline = time.monotonic() + 30
    while ssh_banner(host, via if host.private else None) is None:
        if time.monotonic() > deadline:
            raise TestbedError(f"{host.name}: sshd did not answer again (see {sd.host_dir(host)}/sshd.log)")
        time.sleep(0.3)


def stop_dockerd(sd: StateDir, host: Host, recorded: ProcRecord | None, timeout: float = 30) -> None:
    """Stop the host's dockerd as `systemctl stop docker` does: SIGTERM, which stops its containers."""
    rec = dockerd_record(sd, host) or recorded
    signal_record(rec, signal.SIGTERM)
    if not wait_gone([rec], timeout):
        log(f"{host.name}: dockerd did not stop within {timeout:.0f}s; killing it")
        signal_record(rec, signal.SIGKILL)
        wait_gone([rec], 5)
    kill_pids(cgroup_pids(host.name))


def start_dockerd(sd: StateDir, host: Host, leader: ProcRecord) -> ProcRecord | None:
    current = dockerd_record(sd, host)
    if current is not None:
        return current
    for stale in ("docker.pid", "docker.sock"):
        (sd.host_dir(host) / "run" / stale).unlink(missing_ok=True)
    launch(in_host(leader, dockerd_command(sd, host)), sd.host_dir(host) / "dockerd.log")
    deadline = time.monotonic() + 60
    while docker_info(sd, host) is None:
        if time.monotonic() > deadline:
            raise TestbedError(f"{host.name}: dockerd did not answer again (see {sd.host_dir(host)}/dockerd.log)")
        time.sleep(0.3)
    return dockerd_record(sd, host)
