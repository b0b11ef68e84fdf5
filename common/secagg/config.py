"""What the sites of one round agree on before any key is made.

Threshold rule. Let n be the cohort and t the number of sites that may collude
with the aggregator or drop out (`privacy.max-colluding-sites`).

- Secrecy: a site's self-mask seed b and its pairwise-mask key s_sk are each
  Shamir-shared with `threshold`; the aggregator plus t colluders hold at most
  t shares of anything, so `threshold > t` keeps every secret of an honest site
  hidden from them.
- No site's two secrets are both revealed: an honest site answers one unmask
  request per round and never names one site both survivor and dropped, so an
  aggregator that tells different sites different stories needs two disjoint
  groups of at least `threshold - t` honest answers; `2 * threshold > n + t`
  makes that impossible. Enforced here: `threshold > t` and `threshold > n / 2`
  (the latter is that guarantee when the aggregator colludes with nobody);
  `SecAggConfig.actively_secure` says whether `2 * threshold > n + t` holds too.
- Liveness: the round survives up to `n - threshold` dropouts; below the
  threshold it is abandoned and nothing is released.

The default `threshold = n - t` is also what distributed DP needs: the sum then
carries the noise shares of at least n - t sites. Full security against a
malicious aggregator colluding with t sites holds when `n - t > (n + t) / 2`,
i.e. n > 3t (n = 10, t = 1: threshold 9 tolerates one dropout).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

from fedpriv.common.secagg.encoding import RING_LIMIT, FixedPoint
from fedpriv.common.secagg.errors import SecAggError


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", tuple(self.sites))
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
        """Whether a lying aggregator colluding with t sites still cannot unmask one site (2k > n + t)."""
        return 2 * self.threshold > len(self.sites) + self.max_colluding

    def index(self, site: str) -> int:
        """The site's Shamir share index (1-based; 0 is the secret itself)."""
        return self.sites.index(site) + 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SecAggConfig:
        return cls(**json.loads(text))

    def digest(self) -> bytes:
        """Bound into every signed advertisement, so all sites provably run the same round."""
        return hashlib.sha256(b"fedpriv-secagg-config\0" + self.to_json().encode()).digest()

    def context(self, *parts: str) -> bytes:
        """Unambiguous bytes naming a purpose in this round (HKDF info, AEAD associated data)."""
        return json.dumps(["fedpriv-secagg", self.run_id, self.round, *parts], separators=(",", ":")).encode()
