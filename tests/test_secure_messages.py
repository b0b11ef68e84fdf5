"""A site's side of secure aggregation, driven by hand-built messages: what it refuses from an aggregator."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from flwr.app import Context, Message, Metadata, RecordDict

from fedpriv.common.privacy import signing
from fedpriv.common.privacy.accounting import epsilon, poisson_gaussian
from fedpriv.common.privacy.records import PrivacyRecord
from fedpriv.common.wire.protocol import EXHAUSTED, REFUSED, to_record, withheld
from fedpriv.common.wire.secagg import AggregatorSession, SecAggConfig, SecAggError, SiteSession, default_threshold
from fedpriv.common.wire.secure_protocol import (
    ADVERTISE,
    MASK,
    UNMASK,
    StageReply,
    StageRequest,
    advertisements_from_data,
    advertisements_to_data,
    message_type,
    rekey_reason,
    unmask_from_data,
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
        node_config={"partition-id": 0, "num-partitions": 3, "fedpriv-simulated": True},
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


def _agree(federation, secagg):
    """Key agreement with site-000 (through its handler) and two peers (sessions here): the advertisements."""
    from fedpriv.client.secure_aggregation import handle

    config, context, site, keys = federation
    reply = handle(_message(StageRequest(ADVERTISE, secagg.round, secagg.to_json())), context, config, site)
    pinned = {s: signing.public_b64(k) for s, k in keys.items()}
    peers = {s: SiteSession(secagg, s, keys[s], pinned) for s in SITES[1:]}
    ads = {"site-000": dict(StageReply.from_message(reply, ADVERTISE).data)}
    ads.update({s: peer.advertise() for s, peer in peers.items()})
    return peers, ads


def _mask(site, secagg: SecAggConfig, rnd: int, data=None) -> StageRequest:
    arrays = to_record(site.model.get_state())
    return StageRequest(MASK, rnd, secagg.for_round(rnd).to_json(), data=data or {}, arrays=arrays)


def _releases(site) -> list[PrivacyRecord]:
    return [r for r in site.budget.ledger.records() if isinstance(r, PrivacyRecord)]


def test_a_substituted_key_forwarded_by_the_aggregator_is_refused(federation):
    from fedpriv.client.secure_aggregation import handle

    config, context, site, keys = federation
    secagg = _round(site)
    _, ads = _agree(federation, secagg)
    # The aggregator swaps site-001's keys for its own, signed with a key that is not site-001's.
    pinned = {s: signing.public_b64(k) for s, k in keys.items()}
    forged = dict(SiteSession(secagg, "site-001", keys["site-001"], pinned).advertise())
    forged["signature"] = signing.generate().sign(b"not site-001")
    ads["site-001"] = forged
    request = _mask(site, secagg, 1, advertisements_to_data(ads))
    assert advertisements_from_data(request.data)["site-001"] == forged
    with pytest.raises(SecAggError, match="site 'site-001': advertisement signature does not verify"):
        handle(_message(request), context, config, site)
    assert _releases(site) == []  # refused before anything was computed


def test_keys_agreed_once_serve_the_next_rounds_and_each_round_is_masked_once(federation):
    from fedpriv.client.secure_aggregation import handle

    config, context, site, _ = federation
    secagg = _round(site)
    peers, ads = _agree(federation, secagg)
    aggregator = AggregatorSession(secagg)
    aggregator.collect_advertisements(ads)
    for peer in peers.values():
        peer.accept_peers(ads)
    zero = np.zeros(secagg.length)
    for rnd in (1, 2):  # the advertisements travel with the first mask request only
        data = advertisements_to_data(ads) if rnd == 1 else {}
        reply = StageReply.from_message(handle(_message(_mask(site, secagg, rnd, data)), context, config, site), MASK)
        assert reply.masked is not None and reply.entry is not None and sorted(reply.data) == list(SITES[1:])
        round_config = secagg.for_round(rnd)
        masked = {"site-000": reply.masked}
        sealed = {"site-000": dict(reply.data)}
        for name, peer in peers.items():
            masked[name], sealed[name] = peer.mask(round_config, zero)
        survivors, dropped, routed = aggregator.collect_masked(round_config, masked, sealed)
        request = StageRequest(UNMASK, rnd, round_config.to_json(), data=routed["site-000"], survivors=tuple(survivors))
        answer = StageReply.from_message(handle(_message(request), context, config, site), UNMASK)
        seeds, keys = {"site-000": unmask_from_data(answer.data, "site-000")[0]}, {"site-000": {}}
        for name, peer in peers.items():
            seeds[name], keys[name] = peer.unmask(round_config, survivors, dropped, routed[name])
        total = aggregator.collect_unmask(seeds, keys)  # decodes within the bound: every mask was removed
        assert np.isfinite(total).all() and np.abs(total).max() < 10
    assert [r.round for r in _releases(site)] == [1, 2]
    # Round 2 again, even under new keys: refused before anything is computed.
    with pytest.raises(SecAggError, match="already released round 2"):
        handle(_message(_mask(site, secagg, 2)), context, config, site)
    site.budget.cap = 1e9  # (two releases spent this test's budget; a new agreement would be refused for that)
    later = _round(site, round=2)
    request = _mask(site, later, 2, advertisements_to_data(_agree(federation, later)[1]))
    with pytest.raises(SecAggError, match="already released round 2"):
        handle(_message(request), context, config, site)
    assert [r.round for r in _releases(site)] == [1, 2]


def test_a_site_without_the_rounds_keys_asks_for_new_ones_before_computing(federation):
    from fedpriv.client.secure_aggregation import STATE, handle

    config, context, site, _ = federation
    secagg = _round(site)
    _agree(federation, secagg)
    context.state.config_records.pop(STATE)  # its agent restarted: Flower's per-node state is empty
    reply = handle(_message(_mask(site, secagg, 2)), context, config, site)
    assert "holds no keys of round 1" in (rekey_reason(reply) or "")
    # Keys of another agreement than the round's: the same.
    _agree(federation, _round(site, round=3))
    reply = handle(_message(_mask(site, secagg, 4)), context, config, site)
    assert "holds no keys of round 1 (it holds those of round 3)" in (rekey_reason(reply) or "")
    assert _releases(site) == []


def test_the_sites_policy_and_budget_are_checked_at_every_mask_request(federation):
    from fedpriv.client.secure_aggregation import handle

    config, context, site, _ = federation
    secagg = _round(site)
    _, ads = _agree(federation, secagg)
    # Its operator raised its collusion bound after the keys were agreed: round 1 is refused, untrained.
    strict = site.policy
    site.policy = strict.model_copy(update={"min_colluding_sites": 2})
    reply = handle(_message(_mask(site, secagg, 1, advertisements_to_data(ads))), context, config, site)
    assert withheld(reply) is not None and withheld(reply)[0] == REFUSED
    assert "fewer than its own bound 2" in withheld(reply)[1]
    site.policy = strict
    site.budget.cap = 1e-9  # its budget cannot pay for one more release
    assert withheld(handle(_message(_mask(site, secagg, 2)), context, config, site))[0] == EXHAUSTED
    assert _releases(site) == []


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
