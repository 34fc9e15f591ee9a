"""Crash sweep on the real testbed: rkel is killed (SIGKILL) right after its Nth journal write, for
N at every journal boundary of an operation (or every k-th), then resumed, then checked.

The switch is the test-only environment variable RKEL_CRASH_AFTER_JOURNAL_WRITES=N (rkel kills
itself with SIGKILL right after its Nth journal write, as a kill -9 would). Operations:

- apply: a fresh cluster (every host emptied with `rkel remove --force` before each try);
- upgrade: v1.30.5 -> v1.31.1 of a running cluster (with its automatic snapshot);
- rollback: back to the snapshot taken before that upgrade.

The tries are chained, each starting where the previous one left the cluster: apply (ends at
1.30), upgrade (ends at 1.31), rollback (ends at 1.30 again), apply, ... so a try never waits on
a run it does not need. Each try is appended to a record (`--record`, one JSON line per try):
run the same command again, in this session or a later one, and it goes on with the tries not
yet made (`--hours H` stops starting tries after H hours).

After each `rkel apply --resume`, the checks: `rkel plan` has nothing left to do (the cluster
converged to cluster.yml); every etcd key written before the run is there (for a rollback: the
ones written before its snapshot are, the later ones are gone); etcd's members are exactly the
etcd nodes, each once; no `old-*` or `rkel-helper-*` container on any host, and every rkel
container there once; the cluster CA is the one from before; the state file passes
`PRAGMA integrity_check` and its journal's hash chain is intact.

Needs the testbed up (`scenarios/testbed/testbed.py up 4`). Prints one line per try and, at
the end, `<operation>: N passed, N failed; slowest resume S s` over every try recorded for the
chosen boundaries; exit status 1 if any failed.

  .venv/bin/python scenarios/crash_sweep.py --workdir /var/tmp/sweep               # every boundary
  .venv/bin/python scenarios/crash_sweep.py --workdir /var/tmp/sweep --hours 2     # then again later
  .venv/bin/python scenarios/crash_sweep.py --workdir /var/tmp/sweep --every 10    # every 10th
  .venv/bin/python scenarios/crash_sweep.py --workdir /var/tmp/sweep --points 'apply=7;upgrade=12'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lifecycle.pki import PKI, load_state_key  # noqa: E402
from lifecycle.runner import CRASH_ENV  # noqa: E402
from store import Store  # noqa: E402

OLD, NEW = "v1.30.5-rancher1-1", "v1.31.1-rancher1-1"


def address(host: str) -> str:
    """The testbed's address of host rknI."""
    return f"10.77.0.{10 + int(host[3:])}"

OPERATIONS = ("apply", "upgrade", "rollback")


@dataclass
class Tally:
    passed: int = 0
    failed: list[str] = field(default_factory=list)
    slowest: float = 0.0
    total: int = 0  # journal writes of an uncrashed run
    chosen: int = 0  # boundaries chosen to try
    tried: int = 0  # of them, tried (in this session or an earlier one)


class Sweep:
    """One workdir (cluster.yml, state) on the testbed's hosts."""

    def __init__(self, workdir: Path, testbed_dir: Path, hosts: list[str]) -> None:
        self.workdir = workdir
        self.testbed_dir = testbed_dir
        self.hosts = hosts
        self.config = workdir / "cluster.yml"
        self.state = workdir / "cluster.rkel.db"
        base = yaml.safe_load((testbed_dir / "cluster.yml").read_text())
        self.base = {k: base[k] for k in ("system_images", "private_registries") if k in base}
        self.key = str(testbed_dir / "keys" / "id_ed25519")
        workdir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ running rkel
    def rkel(self, *args: str, crash: int | None = None,
             timeout: float = 1200) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
        if crash is not None:
            env[CRASH_ENV] = str(crash)
        return subprocess.run([sys.executable, "-m", "lifecycle", "-c", str(self.config), *args],
                              cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def write(self, version: str) -> None:
        nodes = [{"address": address(h), "hostname_override": h, "user": "rkel",
                  "role": ["controlplane", "etcd", "worker"], "ssh_key_path": self.key}
                 for h in self.hosts]
        data = {"cluster_name": "sweep", "kubernetes_version": version, "nodes": nodes,
                **self.base}
        self.config.write_text(yaml.safe_dump(data))

    def must(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = self.rkel(*args)
        if result.returncode != 0:
            raise RuntimeError(f"rkel {' '.join(args)} failed ({result.returncode}):"
                               f" {result.stderr.strip()[-800:]}")
        return result

    # ------------------------------------------------------------------ etcd and hosts
    def _client_files(self) -> dict[str, Path]:
        with Store.open(self.state) as store:
            material = PKI(store, load_state_key(self.state)).material("kube-apiserver-etcd-client")
        out = {}
        for part, data in (("cert", material.cert_pem), ("key", material.key_pem),
                           ("cacert", material.ca_pem)):
            path = self.workdir / f"etcd-client.{part}"
            path.write_bytes(data)
            path.chmod(0o600)
            out[part] = path
        return out

    def etcdctl(self, *args: str) -> str:
        files = self._client_files()
        endpoints = ",".join(f"https://{address(h)}:2379" for h in self.hosts)
        cmd = ["etcdctl", f"--endpoints={endpoints}", f"--cert={files['cert']}",
               f"--key={files['key']}", f"--cacert={files['cacert']}", "--command-timeout=15s",
               *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "ETCDCTL_API": "3"}, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def put_keys(self, prefix: str, n: int = 5) -> list[str]:
        keys = [f"/sweep/{prefix}/{i}" for i in range(n)]
        for key in keys:
            self.etcdctl("put", key, "v")
        return keys

    def keys(self, prefix: str) -> list[str]:
        out = self.etcdctl("get", "--prefix", f"/sweep/{prefix}/", "--keys-only")
        return sorted(k for k in out.split() if k)

    def members(self) -> list[str]:
        data = json.loads(self.etcdctl("member", "list", "-w", "json"))
        return sorted(m.get("name", "") for m in data["members"])

    def containers(self) -> dict[str, list[str]]:
        out = {}
        for host in self.hosts:
            sock = self.testbed_dir / f"n{host[3:]}" / "run" / "docker.sock"
            client = docker.DockerClient(base_url=f"unix://{sock}", timeout=30)
            try:
                out[host] = [c.name for c in client.containers.list(all=True)]
            finally:
                client.close()
        return out

    def ca_fingerprint(self) -> str:
        with Store.open(self.state) as store:
            row = store.certificate("kube-ca")
        return hashlib.sha256((row.cert_pem if row else "").encode()).hexdigest()

    # ------------------------------------------------------------------ checks
    def problems(self, version: str, kept: list[str], gone: list[str], ca: str) -> list[str]:
        found = []
        plan = self.rkel("plan")
        if "No changes" not in plan.stdout:
            found.append(f"not converged: {plan.stdout.strip()[-400:]}{plan.stderr[-200:]}")
        with Store.open(self.state) as store:
            if store.get_meta("kubernetes_version") != version:
                found.append(f"state records {store.get_meta('kubernetes_version')}, not {version}")
            broken = store.verify_journal()
            if broken:
                found.append(f"journal chain broken: {broken[:3]}")
        check = sqlite3.connect(str(self.state)).execute("PRAGMA integrity_check").fetchone()[0]
        if check != "ok":
            found.append(f"integrity_check: {check}")
        prefixes = sorted({k.split("/")[2] for k in kept + gone})
        have = [k for p in prefixes for k in self.keys(p)]
        lost = sorted(set(kept) - set(have))
        if lost:
            found.append(f"etcd keys lost: {lost}")
        back = sorted(set(gone) & set(have))
        if back:
            found.append(f"keys written after the snapshot still there: {back}")
        members = self.members()
        if members != [f"etcd-{h}" for h in self.hosts]:
            found.append(f"etcd members {members}")
        for host, names in self.containers().items():
            stray = [n for n in names if n.startswith(("old-", "rkel-helper"))]
            if stray:
                found.append(f"{host}: leftover {stray}")
            if len(names) != len(set(names)):
                found.append(f"{host}: duplicate containers {names}")
        if self.ca_fingerprint() != ca:
            found.append("the cluster CA changed")
        return found

    # ------------------------------------------------------------------ the runs
    def killed(self, op: str, crash: int) -> tuple[str, float]:
        """(outcome, seconds of the resume): killed after write `crash`, then resumed; or it
        finished first."""
        crashed = self.rkel("rollback" if op == "rollback" else "apply", "--yes", crash=crash)
        if crashed.returncode == 0:
            return "finished before the crash point", 0.0
        if crashed.returncode != -signal.SIGKILL:
            raise RuntimeError(f"the run failed instead of dying: {crashed.stderr.strip()[-800:]}")
        started = time.monotonic()
        self.must("apply", "--resume", "--yes")
        return "killed and resumed", time.monotonic() - started

    def remove(self) -> None:
        if self.state.exists():
            self.rkel("apply", "--resume", "--yes")
            self.must("remove", "--force")


@dataclass
class Start:
    """What a try's checks compare against: the version it ends at, the etcd keys that must be
    there and those that must be gone, the cluster CA before it ("" for a fresh cluster)."""

    version: str
    kept: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    ca: str = ""


class Chain:
    """Runs the operations one after the other, each starting where the previous one left the
    cluster: a fresh apply (every host emptied first) leaves it at 1.30; an upgrade leaves it at
    1.31 with the automatic snapshot of 1.30; a rollback to that snapshot leaves it at 1.30 again,
    where the next upgrade starts. A try that is not wanted (its points are all done) runs
    uncrashed when the next one needs where it leads."""

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self.at = "none"  # none | old (1.30) | new (1.31, the snapshot of 1.30 the newest)
        self.before_upgrade: list[str] = []  # keys written before the last upgrade's snapshot

    def start(self, op: str) -> Start:
        """Bring the cluster to where `op` starts, then set cluster.yml for it."""
        s = self.sweep
        if op == "apply":
            s.remove()
            s.write(OLD)
            self.at = "none"
            return Start(OLD)
        if op == "upgrade":
            if self.at != "old":
                self.to_old()
            self.before_upgrade = s.put_keys(f"before-{time.time_ns()}")
            s.write(NEW)
            return Start(NEW, kept=list(self.before_upgrade), ca=s.ca_fingerprint())
        if self.at != "new":
            self.run_uncrashed("upgrade")
        gone = s.put_keys(f"after-{time.time_ns()}")
        s.write(OLD)  # what the cluster is rolled back to
        return Start(OLD, kept=list(self.before_upgrade), gone=gone, ca=s.ca_fingerprint())

    def ended(self, op: str) -> None:
        self.at = "new" if op == "upgrade" else "old"
        if op != "upgrade":  # keep one snapshot: the next upgrade takes its own first
            self.sweep.must("snapshot", "prune", "--keep", "1")

    def run_uncrashed(self, op: str) -> None:
        self.start(op)
        self.sweep.must("rollback" if op == "rollback" else "apply", "--yes")
        self.ended(op)

    def to_old(self) -> None:
        """At 1.30: back from 1.31 by a rollback; from nothing (or an unknown state, after a try
        that went wrong) by a fresh apply."""
        if self.at == "new":
            self.run_uncrashed("rollback")
        elif self.at == "none":
            self.run_uncrashed("apply")

    def boundaries(self, op: str) -> int:
        """Journal writes of the run `op` would start now: an intent and a done row per step."""
        if op == "apply":
            self.start("apply")
        elif op == "upgrade" and self.at != "old":
            self.to_old()
        elif op == "rollback" and self.at != "new":
            self.run_uncrashed("upgrade")
        if op == "upgrade":
            self.sweep.write(NEW)
        args = ("plan", "--rollback") if op == "rollback" else ("plan",)
        data = json.loads(self.sweep.must("-o", "json", *args).stdout)
        plan = data.get("plan", data)
        return 2 * sum(len(u["steps"]) for g in plan["groups"] for u in g["units"])

    def crash(self, op: str, crash: int) -> dict[str, Any]:
        """One try: killed after write `crash`, resumed, checked. What it found, as recorded."""
        s = self.sweep
        started = time.monotonic()
        try:
            start = self.start(op)
            outcome, seconds = s.killed(op, crash)
            found = s.problems(start.version, start.kept, start.gone, start.ca or s.ca_fingerprint())
            self.ended(op)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            outcome, seconds, found = "error", 0.0, [str(exc)]
            self.at = "none"  # unknown: the next try starts afresh
        return {"op": op, "crash": crash, "outcome": outcome, "resume_s": round(seconds, 1),
                "try_s": round(time.monotonic() - started, 1), "problems": found}


class Record:
    """Every try made, one JSON line each (appended, flushed), so a sweep stopped for time (or
    killed) goes on where it was with the same command. A try counts for the journal boundaries
    it was chosen from: when a change to rkel moves them, earlier tries no longer count."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tries: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    self.tries.append(json.loads(line))

    def done(self, op: str, total: int) -> dict[int, dict[str, Any]]:
        return {t["crash"]: t for t in self.tries if t["op"] == op and t["total"] == total}

    def add(self, entry: dict[str, Any]) -> None:
        with self.lock, self.path.open("a") as out:
            self.tries.append(entry)
            out.write(json.dumps(entry, sort_keys=True) + "\n")
            out.flush()
            os.fsync(out.fileno())


@dataclass
class Choice:
    """Which boundaries of an operation to try: `points`, or `sample` drawn with `seed`, or
    every `every`-th."""

    points: list[int] | None = None
    every: int = 1
    sample: int = 0
    seed: int = 0

    def of(self, op: str, total: int) -> list[int]:
        boundaries = range(1, total)
        if self.points:
            return list(self.points)
        if self.sample:
            return sorted(random.Random(f"{self.seed}-{op}").sample(
                boundaries, min(self.sample, len(boundaries))))
        return list(boundaries[::max(1, self.every)])


def run_sweep(sweeps: Sweep | list[Sweep], choices: dict[str, Choice], record: Record,
              budget: float | None = None, log: Any = print) -> dict[str, Tally]:
    """Try every chosen boundary of each operation not yet in `record`, chaining the operations
    (apply, upgrade, rollback, apply, ...) so no try waits on a run it does not need. Several
    sweeps (lanes: clusters on separate hosts) take tries from the same list side by side. Stops
    starting tries once `budget` seconds have passed; the tallies cover every recorded try."""
    lanes = sweeps if isinstance(sweeps, list) else [sweeps]
    chains = [Chain(sweep) for sweep in lanes]
    started = time.monotonic()
    todo: dict[str, list[int]] = {}
    lock = threading.Lock()
    tallies = {op: Tally() for op in choices}
    for op in OPERATIONS:  # the boundaries, counted where each operation starts (first lane)
        if op in choices:
            tallies[op].total = chains[0].boundaries(op)
            chosen = choices[op].of(op, tallies[op].total)
            done = record.done(op, tallies[op].total)
            todo[op] = [n for n in chosen if n not in done]
            log(f"{op}: {tallies[op].total} journal writes planned; {len(chosen)} crash points"
                f" chosen, {len(chosen) - len(todo[op])} already tried")

    def take(chain: Chain, after: str) -> tuple[str, int] | None:
        """The next try for this lane: the operation after `after` that has tries left."""
        with lock:
            if not any(todo.values()):
                return None
            if budget is not None and time.monotonic() - started > budget:
                log(f"stopped for time: {sum(map(len, todo.values()))} tries left; run the same"
                    " command again to go on")
                todo.clear()
                return None
            at = OPERATIONS.index(after)
            op = next(o for o in OPERATIONS[at:] + OPERATIONS[:at] if todo.get(o))
            return op, todo[op].pop(0)

    def lane(chain: Chain) -> None:
        name = "" if len(chains) == 1 else f"[{chain.sweep.hosts[0]}..] "
        starts_at = {"old": "upgrade", "new": "rollback"}
        after = starts_at.get(chain.at, "apply")  # first the one that starts where it is
        while (picked := take(chain, after)) is not None:
            op, crash = picked
            entry = chain.crash(op, crash)
            entry.update(total=tallies[op].total, hosts=",".join(chain.sweep.hosts),
                         at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            record.add(entry)
            found = entry["problems"]
            log(f"  {name}{op} @{crash}: {'FAILED' if found else 'ok'} ({entry['outcome']},"
                f" resume {entry['resume_s']}s, try {entry['try_s']}s)"
                f"{': ' + '; '.join(found) if found else ''}")
            after = OPERATIONS[(OPERATIONS.index(op) + 1) % len(OPERATIONS)]  # then the next

    if len(chains) == 1:
        lane(chains[0])
    else:
        threads = [threading.Thread(target=lane, args=(c,), daemon=True) for c in chains]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for op, tally in tallies.items():
        wanted = set(choices[op].of(op, tally.total))
        for crash, entry in sorted(record.done(op, tally.total).items()):
            if crash not in wanted:
                continue
            tally.tried += 1
            tally.slowest = max(tally.slowest, entry["resume_s"])
            if entry["problems"]:
                tally.failed.append(f"{op} crash after write {crash}: {'; '.join(entry['problems'])}")
            else:
                tally.passed += 1
        tally.chosen = len(wanted)
    return tallies


def parse_points(text: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        op, _, numbers = part.partition("=")
        if op not in OPERATIONS or not numbers:
            raise SystemExit(f"--points: write e.g. apply=3,9;upgrade=12 (not {part!r})")
        out[op] = [int(n) for n in numbers.split(",")]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--testbed-dir", type=Path,
                        default=Path(os.environ.get("RKEL_TESTBED_DIR", "/var/lib/rkel-testbed")))
    parser.add_argument("--hosts", default="rkn1,rkn2,rkn3")
    parser.add_argument("--lanes", type=int, default=1,
                        help="clusters side by side, each on the next 3 hosts (rkn4..rkn6, ...:"
                             " the testbed needs 3 x LANES hosts up)")
    parser.add_argument("--operations", default=",".join(OPERATIONS))
    parser.add_argument("--every", type=int, default=1, help="try every k-th journal boundary")
    parser.add_argument("--points", default="", help="exact crash points: apply=3,9;upgrade=12")
    parser.add_argument("--sample", type=int, default=0,
                        help="try this many boundaries per operation, drawn with --seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", type=Path, default=None,
                        help="tries made so far, one JSON line each (default:"
                             " <workdir>/sweep-record.jsonl); tries in it are not made again")
    parser.add_argument("--hours", type=float, default=None,
                        help="start no try after this long; the same command goes on later")
    args = parser.parse_args(argv)
    hosts = args.hosts.split(",")
    if args.lanes > 1:
        first = int(hosts[0][3:])
        lanes = [Sweep(args.workdir / f"lane-{i}", args.testbed_dir,
                       [f"rkn{first + 3 * i + k}" for k in range(3)]) for i in range(args.lanes)]
    else:
        lanes = [Sweep(args.workdir, args.testbed_dir, hosts)]
    points = parse_points(args.points)
    choices = {op: Choice(points.get(op), args.every, args.sample, args.seed)
               for op in args.operations.split(",")}
    record = Record(args.record or args.workdir / "sweep-record.jsonl")
    budget = args.hours * 3600 if args.hours is not None else None
    try:
        tallies = run_sweep(lanes, choices, record, budget)
    finally:
        for sweep in lanes:
            sweep.remove()
    failed = 0
    for op, tally in tallies.items():
        how = ("chosen points" if op in points else f"{args.sample} drawn (seed {args.seed})"
               if args.sample else f"every {args.every}")
        left = f", {tally.chosen - tally.tried} not tried yet" if tally.tried < tally.chosen else ""
        print(f"{op}: {tally.passed} passed, {len(tally.failed)} failed ({tally.total} journal"
              f" boundaries, {how}{left}); slowest resume {tally.slowest:.1f} s")
        for line in tally.failed:
            print(f"  {line}")
        failed += len(tally.failed)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
