"""`rkel kubeconfig`: the admin kubeconfig written again from the state, as a user runs it."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from cryptography.x509.oid import NameOID
from ruamel.yaml import YAML

from lifecycle.config import load_config
from lifecycle.desired import compile_desired
from lifecycle.pki import PKI, load_state_key
from lifecycle.pki_x509 import issued_by, load_cert
from lifecycle.runner import write_kubeconfig
from store import Store
from tests.test_cli import EXAMPLES, no_traceback, rkel


def applied(directory: Path) -> Path:
    """A cluster applied on the Simulated backend, with the certificates a real apply makes."""
    path = directory / "cluster.yml"
    shutil.copy(EXAMPLES / "three-node.yml", path)
    result = rkel("-c", str(path), "apply", "--backend", "simulated", "--yes")
    assert result.returncode == 0, result.stderr
    state = directory / "cluster.rkel.db"
    with Store.open(state) as store:
        PKI(store, load_state_key(state)).ensure(compile_desired(load_config(path).config))
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return applied(tmp_path_factory.mktemp("kubeconfig"))


def read(path: Path) -> dict:
    return YAML(typ="safe").load(path.read_text())


def test_no_state_yet_is_a_clear_error_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yml"
    shutil.copy(EXAMPLES / "three-node.yml", path)
    result = rkel("-c", str(path), "kubeconfig")
    assert result.returncode == 4
    assert "no state yet" in result.stderr and "rkel apply" in result.stderr
    no_traceback(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.yml"]


def test_writes_kube_config_beside_cluster_yml_0600_as_apply_would(cluster: Path) -> None:
    target = cluster.with_name("kube_config_cluster.yml")
    target.unlink(missing_ok=True)
    result = rkel("-c", str(cluster), "kubeconfig")
    assert result.returncode == 0, result.stderr
    assert str(target) in result.stdout and "https://10.0.0.11:6443" in result.stdout
    assert target.stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" not in result.stdout + result.stderr
    doc = read(target)
    assert doc["clusters"][0]["cluster"]["server"] == "https://10.0.0.11:6443"  # cp-1
    assert doc["current-context"] == "demo"  # cluster_name of the example
    user = doc["users"][0]["user"]
    cert = load_cert(base64.b64decode(user["client-certificate-data"]))
    ca = load_cert(base64.b64decode(doc["clusters"][0]["cluster"]["certificate-authority-data"]))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "kube-admin"
    assert issued_by(cert, ca)
    assert b"PRIVATE KEY" in base64.b64decode(user["client-key-data"])
    # byte for byte what `rkel apply` writes at the end of a run
    state = cluster.with_name("cluster.rkel.db")
    desired = compile_desired(load_config(cluster).config)
    regenerated = target.read_bytes()
    with Store.open(state) as store:
        write_kubeconfig(PKI(store, load_state_key(state)), desired, cluster)
    assert target.read_bytes() == regenerated


def test_output_writes_elsewhere_and_print_writes_nothing(cluster: Path, tmp_path: Path) -> None:
    default = cluster.with_name("kube_config_cluster.yml")
    default.unlink(missing_ok=True)
    out = tmp_path / "admin.yml"
    result = rkel("-c", str(cluster), "-o", "json", "kubeconfig", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"] == str(out)
    assert out.stat().st_mode & 0o777 == 0o600 and not default.exists()
    printed = rkel("-c", str(cluster), "kubeconfig", "--print")
    assert printed.returncode == 0 and printed.stdout == out.read_text()
    assert not default.exists()
    both = rkel("-c", str(cluster), "kubeconfig", "--print", "-o", str(out))
    assert both.returncode == 2 and "--print" in both.stderr


def test_an_unwritable_output_is_a_clear_error(cluster: Path, tmp_path: Path) -> None:
    result = rkel("-c", str(cluster), "kubeconfig", "-o", str(tmp_path / "no" / "such" / "k.yml"))
    assert result.returncode == 4 and "cannot write the kubeconfig" in result.stderr
    no_traceback(result)


def test_a_state_without_certificates_says_to_apply(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yml"
    shutil.copy(EXAMPLES / "three-node.yml", path)
    assert rkel("-c", str(path), "apply", "--backend", "simulated", "--yes").returncode == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    result = rkel("-c", str(path), "kubeconfig")
    assert result.returncode == 4 and "rkel apply" in result.stderr
    no_traceback(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no kubeconfig, no key minted
