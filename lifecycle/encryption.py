"""Secrets encryption at rest: the EncryptionConfiguration controlplane nodes receive.

`services.kube-api.secrets_encryption_config: {enabled: true}` (RKE's behaviour): rkel generates
an AES-CBC key, writes `/etc/kubernetes/ssl/encryption.yaml` (aescbc with the cluster's keys,
then identity, for `secrets`) on every controlplane node, root-owned 0600 like the other files
there, and starts kube-apiserver with `--encryption-provider-config` pointing at it.
`custom_config:` gives the whole EncryptionConfiguration instead.

Keys never appear in a plan, a journal row, a spec or a log: the desired state names keys only
(`Encryption.providers`) and carries a hash of the file; the key material lives in the store's
keyring, sealed with the state key (Fernet, as the certificates' private keys), and the file is
rendered from it at the moment it is delivered. Pure: no store access here beyond the values
passed in.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from lifecycle.errors import PlanError, StateError
from lifecycle.spec import canonical_json, sha256_hex

ENCRYPTION_FILE = "/etc/kubernetes/ssl/encryption.yaml"
ENCRYPTION_FLAG = "encryption-provider-config"
CERT_NAME = "encryption"  # how the file counts among the node's certificates (labels, hash)
KEYRING = "secrets_encryption_keyring"  # store meta: the sealed keyring
ACTIVE = "secrets_encryption_keys"  # store meta: names of the keys in use, first encrypts
APPLIED = "secrets_encryption_applied"  # store meta: hash of the config Secrets are rewritten to
KEY_BYTES = 32  # AES-256, as RKE generates
_KEY_NAME = re.compile(r"^key-(\d+)$")


@dataclass(frozen=True)
class Encryption:
    """What the desired state says about encryption: no secret, only names and a hash.

    `providers`: ("aescbc:<key name>", ..., "identity") for generated keys, ("custom",) for a
    custom_config; `hash`: identifies the file's content (a new key or a changed custom
    config changes it, and with it the apiservers' certificate label)."""

    providers: tuple[str, ...]
    hash: str

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(p.split(":", 1)[1] for p in self.providers if p.startswith("aescbc:"))

    @property
    def custom(self) -> bool:
        return self.providers == ("custom",)

    def to_detail(self) -> dict[str, Any]:
        return {"providers": list(self.providers), "hash": self.hash}

    @classmethod
    def from_detail(cls, data: Mapping[str, Any]) -> Encryption:
        return cls(tuple(str(p) for p in data.get("providers", ())), str(data.get("hash", "")))


def enabled(config_value: Mapping[str, Any] | None) -> bool:
    return bool(config_value and config_value.get("enabled"))


def custom_config(config_value: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The user's EncryptionConfiguration, as plain data; PlanError when it is not one."""
    custom = (config_value or {}).get("custom_config")
    if custom is None:
        return None
    data = json.loads(json.dumps(custom, default=str))
    if not isinstance(data, dict) or data.get("kind") != "EncryptionConfiguration" or not (
            isinstance(data.get("resources"), list) and data["resources"]):
        raise PlanError(
            "services.kube-api.secrets_encryption_config.custom_config must be an "
            "EncryptionConfiguration (apiVersion: apiserver.config.k8s.io/v1, kind: "
            "EncryptionConfiguration, resources: [...]); fix it or remove custom_config to "
            "let rkel generate the key")
    return data


def first_key() -> str:
    return "key-1"


def next_key(names: list[str] | tuple[str, ...]) -> str:
    """A key name never used before: key-<highest number so far + 1>."""
    numbers = [int(m.group(1)) for n in names if (m := _KEY_NAME.match(n))]
    return f"key-{max(numbers, default=0) + 1}"


def desired(config_value: Mapping[str, Any] | None,
            keys: tuple[str, ...] | None = None) -> Encryption | None:
    """What `secrets_encryption_config` asks for, with generated keys named `keys` (first
    one encrypts; default: the first key a cluster gets). None when encryption is off."""
    if not enabled(config_value):
        return None
    custom = custom_config(config_value)
    if custom is not None:
        return Encryption(("custom",), sha256_hex("custom:" + canonical_json(custom))[:16])
    names = tuple(keys) if keys else (first_key(),)
    providers = tuple(f"aescbc:{n}" for n in names) + ("identity",)
    return Encryption(providers, sha256_hex("generated:" + ",".join(providers))[:16])


# ---------------------------------------------------------------------------- the keyring
@dataclass
class Keyring:
    """Key material, as kept sealed in the store: generated keys by name, custom configs by
    hash. (Which keys are in use is not secret: store meta `ACTIVE`.)"""

    keys: dict[str, str] = field(default_factory=dict)  # name -> base64 of 32 random bytes
    custom: dict[str, str] = field(default_factory=dict)  # Encryption.hash -> JSON text

    def seal(self, state_key: bytes) -> str:
        data = {"keys": self.keys, "custom": self.custom}
        return Fernet(state_key).encrypt(canonical_json(data).encode()).decode()

    @classmethod
    def unseal(cls, sealed: str | None, state_key: bytes) -> Keyring:
        if not sealed:
            return cls()
        try:
            data = json.loads(Fernet(state_key).decrypt(str(sealed).encode()))
        except (InvalidToken, ValueError, TypeError) as exc:
            raise StateError("the secrets encryption keys in the state cannot be decrypted "
                             "with this state key (a different key, or the record was "
                             "changed); restore the state key from a backup") from exc
        return cls(dict(data.get("keys", {})), dict(data.get("custom", {})))

    def generate(self, name: str) -> bool:
        """Make key `name` unless it exists (a key is generated once); True if made now."""
        if name in self.keys:
            return False
        self.keys[name] = base64.b64encode(os.urandom(KEY_BYTES)).decode()
        return True


def render(enc: Encryption, keyring: Keyring) -> bytes:
    """The EncryptionConfiguration file for `enc`, from the key material in `keyring`.

    :raises StateError: a key or the custom config is not in the keyring (the run that
        planned it never stored it: apply again).
    """
    if enc.custom:
        text = keyring.custom.get(enc.hash)
        if text is None:
            raise StateError("the custom secrets encryption config this run delivers is not in "
                             "the state; run `rkel apply` again")
        return (json.dumps(json.loads(text), indent=2) + "\n").encode()
    lines = ["apiVersion: apiserver.config.k8s.io/v1", "kind: EncryptionConfiguration",
             "resources:", "- resources:", "  - secrets", "  providers:"]
    keys = enc.keys
    if keys:
        lines += ["  - aescbc:", "      keys:"]
        for name in keys:
            secret = keyring.keys.get(name)
            if secret is None:
                raise StateError(f"secrets encryption key {name} is not in the state; run "
                                 "`rkel apply` again to generate it")
            lines += [f"      - name: {name}", f"        secret: {secret}"]
    if "identity" in enc.providers:
        lines.append("  - identity: {}")
    return ("\n".join(lines) + "\n").encode()
