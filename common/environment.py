"""Process settings for the programs fedpriv runs (the CLI, simulations, benchmarks).

Applied by an explicit call, never on import: a library that changes the
environment of whoever imports it surprises its users. Each value is only a
default; an operator's own setting wins.
"""

from __future__ import annotations

import os

# fedpriv talks to nothing but its own federation: no usage telemetry from
# Flower or Ray, and no hub look-ups (models load from local paths only).
QUIET = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def apply_quiet_defaults(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Sets the defaults above where unset (in `environ`, or this process); returns it."""
    target = os.environ if environ is None else environ
    for key, value in QUIET.items():
        target.setdefault(key, value)
    return target  # type: ignore[return-value]
