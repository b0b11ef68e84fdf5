"""Site-level (central) DP: the aggregator clips and noises each site's contribution.

Flower's message-API wrapper does the clipping, the noise and the RDP
accounting; fedpriv adds the record of every release to the aggregator's
ledger, replayed into the accountant when a run resumes, so the ledger stays
the one source of truth.
"""

from __future__ import annotations

from importlib.metadata import version

from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy

from fedpriv.common import flower_compat
from fedpriv.common.config import ConfigError, FedprivConfig
from fedpriv.common.privacy.accounting import RDP_ORDERS
from fedpriv.common.privacy.records import Accounting, Mechanism, PrivacyRecord, now

DATA_ID = "site-contributions"  # the protected unit is one site's whole update
SITE = "federation"


def wrap(strategy: Strategy, config: FedprivConfig) -> Strategy:
    p, s = config.privacy, config.strategy
    if not isinstance(strategy, FedAvg) or type(strategy).aggregate_train is not FedAvg.aggregate_train:
        raise ConfigError("privacy.site-level-noise: site-level DP works with strategy.name fedavg or fedprox")
    if s.fraction_train != 1.0:
        raise ConfigError("privacy.site-level-noise: needs a fixed cohort, strategy.fraction-train = 1")
    accountant = flower_compat.rdp_accountant(
        delta=p.delta, population=s.min_sites, max_epsilon=p.site_level_cap or None, orders=RDP_ORDERS
    )
    return DifferentialPrivacyServerSideFixedClipping(
        strategy,
        noise_multiplier=p.site_level_noise,
        clipping_norm=p.site_level_clip,
        num_sampled_clients=s.min_sites,
        accountant=accountant,
    )


def replay(strategy: Strategy, releases: int, config: FedprivConfig) -> None:
    """Composes the releases a resumed run already made into a fresh accountant."""
    accountant = getattr(strategy, "accountant", None)
    if accountant is not None and releases:
        n = config.strategy.min_sites
        flower_compat.compose_gaussian(accountant, config.privacy.site_level_noise, n, releases)


def release_record(
    strategy: Strategy, config: FedprivConfig, run_id: str, server_round: int, update_sha256: str
) -> PrivacyRecord:
    spent = strategy.privacy_spent()  # type: ignore[attr-defined]  # the wrapper `wrap` returned
    p = config.privacy
    return PrivacyRecord(
        run_id=run_id,
        round=server_round,
        party="aggregator",
        site=SITE,
        data_id=DATA_ID,
        mechanism=Mechanism(
            kind="gaussian",  # no amplification by sampling is claimed
            noise_multiplier=p.site_level_noise,
            sample_rate=1.0,
            steps=1,
            max_grad_norm=p.site_level_clip,
            dataset_size=config.strategy.min_sites,
        ),
        accounting=Accounting(
            accountant="rdp",
            library="flwr",
            library_version=version("flwr"),
            delta=spent.delta,
            epsilon=spent.epsilon,
            epsilon_cap=p.site_level_cap or None,
        ),
        update_sha256=update_sha256,
        created=now(),
    )
