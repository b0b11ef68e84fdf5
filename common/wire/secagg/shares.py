"""Shamir shares of 32-byte secrets, and the AEAD that carries them from site to site.

Shares are points of a random polynomial over the prime field GF(2^521 - 1)
(a Mersenne prime, so every 256-bit secret is a field element), with
coefficients from the OS's CSPRNG. pycryptodome's GF(2^128) Shamir was the
first choice, but its pure-Python field arithmetic made the aggregator's
unmasking take seconds per round at 50 sites; here Python's native integers do
the arithmetic, and the Lagrange coefficients of a set of share holders are
computed once and reused for every secret they rebuild (each round rebuilds a
secret per site from the same holders). A holder's share index is its 1-based
position in the cohort, fixed before anyone drops.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedpriv.common.wire.secagg.errors import SecAggError

SECRET_BYTES = 32
PRIME = 2**521 - 1
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66
_NONCE = bytes(12)  # each AEAD key seals exactly one message (one direction of one pair, one round)


def split(secret: bytes, threshold: int, holders: int) -> dict[int, bytes]:
    """index (1..holders) -> share; any `threshold` of them rebuild `secret`, fewer reveal nothing about it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes")
    if not 1 <= threshold <= holders:
        raise ValueError(f"threshold {threshold} must lie in [1, {holders}]")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in range(1, holders + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


@lru_cache(maxsize=64)
def _lagrange_at_zero(indices: tuple[int, ...]) -> tuple[int, ...]:
    weights = []
    for i in indices:
        numerator, denominator = 1, 1
        for j in indices:
            if j != i:
                numerator = numerator * j % PRIME
                denominator = denominator * (j - i) % PRIME
        weights.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return tuple(weights)


def combine(shares: Mapping[int, bytes], threshold: int, owner: str) -> bytes:
    """The secret from `threshold` shares (the lowest indices given are used)."""
    chosen = sorted(shares.items())[:threshold]
    if len(chosen) < threshold:
        raise SecAggError(f"site {owner!r}: {len(chosen)} shares, the threshold is {threshold}")
    if any(len(share) != SHARE_BYTES for _, share in chosen):
        raise SecAggError(f"site {owner!r}: a share of its secret is not {SHARE_BYTES} bytes")
    weights = _lagrange_at_zero(tuple(i for i, _ in chosen))
    secret = sum(w * int.from_bytes(share, "big") for w, (_, share) in zip(weights, chosen, strict=True)) % PRIME
    # A garbled share gives a random field element, almost surely this large. (A
    # deliberately shifted one is not caught here: a rebuilt mask key is checked
    # against its advertisement by the session.)
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise SecAggError(f"site {owner!r}: its shares do not rebuild a {SECRET_BYTES}-byte secret; a share was wrong")
    return secret.to_bytes(SECRET_BYTES, "big")


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_NONCE, plaintext, associated)


def unseal(key: bytes, ciphertext: bytes, associated: bytes, sender: str) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(_NONCE, bytes(ciphertext), associated)
    except InvalidTag:
        raise SecAggError(
            f"site {sender!r}: the shares it sent do not authenticate (altered, misrouted or from another round)"
        ) from None
