"""Local faults: the disk holding the state fills up mid-run; the lock is held by a dead process.

The state directory is a 2 MiB tmpfs mounted for the test (root, as CI runs), filled with a
file until only a little room is left, at a few different amounts, so the run fails at
different points: taking the lock, starting the run, a journal write, the simulated hosts'
file. Each time: an error that says what to do (no traceback), a state that passes `rkel state
verify`, and once space is freed, a resume (or a new run) that converges.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import requests

from lifecycle.errors import HostError, HostUnreachableError
from lifecycle.hosts.docker_ssh import SSHHost
from lifecycle.spec import HealthCheck, NodeRef, ServiceSpec
from tests.test_rollback import NEW, OLD

ROOMS = (150_000, 100_000, 70_000)  # bytes left free before the upgrade starts


def rkel(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lifecycle", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=180, check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "state"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
                             capture_output=True, text=True, check=False)
    assert mounted.returncode == 0, f"mounting a tmpfs needs root: {mounted.stderr}"
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def fill(disk: Path, room: int) -> Path:
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with filler.open("wb") as out:
        out.write(b"\0" * max(0, free - room))
    return filler


@pytest.mark.parametrize("room", ROOMS)
def test_a_full_disk_mid_upgrade_is_a_clear_error_and_resumes(small_disk: Path,
                                                               room: int) -> None:
    sim = ["--backend", "simulated"]
    (small_disk / "cluster.yml").write_text(OLD)
    assert rkel("apply", "--yes", *sim, cwd=small_disk).returncode == 0
    (small_disk / "cluster.yml").write_text(NEW)
    filler = fill(small_disk, room)
    failed = rkel("apply", "--yes", "--no-snapshot", *sim, cwd=small_disk)
    assert failed.returncode in (1, 4), failed.stderr
    assert "Traceback" not in failed.stderr
    assert "space" in failed.stderr or "full" in failed.stderr, failed.stderr
    assert "then run the command again" in failed.stderr
    filler.unlink()
    verify = rkel("state", "verify", cwd=small_disk)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    runs = json.loads(rkel("-o", "json", "history", cwd=small_disk).stdout)
    interrupted = runs[0]["status"] in ("running", "interrupted")
    again = ("apply", "--resume", "--yes") if interrupted else ("apply", "--yes", "--no-snapshot")
    finished = rkel(*again, *sim, cwd=small_disk)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "No changes" in rkel("plan", cwd=small_disk).stdout


def test_the_lock_of_a_dead_process_is_taken_over_with_a_notice(tmp_path: Path) -> None:
    sim = ["--backend", "simulated"]
    (tmp_path / "cluster.yml").write_text(OLD)
    env = {**os.environ, "RKEL_CRASH_AFTER_JOURNAL_WRITES": "9"}
    dead = subprocess.run([sys.executable, "-m", "lifecycle", "apply", "--yes", *sim],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
                          check=False)
    assert dead.returncode == -signal.SIGKILL  # it died holding the lock
    status = rkel("status", cwd=tmp_path)
    assert status.returncode == 0  # reading needs no lock
    started = time.monotonic()
    resumed = rkel("apply", "--resume", "--yes", *sim, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "took over the lock of pid" in resumed.stderr and "which is gone" in resumed.stderr
    assert time.monotonic() - started < 60  # no waiting for a lock nobody will release
    assert "No changes" in rkel("plan", cwd=tmp_path).stdout


def test_secrets_encryption_is_planned_not_silently_ignored(tmp_path: Path) -> None:
    (tmp_path / "cluster.yml").write_text(
        OLD + "services:\n  kube-api:\n    secrets_encryption_config: {enabled: true}\n")
    plan = rkel("plan", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "encryption.yaml: key-1, identity" in plan.stdout
    data = json.loads(rkel("-o", "json", "plan", cwd=tmp_path).stdout)
    args = [a for g in data["groups"] for u in g["units"] for s in u["steps"]
            if s.get("service") == "kube-apiserver" for a in s["spec"]["args"]]
    assert "--encryption-provider-config=/etc/kubernetes/ssl/encryption.yaml" in args


# --------------------------------------------------------------- an engine stopping mid-call
class _Api:
    """A Docker API whose engine is (or is not) still up when a call fails with a 500."""

    def __init__(self, up: bool) -> None:
        self.up, self.pings = up, 0

    def ping(self) -> bool:
        self.pings += 1
        if not self.up:
            raise requests.exceptions.ConnectionError("channel closed")
        return True


def _server_error(text: str) -> docker.errors.APIError:
    response = requests.Response()
    response.status_code = 500
    return docker.errors.APIError("500 Server Error", response=response, explanation=text)


def _host(api: _Api) -> SSHHost:
    host = SSHHost.__new__(SSHHost)
    host.name, host.api = "rkn4", api  # type: ignore[assignment]
    host.ref = NodeRef("rkn4", "10.77.0.14", "10.77.0.14", 22, "rkel", ("worker",))
    return host


@pytest.mark.parametrize(("up", "error", "says"), [
    (False, HostUnreachableError, "the Docker Engine on 10.77.0.14 stopped answering over SSH "
     "(database not open); start it (systemctl start docker)"),
    (True, HostError, "creating container kubelet: database not open"),
])
def test_an_engine_error_while_it_shuts_down_says_the_engine_stopped(
        up: bool, error: type[HostError], says: str) -> None:
    """dockerd stopping answers the calls in flight with its own errors ("database not open"):
    when the engine no longer answers a ping, that is the engine gone (the node is unreachable,
    start Docker), not a failed request on a working engine."""
    api = _Api(up)
    host = _host(api)
    with pytest.raises(HostError) as raised:
        with host._docker("creating container kubelet"):
            raise _server_error("database not open")
    assert type(raised.value) is error
    assert says in str(raised.value)
    assert api.pings == (2 if up else 1)


class _Restarting(_Api):
    """An engine just back up, starting its restart=always container itself: a start of ours
    meanwhile fails with "task ... already exists" until the container runs."""

    def __init__(self, conflicts: int, comes_up: bool = True) -> None:
        super().__init__(up=True)
        self.conflicts, self.comes_up, self.starts = conflicts, comes_up, 0

    def start(self, name: str) -> None:
        self.starts += 1
        if self.starts <= self.conflicts:
            raise _server_error(f"task 79bcec23{name}: already exists")

    def inspect_container(self, name: str) -> dict[str, Any]:
        return {"State": {"Running": self.comes_up and self.starts > 1}}


def test_a_start_racing_the_engines_own_restart_of_the_container_is_not_a_failure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lifecycle.hosts.docker_ssh.time.sleep", lambda _s: None)
    api = _Restarting(conflicts=2)
    _host(api).start_container("kubelet")  # running once the engine's own start went through
    assert api.starts == 2
    stuck = _Restarting(conflicts=10, comes_up=False)
    with pytest.raises(HostError, match="starting container kubelet: task .*already exists"):
        _host(stuck).start_container("kubelet")
    assert stuck.starts == 5


def test_a_health_check_on_a_host_whose_ssh_connection_went_says_so_at_once() -> None:
    """Probing on over a dead connection only waits out the health check's budget (48 s) to
    fail later with the same cause: the first failed probe says the host is gone."""

    class Transport:
        def __init__(self, active: bool) -> None:
            self.active = active

        def is_active(self) -> bool:
            return self.active

        def open_channel(self, *_a: Any, **_k: Any) -> None:
            raise EOFError("the channel closed")

    spec = ServiceSpec(name="kubelet", image="hyperkube", health=HealthCheck(
        url="http://127.0.0.1:10248/healthz"))
    host = _host(_Api(up=True))
    host.transport = Transport(active=True)  # type: ignore[assignment]
    assert host.probe(spec) is False  # still connected: not healthy yet, probe again
    host.transport = Transport(active=False)  # type: ignore[assignment]
    with pytest.raises(HostUnreachableError, match="health check of kubelet: lost the SSH "
                       "connection to 10.77.0.14:22"):
        host.probe(spec)
