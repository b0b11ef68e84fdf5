"""Masks: a ChaCha20 keystream read as uint64, keyed through HKDF-SHA256.

ChaCha20 is a cryptographic PRG, unlike numpy's generators (Flower's SecAgg+
masks with RandomState, flwr#7522). Every key is derived for one purpose in
one round (the config's context is the HKDF info), so the all-zero nonce is
never reused under a key.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpriv.common.secagg.config import SecAggConfig
from fedpriv.common.secagg.errors import SecAggError

_NONCE = bytes(16)  # ChaCha20 in `cryptography`: 4-byte counter + 12-byte nonce


def derive_key(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def agree(private: X25519PrivateKey, peer_public: bytes, info: bytes, peer: str) -> bytes:
    """A 32-byte key both ends derive from X25519; `peer` names the site whose public key this is."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as error:  # wrong length, or a low-order point giving an all-zero secret
        raise SecAggError(f"site {peer!r}: unusable X25519 public key ({error})") from None
    return derive_key(shared, info)


def keystream(key: bytes, length: int) -> np.ndarray:
    """`length` uniform uint64 values; little-endian so every platform expands a key the same way."""
    encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * length)), dtype="<u8").astype(np.uint64, copy=False)


def self_mask(config: SecAggConfig, site: str, seed: bytes) -> np.ndarray:
    return keystream(derive_key(seed, config.context("self-mask", site)), config.length)


def pair_sign(site: str, peer: str) -> int:
    """+1 for the site first in name order, -1 for the other: the pair's masks cancel in the sum."""
    return 1 if site < peer else -1


def pairwise_mask(
    config: SecAggConfig, site: str, peer: str, private: X25519PrivateKey, public: bytes, public_owner: str
) -> np.ndarray:
    """The mask `site` adds for `peer` (sign included).

    Either end's private key with the other end's public key gives the same
    stream: the site uses its own, the aggregator a dropped peer's rebuilt one.
    """
    low, high = sorted((site, peer))
    key = agree(private, public, config.context("pair-mask", low, high), public_owner)
    stream = keystream(key, config.length)
    return stream if pair_sign(site, peer) > 0 else np.negative(stream)
