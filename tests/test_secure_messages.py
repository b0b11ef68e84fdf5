"""A site's side of secure aggregation, driven by hand-built messages: what it refuses from an aggregator."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from flwr.app import Context, Message, Metadata, RecordDict

from fedpriv.common import signing
from fedpriv.common.accounting import epsilon, poisson_gaussian
from fedpriv.common.protocol import REFUSED, withheld
from fedpriv.common.secagg import SecAggConfig, SecAggError, SiteSession, default_threshold
from fedpriv.common.secure_protocol import (
    ADVERTISE,
    SHARE,
    StageReply,
    StageRequest,
    advertisements_from_data,
    advertisements_to_data,
    message_type,
)

SITES = ("site-000", "site-001", "site-002")


def _message(request: StageRequest) -> Message:
    metadata = Metadata(
        run_id=7,
        message_id=f"m-{request.stage}",
        src_node_id=1,
        dst_node_id=2,
        reply_to_message_id="",
        group_id=str(request.server_round),
        created_at=time.time(),
        ttl=60.0,
        message_type=message_type(request.stage),
    )
    return Message(content=request.to_content(), metadata=metadata)


@pytest.fixture
def federation(tmp_path, tiny_config):
    """Three sites' identity keys, pinned in a simulated run directory, and site-000's runtime."""
    from fedpriv.client.runtime import WorkerRuntime

    config = tiny_config.replace(**{"privacy.secure-aggregation": True, "simulation.sites": 3})
    keys = {s: signing.load_or_create(tmp_path / "run" / "keys" / f"{s}.key") for s in SITES}
    (tmp_path / "run" / "keys" / "public-keys.json").write_text(
        json.dumps({s: signing.public_b64(k) for s, k in keys.items()})
    )
    context = Context(
        run_id=7,
        node_id=2,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config=config.to_run_config(),
    )
    site = WorkerRuntime().site(context, config)
    return config, context, site, keys


def _round(site, t=1, **changes) -> SecAggConfig:
    fields = dict(
        run_id="7",
        round=1,
        sites=SITES,
        threshold=default_threshold(3, t),
        max_colluding=t,
        length=site.model.trainable_size,
        scale=2.0**20,
        bound=2**40,
    )
    fields.update(changes)
    return SecAggConfig(**fields)


def test_a_round_below_the_sites_own_policy_is_refused(federation):
    from fedpriv.client.secure_aggregation import STATE, handle

    config, context, site, _ = federation
    # Its privacy policy: refused with a reply that says why, before any key is made.
    request = StageRequest(ADVERTISE, 1, _round(site, max_colluding=0, threshold=3).to_json())
    assert withheld(handle(_message(request), context, config, site)) == (
        REFUSED,
        "site-000 refuses: the round assumes at most 0 colluding site(s), fewer than its own bound 1 "
        "(a smaller bound means a smaller noise share and weaker masking)",
    )
    assert STATE not in context.state.config_records
    # A round that is not the one it is in: an error.
    for changes, reason in [
        (dict(length=5), "vector length 5"),
        (dict(run_id="other"), "run other is not this run"),
    ]:
        request = StageRequest(ADVERTISE, 1, _round(site, **changes).to_json())
        with pytest.raises(SecAggError, match=reason):
            handle(_message(request), context, config, site)


def test_a_substituted_key_forwarded_by_the_aggregator_is_refused(federation):
    from fedpriv.client.secure_aggregation import handle

    config, context, site, keys = federation
    secagg = _round(site)
    own = StageReply.from_message(
        Message(
            handle(_message(StageRequest(ADVERTISE, 1, secagg.to_json())), context, config, site).content,
            reply_to=_message(StageRequest(ADVERTISE, 1, secagg.to_json())),
        ),
        ADVERTISE,
    )
    pinned = {s: signing.public_b64(k) for s, k in keys.items()}
    peers = {s: SiteSession(secagg, s, keys[s], pinned).advertise() for s in SITES[1:]}
    # The aggregator swaps site-001's keys for its own, signed with a key that is not site-001's.
    impostor = SiteSession(secagg, "site-001", keys["site-001"], pinned)
    forged = dict(impostor.advertise())
    forged["signature"] = signing.generate().sign(b"not site-001")
    ads = {"site-000": dict(own.data), "site-001": forged, "site-002": peers["site-002"]}
    request = StageRequest(SHARE, 1, secagg.to_json(), data=advertisements_to_data(ads))
    assert advertisements_from_data(request.data)["site-001"] == forged
    with pytest.raises(SecAggError, match="site 'site-001': advertisement signature does not verify"):
        handle(_message(request), context, config, site)


@pytest.mark.parametrize("accountant", ["pld", "rdp", "prv"])
def test_the_distributed_mechanisms_epsilon_matches_dp_accounting(accountant):
    import dp_accounting

    sigma, rate, rounds, delta = 1.1, 0.05, 300, 1e-5
    ours = epsilon([poisson_gaussian(sigma, rate, 1)] * rounds, delta, accountant)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), rounds
    )
    if accountant == "rdp":
        reference = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta)
        assert ours == pytest.approx(reference, rel=0.02)
    else:
        reference = (
            dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(delta)
        )
        assert ours == pytest.approx(reference, rel=0.02)
    assert np.isfinite(ours)
