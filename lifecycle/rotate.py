"""Certificate rotation (`rkel cert rotate`) and certificate expiry, as one journaled run.

A rotation is a plan like any other. Its first group holds one cluster-wide `rotate-certs` step
that renews certificates in the store; the planner's ordinary diff follows, because a renewed
certificate is a new request (`CertRequest.rotation`), whose hash is in the label of every
service that reads it: the certificate files are delivered, then exactly those services restart,
one failure domain at a time and health-gated, as in an upgrade.

The state records how many times each certificate was renewed (meta `cert_rotations`), and every
later `rkel plan`/`apply` compiles cluster.yml with those counts. The `rotate-certs` step writes
the new certificates and the new counts in one transaction; a run killed after it resumes with
both, and the step, done again, finds every certificate already matching its request, so nothing
is issued twice.

`--rotate-ca` runs three stages, each a `rotate-certs` step and the restarts it causes:

1. **trust**: a new CA is made beside each current one (`<ca>:next`); every node's `<ca>.pem`
   becomes a bundle of both, and everything that verifies against it restarts. Leaves are still
   signed by the old CA.
2. **issue**: the new CA becomes `<ca>` (the old one stays as `<ca>:previous`, still in every
   bundle) and every leaf it signs is issued again from it; everything restarts. The
   service-account key is kept: its certificate is signed again with the same key, so tokens
   stay valid.
3. **drop**: the old CA leaves the bundles and the state; everything restarts again.

At every point each component trusts the CA of every certificate it can be shown, so the
cluster keeps serving. The admin kubeconfig is rewritten at each stage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from lifecycle import desired_certs as names
from lifecycle.config.model import ClusterConfig
from lifecycle.desired import compile_desired
from lifecycle.desired_certs import is_ca
from lifecycle.errors import PlanError, RkelError, StateError
from lifecycle.pki import CA_ORDER, NEXT, PKI, PREVIOUS, STICKY, collect_requests, load_state_key
from lifecycle.pki_x509 import issue_ca, issued_by, load_cert, load_key
from lifecycle.plan import Current, Group, Plan, Step, Unit, as_data, diff
from lifecycle.rke_layout import layout_of
from lifecycle.spec import CertRequest, Desired
from store import CertificateRow, DeleteCertificate, PutCertificate, SetMeta, Store

if TYPE_CHECKING:
    from lifecycle.executor import Executor

ROTATIONS = "cert_rotations"  # meta: certificate name -> times renewed
ACTIONS = ("rotate-certs",)
# `--service` names, as RKE's `rke cert rotate --service`.
SERVICES = ("etcd", "kubelet", "kube-apiserver", "kube-proxy", "kube-scheduler",
            "kube-controller-manager")
STAGES = ("leaves", "ca-trust", "ca-issue", "ca-drop")
WARN_DAYS = 30


class UnknownServiceError(RkelError):
    """`--service` named something that is not one of RKE's service names."""

    exit_code = 2


def rotations(store: Store) -> dict[str, int]:
    """How many times each certificate was renewed (empty for a cluster never rotated)."""
    value = store.get_meta(ROTATIONS, {}) or {}
    return {str(k): int(v) for k, v in dict(value).items()}


def owner(request: CertRequest) -> str:
    """The `--service` whose certificate `request` is ("" for one no service name covers)."""
    name = request.name
    if name in (names.KUBE_APISERVER, names.APISERVER_ETCD_CLIENT, names.PROXY_CLIENT):
        return "kube-apiserver"
    if name in (names.KUBE_CONTROLLER_MANAGER, names.KUBE_SCHEDULER, names.KUBE_PROXY):
        return name
    if name.startswith("kube-node-") or name.startswith("kube-kubelet-"):
        return "kubelet"
    if request.ca == names.ETCD_CA and name.startswith("kube-etcd-"):
        return "etcd"
    return ""


def check_services(services: list[str]) -> tuple[str, ...]:
    """The `--service` names given, checked; all of them when none is given."""
    unknown = sorted({s for s in services if s not in SERVICES})
    if unknown:
        raise UnknownServiceError(
            f"unknown service {', '.join(repr(u) for u in unknown)} for --service; valid: "
            f"{', '.join(SERVICES)} (give none to rotate all of them)")
    return tuple(sorted(set(services))) if services else SERVICES


def renewed(desired: Desired, services: tuple[str, ...]) -> list[str]:
    """The leaves a rotation of `services` renews. All services also renew kube-admin; the
    service-account key is never renewed (that would void every token)."""
    out = [name for name, req in collect_requests(desired).items()
           if not is_ca(req) and name not in STICKY and owner(req) in services]
    if set(services) == set(SERVICES):
        out.append(names.KUBE_ADMIN)
    return sorted(set(out))


# ---------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Rotation:
    plan: Plan
    certs: tuple[str, ...]  # leaves issued again
    cas: tuple[str, ...]  # CAs replaced (with --rotate-ca)


def converged(current: Current, desired: Desired) -> Current:
    """`current` as it will be once a plan to `desired` has run: the next stage plans from it."""
    nodes = []
    for cur in current.nodes:
        want = desired.node(cur.name)
        if want is None:
            nodes.append(cur)
            continue
        services = []
        for svc in cur.services:
            spec = want.service(svc.name)
            services.append(svc if spec is None else replace(
                svc, spec_hash=spec.hash, image=spec.image, args=spec.args))
        nodes.append(replace(cur, certs_hash=want.certs_hash, services=tuple(services)))
    return replace(current, nodes=tuple(nodes))


def _mint_group(stage: str, desired: Desired, counts: dict[str, int], renew: list[str],
                cas: list[str], kubeconfig: dict[str, str] | None) -> Group:
    detail: dict[str, Any] = {
        "stage": stage, "rotations": dict(sorted(counts.items())), "renew": renew, "cas": cas,
        "certs": [as_data(r) for _, r in sorted(collect_requests(desired).items())],
    }
    if kubeconfig:
        detail["kubeconfig"] = kubeconfig
    what = {"leaves": f"issue {len(renew)} certificate(s) again",
            "ca-trust": f"new CA beside {', '.join(cas)}; nodes trust both",
            "ca-issue": f"switch to the new CA; issue {len(renew)} certificate(s) from it",
            "ca-drop": f"drop the old CA from {', '.join(cas)}"}[stage]
    step = Step(f"cluster:rotate-certs:{stage}", "", "rotate-certs", detail=detail)
    return Group("certs", f"rotate: {what}", 1, (Unit("rotate", "change", (step,)),))


def _tagged(groups: tuple[Group, ...], tag: str) -> tuple[Group, ...]:
    """Step ids unique across stages (each stage cordons and restarts the same nodes)."""
    return tuple(replace(g, title=f"{tag}: {g.title}", units=tuple(
        replace(u, steps=tuple(replace(s, id=f"{tag}/{s.id}") for s in u.steps))
        for u in g.units)) for g in groups)


def plan_rotation(config: ClusterConfig, store: Store, current: Current,
                  services: tuple[str, ...], rotate_ca: bool,
                  kubeconfig: dict[str, str] | None = None) -> Rotation:
    """The rotation run's plan (see the module docstring). Refused while cluster.yml differs
    from what runs: the rotation restarts services, and must not carry other changes with it.

    :param kubeconfig: the admin kubeconfig to write at each stage ({"config": cluster.yml's
        path, "server", "cluster"}), if any.
    """
    from lifecycle.encryption_run import active_keys  # it imports this module

    # what else the state records of the cluster stays as it is through the rotation
    fixed: dict[str, Any] = {"pki_layout": layout_of(store), "encryption_keys": active_keys(store)}
    counts = rotations(store)
    before = compile_desired(config, rotations=counts, **fixed)
    pending = diff(current, before)
    if not pending.empty:
        raise PlanError(
            "cluster.yml differs from what the cluster runs (`rkel plan` shows it); run "
            "`rkel apply` first, then rotate: a rotation restarts services and carries no other "
            "change")
    if not before.nodes:
        raise PlanError("there is no cluster to rotate certificates of; run `rkel apply` first")
    if not rotate_ca:
        renew = renewed(before, services)
        after = {**counts, **{n: counts.get(n, 0) + 1 for n in renew}}
        desired = compile_desired(config, rotations=after, **fixed)
        then = diff(current, desired)
        first = _mint_group("leaves", desired, after, renew, [], kubeconfig)
        return Rotation(_joined(then, (first, *then.groups), current), tuple(renew), ())
    requests = collect_requests(before)
    cas = [ca for ca in CA_ORDER if ca in requests]
    leaves = sorted(n for n, r in requests.items() if not is_ca(r) and r.ca in cas
                    and n not in STICKY)
    stages: list[tuple[str, dict[str, int], list[str]]] = [
        ("ca-trust", {**counts, **{ca: counts.get(ca, 0) + 1 for ca in cas}}, []),
    ]
    issued = {**stages[0][1], **{n: counts.get(n, 0) + 1 for n in leaves}}
    stages.append(("ca-issue", issued, leaves))
    stages.append(("ca-drop", {**issued, **{ca: issued[ca] + 1 for ca in cas}}, []))
    groups: list[Group] = []
    now = current
    last = pending
    for number, (stage, after, renew) in enumerate(stages, 1):
        desired = compile_desired(config, rotations=after, **fixed)
        last = diff(now, desired)
        groups.append(_mint_group(stage, desired, after, renew, cas, kubeconfig))
        groups += _tagged(last.groups, f"stage {number}")
        now = converged(now, desired)
    return Rotation(_joined(last, tuple(groups), current), tuple(leaves), tuple(cas))


def _joined(last: Plan, groups: tuple[Group, ...], current: Current) -> Plan:
    steps = [s for g in groups for u in g.units for s in u.steps]
    summary = {**last.summary, "change": sum(1 for s in steps if s.action == "replace"),
               "rotate": sum(1 for s in steps if s.action == "rotate-certs")}
    return replace(last, groups=groups, state_fingerprint=current.fingerprint, summary=summary)


# ---------------------------------------------------------------------------- the step
def run_step(executor: Executor, step: Step) -> None:
    """The effect of a `rotate-certs` step (the executor journals it). Safe to run again: what
    is already as the step wants it is left alone, so a resumed run issues nothing twice."""
    detail = step.detail or {}
    store = executor.store
    pki = PKI(store, load_state_key(Path(store.path)))
    requests = {str(c["name"]): CertRequest(
        **{**c, "organizations": tuple(c["organizations"]), "sans": tuple(c["sans"])})
        for c in detail.get("certs", [])}
    counts = SetMeta(ROTATIONS, dict(detail.get("rotations", {})))
    stage = str(detail.get("stage", ""))
    cas = [str(c) for c in detail.get("cas", [])]
    if stage not in STAGES:
        raise StateError(f"step {step.id}: unknown rotation stage {stage!r}; this rkel is older "
                         "than the one that planned the run")
    if stage == "leaves":
        pki.ensure_requests(requests, [counts])
    elif stage == "ca-trust":
        pki.ensure_requests(requests)  # a CA the state lacks is made first (simulated clusters)
        pki.ensure_requests(requests, [*_next_cas(pki, store, requests, cas), counts])
    elif stage == "ca-issue":
        _issue(pki, store, requests, cas, counts)
    else:
        pki.ensure_requests(requests, [*(DeleteCertificate(ca + PREVIOUS) for ca in cas), counts])
    kubeconfig = detail.get("kubeconfig")
    if kubeconfig and store.certificate(names.KUBE_ADMIN) is not None:
        pki.write_admin_kubeconfig(Path(kubeconfig["config"]), kubeconfig["server"],
                                   kubeconfig["cluster"])
    forget = getattr(executor.backend, "forget_credentials", None)
    if forget is not None:
        forget()


def _next_cas(pki: PKI, store: Store, requests: dict[str, CertRequest],
              cas: list[str]) -> list[PutCertificate]:
    """A new CA beside each of `cas` that has none yet (nor an old one: already switched)."""
    ops = []
    for ca in cas:
        if store.certificate(ca + NEXT) or store.certificate(ca + PREVIOUS):
            continue
        req = requests[ca]
        ops.append(pki._put(ca + NEXT, issue_ca(req), req))
    return ops


def _issue(pki: PKI, store: Store, requests: dict[str, CertRequest], cas: list[str],
           counts: SetMeta) -> None:
    """Stage 2 in one transaction: each new CA takes its name, the old one becomes
    `<ca>:previous`, every leaf it signs is issued again from the new one, and certificates no
    request names (the service-account key's, a removed node's) are signed again, same key."""
    existing = {row.name: row for row in store.certificates()}
    ops: list[Any] = []
    for ca in cas:
        new = existing.get(ca + NEXT)
        if new is None:
            continue  # switched already (a resumed run)
        old = existing[ca]
        ops += [_renamed(new, ca), _renamed(old, ca + PREVIOUS), DeleteCertificate(ca + NEXT)]
        existing[ca] = replace(new, name=ca)
        existing[ca + PREVIOUS] = replace(old, name=ca + PREVIOUS)
        del existing[ca + NEXT]
    previous = {ca: load_cert(existing[ca + PREVIOUS].cert_pem) for ca in cas
                if ca + PREVIOUS in existing}
    for row in sorted(existing.values(), key=lambda r: r.name):
        req = requests.get(row.name)
        if ":" in row.name or (req is not None and (is_ca(req) or row.name not in STICKY)):
            continue  # a requested leaf is issued again by ensure_requests below
        cert = load_cert(row.cert_pem)
        family = next((ca for ca, old in previous.items() if issued_by(cert, old)), None)
        if family is None:
            continue  # signed already by the new CA (a resumed run), or by another CA
        ca_row = existing[family]
        pem = _resigned(cert, load_cert(ca_row.cert_pem), load_key(pki._decrypt(ca_row)))
        ops.append(PutCertificate(row.name, pem, row.key_encrypted,
                                  load_cert(pem).not_valid_after_utc.isoformat(), row.sans,
                                  row.hash))
    pki.ensure_requests(requests, [*ops, counts], existing=existing)


def _renamed(row: CertificateRow, name: str) -> PutCertificate:
    return PutCertificate(name, row.cert_pem, row.key_encrypted, row.expires_at, row.sans,
                          row.hash)


def _resigned(cert: x509.Certificate, ca: x509.Certificate, ca_key: Any) -> str:
    """`cert` with the same subject, key and extensions, signed by `ca` (new serial, dates)."""
    now = datetime.now(UTC)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(ca.subject)
               .public_key(cert.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + lifetime))
    for ext in cert.extensions:
        if isinstance(ext.value, x509.AuthorityKeyIdentifier):
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)
        else:
            builder = builder.add_extension(ext.value, ext.critical)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(Encoding.PEM).decode("ascii")


# ---------------------------------------------------------------------------- expiry
def expiry(store: Store, now: datetime | None = None) -> list[dict[str, Any]]:
    """Every stored certificate's expiry (not-after, UTC), days left, and whether it is within
    30 days; the service-account key is a key only, without expiry. Sorted by name."""
    now = now or datetime.now(UTC)
    out: list[dict[str, Any]] = []
    for row in sorted(store.certificates(), key=lambda r: r.name):
        if row.name == names.SERVICE_ACCOUNT_TOKEN:
            out.append({"name": row.name, "not_after": None, "days_left": None, "warn": False})
            continue
        after = (datetime.fromisoformat(row.expires_at) if row.expires_at
                 else load_cert(row.cert_pem).not_valid_after_utc)
        if after.tzinfo is None:
            after = after.replace(tzinfo=UTC)
        days = (after - now).total_seconds() / 86400
        out.append({"name": row.name, "not_after": after.isoformat(), "days_left": int(days // 1),
                    "warn": days < WARN_DAYS})
    return out


def expiry_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """One line per certificate expired or expiring within 30 days, with what to do."""
    out = []
    for r in rows:
        if not r["warn"]:
            continue
        when = (f"expired {-r['days_left']} day(s) ago" if r["days_left"] < 0
                else f"expires in {r['days_left']} day(s)")
        out.append(f"certificate {r['name']} {when} ({r['not_after']}); renew it with "
                   "`rkel cert rotate`")
    return out


def expiry_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "No certificates in the state yet."
    lines = [f"{'CERTIFICATE':<40} {'NOT AFTER (UTC)':<26} DAYS LEFT"]
    for r in rows:
        if r["not_after"] is None:
            lines.append(f"{r['name']:<40} {'no expiry (a key only)':<26} -")
            continue
        mark = "  WARNING: renew soon" if r["warn"] else ""
        lines.append(f"{r['name']:<40} {r['not_after'][:19]:<26} {r['days_left']}{mark}")
    return "\n".join(lines)


def fingerprint(pem: str) -> str:
    """sha256 fingerprint of a PEM certificate (for reports and tests)."""
    return load_cert(pem).fingerprint(hashes.SHA256()).hex()
