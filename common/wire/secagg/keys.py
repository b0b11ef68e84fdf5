"""Per-epoch X25519 keys and their advertisements, signed with each site's provisioned identity key.

A site checks every peer's advertisement against the Ed25519 public key pinned
for that peer at provisioning (its ledger key), not against anything the
aggregator sends, so an aggregator cannot slip in a key of its own and read
shares or masks. The signed message also binds the configuration the keys are
agreed under (`SecAggConfig.keys`: run, epoch, cohort, threshold, encoding), so
all sites provably agree on the same cohort for every round of the epoch.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedpriv.common.privacy import signing
from fedpriv.common.wire.secagg.config import SecAggConfig
from fedpriv.common.wire.secagg.errors import SecAggError

KEY_BYTES = 32


@dataclass(frozen=True)
class EphemeralKeys:
    """c: agrees the AEAD keys that carry seed shares; s: agrees the pairwise masks (never revealed)."""

    c_sk: bytes
    s_sk: bytes

    @classmethod
    def generate(cls) -> EphemeralKeys:
        return cls(X25519PrivateKey.generate().private_bytes_raw(), X25519PrivateKey.generate().private_bytes_raw())

    @property
    def c_private(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self.c_sk)

    @property
    def s_private(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self.s_sk)

    @property
    def c_pk(self) -> bytes:
        return self.c_private.public_key().public_bytes_raw()

    @property
    def s_pk(self) -> bytes:
        return self.s_private.public_key().public_bytes_raw()


@dataclass(frozen=True)
class PeerKeys:
    c_pk: bytes
    s_pk: bytes


def advertisement_message(config: SecAggConfig, site: str, c_pk: bytes, s_pk: bytes) -> bytes:
    keys = config.keys
    fields = ["advertise", keys.run_id, keys.epoch, site, keys.digest().hex(), c_pk.hex(), s_pk.hex()]
    return b"fedpriv-secagg\0" + json.dumps(fields, separators=(",", ":")).encode()


def advertise(config: SecAggConfig, site: str, identity: Ed25519PrivateKey, keys: EphemeralKeys) -> dict[str, bytes]:
    """The advertisement a site sends: its two public keys and its identity signature over them."""
    signature = identity.sign(advertisement_message(config, site, keys.c_pk, keys.s_pk))
    return {"c_pk": keys.c_pk, "s_pk": keys.s_pk, "signature": signature}


def verify_advertisements(
    config: SecAggConfig, advertisements: Mapping[str, Mapping[str, bytes]], pinned: Mapping[str, str]
) -> dict[str, PeerKeys]:
    """Every advertisement, checked against the pinned identity keys; raises naming the first bad site."""
    verified: dict[str, PeerKeys] = {}
    for site in sorted(advertisements):
        ad = advertisements[site]
        if site not in config.sites:
            raise SecAggError(f"site {site!r}: advertised a key but is not in this round's cohort")
        public = pinned.get(site)
        if not public:
            raise SecAggError(f"site {site!r}: no identity key is pinned for it; refusing its ephemeral keys")
        try:
            c_pk, s_pk, signature = bytes(ad["c_pk"]), bytes(ad["s_pk"]), bytes(ad["signature"])
        except (KeyError, TypeError):
            raise SecAggError(f"site {site!r}: advertisement lacks c_pk, s_pk or signature") from None
        if len(c_pk) != KEY_BYTES or len(s_pk) != KEY_BYTES:
            raise SecAggError(f"site {site!r}: advertised keys must be {KEY_BYTES} bytes each")
        message = advertisement_message(config, site, c_pk, s_pk)
        if not signing.verify(public, message, base64.b64encode(signature).decode()):
            raise SecAggError(
                f"site {site!r}: advertisement signature does not verify against its pinned identity key "
                f"{signing.fingerprint(public)}; its ephemeral keys may have been substituted"
            )
        verified[site] = PeerKeys(c_pk, s_pk)
    return verified
