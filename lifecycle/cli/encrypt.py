"""`rkel encrypt rotate-key`: plan, confirm, run (journaled, resumable)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from lifecycle import encryption_run, runner
from lifecycle.cli import render
from lifecycle.cli.snapshot import BACKEND, SNAPSHOT_OPTION, SnapshotBackend
from lifecycle.effects import READY_TIMEOUT
from lifecycle.errors import RkelError

encrypt_app = typer.Typer(no_args_is_help=True, help="Secrets encryption at rest.")

RESUME = Annotated[bool, typer.Option(help="Continue the interrupted run (same as `rkel apply --resume`).")]
YES = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
TIMEOUT = Annotated[float, typer.Option(
    min=5, help="Seconds to wait for a node to be Ready after its kubelet starts.")]
DRY = Annotated[bool, typer.Option("--plan", help="Only show the rotation's plan.")]


def rotation_text(rot: encryption_run.Rotation) -> str:
    head = (f"Rotate the secrets encryption key: new key {rot.new_key} first (generated once,"
            f" kept in the state encrypted with the state key), every Secret rewritten with it,"
            f" then {', '.join(rot.old_keys)} dropped from every controlplane node.\n\n")
    return head + render.plan_text(rot.plan)


@encrypt_app.command("rotate-key")
def rotate_key(
    ctx: typer.Context,
    resume: RESUME = False,
    yes: YES = False,
    plan_only: DRY = False,
    backend: BACKEND = SnapshotBackend.ssh,
    node_ready_timeout: TIMEOUT = READY_TIMEOUT,
    snapshot: SNAPSHOT_OPTION = True,
) -> None:
    """Replace the key Secrets are encrypted with, as RKE's `rke encrypt rotate-key`.

    Three journaled stages: the new key goes first in encryption.yaml (the old one kept) and
    the apiservers restart one by one; every Secret is rewritten so it is stored with the new
    key; the old key is dropped and the apiservers restart again. An automatic etcd snapshot
    is taken first (`rkel rollback` returns to it). Killed anywhere,
    `rkel apply --resume` finishes it."""
    from lifecycle.cli import BackendKind, _emit, _emit_run, _execute, _fail, snapshot_before

    g = ctx.obj
    command = " ".join(["rkel", *sys.argv[1:]])
    try:
        with g.store() as store:
            if resume:
                ran = _execute(g, store, None, None, None, backend=BackendKind(backend.value),
                               resume=True, workers=0, trust_new_hosts=True, command=command,
                               kind="encrypt-rotate", node_ready_timeout=node_ready_timeout)
                _emit_run(g, "Key rotation", ran)
                return
            runner.refuse_if_interrupted(store)
            rot = runner.plan_rotation(g.config, store)
            if plan_only:
                _emit(g, rotation_text(rot), {"new_key": rot.new_key,
                                              "old_keys": list(rot.old_keys),
                                              "plan": rot.plan.to_dict()})
                return
            if not yes:
                typer.echo(rotation_text(rot), err=True)
                if not sys.stdin.isatty():
                    raise RkelError("not on a terminal: add --yes to run without confirmation")
                if not typer.confirm("Rotate the secrets encryption key?"):
                    raise typer.Exit(1)
            config = runner.running_config(store, g.config).config
            first = snapshot_before(g, store, rot.plan, snapshot)

            def prepare(be: Any) -> None:
                if first is not None:  # of the Secrets as they are stored now
                    first(be)
                made = encryption_run.install_rotation_key(store, rot)
                if made:
                    typer.echo(f"notice: generated secrets encryption key {rot.new_key} (kept "
                               "in the state, encrypted with the state key)", err=True)

            ran = _execute(g, store, rot.plan, config, rot.desired,
                           backend=BackendKind(backend.value), resume=False, workers=0,
                           trust_new_hosts=True, command=command, kind="encrypt-rotate",
                           node_ready_timeout=node_ready_timeout, prepare=prepare)
    except RkelError as exc:
        raise _fail(g, exc) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: the run is journaled; continue it with `rkel apply --resume`",
                   err=True)
        raise typer.Exit(130) from None
    _emit_run(g, "Key rotation", ran)
