"""Proof of possession at registration: a boundary's Hello carries an Ed25519 signature, by
the identity key the manifest names for it, over the run id, its party id and the Hello
frame's fresh nonce. Without it, an outsider could register a boundary's public key
(copied from the manifest) and sit in the middle; with it, only the key's holder can.

The signed bytes are length-prefixed fields under a domain of their own, so no other
signature of the party's (secure aggregation, audit records) can be passed off as one.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

REGISTRATION_DOMAIN = b"echelon/registration/v1\x00"
NONCE_BYTES = 16
SIGNATURE_BYTES = 64


class RegistrationError(ValueError):
    """A registration proof is missing, malformed or does not verify; says which."""


def registration_statement(run_id: str, party_id: str, nonce: bytes) -> bytes:
    """The bytes a registration proof signs. Raises RegistrationError for a nonce that is
    not NONCE_BYTES long or an empty id."""
    if len(nonce) != NONCE_BYTES:
        raise RegistrationError(f"nonce: got {len(nonce)} bytes, want {NONCE_BYTES}")
    if not run_id or not party_id:
        raise RegistrationError(f"run id {run_id!r} and party id {party_id!r}: want both non-empty")
    fields = [run_id.encode(), party_id.encode(), nonce]
    return REGISTRATION_DOMAIN + b"".join(struct.pack(">I", len(f)) + f for f in fields)


def prove_registration(key: Ed25519PrivateKey, run_id: str, party_id: str, nonce: bytes) -> bytes:
    """The proof: `key`'s signature over `registration_statement`."""
    return key.sign(registration_statement(run_id, party_id, nonce))


def verify_registration(
    identity_key: bytes, proof: bytes, run_id: str, party_id: str, nonce: bytes
) -> None:
    """Checks a proof against the identity key the manifest names for `party_id`. Raises
    RegistrationError saying what was wrong."""
    if len(proof) != SIGNATURE_BYTES:
        raise RegistrationError(
            f"proof_of_possession: got {len(proof)} bytes, want a {SIGNATURE_BYTES}-byte "
            f"Ed25519 signature over run id, party id and the frame's nonce"
        )
    statement = registration_statement(run_id, party_id, nonce)
    try:
        Ed25519PublicKey.from_public_bytes(identity_key).verify(proof, statement)
    except InvalidSignature:
        raise RegistrationError(
            f"proof_of_possession: does not verify under {party_id}'s identity key "
            f"{identity_key.hex()[:16]}... for run {run_id!r}, want a signature by that key"
        ) from None
