"""`rkel import --rke-state cluster.rkestate`: adopt a cluster RKE built (journaled, resumable)."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from lifecycle import encryption, rke_import, runner
from lifecycle.config import load_config
from lifecycle.desired import compile_desired
from lifecycle.errors import RkelError
from lifecycle.rke_import import AdoptionError
from lifecycle.rke_layout import RKE
from lifecycle.rke_state import read_rke_state


class ImportBackend(str, Enum):
    ssh = "ssh"
    simulated = "simulated"


def summary(imp: rke_import.ImportPlan) -> dict[str, Any]:
    """What the import found: per node, the services that match rkel's specs, differ or are
    missing, and whether the certificate files match RKE's state. No key, no certificate."""
    nodes = {}
    for node in imp.nodes:
        nodes[node.name] = {
            "matching": sorted(s.name for s in node.services if not s.differences),
            "differing": {s.name: list(s.differences) for s in node.services if s.differences},
            "not_running": sorted(s.name for s in node.services if s.state != "running"),
            "certificates_match": node.certs_match,
            "left_alone": list(node.unmanaged),
        }
    return {"rke_state": str(imp.state.path), "sha256": imp.state.sha256,
            "kubernetes_version": imp.plan.kubernetes_version, "nodes": nodes,
            "notes": list(imp.notes)}


def summary_text(imp: rke_import.ImportPlan) -> str:
    data = summary(imp)
    services = sum(len(n.services) for n in imp.nodes)
    same = sum(len(v["matching"]) for v in data["nodes"].values())
    lines = [
        f"Import of the RKE cluster in {imp.state.path} (Kubernetes {data['kubernetes_version']}):",
        f"  {len(imp.nodes)} node(s), {services} container(s) found, {same} exactly as rkel "
        f"would run them; {len(imp.certificates)} certificate(s) "
        "from RKE's state, kept with RKE's layout (one kube-ca, etcd trusting it, one kube-node for every kubelet).",
    ]
    lines += [f"  - {note}" for note in imp.notes]
    return "\n".join(lines)


def import_command(
    ctx: typer.Context,
    rke_state: Annotated[Path, typer.Option(
        "--rke-state", help="RKE's state file (cluster.rkestate, beside RKE's cluster.yml).")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    backend: Annotated[ImportBackend, typer.Option(
        help="ssh (real hosts) or simulated (a simulated cluster).")] = ImportBackend.ssh,
    trust_new_hosts: Annotated[bool, typer.Option(
        help="Pin the SSH host key of a host seen for the first time (else refuse).")] = True,
) -> None:
    """Adopt a cluster RKE built, as it runs: its certificates, nodes and containers.

    Nothing on the nodes changes. RKE's certificates go into the state (keys encrypted with the
    state key) and the cluster keeps RKE's certificate layout; each container is compared with
    rkel's spec for it. `rkel plan` then shows only what differs. Journaled: killed anywhere,
    `rkel apply --resume` finishes it."""
    from lifecycle.cli import Output, _emit, _fail, _world_path

    g = ctx.obj
    command = " ".join(["rkel", *sys.argv[1:]])
    say = lambda text: typer.echo(f"notice: {text}", err=True)  # noqa: E731
    try:
        # Everything that can be checked without the state or a host is, before either is
        # touched: a bad file writes nothing.
        loaded = load_config(g.config)
        for w in loaded.warnings:
            typer.echo(f"warning: {w}", err=True)
        if encryption.enabled(loaded.config.services.kube_api.secrets_encryption_config):
            # RKE's key is in its state file, not read yet: a new one would make every Secret
            # already encrypted unreadable
            raise AdoptionError(
                "this cluster.yml enables secrets_encryption_config; importing a cluster whose "
                "Secrets RKE encrypted is not supported yet (rkel would not have RKE's key). "
                "Keep the cluster on RKE for now, or turn encryption off with RKE first "
                "(`enabled: false`, `rke up`), import, then enable it with rkel")
        desired = compile_desired(loaded.config, pki_layout=RKE)
        state = read_rke_state(rke_state)
        rke_import.checked_certificates(state, desired)
        with g.store() as store:
            rke_import.refuse_used_state(store, state)
            session = None
            if backend is ImportBackend.simulated:
                from lifecycle.hosts.simulated import SimulatedCerts, SimWorld

                be: Any = SimWorld.load(_world_path(g)).backend()
                certs: Any = SimulatedCerts()
            else:
                session = runner.real_session(store, loaded.config, None,
                                              trust_new_hosts=trust_new_hosts, notice=say)
                be, certs = session.backend, session.pki
            try:
                found = rke_import.observe(be, desired, state.certificates)
                imp = rke_import.import_plan(state, desired, found, runner.current_state(store))
                if not yes:
                    typer.echo(summary_text(imp), err=True)
                    if not sys.stdin.isatty():
                        raise RkelError("not on a terminal: add --yes to import without confirmation")
                    if not typer.confirm("Import this cluster into the state?"):
                        raise typer.Exit(1)
                notices: list[str] = []
                result = runner.apply_plan(store, be, imp.plan, certs, command=command,
                                           kind="import", notices=notices,
                                           applies=runner.sealed_config(store, g.config))
            finally:
                be.close()
            for n in notices:
                say(n)
            kubeconfig = None
            if session is not None:
                kubeconfig = runner.write_kubeconfig(session.pki, desired, g.config)
    except RkelError as exc:
        raise _fail(g, exc) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: the import is journaled; finish it with `rkel apply --resume`",
                   err=True)
        raise typer.Exit(130) from None
    data = {"run": result.run_id, "steps_done": result.steps_done, **summary(imp),
            "kubeconfig": str(kubeconfig) if kubeconfig else None}
    text = summary_text(imp) + (
        f"\nImport complete: run {result.run_id}, {result.steps_done} step(s) done."
        + (f"\nAdmin kubeconfig: {kubeconfig}" if kubeconfig else "")
        + "\nNext: `rkel plan` shows what differs between the cluster and cluster.yml.")
    _emit(g, text if g.output is Output.text else "", data)
