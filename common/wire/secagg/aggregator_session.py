"""The aggregator's side of secure aggregation: it routes, sums masked vectors and learns only the sum.

One `AggregatorSession` lives for an epoch (one key agreement): it forwards
the advertisements once, then sums round after round. Each round it learns
the survivors' b (from threshold shares) and, for each dropped site, the
survivors' pair keys with it of that round (from every survivor), and
removes both from the sum of the masked vectors. Stages and refusals of the
sites: `site_session`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedpriv.common.wire.secagg import shares
from fedpriv.common.wire.secagg.config import SecAggConfig
from fedpriv.common.wire.secagg.errors import RoundAbandoned, SecAggError, too_few
from fedpriv.common.wire.secagg.masks import pair_mask, self_mask


@dataclass
class _Round:
    config: SecAggConfig
    total: np.ndarray
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


class AggregatorSession:
    """One epoch at the aggregator."""

    def __init__(self, config: SecAggConfig):
        self.config = config.keys
        self._advertisements: dict[str, dict[str, bytes]] = {}
        self._last_round = 0
        self._round: _Round | None = None

    def _members(self, sites: Iterable[str], allowed: Iterable[str], what: str) -> list[str]:
        strangers = sorted(set(sites) - set(allowed))
        if strangers:
            raise SecAggError(f"site(s) {strangers}: sent {what} but are not part of this stage of the round")
        return sorted(sites)

    @property
    def group(self) -> tuple[str, ...]:
        """The sites whose keys were forwarded: every round of the epoch masks with exactly these."""
        return tuple(sorted(self._advertisements))

    def collect_advertisements(self, advertisements: Mapping[str, Mapping[str, bytes]]) -> dict[str, dict[str, bytes]]:
        """Key agreement: what to forward to every site that advertised (the sites check it, not us)."""
        sites = self._members(advertisements, self.config.sites, "keys")
        if len(sites) < self.config.threshold:
            raise too_few(self.config, len(sites), "advertised keys")
        self._advertisements = {site: dict(advertisements[site]) for site in sites}
        return dict(self._advertisements)

    def collect_masked(
        self, config: SecAggConfig, masked: Mapping[str, np.ndarray], sealed: Mapping[str, Mapping[str, bytes]]
    ) -> tuple[list[str], list[str], dict[str, dict[str, bytes]]]:
        """Sums a round's masked vectors: (survivors, dropped, survivor -> {sender: its sealed seed share})."""
        if config.keys != self.config or config.round <= self._last_round:
            raise SecAggError(f"round {config.round}: not a new round of the keys agreed in round {self.config.epoch}")
        survivors = self._members(masked, self.group, "a masked vector")
        total = np.zeros(config.length, dtype=np.uint64)
        for site in survivors:
            vector = np.asarray(masked[site])
            if vector.dtype != np.uint64 or vector.shape != (config.length,):
                raise SecAggError(f"site {site!r}: masked vector must be {config.length} uint64 values")
            total += vector  # wraps modulo 2^64, as the masks need
        if len(survivors) < config.threshold:
            raise too_few(config, len(survivors), "sent a masked vector")
        routed: dict[str, dict[str, bytes]] = {recipient: {} for recipient in survivors}
        for sender in survivors:
            missing = sorted(set(self.group) - {sender} - set(sealed.get(sender, {})))
            if missing:
                raise SecAggError(f"site {sender!r}: sent no seed share for {missing}")
            for recipient in survivors:
                if recipient != sender:
                    routed[recipient][sender] = bytes(sealed[sender][recipient])
        dropped = sorted(set(self.group) - set(survivors))
        self._last_round = config.round
        self._round = _Round(config, total, tuple(survivors), tuple(dropped))
        return list(survivors), dropped, routed

    def collect_unmask(
        self, seed_shares: Mapping[str, Mapping[str, bytes]], pair_keys: Mapping[str, Mapping[str, bytes]]
    ) -> np.ndarray:
        """Rebuilds the survivors' b, removes the masks of the dropped, returns the decoded sum.

        `seed_shares`: responder -> {survivor: share}; `pair_keys`: responder -> {dropped: key}.
        """
        current = self._round
        if current is None:
            raise SecAggError(f"round {self._last_round}: unmask answers arrived before the masked vectors")
        config = current.config
        responders = self._members(seed_shares, current.survivors, "unmask shares")
        if len(responders) < config.threshold:
            raise too_few(config, len(responders), "answered the unmask request")
        silent = sorted(set(current.survivors) - set(responders))
        if current.dropped and silent:
            raise RoundAbandoned(
                f"round {config.round}: {silent} sent a masked vector but no pair keys with the dropped "
                f"{list(current.dropped)}; their masks cannot be removed and the round is abandoned"
            )
        chosen = responders[: config.threshold]

        def rebuild(owner: str) -> bytes:
            held = {}
            for responder in chosen:
                share = seed_shares[responder].get(owner)
                if share is None:
                    raise SecAggError(f"site {responder!r}: its unmask answer lacks the share for {owner!r}")
                held[config.index(responder)] = bytes(share)
            return shares.combine(held, config.threshold, owner)

        total = current.total.copy()
        for owner in current.survivors:
            total -= self_mask(config, owner, rebuild(owner))
        for gone in current.dropped:
            for survivor in current.survivors:
                key = pair_keys.get(survivor, {}).get(gone)
                if key is None or len(key) != shares.SECRET_BYTES:
                    raise SecAggError(f"site {survivor!r}: its unmask answer lacks its pair key with {gone!r}")
                total -= pair_mask(config, survivor, gone, bytes(key))
        self._round = None  # one answer per round
        return config.fixed_point.decode_sum(total, len(current.survivors))
