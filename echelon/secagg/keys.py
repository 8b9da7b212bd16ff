"""Key derivation and share encryption: X25519, HKDF-SHA256 and AES-GCM, bound to the window.

Every derived key's HKDF info is ``b"echelon/secagg/v1/" || purpose || 0x00 ||
window (u64) || first party (u32) || second party (u32)``, so a key (and thus a
keystream or a ciphertext) of one window or pair is useless in any other.
"""

from __future__ import annotations

import hashlib
import os
import struct

from cryptography.exceptions import InvalidSignature as CryptoInvalidSignature
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from echelon.secagg.errors import (
    InvalidSignature,
    MalformedMessage,
    ShareAuthenticationError,
    UnknownParty,
    WrongWindow,
)
from echelon.secagg.messages import NONCE_BYTES, EncryptedShare, KeyAdvertisement, SharePlaintext

_INFO_PREFIX = b"echelon/secagg/v1/"
PAIRWISE_MASK = b"pairwise-mask"
SELF_MASK = b"self-mask"
SHARE_ENCRYPTION = b"share-encryption"


def derive_key(secret: bytes, *, purpose: bytes, window: int, first: int, second: int) -> bytes:
    """HKDF-SHA256 of ``secret`` to 32 bytes, with the info layout of the module docstring."""
    info = _INFO_PREFIX + purpose + b"\x00" + struct.pack(">QII", window, first, second)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def agree(
    private: X25519PrivateKey, peer_public: bytes, *, peer: int, what: str = "public key"
) -> bytes:
    """X25519 shared secret; raises ``MalformedMessage`` for an invalid or low-order peer key."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as error:
        raise MalformedMessage(
            f"X25519 {what} of party {peer} is invalid: {error}",
            expected="a valid X25519 public key",
            found=peer_public.hex(),
        ) from None


def public_bytes(private: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of an X25519 private key."""
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def pairwise_mask_key(
    private: X25519PrivateKey, peer_public: bytes, *, window: int, me: int, peer: int
) -> bytes:
    """Mask key of the pair {me, peer}: the same for both, as the ids go in ascending order."""
    shared = agree(private, peer_public, peer=peer)
    low, high = min(me, peer), max(me, peer)
    return derive_key(shared, purpose=PAIRWISE_MASK, window=window, first=low, second=high)


def self_mask_key(seed: bytes, *, window: int, party: int) -> bytes:
    """Mask key of a party's self mask, from its 32-byte seed."""
    return derive_key(seed, purpose=SELF_MASK, window=window, first=party, second=party)


def self_mask_commitment(seed: bytes, *, window: int, party: int) -> bytes:
    """SHA-256 commitment to a self-mask seed, published in the key advertisement.

    The seed is 256 bits of fresh randomness, so the hash hides it; it lets the
    aggregator check a seed reconstructed from shares before using it.
    """
    return hashlib.sha256(
        _INFO_PREFIX + b"self-mask-commitment\x00" + struct.pack(">QI", window, party) + seed
    ).digest()


def pairwise_sign(me: int, peer: int) -> int:
    """+1 when ``me < peer``, else -1: the two masks of a pair cancel in the sum."""
    return 1 if me < peer else -1


def _share_key(
    private: X25519PrivateKey, peer_public: bytes, *, window: int, sender: int, recipient: int
) -> bytes:
    shared = agree(private, peer_public, peer=recipient)
    return derive_key(
        shared, purpose=SHARE_ENCRYPTION, window=window, first=sender, second=recipient
    )


def encrypt_share(
    plaintext: SharePlaintext,
    *,
    sender_private: X25519PrivateKey,
    recipient_public: bytes,
    window: int,
    sender: int,
    recipient: int,
) -> EncryptedShare:
    """Encrypt shares for one recipient; the key is directional (sender, recipient)."""
    key = _share_key(
        sender_private, recipient_public, window=window, sender=sender, recipient=recipient
    )
    nonce = os.urandom(NONCE_BYTES)
    aad = EncryptedShare.associated_data_of(window=window, sender=sender, recipient=recipient)
    ciphertext = AESGCM(key).encrypt(nonce, plaintext.to_bytes(), aad)
    return EncryptedShare(
        window=window, sender=sender, recipient=recipient, nonce=nonce, ciphertext=ciphertext
    )


def decrypt_share(
    share: EncryptedShare, *, recipient_private: X25519PrivateKey, sender_public: bytes
) -> SharePlaintext:
    """Decrypt a share addressed to us and check that its content names the same pair and window.

    Raises ``ShareAuthenticationError`` when AES-GCM authentication fails or
    the plaintext's window, owner or holder differ from the header.
    """
    shared = agree(recipient_private, sender_public, peer=share.sender)
    key = derive_key(
        shared,
        purpose=SHARE_ENCRYPTION,
        window=share.window,
        first=share.sender,
        second=share.recipient,
    )
    try:
        data = AESGCM(key).decrypt(share.nonce, share.ciphertext, share.associated_data())
    except InvalidTag:
        raise ShareAuthenticationError(
            f"share from party {share.sender} to {share.recipient} in window {share.window} "
            "failed AES-GCM authentication",
            expected="authentic ciphertext",
            found="tag mismatch",
        ) from None
    plaintext = SharePlaintext.from_bytes(data)
    found = (plaintext.window, plaintext.owner, plaintext.holder)
    wanted = (share.window, share.sender, share.recipient)
    if found != wanted:
        raise ShareAuthenticationError(
            f"share plaintext names (window, owner, holder) {found}, header says {wanted}",
            expected=wanted,
            found=found,
        )
    return plaintext


def verify_signature(public: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``data``."""
    try:
        public.verify(signature, data)
    except CryptoInvalidSignature:
        return False
    return True


def verify_advertisement(
    ad: KeyAdvertisement,
    *,
    party: int,
    window: int,
    identity: Ed25519PublicKey,
    context: bytes,
) -> None:
    """Check an advertisement's party, window, keys and signature (over `context`, the
    window's `session_context`: a signature made in another run or cohort fails).

    Raises ``UnknownParty`` (filed under another id), ``WrongWindow`` (replay),
    ``MalformedMessage`` (a low-order X25519 key) or ``InvalidSignature``.
    """
    if ad.party != party:
        raise UnknownParty(
            f"advertisement filed under party {party} names party {ad.party}",
            expected=party,
            found=ad.party,
        )
    if ad.window != window:
        raise WrongWindow(
            f"advertisement of party {party}: window {ad.window}, want {window} (replay?)",
            expected=window,
            found=ad.window,
        )
    for name, public in (("c_pk", ad.c_pk), ("s_pk", ad.s_pk)):
        # A low-order point would make every agreement with it all-zero: refuse it up front.
        agree(X25519PrivateKey.generate(), public, peer=party, what=name)
    if not verify_signature(identity, ad.signature, ad.signed_bytes(context)):
        raise InvalidSignature(
            f"advertisement of party {party} is not signed by its identity key for this run's "
            "window and cohort",
            expected="valid Ed25519 signature",
            found=ad.signature.hex(),
        )
