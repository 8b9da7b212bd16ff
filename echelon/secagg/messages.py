"""Wire messages of the secure-aggregation protocol and their fixed byte layouts.

Every message is a frozen dataclass of ints and bytes. ``to_bytes`` gives a
fixed, documented big-endian layout (so a payload can be audited by digest and
carried in a protobuf ``bytes`` field); ``from_bytes`` parses it back and raises
``MalformedMessage`` on any deviation. Each layout starts with the 6-byte header
``b"ESAG" || version (u8, = 2) || message type (u8)``, which also
domain-separates everything that is signed or authenticated. Every signature also covers
the window's 32-byte session context (``session_context``: SHA-256 of the graph seed, which
names the run, the window and its cohort), which both sides derive and no message carries.

Layouts (u32/u64 are unsigned big-endian):

- KeyAdvertisement (178 bytes): header(type 1) | window u64 | party u32 |
  c_pk 32 | s_pk 32 | self_mask_commitment 32 | signature 64. The Ed25519
  signature of the party's identity key covers header | context 32 | all bytes after the
  header and before the signature.
- EncryptedShare (198 bytes): header(type 2) | window u64 | sender u32 |
  recipient u32 | nonce 12 | ciphertext 164. The AES-GCM associated data is the
  first 22 bytes (header, window, sender, recipient).
- Share plaintext (148 bytes, only ever inside an EncryptedShare): window u64 |
  owner u32 | holder u32 | share of the owner's s key 66 | share of its self-mask seed 66.
- UnmaskingShares: header(type 3) | window u64 | holder u32 | n_self u32 |
  n_key u32 | n_self x (owner u32 | share 66) | n_key x (owner u32 | share 66),
  each list strictly increasing by owner.
- Survivor list, the bytes each survivor signs (not a message of its own):
  header(type 4) | context 32 | window u64 | count u32 | count x party u32, ascending.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from echelon.secagg.config import MAX_PARTY_ID
from echelon.secagg.errors import MalformedMessage
from echelon.secagg.shamir import SHARE_BYTES

MAGIC = b"ESAG"
VERSION = 2  # 2: signatures cover the window's session context (run and cohort)
CONTEXT_BYTES = 32
_CONTEXT_DOMAIN = b"echelon/secagg/v2/session-context"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_BYTES = 12
PLAINTEXT_BYTES = 8 + 4 + 4 + 2 * SHARE_BYTES
CIPHERTEXT_BYTES = PLAINTEXT_BYTES + 16
MAX_WINDOW = 2**64 - 1


class MessageType(IntEnum):
    """The type byte of each layout's header."""

    KEY_ADVERTISEMENT = 1
    ENCRYPTED_SHARE = 2
    UNMASKING_SHARES = 3
    SURVIVOR_LIST = 4


def header(kind: MessageType) -> bytes:
    """The 6-byte header that starts every layout of ``kind``."""
    return MAGIC + bytes([VERSION, kind])


def _check_width(name: str, value: bytes, width: int) -> None:
    if len(value) != width:
        raise MalformedMessage(
            f"{name}: got {len(value)} bytes, want {width}", expected=width, found=len(value)
        )


def _check_party(name: str, value: int) -> None:
    if not 0 <= value <= MAX_PARTY_ID:
        raise MalformedMessage(
            f"{name}: got {value}, want 0..{MAX_PARTY_ID}", expected=(0, MAX_PARTY_ID), found=value
        )


def check_window(name: str, value: int) -> None:
    """Raise ``MalformedMessage`` unless ``value`` fits the u64 window field."""
    if not 0 <= value <= MAX_WINDOW:
        raise MalformedMessage(
            f"{name}: got {value}, want 0..2**64-1", expected=(0, MAX_WINDOW), found=value
        )


def _check_header(data: bytes, kind: MessageType, size: int | None) -> None:
    if size is not None and len(data) != size:
        raise MalformedMessage(
            f"{kind.name}: got {len(data)} bytes, want {size}", expected=size, found=len(data)
        )
    if data[:6] != header(kind):
        raise MalformedMessage(
            f"{kind.name}: header is {data[:6]!r}, want {header(kind)!r}",
            expected=header(kind),
            found=bytes(data[:6]),
        )


@dataclass(frozen=True, kw_only=True)
class KeyAdvertisement:
    """A party's public keys for one window, signed with its Ed25519 identity key.

    ``c_pk`` encrypts shares sent to the party, ``s_pk`` agrees its pairwise
    mask keys, ``self_mask_commitment`` binds its self-mask seed so that a
    reconstructed seed can be checked.
    """

    window: int
    party: int
    c_pk: bytes
    s_pk: bytes
    self_mask_commitment: bytes
    signature: bytes

    SIZE = 6 + 8 + 4 + 3 * PUBLIC_KEY_BYTES + SIGNATURE_BYTES

    def __post_init__(self) -> None:
        check_window("KeyAdvertisement.window", self.window)
        _check_party("KeyAdvertisement.party", self.party)
        _check_width("KeyAdvertisement.c_pk", self.c_pk, PUBLIC_KEY_BYTES)
        _check_width("KeyAdvertisement.s_pk", self.s_pk, PUBLIC_KEY_BYTES)
        _check_width(
            "KeyAdvertisement.self_mask_commitment", self.self_mask_commitment, PUBLIC_KEY_BYTES
        )
        _check_width("KeyAdvertisement.signature", self.signature, SIGNATURE_BYTES)

    @staticmethod
    def signed_bytes_of(
        *,
        context: bytes,
        window: int,
        party: int,
        c_pk: bytes,
        s_pk: bytes,
        self_mask_commitment: bytes,
    ) -> bytes:
        """The canonical bytes the identity key signs: the header, the window's `context`
        (`session_context`: run and cohort), then every field but the signature."""
        _check_width("signed context", context, CONTEXT_BYTES)
        return (
            header(MessageType.KEY_ADVERTISEMENT)
            + context
            + struct.pack(">QI", window, party)
            + c_pk
            + s_pk
            + self_mask_commitment
        )

    def signed_bytes(self, context: bytes) -> bytes:
        """The canonical bytes covered by ``signature`` in the window of ``context``."""
        return self.signed_bytes_of(
            context=context,
            window=self.window,
            party=self.party,
            c_pk=self.c_pk,
            s_pk=self.s_pk,
            self_mask_commitment=self.self_mask_commitment,
        )

    def to_bytes(self) -> bytes:
        """The 178-byte layout documented in the module docstring."""
        return (
            header(MessageType.KEY_ADVERTISEMENT)
            + struct.pack(">QI", self.window, self.party)
            + self.c_pk
            + self.s_pk
            + self.self_mask_commitment
            + self.signature
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyAdvertisement:
        """Parse the layout; raises ``MalformedMessage``."""
        _check_header(data, MessageType.KEY_ADVERTISEMENT, cls.SIZE)
        window, party = struct.unpack_from(">QI", data, 6)
        keys = bytes(data[18 : 18 + 3 * PUBLIC_KEY_BYTES])
        return cls(
            window=window,
            party=party,
            c_pk=keys[:32],
            s_pk=keys[32:64],
            self_mask_commitment=keys[64:96],
            signature=bytes(data[114:]),
        )


@dataclass(frozen=True, kw_only=True)
class EncryptedShare:
    """The sender's Shamir shares for one recipient, AES-GCM encrypted under their pair key."""

    window: int
    sender: int
    recipient: int
    nonce: bytes
    ciphertext: bytes

    SIZE = 6 + 8 + 4 + 4 + NONCE_BYTES + CIPHERTEXT_BYTES

    def __post_init__(self) -> None:
        check_window("EncryptedShare.window", self.window)
        _check_party("EncryptedShare.sender", self.sender)
        _check_party("EncryptedShare.recipient", self.recipient)
        _check_width("EncryptedShare.nonce", self.nonce, NONCE_BYTES)
        _check_width("EncryptedShare.ciphertext", self.ciphertext, CIPHERTEXT_BYTES)

    @staticmethod
    def associated_data_of(*, window: int, sender: int, recipient: int) -> bytes:
        """The AES-GCM associated data: header, window, sender, recipient."""
        return header(MessageType.ENCRYPTED_SHARE) + struct.pack(">QII", window, sender, recipient)

    def associated_data(self) -> bytes:
        """The AES-GCM associated data of this share."""
        return self.associated_data_of(
            window=self.window, sender=self.sender, recipient=self.recipient
        )

    def to_bytes(self) -> bytes:
        """The 198-byte layout documented in the module docstring."""
        return self.associated_data() + self.nonce + self.ciphertext

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptedShare:
        """Parse the layout; raises ``MalformedMessage``."""
        _check_header(data, MessageType.ENCRYPTED_SHARE, cls.SIZE)
        window, sender, recipient = struct.unpack_from(">QII", data, 6)
        return cls(
            window=window,
            sender=sender,
            recipient=recipient,
            nonce=bytes(data[22:34]),
            ciphertext=bytes(data[34:]),
        )


@dataclass(frozen=True, kw_only=True)
class SharePlaintext:
    """What an EncryptedShare holds: the owner's shares of its s key and self-mask seed."""

    window: int
    owner: int
    holder: int
    key_share: bytes
    seed_share: bytes

    def __post_init__(self) -> None:
        check_window("SharePlaintext.window", self.window)
        _check_party("SharePlaintext.owner", self.owner)
        _check_party("SharePlaintext.holder", self.holder)
        _check_width("SharePlaintext.key_share", self.key_share, SHARE_BYTES)
        _check_width("SharePlaintext.seed_share", self.seed_share, SHARE_BYTES)

    def to_bytes(self) -> bytes:
        """The 148-byte plaintext layout."""
        return (
            struct.pack(">QII", self.window, self.owner, self.holder)
            + self.key_share
            + self.seed_share
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SharePlaintext:
        """Parse the layout; raises ``MalformedMessage``."""
        _check_width("SharePlaintext", data, PLAINTEXT_BYTES)
        window, owner, holder = struct.unpack_from(">QII", data, 0)
        return cls(
            window=window,
            owner=owner,
            holder=holder,
            key_share=bytes(data[16 : 16 + SHARE_BYTES]),
            seed_share=bytes(data[16 + SHARE_BYTES :]),
        )


ShareEntries = tuple[tuple[int, bytes], ...]


def _check_entries(name: str, entries: ShareEntries) -> None:
    owners = [owner for owner, _ in entries]
    if owners != sorted(set(owners)):
        raise MalformedMessage(
            f"{name}: owners must be strictly increasing, got {owners}",
            expected="strictly increasing",
            found=owners,
        )
    for owner, share in entries:
        _check_party(f"{name} owner", owner)
        _check_width(f"{name} share of party {owner}", share, SHARE_BYTES)


@dataclass(frozen=True, kw_only=True)
class UnmaskingShares:
    """A survivor's released shares: self-mask seeds of survivors, s keys of dropped parties.

    ``self_mask_shares`` holds the holder's shares of the seeds of its surviving
    neighbours *and of its own seed* (owner == holder); ``pairwise_key_shares``
    those of the s keys of its dropped neighbours, never of its own. No owner
    appears in both lists.
    """

    window: int
    holder: int
    self_mask_shares: ShareEntries
    pairwise_key_shares: ShareEntries

    def __post_init__(self) -> None:
        check_window("UnmaskingShares.window", self.window)
        _check_party("UnmaskingShares.holder", self.holder)
        _check_entries("UnmaskingShares.self_mask_shares", self.self_mask_shares)
        _check_entries("UnmaskingShares.pairwise_key_shares", self.pairwise_key_shares)
        both = {o for o, _ in self.self_mask_shares} & {o for o, _ in self.pairwise_key_shares}
        if both:
            raise MalformedMessage(
                f"UnmaskingShares: parties {sorted(both)} appear in both share lists",
                expected="disjoint lists",
                found=sorted(both),
            )

    def to_bytes(self) -> bytes:
        """The layout documented in the module docstring."""
        parts = [
            header(MessageType.UNMASKING_SHARES),
            struct.pack(
                ">QIII",
                self.window,
                self.holder,
                len(self.self_mask_shares),
                len(self.pairwise_key_shares),
            ),
        ]
        for owner, share in (*self.self_mask_shares, *self.pairwise_key_shares):
            parts.append(struct.pack(">I", owner) + share)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskingShares:
        """Parse the layout; raises ``MalformedMessage``."""
        _check_header(data, MessageType.UNMASKING_SHARES, None)
        if len(data) < 26:
            raise MalformedMessage(
                f"UnmaskingShares: got {len(data)} bytes, want at least 26",
                expected=26,
                found=len(data),
            )
        window, holder, n_self, n_key = struct.unpack_from(">QIII", data, 6)
        entry = 4 + SHARE_BYTES
        size = 26 + (n_self + n_key) * entry
        if len(data) != size:
            raise MalformedMessage(
                f"UnmaskingShares: got {len(data)} bytes, want {size} for "
                f"{n_self} + {n_key} shares",
                expected=size,
                found=len(data),
            )
        starts = [26 + i * entry for i in range(n_self + n_key)]
        entries = [
            (struct.unpack_from(">I", data, at)[0], bytes(data[at + 4 : at + entry]))
            for at in starts
        ]
        return cls(
            window=window,
            holder=holder,
            self_mask_shares=tuple(entries[:n_self]),
            pairwise_key_shares=tuple(entries[n_self:]),
        )


def session_context(graph_seed: bytes, window: int, cohort: Iterable[int]) -> bytes:
    """The 32 bytes every signature of a window covers: SHA-256 over a domain, the graph
    seed (which names the run: `{run_id}/{window}` at level 2, `{run_id}/level-1` at level
    1), the window and its cohort, ascending. A signed advertisement or survivor list then
    verifies in that run's window with that cohort only: replayed into another run, or into
    the same window under another cohort, it fails."""
    ordered = sorted(cohort)
    check_window("context window", window)
    for party in ordered:
        _check_party("cohort member", party)
    return hashlib.sha256(
        _CONTEXT_DOMAIN
        + struct.pack(">I", len(graph_seed))
        + graph_seed
        + struct.pack(">QI", window, len(ordered))
        + b"".join(struct.pack(">I", party) for party in ordered)
    ).digest()


def survivor_list_bytes(window: int, survivors: Iterable[int], context: bytes) -> bytes:
    """Canonical bytes of a survivor list, the payload of the consistency-check signatures,
    in the window of `context` (`session_context`)."""
    ordered = sorted(survivors)
    check_window("survivor list window", window)
    _check_width("signed context", context, CONTEXT_BYTES)
    for party in ordered:
        _check_party("survivor", party)
    return (
        header(MessageType.SURVIVOR_LIST)
        + context
        + struct.pack(">QI", window, len(ordered))
        + b"".join(struct.pack(">I", party) for party in ordered)
    )
