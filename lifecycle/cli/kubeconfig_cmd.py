"""`rkel kubeconfig`: write the admin kubeconfig again from the state (RKE's
`rke util get-kubeconfig`), e.g. after it was deleted or on another machine holding the state.

Everything comes from the state: the kube-admin certificate and kube-ca (private key decrypted
with the state key), the controlplane nodes and the cluster name that the last apply recorded.
cluster.yml itself is not read; its path only places kube_config_<stem>.yml beside it. Nothing
is created when there is no state yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lifecycle.errors import RkelError, StateError
from lifecycle.kubeconfig import DEFAULT_CLUSTER
from lifecycle.pki import PKI, admin_kubeconfig_path, load_state_key, write_private
from store import default_state_path


def admin_server(nodes: list[Any], services: list[Any]) -> str:
    """https://<address>:6443 of the first controlplane node (by name) whose kube-apiserver
    runs, else of the first controlplane node: the one `rkel apply` writes into the file."""
    cps = sorted((n for n in nodes if "controlplane" in n.roles), key=lambda n: n.name)
    if not cps:
        raise StateError("the state records no controlplane node yet; run `rkel apply` first "
                         "(it writes the admin kubeconfig once the control plane runs)")
    running = {s.node for s in services if s.name == "kube-apiserver" and s.state == "running"}
    chosen = next((n for n in cps if n.name in running), cps[0])
    return f"https://{chosen.address}:6443"


def kubeconfig(
    ctx: typer.Context,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o",
        help="Write it here (default: kube_config_<config stem>.yml beside cluster.yml).")] = None,
    print_: Annotated[bool, typer.Option(
        "--print", help="Print it to stdout instead of writing a file (it holds the admin's "
        "private key).")] = False,
) -> None:
    """Write the admin kubeconfig again from the state (mode 0600)."""
    from lifecycle.cli import Output, _emit, _fail
    from lifecycle.runner import open_store

    g = ctx.obj
    if print_ and output is not None:
        typer.echo("error: --print and --output exclude each other; give one", err=True)
        raise typer.Exit(2)
    if print_ and g.output is Output.json:
        typer.echo("error: --print writes the kubeconfig itself (it holds the admin's private"
                   " key, which JSON output never carries); drop -o json", err=True)
        raise typer.Exit(2)
    state_path = Path(g.state or default_state_path(g.config))
    path = output or admin_kubeconfig_path(Path(g.config))
    try:
        if not state_path.exists():
            raise StateError(f"there is no state yet ({state_path} does not exist): run `rkel "
                             "apply` first, or point --state/-c at the cluster's state")
        with open_store(state_path, g.config) as store:
            server = admin_server(store.nodes(), store.services())
            name = str(store.get_meta("cluster_name") or DEFAULT_CLUSTER)
            pki = PKI(store, load_state_key(state_path, create=False))
            text = pki.admin_kubeconfig(server, name)
        if not print_:
            try:
                write_private(path, text.encode())
            except OSError as exc:
                raise StateError(f"cannot write the kubeconfig {path}: {exc.strerror or exc};"
                                 " choose another place with --output") from None
    except RkelError as exc:
        raise _fail(g, exc) from None
    if print_:
        typer.echo(text, nl=False)
        return
    _emit(g, f"Wrote the admin kubeconfig for {name} ({server}) to {path} (mode 0600).",
          {"path": str(path), "server": server, "cluster": name})
