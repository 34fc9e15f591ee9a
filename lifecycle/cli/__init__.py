"""The `rkel` command line (Typer). Parses options, calls `lifecycle.runner`, renders, exits.

Exit codes: 0 success; 1 unexpected error; 2 invalid cluster.yml; 3 the change cannot be planned
safely (quorum, version, stale saved plan); 4 state problem (locked, interrupted run, damaged
database); 5 invalid state transition; 6 a host could not be reached or refused; 7 the run
finished with failed steps; 130 interrupted by Ctrl-C (the run stays resumable).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lifecycle import __version__, rotate, runner
from lifecycle.cli import render
from lifecycle.cli.rollback import rollback_command, rollback_json, rollback_text
from lifecycle.cli.cert import cert_app
from lifecycle.cli.config_cmd import config as config_generate
from lifecycle.cli.doctor import doctor as doctor_command
from lifecycle.cli.import_cmd import import_command
from lifecycle.cli.kubeconfig_cmd import kubeconfig as kubeconfig_command
from lifecycle.cli.snapshot import SNAPSHOT_OPTION, snapshot_app
from lifecycle.config import load_config
from lifecycle.budget import check_budget
from lifecycle.budget import windows as budget_windows
from lifecycle.effects import READY_TIMEOUT
from lifecycle.errors import ConfigError, PlanError, RkelError
from lifecycle.executor import DEFAULT_WORKERS
from lifecycle.hosts.simulated import SimulatedCerts, SimWorld
from lifecycle.machines import TABLES, mermaid
from lifecycle.pki import admin_kubeconfig_path
from lifecycle.plan import Plan
from store import StoreError
from lifecycle.snapshots import SnapshotError, default_folder

app = typer.Typer(
    name="rkel",
    help="Kubernetes cluster lifecycle from an RKE cluster.yml: plan, apply, resume.",
    epilog=(
        "Exit codes: 0 ok; 1 unexpected error; 2 invalid cluster.yml; 3 unsafe or stale plan; "
        "4 state locked, interrupted or damaged; 5 invalid state transition; 6 host unreachable "
        "or refused; 7 run finished with failed steps; 130 interrupted (resumable)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # never print locals: they hold private keys
    add_completion=False,
)
config_app = typer.Typer(help="Work with cluster.yml: `rkel config` asks questions and writes one (as `rke config`); `rkel config validate` checks one.")
config_app.callback(invoke_without_command=True)(config_generate)
app.add_typer(config_app, name="config")
app.command("doctor")(doctor_command)
app.command("kubeconfig")(kubeconfig_command)
app.command("import")(import_command)
hosts_app = typer.Typer(help="SSH host keys pinned in the state.", no_args_is_help=True)
app.add_typer(hosts_app, name="hosts")
state_app = typer.Typer(help="The state database.", no_args_is_help=True)
app.add_typer(state_app, name="state")
app.add_typer(snapshot_app, name="snapshot")
app.add_typer(cert_app, name="cert")


class Output(str, Enum):
    text = "text"
    json = "json"


class BackendKind(str, Enum):
    ssh = "ssh"
    simulated = "simulated"


ONLY = Annotated[
    Optional[list[str]],
    typer.Option(
        "--only",
        help="Limit to a phase (etcd, controlplane, workers, removals); repeatable. "
        "Certificates are always included.",
    ),
]


BACKEND = Annotated[
    BackendKind, typer.Option(help="ssh (real hosts) or simulated (a simulated cluster).")
]
WORKERS = Annotated[
    int, typer.Option(min=0, max=100000,
                      help="Most hosts worked on at once; 0 (default): as many as each window allows.")
]


@dataclass
class Globals:
    config: Path
    state: Path | None
    output: Output

    def store(self) -> Any:
        return runner.open_store(self.state, self.config)


def _g(ctx: typer.Context) -> Globals:
    return ctx.obj  # type: ignore[no-any-return]


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[
        Path, typer.Option("--config", "-c", help="The RKE-format cluster.yml.")
    ] = Path("cluster.yml"),
    state: Annotated[
        Optional[Path],
        typer.Option(help="State database (default: <config stem>.rkel.db beside the config)."),
    ] = None,
    output: Annotated[Output, typer.Option("--output", "-o", help="text or json.")] = Output.text,
) -> None:
    ctx.obj = Globals(config, state, output)


def _emit(g: Globals, text: str, data: Any) -> None:
    if g.output is Output.json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        typer.echo(text)


def _fail(g: Globals, exc: RkelError) -> typer.Exit:
    if g.output is Output.json:
        data: dict[str, Any] = {"error": type(exc).__name__, "message": str(exc)}
        if isinstance(exc, ConfigError):
            data["issues"] = [vars(i) for i in exc.issues]
        typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        typer.echo(f"error: {exc}", err=True)
    return typer.Exit(exc.exit_code)


def _world_path(g: Globals) -> Path:
    store_path = g.state or runner.default_state_path(g.config)
    return store_path.with_name(store_path.name.replace(".db", "") + ".world.json")


# ---------------------------------------------------------------------------- commands
@app.command()
def version(ctx: typer.Context) -> None:
    """Print rkel's version."""
    _emit(_g(ctx), f"rkel {__version__}", {"version": __version__})


@config_app.command("validate")
def config_validate(ctx: typer.Context) -> None:
    """Check cluster.yml: prints OK, or every error found (not just the first)."""
    g = _g(ctx)
    try:
        loaded = load_config(g.config)
    except ConfigError as exc:
        raise _fail(g, exc) from None
    warnings = [str(w) for w in loaded.warnings]
    text = "\n".join([f"warning: {w}" for w in warnings] + [f"OK: {g.config}"])
    _emit(g, text, {"ok": True, "warnings": warnings, "nodes": len(loaded.config.nodes)})


@app.command()
def graph(
    ctx: typer.Context,
    kind: Annotated[Optional[str], typer.Argument(help="node or service (default: both).")] = None,
) -> None:
    """Print the node and service state machines as Mermaid diagrams."""
    kinds = [kind] if kind else sorted(TABLES)
    if any(k not in TABLES for k in kinds):
        typer.echo(f"error: unknown machine {kind!r}; choose node or service", err=True)
        raise typer.Exit(2)
    _emit(_g(ctx), "\n\n".join(mermaid(k) for k in kinds), {k: mermaid(k) for k in kinds})


@app.command()
def plan(
    ctx: typer.Context,
    out: Annotated[Optional[Path], typer.Option(help="Save the plan to this file.")] = None,
    simulate: Annotated[
        bool, typer.Option(help="Also rehearse the plan on a simulated copy of the cluster.")
    ] = False,
    only: ONLY = None,
    check: Annotated[
        bool, typer.Option(help="Also reach the nodes already in Kubernetes: report the ones "
                                "unreachable or NotReady and whether they use up the failure budget.")
    ] = False,
    backend: BACKEND = BackendKind.ssh,
    rollback: Annotated[
        bool, typer.Option("--rollback", help="Show what `rkel rollback` would do instead.")
    ] = False,
    to: Annotated[Optional[str], typer.Option(
        help="With --rollback: the snapshot (default: the newest automatic one).")] = None,
) -> None:
    """Show what apply would change, as a diff of current vs desired."""
    g = _g(ctx)
    try:
        with g.store() as store:
            if rollback:
                rb = runner.plan_rollback(g.config, store, to)
                _emit(g, rollback_text(rb, g.config), rollback_json(rb))
                return
            planned = runner.make_plan(g.config, store, tuple(only or ()))
            warnings = [str(w) for w in planned.loaded.warnings]
            interrupted = runner.interrupted_message(store)
            if interrupted:
                warnings.insert(0, f"{interrupted}; this plan is what a new run would do after it")
            if check:
                warnings += _check_nodes(g, store, planned, backend)
            expiry = rotate.expiry(store)
            warnings += rotate.expiry_warnings(expiry)
            text = render.plan_text(planned.plan, warnings)
            data = render.plan_json(planned.plan, warnings)
            data["certificates"] = expiry
            if expiry:
                text += "\n\nCertificates:\n" + rotate.expiry_text(expiry)
            reason = runner.snapshot_reason(planned.plan, store)
            data["snapshot_first"] = reason
            text += render.snapshot_note(reason, "apply")
            if simulate and not planned.plan.empty:
                rehearsal = runner.rehearse(store, planned.plan, SimulatedCerts())
                text += "\n\n" + _rehearsal_text(rehearsal)
                data["rehearsal"] = _rehearsal_data(rehearsal)
    except RkelError as exc:
        raise _fail(g, exc) from None
    if out is not None:
        out.write_text(json.dumps(planned.plan.to_dict(), sort_keys=True, indent=1))
        text += f"\n\nSaved the plan to {out}; apply it with `rkel apply {out}`."
    _emit(g, text, data)


def _check_nodes(g: Globals, store: Any, planned: runner.Planned, backend: BackendKind) -> list[str]:
    """`plan --check`: the preflight apply runs, without changing anything."""
    if backend is BackendKind.simulated:
        be: Any = SimWorld.load(_world_path(g)).backend()
    else:
        be = runner.real_session(store, planned.loaded.config, None).backend
    try:
        found = runner.preflight(store, be, planned.plan)
        lines = check_budget(planned.plan, planned.desired.strategy, found)
    finally:
        be.close()
    return lines or ["every node already in Kubernetes is reachable and Ready"]


def _rehearsal_text(r: runner.Rehearsal) -> str:
    lines = [f"Rehearsal on a simulated copy: {len(r.order)} steps, about {r.seconds:.0f}s:"]
    lines += [f"  {i}. {title}: ~{secs:.0f}s" for i, (title, secs) in enumerate(r.groups, 1)]
    most = r.world.max_unschedulable
    if most:
        lines.append(
            "  most nodes unschedulable at once: "
            + ", ".join(f"{k} {v}" for k, v in sorted(most.items()))
        )
    if r.world.quorum_violations:
        lines.append("  etcd quorum lost: " + "; ".join(r.world.quorum_violations))
    return "\n".join(lines)


def _rehearsal_data(r: runner.Rehearsal) -> dict[str, Any]:
    return {
        "steps": r.order,
        "simulated_seconds": round(r.seconds, 2),
        "groups": [{"title": t, "simulated_seconds": round(x, 2)} for t, x in r.groups],
        "max_unschedulable": r.world.max_unschedulable,
        "quorum_violations": r.world.quorum_violations,
    }


@app.command()
def apply(
    ctx: typer.Context,
    planfile: Annotated[
        Optional[Path], typer.Argument(help="A plan saved by `rkel plan --out`.")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    simulate: Annotated[
        bool, typer.Option(help="Rehearse on a simulated copy; change nothing.")
    ] = False,
    backend: BACKEND = BackendKind.ssh,
    workers: WORKERS = DEFAULT_WORKERS,
    only: ONLY = None,
    trust_new_hosts: Annotated[
        bool,
        typer.Option(help="Pin the SSH host key of a host seen for the first time (else refuse)."),
    ] = True,
    node_ready_timeout: Annotated[
        float, typer.Option(min=5, help="Seconds to wait for a node to be Ready after its kubelet starts.")
    ] = READY_TIMEOUT,
    snapshot: SNAPSHOT_OPTION = True,
    skip_doctor: Annotated[
        bool, typer.Option("--skip-doctor", help="Do not run `rkel doctor`'s checks (SSH, Docker "
                           "version, ports, clock, disk) on the nodes before the run.")
    ] = False,
) -> None:
    """Bring the cluster to what cluster.yml describes (or continue an interrupted run)."""
    g = _g(ctx)
    command = " ".join(["rkel", *sys.argv[1:]])
    try:
        with g.store() as store:
            if not resume and not simulate:
                runner.refuse_if_interrupted(store)
            planned = None if resume else runner.make_plan(g.config, store, tuple(only or ()))
            if planned is not None:
                for w in planned.loaded.warnings:
                    typer.echo(f"warning: {w}", err=True)
            the_plan = _read_plan(planfile) if planfile else planned.plan if planned else None
            if simulate:
                if the_plan is None:
                    raise RkelError("--simulate rehearses a new plan; it cannot be combined with --resume")
                rehearsal = runner.rehearse(store, the_plan, SimulatedCerts(), workers=workers)
                _emit(g, render.plan_text(the_plan) + "\n\n" + _rehearsal_text(rehearsal),
                      {"plan": the_plan.to_dict(), "rehearsal": _rehearsal_data(rehearsal)})
                return
            if the_plan is not None and the_plan.empty:
                _emit(g, render.plan_text(the_plan), {"changed": False})
                return
            desired = planned.desired if planned is not None and planfile is None else None
            config = planned.loaded.config if planned else None
            confirm = None if yes or the_plan is None else (lambda: _confirm(g, the_plan))
            first = snapshot_before(g, store, the_plan, snapshot) if the_plan is not None else None
            if skip_doctor and not resume:
                typer.echo("warning: --skip-doctor: the nodes are not checked before the run", err=True)
            applies = None
            if planned is not None and the_plan is not None and not only and (
                    planfile is None or the_plan.desired_fingerprint == planned.desired.fingerprint):
                applies = runner.sealed_config(store, g.config)
            ran = _execute(g, store, the_plan, config, desired, backend=backend, resume=resume,
                           workers=workers, trust_new_hosts=trust_new_hosts, command=command,
                           node_ready_timeout=node_ready_timeout, confirm=confirm,
                           strategy=planned.desired.strategy if planned else None,
                           prepare=first,
                           applies=applies, run_doctor=not skip_doctor)
            if ran.session is not None and desired is not None and (not only or "controlplane" in only):
                ran.kubeconfig = runner.write_kubeconfig(ran.session.pki, desired, g.config)
    except RkelError as exc:
        raise _fail(g, exc) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: the run is journaled; continue it with `rkel apply --resume`", err=True)
        raise typer.Exit(130) from None
    _emit_run(g, "Apply", ran)


@dataclass
class _Ran:
    result: runner.RunResult
    connections: dict[str, int]
    session: runner.RealSession | None
    kubeconfig: Path | None = None


def _execute(g: Globals, store: Any, the_plan: Plan | None, config: Any, desired: Any, *,
             backend: BackendKind, resume: bool, workers: int, trust_new_hosts: bool,
             command: str, kind: str = "apply", node_ready_timeout: float = READY_TIMEOUT,
             confirm: Any = None, strategy: Any = None, prepare: Any = None,
             applies: dict[str, str] | None = None, run_doctor: bool = True) -> _Ran:
    """Run `the_plan` (or, with resume, the interrupted run) on the chosen backend, with
    progress on a terminal and notices on stderr.

    With a `strategy`, the nodes already in Kubernetes are checked first (reachable, Ready):
    the ones that are not are reported, skipped, and counted against the failure budget, and
    the run is refused before anything changes when they use it up; then `rkel doctor`'s checks
    run on the reachable nodes (real hosts, unless `run_doctor` is off) and a failed check
    refuses the run too. `confirm` is asked after
    that check, so the user sees its findings first. `prepare(backend)` runs under the run's lock
    before a new run starts (the automatic snapshot); what it raises refuses the run.
    `applies`: the sealed cluster.yml the run applies (recorded when it ends well)."""
    say = lambda text: typer.echo(f"notice: {text}", err=True)
    unfinished = store.unfinished_run()
    groups = the_plan.groups if the_plan else (
        Plan.from_dict(unfinished.plan).groups if unfinished else ())
    progress = render.Progress(total_groups=len(groups)) if g.output is Output.text else None
    notices: list[str] = []
    session = None
    if backend is BackendKind.simulated:
        be: Any = SimWorld.load(_world_path(g)).backend()
        certs: Any = SimulatedCerts()
    else:
        config = config or load_config(g.config).config
        session = runner.real_session(store, config, desired,
                                      trust_new_hosts=trust_new_hosts, notice=say)
        if session.generated:
            say(f"generated {len(session.generated)} certificate(s): " + ", ".join(session.generated))
        be, certs = session.backend, session.pki
    try:
        unavailable: dict[str, str] = {}
        budgets = None
        if strategy is not None and the_plan is not None and not resume:
            found = runner.preflight(store, be, the_plan)
            for line in check_budget(the_plan, strategy, found):
                typer.echo(f"warning: {line}", err=True)
            unavailable = {u.node: u.why for u in found}
            budgets = budget_windows(the_plan, strategy)
            if session is not None and run_doctor and config is not None:
                preflight_doctor(g, be, config, skip=unavailable, managed=managed_containers(store))
        if confirm is not None:
            confirm()
        before_run = (lambda: prepare(be)) if prepare is not None else None
        result = runner.apply_plan(
            store, be, the_plan or Plan((), (), "", ""), certs, command=command,
            resume=resume, workers=workers, observer=progress, notices=notices,
            desired=desired, kind=kind, node_ready_timeout=node_ready_timeout,
            unavailable=unavailable, budgets=budgets, before_run=before_run, applies=applies,
            secrets_encryption=(config.services.kube_api.secrets_encryption_config
                                if config is not None else None),
        )
    finally:
        be.close()
    for n in notices:
        say(n)
    return _Ran(result, dict(sorted(getattr(be, "connections", {}).items())), session)


def managed_containers(store: Any) -> dict[str, set[str]]:
    """Per node, the containers the state records (an adopted one carries no rkel label)."""
    managed: dict[str, set[str]] = {}
    for svc in store.services():
        managed.setdefault(svc.node, set()).add(svc.name)
    return managed


def preflight_doctor(g: Globals, be: Any, config: Any, skip: dict[str, str],
                     managed: dict[str, set[str]]) -> None:
    """`rkel doctor` before a run, on the run's own connections: a failed check refuses the run
    before anything changes (the table and what to do for each failure)."""
    from lifecycle import doctor as checks

    report = checks.run_doctor(be, config, skip=skip, managed=managed)
    if report.exit_code == 0:
        if g.output is Output.text:
            typer.echo(f"notice: doctor: all checks passed on {len(report.hosts)} host(s)", err=True)
        return
    raise PlanError("the checks before the run failed, so nothing was changed:\n"
                    + checks.report_text(report)
                    + "\nFix what is listed, or run with --skip-doctor to go ahead anyway.")


def snapshot_before(g: Globals, store: Any, plan: Plan, snapshot: bool) -> Any:
    """The automatic snapshot a run of `plan` takes first (None: it needs none, or the user
    said --no-snapshot, which is warned about)."""
    reason = runner.snapshot_reason(plan, store)
    if reason and not snapshot:
        typer.echo(f"warning: --no-snapshot: {reason}, and no snapshot is taken first;"
                   " `rkel rollback` cannot return to the cluster as it is now", err=True)
    return snapshot_first(g, store, reason) if reason and snapshot else None


def snapshot_first(g: Globals, store: Any, reason: str, required: bool = True) -> Any:
    """What runs before a disruptive run: an automatic etcd snapshot of the cluster as it is.
    When `required`, its failure refuses the run (else it is a warning)."""
    def take(be: Any) -> None:
        typer.echo(f"notice: taking an automatic etcd snapshot first ({reason})", err=True)
        try:
            row = runner.auto_snapshot(store, be, g.config, default_folder(g.config))
        except RkelError as exc:
            if not required:
                typer.echo(f"warning: no snapshot before this run ({exc})", err=True)
                return
            raise SnapshotError(
                f"the automatic snapshot before this run failed, so nothing was changed: "
                f"{exc}\nFix it, or run with --no-snapshot (then `rkel rollback` cannot return "
                "to the cluster as it is now).") from exc
        typer.echo(f"notice: snapshot {row.name} saved (sha256 {row.sha256[:12]}); "
                   "`rkel rollback` returns to it", err=True)
    return take


def _emit_run(g: Globals, what: str, ran: _Ran) -> None:
    result = ran.result
    text = (f"{what} complete: run {result.run_id}, {result.steps_done} step(s) done"
            + (f", {result.steps_skipped} already done before" if result.steps_skipped else "") + ".")
    if ran.connections:
        counts = sorted(set(ran.connections.values()))
        text += (f"\nSSH connections: {len(ran.connections)} host(s), "
                 f"{'/'.join(map(str, counts))} per host.")
    if ran.kubeconfig is not None:
        text += f"\nAdmin kubeconfig: {ran.kubeconfig}"
    _emit(g, text, {"run": result.run_id, "steps_done": result.steps_done,
                    "steps_skipped": result.steps_skipped, "connections": ran.connections,
                    "kubeconfig": str(ran.kubeconfig) if ran.kubeconfig else None})


def _confirm(g: Globals, plan: Plan, question: str = "Apply these changes?") -> None:
    if g.output is Output.text:
        typer.echo(render.plan_text(plan))
    if not sys.stdin.isatty():
        raise RkelError("not on a terminal: add --yes to apply without confirmation")
    if not typer.confirm(question):
        raise typer.Exit(1)


@app.command()
def remove(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option("--force", help="Do not ask for confirmation.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted remove.")] = False,
    backend: BACKEND = BackendKind.ssh,
    workers: WORKERS = DEFAULT_WORKERS,
) -> None:
    """Tear the cluster down: every rkel container, etcd data and cluster file on every node.

    Journaled and resumable like every run. The state file keeps the journal and the
    certificates (a cluster made again with `rkel apply` keeps its CA); the admin kubeconfig
    file is deleted."""
    g = _g(ctx)
    command = " ".join(["rkel", *sys.argv[1:]])
    try:
        loaded = load_config(g.config)
        with g.store() as store:
            the_plan = None if resume else runner.teardown_plan(loaded.config, store)
            if the_plan is not None and the_plan.empty:
                _emit(g, "Nothing to remove: no node is known.", {"changed": False})
                return
            if the_plan is not None and not force:
                typer.echo("This removes the cluster: every rkel container, etcd's data, the "
                           "certificates and files on the nodes and the etcd snapshots kept on "
                           "them (/opt/rke).", err=True)
                _confirm(g, the_plan, "Remove the cluster?")  # before any host is reached
            ran = _execute(g, store, the_plan, loaded.config, None, backend=backend,
                           resume=resume, workers=workers, trust_new_hosts=True,
                           command=command, kind="remove")
            admin_kubeconfig_path(g.config).unlink(missing_ok=True)
    except RkelError as exc:
        raise _fail(g, exc) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: the run is journaled; continue it with `rkel remove --resume`", err=True)
        raise typer.Exit(130) from None
    _emit_run(g, "Remove", ran)


def _read_plan(path: Path) -> Plan:
    try:
        return Plan.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RkelError(f"{path} is not a plan saved by `rkel plan --out` ({exc})") from exc


@app.command()
def status(ctx: typer.Context) -> None:
    """List every node and service with its state and image."""
    g = _g(ctx)
    try:
        with g.store() as store:
            nodes, services = store.nodes(), store.services()
            runs = store.runs()
            expiry = rotate.expiry(store)
    except RkelError as exc:
        raise _fail(g, exc) from None
    last = runs[0] if runs else None
    text = render.status_text(nodes, services, last)
    warnings = rotate.expiry_warnings(expiry)
    if expiry:
        text += "\n\n" + rotate.expiry_text(expiry)
    if warnings:
        text += "\n\n" + "\n".join(f"warning: {w}" for w in warnings)
    _emit(
        g,
        text,
        {
            "nodes": [vars(n) for n in nodes],
            "services": [{k: v for k, v in vars(s).items() if k != "spec"} for s in services],
            "last_run": vars(last) if last else None,
            "certificates": expiry,
            "warnings": warnings,
        },
    )


@app.command()
def history(
    ctx: typer.Context,
    run: Annotated[Optional[int], typer.Argument(help="Show this run's journal.")] = None,
) -> None:
    """List past runs, or one run's journal."""
    g = _g(ctx)
    try:
        with g.store() as store:
            if run is None:
                runs = store.runs()
                _emit(g, render.history_text(runs), [
                    {k: v for k, v in vars(r).items() if k != "plan"} for r in runs
                ])
                return
            row = store.run(run)
            if row is None:
                raise RkelError(f"there is no run {run}; `rkel history` lists them")
            rows = store.journal(run)
            _emit(g, render.journal_text(row, rows), [vars(r) for r in rows])
    except RkelError as exc:
        raise _fail(g, exc) from None


@hosts_app.command("list")
def hosts_list(ctx: typer.Context) -> None:
    """List the pinned host keys."""
    g = _g(ctx)
    try:
        with g.store() as store:
            rows = store.known_hosts()
    except RkelError as exc:
        raise _fail(g, exc) from None
    text = "\n".join(f"{r.host:<28} {r.key_type:<20} {r.fingerprint}  (since {r.first_seen})"
                     for r in rows) or "No host keys pinned yet."
    _emit(g, text, [vars(r) for r in rows])


@hosts_app.command("forget")
def hosts_forget(
    ctx: typer.Context,
    address: Annotated[str, typer.Argument(help="The host whose pinned key to drop.")],
) -> None:
    """Drop a host's pinned key (after a reinstall); the next connection pins the new one."""
    g = _g(ctx)
    try:
        with g.store() as store:
            removed = store.delete_known_host(address)
    except RkelError as exc:
        raise _fail(g, exc) from None
    if not removed:
        typer.echo(f"error: no key is pinned for {address}; `rkel hosts list` shows them", err=True)
        raise typer.Exit(2)
    _emit(g, f"Forgot the host key of {address}.", {"forgotten": address})


@state_app.command("unlock")
def state_unlock(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option("--force", help="Required: you checked the holder is gone.")] = False,
) -> None:
    """Remove the run lock of a run that is gone for good (e.g. on another machine)."""
    g = _g(ctx)
    if not force:
        typer.echo("error: unlocking lets another run start beside a live one; check the holder "
                   "is gone, then add --force", err=True)
        raise typer.Exit(2)
    try:
        with g.store() as store:
            holder = store.break_lock()
    except RkelError as exc:
        raise _fail(g, exc) from None
    if holder is None:
        _emit(g, "The state was not locked.", {"unlocked": None})
        return
    _emit(g, f"Removed the lock of pid {holder.pid} on {holder.hostname} ({holder.command}). "
          "If its run was interrupted, continue it with `rkel apply --resume`.",
          {"unlocked": vars(holder)})


app.command("rollback")(rollback_command)
from lifecycle.cli.encrypt import encrypt_app  # noqa: E402
app.add_typer(encrypt_app, name="encrypt")
from lifecycle.cli import state as _state  # noqa: E402,F401  registers `rkel state verify`


def _unraisable(hook: Any) -> None:
    """An error Python can only ignore (in a finalizer: paramiko's channel files, collected at
    exit after their host was cut off) is no news to the user and never a traceback on stderr."""
    logging.getLogger("rkel").debug("ignored in %r: %r", hook.object, hook.exc_value)


def main() -> None:
    """Console entry point. A state database that cannot be written (disk full, read-only,
    damaged) mid-command is an error with what to do, never a traceback: what was journaled
    before stays, and an interrupted run resumes."""
    sys.unraisablehook = _unraisable
    try:
        app()
    except StoreError as exc:
        hint = ("free space on the disk that holds it" if "full" in str(exc) or "space" in str(exc)
                else "check the file and its directory (permissions, `rkel state verify`)")
        typer.echo(f"error: the state database cannot be written: {exc}. Nothing journaled is "
                   f"lost; {hint}, then run the command again (an interrupted run: `rkel apply "
                   "--resume`).", err=True)
        raise SystemExit(4) from None
    except OSError as exc:  # a local file (kubeconfig, snapshot folder, simulated world) failed
        where = f" ({exc.filename})" if exc.filename else ""
        typer.echo(f"error: {exc.strerror or exc}{where}; fix that (free space, permissions), "
                   "then run the command again (an interrupted run: `rkel apply --resume`).",
                   err=True)
        raise SystemExit(1) from None
