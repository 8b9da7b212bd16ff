"""Record signatures: `cryptography` signs, the log's `VerifyKey` (libsodium) verifies the
same RFC 8032 signatures and refuses the forgeries a lax verifier would let through."""

from __future__ import annotations

import pytest

from echelon.audit.errors import SignatureError
from echelon.audit.signing import Signer, VerifyKey, verify_signature

# RFC 8032: the group order L; the identity point's encoding (y = 1).
L = 2**252 + 27742317777372353535851937790883648493
IDENTITY = (1).to_bytes(32, "little")


def test_a_signature_made_with_cryptography_verifies_and_a_changed_byte_does_not() -> None:
    signer = Signer.from_seed("org-a", b"\x07" * 32)
    data = b'{"a":1}'
    sig = signer.sign(data)
    key = VerifyKey(signer.public_key)

    key.verify(data, sig, what="record")
    verify_signature(signer.public_key, data, sig, what="record")
    with pytest.raises(SignatureError, match="record signature"):
        key.verify(data + b" ", sig, what="record")
    with pytest.raises(SignatureError, match="record signature"):
        key.verify(data, sig[:-1] + bytes([sig[-1] ^ 1]), what="record")


def test_non_canonical_s_is_refused() -> None:
    # S + L verifies in the group equation but is not the canonical encoding of S.
    signer = Signer.from_seed("org-a", b"\x08" * 32)
    data = b"payload"
    sig = signer.sign(data)
    s = int.from_bytes(sig[32:], "little") + L
    assert s < 2**256

    with pytest.raises(SignatureError):
        VerifyKey(signer.public_key).verify(data, sig[:32] + s.to_bytes(32, "little"), what="x")


def test_small_order_key_with_its_universal_forgery_is_refused() -> None:
    # Under the identity key, R = identity and S = 0 satisfy [S]B = R + [k]A for every message.
    forged = IDENTITY + bytes(32)

    for message in (b"anything", b"at all"):
        with pytest.raises(SignatureError):
            VerifyKey(IDENTITY).verify(message, forged, what="forged")


def test_sizes_are_checked_before_any_arithmetic() -> None:
    with pytest.raises(SignatureError, match="32 bytes"):
        VerifyKey(b"\x01" * 31)
    with pytest.raises(SignatureError, match="64 bytes"):
        VerifyKey(Signer.from_seed("org-a", b"\x09" * 32).public_key).verify(
            b"", b"\x00" * 63, what="x"
        )
