"""`rkel snapshot save|list|catalogue|verify|prune`: etcd snapshots (the work is in
`lifecycle.snapshots`).

The global options (config, state, output) come from the main app's callback (`ctx.obj`); the
shared helpers of `lifecycle.cli` are imported inside the commands because that module imports
this one to register the sub-app.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from lifecycle import snapshots
from lifecycle.config import load_config
from lifecycle.errors import RkelError
from lifecycle.runner import desired_for, running_config

snapshot_app = typer.Typer(
    help="etcd snapshots: save, list, catalogue, verify, prune, restore (see also `rkel"
         " rollback`).", no_args_is_help=True)


class SnapshotBackend(str, Enum):
    ssh = "ssh"
    simulated = "simulated"


BACKEND = Annotated[
    SnapshotBackend, typer.Option(help="ssh (real hosts) or simulated (a simulated cluster).")
]

SNAPSHOT_OPTION = Annotated[
    bool, typer.Option(help="Take an etcd snapshot first when the run changes etcd, the "
                            "control plane or versions (the rollback target); "
                            "--no-snapshot skips it, and rollback to before this run.")
]


@contextmanager
def _backend(g: Any, store: Any, config: Any, kind: SnapshotBackend) -> Iterator[Any]:
    from lifecycle import runner
    from lifecycle.cli import _world_path
    from lifecycle.hosts.simulated import SimWorld

    if kind is SnapshotBackend.simulated:
        backend: Any = SimWorld.load(_world_path(g)).backend()
    else:
        backend = runner.real_session(store, config, None, notice=lambda text: typer.echo(
            f"notice: {text}", err=True)).backend
    try:
        yield backend
    finally:
        backend.close()


def _iso(when: datetime | None) -> str:
    return when.isoformat(timespec="microseconds") if when else ""


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


@snapshot_app.command("save")
def save(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Option(
        help="File name (letters, digits, . _ -); default rkel-<UTC timestamp>.")] = None,
    folder: Annotated[Path | None, typer.Option(
        help="Local folder for the copy (default: <config stem>.snapshots/ beside cluster.yml).")
    ] = None,
    backend: BACKEND = SnapshotBackend.ssh,
) -> None:
    """Take an etcd snapshot on a healthy member, keep a copy here and on every etcd node."""
    from lifecycle.cli import _emit, _fail

    g = ctx.obj
    command = " ".join(["rkel", *sys.argv[1:]])
    started = time.monotonic()
    try:
        loaded = load_config(g.config)
        with g.store() as store, snapshots.locked(store, command), \
                _backend(g, store, loaded.config, backend) as be:
            desired = desired_for(loaded.config, store)
            row = snapshots.save_snapshot(store, be, loaded.config, desired, name,
                                          folder=folder or snapshots.default_folder(g.config))
    except RkelError as exc:
        raise _fail(g, exc) from None
    seconds = time.monotonic() - started
    info = snapshots.describe(row)
    others = [n for n in info["nodes"] if n != row.location.get("taken_on")]
    text = (f"Saved etcd snapshot {row.name} ({_human(row.size)}, sha256 {row.sha256[:12]}) in"
            f" {seconds:.1f}s\n  taken on {row.location.get('taken_on')}, copied to"
            f" {', '.join(others) or 'no other node'}: {info['path']}\n"
            f"  local: {info['local']}\n  state copy: {info['state_copy']}")
    _emit(g, text, {**info, "seconds": round(seconds, 2)})


@snapshot_app.command("list")
def list_(
    ctx: typer.Context,
    on_nodes: Annotated[bool, typer.Option(
        "--on-nodes", help="Also ask the etcd nodes for the recurring snapshots"
        " (etcd-rolling-snapshots) not catalogued yet.")] = False,
    backend: BACKEND = SnapshotBackend.ssh,
) -> None:
    """List the catalogued snapshots, oldest first."""
    from lifecycle.cli import _emit, _fail

    g = ctx.obj
    found = snapshots.OnNodes()
    try:
        with g.store() as store:
            rows = store.snapshots()
            if on_nodes:
                config = running_config(store, g.config).config
                with _backend(g, store, config, backend) as be:
                    found = snapshots.recurring_on_nodes(be, config, desired_for(config, store))
    except RkelError as exc:
        raise _fail(g, exc) from None
    data = [{**snapshots.describe(r), "catalogued": True} for r in rows]
    known = {r.name for r in rows}
    loose: list[dict[str, Any]] = [
        {"name": n, "created": _iso(snapshots.taken_at(n)), "kind": "recurring",
         "catalogued": False, "nodes": list(sizes), "size": max(sizes.values())}
        for n, sizes in found.files.items() if n not in known]
    lines = [(f"{'NAME':<32} {'CREATED':<20} {'KIND':<9} {'SIZE':>10} {'SHA256':<12} "
              f"{'STATUS':<8} {'VERSION':<22} WHERE")]
    for d in data:
        where = ", ".join(d["nodes"]) + (" + local" if d["local"] else "")
        lines.append(f"{d['name']:<32} {d['created'][:19].replace('T', ' '):<20} {d['kind']:<9}"
                     f" {_human(d['size']):>10} {d['sha256'][:12]:<12} {d['status']:<8}"
                     f" {d['kubernetes_version'] or '-':<22} {where}")
    for d in loose:
        lines.append(f"{d['name']:<32} {d['created'][:19].replace('T', ' '):<20} {'recurring':<9}"
                     f" {_human(d['size']):>10} {'-':<12} {'on node':<8} {'-':<22}"
                     f" {', '.join(d['nodes'])}")
    if loose:
        lines.append("(\"on node\": not catalogued yet; `rkel snapshot restore NAME` or `rkel"
                     " snapshot catalogue NAME` fetches and catalogues one)")
    for node, why in sorted(found.unreachable.items()):
        typer.echo(f"warning: could not list the snapshots on {node}: {why}", err=True)
    _emit(g, "\n".join(lines) if data or loose else
          "No snapshots yet; take one with `rkel snapshot save`.",
          data + loose if on_nodes else data)


@snapshot_app.command("catalogue")
def catalogue(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(
        help="A recurring snapshot on the etcd nodes, e.g. 2026-01-02T03:04:05Z_etcd.")],
    folder: Annotated[Path | None, typer.Option(
        help="Local folder for the copy (default: <config stem>.snapshots/ beside cluster.yml).")
    ] = None,
    source: Annotated[str | None, typer.Option(
        "--from", help="The etcd node whose file to use, when nodes hold different files of"
        " that name (the others are kept as NAME.<node>).")] = None,
    backend: BACKEND = SnapshotBackend.ssh,
) -> None:
    """Fetch a recurring snapshot (etcd-rolling-snapshots) and catalogue it: test-read by etcd,
    checksummed, a copy kept here. `rkel snapshot restore` can then use it."""
    from lifecycle.cli import _emit, _fail

    g = ctx.obj
    command = " ".join(["rkel", *sys.argv[1:]])
    try:
        with g.store() as store, snapshots.locked(store, command):
            row = catalogue_in(g, store, name, folder, backend, source)
    except RkelError as exc:
        raise _fail(g, exc) from None
    info = snapshots.describe(row)
    _emit(g, f"Catalogued recurring snapshot {row.name} ({_human(row.size)}, sha256"
             f" {row.sha256[:12]}) from {row.location.get('taken_on')}\n  local: {info['local']}",
          info)


def catalogue_in(g: Any, store: Any, name: str, folder: Path | None,
                 backend: SnapshotBackend, source: str | None = None) -> Any:
    """`catalogue_recurring` with the cluster.yml the cluster runs (the caller holds the lock)."""
    config = running_config(store, g.config).config
    with _backend(g, store, config, backend) as be:
        return snapshots.catalogue_recurring(
            store, be, config, desired_for(config, store), name,
            folder=folder or snapshots.default_folder(g.config), source=source,
            notice=lambda text: typer.echo(f"notice: {text}", err=True))


@snapshot_app.command("verify")
def verify(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="The snapshot (default: every one).")] = None,
    backend: BACKEND = SnapshotBackend.ssh,
) -> None:
    """Check the local copy and every etcd node's copy against the catalogue's sha256."""
    from lifecycle.cli import _emit, _fail

    g = ctx.obj
    try:
        config = load_config(g.config).config
        with g.store() as store:
            rows = store.snapshots()
            if name is not None:
                rows = [r for r in rows if r.name == name]
                if not rows:
                    raise snapshots.SnapshotError(
                        f"there is no snapshot {name!r}; `rkel snapshot list` shows them")
            if not rows:
                _emit(g, "No snapshots to verify.", [])
                return
            refs = snapshots.node_refs(store, config)
            with _backend(g, store, config, backend) as be:
                results = [snapshots.verify_snapshot(store, be, r, refs) for r in rows]
            error = snapshots.verify_error(results)
            if error is not None:
                raise error
    except RkelError as exc:
        raise _fail(g, exc) from None
    text = "\n".join(f"{r.name}: OK ({', '.join(r.checked)})" for r in results)
    _emit(g, text, [{"name": r.name, "ok": r.ok, "checked": r.checked} for r in results])


@snapshot_app.command("prune")
def prune(
    ctx: typer.Context,
    keep: Annotated[int | None, typer.Option(
        min=1, help="Keep this many newest (default: backup_config.retention).")] = None,
    older_than: Annotated[str | None, typer.Option(
        help="Remove those older than this, e.g. 72h (default: services.etcd.retention).")
    ] = None,
    backend: BACKEND = SnapshotBackend.ssh,
) -> None:
    """Delete old snapshots from nodes, local folder and catalogue; never the newest.

    Without options, cluster.yml's retention applies."""
    from lifecycle.cli import _emit, _fail

    g = ctx.obj
    command = " ".join(["rkel", *sys.argv[1:]])
    try:
        config = load_config(g.config).config
        if keep is None and older_than is None:
            retention = snapshots.default_retention(config)
        else:
            retention = snapshots.Retention(
                keep, snapshots.parse_duration(older_than) if older_than else None)
        with g.store() as store, snapshots.locked(store, command):
            refs = snapshots.node_refs(store, config)
            if not snapshots.to_prune(store.snapshots(), retention,
                                      datetime.now(UTC)):
                result = snapshots.Pruned(kept=[r.name for r in store.snapshots()])
            else:
                with _backend(g, store, config, backend) as be:
                    result = snapshots.prune_snapshots(store, be, refs, retention)
    except RkelError as exc:
        raise _fail(g, exc) from None
    lines = [f"removed {n}" for n in result.removed] or ["Nothing to prune."]
    lines += [f"kept {n}" for n in result.kept]
    data = {"removed": result.removed, "kept": result.kept, "failures": result.failures}
    if result.failures:
        for n, why in sorted(result.failures.items()):
            typer.echo(f"error: could not remove snapshot {n}: {why}; it stays catalogued,"
                       " run `rkel snapshot prune` again once the nodes are reachable", err=True)
        _emit(g, "\n".join(lines), data)
        raise typer.Exit(6)
    _emit(g, "\n".join(lines), data)
