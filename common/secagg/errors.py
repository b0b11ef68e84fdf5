"""Errors of the secure-aggregation protocol; each message names the site or coordinate at fault."""

from __future__ import annotations

from fedpriv.common.errors import FedprivError


class SecAggError(FedprivError):
    """A protocol step was refused: a bad signature, an unpinned key, a request that would reveal too much."""


class RoundAbandoned(SecAggError):
    """Too few sites remain for the threshold: the round ends and nothing is released."""


class EncodingOverflowError(SecAggError, OverflowError):
    """A value (or the unmasked sum) lies outside what the fixed-point ring carries without wrapping."""
