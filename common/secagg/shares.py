"""Shamir shares of 32-byte secrets, and the AEAD that carries them from site to site.

pycryptodome's Shamir works in GF(2^128) on 16-byte secrets, so a 32-byte
secret is shared as two independent halves with the same indices. A holder's
share index is its 1-based position in the cohort, fixed before anyone drops.
"""

from __future__ import annotations

from collections.abc import Mapping

from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedpriv.common.secagg.errors import SecAggError

SECRET_BYTES = 32
SHARE_BYTES = 32
_HALF = 16
_NONCE = bytes(12)  # each AEAD key seals exactly one message (one direction of one pair, one round)


def split(secret: bytes, threshold: int, holders: int) -> dict[int, bytes]:
    """index (1..holders) -> 32-byte share; any `threshold` of them rebuild `secret`, fewer reveal nothing."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes")
    low = Shamir.split(threshold, holders, secret[:_HALF])
    high = Shamir.split(threshold, holders, secret[_HALF:])
    return {i: a + b for (i, a), (j, b) in zip(low, high, strict=True) if i == j}


def combine(shares: Mapping[int, bytes], threshold: int, owner: str) -> bytes:
    """The secret from exactly `threshold` shares (pycryptodome wants no more than that)."""
    chosen = sorted(shares.items())[:threshold]
    if len(chosen) < threshold:
        raise SecAggError(f"site {owner!r}: {len(chosen)} shares, the threshold is {threshold}")
    if any(len(share) != SHARE_BYTES for _, share in chosen):
        raise SecAggError(f"site {owner!r}: a share of its secret is not {SHARE_BYTES} bytes")
    low = Shamir.combine([(i, share[:_HALF]) for i, share in chosen])
    high = Shamir.combine([(i, share[_HALF:]) for i, share in chosen])
    return low + high


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_NONCE, plaintext, associated)


def unseal(key: bytes, ciphertext: bytes, associated: bytes, sender: str) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(_NONCE, bytes(ciphertext), associated)
    except InvalidTag:
        raise SecAggError(
            f"site {sender!r}: the shares it sent do not authenticate (altered, misrouted or from another round)"
        ) from None
