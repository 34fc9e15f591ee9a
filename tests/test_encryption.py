"""Secrets encryption at rest and `rkel encrypt rotate-key` on the Simulated backend.

The desired files and flags, the keys sealed in the state (never in a plan, the journal, a spec
or the simulated hosts), the rewrite of every Secret when encryption is turned on, and the
three-stage rotation killed after each of its journal writes and resumed. The real path
(aescbc in etcd through the apiserver stand-in) is tests/e2e/test_encryption.py.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lifecycle import encryption as enc
from lifecycle import encryption_run
from lifecycle.config import load_config_text
from lifecycle.desired import compile_desired
from lifecycle.errors import PlanError
from lifecycle.hosts.simulated import SIM_ENCRYPTION, SimulatedCerts, SimWorld
from lifecycle.pki import PKI, load_state_key
from lifecycle.plan import Plan
from lifecycle.runner import apply_plan, make_plan, plan_rotation, sealed_config
from store import Store
from tests.simcluster import Crash

BASE = """
cluster_name: enc
kubernetes_version: v1.30.5-rancher1-1
nodes:
  - {address: 10.0.0.1, hostname_override: n1, user: rkel, role: [controlplane, etcd, worker]}
  - {address: 10.0.0.2, hostname_override: n2, user: rkel, role: [controlplane, etcd, worker]}
  - {address: 10.0.0.3, hostname_override: n3, user: rkel, role: [etcd, worker]}
addons: |-
  apiVersion: v1
  kind: Secret
  metadata: {name: app-password, namespace: default}
  stringData: {password: plaintext-password-1234}
"""
ENABLED = BASE + "services:\n  kube-api:\n    secrets_encryption_config: {enabled: true}\n"
CUSTOM_SECRET = base64.b64encode(b"c" * 32).decode()
CUSTOM = BASE + f"""services:
  kube-api:
    secrets_encryption_config:
      enabled: true
      custom_config:
        apiVersion: apiserver.config.k8s.io/v1
        kind: EncryptionConfiguration
        resources:
        - resources: [secrets]
          providers:
          - aescbc:
              keys:
              - {{name: k-custom, secret: {CUSTOM_SECRET}}}
          - identity: {{}}
"""


def _config(text: str) -> Any:
    return load_config_text(text).config


class Rkel:
    """rkel 'processes' one after another on one simulated cluster and state file; with
    `crash_after`, the process dies right after that journal write and a new one resumes."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.world = SimWorld()
        self.config = where / "cluster.yml"
        self.crash_at: int | None = None
        self.writes = 0
        self.store = self._open()

    def _hook(self, count: int) -> None:
        self.writes = count
        if self.crash_at is not None and count >= self.crash_at:
            raise Crash(count)

    def _open(self) -> Store:
        return Store.open(self.where / "cluster.rkel.db", after_journal_write=self._hook)

    def apply(self, text: str) -> Plan:
        self.config.write_text(text)
        planned = make_plan(self.config, self.store)
        if not planned.plan.empty:
            self._run(planned.plan, None, desired=planned.desired,
                      applies=sealed_config(self.store, self.config),
                      secrets_encryption=planned.loaded.config.services.kube_api
                      .secrets_encryption_config)
        return planned.plan

    def rotate(self, crash_after: int | None = None) -> encryption_run.Rotation:
        rot = plan_rotation(self.config, self.store)
        self._run(rot.plan, crash_after, desired=rot.desired, kind="encrypt-rotate",
                  before_run=lambda: encryption_run.install_rotation_key(self.store, rot))
        return rot

    def _run(self, plan: Plan, crash_after: int | None, **kwargs: Any) -> None:
        self.crash_at = crash_after
        try:
            apply_plan(self.store, self.world.backend(), plan, SimulatedCerts(), command="test",
                       **kwargs)
        except Crash:
            self.crashed_keyring = self.keyring()
            self.store.release_lock()  # what a dead pid's lock amounts to for the next process
            self.store.close()
            self.crash_at = None
            self.store = self._open()
            apply_plan(self.store, self.world.backend(), Plan((), (), "", ""), SimulatedCerts(),
                       command="test --resume", resume=True)
        self.crash_at = None

    def keyring(self) -> enc.Keyring:
        return enc.Keyring.unseal(self.store.get_meta(enc.KEYRING),
                                  load_state_key(Path(self.store.path)))

    def file_sha(self, node: str) -> str | None:
        return self.world.hosts[node].files.get(enc.ENCRYPTION_FILE)

    def secrets(self) -> dict[str, str]:
        return {k: (o.get("metadata") or {}).get("annotations", {}).get(SIM_ENCRYPTION, "")
                for k, o in self.world.kube_objects.items() if o.get("kind") == "Secret"}


def _sim_file_sha(keys: tuple[str, ...]) -> str:
    import hashlib

    want = enc.desired({"enabled": True}, keys)
    assert want is not None
    return hashlib.sha256(SimulatedCerts().encryption_config(want)).hexdigest()


# --- desired state ---------------------------------------------------------------------------


def test_controlplane_nodes_get_the_file_flag_and_label_workers_nothing() -> None:
    plain = compile_desired(_config(BASE))
    on = compile_desired(_config(ENABLED))
    flag = f"--{enc.ENCRYPTION_FLAG}={enc.ENCRYPTION_FILE}"
    for node in on.nodes:
        api = node.service("kube-apiserver")
        if node.has("controlplane"):
            assert api is not None and flag in api.args
            assert node.encryption == on.encryption_hash != ""
            before = plain.node(node.name)
            assert before is not None and before.certs_hash != node.certs_hash
            old_api = before.service("kube-apiserver")
            assert old_api is not None and dict(old_api.labels) != dict(api.labels)
            # only the apiserver reads the file: the other components keep their specs
            for name in ("kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy"):
                assert node.service(name) == before.service(name)
        else:
            assert api is None and node.encryption == ""
    assert on.encryption == ("aescbc:key-1", "identity")
    assert plain.encryption == () and plain.encryption_hash == ""


def test_a_new_key_changes_only_the_apiservers_label_and_the_files() -> None:
    one = compile_desired(_config(ENABLED))
    two = compile_desired(_config(ENABLED), encryption_keys=("key-2", "key-1"))
    assert one.encryption_hash != two.encryption_hash
    for a, b in zip(one.nodes, two.nodes):
        for spec in a.services:
            other = b.service(spec.name)
            assert other is not None
            assert (spec.hash == other.hash) == (spec.name != "kube-apiserver" or not a.encryption)


def test_the_key_never_is_in_a_spec_or_plan_only_names() -> None:
    desired = compile_desired(_config(CUSTOM))
    from lifecycle.plan import Current, diff

    text = json.dumps(diff(Current(), desired).to_dict())
    assert CUSTOM_SECRET not in text and "k-custom" not in text
    assert '"providers": ["custom"]' in text


def test_a_custom_config_that_is_not_an_encryption_configuration_is_refused() -> None:
    bad = BASE + "services:\n  kube-api:\n    secrets_encryption_config:\n      enabled: true\n" \
                 "      custom_config: {kind: Pod}\n"
    with pytest.raises(PlanError, match="custom_config must be an EncryptionConfiguration"):
        compile_desired(_config(bad))


def test_the_real_renderer_writes_rkes_encryption_configuration(tmp_path: Path) -> None:
    rk = Rkel(tmp_path)
    rk.apply(ENABLED)
    ring = rk.keyring()
    assert list(ring.keys) == ["key-1"] and len(base64.b64decode(ring.keys["key-1"])) == 32
    want = enc.desired({"enabled": True}, ("key-1",))
    assert want is not None
    pki = PKI(rk.store, load_state_key(Path(rk.store.path)))
    doc = yaml.safe_load(pki.encryption_config(want))
    assert doc == {
        "apiVersion": "apiserver.config.k8s.io/v1", "kind": "EncryptionConfiguration",
        "resources": [{"resources": ["secrets"], "providers": [
            {"aescbc": {"keys": [{"name": "key-1", "secret": ring.keys["key-1"]}]}},
            {"identity": {}}]}]}


def test_a_custom_config_is_sealed_and_delivered_as_given(tmp_path: Path) -> None:
    rk = Rkel(tmp_path)
    rk.apply(CUSTOM)
    want = enc.desired(_config(CUSTOM).services.kube_api.secrets_encryption_config)
    assert want is not None and want.custom
    pki = PKI(rk.store, load_state_key(Path(rk.store.path)))
    doc = json.loads(pki.encryption_config(want))
    assert doc["resources"][0]["providers"][0]["aescbc"]["keys"][0]["secret"] == CUSTOM_SECRET
    rk.store.close()
    for name in ("cluster.rkel.db", "cluster.rkel.db-wal"):
        path = tmp_path / name
        if path.exists():
            assert CUSTOM_SECRET.encode() not in path.read_bytes(), name
    with pytest.raises(PlanError, match="custom_config"):
        Rkel(tmp_path).rotate()


# --- apply: turning it on ------------------------------------------------------------------


def test_turning_it_on_rolls_the_apiservers_then_rewrites_every_secret(tmp_path: Path) -> None:
    rk = Rkel(tmp_path)
    rk.apply(BASE)
    assert rk.secrets() and set(rk.secrets().values()) == {""}  # stored in clear
    plan = rk.apply(ENABLED)
    titles = [g.title for g in plan.groups]
    rewrite = next(i for i, t in enumerate(titles) if t.startswith("secrets: every Secret"))
    assert rewrite == max(i for i, g in enumerate(plan.groups) if g.phase == "controlplane")
    assert plan.groups[rewrite - 1].title.startswith("controlplane nodes")
    stored = _sim_file_sha(("key-1",))
    assert rk.file_sha("n1") == rk.file_sha("n2") == stored and rk.file_sha("n3") is None
    assert set(rk.secrets().values()) == {stored}
    assert make_plan(rk.config, rk.store).plan.empty  # converged: no second rewrite


def test_a_new_cluster_with_encryption_needs_no_rewrite(tmp_path: Path) -> None:
    rk = Rkel(tmp_path)
    plan = rk.apply(ENABLED)
    assert not any(s.action == "rewrite-secrets" for s in plan.steps)
    assert make_plan(rk.config, rk.store).plan.empty


def test_turning_it_off_is_refused_with_what_to_do(tmp_path: Path) -> None:
    rk = Rkel(tmp_path)
    rk.apply(ENABLED)
    rk.config.write_text(BASE)
    with pytest.raises(PlanError, match="cannot turn encryption off"):
        make_plan(rk.config, rk.store)


# --- rotate-key --------------------------------------------------------------------------------


def test_rotate_key_is_refused_when_encryption_is_not_enabled(tmp_path: Path) -> None:
    rk = Rkel(tmp_path)
    rk.apply(BASE)
    with pytest.raises(PlanError, match="not enabled.*enabled: true"):
        rk.rotate()


def test_rotate_key_plans_three_stages_in_order(tmp_path: Path) -> None:
    rk = Rkel(tmp_path)
    rk.apply(ENABLED)
    rot = plan_rotation(rk.config, rk.store)
    assert (rot.new_key, rot.old_keys) == ("key-2", ("key-1",))
    kinds = [(g.title.split(":")[0], g.phase) for g in rot.plan.groups]
    assert kinds == [("1/3 new key key-2 first, key-1 kept", "certs"),
                     ("1/3 new key key-2 first, key-1 kept", "controlplane"),
                     ("2/3 every Secret rewritten, to be stored with key key-2", "controlplane"),
                     ("3/3 key-1 dropped", "certs"), ("3/3 key-1 dropped", "controlplane"),
                     ("3/3 key key-2 recorded as the only key in use", "controlplane")]
    cp = rot.plan.groups[1]
    assert cp.concurrency == 1 and sorted(u.node for u in cp.units) == ["n1", "n2"]
    firsts = [s.detail["encryption"]["providers"] for s in rot.plan.steps
              if s.action == "deliver-certs"]
    assert firsts == [["aescbc:key-2", "aescbc:key-1", "identity"]] * 2 + \
        [["aescbc:key-2", "identity"]] * 2
    assert len({s.id for s in rot.plan.steps}) == len(rot.plan.steps)


def _check_rotated(rk: Rkel, key2: str) -> None:
    assert make_plan(rk.config, rk.store).plan.empty
    assert encryption_run.active_keys(rk.store) == ("key-2",)
    ring = rk.keyring()
    assert ring.keys["key-2"] == key2  # generated once, not again by the resume
    final = _sim_file_sha(("key-2",))
    assert rk.file_sha("n1") == rk.file_sha("n2") == final
    stored = rk.secrets()
    # rewritten in stage 2 (key-2 first); written again later (the state copy): key-2 only
    assert stored["Secret/default/app-password"] == _sim_file_sha(("key-2", "key-1"))
    assert set(stored.values()) <= {_sim_file_sha(("key-2", "key-1")), final}
    for host in rk.world.hosts.values():
        assert not [c for c in host.containers if c.startswith("old-")]
    assert rk.store.unfinished_run() is None and rk.store.verify_journal() == []


def test_rotate_key_converges(tmp_path: Path) -> None:
    rk = Rkel(tmp_path)
    rk.apply(ENABLED)
    start = rk.writes
    rk.rotate()
    assert rk.writes - start > 20
    _check_rotated(rk, rk.keyring().keys["key-2"])
    rot = plan_rotation(rk.config, rk.store)  # and again: key-3 replaces key-2
    assert (rot.new_key, rot.old_keys) == ("key-3", ("key-2",))


def test_rotate_key_killed_after_each_journal_write_is_finished_by_resume(
        tmp_path: Path) -> None:
    probe = Rkel(tmp_path / "probe")
    probe.apply(ENABLED)
    start = probe.writes
    probe.rotate()
    total = probe.writes - start
    every = int(os.environ.get("RKEL_ENCRYPTION_CRASH_EVERY", "1"))
    for n in range(1, total + 1, every):
        rk = Rkel(tmp_path / f"crash-{n}")
        rk.apply(ENABLED)
        rk.crashed_keyring = None  # type: ignore[assignment]
        rk.rotate(crash_after=rk.writes + n)
        crashed = rk.crashed_keyring
        assert crashed is not None, f"no crash at write {n}"
        _check_rotated(rk, crashed.keys["key-2"])
        rk.store.close()


def test_a_rotation_that_fails_half_way_keeps_both_keys_wanted(tmp_path: Path) -> None:
    rk = Rkel(tmp_path)
    rk.apply(ENABLED)
    rot = plan_rotation(rk.config, rk.store)
    encryption_run.install_rotation_key(rk.store, rot)  # then the process died before the run
    assert encryption_run.active_keys(rk.store) == ("key-2", "key-1")
    with pytest.raises(PlanError, match="run `rkel apply` first"):
        plan_rotation(rk.config, rk.store)
    plan = rk.apply(ENABLED)  # an apply delivers both keys and rewrites: nothing unreadable
    assert any(s.action == "rewrite-secrets" for s in plan.steps)
    assert rk.file_sha("n1") == _sim_file_sha(("key-2", "key-1"))


# --- never in clear --------------------------------------------------------------------------


def rkel(*args: str, cwd: Path, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lifecycle", *args], cwd=cwd, text=True,
                          capture_output=True, env={**os.environ, **(env or {})}, check=False)


def test_cli_keys_never_appear_in_clear_and_a_killed_rotation_resumes(tmp_path: Path) -> None:
    (tmp_path / "cluster.yml").write_text(ENABLED)
    sim = ("--backend", "simulated")
    outputs = []
    for args in (("apply", "--yes", *sim), ("-o", "json", "plan"),
                 ("encrypt", "rotate-key", "--plan", *sim),
                 ("-o", "json", "encrypt", "rotate-key", "--plan", *sim)):
        done = rkel(*args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        outputs += [done.stdout, done.stderr]
    killed = rkel("encrypt", "rotate-key", "--yes", *sim, cwd=tmp_path,
                  env={"RKEL_CRASH_AFTER_JOURNAL_WRITES": "9"})
    assert killed.returncode == -9, killed.stderr
    # the Secrets as stored before the rotation are in an automatic snapshot
    assert "taking an automatic etcd snapshot first (it changes kube-apiserver)" in killed.stderr
    assert [d["kind"] for d in json.loads(rkel("-o", "json", "snapshot", "list",
                                               cwd=tmp_path).stdout)] == ["auto"]
    refused = rkel("encrypt", "rotate-key", "--yes", *sim, cwd=tmp_path)
    assert refused.returncode == 4 and "rkel apply --resume" in refused.stderr
    resumed = rkel("apply", "--resume", "--yes", *sim, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    outputs += [killed.stdout, killed.stderr, resumed.stdout, resumed.stderr]
    history = rkel("-o", "json", "history", cwd=tmp_path)
    outputs.append(history.stdout)
    assert "No changes" in rkel("plan", cwd=tmp_path).stdout
    with Store.open(tmp_path / "cluster.rkel.db") as store:
        ring = enc.Keyring.unseal(store.get_meta(enc.KEYRING),
                                  load_state_key(tmp_path / "cluster.rkel.db"))
        assert encryption_run.active_keys(store) == ("key-2",)
    secrets = list(ring.keys.values())
    assert len(secrets) == 2
    places = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)
              if name.startswith("cluster.rkel.db") and not name.endswith(".key")}
    places["output"] = "\n".join(outputs).encode()
    for where, data in places.items():
        for secret in secrets:
            assert secret.encode() not in data, where
            assert base64.b64decode(secret) not in data, where


def test_cli_rotate_key_without_encryption_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "cluster.yml").write_text(BASE)
    assert rkel("apply", "--yes", "--backend", "simulated", cwd=tmp_path).returncode == 0
    refused = rkel("encrypt", "rotate-key", "--yes", "--backend", "simulated", cwd=tmp_path)
    assert refused.returncode == 3, refused.stderr
    assert "not enabled" in refused.stderr and "Traceback" not in refused.stderr


def test_a_rollback_to_before_a_rotation_brings_the_retired_key_back(tmp_path: Path) -> None:
    from lifecycle.runner import plan_rollback
    from lifecycle.snapshots import save_snapshot

    rk = Rkel(tmp_path)
    rk.apply(ENABLED)
    config = _config(ENABLED)
    save_snapshot(rk.store, rk.world.backend(), config, compile_desired(config), "before",
                  kind="auto", folder=tmp_path / "snaps")
    rk.rotate()
    assert encryption_run.active_keys(rk.store) == ("key-2",)
    rb = plan_rollback(rk.config, rk.store, "before")
    delivered = {tuple(s.detail["encryption"]["providers"]) for s in rb.plan.steps
                 if s.action == "deliver-certs"}
    # the restored data holds Secrets stored under key-1: the apiservers get it back
    assert delivered == {("aescbc:key-2", "aescbc:key-1", "identity")}
    assert rb.plan.steps[-1].action == "rewrite-secrets"  # then all stored under key-2 again
    rk._run(rb.plan, None, desired=rb.desired, kind="rollback",
            applies=rb.row.location["cluster_yml"],
            secrets_encryption=config.services.kube_api.secrets_encryption_config)
    assert encryption_run.active_keys(rk.store) == ("key-2", "key-1")
    assert rk.file_sha("n1") == _sim_file_sha(("key-2", "key-1"))
    assert make_plan(rk.config, rk.store).plan.empty  # kept: a later apply drops no key
    rot = plan_rotation(rk.config, rk.store)  # and a rotation retires both
    assert (rot.new_key, rot.old_keys) == ("key-3", ("key-2", "key-1"))


def test_a_rollback_to_before_encryption_was_on_lets_it_be_off(tmp_path: Path) -> None:
    from lifecycle.runner import plan_rollback
    from lifecycle.snapshots import save_snapshot

    rk = Rkel(tmp_path)
    rk.apply(BASE)
    config = _config(BASE)
    save_snapshot(rk.store, rk.world.backend(), config, compile_desired(config), "plain",
                  kind="auto", folder=tmp_path / "snaps")
    rk.apply(ENABLED)
    rb = plan_rollback(rk.config, rk.store, "plain")
    rk._run(rb.plan, None, desired=rb.desired, kind="rollback",
            applies=rb.row.location["cluster_yml"])
    rk.config.write_text(BASE)
    assert make_plan(rk.config, rk.store).plan.empty  # no refusal: nothing runs encrypted
    plan = rk.apply(ENABLED)  # on again: the Secrets restored in clear are rewritten
    assert any(s.action == "rewrite-secrets" for s in plan.steps)


def test_a_run_limited_to_etcd_does_not_count_as_encrypting_the_secrets(tmp_path: Path) -> None:
    rk = Rkel(tmp_path)
    rk.apply(BASE)
    rk.config.write_text(ENABLED)
    planned = make_plan(rk.config, rk.store, ("etcd",))
    assert not any(s.action == "rewrite-secrets" for s in planned.plan.steps)
    rk._run(planned.plan, None, desired=planned.desired)  # delivers the file, rolls nothing
    plan = rk.apply(ENABLED)
    assert any(s.action == "rewrite-secrets" for s in plan.steps)
    assert set(rk.secrets().values()) == {_sim_file_sha(("key-1",))}


def test_state_verify_checks_the_keyring(tmp_path: Path) -> None:
    (tmp_path / "cluster.yml").write_text(ENABLED)
    assert rkel("apply", "--yes", "--backend", "simulated", cwd=tmp_path).returncode == 0
    ok = rkel("state", "verify", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok    secrets encryption keys: key-1 in use" in ok.stdout
    other = {"RKEL_STATE_KEY": base64.urlsafe_b64encode(b"k" * 32).decode()}
    bad = rkel("state", "verify", cwd=tmp_path, env=other)
    assert bad.returncode == 4 and "FAIL  secrets encryption keys" in bad.stdout


def test_rotate_encryption_key_in_cluster_yml_points_to_the_command(tmp_path: Path) -> None:
    (tmp_path / "cluster.yml").write_text(ENABLED + "rotate_encryption_key: true\n")
    plan = rkel("plan", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "run `rkel encrypt rotate-key`" in plan.stdout
