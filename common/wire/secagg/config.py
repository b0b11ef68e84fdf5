"""What the sites agree on before any key is made, and the threshold rule.

A configuration names the run, the cohort (whose order fixes each site's share
index), the threshold, the collusion bound t, the vector length and the
encoding, plus two numbers: `epoch`, the round whose key agreement made the
keys, and `round`, the round being masked. The keys are agreed once per epoch
(`keys`, the configuration with round = epoch, is what advertisements sign)
and every later round of the epoch is `for_round(r)`: everything a round
derives is bound to (run, epoch, round) by `context`.

Threshold rule. Let n be the cohort, k the threshold and t the number of sites
that may collude with the aggregator or drop out (`privacy.max-colluding-sites`).

- Secrecy: each round a site's fresh self-mask seed b is Shamir-shared with
  threshold k; the aggregator plus t colluders hold at most t shares of it, so
  `k > t` keeps b hidden. A pair's mask key of a round is revealed only by a
  member of the pair told, that round, that the other dropped; it is derived
  for that round alone, so it says nothing about another round.
- A lying aggregator: to unmask one honest site i it needs b_i (k shares, from
  sites told i survived, i's own share included) and every pair key of i (each
  from i or its peer, told the other dropped). An honest site answers one
  unmask request per round, names nobody both survivor and dropped and names
  at most n - k dropped; so i's own share, t colluders and at most n - k peers
  that i names dropped (their pair keys come from i) must reach k:
  `2k > n + t + 1` makes that impossible. Enforced here: `k > t` and `k > n / 2`
  (no two disjoint majorities, the guarantee when the aggregator colludes with
  nobody); `SecAggConfig.actively_secure` says whether `2k > n + t + 1` holds too.
- Liveness: the round survives up to `n - k` dropouts; below the threshold it
  is abandoned and nothing is released. When some site dropped, every survivor
  must answer the unmask request (only it can remove its masks with them).

The default `k = n - t` is also what distributed DP needs: the sum then
carries the noise shares of at least n - t sites. Full security against a
malicious aggregator colluding with t sites holds when `n - t > (n + t + 1) / 2`,
i.e. n > 3t + 1 (n = 10, t = 1: threshold 9 tolerates one dropout).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import asdict, dataclass

from fedpriv.common.wire.secagg.encoding import RING_LIMIT, FixedPoint
from fedpriv.common.wire.secagg.errors import SecAggError


def default_threshold(sites: int, max_colluding: int) -> int:
    """Shares needed to unmask: tolerate `max_colluding` dropouts where the cohort allows it, but always more
    than the colluders and more than half the cohort (else two disjoint halves could each unmask)."""
    return min(sites, max(sites - max_colluding, max_colluding + 1, sites // 2 + 1))


@dataclass(frozen=True)
class SecAggConfig:
    run_id: str
    round: int
    sites: tuple[str, ...]  # the cohort, in the order that fixes each site's share index
    threshold: int
    max_colluding: int
    length: int  # coordinates of the vector every site contributes
    scale: float
    bound: int  # largest |round(value * scale)| a site may contribute
    epoch: int = 0  # the round whose key agreement these keys come from (0: this round's)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", tuple(self.sites))
        if self.epoch == 0:
            object.__setattr__(self, "epoch", self.round)
        if not 1 <= self.epoch <= self.round:
            raise SecAggError(f"round {self.round} cannot use keys agreed in round {self.epoch}")
        n, t, k = len(self.sites), self.max_colluding, self.threshold
        if len(set(self.sites)) != n or n < 2:
            raise SecAggError(f"secure aggregation needs at least 2 distinct sites, got {list(self.sites)}")
        if not 0 <= t < n:
            raise SecAggError(f"max-colluding-sites = {t} must lie in [0, {n - 1}] for {n} sites")
        if not (k <= n and k > t and 2 * k > n):
            raise SecAggError(
                f"threshold {k} for {n} sites with max-colluding-sites {t}: needs threshold <= sites, "
                f"threshold > max-colluding-sites and threshold > sites / 2"
            )
        if self.length < 1:
            raise SecAggError(f"vector length {self.length} must be positive")
        if not (math.isfinite(self.scale) and self.scale > 0) or self.bound < 1:
            raise SecAggError(f"fixed point needs scale > 0 and bound >= 1, got scale {self.scale}, bound {self.bound}")
        if self.bound * n > RING_LIMIT:
            raise SecAggError(
                f"bound {self.bound} x {n} sites exceeds the ring's signed range 2^63 - 1; "
                f"lower the bound to at most {RING_LIMIT // n}"
            )

    @property
    def fixed_point(self) -> FixedPoint:
        return FixedPoint(self.scale, self.bound)

    @property
    def actively_secure(self) -> bool:
        """Whether a lying aggregator colluding with t sites still cannot unmask one site (2k > n + t + 1)."""
        return 2 * self.threshold > len(self.sites) + self.max_colluding + 1

    @property
    def keys(self) -> SecAggConfig:
        """The configuration the keys were agreed under (its round is the epoch): what advertisements sign."""
        return dataclasses.replace(self, round=self.epoch)

    def for_round(self, server_round: int) -> SecAggConfig:
        """The same keys, cohort and encoding, for a later round."""
        return dataclasses.replace(self, round=server_round)

    def index(self, site: str) -> int:
        """The site's Shamir share index (1-based; 0 is the secret itself)."""
        return self.sites.index(site) + 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SecAggConfig:
        return cls(**json.loads(text))

    def digest(self) -> bytes:
        """Bound into every signed advertisement (of `keys`), so all sites provably agree on the same cohort."""
        return hashlib.sha256(b"fedpriv-secagg-config\0" + self.to_json().encode()).digest()

    def context(self, *parts: str) -> bytes:
        """Unambiguous bytes naming a purpose in this round of these keys (HKDF info, AEAD associated data)."""
        fields = ["fedpriv-secagg", self.run_id, self.epoch, self.round, *parts]
        return json.dumps(fields, separators=(",", ":")).encode()
