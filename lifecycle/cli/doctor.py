"""`rkel doctor`: preflight every node of cluster.yml (the checks are in `lifecycle.doctor`).

Registered by `lifecycle.cli`; its shared helpers are imported inside the command because that
module imports this one.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer

from lifecycle import doctor as checks
from lifecycle.config import load_config
from lifecycle.errors import RkelError


class DoctorBackend(str, Enum):
    ssh = "ssh"
    simulated = "simulated"


def doctor(
    ctx: typer.Context,
    backend: Annotated[DoctorBackend, typer.Option(
        help="ssh (real hosts) or simulated (a simulated cluster).")] = DoctorBackend.ssh,
    trust_new_hosts: Annotated[bool, typer.Option(
        help="Pin the SSH host key of a host seen for the first time (else refuse it).")] = True,
    workers: Annotated[int, typer.Option(
        min=1, max=256, help="Hosts checked at once.")] = checks.DEFAULT_WORKERS,
) -> None:
    """Check every node before a run: SSH and Docker reachable, Docker version, the ports its
    roles need, clock skew, free disk for etcd and Docker. Changes nothing.

    Exit 0 when every check passes, 6 when a host cannot be reached, 7 when a check failed."""
    from lifecycle.cli import _emit, _fail, _world_path, managed_containers

    g = ctx.obj
    try:
        loaded = load_config(g.config)
        for w in loaded.warnings:
            typer.echo(f"warning: {w}", err=True)
        with g.store() as store:
            be = _open_backend(g, store, loaded.config, backend, trust_new_hosts, _world_path)
            try:
                report = checks.run_doctor(be, loaded.config, workers=workers,
                                           managed=managed_containers(store))
            finally:
                be.close()
    except RkelError as exc:
        raise _fail(g, exc) from None
    _emit(g, checks.report_text(report), report.to_dict())
    if report.exit_code:
        raise typer.Exit(report.exit_code)


def _open_backend(g: Any, store: Any, config: Any, kind: DoctorBackend, trust_new_hosts: bool,
                  world_path: Any) -> Any:
    if kind is DoctorBackend.simulated:
        from lifecycle.hosts.simulated import SimWorld

        return SimWorld.load(world_path(g)).backend()
    from lifecycle.hosts.ssh import SSHBackend  # paramiko and docker only when really needed

    # No TLS material: doctor probes no component, so it needs neither the state key nor the
    # certificates (and creates neither).
    return SSHBackend(config, store, trust_new_hosts=trust_new_hosts,
                      notice=lambda text: typer.echo(f"notice: {text}", err=True))
