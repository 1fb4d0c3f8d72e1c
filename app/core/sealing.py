"""Sealed secrets: a job's secret variables as they travel and rest, never in plain.

A launch's payload passes through Redis, whose append-only file keeps every value written
to it. Secrets in it are therefore sealed (AES-256-GCM, authenticated): the key is derived
with HKDF-SHA256 from GPUQ_SECRET under a purpose label of its own, so it is never the key
that signs payloads. Without GPUQ_SECRET, a stack used in process (the local transport)
seals with a key generated once and kept 0600 in GPUQ_HOME, which only the stack's owner
reads; a remote client without GPUQ_SECRET has no key to seal with and is refused.

Only the process that starts the job unseals: the GPU worker, or a batch adapter handing
the values to its backend's own secret store.
"""

from __future__ import annotations

import json
import secrets as random
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from app.core.errors import PayloadError, PayloadNotAuthentic
from app.core.paths import kept_secret

MAGIC = b"GPS1"
PURPOSE = b"gpuq secrets v1"  # HKDF info: this key seals job secrets and nothing else
NONCE_BYTES = 12
LOCAL_KEY_FILE = "seal.key"


def _key(material: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=PURPOSE).derive(material.encode())


def seal(values: dict[str, str], material: str) -> bytes:
    """The values, encrypted and authenticated under the key `material` derives."""
    nonce = random.token_bytes(NONCE_BYTES)
    plain = json.dumps(values, sort_keys=True).encode()
    return MAGIC + nonce + AESGCM(_key(material)).encrypt(nonce, plain, MAGIC)


def unseal(blob: bytes, material: str) -> dict[str, str]:
    """The values `seal` sealed; PayloadNotAuthentic when the key differs or the bytes
    were changed."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + NONCE_BYTES:
        raise PayloadNotAuthentic("sealed secrets are not in gpuq's format")
    nonce = blob[len(MAGIC):len(MAGIC) + NONCE_BYTES]
    try:
        plain = AESGCM(_key(material)).decrypt(nonce, blob[len(MAGIC) + NONCE_BYTES:], MAGIC)
    except InvalidTag:
        raise PayloadNotAuthentic(
            "the job's secrets do not unseal here: submit with the same GPUQ_SECRET as the "
            "workers (without one, submit on the stack's own host)") from None
    values: dict[str, str] = json.loads(plain)
    return values


def local_key(home: Path, *, create: bool) -> str | None:
    """The stack's own sealing key (GPUQ_HOME/seal.key, 0600), made on first use when
    `create`; None when there is none and none is to be made."""
    path = home / LOCAL_KEY_FILE
    if not create and not path.exists():
        return None
    home.mkdir(parents=True, exist_ok=True)
    return kept_secret(path)


def key_material(secret: str | None, home: Path, *, create: bool = False) -> str:
    """What seals and unseals secrets here: GPUQ_SECRET, else the stack's own key."""
    if secret:
        return secret
    found = local_key(home, create=create)
    if found is None:
        raise PayloadError(f"no key to unseal the job's secrets: set GPUQ_SECRET (the same on "
                        f"every client and worker), or keep {home / LOCAL_KEY_FILE} here")
    return found


def payload_secrets(payload: dict[str, Any], secret: str | None, home: Path) -> dict[str, str]:
    """The secrets a launch's payload holds, unsealed; PayloadError when they do not
    unseal here."""
    sealed = payload.get("sealed_secrets")
    if sealed is None:
        plain: dict[str, str] = payload.get("secrets") or {}  # a payload from before sealing
        return plain
    return unseal(sealed, key_material(secret, home))


def without_secrets(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload less its secrets: what a batch node is given beside them."""
    return {k: v for k, v in payload.items() if k not in ("secrets", "sealed_secrets")}
