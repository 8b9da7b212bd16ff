"""A party's durable identity: its Ed25519 keys and audit-record counter, on its own disk.

With a kit (mTLS), the kit's audit key signs the party's audit records and its identity
key signs its registration and secure-aggregation messages, both the keys the manifest
names. Without one (insecure), one key made on first use in the data directory does both,
registered with the audit log (a KEY_REGISTRATION record) and the coordinator first come,
first served. The counter is persisted before each use, so a restart never reuses one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.audit.signing import Signer
from echelon.trust.kit import Kit


def _write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


@dataclass(frozen=True)
class Identity:
    signer: Signer  # signs audit records
    key: Ed25519PrivateKey  # the identity key: registration and secure-aggregation messages
    created: bool  # the key was made now and must be registered

    @property
    def public_key(self) -> bytes:
        """The audit signing key's public half (its KEY_REGISTRATION)."""
        return self.signer.public_key

    @property
    def identity_public(self) -> bytes:
        """The identity key's public half (the agent's Hello)."""
        return self.key.public_key().public_bytes_raw()


def load_or_create_identity(party: str, directory: Path, kit: Kit | None = None) -> Identity:
    """The party's identity: the kit's keys when given, else the key in `directory`,
    created there on first use; the audit counter always lives in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    counter_path = directory / "audit.counter"
    if kit is not None:
        created = not counter_path.exists()
        audit_key, key = kit.audit_key, kit.identity_key
    else:
        key_path = directory / "identity.key"
        created = not key_path.exists()
        if created:
            _write_atomic(key_path, Signer.generate(party).seed())
        key = audit_key = Ed25519PrivateKey.from_private_bytes(key_path.read_bytes())
    counter = int(counter_path.read_text()) if counter_path.exists() else 0
    signer = Signer(
        party,
        audit_key,
        counter=counter,
        on_counter=lambda value: _write_atomic(counter_path, str(value).encode()),
    )
    return Identity(signer=signer, key=key, created=created)
