"""`rkel cert rotate` and `rkel cert list`: renew certificates as a journaled, resumable run."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from lifecycle import rotate, runner
from lifecycle.cli.snapshot import BACKEND, SNAPSHOT_OPTION, SnapshotBackend
from lifecycle.effects import READY_TIMEOUT
from lifecycle.errors import RkelError
from lifecycle.executor import DEFAULT_WORKERS
from lifecycle.pki import admin_kubeconfig_path

cert_app = typer.Typer(help="The cluster's certificates: expiry, rotation.", no_args_is_help=True)


@cert_app.command("rotate")
def cert_rotate(
    ctx: typer.Context,
    service: Annotated[Optional[list[str]], typer.Option(
        "--service", help="Renew the certificates of this service (etcd, kubelet, "
        "kube-apiserver, kube-proxy, kube-scheduler, kube-controller-manager); repeatable. "
        "Default: all of them and kube-admin (never the service-account key).")] = None,
    rotate_ca: Annotated[bool, typer.Option(
        "--rotate-ca", help="Replace the CAs (kube-ca, the etcd CA, the requestheader CA) and "
        "everything they sign, in three rolling stages; both CAs are trusted in between.")
    ] = False,
    resume: Annotated[bool, typer.Option(
        help="Continue the interrupted run (same as `rkel apply --resume`).")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    backend: BACKEND = SnapshotBackend.ssh,
    workers: Annotated[int, typer.Option(
        min=0, max=100000, help="Most hosts worked on at once; 0: as each window allows.")
    ] = DEFAULT_WORKERS,
    node_ready_timeout: Annotated[float, typer.Option(
        min=5, help="Seconds to wait for a node to be Ready after its kubelet starts.")
    ] = READY_TIMEOUT,
    snapshot: SNAPSHOT_OPTION = True,
    plan_only: Annotated[bool, typer.Option(
        "--plan", help="Only show the rotation's plan (what restarts where, in which order).")
    ] = False,
) -> None:
    """Issue certificates again and restart what reads them, one failure domain at a time.

    Plans first and shows the plan (`--yes` skips the question). The new certificates are
    stored in the run's first step; the services that read them then restart through the
    rolling, health-gated path of an upgrade, after an automatic etcd snapshot (the target
    of `rkel rollback`). Killed anywhere, `rkel cert rotate --resume` (or
    `rkel apply --resume`) finishes the run without issuing anything twice."""
    from lifecycle.cli import (BackendKind, _confirm, _emit, _emit_run, _execute, _fail, render,
                               snapshot_before)

    g = ctx.obj
    command = " ".join(["rkel", *sys.argv[1:]])
    kind = BackendKind(backend.value)
    try:
        services = rotate.check_services(list(service or []))
        with g.store() as store:
            if resume:
                ran = _execute(g, store, None, None, None, backend=kind, resume=True,
                               workers=workers, trust_new_hosts=True, command=command,
                               kind="cert-rotate", node_ready_timeout=node_ready_timeout)
                _emit_run(g, "Certificate rotation", ran)
                return
            runner.refuse_if_interrupted(store)
            planned = runner.make_plan(g.config, store)
            kubeconfig = None
            cps = [n for n in planned.desired.nodes if n.has("controlplane")]
            if kind is BackendKind.ssh and cps:
                kubeconfig = {"config": str(g.config), "server": f"https://{cps[0].address}:6443",
                              "cluster": planned.desired.cluster_name}
            rotation = rotate.plan_rotation(planned.loaded.config, store, planned.current,
                                            services, rotate_ca, kubeconfig)
            if plan_only:
                reason = runner.snapshot_reason(rotation.plan, store) if snapshot else None
                text = (render.plan_text(rotation.plan)
                        + render.snapshot_note(reason, "cert rotate"))
                _emit(g, text, {"plan": rotation.plan.to_dict(), "snapshot_first": reason})
                return
            if not yes:
                _confirm(g, rotation.plan, "Rotate these certificates?")
            ran = _execute(g, store, rotation.plan, planned.loaded.config, None, backend=kind,
                           resume=False, workers=workers, trust_new_hosts=True,
                           command=command, kind="cert-rotate",
                           node_ready_timeout=node_ready_timeout,
                           strategy=planned.desired.strategy,
                           prepare=snapshot_before(g, store, rotation.plan, snapshot))
            if kubeconfig is not None:
                ran.kubeconfig = admin_kubeconfig_path(g.config)
    except RkelError as exc:
        raise _fail(g, exc) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: the run is journaled; continue it with "
                   "`rkel cert rotate --resume`", err=True)
        raise typer.Exit(130) from None
    _emit_run(g, "Certificate rotation", ran)


@cert_app.command("list")
def cert_list(ctx: typer.Context) -> None:
    """Every certificate in the state with its expiry; a warning for those within 30 days."""
    from lifecycle.cli import _emit, _fail

    g = ctx.obj
    try:
        with g.store() as store:
            rows = rotate.expiry(store)
    except RkelError as exc:
        raise _fail(g, exc) from None
    warnings = rotate.expiry_warnings(rows)
    text = rotate.expiry_text(rows)
    if warnings:
        text += "\n\n" + "\n".join(f"warning: {w}" for w in warnings)
    _emit(g, text, {"certificates": rows, "warnings": warnings})

