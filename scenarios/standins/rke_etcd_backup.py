"""rke-etcd-backup stand-in: rke-tools' recurring etcd snapshots (`etcd-backup save`, rolling).

rkel (like RKE) runs `/opt/rke-tools/rke-etcd-backup etcd-backup save --cacert .. --cert ..
--key .. --name etcd-rolling-snapshots --endpoints=<host>:2379` plus either `--creation=<duration>
--retention=<duration>` or `--interval-hours=<N> --retention=<N>` in the `etcd-rolling-snapshots`
container, with the node's snapshot folder on /backup. Every interval this really runs `etcdctl
snapshot save` against the member with the given certificates, names the file as rke-tools does
(`<UTC RFC 3339 time>_etcd`) and prunes old ones. Python 3.11 standard library only; run it as a
script, its modules sit beside it. See README.md.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from component_common import (
    DURATION,
    INT,
    STRING,
    FlagError,
    env_seconds,
    parse_duration,
    parse_flags,
    setup_logging,
)

NAME = "rke-etcd-backup"
ETCDCTL = "/usr/local/bin/etcdctl"  # the base image links it there, as the etcd image has it
BACKUP_DIR = "/backup"  # the node's snapshot folder, bound by rkel
INTERVAL_ENV = "STANDIN_SNAPSHOT_INTERVAL_SECONDS"  # tests only: replaces the interval
SUFFIX = "_etcd"
ROLLING_NAME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)_etcd")
FLAGS = {
    "cacert": STRING, "cert": STRING, "key": STRING, "name": STRING, "endpoints": STRING,
    "creation": DURATION, "retention": STRING, "interval-hours": INT,
}
USAGE = """\
usage: rke-etcd-backup etcd-backup save --cacert FILE --cert FILE --key FILE --name NAME
         --endpoints HOST:PORT[,...] (--creation DURATION --retention DURATION
         | --interval-hours N --retention N)   (stand-in for rancher/rke-tools; see README.md)
Snapshots go to /backup/<UTC time>_etcd every interval; $STANDIN_SNAPSHOT_INTERVAL_SECONDS
replaces the interval (tests only).
"""
Run = Callable[..., subprocess.CompletedProcess[str]]


class UsageError(Exception):
    """The command line is not one rke-tools would run: exit 1 with the reason."""


@dataclass(frozen=True)
class Options:
    """What one rolling `etcd-backup save` was asked for."""

    cacert: str
    cert: str
    key: str
    name: str
    endpoints: tuple[str, ...]  # https:// URLs
    interval: float  # seconds between snapshots
    keep: int | None  # --retention N: keep the newest N
    max_age: float | None  # --retention DURATION: delete those older (seconds)
    directory: str = BACKUP_DIR


def parse_args(argv: Sequence[str], environ: dict[str, str]) -> Options:
    """rkel's command line (after the program name) as Options; UsageError when unusable."""
    if list(argv[:2]) != ["etcd-backup", "save"]:
        raise UsageError(f"unknown command {' '.join(argv[:2]) or '(none)'!r}; the stand-in"
                         " runs only `etcd-backup save`")
    try:
        flags = parse_flags(list(argv[2:]), FLAGS)
    except FlagError as exc:
        raise UsageError(str(exc)) from None
    missing = [f"--{f}" for f in ("cacert", "cert", "key", "name", "endpoints") if not flags.get(f)]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}")
    retention = flags.get("retention", "")
    if "interval-hours" in flags:
        hours = int(flags["interval-hours"])
        if hours <= 0 or not retention.isdigit() or int(retention) <= 0:
            raise UsageError("--interval-hours needs a positive N and --retention a positive"
                             f" count (got {hours} and {retention or 'none'!r})")
        interval, keep, max_age = hours * 3600.0, int(retention), None
    else:
        if not flags.get("creation") or not retention:
            raise UsageError("rolling snapshots need --creation and --retention (durations), or"
                             " --interval-hours and --retention (a count)")
        try:
            interval, max_age, keep = parse_duration(flags["creation"]), parse_duration(retention), None
        except ValueError as exc:
            raise UsageError(f"--retention: {exc}") from None
        if interval <= 0 or max_age <= 0:
            raise UsageError("--creation and --retention must be longer than 0")
    try:
        interval = env_seconds(environ, INTERVAL_ENV, interval)
    except Exception as exc:  # StartupError: a bad test setting
        raise UsageError(str(exc)) from None
    if interval <= 0:
        raise UsageError(f"${INTERVAL_ENV} must be a positive number of seconds")
    endpoints = tuple(e if "://" in e else f"https://{e}"
                      for e in (p.strip() for p in flags["endpoints"].split(",")) if e)
    return Options(flags["cacert"], flags["cert"], flags["key"], flags["name"], endpoints,
                   interval, keep, max_age)


def snapshot_name(now: datetime) -> str:
    """rke-tools' rolling snapshot name: the UTC time in RFC 3339, then `_etcd`."""
    return f"{now.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}{SUFFIX}"


def etcdctl_command(opts: Options, path: str) -> list[str]:
    return [ETCDCTL, "--cacert", opts.cacert, "--cert", opts.cert, "--key", opts.key,
            "--endpoints", ",".join(opts.endpoints), "snapshot", "save", path]


def save(opts: Options, now: datetime, run: Run) -> str | None:
    """Take one snapshot into `<name>.part`, then rename it to its rolling name. The file name
    on success; None (logged, no file left) when etcdctl failed."""
    part = os.path.join(opts.directory, f"{opts.name}.part")
    final = os.path.join(opts.directory, snapshot_name(now))
    done = run(etcdctl_command(opts, part), capture_output=True, text=True,
               env={**os.environ, "ETCDCTL_API": "3"}, check=False)
    if done.returncode != 0 or not os.path.isfile(part):
        tail = (done.stderr or done.stdout or "no output").strip().splitlines()[-1:]
        LOG.error("snapshot save failed (etcdctl exit %s): %s", done.returncode, " ".join(tail))
        if os.path.exists(part):
            os.unlink(part)
        return None
    os.replace(part, final)
    LOG.info("saved snapshot %s (%d bytes) from %s", final, os.path.getsize(final),
             ",".join(opts.endpoints))
    return os.path.basename(final)


def to_prune(names: Sequence[str], opts: Options, now: datetime) -> list[str]:
    """The rolling snapshots (and only those: other files in the folder are left alone) that
    retention removes: beyond the newest `keep`, or older than `max_age`."""
    rolling = sorted(n for n in names if ROLLING_NAME.fullmatch(n))  # UTC times sort as text
    if opts.keep is not None:
        return rolling[:max(0, len(rolling) - opts.keep)]
    assert opts.max_age is not None
    cutoff = now - timedelta(seconds=opts.max_age)
    return [n for n in rolling
            if datetime.strptime(n[:-len(SUFFIX)], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            < cutoff]


def prune(opts: Options, now: datetime) -> list[str]:
    """Delete what `to_prune` names from the folder; the names deleted."""
    doomed = to_prune(os.listdir(opts.directory), opts, now)
    for name in doomed:
        os.unlink(os.path.join(opts.directory, name))
        LOG.info("pruned snapshot %s", os.path.join(opts.directory, name))
    return doomed


def run_rolling(opts: Options, stop: threading.Event, run: Run = subprocess.run,
                clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
    """Every interval until `stop`: save, then prune. The first snapshot comes after the first
    interval, as with rke-tools."""
    LOG.info("rolling snapshots of %s every %gs into %s, keeping %s", ",".join(opts.endpoints),
             opts.interval, opts.directory,
             f"the newest {opts.keep}" if opts.keep is not None else f"{opts.max_age:g}s")
    while not stop.wait(opts.interval):
        now = clock()
        if save(opts, now, run) is not None:
            prune(opts, now)


def main(argv: Sequence[str], environ: dict[str, str]) -> int:
    if argv[:1] in (["--help"], ["-h"], ["help"]):
        print(USAGE, end="")
        return 0
    try:
        opts = parse_args(argv, environ)
    except UsageError as exc:
        LOG.error("%s", exc)
        print(USAGE, end="", file=sys.stderr)
        return 1
    if not os.path.isdir(opts.directory):
        LOG.error("%s is not a folder (rkel binds the node's snapshot folder there)", opts.directory)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run_rolling(opts, stop)
    LOG.info("stopped")
    return 0


LOG = setup_logging(NAME)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], dict(os.environ)))
