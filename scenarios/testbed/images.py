"""Registry and images of the testbed: nothing is pulled from outside, everything is built here.

Images are root filesystems assembled from the machine's own files (Debian's python3.11, etcd,
etcdctl, busybox and the libraries `ldd` names for them), turned into images with
`tar -C ROOTFS -c . | docker import -` on one of the testbed's engines, and pushed to the
testbed registry (docker-registry, filesystem storage under the state dir). A second registry
process serves the same storage on AUTH_REGISTRY and requires HTTP basic auth (user AUTH_USER,
a password generated once and kept 0600 in the state dir, never printed).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from network import AUTH_REGISTRY_PORT, GATEWAY, REGISTRY_PORT, Host
from nodes import DOCKER_CLI, StateDir
from procs import ProcRecord, TestbedError, launch, log, run

REGISTRY = f"{GATEWAY}:{REGISTRY_PORT}"
AUTH_REGISTRY = f"{GATEWAY}:{AUTH_REGISTRY_PORT}"
AUTH_USER = "rkel-pull"
AUTH_REALM = "rkel-testbed"
HTPASSWD = "/usr/bin/htpasswd"  # apache2-utils: bcrypt (-B), the only hash docker-registry takes
MANIFEST_TYPES = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
])
PY_SKIP = ("test", "idlelib", "tkinter", "ensurepip", "lib2to3", "__pycache__")


@dataclass(frozen=True)
class ImageSpec:
    """An image the testbed provides: repository, tag and which root filesystem it is."""

    repo: str
    tag: str
    rootfs: str  # "base" (python3.11 + etcd + etcdctl + busybox) or "tools" (busybox)

    @property
    def ref(self) -> str:
        return f"{REGISTRY}/{self.repo}:{self.tag}"


IMAGES = (
    ImageSpec("rkel-test/base", "py311", "base"),
    ImageSpec("rancher/mirrored-coreos-etcd", "v3.4.23-testbed", "base"),
    ImageSpec("rancher/rke-tools", "testbed", "tools"),
)


def registry_config(sd: StateDir, addr: str, auth: bool = False) -> dict[str, Any]:
    """docker-registry configuration (JSON is YAML) serving the shared storage on `addr`."""
    cfg: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "info", "formatter": "text"},
        "storage": {"filesystem": {"rootdirectory": str(sd.registry / "data")},
                    "delete": {"enabled": True}},
        "http": {"addr": addr},
    }
    if auth:
        cfg["auth"] = {"htpasswd": {"realm": AUTH_REALM, "path": str(sd.registry_auth / "htpasswd")}}
    return cfg


def registry_password(sd: StateDir) -> str:
    """The auth registry's password for AUTH_USER: generated once, kept 0600, never printed."""
    sd.registry_auth.mkdir(parents=True, exist_ok=True)
    sd.registry_auth.chmod(0o700)
    path = sd.registry_password
    try:
        password = path.read_text().strip()
    except FileNotFoundError:
        password = ""
    if not password:
        password = secrets.token_urlsafe(24)
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
        tmp.replace(path)
    path.chmod(0o600)
    return password


def write_htpasswd(sd: StateDir) -> None:
    """(Re)write the htpasswd file for AUTH_USER: bcrypt, the password fed on stdin (`-i`)."""
    if not Path(HTPASSWD).exists():
        raise TestbedError(f"{HTPASSWD} is missing; Debian's apache2-utils provides it: run "
                           "`apt-get install -y apache2-utils` (or pass --install-packages)")
    password = registry_password(sd)
    target = sd.registry_auth / "htpasswd"
    tmp = target.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    run([HTPASSWD, "-B", "-i", "-c", str(tmp), AUTH_USER], stdin=password.encode())
    tmp.chmod(0o600)
    tmp.replace(target)


def basic_auth(sd: StateDir) -> str:
    """The Authorization header value for AUTH_USER (never logged)."""
    token = base64.b64encode(f"{AUTH_USER}:{registry_password(sd)}".encode()).decode()
    return f"Basic {token}"


def registry_up(sd: StateDir, addr: str, netns: Path | None, auth: bool = False) -> bool:
    """The registry answers /v2/: with 200, or for the auth registry 401 without credentials
    and 200 with them."""
    url = f"http://{addr}/v2/"
    if not auth:
        return http_status(url, netns) == 200
    return http_status(url, netns) == 401 and http_status(url, netns, authorization=basic_auth(sd)) == 200


def start_registry(sd: StateDir, name: str, addr: str, netns: Path | None,
                   auth: bool = False) -> ProcRecord:
    """Start a registry process on `addr` (inside `netns` if given) and wait until it answers."""
    (sd.registry / "data").mkdir(parents=True, exist_ok=True)
    if auth:
        write_htpasswd(sd)
    cfg = sd.registry / f"{name}.json"
    cfg.write_text(json.dumps(registry_config(sd, addr, auth), indent=2) + "\n")
    cmd = ["docker-registry", "serve", str(cfg)]
    if netns is not None:
        cmd = ["nsenter", f"--net={netns}", *cmd]
    rec = launch(cmd, sd.registry / f"{name}.log")
    deadline = time.monotonic() + 30
    while not registry_up(sd, addr, netns, auth):
        if time.monotonic() >= deadline:
            raise TestbedError(f"registry {name} on {addr} does not answer; see {sd.registry}/{name}.log")
        time.sleep(0.2)
    return rec


_HTTP_PROBE = (
    "import sys,urllib.request,urllib.error\n"
    "req=urllib.request.Request(sys.argv[1],headers={'Accept':sys.argv[2]})\n"
    "try: print(urllib.request.urlopen(req,timeout=3).status)\n"
    "except urllib.error.HTTPError as e: print(e.code)\n"
    "except OSError: print(0)\n"
)


def http_status(url: str, netns: Path | None = None, accept: str = "*/*",
                authorization: str | None = None) -> int:
    """HTTP status of GET `url` (0 when unreachable), from the machine or inside `netns`.

    `authorization` (a header value, a secret) is only sent from the machine itself: it never
    goes on a command line."""
    if netns is not None:
        if authorization is not None:
            raise ValueError("http_status: an Authorization header is only sent from the machine")
        cmd = ["nsenter", f"--net={netns}", sys.executable, "-c", _HTTP_PROBE, url, accept]
        out = run(cmd, check=False, timeout=15).stdout.strip()
        return int(out) if out.isdigit() else 0
    headers = {"Accept": accept}
    if authorization is not None:
        headers["Authorization"] = authorization
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=3) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def missing_images() -> list[ImageSpec]:
    """The testbed images the registry does not hold yet."""
    return [
        img for img in IMAGES
        if http_status(f"http://{REGISTRY}/v2/{img.repo}/manifests/{img.tag}",
                       accept=MANIFEST_TYPES) != 200
    ]


def ensure_images(sd: StateDir, builder: Host) -> list[str]:
    """Build and push the missing images with `builder`'s engine; returns the refs pushed."""
    missing = missing_images()
    if not missing:
        return []
    docker = [DOCKER_CLI, "-H", f"unix://{sd.docker_sock(builder)}"]
    build = sd.root / "build"
    shutil.rmtree(build, ignore_errors=True)
    try:
        for rootfs in sorted({img.rootfs for img in missing}):
            started = time.monotonic()
            tree = build / rootfs
            (build_base_rootfs if rootfs == "base" else build_tools_rootfs)(tree)
            local = f"rkel-testbed-build/{rootfs}:latest"
            docker_import(docker, tree, local)
            for img in (i for i in missing if i.rootfs == rootfs):
                run([*docker, "tag", local, img.ref])
                run([*docker, "push", img.ref], timeout=600)
            log(f"built and pushed the {rootfs} image(s) in {time.monotonic() - started:.1f}s")
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return [img.ref for img in missing]


def docker_import(docker: list[str], tree: Path, name: str) -> None:
    """`tar -C tree -c . | docker import - name`."""
    tar = subprocess.Popen(["tar", "-C", str(tree), "-c", "."], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    imp = subprocess.run([*docker, "import", "-", name], stdin=tar.stdout,
                         capture_output=True, text=True, timeout=600)
    tar.stdout.close()
    if tar.wait() != 0 or imp.returncode != 0:
        raise TestbedError(f"docker import of {tree} failed: {imp.stderr.strip()}")


def _copy_parents(src: str, dest: Path) -> None:
    """`cp --parents -L src dest`: copy the file (dereferenced) to the same path under dest."""
    target = dest / src.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, target)


def _libraries(paths: list[str]) -> set[str]:
    """Every shared library `ldd` lists for the given binaries (static ones list none)."""
    libs: set[str] = set()
    for path in paths:
        for line in run(["ldd", path], check=False).stdout.splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) > parts.index("=>") + 1:
                cand = parts[parts.index("=>") + 1]
            else:
                cand = parts[0] if parts else ""
            if cand.startswith("/"):
                libs.add(cand)
    return libs


def _skeleton(tree: Path) -> None:
    """Directories and files every testbed image has; busybox applets under /bin."""
    for sub in ("bin", "etc", "root", "tmp", "var/lib", "usr/local/bin"):
        (tree / sub).mkdir(parents=True, exist_ok=True)
    (tree / "tmp").chmod(0o1777)
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    (tree / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    shutil.copy2("/usr/bin/busybox", tree / "bin/busybox")
    applets = run(["/usr/bin/busybox", "--list"]).stdout.split()
    for applet in applets:
        link = tree / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")


def build_tools_rootfs(tree: Path) -> None:
    """A busybox-only root filesystem (helper containers that copy files: rke-tools' role)."""
    _skeleton(tree)


def build_base_rootfs(tree: Path) -> None:
    """Python 3.11 (stdlib minus tests/GUI), etcd, etcdctl and busybox, with their libraries."""
    _skeleton(tree)
    binaries = ["/usr/bin/python3.11", "/usr/bin/etcd", "/usr/bin/etcdctl"]
    for binary in binaries:
        _copy_parents(binary, tree)
    shutil.copytree("/usr/lib/python3.11", tree / "usr/lib/python3.11", symlinks=True,
                    ignore=shutil.ignore_patterns(*PY_SKIP))
    if Path("/etc/python3.11").is_dir():
        shutil.copytree("/etc/python3.11", tree / "etc/python3.11", symlinks=True)
    dynload = sorted(str(p) for p in Path("/usr/lib/python3.11/lib-dynload").glob("*.so"))
    for lib in sorted(_libraries(binaries + dynload)):
        _copy_parents(lib, tree)
    (tree / "usr/bin/python3").symlink_to("python3.11")
    # The upstream etcd image has etcd in /usr/local/bin: commands written for it work too.
    for tool in ("etcd", "etcdctl"):
        (tree / "usr/local/bin" / tool).symlink_to(f"/usr/bin/{tool}")
