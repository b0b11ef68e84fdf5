"""The noise a simulated site really adds: the planned one, unless an empirical audit broke the run on purpose.

`fedpriv audit --empirical --fault noise/N` sets FEDPRIV_AUDIT_FAULT for its own
simulation; the site then adds its noise divided by N while its ledger claims
the planned noise, to show that the audit catches a run whose claim is false.
A deployed site never reads it.
"""

from __future__ import annotations

import logging

from fedpriv.common.environment import audit_fault_noise_divisor

log = logging.getLogger(__name__)


def noise_actually_added(noise_multiplier: float, site_name: str, simulated: bool) -> float:
    divisor = audit_fault_noise_divisor()
    if divisor == 1.0 or not simulated:
        return noise_multiplier
    log.warning("%s: AUDIT FAULT: noise multiplier / %g; the ledger claims the planned one", site_name, divisor)
    return noise_multiplier / divisor
