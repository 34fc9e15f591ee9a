"""Idempotent effects on hosts: observe first, then act, so any effect can be redone after a crash.

These are written against the Host/Kube/Etcd protocols only, so the Simulated and the SSH+Docker
backends share them. A container replacement never leaves the node without its service: the old
container is stopped and set aside as `old-<name>`, the new one started and health-checked, and
only then is the old one removed; if the new one never gets healthy the old one is put back.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

from lifecycle.errors import HealthCheckError, HostError
from lifecycle.hosts import EtcdAPI, Host, KubeAPI
from lifecycle.spec import ServiceSpec

Sleep = Callable[[float], None]

OLD_PREFIX = "old-"
READY_TIMEOUT = 300.0  # Node Ready: RKE waits only 5 x 5 s, which a slow kubelet start misses
READY_INTERVAL = 5.0
READY_RETRIES = int(READY_TIMEOUT // READY_INTERVAL)


def old_name(name: str) -> str:
    return OLD_PREFIX + name


FIRST_PROBE_DELAYS = (0.25, 0.5, 1.0)  # most services answer within a second or two of starting


def probe_delays(spec: ServiceSpec) -> list[float]:
    """The sleeps between health probes: quick ones first, then the check's interval, for as long
    as `retries` probes `interval` apart would take (RKE's budget, without its first 2 s wait)."""
    if spec.health is None:
        return []
    interval = spec.health.interval
    left = (spec.health.retries - 1) * interval
    delays: list[float] = []
    for delay in itertools.chain(FIRST_PROBE_DELAYS, itertools.repeat(interval)):
        if left <= 0:
            return delays
        delays.append(min(delay, interval, left))
        left -= delays[-1]
    return delays


def wait_healthy(host: Host, spec: ServiceSpec, sleep: Sleep) -> bool:
    """Probe until healthy or the spec's retry budget is spent. A spec without a check is healthy."""
    if spec.health is None:
        return True
    for delay in [*probe_delays(spec), None]:
        if host.probe(spec):
            return True
        if delay is not None:
            sleep(delay)
    return False


def _unhealthy(host: Host, spec: ServiceSpec, restored: bool) -> HealthCheckError:
    delays = probe_delays(spec)
    budget = f"{len(delays) + 1} probes over {sum(delays):g}s" if spec.health else ""
    tail = "the previous container was put back" if restored else "there was no previous container"
    return HealthCheckError(
        host.name,
        f"{spec.name} ({spec.image}) never became healthy ({budget}); {tail}. "
        f"Check `docker logs {spec.name}` on the node, fix the cause, then run `rkel apply` again",
    )


def start_service(host: Host, spec: ServiceSpec, sleep: Sleep, extra_args: Sequence[str] = ()) -> None:
    """Make the container of `spec` exist, run and pass its health check."""
    containers = host.containers()
    have = containers.get(spec.name)
    if have is not None and have.spec_hash != spec.hash:
        # Something else holds the name (an RKE-made container, or a half-done earlier run).
        replace_service(host, spec, sleep, extra_args)
        return
    if have is None:
        leftover = containers.get(old_name(spec.name))
        if leftover is not None:
            host.remove_container(leftover.name)
        host.run_container(spec, extra_args)
    elif not have.running:
        host.start_container(spec.name)
    if not wait_healthy(host, spec, sleep):
        raise _unhealthy(host, spec, restored=False)


def replace_service(
    host: Host, spec: ServiceSpec, sleep: Sleep, extra_args: Sequence[str] = ()
) -> None:
    """Swap the service's container for one built from `spec`, keeping the old one until healthy.

    Safe to call again at any point of an earlier, interrupted call: a container already carrying
    the new hash is health-checked rather than recreated, and a leftover `old-<name>` is the one to
    restore or clean up.
    """
    aside = old_name(spec.name)
    containers = host.containers()
    have = containers.get(spec.name)
    old = containers.get(aside)
    if have is not None and have.spec_hash == spec.hash:
        if old is not None and old.running:
            # both run: the Docker Engine restarted (restart=always) mid-replacement. Host
            # networking: the old copy may hold the ports the new one needs, and would answer
            # its health check; stop it, then start the new one afresh.
            host.stop_container(aside)
            if have.running:
                host.stop_container(spec.name)
            have = None
        if have is None or not have.running:
            host.start_container(spec.name)
    else:
        if have is not None:
            if old is not None:
                host.remove_container(aside)  # a stale leftover; `have` is the one in service
            if have.running:
                host.stop_container(spec.name)  # host networking: both cannot hold the ports
            host.rename_container(spec.name, aside)
            old = have
        host.run_container(spec, extra_args)
    if wait_healthy(host, spec, sleep):
        if old is not None:
            host.remove_container(aside)
        return
    host.remove_container(spec.name)
    if old is not None:
        host.rename_container(aside, spec.name)
        host.start_container(spec.name)
    raise _unhealthy(host, spec, restored=old is not None)


def remove_service(host: Host, name: str) -> None:
    """Remove the service's container and any leftover `old-` copy."""
    containers = host.containers()
    for candidate in (name, old_name(name)):
        if candidate in containers:
            host.remove_container(candidate)


# ---------------------------------------------------------------------------- kubernetes
def same_version(reported: str, tag: str) -> bool:
    """A kubelet reports v1.30.5 for image tag v1.30.5-rancher1: compare the release only."""
    return reported.split("-")[0].lstrip("v") == tag.split("-")[0].lstrip("v")


def wait_node_ready(kube: KubeAPI, name: str, sleep: Sleep, version: str = "",
                    timeout: float = READY_TIMEOUT) -> None:
    """Wait until the Node is Ready (at `version` when given), polling every READY_INTERVAL."""
    seen = "not registered"
    retries = max(1, int(timeout // READY_INTERVAL))
    for attempt in range(retries):
        node = kube.node(name)
        if node is not None:
            seen = f"Ready={node.ready}, kubelet {node.kubelet_version or '?'}"
            if node.ready and (not version or same_version(node.kubelet_version, version)):
                return
        if attempt + 1 < retries:
            sleep(READY_INTERVAL)
    raise HealthCheckError(
        name,
        f"Kubernetes node {name} not Ready{' at ' + version if version else ''} after "
        f"{retries * READY_INTERVAL:g}s ({seen}); check the kubelet on the node, then "
        "run `rkel apply` again (or give it longer with --node-ready-timeout)",
    )


# ---------------------------------------------------------------------------- etcd
def etcd_peer_url(address: str) -> str:
    return f"https://{address}:2380"


def etcd_member_name(node: str) -> str:
    return f"etcd-{node}"


def etcd_join(etcd: EtcdAPI, node: str, address: str) -> None:
    """Add the node as a learner member unless it is a member already."""
    name = etcd_member_name(node)
    if any(m.name == name for m in etcd.members()):
        return
    etcd.add_member(name, etcd_peer_url(address))


def etcd_bootstrap_args(
    etcd: EtcdAPI | None, node: str, address: str, token: str
) -> list[str]:
    """--initial-cluster* for a member's first start: itself alone when `etcd` is None (a new
    cluster), else every current member, joining as `existing`."""
    me = etcd_member_name(node)
    if etcd is None:
        peers = {me: etcd_peer_url(address)}
        state = "new"
    else:
        peers = {m.name: m.peer_url for m in etcd.members()}
        peers.setdefault(me, etcd_peer_url(address))
        state = "existing"
    initial = ",".join(f"{n}={u}" for n, u in sorted(peers.items()))
    return [
        f"--initial-cluster={initial}",
        f"--initial-cluster-state={state}",
        f"--initial-cluster-token={token}",
    ]


def etcd_settle(etcd: EtcdAPI, node: str, sleep: Sleep, retries: int = 20, interval: float = 3.0) -> None:
    """Promote the node if it is a learner, then wait until EVERY member is healthy."""
    name = etcd_member_name(node)
    last = ""
    for attempt in range(retries):
        try:
            members = {m.name: m for m in etcd.members()}
            if name in members and members[name].learner:
                etcd.promote_member(name)
            health = etcd.healthy()
            sick = sorted(n for n, ok in health.items() if not ok)
            if not sick:
                return
            last = f"unhealthy: {', '.join(sick)}"
        except HostError as exc:
            last = str(exc)
        if attempt + 1 < retries:
            sleep(interval)
    raise HealthCheckError(
        node,
        f"etcd cluster not healthy after {name} started ({last}); run `rkel status`, fix the "
        "member(s), then run `rkel apply` again",
    )


def etcd_clear_unstarted(etcd: EtcdAPI, host: Host, node: str, data_dir: str) -> None:
    """Before a joining member's first start, empty its data dir: a learner that never started
    has no data of this cluster, and old data from an earlier membership would make it fail."""
    name = etcd_member_name(node)
    member = next((m for m in etcd.members() if m.name == name), None)
    if member is not None and not member.started and "etcd" not in host.containers():
        host.remove_paths([data_dir])


def refuse_foreign_etcd_data(host: Host, node: str, data_dir: str) -> None:
    """Before the first member of a new cluster starts: its data dir must hold no etcd data
    unless rkel's own etcd container is there (a run killed or failed mid-start wrote it).
    The state records no member yet, so the data is another cluster's (RKE's, say) or one
    whose state was lost: etcd would start as that cluster and never be healthy here, and
    rkel does not delete what it did not write."""
    containers = host.containers()
    mine = [c for c in (containers.get("etcd"), containers.get(f"{OLD_PREFIX}etcd"))
            if c is not None and c.spec_hash]
    if mine or "db" not in host.list_files(f"{data_dir.rstrip('/')}/member/snap"):
        return
    foreign = "etcd" in containers  # a container of that name rkel did not make
    raise HostError(node, f"{data_dir} already holds etcd data (member/snap/db) and no etcd"
                    " member of this state ran there"
                    + (", beside an etcd container rkel did not make" if foreign else "")
                    + ": another cluster's, one whose state was lost, or an earlier failed"
                    " start's whose container was removed. rkel does not start a new cluster"
                    " over it. "
                    + ("If it is an RKE cluster, adopt it instead (`rkel import --rke-state"
                       " cluster.rkestate`, see Migrating from RKE). " if foreign else "")
                    + f"If the data is not needed, move it away on the node (e.g. `sudo mv"
                    f" {data_dir} {data_dir}.old`); if it is this cluster's, bring its state"
                    " back instead (`rkel state unpack` of a bundle, or a snapshot's .rkel.db"
                    " copy)")


def etcd_leave(etcd: EtcdAPI, node: str) -> None:
    """Remove the node's member if it is still one."""
    name = etcd_member_name(node)
    if any(m.name == name for m in etcd.members()):
        etcd.remove_member(name)
