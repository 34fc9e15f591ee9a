"""Secrets encryption at rest on the real testbed, and `rkel encrypt rotate-key`.

One story on 3 all-role nodes (rkn1..rkn3, non-root SSH user):
1. apply with `secrets_encryption_config: {enabled: true}`: every controlplane node holds
   /etc/kubernetes/ssl/encryption.yaml (root, 0600) with key-1, kube-apiserver runs with
   --encryption-provider-config, and no key is in any container's env, args or labels;
2. a Secret created with kubectl is stored in etcd as `k8s:enc:aescbc:v1:key-1:...` (read raw
   with etcdctl), without its plaintext, and kubectl reads it back;
3. `rkel encrypt rotate-key`, killed (-9) while the apiservers roll in its first stage, then
   `rkel apply --resume`: the raw value now carries key-2, kubectl still reads it, key-1 is gone
   from encryption.yaml on every node, and `rkel plan` has nothing to do;
4. neither key is in clear in the state file, anything rkel printed, or `docker inspect`.
"""

from __future__ import annotations

import base64
import json
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lifecycle import encryption as enc
from lifecycle.pki import load_state_key
from store import Store
from tests.e2e.conftest import cluster_story
from tests.e2e.test_cluster import ALL_ROLES, HOSTS, ready_nodes
from tests.e2e.test_upgrade import Upgrade

pytestmark = pytest.mark.e2e

SECRET_KEY = "/registry/secrets/default/e2e-encrypted"
PLAINTEXT = "e2e-plaintext-password-7f3a"


@pytest.fixture(scope="module")
def story(testbed: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upgrade]:
    with cluster_story(Upgrade, testbed, tmp_path_factory, "encryption") as c:
        yield c


def raw(c: Upgrade, key: str) -> bytes:
    out = json.loads(c.etcd("get", key, "-w", "json").stdout)
    kvs = out.get("kvs") or []
    assert kvs, f"{key} is not in etcd"
    return base64.b64decode(kvs[0]["value"])


def encryption_file(c: Upgrade, host: str) -> Path:
    return c.testbed.state_dir / f"n{host[-1]}" / "etc-kubernetes" / "ssl" / "encryption.yaml"


def keyring(c: Upgrade) -> enc.Keyring:
    with Store.open(c.state) as store:
        return enc.Keyring.unseal(store.get_meta(enc.KEYRING), load_state_key(c.state))


def read_secret(c: Upgrade) -> str:
    got = c.kube_json("get", "secret", "e2e-encrypted", "-n", "default")
    return base64.b64decode(got["data"]["password"]).decode()


def apiserver_inspect(c: Upgrade) -> list[str]:
    out = []
    for host in HOSTS:
        client = c.engine(host)
        try:
            for container in client.containers.list(all=True):
                out.append(json.dumps({k: container.attrs[k] for k in ("Config", "Args")}))
        finally:
            client.close()
    return out


def test_apply_with_encryption_writes_the_file_and_the_flag(story: Upgrade) -> None:
    c = story
    c.write({h: ALL_ROLES for h in HOSTS},
            services={"kube-api": {"secrets_encryption_config": {"enabled": True}}})
    plan = c.rkel("plan")
    assert "encryption.yaml: key-1, identity" in plan.stdout, plan.stdout
    c.apply("apply-with-encryption")
    ready_nodes(c, 3)
    ring = keyring(c)
    assert list(ring.keys) == ["key-1"]
    for host in HOSTS:
        path = encryption_file(c, host)
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0, host
        text = path.read_text()
        assert "name: key-1" in text and ring.keys["key-1"] in text
    args = c.ssh("rkn1", "docker inspect -f '{{json .Args}}' kube-apiserver")
    assert "--encryption-provider-config=/etc/kubernetes/ssl/encryption.yaml" in args
    inspected = "\n".join(apiserver_inspect(c))
    assert ring.keys["key-1"] not in inspected


def test_a_secret_is_stored_encrypted_and_read_back(story: Upgrade) -> None:
    c = story
    c.kubectl("create", "secret", "generic", "e2e-encrypted", "-n", "default",
              f"--from-literal=password={PLAINTEXT}")
    stored = raw(c, SECRET_KEY)
    assert stored.startswith(b"k8s:enc:aescbc:v1:key-1:"), stored[:40]
    assert PLAINTEXT.encode() not in stored
    assert base64.b64encode(PLAINTEXT.encode()) not in stored
    assert read_secret(c) == PLAINTEXT


def test_rotate_key_killed_then_resumed_moves_every_secret_to_the_new_key(
        story: Upgrade) -> None:
    c = story
    shown = c.rkel("encrypt", "rotate-key", "--plan")
    assert shown.returncode == 0, shown.stderr
    assert "1/3 new key key-2 first, key-1 kept" in shown.stdout
    started = time.monotonic()
    # journal writes: certs 3x2, then into the first apiserver roll of stage 1
    crashed = c.rkel("encrypt", "rotate-key", "--yes",
                     env={"RKEL_CRASH_AFTER_JOURNAL_WRITES": "10"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    refused = c.rkel("encrypt", "rotate-key", "--yes")
    assert refused.returncode == 4 and "--resume" in refused.stderr
    resumed = c.rkel("apply", "--resume", "--yes")
    c.timings["rotate-key-with-kill-9"] = time.monotonic() - started
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    stored = raw(c, SECRET_KEY)
    assert stored.startswith(b"k8s:enc:aescbc:v1:key-2:"), stored[:40]
    assert PLAINTEXT.encode() not in stored
    assert read_secret(c) == PLAINTEXT
    ring = keyring(c)
    for host in HOSTS:
        text = encryption_file(c, host).read_text()
        assert "name: key-2" in text and ring.keys["key-2"] in text, host
        assert "key-1" not in text and ring.keys["key-1"] not in text, host
    nodes = ready_nodes(c, 3)
    assert all(not n["spec"].get("unschedulable") for n in nodes), "a node was left cordoned"
    assert "No changes" in c.rkel("plan").stdout
    containers = c.all_containers()
    assert not [k for k in containers if k[1].startswith(("old-", "rkel-helper"))], containers


def test_no_key_is_in_clear_in_the_state_outputs_or_containers(story: Upgrade) -> None:
    c = story
    ring = keyring(c)
    assert set(ring.keys) == {"key-1", "key-2"}
    places = {p.name: p.read_bytes() for p in c.workdir.iterdir()
              if p.name.startswith("cluster.rkel.db") and not p.name.endswith(".key")}
    places["outputs"] = "\n".join(c.outputs).encode()
    places["docker inspect"] = "\n".join(apiserver_inspect(c)).encode()
    for where, data in places.items():
        for secret in ring.keys.values():
            assert secret.encode() not in data, where
            assert base64.b64decode(secret) not in data, where
