"""`rkel rollback` and `rkel snapshot restore`: plan, confirm, run (journaled, resumable)."""

from __future__ import annotations

import itertools
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lifecycle import restore, runner, snapshots
from lifecycle.cli import render
from lifecycle.cli.snapshot import BACKEND, SnapshotBackend, catalogue_in, snapshot_app
from lifecycle.effects import READY_TIMEOUT
from lifecycle.errors import RkelError
from lifecycle.snapshots import describe


# ---------------------------------------------------------------------------- rendering
def rollback_text(rb: runner.RollbackPlan, config: Path) -> str:
    info = describe(rb.row)
    what = ("its etcd data, then every component back to the cluster.yml recorded with it"
            if rb.loaded is not None else "its etcd data only (components keep their versions)")
    head = (f"Rollback to snapshot {rb.row.name} (taken {info['created']}, {info['kind']},"
            f" Kubernetes {info['kubernetes_version'] or '?'}): {what}.\n"
            "Objects created in Kubernetes after the snapshot are gone afterwards; that is what"
            " a restore means.\n\n")
    text = head + render.plan_text(rb.plan)
    if rb.text:
        changes = _config_diff(rb, config)
        text += ("\n\ncluster.yml: no change needed." if not changes else
                 "\n\nYour cluster.yml should then read as recorded with the snapshot"
                 f" (`rkel rollback --write-config` writes it):\n{changes}")
    return text


def rollback_json(rb: runner.RollbackPlan) -> dict[str, Any]:
    return {"snapshot": describe(rb.row), "plan": rb.plan.to_dict(),
            "restores_config": rb.loaded is not None}


def _config_diff(rb: runner.RollbackPlan, config: Path) -> str:
    try:
        now = config.read_text(encoding="utf-8-sig")
    except OSError:
        now = ""
    return restore.redacted_diff(rb.text, now, f"{config} (recorded with {rb.row.name})",
                                 f"{config} (now)")


def _write_config(rb: runner.RollbackPlan, config: Path) -> Path | None:
    """Put the recorded cluster.yml in place; the current one is kept beside it."""
    backup = None
    if config.exists():
        if config.read_text(encoding="utf-8-sig") == rb.text:
            return None
        stem = f"{config.name}.before-rollback-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
        names = (stem if n == 1 else f"{stem}-{n}" for n in itertools.count(1))
        backup = next(p for p in map(config.with_name, names) if not p.exists())
        os.replace(config, backup)  # an earlier backup of the same second is never overwritten
    fd = os.open(config, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(rb.text)
    return backup


# ---------------------------------------------------------------------------- commands
RESUME = Annotated[bool, typer.Option(help="Continue the interrupted run (same as `rkel apply --resume`).")]
YES = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
TIMEOUT = Annotated[float, typer.Option(
    min=5, help="Seconds to wait for a node to be Ready after its kubelet starts.")]


def rollback_command(
    ctx: typer.Context,
    to: Annotated[Optional[str], typer.Option(
        help="The snapshot to return to (default: the automatic one before the last change).")
    ] = None,
    write_config: Annotated[bool, typer.Option(
        help="Also write the recorded cluster.yml over --config (the current one is kept as "
             "<name>.before-rollback-<time>).")] = False,
    resume: RESUME = False,
    yes: YES = False,
    backend: BACKEND = SnapshotBackend.ssh,
    node_ready_timeout: TIMEOUT = READY_TIMEOUT,
) -> None:
    """Return the cluster to a snapshot: etcd data, component versions and specs, and config.

    Plans first (`rkel plan --rollback` shows the same), checks the snapshot file on every etcd
    node before stopping anything, takes a snapshot of the cluster as it is (best effort: what
    you roll back from may be broken), restores every etcd member, then puts every component
    back through the rolling, health-gated path (downgrades are allowed here, only here)."""
    _run(ctx, to, resume, yes, backend, node_ready_timeout, data_only=False,
         write_config=write_config)


@snapshot_app.command("restore")
def restore_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The snapshot (see `rkel snapshot list`).")],
    resume: RESUME = False,
    yes: YES = False,
    backend: BACKEND = SnapshotBackend.ssh,
) -> None:
    """Restore etcd from a snapshot; components keep their versions (`rkel rollback` also
    puts those back). Checks the file on every etcd node before stopping anything."""
    _run(ctx, name, resume, yes, backend, READY_TIMEOUT, data_only=True, write_config=False)


def _run(ctx: typer.Context, name: str | None, resume: bool, yes: bool, backend: SnapshotBackend,
         node_ready_timeout: float, *, data_only: bool, write_config: bool) -> None:
    from lifecycle.cli import BackendKind, _emit_run, _execute, _fail, snapshot_first

    g = ctx.obj
    command = " ".join(["rkel", *sys.argv[1:]])
    kind = "restore" if data_only else "rollback"
    backup = None
    try:
        with g.store() as store:
            if resume:
                ran = _execute(g, store, None, None, None, backend=BackendKind(backend.value),
                               resume=True, workers=0, trust_new_hosts=True, command=command,
                               kind=kind, node_ready_timeout=node_ready_timeout)
                _emit_run(g, kind.capitalize(), ran)
                return
            cluster = str(store.get_meta("cluster_name", "") or "local")
            if data_only and store.snapshot(str(name)) is None and snapshots.taken_at(str(name)):
                with snapshots.locked(store, command):
                    row = catalogue_in(g, store, str(name), None, backend)
                typer.echo(f"notice: catalogued recurring snapshot {row.name} (taken on"
                           f" {row.location.get('taken_on')}) so that it can be restored; it"
                           f" stays catalogued, with a copy at {row.location.get('local')}",
                           err=True)
            rb = (runner.plan_restore(store, str(name), cluster) if data_only
                  else runner.plan_rollback(g.config, store, name))
            if not yes:
                typer.echo(rollback_text(rb, g.config), err=True)
                if not sys.stdin.isatty():
                    raise RkelError("not on a terminal: add --yes to run without confirmation")
                if not typer.confirm(f"Roll the cluster back to {rb.row.name}?" if not data_only
                                     else f"Restore etcd from {rb.row.name}?"):
                    raise typer.Exit(1)
            config = rb.loaded.config if rb.loaded else runner.running_config(store, g.config).config
            refs = {r.name: r for r in rb.plan.nodes}
            take = snapshot_first(g, store, f"before the {kind} to {rb.row.name}", required=False)

            def prepare(be: Any) -> None:
                for note in restore.check_local(rb.row, be, refs):
                    typer.echo(f"notice: {note}", err=True)
                take(be)

            applies = rb.row.location.get("cluster_yml") if not data_only else None
            ran = _execute(g, store, rb.plan, config, rb.desired,
                           backend=BackendKind(backend.value), resume=False, workers=0,
                           trust_new_hosts=True, command=command, kind=kind,
                           node_ready_timeout=node_ready_timeout, prepare=prepare,
                           applies=applies)
            if write_config and rb.text:
                backup = _write_config(rb, g.config)
    except RkelError as exc:
        raise _fail(g, exc) from None
    except KeyboardInterrupt:
        again = "rollback" if not data_only else f"snapshot restore {name}"
        typer.echo(f"interrupted: the run is journaled; continue it with `rkel {again} --resume`",
                   err=True)
        raise typer.Exit(130) from None
    _emit_run(g, kind.capitalize(), ran)
    if write_config and rb.text:
        typer.echo(f"Wrote the recorded cluster.yml to {g.config}"
                   + (f" (the previous one is {backup})" if backup else " (it already matched)"),
                   err=True)
    elif rb.text:
        changes = _config_diff(rb, g.config)
        if changes:
            typer.echo("Your cluster.yml still describes the cluster before the rollback; make"
                       " it read as recorded (or run `rkel rollback --write-config` next time):\n"
                       + changes, err=True)
