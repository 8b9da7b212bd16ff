"""A party's durable identity: its Ed25519 key and audit-record counter, on its own disk.

The key signs the party's audit records and its secure-aggregation messages; it is
registered with the audit log (a KEY_REGISTRATION record) and with the coordinator.
The counter is persisted before each use, so a restart never reuses one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.audit.signing import Signer


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
    signer: Signer
    key: Ed25519PrivateKey
    created: bool  # the key was made now and must be registered

    @property
    def public_key(self) -> bytes:
        return self.signer.public_key


def load_or_create_identity(party: str, directory: Path) -> Identity:
    """The party's identity from `directory`, created there on first use."""
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / "identity.key"
    counter_path = directory / "audit.counter"
    created = not key_path.exists()
    if created:
        _write_atomic(key_path, Signer.generate(party).seed())
    key = Ed25519PrivateKey.from_private_bytes(key_path.read_bytes())
    counter = int(counter_path.read_text()) if counter_path.exists() else 0
    signer = Signer(
        party,
        key,
        counter=counter,
        on_counter=lambda value: _write_atomic(counter_path, str(value).encode()),
    )
    return Identity(signer=signer, key=key, created=created)
