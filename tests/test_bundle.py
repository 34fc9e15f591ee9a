"""State bundles: export the state and its key under a passphrase, unpack them elsewhere."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from lifecycle.config import load_config_text
from lifecycle.desired import compile_desired
from lifecycle.pki import PKI, load_state_key
from store import Store
from tests.test_rollback import OLD

PASS = "correct horse battery staple"


def rkel(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lifecycle", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **(env or {})})


def test_export_then_unpack_gives_back_the_state_and_the_key(tmp_path: Path) -> None:
    (tmp_path / "cluster.yml").write_text(OLD)
    assert rkel("apply", "--yes", "--backend", "simulated", cwd=tmp_path).returncode == 0
    state = tmp_path / "cluster.rkel.db"
    with Store.open(state) as store:  # the certificates a real apply makes
        assert PKI(store, load_state_key(state)).ensure(
            compile_desired(load_config_text(OLD).config))
    secret = tmp_path / "pass.txt"
    secret.write_text(PASS + "\n")
    out = tmp_path / "backup.bundle"
    exported = rkel("-o", "json", "state", "export", "--out", str(out), "--passphrase-file",
                    str(secret), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = load_state_key(tmp_path / "cluster.rkel.db").decode()
    raw = out.read_text()
    assert key not in raw and "PRIVATE KEY" not in raw and key not in exported.stdout
    again = rkel("state", "export", "--out", str(out), "--passphrase-file", str(secret),
                 cwd=tmp_path)
    assert again.returncode == 4 and "already exists" in again.stderr

    elsewhere = tmp_path / "restored" / "cluster.rkel.db"
    elsewhere.parent.mkdir()
    wrong = rkel("--state", str(elsewhere), "state", "unpack", str(out), cwd=tmp_path,
                 env={"RKEL_BUNDLE_PASSPHRASE": "not the passphrase"})
    assert wrong.returncode == 4 and "wrong passphrase" in wrong.stderr
    assert not elsewhere.exists()
    unpacked = rkel("--state", str(elsewhere), "state", "unpack", str(out), cwd=tmp_path,
                    env={"RKEL_BUNDLE_PASSPHRASE": PASS})
    assert unpacked.returncode == 0, unpacked.stderr
    for path in (elsewhere, elsewhere.with_name("cluster.rkel.db.key")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with Store.open(elsewhere) as store:
        assert sorted(n.name for n in store.nodes()) == ["n1", "n2", "n3"]
        ca = PKI(store, load_state_key(elsewhere)).material("kube-ca")
        assert b"PRIVATE KEY" in ca.key_pem  # the CA's key decrypts with the unpacked key
    verify = rkel("--state", str(elsewhere), "state", "verify", cwd=tmp_path)
    assert verify.returncode == 0, verify.stdout


def test_a_changed_bundle_or_a_short_passphrase_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cluster.yml").write_text(OLD)
    assert rkel("apply", "--yes", "--backend", "simulated", cwd=tmp_path).returncode == 0
    short = rkel("state", "export", "--out", str(tmp_path / "b"), cwd=tmp_path,
                 env={"RKEL_BUNDLE_PASSPHRASE": "short"})
    assert short.returncode == 4 and "at least 12" in short.stderr
    out = tmp_path / "b"
    assert rkel("state", "export", "--out", str(out), cwd=tmp_path,
                env={"RKEL_BUNDLE_PASSPHRASE": PASS}).returncode == 0
    doc = json.loads(out.read_text())
    doc["data"] = doc["data"][:-8] + ("A" * 8)
    out.write_text(json.dumps(doc))
    bad = rkel("--state", str(tmp_path / "x.db"), "state", "unpack", str(out), cwd=tmp_path,
               env={"RKEL_BUNDLE_PASSPHRASE": PASS})
    assert bad.returncode == 4 and "changed" in bad.stderr and "Traceback" not in bad.stderr
    junk = tmp_path / "junk"
    junk.write_text("hello")
    notb = rkel("--state", str(tmp_path / "y.db"), "state", "unpack", str(junk), cwd=tmp_path,
                env={"RKEL_BUNDLE_PASSPHRASE": PASS})
    assert notb.returncode == 4 and "not an rkel state bundle" in notb.stderr
