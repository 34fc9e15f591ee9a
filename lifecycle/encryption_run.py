"""Runs that change secrets encryption: turning it on, and `rkel encrypt rotate-key`.

Turning encryption on (or changing a custom_config) is an ordinary apply: the planner delivers
the new file with the controlplane certificates and rolls the apiservers (their certificate
label carries the file's hash). On a cluster whose apiservers already ran, one more journaled
step follows the roll: every Secret is rewritten through the API, so Secrets stored in clear
before are stored encrypted.

A key rotation is one journaled run in three stages, planned up front:

1. the new key first, the old key(s) after it: file delivered, apiservers rolled one by one;
2. every Secret rewritten (read + replace), so each is stored under the new key;
3. the old key(s) dropped from the file: delivered again, apiservers rolled again; then the
   new key list is recorded.

The new key is generated (once) and recorded as in use, first, before the run starts: a run
killed anywhere is finished by `rkel apply --resume`, and a rotation that fails half-way leaves
a cluster whose desired state holds both keys, so nothing stored is ever unreadable.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from lifecycle import encryption as enc
from lifecycle.config.model import ClusterConfig
from lifecycle.desired import compile_desired
from lifecycle.errors import PlanError
from lifecycle.pki_key import load_state_key
from lifecycle.plan import Current, Group, Plan, Step, Unit, diff
from lifecycle.rke_layout import layout_of
from lifecycle.rotate import rotations
from lifecycle.spec import Desired, canonical_json
from store import SetMeta, Store

if TYPE_CHECKING:
    from lifecycle.executor import Executor

ACTIONS = ("rewrite-secrets", "encryption-commit")
KEYRING = enc.KEYRING  # never in the kube-system copy of the state, even sealed
UNIT = "secrets"  # the unit name of the cluster-wide steps (no node)


# ---------------------------------------------------------------------------- store
def active_keys(store: Store) -> tuple[str, ...] | None:
    """The names of the generated keys in use, first one encrypting (None: none yet)."""
    names = store.get_meta(enc.ACTIVE) or []
    return tuple(str(n) for n in names) or None


def keyring(store: Store) -> enc.Keyring:
    return enc.Keyring.unseal(store.get_meta(enc.KEYRING), _state_key(store))


def _state_key(store: Store) -> bytes:
    return load_state_key(Path(store.path))


def _delivered(plan: Plan) -> list[enc.Encryption]:
    """The encryption configs `plan` delivers, in order."""
    out: list[enc.Encryption] = []
    for step in plan.steps:
        detail = (step.detail or {}).get("encryption") if step.action == "deliver-certs" else None
        if detail:
            found = enc.Encryption.from_detail(detail)
            if found not in out:
                out.append(found)
    return out


def prepare(store: Store, plan: Plan, config_value: Mapping[str, Any] | None) -> list[str]:
    """Before a run starts: put in the keyring what the files it delivers need (each key
    generated once; a custom config sealed), and record the keys in use when none are yet.
    Returns the names of the keys generated now.

    :raises PlanError: the plan delivers a custom config that cluster.yml no longer has.
    """
    delivered = _delivered(plan)
    if not delivered:
        return []
    key = _state_key(store)
    ring = enc.Keyring.unseal(store.get_meta(enc.KEYRING), key)
    made: list[str] = []
    changed = False
    for want in delivered:
        if want.custom:
            if want.hash in ring.custom:
                continue
            now = enc.desired(config_value)
            custom = enc.custom_config(config_value)
            if now is None or now.hash != want.hash or custom is None:
                raise PlanError("the plan delivers a secrets encryption custom_config that "
                                "cluster.yml no longer holds; run `rkel plan` again")
            ring.custom[want.hash] = canonical_json(custom)
            changed = True
        else:
            for name in want.keys:
                if ring.generate(name):
                    made.append(name)
                    changed = True
    ops = []
    if changed:
        ops.append(SetMeta(enc.KEYRING, ring.seal(key)))
    generated = [w for w in delivered if not w.custom]
    active = active_keys(store)
    if generated and (active is None or (set(generated[0].keys) > set(active))):
        # the first time, or a rollback bringing retired keys back: wanted from now on, so a
        # run that fails half-way never leaves a key a stored Secret needs unwanted
        ops.append(SetMeta(enc.ACTIVE, list(generated[0].keys)))
    if ops:
        store.apply_ops(ops)
    return made


def after_run(store: Store, plan: Plan) -> None:
    """The run ended well: what it delivered is what the cluster's Secrets are stored with
    (nothing, once no apiserver runs with an encryption config)."""
    delivered = _delivered(plan)
    api = {s.action for s in plan.steps if s.service == "kube-apiserver"}
    if delivered and not any(s.action in ACTIONS for s in plan.steps) and api == {"start"}:
        # new apiservers only (a new cluster, or a new controlplane node): nothing was stored
        # under another config. Where Secrets were, the rewrite step records it instead.
        store.apply_ops([SetMeta(enc.APPLIED, delivered[-1].hash)])
    elif not delivered and store.get_meta(enc.APPLIED) and not any(
            s.name == "kube-apiserver" and _flagged(s.spec.get("args", ()))
            for s in store.services() if s.spec):
        store.apply_ops([SetMeta(enc.APPLIED, None)])


def rollback_keys(store: Store) -> tuple[str, ...] | None:
    """The keys a rollback's apiservers need: those in use, then every retired one (newest
    first), since the etcd data it restores may hold Secrets stored under an older key."""
    active = active_keys(store)
    if active is None or not store.get_meta(enc.KEYRING):
        return active
    retired = sorted(set(keyring(store).keys) - set(active), key=_key_number, reverse=True)
    return (*active, *retired)


def _key_number(name: str) -> tuple[int, str]:
    digits = name.rsplit("-", 1)[-1]
    return (int(digits) if digits.isdigit() else -1, name)


def _flagged(args: Any) -> bool:
    return any(str(a).startswith(f"--{enc.ENCRYPTION_FLAG}=") for a in args)


# ---------------------------------------------------------------------------- apply
def _apiservers_ran(current: Current) -> bool:
    return any(s.name == "kube-apiserver" and s.spec_hash
               for n in current.nodes for s in n.services)


def _rewrite_group(hash_: str, title: str) -> Group:
    step = Step(f"encryption:rewrite-secrets:{hash_}", "", "rewrite-secrets",
                detail={"hash": hash_})
    return Group("controlplane", title, 1, (Unit(UNIT, "change", (step,)),))


def _after_controlplane(groups: list[Group], extra: Group) -> list[Group]:
    """`groups` with `extra` after the last certs or controlplane group."""
    last = max((i for i, g in enumerate(groups) if g.phase in ("certs", "controlplane")),
               default=-1)
    return groups[:last + 1] + [extra] + groups[last + 1:]


def with_rewrite(plan: Plan, store: Store, current: Current, desired: Desired, *,
                 rollback: bool = False) -> Plan:
    """`plan`, plus the rewrite of every Secret when it changes the encryption config of a
    cluster whose apiservers already ran (Secrets stored before would stay as they were).

    :param rollback: the plan follows a restore of etcd data from before (turning encryption
        off is then what the restored data needs).
    :raises PlanError: encryption was on and cluster.yml turns it off (not supported yet).
    """
    applied = store.get_meta(enc.APPLIED) or ""
    ran = _apiservers_ran(current)
    if not desired.encryption_hash:
        if not rollback and any(s.name == "kube-apiserver" and _flagged(s.args)
               for n in current.nodes for s in n.services):
            raise PlanError(
                "services.kube-api.secrets_encryption_config is off in cluster.yml, but this "
                "cluster stores its Secrets encrypted; rkel cannot turn encryption off yet "
                "(the API servers could no longer read them). Keep `secrets_encryption_config: "
                "{enabled: true}`")
        return plan
    if not ran or applied == desired.encryption_hash:
        return plan
    title = "secrets: every Secret rewritten, to be stored with the new encryption config"
    group = _rewrite_group(desired.encryption_hash, title)
    return replace(plan, groups=tuple(_after_controlplane(list(plan.groups), group)))


# ---------------------------------------------------------------------------- rotate-key
@dataclass(frozen=True)
class Rotation:
    plan: Plan
    new_key: str
    old_keys: tuple[str, ...]
    desired: Desired  # the cluster once the run is done (only the new key)


def _advanced(current: Current, desired: Desired) -> Current:
    """`current` as it is once the controlplane nodes got `desired`'s certificates and
    kube-apiserver (what the rotation's first stage leaves)."""
    nodes = []
    for node in current.nodes:
        want = desired.node(node.name)
        spec = want.service("kube-apiserver") if want is not None else None
        if want is not None and spec is not None:
            services = tuple(
                replace(s, spec_hash=spec.hash, image=spec.image, args=spec.args,
                        state="running") if s.name == "kube-apiserver" else s
                for s in node.services)
            node = replace(node, certs_hash=want.certs_hash, services=services)
        nodes.append(node)
    return replace(current, nodes=tuple(nodes))


def _staged(groups: tuple[Group, ...], label: str, suffix: str = "") -> list[Group]:
    out = []
    for g in groups:
        units = tuple(Unit(u.node, u.kind, tuple(replace(s, id=s.id + suffix) for s in u.steps))
                      for u in g.units) if suffix else g.units
        out.append(replace(g, title=f"{label}: {g.title}", units=units))
    return out


def rotation_plan(config: ClusterConfig, store: Store, current: Current) -> Rotation:
    """The three-stage key rotation for the cluster running `config`.

    :raises PlanError: encryption is off, uses a custom_config, is not in place yet, or the
        cluster has other changes pending (run `rkel apply` first).
    """
    value = config.services.kube_api.secrets_encryption_config
    if not enc.enabled(value):
        raise PlanError(
            "secrets encryption is not enabled on this cluster, so there is no key to rotate; "
            "set services.kube-api.secrets_encryption_config: {enabled: true} in cluster.yml "
            "and run `rkel apply` first")
    if enc.custom_config(value) is not None:
        raise PlanError(
            "rotate-key replaces the key rkel generates; this cluster uses a custom_config. "
            "Put the new key first in custom_config (keep the old one after it), run "
            "`rkel apply`, then drop the old key and run `rkel apply` again")
    active = active_keys(store)
    fixed: dict[str, Any] = {"pki_layout": layout_of(store), "rotations": rotations(store)}
    now = compile_desired(config, encryption_keys=active, **fixed)
    if (active is None or not _apiservers_ran(current)
            or store.get_meta(enc.APPLIED) != now.encryption_hash):
        raise PlanError("secrets encryption is not in place on this cluster yet (no run has "
                        "finished with it); run `rkel apply` first")
    pending = diff(current, now)
    if not pending.empty:
        raise PlanError(
            f"the cluster does not match its cluster.yml ({len(pending.steps)} step(s) "
            "pending); run `rkel apply` first, then rotate the key")
    new = enc.next_key(active)
    first = compile_desired(config, encryption_keys=(new, *active), **fixed)
    stage1 = diff(current, first)
    last = compile_desired(config, encryption_keys=(new,), **fixed)
    stage3 = diff(_advanced(current, first), last)
    old = ", ".join(active)
    commit = Step(f"encryption:commit:{new}", "", "encryption-commit",
                  detail={"keys": [new], "hash": last.encryption_hash})
    groups = (
        _staged(stage1.groups, f"1/3 new key {new} first, {old} kept")
        + [_rewrite_group(first.encryption_hash,
                          f"2/3 every Secret rewritten, to be stored with key {new}")]
        + _staged(stage3.groups, f"3/3 {old} dropped", suffix=f":drop-{'-'.join(active)}")
        + [Group("controlplane", f"3/3 key {new} recorded as the only key in use", 1,
                 (Unit(UNIT, "change", (commit,)),))]
    )
    summary = {k: stage1.summary.get(k, 0) + stage3.summary.get(k, 0)
               for k in set(stage1.summary) | set(stage3.summary)}
    plan = replace(stage1, groups=tuple(groups), desired_fingerprint=stage3.desired_fingerprint,
                   summary=summary)
    return Rotation(plan, new, active, last)


def install_rotation_key(store: Store, rotation: Rotation) -> bool:
    """Before the rotation run starts: generate the new key (once) and record it as in use,
    first, the old keys after it. True when the key was generated now."""
    key = _state_key(store)
    ring = enc.Keyring.unseal(store.get_meta(enc.KEYRING), key)
    made = ring.generate(rotation.new_key)
    store.apply_ops([SetMeta(enc.KEYRING, ring.seal(key)),
                     SetMeta(enc.ACTIVE, [rotation.new_key, *rotation.old_keys])])
    return made


# ---------------------------------------------------------------------------- effects
def run_step(executor: Executor, plan: Plan, step: Step) -> None:
    """The effect of one encryption step (called by the executor, which journals it)."""
    detail = step.detail or {}
    if step.action == "rewrite-secrets":
        executor.backend.kube().rewrite_secrets()
        executor.store.apply_ops([SetMeta(enc.APPLIED, str(detail.get("hash", "")))])
    elif step.action == "encryption-commit":
        # Retired keys stay sealed in the keyring: a snapshot taken before the rotation holds
        # Secrets only they decrypt.
        executor.store.apply_ops([SetMeta(enc.ACTIVE, list(detail.get("keys", []))),
                                  SetMeta(enc.APPLIED, str(detail.get("hash", "")))])
