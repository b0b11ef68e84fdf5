"""What a simulated site really does: the plan, unless an empirical audit broke the run on purpose.

`fedpriv audit --empirical --fault ...` has the simulation harness set
`audit-fault` in its virtual nodes' node config (`node_config.audit_fault`):
`noise/N` makes every site add its noise divided by N; `skip-clipping` and
`skip-noise` make the canary site skip clipping or add no noise. Its ledger
records the planned release all the same: the point is to show that the audit
catches a run whose claim is false. A node not declared simulated never reads
the key (`SiteRuntime.fault` stays empty).
"""

from __future__ import annotations

import dataclasses
import logging

from fedpriv.client.training import DpSettings
from fedpriv.common.node_config import AuditFault

log = logging.getLogger(__name__)

# Per-example gradients are "clipped" to this: never, in practice.
UNCLIPPED = 1e9


def noise_actually_added(noise_multiplier: float, site_name: str, fault: AuditFault) -> float:
    if fault.skip_noise:
        log.warning("%s: AUDIT FAULT: no noise added; the ledger claims the planned noise", site_name)
        return 0.0
    if fault.noise_divisor == 1.0:
        return noise_multiplier
    log.warning(
        "%s: AUDIT FAULT: noise multiplier / %g; the ledger claims the planned one", site_name, fault.noise_divisor
    )
    return noise_multiplier / fault.noise_divisor


def clip_norm_used(max_grad_norm: float, site_name: str, fault: AuditFault) -> float:
    if not fault.skip_clipping:
        return max_grad_norm
    log.warning("%s: AUDIT FAULT: gradients not clipped; the ledger claims clipping at %g", site_name, max_grad_norm)
    return UNCLIPPED


def dp_actually_used(dp: DpSettings | None, site_name: str, fault: AuditFault) -> DpSettings | None:
    """The DP-SGD settings a site's local training runs with (Opacus adds noise multiplier x clip norm)."""
    if dp is None:
        return dp
    noise_std = noise_actually_added(dp.noise_multiplier, site_name, fault) * dp.max_grad_norm
    clip = clip_norm_used(dp.max_grad_norm, site_name, fault)
    if noise_std == dp.noise_multiplier * dp.max_grad_norm and clip == dp.max_grad_norm:
        return dp
    return dataclasses.replace(dp, noise_multiplier=noise_std / clip, max_grad_norm=clip)
