"""Certificate rotation on the real testbed: the cluster keeps serving through it.

One story on 3 all-role nodes (rkn1..rkn3, non-root SSH user), while a background thread asks
every API server for the Nodes (real kubectl, the admin kubeconfig as rkel keeps rewriting it)
and reads etcd keys through every member, about once a second, recording each moment when no
API server answered or the keys could not be read:
1. `rkel cert rotate` (every service), killed -9 after its certificates reached the first node,
   then `rkel cert rotate --resume`: every leaf on the nodes has a new serial, the CAs and the
   service-account key are unchanged, nodes Ready, `rkel plan` has nothing to do.
2. `rkel cert rotate --rotate-ca`: three rolling stages; afterwards every CA file on the nodes
   holds one certificate, a new one; the old admin certificate is refused by every API server,
   the old etcd client certificate by etcd, an API server is no longer verified by the old CA;
   nodes Ready, every key readable, nothing left to do.
Run one story at a time (`-k leaves`, `-k rotate_ca`) to keep each invocation short: each
brings its cluster up if needed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from lifecycle.pki import PKI, load_state_key
from store import Store
from tests.e2e.test_cluster import ALL_ROLES, HOSTS, KUBECTL, ready_nodes
from tests.e2e.test_etcd_plane import ADDRESSES
from tests.e2e.test_upgrade import Upgrade

pytestmark = pytest.mark.e2e

KEYS = 20
LEAVES = ("kube-apiserver", "kube-proxy", "kube-scheduler", "kube-controller-manager",
          "kube-apiserver-etcd-client")
CAS = ("kube-ca", "kube-etcd-ca", "kube-apiserver-requestheader-ca")


@pytest.fixture(scope="module")
def story(testbed: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upgrade]:
    testbed.ensure(("4",))
    c = Upgrade(tmp_path_factory.mktemp("cert-rotate"), testbed)
    try:
        yield c
    finally:
        if (c.workdir / "cluster.yml").exists():
            c.rkel("apply", "--resume", "--yes")  # a story that stopped mid-run
            c.rkel("remove", "--force")
        for label, seconds in sorted(c.timings.items()):
            print(f"{label}: {seconds:.1f}s wall")


def up(c: Upgrade) -> None:
    """The 3-node cluster with keys in etcd (once per module)."""
    if (c.workdir / "kube_config_cluster.yml").exists():
        return
    c.write({h: ALL_ROLES for h in HOSTS})
    c.apply("apply")
    ready_nodes(c, 3)
    c.put_keys("before", KEYS)


def material(c: Upgrade, name: str, prefix: str) -> dict[str, Path]:
    """cert, key and CA bundle of `name` from the state, as files named `prefix-*` (0600)."""
    with Store.open(c.state, check_journal=False) as store:
        m = PKI(store, load_state_key(c.state)).material(name)
    out = {}
    for part, data in (("cert", m.cert_pem), ("key", m.key_pem), ("cacert", m.ca_pem)):
        path = c.workdir / f"{prefix}-{name}-{part}.pem"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.chmod(0o600)
        tmp.replace(path)
        out[part] = path
    return out


def node_file(c: Upgrade, host: str, name: str) -> bytes:
    return (c.testbed.state_dir / f"n{host[-1]}" / "etc-kubernetes" / "ssl" / f"{name}.pem").read_bytes()


def serials(c: Upgrade, names: tuple[str, ...]) -> dict[tuple[str, str], tuple[int, ...]]:
    """(host, file) -> the serial numbers of the certificates in it, on every node."""
    return {(h, n): tuple(x.serial_number for x in x509.load_pem_x509_certificates(node_file(c, h, n)))
            for h in HOSTS for n in names}


class Watch(threading.Thread):
    """Asks every API server for the Nodes and reads the keys through etcd, about once a
    second, until stopped; `outages` holds each moment (UTC) when nothing answered."""

    def __init__(self, c: Upgrade) -> None:
        super().__init__(daemon=True)
        self.c = c
        self.halt = threading.Event()
        self.ticks = 0
        self.outages: list[str] = []
        self.server_misses: Counter[str] = Counter()
        self.etcd_files = material(c, "kube-apiserver-etcd-client", "watch")

    def _api(self, address: str) -> bool:
        cmd = [KUBECTL, "--kubeconfig", str(self.c.kubeconfig), "--server",
               f"https://{address}:6443", "--request-timeout=5s", "get", "nodes", "-o", "name"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
        return res.returncode == 0 and len(res.stdout.split()) == 3

    def _etcd(self) -> bool:
        for attempt in range(2):
            f = self.etcd_files
            endpoints = ",".join(f"https://{ADDRESSES[h]}:2379" for h in HOSTS)
            cmd = ["etcdctl", f"--endpoints={endpoints}", f"--cert={f['cert']}",
                   f"--key={f['key']}", f"--cacert={f['cacert']}", "--command-timeout=5s",
                   "get", "--prefix", "/e2e/before/", "--keys-only"]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False,
                                 env={**os.environ, "ETCDCTL_API": "3"})
            if res.returncode == 0 and len(res.stdout.split()) == KEYS:
                return True
            if attempt == 0:  # rkel may have renewed the client certificate since
                try:
                    self.etcd_files = material(self.c, "kube-apiserver-etcd-client", "watch")
                except Exception:  # noqa: BLE001 - the state is being written; try next tick
                    return False
        return False

    def run(self) -> None:
        while not self.halt.is_set():
            at = time.strftime("%H:%M:%S", time.gmtime())
            answered = []
            for host in HOSTS:
                if self._api(ADDRESSES[host]):
                    answered.append(host)
                else:
                    self.server_misses[host] += 1
            if not answered:
                self.outages.append(f"{at} no API server answered")
            if not self._etcd():
                self.outages.append(f"{at} etcd keys not readable")
            self.ticks += 1
            self.halt.wait(0.5)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=60)


def converged(c: Upgrade) -> None:
    nodes = ready_nodes(c, 3)
    assert all(not n["spec"].get("unschedulable") for n in nodes), "a node was left cordoned"
    assert c.keys("before") == sorted(f"/e2e/before/{i}" for i in range(KEYS))
    plan = c.rkel("plan")
    assert "No changes" in plan.stdout, plan.stdout
    containers = c.all_containers()
    assert not [k for k in containers if k[1].startswith(("old-", "rkel-helper"))], containers


def test_leaves_rotated_killed_and_resumed_while_the_cluster_keeps_serving(story: Upgrade) -> None:
    c = story
    up(c)
    before = serials(c, (*LEAVES, *CAS, "kube-service-account-token"))
    watch = Watch(c)
    watch.start()
    started = time.monotonic()
    try:
        # journal writes: the renewal's intent and done, then the first node's certificates
        killed = c.rkel("cert", "rotate", "--yes", env={"RKEL_CRASH_AFTER_JOURNAL_WRITES": "4"})
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        refused = c.rkel("cert", "rotate", "--yes")
        assert refused.returncode == 4 and "--resume" in refused.stderr, refused.stderr
        resumed = c.rkel("cert", "rotate", "--resume")
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    finally:
        c.timings["cert-rotate-with-kill-9"] = time.monotonic() - started
        watch.stop()
    print(f"leaves: {watch.ticks} polls, misses per API server {dict(watch.server_misses)}")
    assert watch.ticks > 20
    assert watch.outages == [], watch.outages
    after = serials(c, (*LEAVES, *CAS, "kube-service-account-token"))
    for (host, name), numbers in after.items():
        if name in LEAVES:
            assert numbers != before[(host, name)], f"{host}: {name} was not renewed"
        else:
            assert numbers == before[(host, name)], f"{host}: {name} changed"
    converged(c)
    history = json.loads(c.rkel("-o", "json", "history").stdout)
    assert history[0]["kind"] == "cert-rotate" and history[0]["status"] == "done"


def _kubectl_with(c: Upgrade, host: str, cert: Path, key: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KUBECTL, "--server", f"https://{ADDRESSES[host]}:6443", f"--client-certificate={cert}",
         f"--client-key={key}", f"--certificate-authority={ca}", "--request-timeout=10s",
         "get", "nodes", "-o", "name"], capture_output=True, text=True, timeout=30, check=False)


def test_rotate_ca_keeps_the_cluster_serving_and_drops_the_old_ca(story: Upgrade) -> None:
    c = story
    up(c)
    old_admin = material(c, "kube-admin", "old")
    old_etcd = material(c, "kube-apiserver-etcd-client", "old")
    before = serials(c, (*LEAVES, *CAS))
    watch = Watch(c)
    watch.start()
    started = time.monotonic()
    try:
        rotated = c.rkel("cert", "rotate", "--rotate-ca", "--yes")
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    finally:
        c.timings["cert-rotate-ca"] = time.monotonic() - started
        watch.stop()
    print(f"rotate-ca: {watch.ticks} polls, misses per API server {dict(watch.server_misses)}")
    assert watch.ticks > 20
    assert watch.outages == [], watch.outages
    after = serials(c, (*LEAVES, *CAS))
    for (host, name), numbers in after.items():
        assert numbers != before[(host, name)], f"{host}: {name} was not renewed"
        if name in CAS:
            assert len(numbers) == 1, f"{host}: {name} still holds {len(numbers)} CAs"
    new_admin = material(c, "kube-admin", "new")
    for host in HOSTS:
        ok = _kubectl_with(c, host, new_admin["cert"], new_admin["key"], new_admin["cacert"])
        assert ok.returncode == 0, ok.stderr
        stale = _kubectl_with(c, host, old_admin["cert"], old_admin["key"], new_admin["cacert"])
        assert stale.returncode != 0, f"{host} still accepts a client certificate of the old CA"
        unverified = _kubectl_with(c, host, new_admin["cert"], new_admin["key"], old_admin["cacert"])
        assert unverified.returncode != 0, f"{host} still serves a certificate of the old CA"
    refused = c.etcdctl(ADDRESSES["rkn2"], old_etcd, "get", "/e2e/before/1", check=False)
    assert refused.returncode != 0, "etcd still accepts a client certificate of the old CA"
    converged(c)
    listed = json.loads(c.rkel("-o", "json", "cert", "list").stdout)
    assert not [r for r in listed["certificates"] if ":" in r["name"]]
    assert not listed["warnings"]
