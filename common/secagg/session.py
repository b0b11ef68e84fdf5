"""The four stages of one secure-aggregation round, for a site and for the aggregator.

    stage          aggregator sends              site answers
    1 advertise    (config)                      signed ephemeral public keys
    2 share keys   all advertisements            shares of b and s_sk, sealed per peer
    3 mask         the shares sealed to it       y = encode(x) + PRG(b) + sum of +-pairwise masks
    4 unmask       survivors U, dropped D        its shares of b_j (j in U) and of s_sk_j (j in D)

Every message is plain data (bytes, str, int, uint64 arrays) so that it can
travel in Flower messages; a `SiteSession` is rebuilt between stages from the
flat dict `to_state()` gives (Flower's per-node `context.state`).

What a site refuses, since the aggregator is not trusted with its vector:
peers' keys not signed by their pinned identity key (or its own keys missing
from what is forwarded), fewer than `threshold` peers at any stage, a second
masked vector in one round (two masks under one seed reveal the difference of
the vectors), and an unmask request that names a site both survivor and
dropped, leaves itself out, does not account for exactly the peers it masked
with, or comes a second time. It then never reveals both secrets of one site.

Trust model: secrecy holds against an aggregator colluding with up to
`max_colluding` sites as `config.py` explains; sites are trusted to follow
the protocol (a wrong share is detected, not attributed: the rebuilt s_sk must
match its advertised key, and a wrong b yields a sum outside the decode bound).
Every site masks with every other one (no SecAgg+ neighbour graph): cost grows
with n^2, fine for tens of sites.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedpriv.common import signing
from fedpriv.common.secagg import shares
from fedpriv.common.secagg.config import SecAggConfig
from fedpriv.common.secagg.errors import RoundAbandoned, SecAggError
from fedpriv.common.secagg.keys import KEY_BYTES, EphemeralKeys, PeerKeys, advertise, verify_advertisements
from fedpriv.common.secagg.masks import agree, pairwise_mask, self_mask

NEW, ADVERTISED, SHARED, MASKED, REVEALED = range(5)
_STAGE_NAMES = ("new", "advertised", "shared keys", "masked", "revealed")
_HELD_BYTES = 2 * shares.SHARE_BYTES  # a share of b, then a share of s_sk

StateValue = bytes | str | int


def _share_key(
    config: SecAggConfig, private: X25519PrivateKey, peer_c_pk: bytes, sender: str, recipient: str, peer: str
) -> bytes:
    # Directional (sender, recipient) in the HKDF info: the two ends of a pair seal under different keys.
    return agree(private, peer_c_pk, config.context("share-key", sender, recipient), peer)


def _shares_ad(config: SecAggConfig, sender: str, recipient: str) -> bytes:
    return config.context("shares", sender, recipient)


def _too_few(config: SecAggConfig, count: int, what: str) -> RoundAbandoned:
    return RoundAbandoned(
        f"round {config.round}: {count} of {len(config.sites)} sites {what}, below the threshold "
        f"{config.threshold}; the round is abandoned and nothing is released"
    )


class SiteSession:
    """One site's side of one round."""

    def __init__(self, config: SecAggConfig, site: str, identity: Ed25519PrivateKey, pinned: Mapping[str, str]):
        if site not in config.sites:
            raise SecAggError(f"site {site!r} is not in round {config.round}'s cohort {list(config.sites)}")
        if pinned.get(site) != signing.public_b64(identity):
            raise SecAggError(f"site {site!r}: its identity key is not the one pinned for it")
        self.config, self.site = config, site
        self._identity, self._pinned = identity, dict(pinned)
        self._stage = NEW
        self._keys: EphemeralKeys | None = None
        self._seed = b""  # b, the self-mask seed
        self._peers: dict[str, PeerKeys] = {}
        self._held: dict[str, bytes] = {}  # owner -> this site's share of the owner's b and s_sk
        self._masked_with: tuple[str, ...] = ()

    @property
    def stage(self) -> int:
        return self._stage

    def _expect(self, stage: int, step: str) -> None:
        if self._stage != stage:
            raise SecAggError(
                f"site {self.site!r}: {step} requested in stage '{_STAGE_NAMES[self._stage]}'; "
                f"each step runs once per round, in order"
            )

    def advertise(self) -> dict[str, bytes]:
        """Stage 1: fresh X25519 keys for this round, signed with the identity key."""
        self._expect(NEW, "advertise")
        self._keys = EphemeralKeys.generate()
        self._stage = ADVERTISED
        return advertise(self.config, self.site, self._identity, self._keys)

    def share_keys(self, advertisements: Mapping[str, Mapping[str, bytes]]) -> dict[str, bytes]:
        """Stage 2: verify every peer, then seal to each its shares of b and s_sk (peer -> ciphertext)."""
        self._expect(ADVERTISED, "share keys")
        assert self._keys is not None
        config, keys = self.config, self._keys
        peers = verify_advertisements(config, advertisements, self._pinned)
        if peers.get(self.site) != PeerKeys(keys.c_pk, keys.s_pk):
            raise SecAggError(f"site {self.site!r}: the forwarded advertisements do not carry this site's own keys")
        if len(peers) < config.threshold:
            raise _too_few(config, len(peers), "advertised keys")
        seed = os.urandom(shares.SECRET_BYTES)
        seed_shares = shares.split(seed, config.threshold, len(config.sites))
        key_shares = shares.split(keys.s_sk, config.threshold, len(config.sites))
        sealed: dict[str, bytes] = {}
        c_private = keys.c_private
        for peer, peer_keys in peers.items():
            index = config.index(peer)
            plaintext = seed_shares[index] + key_shares[index]
            if peer == self.site:
                self._held[peer] = plaintext
                continue
            key = _share_key(config, c_private, peer_keys.c_pk, self.site, peer, peer)
            sealed[peer] = shares.seal(key, plaintext, _shares_ad(config, self.site, peer))
        self._seed, self._peers, self._stage = seed, peers, SHARED
        return sealed

    def mask(self, sealed: Mapping[str, bytes], vector: np.ndarray) -> np.ndarray:
        """Stage 3: open the shares peers sealed to this site, then mask the encoded vector (uint64)."""
        self._expect(SHARED, "mask")
        assert self._keys is not None
        config, keys = self.config, self._keys
        encoded = config.fixed_point.encode(vector)
        if encoded.size != config.length:
            raise SecAggError(
                f"site {self.site!r}: vector has {encoded.size} values, the round expects {config.length}"
            )
        held = dict(self._held)
        c_private = keys.c_private
        for sender in sorted(sealed):
            if sender == self.site or sender not in self._peers:
                raise SecAggError(f"site {sender!r}: sent shares but did not advertise keys this site verified")
            key = _share_key(config, c_private, self._peers[sender].c_pk, sender, self.site, sender)
            plaintext = shares.unseal(key, sealed[sender], _shares_ad(config, sender, self.site), sender)
            if len(plaintext) != _HELD_BYTES:
                raise SecAggError(f"site {sender!r}: sealed shares of {len(plaintext)} bytes, expected {_HELD_BYTES}")
            held[sender] = plaintext
        group = tuple(sorted(held))
        if len(group) < config.threshold:
            raise _too_few(config, len(group), "shared keys")
        masked = encoded + self_mask(config, self.site, self._seed)
        s_private = keys.s_private
        for peer in group:
            if peer != self.site:
                masked += pairwise_mask(config, self.site, peer, s_private, self._peers[peer].s_pk, peer)
        # The secrets live on only as shares: nothing here can mask a second vector.
        self._keys, self._seed = None, b""
        self._held, self._masked_with, self._stage = held, group, MASKED
        return masked

    def unmask(self, survivors: Sequence[str], dropped: Sequence[str]) -> dict[str, bytes]:
        """Stage 4: this site's share of b_j for each survivor j and of s_sk_j for each dropped j."""
        self._expect(MASKED, "unmask")
        alive, gone = set(survivors), set(dropped)
        both = alive & gone
        if both:
            raise SecAggError(
                f"site {self.site!r}: refusing to reveal shares: {sorted(both)} named both survivor and dropped"
            )
        if self.site not in alive:
            raise SecAggError(
                f"site {self.site!r}: refusing to reveal shares: the request does not list it as a survivor"
            )
        if alive | gone != set(self._masked_with):
            raise SecAggError(
                f"site {self.site!r}: refusing to reveal shares: survivors and dropped {sorted(alive | gone)} "
                f"are not the sites it masked with {list(self._masked_with)}"
            )
        if len(alive) < self.config.threshold:
            raise _too_few(self.config, len(alive), "survived")
        reveal = {owner: self._held[owner][: shares.SHARE_BYTES] for owner in sorted(alive)}
        reveal.update({owner: self._held[owner][shares.SHARE_BYTES :] for owner in sorted(gone)})
        self._held, self._stage = {}, REVEALED
        return reveal

    def to_state(self) -> dict[str, StateValue]:
        """A flat dict of bytes/str/int (a Flower ConfigRecord holds it); secrets included, so keep it local."""
        peers, held = sorted(self._peers), sorted(self._held)
        return {
            "config": self.config.to_json(),
            "site": self.site,
            "stage": self._stage,
            "c_sk": self._keys.c_sk if self._keys else b"",
            "s_sk": self._keys.s_sk if self._keys else b"",
            "seed": self._seed,
            "peers": json.dumps(peers),
            "peer_keys": b"".join(self._peers[p].c_pk + self._peers[p].s_pk for p in peers),
            "held": json.dumps(held),
            "held_shares": b"".join(self._held[p] for p in held),
            "masked_with": json.dumps(list(self._masked_with)),
        }

    @classmethod
    def from_state(
        cls, state: Mapping[str, StateValue], identity: Ed25519PrivateKey, pinned: Mapping[str, str]
    ) -> SiteSession:
        """The session `to_state` saved; identity and pinned keys come from the site, never from the state."""
        try:
            session = cls(SecAggConfig.from_json(str(state["config"])), str(state["site"]), identity, pinned)
            stage = int(state["stage"])
            c_sk, s_sk, seed = _bytes(state["c_sk"]), _bytes(state["s_sk"]), _bytes(state["seed"])
            peers, held = json.loads(str(state["peers"])), json.loads(str(state["held"]))
            peer_keys, held_shares = _bytes(state["peer_keys"]), _bytes(state["held_shares"])
            masked_with = tuple(json.loads(str(state["masked_with"])))
        except (KeyError, TypeError, ValueError) as error:
            raise SecAggError(f"secure-aggregation session state is incomplete or corrupt ({error})") from None
        if (
            stage not in range(len(_STAGE_NAMES))
            or len(peer_keys) != 2 * KEY_BYTES * len(peers)
            or len(held_shares) != _HELD_BYTES * len(held)
            or (len(c_sk), len(s_sk)) not in {(0, 0), (KEY_BYTES, KEY_BYTES)}
        ):
            raise SecAggError(f"site {session.site!r}: secure-aggregation session state is corrupt")
        session._stage = stage
        session._keys = EphemeralKeys(c_sk, s_sk) if c_sk else None
        session._seed = seed
        step = 2 * KEY_BYTES
        session._peers = {
            p: PeerKeys(peer_keys[i * step : i * step + KEY_BYTES], peer_keys[i * step + KEY_BYTES : (i + 1) * step])
            for i, p in enumerate(peers)
        }
        session._held = {p: held_shares[i * _HELD_BYTES : (i + 1) * _HELD_BYTES] for i, p in enumerate(held)}
        session._masked_with = masked_with
        return session


class AggregatorSession:
    """The aggregator's side of one round: it routes, sums masked vectors and learns only the sum."""

    def __init__(self, config: SecAggConfig):
        self.config = config
        self._advertisements: dict[str, dict[str, bytes]] = {}
        self._group: tuple[str, ...] = ()
        self._survivors: tuple[str, ...] = ()
        self._dropped: tuple[str, ...] = ()
        self._total: np.ndarray | None = None

    def _members(self, sites, allowed, what: str) -> list[str]:
        strangers = sorted(set(sites) - set(allowed))
        if strangers:
            raise SecAggError(f"site(s) {strangers}: sent {what} but are not part of this stage of the round")
        return sorted(sites)

    def collect_advertisements(self, advertisements: Mapping[str, Mapping[str, bytes]]) -> dict[str, dict[str, bytes]]:
        """Stage 1 -> 2: what to forward to every site that advertised (the sites check it, not us)."""
        sites = self._members(advertisements, self.config.sites, "keys")
        if len(sites) < self.config.threshold:
            raise _too_few(self.config, len(sites), "advertised keys")
        self._advertisements = {site: dict(advertisements[site]) for site in sites}
        return dict(self._advertisements)

    def collect_shares(self, sealed: Mapping[str, Mapping[str, bytes]]) -> dict[str, dict[str, bytes]]:
        """Stage 2 -> 3: recipient -> {sender: ciphertext}, for every site that sent its shares."""
        group = self._members(sealed, self._advertisements, "shares")
        if len(group) < self.config.threshold:
            raise _too_few(self.config, len(group), "shared keys")
        routed: dict[str, dict[str, bytes]] = {recipient: {} for recipient in group}
        for sender in group:
            for recipient in group:
                if recipient == sender:
                    continue
                if recipient not in sealed[sender]:
                    raise SecAggError(f"site {sender!r}: sent no shares for {recipient!r}")
                routed[recipient][sender] = sealed[sender][recipient]
        self._group = tuple(group)
        return routed

    def collect_masked(self, masked: Mapping[str, np.ndarray]) -> tuple[list[str], list[str]]:
        """Stage 3 -> 4: sum the masked vectors; returns (survivors, dropped) to send to the survivors."""
        survivors = self._members(masked, self._group, "a masked vector")
        total = np.zeros(self.config.length, dtype=np.uint64)
        for site in survivors:
            vector = np.asarray(masked[site])
            if vector.dtype != np.uint64 or vector.shape != (self.config.length,):
                raise SecAggError(f"site {site!r}: masked vector must be {self.config.length} uint64 values")
            total += vector  # wraps modulo 2^64, as the masks need
        if len(survivors) < self.config.threshold:
            raise _too_few(self.config, len(survivors), "sent a masked vector")
        dropped = sorted(set(self._group) - set(survivors))
        self._total, self._survivors, self._dropped = total, tuple(survivors), tuple(dropped)
        return list(survivors), dropped

    def collect_unmask(self, responses: Mapping[str, Mapping[str, bytes]]) -> np.ndarray:
        """Stage 4 -> result: rebuild the survivors' b and the dropped sites' s_sk, return the decoded sum."""
        if self._total is None:
            raise SecAggError(f"round {self.config.round}: unmask answers arrived before the masked vectors")
        config = self.config
        responders = self._members(responses, self._survivors, "unmask shares")
        if len(responders) < config.threshold:
            raise _too_few(config, len(responders), "answered the unmask request")
        chosen = responders[: config.threshold]

        def rebuild(owner: str) -> bytes:
            held = {}
            for responder in chosen:
                share = responses[responder].get(owner)
                if share is None:
                    raise SecAggError(f"site {responder!r}: its unmask answer lacks the share for {owner!r}")
                held[config.index(responder)] = bytes(share)
            return shares.combine(held, config.threshold, owner)

        total = self._total.copy()
        for owner in self._survivors:
            total -= self_mask(config, owner, rebuild(owner))
        for owner in self._dropped:
            private = X25519PrivateKey.from_private_bytes(rebuild(owner))
            if private.public_key().public_bytes_raw() != self._advertisements[owner]["s_pk"]:
                raise SecAggError(
                    f"site {owner!r}: its rebuilt mask key does not match its advertisement; a share was wrong"
                )
            for survivor in self._survivors:
                s_pk = self._advertisements[survivor]["s_pk"]
                total -= pairwise_mask(config, survivor, owner, private, s_pk, survivor)
        self._total = None  # one answer per round
        return config.fixed_point.decode_sum(total, len(self._survivors))

    @property
    def survivors(self) -> tuple[str, ...]:
        return self._survivors

    @property
    def dropped(self) -> tuple[str, ...]:
        return self._dropped


def _bytes(value: StateValue) -> bytes:
    if not isinstance(value, bytes):  # bytes(3) would be three zero bytes, not an error
        raise TypeError(f"expected bytes, found {type(value).__name__}")
    return value
