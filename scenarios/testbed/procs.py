"""Processes of the testbed: run commands, start daemons, and stop only what the testbed started.

A started daemon is recorded as a `ProcRecord` (pid, process group, kernel start time). The start
time makes a stale record harmless: a pid the kernel has since reused for another process does not
match and is never signalled. Besides recorded pids, only processes inside the testbed's own
network namespaces or its hosts' cgroups (`--cgroup-parent=rknI`) are ever signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


class TestbedError(Exception):
    """A testbed step failed; the message says what to do next."""


def log(msg: str) -> None:
    """Progress line on stderr (stdout stays for command output such as `status --json`)."""
    print(f"testbed: {msg}", file=sys.stderr, flush=True)


def run(
    cmd: Sequence[str], *, check: bool = True, timeout: float = 120, env: dict[str, str] | None = None,
    stdin: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `cmd`, capture its output; raise TestbedError with its stderr when `check` and it fails."""
    try:
        res = subprocess.run(
            list(cmd), capture_output=True, timeout=timeout, env=env,
            input=stdin.decode() if stdin is not None else None, text=True,
        )
    except subprocess.TimeoutExpired as exc:
        raise TestbedError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f}s") from exc
    if check and res.returncode != 0:
        raise TestbedError(f"`{' '.join(cmd)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res


@dataclass(frozen=True)
class ProcRecord:
    """A process the testbed started (or found through a pid file it configured)."""

    pid: int
    pgid: int
    start: int  # field 22 of /proc/PID/stat: clock ticks since boot

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, int] | None) -> ProcRecord | None:
        if not data:
            return None
        return cls(int(data["pid"]), int(data["pgid"]), int(data["start"]))


def start_time(pid: int) -> int | None:
    """Kernel start time of `pid`, or None when no such process exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def record_of(pid: int) -> ProcRecord | None:
    """A record for the running process `pid` (None if it is gone)."""
    start = start_time(pid)
    if start is None:
        return None
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return None
    return ProcRecord(pid, pgid, start)


def alive(rec: ProcRecord | None) -> bool:
    """True while the recorded process (same pid AND same start time) still runs."""
    return rec is not None and start_time(rec.pid) == rec.start and not is_zombie(rec.pid)


def is_zombie(pid: int) -> bool:
    """True for a zombie (or vanished) pid: nothing left to signal."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2:].startswith("Z")


def launch(cmd: Sequence[str], logfile: Path) -> ProcRecord:
    """Start `cmd` as the leader of a new session (pgid == pid), output appended to `logfile`."""
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )
    rec = record_of(proc.pid)
    if rec is None:
        raise TestbedError(f"`{' '.join(cmd)}` exited at once; see {logfile}")
    return rec


def signal_record(rec: ProcRecord | None, sig: int, group: bool = False) -> None:
    """Send `sig` to a recorded process (or its whole process group), only if it is still it."""
    if not alive(rec):
        return
    assert rec is not None
    try:
        if group and rec.pgid == rec.pid and rec.pgid > 1:
            os.killpg(rec.pgid, sig)
        else:
            os.kill(rec.pid, sig)
    except ProcessLookupError:
        pass


def wait_gone(recs: Iterable[ProcRecord | None], timeout: float) -> bool:
    """Wait until none of `recs` runs any more; False if some still run after `timeout` s."""
    pending = [r for r in recs if r is not None]
    deadline = time.monotonic() + timeout
    while True:
        pending = [r for r in pending if alive(r)]
        if not pending or time.monotonic() >= deadline:
            return not pending
        time.sleep(0.2)


def stop_record(rec: ProcRecord | None, timeout: float = 10) -> None:
    """SIGTERM a recorded process group, then SIGKILL it if it outlives `timeout` s."""
    signal_record(rec, signal.SIGTERM, group=True)
    if not wait_gone([rec], timeout):
        signal_record(rec, signal.SIGKILL, group=True)
        wait_gone([rec], 5)


def cgroup_dirs(name: str) -> list[Path]:
    """Every cgroup directory called `name` directly under a hierarchy (v1 controllers or v2)."""
    if not CGROUP_ROOT.is_dir():
        return []
    candidates = [CGROUP_ROOT / name] + [d / name for d in sorted(CGROUP_ROOT.iterdir()) if d.is_dir()]
    return [c for c in candidates if (c / "cgroup.procs").is_file()]


def cgroup_pids(name: str) -> set[int]:
    """Pids in the cgroup `name` or any cgroup below it, in every hierarchy."""
    pids: set[int] = set()
    for top in cgroup_dirs(name):
        for dirpath, _dirs, _files in os.walk(top):
            try:
                text = (Path(dirpath) / "cgroup.procs").read_text()
            except OSError:
                continue
            pids.update(int(p) for p in text.split())
    return pids


def remove_cgroups(name: str) -> None:
    """Remove the (now empty) cgroup tree `name`, deepest first; busy ones are left alone."""
    for top in cgroup_dirs(name):
        for dirpath, _dirs, _files in os.walk(top, topdown=False):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass


def netns_pids(ns_path: Path) -> set[int]:
    """Pids whose network namespace is the one bound at `ns_path` (e.g. /run/netns/rkn1)."""
    try:
        ns = ns_path.stat()
    except OSError:
        return set()
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            st = (entry / "ns" / "net").stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (ns.st_dev, ns.st_ino):
            found.add(int(entry.name))
    return found


def kill_pids(pids: Iterable[int]) -> list[str]:
    """SIGKILL each live pid (never pid 1 or this process); returns `comm[pid]` of those signalled."""
    killed = []
    for pid in sorted(set(pids) - {0, 1, os.getpid()}):
        if is_zombie(pid):
            continue
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            os.kill(pid, signal.SIGKILL)
            killed.append(f"{comm}[{pid}]")
        except (ProcessLookupError, FileNotFoundError):
            pass
    return killed
