"""Every key a round uses, derived with HKDF-SHA256 from an X25519 agreement and the round's context.

The X25519 keys are agreed once per epoch; what a round uses is derived from
them for (run, epoch, round, purpose, parties) (`SecAggConfig.context` is the
HKDF info), so a key revealed in one round (a pair's mask key, when one of
the pair dropped) is useless in any other, and each AEAD key seals exactly
one message (its all-zero nonce is never reused).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpriv.common.wire.secagg.config import SecAggConfig
from fedpriv.common.wire.secagg.errors import SecAggError


def derive_key(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def agree(private: X25519PrivateKey, peer_public: bytes, info: bytes, peer: str) -> bytes:
    """A 32-byte key both ends derive from X25519; `peer` names the site whose public key this is."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as error:  # wrong length, or a low-order point giving an all-zero secret
        raise SecAggError(f"site {peer!r}: unusable X25519 public key ({error})") from None
    return derive_key(shared, info)


def pair_key(config: SecAggConfig, site: str, peer: str, private: X25519PrivateKey, public: bytes) -> bytes:
    """The pair's mask key of this round: `site`'s private key with `peer`'s public one (either end gets it)."""
    low, high = sorted((site, peer))
    return agree(private, public, config.context("pair-mask", low, high), peer)


def seal_key(
    config: SecAggConfig, private: X25519PrivateKey, peer_c_pk: bytes, sender: str, recipient: str, peer: str
) -> bytes:
    """The AEAD key of this round's seed share from `sender` to `recipient` (directional: each end its own);
    `peer` names the owner of `peer_c_pk`."""
    return agree(private, peer_c_pk, config.context("seed-share-key", sender, recipient), peer)


def seal_ad(config: SecAggConfig, sender: str, recipient: str) -> bytes:
    """Associated data of a sealed seed share: run, epoch, round, sender and recipient."""
    return config.context("seed-share", sender, recipient)
