"""Signed tree heads as C2SP checkpoints (tlog-checkpoint) in the signed-note format.

A checkpoint is the note body ``<origin>\\n<size>\\n<base64 root>\\n`` followed by a
blank line and one signature line ``— <key name> <base64(key hash || sig)>\\n``.
The key hash is the first 4 bytes of SHA-256(name || 0x0A || 0x01 || public key),
the Ed25519 signature covers the body. A verifier key is written
``<name>+<hex key hash>+<base64(0x01 || public key)>`` (C2SP signed-note).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import CheckpointError, ConfigError

#: The file the audit log service writes its verifier key to, next to its database.
VERIFIER_KEY_FILE = "log.vkey"

_ED25519 = b"\x01"
_DASH = "\u2014"
_NAME_RE = re.compile(r"[^\s+]{1,128}")
_ORIGIN_RE = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,254}")


@dataclass(frozen=True, kw_only=True)
class TreeHead:
    """The log's state at one size: origin line, tree size and root hash."""

    origin: str
    size: int
    root_hash: bytes

    def body(self) -> bytes:
        """The note body that the log signs."""
        root = base64.b64encode(self.root_hash).decode()
        return f"{self.origin}\n{self.size}\n{root}\n".encode()


@dataclass(frozen=True, kw_only=True)
class SignedTreeHead:
    """A tree head with its checkpoint (the signed note)."""

    size: int
    root_hash: bytes
    checkpoint: bytes


def _key_hash(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + _ED25519 + public_key).digest()[:4]


def verifier_key_for(name: str, public_key: bytes) -> str:
    """The C2SP verifier key string of the log key `name` with this Ed25519 public key:
    what a party derives from the manifest's audit-log party (its id and audit key)."""
    if _NAME_RE.fullmatch(name) is None:
        raise ConfigError(f"log key name: got {name!r}, want 1..128 chars, no space or '+'")
    if len(public_key) != 32:
        raise ConfigError(f"log public key: got {len(public_key)} bytes, want 32")
    key = base64.b64encode(_ED25519 + public_key).decode()
    return f"{name}+{_key_hash(name, public_key).hex()}+{key}"


class LogSigner:
    """The log operator's Ed25519 key; signs checkpoints for one origin."""

    def __init__(self, *, name: str, origin: str, private_key: Ed25519PrivateKey) -> None:
        if _NAME_RE.fullmatch(name) is None:
            raise ConfigError(f"LogSigner.name: got {name!r}, want 1..128 chars, no space or '+'")
        if _ORIGIN_RE.fullmatch(origin) is None:
            raise ConfigError(f"LogSigner.origin: got {origin!r}, want printable ASCII")
        self.name = name
        self.origin = origin
        self._key = private_key
        self.public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def from_seed(cls, *, name: str, origin: str, seed: bytes) -> LogSigner:
        if len(seed) != 32:
            raise ConfigError(f"log key seed: got {len(seed)} bytes, want 32")
        return cls(name=name, origin=origin, private_key=Ed25519PrivateKey.from_private_bytes(seed))

    def verifier_key(self) -> str:
        """The C2SP verifier key string parties use to check this log's checkpoints."""
        return verifier_key_for(self.name, self.public_key)

    def sign(self, size: int, root_hash: bytes) -> SignedTreeHead:
        body = TreeHead(origin=self.origin, size=size, root_hash=root_hash).body()
        sig = base64.b64encode(_key_hash(self.name, self.public_key) + self._key.sign(body))
        note = body + f"\n{_DASH} {self.name} ".encode() + sig + b"\n"
        return SignedTreeHead(size=size, root_hash=root_hash, checkpoint=note)


class NoteVerifier:
    """Verifies checkpoints against one verifier key (and optionally one origin)."""

    def __init__(self, verifier_key: str, *, origin: str | None = None) -> None:
        parts = verifier_key.strip().split("+", 2)
        if len(parts) != 3:
            raise ConfigError(f"verifier key: got {verifier_key!r}, want name+hash+base64key")
        name, hash_hex, key_b64 = parts
        try:
            raw = base64.b64decode(key_b64, validate=True)
            key_hash = bytes.fromhex(hash_hex)
        except (binascii.Error, ValueError):
            raise ConfigError(
                f"verifier key: got {verifier_key!r}, want hex hash, base64 key"
            ) from None
        if len(raw) != 33 or raw[:1] != _ED25519 or key_hash != _key_hash(name, raw[1:]):
            raise ConfigError(f"verifier key: got {verifier_key!r}, want an Ed25519 note key")
        self.name = name
        self.origin = origin
        self.public_key = raw[1:]
        self._key_hash = key_hash
        self._key = Ed25519PublicKey.from_public_bytes(self.public_key)

    def verify(self, checkpoint: bytes) -> TreeHead:
        """Parses and verifies a checkpoint. Raises CheckpointError."""
        try:
            text = checkpoint.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(
                "checkpoint encoding", expected="UTF-8", found="other bytes"
            ) from None
        body, sep, sigs = text.partition("\n\n")
        if not sep or not sigs.endswith("\n"):
            raise CheckpointError(
                "checkpoint", expected="body, blank line, signatures", found=text[:80]
            )
        head = _parse_body(body + "\n")
        if self.origin is not None and head.origin != self.origin:
            raise CheckpointError("checkpoint origin", expected=self.origin, found=head.origin)
        for line in sigs[:-1].split("\n"):
            match = re.fullmatch(f"{_DASH} (\\S+) ([A-Za-z0-9+/=]+)", line)
            if match is None:
                raise CheckpointError("signature line", expected="— name base64", found=line[:80])
            try:
                blob = base64.b64decode(match.group(2), validate=True)
            except binascii.Error:
                raise CheckpointError(
                    "signature base64", expected="base64", found=line[:80]
                ) from None
            if match.group(1) != self.name or blob[:4] != self._key_hash:
                continue
            try:
                self._key.verify(blob[4:], (body + "\n").encode())
            except InvalidSignature:
                raise CheckpointError(
                    "checkpoint signature", expected=f"valid under {self.name}", found="invalid"
                ) from None
            return head
        raise CheckpointError("checkpoint signature", expected=f"one by {self.name}", found="none")


def _parse_body(body: str) -> TreeHead:
    lines = body.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise CheckpointError(
            "checkpoint body", expected="origin, size, root lines", found=body[:80]
        )
    origin, size_text, root_text = lines[0], lines[1], lines[2]
    if _ORIGIN_RE.fullmatch(origin) is None:
        raise CheckpointError("checkpoint origin", expected="printable ASCII", found=origin[:80])
    if re.fullmatch(r"0|[1-9][0-9]{0,19}", size_text) is None:
        raise CheckpointError(
            "checkpoint size", expected="decimal, no leading zero", found=size_text
        )
    try:
        root = base64.b64decode(root_text, validate=True)
    except binascii.Error:
        root = b""
    if len(root) != 32 or base64.b64encode(root).decode() != root_text:
        raise CheckpointError(
            "checkpoint root", expected="base64 of 32 bytes", found=root_text[:60]
        )
    return TreeHead(origin=origin, size=int(size_text), root_hash=root)


def load_verifier(key: str) -> NoteVerifier:
    """The log's note verifier from a key file's path or the key text itself."""
    path = Path(key)
    text = path.read_text().strip() if path.is_file() else key.strip()
    return NoteVerifier(text)
