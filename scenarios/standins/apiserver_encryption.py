"""Encryption at rest for the kube-apiserver stand-in: `--encryption-provider-config`.

Reads an EncryptionConfiguration (apiserver.config.k8s.io/v1, JSON or the block YAML rkel and
RKE write) and transforms the stored bytes of the resources it names as the real server does:
a write goes through the first provider, a read through the provider whose prefix the stored
value carries. Providers: `aescbc` (AES-CBC with PKCS#7 padding and a random IV, stored as
`k8s:enc:aescbc:v1:<key name>:` + IV + ciphertext, exactly the real layout) and `identity`
(plain). Any other provider (aesgcm, secretbox, kms) is refused at start.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from typing import Any

from aes import AES, PaddingError, cbc_decrypt, cbc_encrypt
from kubeconfig_client import KubeconfigError, parse_yaml

__all__ = ["EncryptionConfig", "EncryptionError", "load_encryption_config"]

AESCBC_PREFIX = b"k8s:enc:aescbc:v1:"
KINDS = ("EncryptionConfiguration",)
API_VERSIONS = ("apiserver.config.k8s.io/v1", "apiserver.config.k8s.io/v1beta1")


class EncryptionError(Exception):
    """The configuration cannot be used (at start), or a stored value cannot be read."""


@dataclass(frozen=True)
class Provider:
    kind: str  # "aescbc" | "identity"
    keys: tuple[tuple[str, AES], ...] = ()  # (name, cipher), aescbc only

    def write(self, data: bytes) -> bytes:
        if self.kind == "identity":
            return data
        name, cipher = self.keys[0]  # the first key encrypts
        iv = os.urandom(16)
        return AESCBC_PREFIX + name.encode() + b":" + iv + cbc_encrypt(cipher, iv, data)


class Transformer:
    """The providers of one resource, in order."""

    def __init__(self, providers: tuple[Provider, ...]) -> None:
        self.providers = providers
        self._keys = {name: cipher for p in providers for name, cipher in p.keys}
        self._plain = any(p.kind == "identity" for p in providers)

    def write(self, data: bytes) -> bytes:
        return self.providers[0].write(data)

    def read(self, data: bytes) -> bytes:
        if data.startswith(AESCBC_PREFIX):
            name, sep, rest = data[len(AESCBC_PREFIX):].partition(b":")
            cipher = self._keys.get(name.decode(errors="replace"))
            if not sep or cipher is None:
                raise EncryptionError(f"no matching key was found for the provided AES "
                                      f"transformer (key {name.decode(errors='replace')!r})")
            if len(rest) < 32:
                raise EncryptionError("the stored data was shorter than the required block size")
            try:
                return cbc_decrypt(cipher, rest[:16], rest[16:])
            except PaddingError as exc:
                raise EncryptionError(f"invalid padding on input ({exc})") from None
        if data.startswith(b"k8s:enc:"):
            raise EncryptionError("no matching prefix found for the stored data")
        if not self._plain:
            raise EncryptionError("the stored data is not encrypted and identity is not a "
                                  "configured provider")
        return data


class EncryptionConfig:
    """Resource name (`secrets`, `deployments.apps`) -> its Transformer."""

    def __init__(self, resources: dict[str, Transformer]) -> None:
        self.resources = resources

    def for_resource(self, resource: str) -> Transformer | None:
        if resource in self.resources:
            return self.resources[resource]
        group = resource.partition(".")[2]
        return self.resources.get(f"*.{group}") or self.resources.get("*.*")

    def key_names(self) -> list[str]:
        return sorted({n for t in self.resources.values() for n in t._keys})


def _parse(text: str, path: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return parse_yaml(text)
    except KubeconfigError as exc:
        raise EncryptionError(f"error while parsing file {path}: {exc}") from None


def _provider(entry: Any, path: str) -> Provider:
    if not isinstance(entry, dict) or len(entry) != 1:
        raise EncryptionError(f"{path}: each provider must name exactly one kind")
    (kind, body), = entry.items()
    if kind == "identity":
        return Provider("identity")
    if kind != "aescbc":
        raise EncryptionError(f"{path}: provider {kind!r} is not supported by the stand-in "
                              "(it knows aescbc and identity)")
    keys = []
    for key in (body or {}).get("keys") or []:
        name, secret = str(key.get("name") or ""), str(key.get("secret") or "")
        if not name:
            raise EncryptionError(f"{path}: an aescbc key has no name")
        try:
            raw = base64.b64decode(secret, validate=True)
        except (binascii.Error, ValueError):
            raise EncryptionError(f"{path}: key {name!r}: secret is not valid base64") from None
        if len(raw) not in (16, 24, 32):
            raise EncryptionError(f"{path}: key {name!r}: aescbc keys are 16, 24 or 32 bytes, "
                                  f"not {len(raw)}")
        keys.append((name, AES(raw)))
    if not keys:
        raise EncryptionError(f"{path}: aescbc provider has no keys")
    return Provider("aescbc", tuple(keys))


def load_encryption_config(path: str) -> EncryptionConfig:
    """Parse the file at `path`; EncryptionError naming what is wrong."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise EncryptionError(f"error reading encryption provider configuration file "
                              f"{path}: {(exc.strerror or str(exc)).lower()}") from None
    doc = _parse(text, path)
    if not isinstance(doc, dict) or doc.get("kind") not in KINDS:
        raise EncryptionError(f"{path}: not an EncryptionConfiguration")
    if doc.get("apiVersion") not in API_VERSIONS:
        raise EncryptionError(f"{path}: apiVersion {doc.get('apiVersion')!r} is not one of "
                              f"{', '.join(API_VERSIONS)}")
    resources: dict[str, Transformer] = {}
    for item in doc.get("resources") or []:
        names = [str(r) for r in (item or {}).get("resources") or []]
        providers = tuple(_provider(p, path) for p in (item or {}).get("providers") or [])
        if not names or not providers:
            raise EncryptionError(f"{path}: each resources entry needs resources and providers")
        for name in names:
            resources.setdefault(name, Transformer(providers))
    return EncryptionConfig(resources)
