"""`rkel doctor`: the checks a user reads before a run, on the Simulated backend and through the
real `rkel` process; the parsers against real tool output."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from lifecycle import doctor
from lifecycle.config import load_config_text
from lifecycle.errors import HostUnreachableError
from lifecycle.hosts import Container
from lifecycle.hosts.simulated import SimContainer, SimWorld
from lifecycle.spec import NodeRef, ServiceSpec
from tests.test_cli import EXAMPLES, no_traceback, rkel

CLUSTER = """\
nodes:
  - {address: 10.0.0.1, hostname_override: cp, user: rkel, role: [controlplane, etcd]}
  - {address: 10.0.0.2, hostname_override: w1, user: rkel, role: [worker]}
"""


def config(extra: str = ""):
    return load_config_text(CLUSTER + extra).config


def checks(report: doctor.Report, host: str) -> dict[str, doctor.Check]:
    found = next(h for h in report.hosts if h.node == host)
    return {c.name: c for c in found.checks}


def failed(report: doctor.Report) -> list[tuple[str, str]]:
    return sorted((h.node, c.name) for h in report.hosts for c in h.failed)


# ---------------------------------------------------------------------------- parsers
PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 20512 1 0000000000000000 100 0 0 10 0
   1: 0100007F:2A09 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 30871 1 0000000000000000 100 0 0 10 0
   2: 0B004D0A:0016 01004D0A:D2F4 01 00000000:00000000 02:0009AF6E 00000000     0        0 41264 2 0000000000000000 20 4 30 10 -1
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:280A 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 30901 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 06 00000000:00000000 03:00000F9C 00000000     0        0 0 3 0000000000000000
"""


def test_listening_ports_are_read_from_proc_net_tcp_and_tcp6() -> None:
    # 22 and 10761 (127.0.0.1) listen on IPv4, 10250 on IPv6; an established SSH session
    # (port 22 again, state 01) and a TIME_WAIT socket (8080, 06) are not listeners.
    assert doctor.parse_listening(PROC_NET_TCP) == {22, 10761, 10250}


def test_df_epoch_and_docker_version_parsers() -> None:
    df = ("Filesystem     1024-blocks     Used Available Capacity Mounted on\n"
          "/dev/vda         264212084 26804916  79585996      26% /\n")
    assert doctor.parse_df(df) == 79585996 * 1024
    assert doctor.parse_df("df: /nope: No such file or directory\n") is None
    assert doctor.parse_epoch("1718000000.123456789\n") == (1718000000.123456789, 0.0)
    assert doctor.parse_epoch("1718000000.N\n") == (1718000000.0, 1.0)  # busybox date
    assert doctor.parse_epoch("Thu Jun 13 2024") is None
    assert doctor.parse_docker_version("20.10.24+dfsg1") == (20, 10, 24)
    assert doctor.parse_docker_version("26.1.4") == (26, 1, 4)
    assert doctor.parse_docker_version("unknown") is None


# ---------------------------------------------------------------------------- on simulated hosts
def test_fresh_hosts_pass_every_check() -> None:
    world = SimWorld()
    report = doctor.run_doctor(world.backend(), config())
    assert report.exit_code == 0
    assert [h.node for h in report.hosts] == ["cp", "w1"]
    assert list(checks(report, "cp")) == ["ssh", "docker", "ports", "clock",
                                         "disk /var/lib/etcd", "disk /var/lib/docker"]
    assert "disk /var/lib/etcd" not in checks(report, "w1")  # not an etcd node
    assert "2379" in checks(report, "cp")["ports"].detail
    assert "2379" not in checks(report, "w1")["ports"].detail


def test_a_foreign_listener_on_a_needed_port_fails_with_the_port_and_what_to_do() -> None:
    world = SimWorld()
    world.set_host_facts("w1", listening=[22, 10250, 2379])  # 2379 is not needed on a worker
    report = doctor.run_doctor(world.backend(), config())
    assert report.exit_code == 7
    assert failed(report) == [("w1", "ports")]
    ports = checks(report, "w1")["ports"]
    assert "10250 (kubelet)" in ports.detail and "2379" not in ports.detail
    assert "10.0.0.2" in ports.fix and "sport = :10250" in ports.fix
    text = doctor.report_text(report)
    assert "To fix:" in text and "w1 ports:" in text
    assert text.splitlines()[-1] == "1 check(s) failed on w1."


def test_ports_held_by_rkels_own_running_containers_are_fine_but_not_a_lookalike() -> None:
    world = SimWorld()
    world.run_container("cp", ServiceSpec("etcd", "rancher/mirrored-coreos-etcd:v3.5.12"), [])
    world.run_container("cp", ServiceSpec("kubelet", "rancher/hyperkube:v1.30.5-rancher1"), [])
    report = doctor.run_doctor(world.backend(), config())
    assert report.exit_code == 0
    assert "2379 2380 10248 10250 used by rkel" in checks(report, "cp")["ports"].detail
    # a container named like rkel's but not made by rkel (no spec-hash label) is a conflict
    world.hosts["w1"].containers["kubelet"] = SimContainer("kubelet", "someone/kubelet", "", True)
    report = doctor.run_doctor(world.backend(), config())
    assert failed(report) == [("w1", "ports")]
    # and a stopped rkel container holds no port, so a listener there is someone else's
    world.set_running("cp", "etcd", False)
    world.set_host_facts("cp", listening=[2379])
    assert ("cp", "ports") in failed(doctor.run_doctor(world.backend(), config()))


def test_the_set_aside_copy_of_a_replacement_counts_as_rkels_own_and_skipped_hosts_are_not_checked() -> None:
    # a host that died mid-replacement comes back with `old-kubelet` running (restart=always)
    world = SimWorld()
    world.set_host_facts("w1", listening=[10248, 10250])
    world.hosts["w1"].containers["old-kubelet"] = SimContainer(
        "old-kubelet", "rancher/hyperkube:v1.30.5-rancher1", "hash-of-the-old-spec", True)
    report = doctor.run_doctor(world.backend(), config())
    assert report.exit_code == 0, failed(report)
    assert "10248 10250 used by rkel" in checks(report, "w1")["ports"].detail
    world.hosts["w1"].containers["old-kubelet"] = SimContainer(
        "old-kubelet", "someone/kubelet", "", True)  # not rkel's: no spec-hash label
    assert failed(doctor.run_doctor(world.backend(), config())) == [("w1", "ports")]
    # a container the state manages without rkel's label (adopted from RKE) is rkel's too
    assert doctor.run_doctor(world.backend(), config(),
                             managed={"w1": {"old-kubelet"}}).exit_code == 0
    # apply skips the nodes it already found unavailable
    assert [h.node for h in doctor.run_doctor(world.backend(), config(), skip={"w1"}).hosts] == ["cp"]


def test_old_docker_fails_unless_ignore_docker_version() -> None:
    world = SimWorld()
    world.set_host_facts("cp", docker_version="19.03.15")
    report = doctor.run_doctor(world.backend(), config())
    assert failed(report) == [("cp", "docker")]
    assert "upgrade Docker Engine to 20.10" in checks(report, "cp")["docker"].fix
    relaxed = doctor.run_doctor(world.backend(), config("ignore_docker_version: true\n"))
    assert relaxed.exit_code == 0
    assert "ignore_docker_version" in checks(relaxed, "cp")["docker"].detail


@pytest.mark.parametrize(("offset", "ok"), [(0.4, True), (-0.9, True), (3.0, False), (-75.0, False)])
def test_clock_skew_beyond_a_second_fails(offset: float, ok: bool) -> None:
    world = SimWorld()
    world.set_host_facts("w1", clock_offset=offset)
    clock = checks(doctor.run_doctor(world.backend(), config()), "w1")["clock"]
    assert clock.ok is ok
    assert f"{abs(offset):.1f}" in clock.detail
    assert ("behind" if offset < 0 else "ahead of") in clock.detail
    if not ok:
        assert "NTP" in clock.fix


def test_low_disk_fails_per_path_and_etcd_space_only_on_etcd_nodes() -> None:
    world = SimWorld()
    world.set_host_facts("cp", disk_free={"/var/lib/etcd": 1 << 30})
    world.set_host_facts("w1", disk_free={"/var/lib": 1 << 30})  # docker and etcd dirs alike
    report = doctor.run_doctor(world.backend(), config())
    assert failed(report) == [("cp", "disk /var/lib/etcd"), ("w1", "disk /var/lib/docker")]
    assert "1.0 GiB free" in checks(report, "cp")["disk /var/lib/etcd"].detail
    # RKE's prefix_path moves etcd's data
    moved = doctor.run_doctor(world.backend(), config("prefix_path: /opt/k8s\n"))
    assert "disk /opt/k8s/var/lib/etcd" in checks(moved, "cp")


def test_an_unreachable_host_is_exit_6_and_every_other_host_is_still_checked() -> None:
    world = SimWorld()
    world.set_reachable("cp", False)
    world.set_host_facts("w1", clock_offset=30.0)
    report = doctor.run_doctor(world.backend(), config())
    assert report.exit_code == 6
    cp = checks(report, "cp")
    assert not cp["ssh"].ok and "address, port, user and SSH key" in cp["ssh"].fix
    assert all(c.skipped for name, c in cp.items() if name != "ssh")
    assert failed(report) == [("cp", "ssh"), ("w1", "clock")]


class Shell:
    """A host whose commands answer from a table (exit, stdout, stderr); others exit 127."""

    name = "n1"

    def __init__(self, answers: dict[str, tuple[int, str, str]], lose_after: int = 0) -> None:
        self.answers = answers
        self.ran: list[str] = []
        self.lose_after = lose_after

    def containers(self) -> dict[str, Container]:
        return {}

    def run_command(self, command: str, timeout: float = 60) -> tuple[int, str, str]:
        self.ran.append(command)
        if self.lose_after and len(self.ran) > self.lose_after:
            raise HostUnreachableError(self.name, "running a command over SSH failed: EOF")
        return self.answers.get(command, (127, "", f"sh: {command.split()[0]}: not found\n"))


class OneHost:
    def __init__(self, host: Shell) -> None:
        self.the_host = host

    def host(self, node: NodeRef) -> Shell:
        return self.the_host


DF = "Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/sda1 100 50 {} 50% /var\n"


def test_space_is_measured_where_the_etcd_dir_will_be_and_unreadable_facts_fail() -> None:
    node = config().nodes[0]
    shell = Shell({
        "df -Pk /var/lib/etcd": (1, "", "df: /var/lib/etcd: No such file or directory\n"),
        "df -Pk /var/lib": (0, DF.format(3 * 1024 * 1024), ""),
        "date +%s.%N": (0, "garbage\n", ""),
    })
    report = doctor.check_host(OneHost(shell), node, config())
    got = {c.name: c for c in report.checks}
    assert got["disk /var/lib/etcd"].ok and "3.0 GiB free" in got["disk /var/lib/etcd"].detail
    assert not got["docker"].ok and "not found" in got["docker"].detail
    assert not got["clock"].ok and "garbage" in got["clock"].detail
    assert not got["ports"].ok and "cannot read" in got["ports"].detail
    assert report.reachable  # it answered; the facts it could not give are failures (exit 7)


def test_a_connection_lost_while_checking_counts_as_unreachable() -> None:
    report = doctor.check_host(OneHost(Shell({}, lose_after=2)), config().nodes[0], config())
    assert not report.reachable and "EOF" in report.checks[0].detail


# ---------------------------------------------------------------------------- the command
@pytest.fixture
def sim_cluster(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.yml"
    path.write_text((EXAMPLES / "three-node.yml").read_text())
    return path


def test_rkel_doctor_json_and_exit_codes(sim_cluster: Path) -> None:
    ok = rkel("-c", str(sim_cluster), "-o", "json", "doctor", "--backend", "simulated")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["ok"] is True and [h["node"] for h in data["hosts"]] == ["cp-1", "etcd-2", "etcd-3"]
    assert all(c["ok"] for h in data["hosts"] for c in h["checks"])

    world_path = sim_cluster.with_name("cluster.rkel.world.json")
    world = SimWorld.load(world_path)
    world.set_host_facts("etcd-3", listening=[2380])
    bad = rkel("-c", str(sim_cluster), "doctor", "--backend", "simulated")
    assert bad.returncode == 7
    assert "etcd-3  ports" in bad.stdout and "2380 (etcd)" in bad.stdout
    assert "To fix:" in bad.stdout
    no_traceback(bad)

    world.set_reachable("cp-1", False)
    gone = rkel("-c", str(sim_cluster), "-o", "json", "doctor", "--backend", "simulated")
    assert gone.returncode == 6
    hosts = {h["node"]: h for h in json.loads(gone.stdout)["hosts"]}
    assert hosts["cp-1"]["reachable"] is False and hosts["etcd-3"]["ok"] is False


def test_rkel_doctor_with_a_bad_cluster_yml_is_a_clear_error(tmp_path: Path) -> None:
    missing = rkel("-c", str(tmp_path / "nope.yml"), "doctor", "--backend", "simulated")
    assert missing.returncode == 2 and "nope.yml" in missing.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text(textwrap.dedent("""\
        nodes:
          - {address: 10.0.0.1, user: rkel, role: [boss]}
        """))
    result = rkel("-c", str(bad), "doctor", "--backend", "simulated")
    assert result.returncode == 2 and "boss" in result.stderr
    for r in (missing, result):
        no_traceback(r)


def test_doctor_on_real_hosts_reports_an_unreachable_address(tmp_path: Path) -> None:
    # nothing listens on port 1: the SSH backend's connect is refused at once
    path = tmp_path / "cluster.yml"
    path.write_text("nodes:\n  - {address: 127.0.0.1, port: 1, user: rkel, "
                    "role: [controlplane, etcd, worker], ssh_key_path: /nonexistent/key}\n")
    result = rkel("-c", str(path), "doctor", timeout=60)
    assert result.returncode == 6, result.stdout + result.stderr
    assert "127.0.0.1" in result.stdout and "FAIL" in result.stdout
    no_traceback(result)
