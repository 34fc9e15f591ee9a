"""Registry and images of the testbed: nothing is pulled from outside, everything is built here.

The base image is a root filesystem assembled from the machine's own files (Debian's python3.11,
etcd, etcdctl, busybox and the libraries `ldd` names for them), turned into an image with
`tar -C ROOTFS -c . | docker import -` on one of the testbed's engines. The etcd image is that
base (real etcd). The others are the base plus files (`docker create` + `docker cp` + `docker
commit`, so they share its layer):

- `rancher/rke-tools:testbed`: /opt/rke-tools/entrypoint.sh (a VOLUME, as in the real image, which
  the components get through the `service-sidekick` container), /opt/rke-tools/rke-etcd-backup
  (the `etcd-rolling-snapshots` container's command) and the nginx-proxy stand-in;
- `rancher/hyperkube:<tag>` for every Kubernetes version rkel ships data for: the stand-in
  components under /opt/standins, each on PATH under its real name (kube-apiserver, kubelet, ...),
  with STANDIN_VERSION set from the tag. These are stand-ins (see scenarios/standins/README.md),
  named like the real images so that rkel's default image references work unchanged with the
  testbed registry as the default private registry.

Images are rebuilt when their sources change (a stamp of the stand-ins and this file is kept in
the state dir). Everything is pushed to the testbed registry (docker-registry, filesystem storage
under the state dir). A second registry
process serves the same storage on AUTH_REGISTRY and requires HTTP basic auth (user AUTH_USER,
a password generated once and kept 0600 in the state dir, never printed).
"""

from __future__ import annotations

import base64
import hashlib
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
ROOT = Path(__file__).resolve().parents[2]
STANDINS = ROOT / "scenarios" / "standins"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The stand-in components, by the name they have on PATH in the hyperkube image.
COMPONENTS = {
    "kube-apiserver": "kube_apiserver.py",
    "kube-controller-manager": "kube_controller_manager.py",
    "kube-scheduler": "kube_scheduler.py",
    "kubelet": "kubelet.py",
    "kube-proxy": "kube_proxy.py",
}


@dataclass(frozen=True)
class ImageSpec:
    """An image the testbed provides: repository, tag and which root filesystem it is."""

    repo: str
    tag: str
    kind: str  # "base" (python3.11 + etcd + etcdctl + busybox), "tools" or "hyperkube"

    @property
    def ref(self) -> str:
        return f"{REGISTRY}/{self.repo}:{self.tag}"

    @property
    def version(self) -> str:
        """The Kubernetes release a hyperkube tag names: v1.30.5-rancher1 -> v1.30.5."""
        return self.tag.split("-")[0]


def hyperkube_tags() -> list[str]:
    """The rancher/hyperkube tags of every Kubernetes version rkel ships data for."""
    sys.path.insert(0, str(ROOT))
    try:
        from lifecycle.versions import default_catalog
    finally:
        sys.path.remove(str(ROOT))
    catalog = default_catalog()
    images = (catalog.info(v).image("kubernetes") for v in catalog.supported())
    return sorted({i.rsplit(":", 1)[1] for i in images if i.startswith("rancher/hyperkube:")})


IMAGES = (
    ImageSpec("rkel-test/base", "py311", "base"),
    ImageSpec("rancher/mirrored-coreos-etcd", "v3.4.23-testbed", "base"),
    ImageSpec("rancher/rke-tools", "testbed", "tools"),
    *(ImageSpec("rancher/hyperkube", tag, "hyperkube") for tag in hyperkube_tags()),
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


def source_stamp() -> str:
    """A hash of everything the images are built from that lives in this repository."""
    digest = hashlib.sha256()
    files = [Path(__file__), *sorted(STANDINS.glob("*.py")), *sorted(STANDINS.glob("*.sh"))]
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(repr(IMAGES).encode())
    return digest.hexdigest()[:16]


def ensure_images(sd: StateDir, builder: Host) -> list[str]:
    """Build and push the missing (or outdated) images with `builder`'s engine; returns the
    refs pushed."""
    stamp_file = sd.root / "images.stamp"
    stamp = source_stamp()
    fresh = stamp_file.exists() and stamp_file.read_text().strip() == stamp
    missing = missing_images() if fresh else list(IMAGES)
    if not missing:
        return []
    docker = [DOCKER_CLI, "-H", f"unix://{sd.docker_sock(builder)}"]
    build = sd.root / "build"
    shutil.rmtree(build, ignore_errors=True)
    try:
        started = time.monotonic()
        build_base_rootfs(build / "base")
        base = "rkel-testbed-build/base:latest"
        docker_import(docker, build / "base", base)
        shutil.rmtree(build / "base")
        for img in missing:
            local = base
            if img.kind != "base":
                local = f"rkel-testbed-build/{img.kind}:{img.tag}"
                overlay = build / f"{img.kind}-{img.tag}"
                changes = (tools_overlay if img.kind == "tools" else hyperkube_overlay)(overlay, img)
                derive(docker, base, overlay, changes, local)
            run([*docker, "tag", local, img.ref])
            run([*docker, "push", img.ref], timeout=600)
        log(f"built and pushed {len(missing)} image(s) in {time.monotonic() - started:.1f}s")
    finally:
        shutil.rmtree(build, ignore_errors=True)
    stamp_file.write_text(stamp + "\n")
    return [img.ref for img in missing]


def derive(docker: list[str], base: str, overlay: Path, changes: list[str], name: str) -> None:
    """Image `name`: `base` plus the files under `overlay`, with Dockerfile-style `changes`."""
    cid = run([*docker, "create", base, "/bin/true"]).stdout.strip()
    try:
        run([*docker, "cp", f"{overlay}/.", f"{cid}:/"])
        flags = [arg for change in [f"ENV {PATH_ENV}", *changes] for arg in ("-c", change)]
        run([*docker, "commit", *flags, cid, name])
    finally:
        run([*docker, "rm", "-f", cid], check=False)


def _script(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def _standins(tree: Path, names: list[str]) -> None:
    dest = tree / "opt/standins"
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(STANDINS / name, dest / name)


def tools_overlay(tree: Path, _img: ImageSpec) -> list[str]:
    """rke-tools: the entrypoint and rke-etcd-backup stand-ins in the /opt/rke-tools volume,
    and nginx-proxy."""
    _script(tree / "opt/rke-tools/entrypoint.sh", (STANDINS / "rke_tools_entrypoint.sh").read_text())
    _script(tree / "opt/rke-tools/rke-etcd-backup",
            "#!/bin/sh\nexec /usr/bin/python3.11 /opt/standins/rke_etcd_backup.py \"$@\"\n")
    _standins(tree, [p.name for p in STANDINS.glob("*.py")])
    _script(tree / "usr/bin/nginx-proxy",
            "#!/bin/sh\nexec /usr/bin/python3.11 /opt/standins/nginx_proxy.py \"$@\"\n")
    return ['VOLUME ["/opt/rke-tools"]']


def hyperkube_overlay(tree: Path, img: ImageSpec) -> list[str]:
    """hyperkube: every component stand-in on PATH under its real name, at the tag's version."""
    _standins(tree, [p.name for p in STANDINS.glob("*.py")])
    for component, script in COMPONENTS.items():
        _script(tree / "usr/local/bin" / component,
                f"#!/bin/sh\nexec /usr/bin/python3.11 /opt/standins/{script} \"$@\"\n")
    return [f"ENV STANDIN_VERSION={img.version}"]


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


def build_base_rootfs(tree: Path) -> None:
    """Python 3.11 (stdlib minus tests/GUI), etcd, etcdctl, openssl and busybox, with their
    libraries."""
    _skeleton(tree)
    # openssl: the controller-manager and scheduler stand-ins self-sign their serving certs.
    binaries = ["/usr/bin/python3.11", "/usr/bin/etcd", "/usr/bin/etcdctl", "/usr/bin/openssl"]
    for binary in binaries:
        _copy_parents(binary, tree)
    (tree / "usr/lib/ssl").mkdir(parents=True, exist_ok=True)
    shutil.copy2("/etc/ssl/openssl.cnf", tree / "usr/lib/ssl/openssl.cnf")
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
