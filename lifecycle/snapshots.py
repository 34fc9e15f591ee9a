"""etcd snapshots: save (take, test-read, fetch, copy to every etcd node, catalogue), list, verify
and prune. Restoring one and rolling back to it are in `lifecycle.restore`.

A snapshot is taken on one healthy member with `etcdctl snapshot save` against that member's own
client URL, in a short-lived container from the cluster's etcd image (host network, the node's
/etc/kubernetes read-only, RKE's snapshot folder /opt/rke/etcd-snapshots). etcdctl authenticates
with the member's own certificate files already on the node: no key travels in a command line or
an environment. The file is then test-read (`etcdctl snapshot status`), streamed back to a local
folder beside cluster.yml with a consistent copy of the state database, copied to every other
etcd node, checked there by sha256, and only then catalogued: a catalogue row always means
"every copy was there and matched". Nothing here prints; the CLI renders.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from lifecycle.config.model import ClusterConfig
from lifecycle.desired import SNAPSHOT_DIR, recurring_snapshots
from lifecycle.errors import (
    HostError,
    HostUnreachableError,
    LockHeldError,
    PlanError,
    RkelError,
    StateError,
)
from lifecycle.hosts import Backend, Host
from lifecycle.hosts.etcdctl import _json
from lifecycle.spec import Desired, NodeDesired, NodeRef, ServiceSpec
from store import LockHeld, SnapshotRow, Store, StoreError

ETCDCTL = "/usr/local/bin/etcdctl"  # where the upstream etcd image has it
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# The etcd-rolling-snapshots container's file names (rke-tools: RFC 3339 UTC time, then _etcd).
RECURRING_NAME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)_etcd")
STATE_COPY_SUFFIX = ".rkel.db"
HEALTH_TRIES, HEALTH_WAIT = 10, 3.0  # how long a save waits for a healthy member: 27 s
APPLIED_CONFIG = "applied_config"  # store meta: the sealed cluster.yml the cluster runs
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class SnapshotError(PlanError):
    """A snapshot cannot be taken, is unknown, or does not match its catalogue entry."""


# ---------------------------------------------------------------------------- names and places
def default_name(now: datetime | None = None, prefix: str = "rkel") -> str:
    """<prefix>-<UTC yyyymmddThhmmssZ> (RKE names its own <cluster>-<timestamp>)."""
    return f"{prefix}-{(now or datetime.now(UTC)):%Y%m%dT%H%M%SZ}"


def unused_name(store: Store, folder: Path, stem: str) -> str:
    """`stem`, or `stem-2`, `stem-3`, ... : the first name neither catalogued nor on disk in
    `folder` (two runs within one second must not collide on a timestamped name)."""
    names = (stem if n == 1 else f"{stem}-{n}" for n in itertools.count(1))
    return next(name for name in names
                if store.snapshot(name) is None and not (folder / name).exists())


def check_name(name: str) -> str:
    """`name` if it is a safe snapshot file name: letters, digits, `.`, `_`, `-` (or the name
    of a recurring snapshot, which also holds `:`)."""
    if taken_at(name) is not None:
        return name
    if not NAME_PATTERN.fullmatch(name) or name.endswith((".part", STATE_COPY_SUFFIX)):
        raise SnapshotError(
            f"invalid snapshot name {name!r}: use 1-128 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit (no '/'; not ending in .part or .rkel.db)")
    return name


def default_folder(config_path: Path) -> Path:
    """Where local copies live by default: `<config stem>.snapshots/` beside cluster.yml."""
    return config_path.with_name(f"{config_path.stem}.snapshots")


def remote_dir(config: ClusterConfig) -> str:
    """The snapshot folder on the nodes, under prefix_path."""
    return f"{config.prefix_path.rstrip('/')}{SNAPSHOT_DIR}"


def parse_duration(text: str) -> timedelta:
    """`72h`, `30m`, `1h30m`, `7d` (Go's duration units plus d) as a timedelta."""
    clean = text.strip().lower()
    parts = _DURATION.findall(clean)
    if not parts or "".join(n + u for n, u in parts) != clean:
        raise SnapshotError(f"invalid duration {text!r}: write it like 72h, 30m, 1h30m or 7d")
    return timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in parts))


def recurring_snapshot_warning(config: ClusterConfig) -> str | None:
    """The warning plan/apply print about RKE's recurring snapshots: rkel runs them (the
    `etcd-rolling-snapshots` container, see `lifecycle.desired`), but not their S3 uploads."""
    etcd = config.services.etcd
    backup = etcd.backup_config
    if not recurring_snapshots(etcd) or backup is None or backup.s3backupconfig is None:
        return None
    return ("services.etcd.backup_config.s3backupconfig asks for S3 uploads of the recurring etcd"
            " snapshots, which rkel does not do yet: the etcd-rolling-snapshots container still"
            f" takes them locally on each etcd node ({remote_dir(config)}); copy them off the"
            " nodes yourself, or use `rkel snapshot save`, which keeps a copy beside cluster.yml")


# ---------------------------------------------------------------------------- helpers
def _ref(node: NodeDesired) -> NodeRef:
    return NodeRef(node.name, node.address, node.internal_address, node.port, node.user,
                   node.roles)


def _etcd_members(desired: Desired) -> list[tuple[NodeDesired, ServiceSpec]]:
    out = []
    for node in sorted(desired.etcd_nodes, key=lambda n: n.name):
        spec = node.service("etcd")
        if spec is not None:
            out.append((node, spec))
    return out


def _env(spec: ServiceSpec) -> dict[str, str]:
    return dict(item.partition("=")[::2] for item in spec.env)


def etcdctl_command(spec: ServiceSpec, *args: str) -> list[str]:
    """etcdctl with the member's own client credentials: the paths the etcd container's
    ETCDCTL_* environment names (files on the node, never their content)."""
    env = _env(spec)
    return [ETCDCTL, f"--endpoints={env['ETCDCTL_ENDPOINTS']}", f"--cacert={env['ETCDCTL_CACERT']}",
            f"--cert={env['ETCDCTL_CERT']}", f"--key={env['ETCDCTL_KEY']}",
            "--command-timeout=300s", *args]


def _binds(config: ClusterConfig) -> list[str]:
    prefix = config.prefix_path.rstrip("/")
    return [f"{prefix}/etc/kubernetes:/etc/kubernetes:ro", f"{remote_dir(config)}:{SNAPSHOT_DIR}"]


def _output_tail(out: str) -> str:
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    return " ".join((errors or lines or ["no output"])[-1:])[:300]


def sha256_file(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a local file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def public_config(value: Any) -> Any:
    """cluster.yml as loaded, as JSON-able data without secrets: every model field declared
    `repr=False` (SSH keys, registry passwords, S3 secret, etcd key) and the secrets encryption
    config are left out."""
    if is_dataclass(value) and not isinstance(value, type):
        out = {f.name: public_config(getattr(value, f.name)) for f in fields(value) if f.repr}
        if "secrets_encryption_config" in out and out["secrets_encryption_config"] is not None:
            out["secrets_encryption_config"] = {"redacted": True}
        return out
    if isinstance(value, dict):
        return {str(k): public_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_config(v) for v in value]
    return value


def _versions(store: Store, desired: Desired) -> dict[str, Any]:
    images: dict[str, dict[str, str]] = {}
    for s in store.services():
        if s.image:
            images.setdefault(s.node, {})[s.name] = s.image
    return {"kubernetes_version": store.get_meta("kubernetes_version", "")
            or desired.kubernetes_version,
            "images": {n: dict(sorted(v.items())) for n, v in sorted(images.items())}}


def copy_state(store: Store, into: Path) -> Path:
    """A consistent copy of the state database (SQLite's online backup: WAL-safe), mode 0600.
    Private keys in it stay encrypted with the state key, as in the store."""
    os.close(os.open(into, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    src = sqlite3.connect(str(store.path))
    dst = sqlite3.connect(str(into))
    try:
        with dst:
            src.backup(dst)
    finally:
        src.close()
        dst.close()
    return into


def _fan_out(items: Sequence[NodeRef], work: Callable[[NodeRef], None]) -> dict[str, Exception]:
    """Run `work` on every node at once; every node's failure, by node name."""
    failures: dict[str, Exception] = {}
    if not items:
        return failures
    with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
        futures = {ref.name: pool.submit(work, ref) for ref in items}
    for name, fut in sorted(futures.items()):
        exc = fut.exception()
        if isinstance(exc, Exception):
            failures[name] = exc
    return failures



@contextmanager
def locked(store: Store, command: str) -> Iterator[None]:
    """Hold the run lock (save and prune must not interleave with a run or with each other)."""
    try:
        store.acquire_lock(None, command)
    except LockHeld as held:
        raise LockHeldError(
            f"another rkel run holds the lock on {store.path}: pid {held.pid} on {held.hostname},"
            f" started {held.started_at} ({held.command}); wait for it to finish, then try again"
        ) from held
    try:
        yield
    finally:
        store.release_lock()


# ---------------------------------------------------------------------------- save
def pick_member(backend: Backend, desired: Desired) -> tuple[NodeDesired, ServiceSpec]:
    """The first etcd node by name whose member is healthy (health of every member asked; up
    to HEALTH_TRIES times, HEALTH_WAIT seconds apart, while none is)."""
    members = _etcd_members(desired)
    if not members:
        raise SnapshotError("cluster.yml has no etcd node rkel runs etcd on (external etcd is"
                            " not snapshotted by rkel); nothing to snapshot")
    for attempt in range(HEALTH_TRIES):  # a member just back (a healed network) needs a moment
        health = backend.etcd().healthy()
        for node, spec in members:
            if health.get(f"etcd-{node.name}"):
                return node, spec
        if attempt + 1 < HEALTH_TRIES:
            backend.sleep(HEALTH_WAIT)
    seen = ", ".join(f"{k} {'healthy' if v else 'unhealthy'}" for k, v in sorted(health.items()))
    raise SnapshotError(f"no etcd member of cluster.yml is healthy ({seen or 'no members'});"
                        " run `rkel status` and fix etcd (`rkel apply`), then save again")


def _take(host: Host, spec: ServiceSpec, config: ClusterConfig, remote: str) -> dict[str, Any]:
    """`etcdctl snapshot save` on the member, then `snapshot status` (a test read): its JSON."""
    inside = f"{SNAPSHOT_DIR}/{remote.rsplit('/', 1)[1]}"
    code, out = host.run_once(spec.image, etcdctl_command(spec, "snapshot", "save", inside),
                              binds=_binds(config), host_network=True, env=["ETCDCTL_API=3"])
    if code != 0:
        raise HostError(host.name, f"etcdctl snapshot save failed: {_output_tail(out)}; check"
                        " the etcd container (`docker logs etcd`) and free space in"
                        f" {remote_dir(config)}")
    status, why = _read_back(host, spec, config, inside)
    if status is None:
        raise SnapshotError(f"the snapshot taken on {host.name} does not read back"
                            f" (etcdctl snapshot status: {why}); it was discarded")
    return status


def _read_back(host: Host, spec: ServiceSpec, config: ClusterConfig,
               inside: str) -> tuple[dict[str, Any] | None, str]:
    """`etcdctl snapshot status` of a file in the snapshot folder (a test read): (its JSON,
    "") or (None, why etcd cannot read it)."""
    code, out = host.run_once(spec.image, [ETCDCTL, "snapshot", "status", inside, "-w", "json"],
                              binds=_binds(config), env=["ETCDCTL_API=3"])
    status = _json(out, dict)
    if code == 0 and isinstance(status, dict):
        return status, ""
    return None, _output_tail(out)


def _fetch(host: Host, remote: str, part: Path, local: Path,
           on_node: str | None) -> tuple[str, int]:
    """Stream `remote` into `part` (0600, fsynced), check it against `on_node` (the sha256
    computed on the node), then move it to `local`: (sha256, size). A `part` left by a killed
    run is discarded first (the caller holds the run lock)."""
    part.unlink(missing_ok=True)
    fd = os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as out:
        host.fetch_file(remote, out)
        out.flush()
        os.fsync(out.fileno())
    digest, size = sha256_file(part)
    if on_node != digest:
        raise SnapshotError(f"the copy fetched from {host.name} does not match it (sha256"
                            f" {digest} here, {on_node or 'missing'} on the node); try again")
    os.replace(part, local)
    return digest, size


def save_snapshot(store: Store, backend: Backend, config: ClusterConfig, desired: Desired,
                  name: str | None = None, *, kind: str = "manual", folder: Path,
                  run_id: int | None = None,
                  clock: Callable[[], float] = time.monotonic) -> SnapshotRow:
    """Take, check, fetch and spread an etcd snapshot, then catalogue it.

    :param name: the file name (default `rkel-<UTC timestamp>`), checked by `check_name`.
    :param kind: manual (`rkel snapshot save`) or auto (before a disruptive run).
    :param folder: the local folder (0700) that gets the file and a copy of the state (0600).
    The caller holds the run lock. On any failure, every copy made so far is removed again and
    nothing is catalogued.
    """
    started = clock()
    name = check_name(name or unused_name(store, folder, default_name()))
    if RECURRING_NAME.fullmatch(name):
        raise SnapshotError(f"{name!r} is named like the recurring snapshots (<time>_etcd), which"
                            " the etcd-rolling-snapshots container prunes; pick another --name")
    if store.snapshot(name) is not None:
        raise SnapshotError(f"a snapshot named {name!r} already exists; pick another --name")
    source, spec = pick_member(backend, desired)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    local, state_copy = folder / name, folder / f"{name}{STATE_COPY_SUFFIX}"
    for path in (local, state_copy):
        if path.exists():
            raise SnapshotError(f"{path} already exists but is not catalogued; move it away or"
                                " pick another --name")
    remote = f"{remote_dir(config)}/{name}"
    others = [_ref(n) for n, _ in _etcd_members(desired) if n.name != source.name]
    touched: list[NodeRef] = [_ref(source)]
    part = folder / f".{name}.part"
    try:
        host = backend.host(_ref(source))
        etcd_status = _take(host, spec, config, remote)
        copy_state(store, state_copy)
        digest, size = _fetch(host, remote, part, local, host.file_sha256(remote))
        touched += others

        def spread(ref: NodeRef) -> None:
            target = backend.host(ref)
            with local.open("rb") as src:
                target.put_file(remote, src, size)
            got = target.file_sha256(remote)
            if got != digest:
                raise SnapshotError(f"{ref.name}: the copy of {remote} has sha256"
                                    f" {got or '(missing)'}, expected {digest}")

        failures = _fan_out(others, spread)
        if failures:
            raise _combined(f"copying snapshot {name} to the etcd nodes failed", failures)
        location = {
            "path": remote,
            "nodes": sorted([source.name, *(r.name for r in others)]),
            "taken_on": source.name,
            "local": str(local.resolve()),
            "state_copy": str(state_copy.resolve()),
            "etcd": {"revision": etcd_status.get("revision"),
                     "total_keys": etcd_status.get("totalKey"),
                     "total_size": etcd_status.get("totalSize")},
            "seconds": round(clock() - started, 2),
        }
        applied = store.get_meta(APPLIED_CONFIG)
        if applied:  # sealed with the state key: what `rkel rollback` puts back
            location["cluster_yml"] = applied
        try:
            return store.add_snapshot(name, kind=kind, sha256=digest, size=size,
                                      location=location, versions=_versions(store, desired),
                                      config=public_config(config), run_id=run_id)
        except StoreError as exc:
            raise StateError(f"cataloguing snapshot {name} failed: {exc}") from exc
    except BaseException:
        _discard(backend, touched, remote, [part, local, state_copy])
        raise


def _discard(backend: Backend, refs: Sequence[NodeRef], remote: str, paths: Sequence[Path]) -> None:
    """Best effort: remove a failed save's copies (the error being raised matters more)."""
    for path in paths:
        path.unlink(missing_ok=True)
    for ref in refs:
        try:
            backend.host(ref).remove_paths([remote, f"{remote}.part"])
        except RkelError:
            pass


def _combined(what: str, failures: dict[str, Exception]) -> RkelError:
    text = "; ".join(str(exc) if str(exc).startswith(f"{n}:") else f"{n}: {exc}"
                     for n, exc in sorted(failures.items()))
    message = f"{what}: {text}; nothing was catalogued — fix it and save again"
    if all(isinstance(e, HostUnreachableError) for e in failures.values()):
        return HostUnreachableError(", ".join(sorted(failures)), message)
    if all(isinstance(e, HostError) and not isinstance(e, SnapshotError)
           for e in failures.values()):
        return HostError(", ".join(sorted(failures)), message)
    return SnapshotError(message)


# ---------------------------------------------------------------------------- recurring
@dataclass
class OnNodes:
    """The recurring snapshot files the etcd nodes hold: name -> {node: size}, and the nodes
    that could not be asked, with why."""

    files: dict[str, dict[str, int]] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)


def recurring_on_nodes(backend: Backend, config: ClusterConfig, desired: Desired) -> OnNodes:
    """List every etcd node's snapshot folder (all at once) for the etcd-rolling-snapshots
    container's `<time>_etcd` files."""
    found = OnNodes()
    folder = remote_dir(config)

    def scan(ref: NodeRef) -> None:
        for name, size in backend.host(ref).list_files(folder).items():
            if taken_at(name) is not None:
                found.files.setdefault(name, {})[ref.name] = size

    failures = _fan_out([_ref(n) for n, _ in _etcd_members(desired)], scan)
    found.unreachable = {n: str(exc) for n, exc in failures.items()}
    found.files = {k: dict(sorted(v.items())) for k, v in sorted(found.files.items())}
    return found


def taken_at(name: str) -> datetime | None:
    """When a recurring snapshot was taken, from its name (None: not a recurring name)."""
    match = RECURRING_NAME.fullmatch(name)
    if match is None:
        return None
    try:
        return datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:  # digits in the right places, but no such time (02-30, 24:00)
        return None


def catalogue_recurring(store: Store, backend: Backend, config: ClusterConfig, desired: Desired,
                        name: str, *, folder: Path, source: str | None = None,
                        notice: Callable[[str], None] = lambda text: None) -> SnapshotRow:
    """Catalogue a file of the etcd-rolling-snapshots container so it can be restored: found
    on the etcd nodes, test-read by etcd there, fetched here and checksummed.

    It carries no component versions and no cluster.yml (nobody recorded them when the
    container took it), so `rkel snapshot restore` can use it and `rkel rollback` cannot.
    Each etcd node takes its own, so two nodes may hold different files of one name: then
    `source` must say whose to use, and the others' are renamed `<name>.<node>` (kept, never
    overwritten by a restore). The caller holds the run lock.
    """
    when = taken_at(name)
    if when is None:
        raise SnapshotError(f"{name!r} is not a recurring snapshot's name (<UTC time>_etcd, e.g."
                            " 2026-01-02T03:04:05Z_etcd); `rkel snapshot list --on-nodes` shows"
                            " them")
    if store.snapshot(name) is not None:
        raise SnapshotError(f"snapshot {name} is already catalogued")
    found = recurring_on_nodes(backend, config, desired)
    holders = sorted(found.files.get(name, {}))
    if not holders:
        gone = (f"; {', '.join(sorted(found.unreachable))} could not be asked"
                if found.unreachable else "")
        raise SnapshotError(f"no etcd node holds {remote_dir(config)}/{name}{gone}; `rkel"
                            " snapshot list --on-nodes` shows the recurring snapshots they hold")
    remote = f"{remote_dir(config)}/{name}"
    members = dict(_etcd_members(desired))
    by_name = {n.name: n for n in members}
    if source is not None and source not in holders:
        raise SnapshotError(f"{source} holds no {remote} (it is on {', '.join(holders)})")
    digests = {n: backend.host(_ref(by_name[n])).file_sha256(remote) for n in holders}
    chosen = by_name[source or holders[0]]
    if len(set(digests.values())) > 1 and source is None:
        listed = ", ".join(f"{n} sha256 {d and d[:12]}" for n, d in digests.items())
        raise SnapshotError(f"the etcd nodes hold different files named {name} ({listed}):"
                            " each node takes its own. Choose whose to use with `rkel snapshot"
                            f" catalogue {name} --from NODE`; the others are kept, renamed"
                            f" {name}.<node>")
    local, part = folder / name, folder / f".{name}.part"
    if local.exists():
        raise SnapshotError(f"{local} already exists but is not catalogued; move it away first")
    host = backend.host(_ref(chosen))
    status, why = _read_back(host, members[chosen], config, f"{SNAPSHOT_DIR}/{name}")
    if status is None:
        raise SnapshotError(f"{chosen.name}: {remote} does not read as an etcd snapshot"
                            f" (etcdctl snapshot status: {why}); pick another one")
    for node, digest in digests.items():
        if digest != digests[chosen.name]:  # its own, different file: kept under another name
            backend.host(_ref(by_name[node])).move_paths(
                remote_dir(config), [(name, f"{name}.{node}")], replace=False)
            notice(f"{node}'s own {name} is kept as {remote}.{node}")
    holders = [n for n in holders if digests[n] == digests[chosen.name]]
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    try:
        digest, size = _fetch(host, remote, part, local, digests[chosen.name])
        location = {
            "path": remote, "nodes": holders, "taken_on": chosen.name,
            "local": str(local.resolve()), "state_copy": "", "recurring": True,
            "etcd": {"revision": status.get("revision"), "total_keys": status.get("totalKey"),
                     "total_size": status.get("totalSize")},
        }
        try:
            return store.add_snapshot(name, kind="recurring", sha256=digest, size=size,
                                      location=location, versions={}, config={},
                                      created_at=when.isoformat(timespec="microseconds"))
        except StoreError as exc:
            raise StateError(f"cataloguing snapshot {name} failed: {exc}") from exc
    except BaseException:
        for path in (part, local):
            path.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------- list
def describe(row: SnapshotRow) -> dict[str, Any]:
    """What `rkel snapshot list` shows of one snapshot."""
    return {
        "name": row.name,
        "created": row.created_at,
        "kind": row.kind,
        "size": row.size,
        "sha256": row.sha256,
        "status": row.status,
        "kubernetes_version": row.versions.get("kubernetes_version", ""),
        "images": row.versions.get("images", {}),
        "nodes": list(row.location.get("nodes", [])),
        "path": row.location.get("path", ""),
        "local": row.location.get("local", ""),
        "state_copy": row.location.get("state_copy", ""),
    }


# ---------------------------------------------------------------------------- verify
@dataclass
class Verified:
    """One snapshot's verification: every problem found, by where."""

    name: str
    problems: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # "local" and node names that matched

    @property
    def ok(self) -> bool:
        return not self.problems and not self.unreachable


def node_refs(store: Store, config: ClusterConfig | None) -> dict[str, NodeRef]:
    """How to reach every node rkel knows: cluster.yml first, then the state."""
    refs = {n.name: NodeRef(n.name, n.address, n.internal_address, n.port, n.user,
                            tuple(n.roles)) for n in store.nodes()}
    for n in config.nodes if config else ():
        refs[n.name] = NodeRef(n.name, n.address, n.internal, n.port, n.user, tuple(n.role))
    return refs


def verify_snapshot(store: Store, backend: Backend, row: SnapshotRow,
                    refs: dict[str, NodeRef]) -> Verified:
    """Check the local file and every node's copy against the catalogue; record the status
    (ok, corrupt or missing; unchanged when a node could not be reached)."""
    result = Verified(row.name)
    # an edited row (its sha256 among them) would make every check below meaningless
    result.problems += store.catalogue_problems(row.name)
    local = Path(str(row.location.get("local", "")))
    if not local.is_file():
        result.problems.append(f"local copy {local} is missing")
    else:
        digest, size = sha256_file(local)
        if digest != row.sha256:
            result.problems.append(f"local copy {local} has sha256 {digest} ({size} bytes),"
                                   f" expected {row.sha256} ({row.size} bytes)")
        else:
            result.checked.append("local")
    remote = str(row.location.get("path", ""))
    wanted = [str(n) for n in row.location.get("nodes", [])]

    def check(ref: NodeRef) -> None:
        got = backend.host(ref).file_sha256(remote)
        if got is None:
            raise SnapshotError(f"{ref.name}: {remote} is missing")
        if got != row.sha256:
            raise SnapshotError(f"{ref.name}: {remote} has sha256 {got}, expected {row.sha256}")

    known = [refs[n] for n in wanted if n in refs]
    result.problems += [f"{n}: node no longer known (not in cluster.yml or the state)"
                        for n in wanted if n not in refs]
    failures = _fan_out(known, check)
    for node, exc in failures.items():
        if isinstance(exc, SnapshotError) or not isinstance(exc, HostError):
            result.problems.append(str(exc))
        else:
            result.unreachable.append(f"{node}: could not check ({exc})")
    result.checked += [ref.name for ref in known if ref.name not in failures]
    if result.problems:
        missing = all("missing" in p for p in result.problems)
        store.set_snapshot_status(row.name, "missing" if missing else "corrupt")
    elif not result.unreachable:
        store.set_snapshot_status(row.name, "ok")
    return result


def verify_error(results: Sequence[Verified]) -> RkelError | None:
    """The error for a verification with problems (None when every snapshot checked out)."""
    bad = [r for r in results if not r.ok]
    if not bad:
        return None
    lines = [f"snapshot {r.name}: " + "; ".join(r.problems + r.unreachable) for r in bad]
    text = "\n".join(lines)
    if all(not r.problems for r in bad):
        return HostUnreachableError("etcd nodes", f"could not verify every copy:\n{text}\n"
                                    "check the nodes are reachable, then verify again")
    return SnapshotError(f"snapshot verification failed:\n{text}\nthe copies named above cannot"
                         " be trusted for a restore; take a new snapshot (`rkel snapshot save`)"
                         " and prune the bad one")


# ---------------------------------------------------------------------------- prune
@dataclass(frozen=True)
class Retention:
    keep: int | None  # keep at most this many newest
    older_than: timedelta | None  # remove those older than this


def default_retention(config: ClusterConfig) -> Retention:
    """RKE's: backup_config.retention (a count) when backup_config is set, else
    services.etcd.retention (a duration, 72h by default)."""
    etcd = config.services.etcd
    if etcd.backup_config is not None:
        return Retention(max(1, etcd.backup_config.retention), None)
    return Retention(None, parse_duration(etcd.retention or "72h"))


def to_prune(rows: Sequence[SnapshotRow], retention: Retention, now: datetime) -> list[SnapshotRow]:
    """The snapshots `retention` removes, oldest first; never the newest one."""
    ordered = sorted(rows, key=lambda r: (r.created_at, r.name))
    if len(ordered) <= 1:
        return []
    candidates = ordered[:-1]
    doomed: dict[str, SnapshotRow] = {}
    if retention.keep is not None:
        extra = max(0, len(ordered) - max(1, retention.keep))
        for row in ordered[:extra]:
            doomed[row.name] = row
    if retention.older_than is not None:
        for row in candidates:
            if now - datetime.fromisoformat(row.created_at) > retention.older_than:
                doomed[row.name] = row
    return [r for r in candidates if r.name in doomed]


def _remover(backend: Backend, path: str) -> Callable[[NodeRef], None]:
    def remove(ref: NodeRef) -> None:
        backend.host(ref).remove_paths([path])
    return remove


@dataclass
class Pruned:
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # snapshot -> what failed


def prune_snapshots(store: Store, backend: Backend, refs: dict[str, NodeRef],
                    retention: Retention, now: datetime | None = None) -> Pruned:
    """Delete what `retention` removes from the nodes, the local folder and the catalogue.
    A snapshot whose node copies could not all be deleted stays catalogued (and is reported)."""
    rows = store.snapshots()
    doomed = to_prune(rows, retention, now or datetime.now(UTC))
    result = Pruned(kept=[r.name for r in rows if r not in doomed])
    for row in doomed:
        remote = str(row.location.get("path", ""))
        nodes = [refs[n] for n in row.location.get("nodes", []) if n in refs]
        failures = _fan_out(nodes, _remover(backend, remote))
        if failures:
            result.failures[row.name] = "; ".join(f"{n}: {e}" for n, e in sorted(failures.items()))
            continue
        for key in ("local", "state_copy"):
            if row.location.get(key):
                Path(str(row.location[key])).unlink(missing_ok=True)
        store.delete_snapshot(row.name)
        result.removed.append(row.name)
    return result
