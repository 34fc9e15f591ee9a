"""Registry credentials for real: rkel's SSH backend pulls from the testbed's basic-auth registry.

The testbed runs a second docker-registry on 10.77.0.1:5001 that serves the same storage as
10.77.0.1:5000 but requires HTTP basic auth (user rkel-pull, password kept 0600 in the state
dir). With cluster.yml-style `private_registries` credentials, host rkn1's own Docker Engine
pulls and runs the image; without them, or with a wrong password, the pull fails with a
HostError naming image and registry. The password never shows up in the container, the state
file, an error or a log line. No mocks: every call crosses SSH to rkn1's sshd and dockerd.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from conftest import Testbed

from lifecycle.config.loader import load_config
from lifecycle.config.model import ClusterConfig, PrivateRegistry
from lifecycle.errors import HostError
from lifecycle.hosts.ssh import SSHBackend, SSHHost, node_ref
from lifecycle.spec import ServiceSpec
from store import Store

AUTH_REGISTRY = "10.77.0.1:5001"
USER = "rkel-pull"
IMAGE = f"{AUTH_REGISTRY}/rancher/rke-tools:testbed"
SPEC = ServiceSpec(name="tb-auth-pull", image=IMAGE, command=("sleep", "3600"),
                   network_mode="none", restart="no", env=("TB_MARK=auth-pull",),
                   labels=(("io.rkel.test", "registry-auth"),))


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def password(testbed: Testbed) -> str:
    testbed.ensure()  # the standard three hosts (and both registries)
    path = testbed.state_dir / "registry" / "auth" / "password"
    assert path.stat().st_mode & 0o777 == 0o600
    value = path.read_text().strip()
    assert len(value) >= 16
    return value


@pytest.fixture(scope="module")
def base_config(testbed: Testbed, password: str) -> ClusterConfig:
    return load_config(testbed.cluster_yml).config


def with_registry(config: ClusterConfig, user: str = "", pw: str = "") -> ClusterConfig:
    """The testbed config, its default anonymous registry kept, plus the auth registry."""
    return dataclasses.replace(config, private_registries=(
        *config.private_registries, PrivateRegistry(AUTH_REGISTRY, user, pw)))


@dataclasses.dataclass
class Run:
    backend: SSHBackend
    store: Store
    db: Path
    host: SSHHost

    def state_bytes(self) -> bytes:
        """Every byte of the sqlite state file and its WAL/SHM companions."""
        return b"".join(p.read_bytes() for p in sorted(self.db.parent.glob(self.db.name + "*")))


@pytest.fixture
def open_run(tmp_path: Path) -> Iterator:
    """open_run(config) -> a backend with its own state file, connected to rkn1."""
    runs: list[Run] = []

    def _open(config: ClusterConfig) -> Run:
        db = tmp_path / f"run{len(runs)}" / "cluster.rkel.db"
        db.parent.mkdir()
        store = Store.open(db)
        backend = SSHBackend(config, store)
        ref = node_ref(next(n for n in config.nodes if n.name == "rkn1" or n.address == "10.77.0.11"))
        run = Run(backend, store, db, backend.host(ref))
        runs.append(run)
        return run

    yield _open
    for run in runs:  # a test that got to its end has cleaned up and closed its run itself
        try:
            if run.host.alive():
                run.host.remove_container(SPEC.name)
                _remove_image(run.host)
        finally:
            run.backend.close()
            run.store.close()


def _remove_image(host: SSHHost) -> None:
    try:
        host.api.remove_image(IMAGE, force=True)
    except docker.errors.ImageNotFound:
        pass


def make_absent(host: SSHHost) -> None:
    """No container of ours and no IMAGE on the host (through its Docker API)."""
    host.remove_container(SPEC.name)
    _remove_image(host)
    with pytest.raises(docker.errors.ImageNotFound):
        host.api.inspect_image(IMAGE)
    assert IMAGE not in {t for img in host.api.images() for t in (img.get("RepoTags") or [])}


def secret_forms(pw: str) -> list[str]:
    """The password as-is and as it would appear in a Basic header or a base64 auth config."""
    return [pw, base64.b64encode(f"{USER}:{pw}".encode()).decode(),
            base64.b64encode(pw.encode()).decode().rstrip("=")]


def assert_absent(secret: str, text: str | bytes, where: str) -> None:
    data = text.encode() if isinstance(text, str) else text
    for form in secret_forms(secret):
        assert form.encode() not in data, f"the registry password appears in {where}"


def registry_log(testbed: Testbed) -> Path:
    return testbed.state_dir / "registry" / "registry-auth.log"


def served_since(testbed: Testbed, offset: int) -> str:
    with registry_log(testbed).open("rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


ACCESS = re.compile(r'^10\.77\.0\.11 \S+ \S+ \[[^]]*\] "(\w+) (\S+) HTTP/[\d.]+" (\d{3}) ')


def requests_from_rkn1(served: str) -> list[tuple[str, str, int]]:
    """(method, path, status) of each request rkn1's dockerd made (the registry's access log)."""
    return [(m[1], m[2], int(m[3])) for line in served.splitlines() if (m := ACCESS.match(line))]


def all_log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record: formatted text, message, raw args and exception text."""
    parts = [caplog.text]
    for rec in caplog.records:
        parts += [rec.getMessage(), repr(rec.args), repr(rec.msg), rec.exc_text or ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------- tests
@pytest.mark.e2e
def test_registry_refuses_anonymous_pulls(testbed: Testbed, password: str) -> None:
    """The premise: 10.77.0.1:5001 really requires the credentials (checked from the machine)."""
    url = f"http://{AUTH_REGISTRY}/v2/rancher/rke-tools/manifests/testbed"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=10)
    assert err.value.code == 401
    assert 'realm="rkel-testbed"' in err.value.headers.get("WWW-Authenticate", "")
    token = base64.b64encode(f"{USER}:{password}".encode()).decode()
    req = urllib.request.Request(url, headers={
        "Authorization": f"Basic {token}",
        "Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


@pytest.mark.e2e
def test_pull_with_credentials_runs_the_container_and_leaks_nothing(
    testbed: Testbed, base_config: ClusterConfig, password: str, open_run,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # everything: rkel, docker SDK, urllib3, paramiko
    run = open_run(with_registry(base_config, USER, password))
    host = run.host
    make_absent(host)
    log_start = registry_log(testbed).stat().st_size

    host.run_container(SPEC)

    have = host.containers()[SPEC.name]
    assert have.running and have.image == IMAGE
    assert IMAGE in host.api.inspect_image(IMAGE)["RepoTags"]
    # The pull went through the auth registry, authenticated: its access log has rkn1's
    # manifest and blob requests answered 200 (anonymous ones get 401).
    served = served_since(testbed, log_start)
    ok = {path for _m, path, status in requests_from_rkn1(served) if status == 200}
    assert "/v2/rancher/rke-tools/manifests/testbed" in ok, served[-2000:]
    assert any(path.startswith("/v2/rancher/rke-tools/blobs/sha256:") for path in ok), served[-2000:]
    assert_absent(password, served, "the registry's log")

    # (c) docker inspect of the container: environment, command, labels, everything.
    info = host.api.inspect_container(SPEC.name)
    assert info["Config"]["Env"] is not None and "TB_MARK=auth-pull" in info["Config"]["Env"]
    assert info["Config"]["Labels"]["io.rkel.test"] == "registry-auth"
    assert info["Args"] == ["3600"] and info["Path"] == "sleep"
    for part in ("Env", "Cmd", "Entrypoint", "Labels"):
        assert_absent(password, json.dumps(info["Config"][part]), f"the container's {part}")
    assert_absent(password, json.dumps(info), "docker inspect of the container")
    assert_absent(password, json.dumps(host.api.inspect_image(IMAGE)), "docker inspect of the image")

    # (c) logs at DEBUG: there were some, and none has the password.
    assert any(r.levelno == logging.DEBUG for r in caplog.records)
    assert_absent(password, all_log_text(caplog), "the DEBUG logs")

    # (c) the sqlite state file, after the backend wrote to it (host key pinned) and closed.
    assert run.store.known_host("10.77.0.11") is not None
    host.remove_container(SPEC.name)
    _remove_image(host)
    run.backend.close()
    run.store.close()
    data = run.state_bytes()
    assert data.startswith(b"SQLite format 3\x00")
    assert_absent(password, data, "the state file")
    assert USER.encode() not in data  # no registry credential of any kind is stored


BAD_CREDENTIALS = {
    "no-credentials": lambda pw: ("", ""),
    "wrong-password": lambda pw: (USER, "wrong-" + secrets.token_urlsafe(12)),
    "no-registry-entry": None,
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", sorted(BAD_CREDENTIALS))
def test_pull_without_valid_credentials_fails_with_a_clear_error(
    testbed: Testbed, base_config: ClusterConfig, password: str, open_run,
    caplog: pytest.LogCaptureFixture, case: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    make = BAD_CREDENTIALS[case]
    if make is None:
        config, tried = base_config, ""
    else:
        user, tried = make(password)
        config = with_registry(base_config, user, tried)
    run = open_run(config)
    make_absent(run.host)
    log_start = registry_log(testbed).stat().st_size

    with pytest.raises(HostError) as err:
        run.host.run_container(SPEC)

    message = str(err.value)
    assert err.value.host == "rkn1"
    assert IMAGE in message and AUTH_REGISTRY in message, message
    assert any(w in message.lower() for w in ("unauthorized", "authentication", "credentials")), message
    for secret in filter(None, (password, tried)):
        assert_absent(secret, message, "the HostError")
        assert_absent(secret, repr(err.value), "the HostError's repr")
        assert_absent(secret, all_log_text(caplog), "the DEBUG logs")
    # Nothing was pulled or created; the registry refused the manifest.
    with pytest.raises(docker.errors.ImageNotFound):
        run.host.api.inspect_image(IMAGE)
    assert SPEC.name not in run.host.containers()
    seen = requests_from_rkn1(served_since(testbed, log_start))
    assert seen and all(status == 401 for _m, _p, status in seen), seen
    run.backend.close()
    run.store.close()
    for secret in filter(None, (password, tried)):
        assert_absent(secret, run.state_bytes(), "the state file")


@pytest.mark.e2e
def test_local_docker_credentials_are_not_forwarded_to_nodes(
    testbed: Testbed, base_config: ClusterConfig, password: str, open_run,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    local = tmp_path / "docker-config"
    local.mkdir(mode=0o700)
    token = base64.b64encode(f"{USER}:{password}".encode()).decode()
    (local / "config.json").write_text(json.dumps({"auths": {AUTH_REGISTRY: {"auth": token}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(local))  # read when the backend's client is built
    run = open_run(base_config)  # cluster.yml has no credentials for AUTH_REGISTRY
    make_absent(run.host)
    with pytest.raises(HostError):
        run.host.run_container(SPEC)  # must be anonymous, as cluster.yml says
