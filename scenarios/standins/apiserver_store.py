"""Objects in etcd for the kube-apiserver stand-in: the real apiserver's key layout and rules.

Objects are JSON values under `<--etcd-prefix>/<resource>/<namespace>/<name>` (cluster-scoped:
`<prefix>/<resource>/<name>`), e.g. `/registry/nodes/n1`, `/registry/pods/default/web-0`;
custom resources under `<prefix>/<group>/<plural>/...` as the real server keeps them. A
`metadata.resourceVersion` is never stored: it is the key's etcd mod_revision, filled in on
every read, and writes are etcd transactions conditioned on it (optimistic concurrency, as the
real server's GuaranteedUpdate). etcd failures become the real server's errors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from apiserver_encryption import EncryptionConfig, EncryptionError
from apiserver_kinds import Resource
from apiserver_objects import ApiError
from etcd3 import KV, Etcd3, EtcdError, EtcdUnavailable

__all__ = ["Storage"]

LOG = logging.getLogger("kube-apiserver-standin.storage")
Obj = dict[str, Any]


def qualified(res: Resource) -> str:
    """`nodes`, `deployments.apps`: how error messages name a resource."""
    return f"{res.name}.{res.group}" if res.group else res.name


def not_found(res: Resource, name: str) -> ApiError:
    return ApiError(404, f'{qualified(res)} "{name}" not found',
                    details={"name": name, "group": res.group, "kind": res.name})


def conflict(res: Resource, name: str) -> ApiError:
    return ApiError(409, f'Operation cannot be fulfilled on {qualified(res)} "{name}": the '
                    "object has been modified; please apply your changes to the latest "
                    "version and try again", "Conflict",
                    {"name": name, "group": res.group, "kind": res.name})


def _decode(kv: KV) -> Obj:
    obj: Obj = json.loads(kv.value)
    obj.setdefault("metadata", {})["resourceVersion"] = str(kv.mod_revision)
    return obj


def _encode(obj: Obj) -> bytes:
    meta = {k: v for k, v in (obj.get("metadata") or {}).items()
            if k not in ("resourceVersion", "selfLink")}
    return json.dumps({**obj, "metadata": meta}, separators=(",", ":")).encode()


class Storage:
    """Read and write API objects in etcd."""

    def __init__(self, etcd: Etcd3, prefix: str,
                 encryption: EncryptionConfig | None = None) -> None:
        """`encryption`: what `--encryption-provider-config` gives (None: everything plain)."""
        self.etcd = etcd
        self.prefix = prefix.rstrip("/")
        self.encryption = encryption

    def _decode(self, res: Resource, kv: KV) -> Obj:
        transformer = self.encryption.for_resource(qualified(res)) if self.encryption else None
        if transformer is not None:
            try:
                kv = KV(kv.key, transformer.read(kv.value), kv.create_revision, kv.mod_revision)
            except EncryptionError as exc:
                LOG.error("read %s: %s", kv.key, exc)
                raise ApiError(500, f"Internal error occurred: unable to transform key "
                               f'"{kv.key}": {exc}', "InternalError") from None
        return _decode(kv)

    def _encode(self, res: Resource, obj: Obj) -> bytes:
        data = _encode(obj)
        transformer = self.encryption.for_resource(qualified(res)) if self.encryption else None
        return transformer.write(data) if transformer is not None else data

    def key(self, res: Resource, namespace: str, name: str) -> str:
        base = f"{self.prefix}/{res.storage_path}"
        return f"{base}/{namespace}/{name}" if res.namespaced else f"{base}/{name}"

    def collection(self, res: Resource, namespace: str) -> str:
        base = f"{self.prefix}/{res.storage_path}/"
        return f"{base}{namespace}/" if res.namespaced and namespace else base

    def _call(self, op: str, res: Resource, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except EtcdUnavailable as exc:
            LOG.error("%s %s: etcd unavailable: %s", op, qualified(res), exc)
            raise ApiError(500, f"The {op} operation against {qualified(res)} could not be "
                           "completed at this time, please try again.", "ServerTimeout",
                           {"name": "", "kind": res.name, "retryAfterSeconds": 2}) from None
        except EtcdError as exc:
            if "compacted" in str(exc):
                raise ApiError(410, "The provided continue parameter is too old to display a "
                               "consistent list result.", "Expired") from None
            raise ApiError(500, f"Internal error occurred: {exc}", "InternalError") from None

    # --- reads ---------------------------------------------------------------------------------

    def get(self, res: Resource, namespace: str, name: str) -> Obj | None:
        kv = self._call("get", res, self.etcd.get, self.key(res, namespace, name))
        return self._decode(res, kv) if kv is not None else None

    def must_get(self, res: Resource, namespace: str, name: str) -> Obj:
        obj = self.get(res, namespace, name)
        if obj is None:
            raise not_found(res, name)
        return obj

    def list(self, res: Resource, namespace: str, revision: int = 0,
             start: str = "") -> tuple[list[tuple[str, Obj]], int]:
        """(key, object) pairs of a collection in key order, and the revision read at."""
        kvs, rev = self._call("list", res, self.etcd.range_prefix,
                              self.collection(res, namespace), revision, start)
        return [(kv.key, self._decode(res, kv)) for kv in kvs], rev

    # --- writes --------------------------------------------------------------------------------

    def create(self, res: Resource, obj: Obj) -> Obj:
        meta = obj["metadata"]
        key = self.key(res, meta.get("namespace", ""), meta["name"])
        rev = self._call("create", res, self.etcd.create, key, self._encode(res, obj))
        if rev is None:
            raise ApiError(409, f'{qualified(res)} "{meta["name"]}" already exists',
                           "AlreadyExists", {"name": meta["name"], "group": res.group,
                                             "kind": res.name})
        meta["resourceVersion"] = str(rev)
        return obj

    def replace(self, res: Resource, obj: Obj, mod_revision: int) -> Obj:
        """Write `obj` over the stored version that is at `mod_revision`, else Conflict."""
        meta = obj["metadata"]
        key = self.key(res, meta.get("namespace", ""), meta["name"])
        rev = self._call("update", res, self.etcd.update, key, self._encode(res, obj), mod_revision)
        if rev is None:
            raise conflict(res, meta["name"])
        meta["resourceVersion"] = str(rev)
        return obj

    def guaranteed_update(
        self, res: Resource, namespace: str, name: str, change: Callable[[Obj], Obj | None]
    ) -> tuple[Obj, Obj | None]:
        """Read, `change` (returning the new object, or None to delete it), write; retry on
        a concurrent write, like the real server's GuaranteedUpdate. Returns (old, new)."""
        for _ in range(8):
            current = self.must_get(res, namespace, name)
            revision = int(current["metadata"]["resourceVersion"])
            new = change(json.loads(json.dumps(current)))
            try:
                if new is None:
                    self.delete(res, namespace, name, revision)
                    return current, None
                return current, self.replace(res, new, revision)
            except ApiError as exc:
                if exc.reason != "Conflict":
                    raise
        raise conflict(res, name)

    def delete(self, res: Resource, namespace: str, name: str, mod_revision: int = 0) -> int:
        key = self.key(res, namespace, name)
        rev = self._call("delete", res, self.etcd.delete, key, mod_revision)
        if rev is None:
            if mod_revision and self.get(res, namespace, name) is not None:
                raise conflict(res, name)
            raise not_found(res, name)
        return int(rev)

    def delete_collection(self, res: Resource, namespace: str) -> int:
        return int(self._call("delete", res, self.etcd.delete_prefix,
                              self.collection(res, namespace)))
