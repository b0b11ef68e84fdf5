"""A site's side of secure aggregation: keys agreed once per epoch, then two steps per round.

    step                  when                          the site gets               it answers
    advertise             key agreement (an epoch)      the epoch's config          signed X25519 public keys
    accept_peers          first round of the epoch      every advertisement         (checks them, keeps them)
    mask                  every round                   its vector                  y = encode(x) + PRG(b) + sum of
                                                                                    +-pair masks, and b's shares
                                                                                    sealed to each peer
    unmask                every round                   survivors U, dropped D,     its shares of b_j (j in U) and
                                                        the b shares sealed to it   its pair keys with j in D

b is fresh every round, and so are the pair masks: each pair's mask key of a
round is derived from the pair's X25519 agreement and (run, epoch, round).
When a peer j dropped, the site reveals its pair key with j of that round
only, never a long-lived secret: a revealed key says nothing about another
round, so nothing is ever burnt and the epoch goes on. (Sharing the X25519
mask key s_sk once per epoch, as one-shot SecAgg does per round, would not
do: rebuilding a dropped site's s_sk would give every pair mask of every
earlier round of the epoch, whose b the aggregator had learnt when the site
survived them, and so unmask all its earlier vectors.)

What a site refuses, since the aggregator is not trusted with its vector:
peers' keys not signed by their pinned identity key (or its own keys missing
from what is forwarded), fewer than `threshold` peers, a round of other keys
or cohort, a round not after the last one it masked (one masked vector per
round: two masks of one round would give away their difference), an unmask
request for another round than the one it masked, or a second one, or one that
names a site both survivor and dropped, leaves itself out, does not account
for exactly its peers, forwards a seed share from a site it names dropped or
lacks one from a survivor. So it never reveals, for one peer in one round,
both its share of the peer's b and their pair key.

Every message is plain data (bytes, str, int, uint64 arrays) so that it can
travel in Flower messages; a `SiteSession` is rebuilt between steps (and
rounds) from the flat dict `to_state()` gives (Flower's per-node `context.state`).
Trust model and threshold rule: `config`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpriv.common.privacy import signing
from fedpriv.common.wire.secagg import shares
from fedpriv.common.wire.secagg.config import SecAggConfig
from fedpriv.common.wire.secagg.derive import pair_key, seal_ad, seal_key
from fedpriv.common.wire.secagg.errors import SecAggError, too_few
from fedpriv.common.wire.secagg.keys import KEY_BYTES, EphemeralKeys, PeerKeys, advertise, verify_advertisements
from fedpriv.common.wire.secagg.masks import pair_mask, self_mask

NEW, ADVERTISED, KEYED = range(3)
_STAGE_NAMES = ("new", "advertised", "keyed")

StateValue = bytes | str | int


class SiteSession:
    """One site's side of one epoch: its keys, its verified peers, and the round it has masked."""

    def __init__(self, config: SecAggConfig, site: str, identity: Ed25519PrivateKey, pinned: Mapping[str, str]):
        if site not in config.sites:
            raise SecAggError(f"site {site!r} is not in round {config.round}'s cohort {list(config.sites)}")
        if pinned.get(site) != signing.public_b64(identity):
            raise SecAggError(f"site {site!r}: its identity key is not the one pinned for it")
        self.config, self.site = config.keys, site
        self._identity, self._pinned = identity, dict(pinned)
        self._stage = NEW
        self._keys: EphemeralKeys | None = None
        self._peers: dict[str, PeerKeys] = {}  # the verified advertisers, itself included: whom it masks with
        self._last_round = 0  # the last round it masked under these keys
        self._pending = 0  # the masked round whose unmask request it still awaits (0: none)
        self._own_share = b""  # its own share of that round's b

    @property
    def stage(self) -> int:
        return self._stage

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(sorted(self._peers))

    def _expect(self, stage: int, step: str) -> None:
        if self._stage != stage:
            raise SecAggError(
                f"site {self.site!r}: {step} requested in stage '{_STAGE_NAMES[self._stage]}'; "
                f"keys are advertised once, then peers accepted once, then rounds masked"
            )

    def advertise(self) -> dict[str, bytes]:
        """Fresh X25519 keys for this epoch, signed with the identity key."""
        self._expect(NEW, "advertise")
        self._keys = EphemeralKeys.generate()
        self._stage = ADVERTISED
        return advertise(self.config, self.site, self._identity, self._keys)

    def accept_peers(self, advertisements: Mapping[str, Mapping[str, bytes]]) -> tuple[str, ...]:
        """Checks every forwarded advertisement against the pinned identity keys; the peers it will mask with."""
        self._expect(ADVERTISED, "accept peers")
        assert self._keys is not None
        peers = verify_advertisements(self.config, advertisements, self._pinned)
        if peers.get(self.site) != PeerKeys(self._keys.c_pk, self._keys.s_pk):
            raise SecAggError(f"site {self.site!r}: the forwarded advertisements do not carry this site's own keys")
        if len(peers) < self.config.threshold:
            raise too_few(self.config, len(peers), "advertised keys")
        self._peers, self._stage = peers, KEYED
        return self.peers

    def check_round(self, config: SecAggConfig) -> SecAggConfig:
        """The round's configuration, if this session may mask it (call before computing the vector)."""
        self._expect(KEYED, "mask")
        if config.keys != self.config:
            raise SecAggError(
                f"site {self.site!r}: round {config.round} names keys of round {config.epoch} or another cohort; "
                f"its keys are of round {self.config.epoch}"
            )
        if config.round <= self._last_round:
            raise SecAggError(
                f"site {self.site!r}: round {config.round} is not after the last round it masked "
                f"({self._last_round}); one masked vector per round"
            )
        return config

    def mask(self, config: SecAggConfig, vector: np.ndarray) -> tuple[np.ndarray, dict[str, bytes]]:
        """This round's masked vector (uint64), and its fresh b's shares sealed to each peer (peer -> ciphertext)."""
        config = self.check_round(config)
        assert self._keys is not None
        encoded = config.fixed_point.encode(vector)
        if encoded.size != config.length:
            raise SecAggError(
                f"site {self.site!r}: vector has {encoded.size} values, the round expects {config.length}"
            )
        seed = os.urandom(shares.SECRET_BYTES)
        seed_shares = shares.split(seed, config.threshold, len(config.sites))
        c_private, s_private = self._keys.c_private, self._keys.s_private
        sealed: dict[str, bytes] = {}
        masked = encoded + self_mask(config, self.site, seed)
        for peer, keys in sorted(self._peers.items()):
            if peer == self.site:
                continue
            key = seal_key(config, c_private, keys.c_pk, self.site, peer, peer)
            sealed[peer] = shares.seal(key, seed_shares[config.index(peer)], seal_ad(config, self.site, peer))
            masked += pair_mask(config, self.site, peer, pair_key(config, self.site, peer, s_private, keys.s_pk))
        # b lives on only as shares: nothing here can mask a second vector of this round.
        self._last_round, self._pending = config.round, config.round
        self._own_share = seed_shares[config.index(self.site)]
        return masked, sealed

    def unmask(
        self, config: SecAggConfig, survivors: Sequence[str], dropped: Sequence[str], sealed: Mapping[str, bytes]
    ) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """Its shares of b_j for each survivor j (opened from `sealed`, sender -> ciphertext), and its pair key of
        this round with each dropped j: (owner -> share, dropped -> key)."""
        if self._stage != KEYED or config.keys != self.config or config.round != self._pending:
            raise SecAggError(
                f"site {self.site!r}: refusing to reveal shares for round {config.round}: "
                f"it awaits no unmask request for that round of these keys"
            )
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
        if alive | gone != set(self._peers):
            raise SecAggError(
                f"site {self.site!r}: refusing to reveal shares: survivors and dropped {sorted(alive | gone)} "
                f"are not the sites it masked with {list(self.peers)}"
            )
        if len(alive) < config.threshold:
            raise too_few(config, len(alive), "survived")
        expected = alive - {self.site}
        if set(sealed) != expected:
            raise SecAggError(
                f"site {self.site!r}: refusing to reveal shares: the forwarded seed shares come from "
                f"{sorted(sealed)}, not from the other survivors {sorted(expected)}"
            )
        assert self._keys is not None
        c_private, s_private = self._keys.c_private, self._keys.s_private
        revealed = {self.site: self._own_share}
        for sender in sorted(expected):
            key = seal_key(config, c_private, self._peers[sender].c_pk, sender, self.site, sender)
            share = shares.unseal(key, sealed[sender], seal_ad(config, sender, self.site), sender)
            if len(share) != shares.SHARE_BYTES:
                raise SecAggError(f"site {sender!r}: a sealed seed share of {len(share)} bytes")
            revealed[sender] = share
        keys = {peer: pair_key(config, self.site, peer, s_private, self._peers[peer].s_pk) for peer in sorted(gone)}
        self._pending, self._own_share = 0, b""  # one answer per round
        return revealed, keys

    def to_state(self) -> dict[str, StateValue]:
        """A flat dict of bytes/str/int (a Flower ConfigRecord holds it); secrets included, so keep it local."""
        peers = sorted(self._peers)
        return {
            "config": self.config.to_json(),
            "site": self.site,
            "stage": self._stage,
            "c_sk": self._keys.c_sk if self._keys else b"",
            "s_sk": self._keys.s_sk if self._keys else b"",
            "peers": json.dumps(peers),
            "peer_keys": b"".join(self._peers[p].c_pk + self._peers[p].s_pk for p in peers),
            "last_round": self._last_round,
            "pending": self._pending,
            "own_share": self._own_share,
        }

    @classmethod
    def from_state(
        cls, state: Mapping[str, StateValue], identity: Ed25519PrivateKey, pinned: Mapping[str, str]
    ) -> SiteSession:
        """The session `to_state` saved; identity and pinned keys come from the site, never from the state."""
        try:
            session = cls(SecAggConfig.from_json(str(state["config"])), str(state["site"]), identity, pinned)
            stage, last_round, pending = int(state["stage"]), int(state["last_round"]), int(state["pending"])
            c_sk, s_sk, own_share = _bytes(state["c_sk"]), _bytes(state["s_sk"]), _bytes(state["own_share"])
            peers, peer_keys = json.loads(str(state["peers"])), _bytes(state["peer_keys"])
        except (KeyError, TypeError, ValueError) as error:
            raise SecAggError(f"secure-aggregation session state is incomplete or corrupt ({error})") from None
        if (
            stage not in range(len(_STAGE_NAMES))
            or len(peer_keys) != 2 * KEY_BYTES * len(peers)
            or (len(c_sk), len(s_sk)) not in {(0, 0), (KEY_BYTES, KEY_BYTES)}
            or (stage != NEW) != bool(c_sk)
            or (stage == KEYED) != bool(peers)
            or len(own_share) not in (0, shares.SHARE_BYTES)
            or (pending != 0) != bool(own_share)
        ):
            raise SecAggError(f"site {session.site!r}: secure-aggregation session state is corrupt")
        session._stage, session._last_round, session._pending = stage, last_round, pending
        session._keys = EphemeralKeys(c_sk, s_sk) if c_sk else None
        session._own_share = own_share
        step = 2 * KEY_BYTES
        session._peers = {
            p: PeerKeys(peer_keys[i * step : i * step + KEY_BYTES], peer_keys[i * step + KEY_BYTES : (i + 1) * step])
            for i, p in enumerate(peers)
        }
        return session


def _bytes(value: StateValue) -> bytes:
    if not isinstance(value, bytes):  # bytes(3) would be three zero bytes, not an error
        raise TypeError(f"expected bytes, found {type(value).__name__}")
    return value
