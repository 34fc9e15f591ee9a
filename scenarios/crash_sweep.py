"""Crash sweep on the real testbed: rkel is killed (SIGKILL) right after its Nth journal write, for
N at every journal boundary of an operation (or every k-th), then resumed, then checked.

The switch is the test-only environment variable RKEL_CRASH_AFTER_JOURNAL_WRITES=N (rkel kills
itself with SIGKILL right after its Nth journal write, as a kill -9 would). Operations:

- apply: a fresh cluster (every host emptied with `rkel remove --force` before each try);
- upgrade: v1.30.5 -> v1.31.1 of a running cluster (with its automatic snapshot);
- rollback: back to the snapshot taken before that upgrade (which also brings the cluster back
  to 1.30, the start of the next upgrade try).

After each `rkel apply --resume`, the checks: `rkel plan` has nothing left to do (the cluster
converged to cluster.yml); every etcd key written before the run is there (for a rollback: the
ones written before its snapshot are, the later ones are gone); etcd's members are exactly the
etcd nodes, each once; no `old-*` or `rkel-helper-*` container on any host, and every rkel
container there once; the cluster CA is the one from before; the state file passes
`PRAGMA integrity_check` and its journal's hash chain is intact.

Needs the testbed up (`scenarios/testbed/testbed.py up 4`). Prints one line per try and
`<operation>: N passed, N failed; slowest resume S s` at the end; exit status 1 if any failed.

  .venv/bin/python scenarios/crash_sweep.py --workdir /tmp/sweep            # every boundary
  .venv/bin/python scenarios/crash_sweep.py --workdir /tmp/sweep --every 10 # every 10th
  .venv/bin/python scenarios/crash_sweep.py --workdir /tmp/sweep --points apply=7,upgrade=12
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
ADDRESSES = {"rkn1": "10.77.0.11", "rkn2": "10.77.0.12", "rkn3": "10.77.0.13", "rkn4": "10.77.0.14"}
OPERATIONS = ("apply", "upgrade", "rollback")


@dataclass
class Tally:
    passed: int = 0
    failed: list[str] = field(default_factory=list)
    slowest: float = 0.0
    total: int = 0  # journal writes of an uncrashed run


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
        nodes = [{"address": ADDRESSES[h], "hostname_override": h, "user": "rkel",
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

    def planned_writes(self, op: str) -> int:
        """Journal writes of the run `op` would start now: an intent and a done row per step."""
        args = ("plan", "--rollback") if op == "rollback" else ("plan",)
        data = json.loads(self.must("-o", "json", *args).stdout)
        plan = data.get("plan", data)
        return 2 * sum(len(u["steps"]) for g in plan["groups"] for u in g["units"])

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
        endpoints = ",".join(f"https://{ADDRESSES[h]}:2379" for h in self.hosts)
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
            sock = self.testbed_dir / f"n{host[-1]}" / "run" / "docker.sock"
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

    # ------------------------------------------------------------------ one try
    def crash_and_resume(self, op: str, crash: int) -> tuple[str, float]:
        """(outcome, seconds of the resume): killed, then resumed; or it finished first."""
        crashed = self.rkel("rollback" if op == "rollback" else "apply", "--yes", crash=crash)
        if crashed.returncode == 0:
            return "finished before the crash point", 0.0
        if crashed.returncode != -signal.SIGKILL:
            raise RuntimeError(f"the run failed instead of dying: {crashed.stderr.strip()[-800:]}")
        started = time.monotonic()
        self.must("apply", "--resume", "--yes")
        return "killed and resumed", time.monotonic() - started

    def fresh(self) -> None:
        if self.state.exists():
            self.rkel("apply", "--resume", "--yes")
            self.must("remove", "--force")

    def at_old_version(self) -> None:
        """A 1.30 cluster (made once; a rollback try leaves it there again)."""
        with Store.open(self.state) as store:
            running = store.get_meta("kubernetes_version") == OLD and store.nodes()
        self.write(OLD)
        if not running:
            self.fresh()
            self.must("apply", "--yes")
        self.must("snapshot", "prune", "--keep", "1")


def run_operation(sweep: Sweep, op: str, points: list[int] | None = None, every: int = 1,
                  sample: int = 0, seed: int = 0, log: Any = print) -> Tally:
    """Try `op` with a crash at `points`, or at `sample` boundaries drawn with `seed`, or at
    every `every`-th boundary."""
    tally = Tally()

    def prepare() -> tuple[str, list[str], list[str], str]:
        """Bring the cluster to where `op` starts; (version after, kept, gone, CA)."""
        if op == "apply":
            sweep.fresh()
            sweep.write(OLD)
            return OLD, [], [], sweep.ca_fingerprint() if sweep.state.exists() else ""
        sweep.at_old_version()
        if op == "upgrade":
            kept = sweep.put_keys(f"before-{time.time_ns()}")
            sweep.write(NEW)
            return NEW, kept, [], sweep.ca_fingerprint()
        # rollback: upgrade first (its automatic snapshot is the target), then write more keys
        kept = sweep.put_keys(f"before-{time.time_ns()}")
        sweep.write(NEW)
        sweep.must("apply", "--yes")
        gone = sweep.put_keys(f"after-{time.time_ns()}")
        sweep.write(OLD)  # what the cluster is rolled back to
        return OLD, kept, gone, sweep.ca_fingerprint()

    version, kept, gone, ca = prepare()
    tally.total = sweep.planned_writes(op)
    boundaries = range(1, tally.total)
    if points:
        chosen = points
    elif sample:
        chosen = sorted(random.Random(f"{seed}-{op}").sample(boundaries, min(sample, len(boundaries))))
    else:
        chosen = list(boundaries[::max(1, every)])
    log(f"{op}: {tally.total} journal writes planned; crash points {chosen}")
    for index, crash in enumerate(chosen):
        if index:
            version, kept, gone, ca = prepare()
        try:
            outcome, seconds = sweep.crash_and_resume(op, crash)
            found = sweep.problems(version, kept, gone, ca or sweep.ca_fingerprint())
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            outcome, seconds, found = "error", 0.0, [str(exc)]
        tally.slowest = max(tally.slowest, seconds)
        if found:
            tally.failed.append(f"{op} crash after write {crash}: {'; '.join(found)}")
            log(f"  {op} @{crash}: FAILED ({outcome}): {'; '.join(found)}")
        else:
            tally.passed += 1
            log(f"  {op} @{crash}: ok ({outcome}, resume {seconds:.1f}s)")
    return tally


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
    parser.add_argument("--operations", default=",".join(OPERATIONS))
    parser.add_argument("--every", type=int, default=1, help="try every k-th journal boundary")
    parser.add_argument("--points", default="", help="exact crash points: apply=3,9;upgrade=12")
    parser.add_argument("--sample", type=int, default=0,
                        help="try this many boundaries per operation, drawn with --seed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sweep = Sweep(args.workdir, args.testbed_dir, args.hosts.split(","))
    points = parse_points(args.points)
    failed = 0
    summary = []
    try:
        for op in args.operations.split(","):
            tally = run_operation(sweep, op, points.get(op), args.every, args.sample, args.seed)
            failed += len(tally.failed)
            how = ("chosen points" if op in points else f"{args.sample} drawn (seed {args.seed})"
                   if args.sample else f"every {args.every}")
            summary.append(f"{op}: {tally.passed} passed, {len(tally.failed)} failed"
                           f" ({tally.total} journal boundaries, {how}); slowest resume"
                           f" {tally.slowest:.1f} s")
    finally:
        if sweep.state.exists():
            sweep.rkel("apply", "--resume", "--yes")
            sweep.rkel("remove", "--force")
    print("\n".join(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
