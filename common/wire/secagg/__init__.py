"""Secure aggregation in the SecAgg+ style (Bonawitz et al. 2017; Bell et al. 2020), free of Flower.

The aggregator learns the sum of the sites' vectors and nothing else about
any one of them, as long as no more than `max_colluding` sites side with it;
sites drop out and the round survives while `threshold` remain. Keys are
agreed once per epoch (run, or until the cohort changes), then each round is
two steps. A site's steps and refusals: `site_session`; the aggregator's:
`aggregator_session`; threshold rule and trust model: `config`; key
derivation: `derive`; encoding: `encoding`.
"""

from fedpriv.common.wire.secagg.aggregator_session import AggregatorSession
from fedpriv.common.wire.secagg.config import SecAggConfig, default_threshold
from fedpriv.common.wire.secagg.encoding import FixedPoint
from fedpriv.common.wire.secagg.errors import EncodingOverflowError, RoundAbandoned, SecAggError
from fedpriv.common.wire.secagg.site_session import SiteSession

__all__ = [
    "AggregatorSession",
    "EncodingOverflowError",
    "FixedPoint",
    "RoundAbandoned",
    "SecAggConfig",
    "SecAggError",
    "SiteSession",
    "default_threshold",
]
