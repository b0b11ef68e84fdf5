"""Errors of the secure-aggregation protocol; each message names the site or coordinate at fault."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedpriv.common.errors import FedprivError

if TYPE_CHECKING:
    from fedpriv.common.wire.secagg.config import SecAggConfig


class SecAggError(FedprivError):
    """A protocol step was refused: a bad signature, an unpinned key, a request that would reveal too much."""


class RoundAbandoned(SecAggError):
    """Too few sites remain for the threshold: the round ends and nothing is released."""


class EncodingOverflowError(SecAggError, OverflowError):
    """A value (or the unmasked sum) lies outside what the fixed-point ring carries without wrapping."""


def too_few(config: SecAggConfig, count: int, what: str) -> RoundAbandoned:
    return RoundAbandoned(
        f"round {config.round}: {count} of {len(config.sites)} sites {what}, below the threshold "
        f"{config.threshold}; the round is abandoned and nothing is released"
    )
