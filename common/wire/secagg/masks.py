"""Masks: a ChaCha20 keystream read as uint64, keyed through HKDF-SHA256 (`derive`).

ChaCha20 is a cryptographic PRG, unlike numpy's generators (Flower's SecAgg+
masks with RandomState, flwr#7522). Every key is derived for one purpose in
one round, so the all-zero nonce is never reused under a key, and the masks
of round r share nothing with those of round r' although the X25519 keys
under them are the same all epoch.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedpriv.common.wire.secagg.config import SecAggConfig
from fedpriv.common.wire.secagg.derive import derive_key

_NONCE = bytes(16)  # ChaCha20 in `cryptography`: 4-byte counter + 12-byte nonce


def keystream(key: bytes, length: int) -> np.ndarray:
    """`length` uniform uint64 values; little-endian so every platform expands a key the same way."""
    encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * length)), dtype="<u8").astype(np.uint64, copy=False)


def self_mask(config: SecAggConfig, site: str, seed: bytes) -> np.ndarray:
    return keystream(derive_key(seed, config.context("self-mask", site)), config.length)


def pair_sign(site: str, peer: str) -> int:
    """+1 for the site first in name order, -1 for the other: the pair's masks cancel in the sum."""
    return 1 if site < peer else -1


def pair_mask(config: SecAggConfig, site: str, peer: str, key: bytes) -> np.ndarray:
    """The mask `site` adds for `peer` (sign included), from the pair's key of this round (`derive.pair_key`)."""
    stream = keystream(key, config.length)
    return stream if pair_sign(site, peer) > 0 else np.negative(stream)
