"""The rke-etcd-backup stand-in (scenarios/standins/rke_etcd_backup.py), without Docker.

Argument parsing and pruning are checked directly; saving runs rkel's own command line for the
`etcd-rolling-snapshots` container (from lifecycle.desired), with the certificate paths moved to
the test's folder, against Debian's etcd started as rkel configures it (classes of
tests/test_standin_apiserver.py), through the real etcdctl.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.test_standin_apiserver import STANDINS, Cluster, Etcd

sys.path.insert(0, str(STANDINS))
import rke_etcd_backup as backup  # noqa: E402

sys.path.remove(str(STANDINS))

ROLLING = "etcd-rolling-snapshots"
CERTS = ["--cacert", "/ssl/ca.pem", "--cert", "/ssl/n.pem", "--key", "/ssl/n-key.pem",
         "--name", ROLLING, "--endpoints=10.0.0.1:2379"]
NOW = datetime(2026, 12, 5, 6, 0, 0, tzinfo=UTC)


def parse(*extra: str, env: dict[str, str] | None = None) -> backup.Options:
    return backup.parse_args(["etcd-backup", "save", *CERTS, *extra], env or {})


def test_parse_creation_and_retention_durations() -> None:
    opts = parse("--retention=72h", "--creation=12h")
    assert (opts.cacert, opts.cert, opts.key, opts.name) == (
        "/ssl/ca.pem", "/ssl/n.pem", "/ssl/n-key.pem", ROLLING)
    assert opts.endpoints == ("https://10.0.0.1:2379",)
    assert (opts.interval, opts.keep, opts.max_age) == (12 * 3600, None, 72 * 3600)
    assert opts.directory == "/backup"


def test_parse_interval_hours_and_retention_count() -> None:
    opts = parse("--interval-hours=3", "--retention=6")
    assert (opts.interval, opts.keep, opts.max_age) == (3 * 3600, 6, None)


def test_interval_override_for_tests() -> None:
    opts = parse("--interval-hours=12", "--retention=6",
                 env={"STANDIN_SNAPSHOT_INTERVAL_SECONDS": "0.5"})
    assert opts.interval == 0.5
    with pytest.raises(backup.UsageError, match="STANDIN_SNAPSHOT_INTERVAL_SECONDS"):
        parse("--interval-hours=12", "--retention=6", env={"STANDIN_SNAPSHOT_INTERVAL_SECONDS": "x"})


@pytest.mark.parametrize(("argv", "problem"), [
    (["etcd-backup", "restore"], "only `etcd-backup save`"),
    ([], "unknown command"),
    (["etcd-backup", "save", "--retention=72h", "--creation=12h"], "missing --cacert"),
    (["etcd-backup", "save", *CERTS], "need --creation and --retention"),
    (["etcd-backup", "save", *CERTS, "--creation=12h", "--retention=6"], "--retention"),
    (["etcd-backup", "save", *CERTS, "--interval-hours=12", "--retention=72h"], "a positive count"),
    (["etcd-backup", "save", *CERTS, "--interval-hours=0", "--retention=6"], "a positive"),
    (["etcd-backup", "save", *CERTS, "--creation=soon", "--retention=72h"], "invalid argument"),
    (["etcd-backup", "save", *CERTS, "--s3-backup", "--retention=72h"], "unknown flag: --s3"),
])
def test_parse_refuses(argv: list[str], problem: str) -> None:
    with pytest.raises(backup.UsageError, match=problem.replace("(", r"\(")):
        backup.parse_args(argv, {})


def test_main_exits_1_on_a_bad_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert backup.main(["etcd-backup", "save"], {}) == 1
    assert "usage: rke-etcd-backup" in capsys.readouterr().err


def test_snapshot_name_is_rke_tools_rolling_name() -> None:
    assert backup.snapshot_name(NOW) == "2026-12-05T06:00:00Z_etcd"
    assert backup.ROLLING_NAME.fullmatch(backup.snapshot_name(NOW))
    plus_one = datetime(2026, 12, 5, 7, 0, 0, tzinfo=timezone(timedelta(hours=1)))
    assert backup.snapshot_name(plus_one) == "2026-12-05T06:00:00Z_etcd"  # always UTC


def names(hours_ago: list[int]) -> list[str]:
    return [backup.snapshot_name(NOW - timedelta(hours=h)) for h in hours_ago]


def test_prune_by_count_keeps_the_newest_and_other_files() -> None:
    opts = parse("--interval-hours=12", "--retention=2")
    files = names([0, 12, 24, 36]) + ["rkel-20261201T000000Z", "mine_etcd", "etcd-rolling-snapshots.part"]
    assert backup.to_prune(files, opts, NOW) == sorted(names([24, 36]))


def test_prune_by_age() -> None:
    opts = parse("--creation=12h", "--retention=72h")
    files = names([0, 48, 72, 73, 100]) + ["rkel-20200101T000000Z"]
    assert backup.to_prune(files, opts, NOW) == sorted(names([73, 100]))


def test_prune_deletes_files(tmp_path: Path) -> None:
    opts = dataclasses.replace(parse("--interval-hours=12", "--retention=1"), directory=str(tmp_path))
    for name in [*names([0, 12]), "rkel-manual"]:
        (tmp_path / name).write_text("x")
    assert backup.prune(opts, NOW) == names([12])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names([0]), "rkel-manual"])


class FakeEtcdctl:
    """Writes the snapshot file etcdctl was asked for (or fails), recording the command."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        if self.fail:
            return subprocess.CompletedProcess(argv, 1, "", "Error: context deadline exceeded\n")
        Path(argv[-1]).write_bytes(b"snapshot")
        return subprocess.CompletedProcess(argv, 0, "Snapshot saved\n", "")


def test_save_runs_etcdctl_then_renames(tmp_path: Path) -> None:
    opts = dataclasses.replace(parse("--creation=12h", "--retention=72h"), directory=str(tmp_path))
    etcdctl = FakeEtcdctl()
    assert backup.save(opts, NOW, etcdctl) == "2026-12-05T06:00:00Z_etcd"
    assert etcdctl.calls == [[
        "/usr/local/bin/etcdctl", "--cacert", "/ssl/ca.pem", "--cert", "/ssl/n.pem",
        "--key", "/ssl/n-key.pem", "--endpoints", "https://10.0.0.1:2379",
        "snapshot", "save", f"{tmp_path}/{ROLLING}.part"]]
    assert [p.name for p in tmp_path.iterdir()] == ["2026-12-05T06:00:00Z_etcd"]


def test_failed_save_leaves_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    opts = dataclasses.replace(parse("--creation=12h", "--retention=72h"), directory=str(tmp_path))
    (tmp_path / f"{ROLLING}.part").write_bytes(b"half")
    assert backup.save(opts, NOW, FakeEtcdctl(fail=True)) is None
    assert list(tmp_path.iterdir()) == []
    assert "context deadline exceeded" in caplog.text


def test_rolling_waits_an_interval_then_saves_and_prunes(tmp_path: Path) -> None:
    opts = dataclasses.replace(parse("--interval-hours=1", "--retention=2"),
                               directory=str(tmp_path), interval=0.05)
    clock = iter(NOW + timedelta(hours=h) for h in range(100))
    etcdctl, stop = FakeEtcdctl(), threading.Event()

    def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        if len(etcdctl.calls) == 3:
            stop.set()
        return etcdctl(argv, **kw)

    started = datetime.now(UTC)
    backup.run_rolling(opts, stop, run, clock=lambda: next(clock))
    assert datetime.now(UTC) - started >= timedelta(seconds=0.15)  # none at start
    assert len(etcdctl.calls) == 4  # the call that set `stop` still saved
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        backup.snapshot_name(NOW + timedelta(hours=2)), backup.snapshot_name(NOW + timedelta(hours=3))]


# ---------------------------------------------------------------------------- real etcd
@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Etcd]]:
    cluster = Cluster(tmp_path_factory.mktemp("backup-pki"))
    server = Etcd(cluster, tmp_path_factory.mktemp("backup-etcd"))
    try:
        server.start()
        yield cluster, server
    finally:
        server.stop()


def test_rkel_command_saves_a_real_snapshot(etcd: tuple[Cluster, Etcd], tmp_path: Path) -> None:
    cluster, server = etcd
    assert server.etcdctl("put", "/registry/probe", "v").returncode == 0
    command = list(cluster.service(ROLLING).command)
    assert command[:3] == ["/opt/rke-tools/rke-etcd-backup", "etcd-backup", "save"]
    args = [a.replace("/etc/kubernetes/ssl", str(cluster.ssl)) for a in command[1:]]
    args = [f"--endpoints=127.0.0.1:{server.client_port}" if a.startswith("--endpoints=") else a
            for a in args]
    opts = dataclasses.replace(backup.parse_args(args, {}), directory=str(tmp_path))

    def etcdctl(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        assert argv[0] == backup.ETCDCTL
        return subprocess.run(["/usr/bin/etcdctl", *argv[1:]], **kw)

    name = backup.save(opts, NOW, etcdctl)
    assert name == "2026-12-05T06:00:00Z_etcd"
    status = subprocess.run(["/usr/bin/etcdctl", "snapshot", "status", str(tmp_path / name),
                             "-w", "json"], capture_output=True, text=True, check=False,
                            env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})
    assert status.returncode == 0, status.stderr
    assert '"totalKey"' in status.stdout
