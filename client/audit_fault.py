"""The noise a simulated site really adds: the planned one, unless an empirical audit broke the run on purpose.

`fedpriv audit --empirical --fault noise/N` has the simulation harness set
`audit-fault` in its virtual nodes' node config; such a site then adds its
noise divided by N while its ledger claims the planned noise, to show that the
audit catches a run whose claim is false. A node not declared simulated never
reads it (`SiteRuntime.noise_divisor` stays 1).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def noise_actually_added(noise_multiplier: float, site_name: str, divisor: float) -> float:
    if divisor == 1.0:
        return noise_multiplier
    log.warning("%s: AUDIT FAULT: noise multiplier / %g; the ledger claims the planned one", site_name, divisor)
    return noise_multiplier / divisor
