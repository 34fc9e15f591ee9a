#!/usr/bin/python3.11
"""The testbed hosts' OCI runtime: runc, minus the capabilities this machine does not have.

Docker gives a privileged container (the kubelet, kube-proxy) every capability it knows. On a
machine whose own bounding set lacks one (a sandboxed VM without CAP_SYS_RESOURCE, say), runc
then fails with "unable to apply caps: operation not permitted". Before `runc create`/`run`, this
shim removes from the bundle's config.json the capabilities outside its own bounding set, then
execs runc with the same arguments. Nothing else changes; on a machine with every capability it
changes nothing at all. Testbed only: dockerd uses it through `default-runtime` in daemon.json.
"""

import json
import os
import sys

RUNC = "/usr/sbin/runc"
# Linux capability numbers, as named in OCI runtime configs.
NAMES = [
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
]


def bounding_set() -> set[str]:
    with open("/proc/self/status") as fh:
        mask = next(int(line.split()[1], 16) for line in fh if line.startswith("CapBnd:"))
    return {f"CAP_{name}" for bit, name in enumerate(NAMES) if mask >> bit & 1}


def bundle_of(args: list[str]) -> str | None:
    """The --bundle of a `create` or `run` command (default: the current directory)."""
    if not any(a in ("create", "run") for a in args):
        return None
    for i, arg in enumerate(args):
        if arg in ("--bundle", "-b") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--bundle="):
            return arg.split("=", 1)[1]
    return "."


def drop_missing(bundle: str) -> None:
    path = os.path.join(bundle, "config.json")
    with open(path) as fh:
        config = json.load(fh)
    caps = (config.get("process") or {}).get("capabilities") or {}
    have = bounding_set()
    changed = False
    for kind, names in caps.items():
        kept = [n for n in names if n in have]
        if len(kept) != len(names):
            caps[kind] = kept
            changed = True
    if changed:
        with open(path + ".shim", "w") as fh:
            json.dump(config, fh)
        os.replace(path + ".shim", path)


def main() -> None:
    args = sys.argv[1:]
    bundle = bundle_of(args)
    if bundle is not None:
        drop_missing(bundle)
    os.execv(RUNC, [RUNC, *args])


if __name__ == "__main__":
    main()
