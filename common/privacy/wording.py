"""What a run's settings decide about privacy, in sentences a person reads.

The simulation prints them when it starts and the dashboard shows them; both
say the same thing because both take it from here. A deployed run's settings
are the aggregator's proposal: each site's own policy and budget decide what
it releases, so the sentences say so.
"""

from __future__ import annotations

from fedpriv.common.config import FedprivConfig


def privacy_in_words(config: FedprivConfig, deployed: bool = False) -> list[str]:
    privacy = config.privacy
    said: list[str] = []
    if not privacy.enabled:
        said.append("DP is off: a non-private baseline; no privacy guarantee.")
    else:
        target = (
            f"noise multiplier {privacy.noise_multiplier:g}"
            if privacy.noise_multiplier
            else f"target epsilon {privacy.target_epsilon:g} per site"
        )
        said.append(
            f"DP-SGD at every site: {target}, delta {privacy.delta:g}, clip {privacy.max_grad_norm:g} "
            f"({privacy.accountant} accountant); a site stops at its epsilon cap ({privacy.cap():g} unless its own is set)."
        )
        if privacy.noise == "distributed":
            said.append(
                "Distributed noise under secure aggregation: each site adds a share of the noise and the "
                f"aggregator sees only the sum (private while at most {privacy.max_colluding_sites} site(s) "
                "collude with it)."
            )
        elif privacy.secure_aggregation:
            said.append("Secure aggregation: the aggregator sees only the sum of the updates.")
        else:
            said.append("Each site adds all of its noise itself: the aggregator sees each site's noised update.")
        if privacy.site_level_noise > 0:
            said.append(
                f"Site-level DP at the aggregator: noise {privacy.site_level_noise:g} on updates clipped to "
                f"{privacy.site_level_clip:g}."
            )
        if privacy.evaluation == "off":
            said.append("No site sends evaluation metrics (privacy.evaluation = off): accuracy is the central test.")
        else:
            said.append(f"Federated evaluation: {privacy.evaluation} (privacy.evaluation).")
    if deployed:
        said.append(
            "These are the aggregator's proposal: each site's own policy and budget decide what it releases, "
            "and a site refuses a round that breaks them."
        )
    return said
