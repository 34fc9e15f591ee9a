"""`rkel doctor` against the real testbed hosts (sshd, Docker Engines, /proc, date, df), as the
non-root docker-group user `rkel`.

One story on rkn1..rkn3: every check passes on fresh hosts; a stranger listening on the
kubelet's port fails exactly that host's port check (exit 7), and `rkel apply` refuses to start
(exit 3, nothing changed); once rkel's own etcd runs, its
ports count as fine; a stopped host is reported unreachable (exit 6) while the others are still
checked.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import run_testbed
from tests.e2e.test_etcd_plane import ADDRESSES, Story, rkel

pytestmark = pytest.mark.e2e

HOSTS = ("rkn1", "rkn2", "rkn3")
# then "disk <Docker root dir>", as the engine reports it (the testbed moves it with --data-root)
CHECKS = ["ssh", "docker", "ports", "clock", "disk /var/lib/etcd"]
LISTENER = ("setsid python3 -c 'import socket, time; s = socket.socket(); "
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            "s.bind((\"0.0.0.0\", 10250)); s.listen(); time.sleep(600)' "
            "</dev/null >/dev/null 2>&1 & echo $!")


class Doctor(Story):
    def doctor(self) -> tuple[int, dict[str, Any], subprocess.CompletedProcess[str]]:
        result = rkel(self.workdir, "-o", "json", "doctor", timeout=300)
        assert "Traceback" not in result.stderr, result.stderr
        return result.returncode, json.loads(result.stdout), result

    def checks(self, data: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
        return {h["node"]: {c["check"]: c for c in h["checks"]} for h in data["hosts"]}


@pytest.fixture(scope="module")
def story(testbed: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Doctor]:
    testbed.ensure(("4",))
    s = Doctor(tmp_path_factory.mktemp("doctor"), testbed)
    s.write(list(HOSTS))
    try:
        yield s
    finally:
        run_testbed("start-host", "3")  # in case the story left it stopped
        rkel(s.workdir, "remove", "--force", timeout=600)


def test_fresh_hosts_pass_every_check(story: Doctor) -> None:
    code, data, result = story.doctor()
    assert code == 0, result.stdout + result.stderr
    checks = story.checks(data)
    assert sorted(checks) == list(HOSTS)
    for host, got in checks.items():
        assert list(got)[:5] == CHECKS and len(got) == 6, (host, list(got))
        assert list(got)[5].startswith("disk /"), host
        assert all(c["ok"] for c in got.values()), (host, got)
        assert f"rkel@{ADDRESSES[host]}:22" in got["ssh"]["detail"]
        assert got["docker"]["detail"].startswith("Docker ")
        assert got["ports"]["detail"].startswith("free: 2379 2380 6443")
    text = rkel(story.workdir, "doctor", timeout=300)
    assert text.returncode == 0 and "All checks passed on 3 host(s)." in text.stdout


def test_a_stranger_on_the_kubelet_port_fails_that_host_only(story: Doctor) -> None:
    pid = story.ssh("rkn2", LISTENER).strip()
    assert pid.isdigit(), pid
    try:
        code, data, result = story.doctor()
        assert code == 7, result.stdout + result.stderr
        checks = story.checks(data)
        ports = checks["rkn2"]["ports"]
        assert not ports["ok"] and "10250 (kubelet)" in ports["detail"]
        assert "sport = :10250" in ports["fix"]
        failed = sorted((h, n) for h, got in checks.items() for n, c in got.items() if not c["ok"])
        assert failed == [("rkn2", "ports")]
        # apply runs the same checks first and refuses, changing nothing
        refused = story.apply()
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert "10250 (kubelet)" in refused.stderr and "--skip-doctor" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert story.ssh("rkn1", "docker ps -aq").strip() == "", "apply changed a host"
    finally:
        story.ssh("rkn2", f"kill {pid}")


def test_ports_of_rkels_own_etcd_count_as_fine(story: Doctor) -> None:
    applied = story.apply()
    assert applied.returncode == 0, applied.stdout + applied.stderr
    code, data, result = story.doctor()
    assert code == 0, result.stdout + result.stderr
    for host, got in story.checks(data).items():
        assert "2379 2380 used by rkel's running containers" in got["ports"]["detail"], host


def test_a_stopped_host_is_unreachable_and_the_others_are_still_checked(story: Doctor) -> None:
    assert run_testbed("stop-host", "3").returncode == 0
    try:
        code, data, result = story.doctor()
        assert code == 6, result.stdout + result.stderr
        hosts = {h["node"]: h for h in data["hosts"]}
        assert hosts["rkn3"]["reachable"] is False
        assert "ssh" in [c["check"] for c in hosts["rkn3"]["checks"] if not c["ok"]]
        assert hosts["rkn1"]["ok"] and hosts["rkn2"]["ok"]
    finally:
        assert run_testbed("start-host", "3").returncode == 0
