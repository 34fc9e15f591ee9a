"""Kubeconfig files as text: one cluster, one user, one context, like RKE's templates.

Two shapes: `file_kubeconfig` points at certificate files on a node (the components'
kubecfg-*.yaml), `inline_kubeconfig` embeds them as base64 data (the admin's
kube_config_cluster.yml). Pure functions; every string value is written as a YAML double-quoted
scalar, so no name, URL or path can break the document. No YAML library needed.
"""

from __future__ import annotations

import base64

DEFAULT_CLUSTER = "local"  # the cluster/context name RKE writes into node kubeconfigs


def quote(value: str) -> str:
    """A YAML double-quoted scalar for `value`; non-printable characters are escaped."""
    out = []
    for ch in value:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch.isprintable() and ch not in "\u2028\u2029\ufeff":
            out.append(ch)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def b64(data: bytes) -> str:
    """Standard base64 on one line, as kubeconfig's *-data fields want it."""
    return base64.b64encode(data).decode("ascii")


def render_kubeconfig(
    cluster_name: str,
    server: str,
    user: str,
    cluster_fields: list[tuple[str, str]],
    user_fields: list[tuple[str, str]],
) -> str:
    """The document: `cluster_fields` go under the cluster (besides server), `user_fields`
    under the user. Context and current-context are named after the cluster."""
    cluster = quote(cluster_name)
    lines = [
        "apiVersion: v1",
        "kind: Config",
        "clusters:",
        "- cluster:",
        *(f"    {key}: {quote(value)}" for key, value in cluster_fields),
        f"    server: {quote(server)}",
        f"  name: {cluster}",
        "contexts:",
        "- context:",
        f"    cluster: {cluster}",
        f"    user: {quote(user)}",
        f"  name: {cluster}",
        f"current-context: {cluster}",
        "users:",
        f"- name: {quote(user)}",
        "  user:",
        *(f"    {key}: {quote(value)}" for key, value in user_fields),
    ]
    return "\n".join(lines) + "\n"


def file_kubeconfig(
    server: str,
    user: str,
    *,
    ca_path: str,
    cert_path: str,
    key_path: str,
    cluster_name: str = DEFAULT_CLUSTER,
) -> str:
    """A kubeconfig that references certificate files (paths as seen by the component)."""
    return render_kubeconfig(
        cluster_name,
        server,
        user,
        [("certificate-authority", ca_path)],
        [("client-certificate", cert_path), ("client-key", key_path)],
    )


def inline_kubeconfig(
    server: str,
    user: str,
    *,
    ca_pem: bytes,
    cert_pem: bytes,
    key_pem: bytes,
    cluster_name: str = DEFAULT_CLUSTER,
) -> str:
    """A self-contained kubeconfig with the CA, client cert and key embedded as base64.

    The result holds a private key: write it with mode 0600 and never log it.
    """
    return render_kubeconfig(
        cluster_name,
        server,
        user,
        [("certificate-authority-data", b64(ca_pem))],
        [("client-certificate-data", b64(cert_pem)), ("client-key-data", b64(key_pem))],
    )
