"""The aggregator's admission of a site's train reply: every rejection path, without a Flower run.

Replies are built as a site builds them (the protocol's encoder, a real
Ed25519 key, a real signed ledger) and wrapped in real Flower messages.
"""

import json
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, Metadata

from fedpriv.client.budget import SiteBudget
from fedpriv.common.privacy import signing
from fedpriv.common.privacy.ledger import Ledger
from fedpriv.common.privacy.records import Mechanism, SiteExhausted, canonical_json, state_sha256
from fedpriv.common.wire import protocol
from fedpriv.common.wire.protocol import EvaluateReply, Instruction, ProtocolError, TrainReply
from fedpriv.server.admission import Admitted, Exhausted, Failed, Rejected, admit

NODE = 7
SITE = "site-000"
METRICS = {protocol.NUM_EXAMPLES: 40, protocol.SITE_WEIGHT: 1, protocol.EPSILON: 0.5}


def state(offset: float = 0.0) -> dict[str, np.ndarray]:
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3) + offset, "b": np.zeros(3, dtype=np.float32)}


@pytest.fixture
def budget(tmp_path):
    return SiteBudget(Ledger(tmp_path / f"{SITE}.jsonl", signing.generate()), "data-0", 8.0, 1e-5, "rdp")


def record(budget, update, sigma=1.0):
    mechanism = Mechanism(noise_multiplier=sigma, sample_rate=0.2, steps=5, max_grad_norm=1.0, dataset_size=40)
    return budget.record(
        run_id="run", server_round=1, site=SITE, mechanism=mechanism, update_sha256=state_sha256(update)
    )


def instruction() -> Message:
    """A train instruction to node NODE as the SuperLink delivers it (outside a run, so with explicit metadata)."""
    content = Instruction(protocol.to_record(state()), server_round=1, proximal_mu=0.1).to_content()
    metadata = Metadata(
        run_id=1,
        message_id="instruction-1",
        src_node_id=1,
        dst_node_id=NODE,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    return Message(content=content, metadata=metadata)


def reply(content) -> Message:
    return Message(content, reply_to=instruction())


def with_entry(content, written) -> Message:
    """The reply with its privacy record replaced by `written` (a dict, or raw text)."""
    text = written if isinstance(written, str) else json.dumps(written)
    content[protocol.PRIVACY] = ConfigRecord({protocol.PRIVACY_ENTRY: text})
    return reply(content)


def test_an_intact_private_update_is_admitted_with_its_entry(budget):
    update = state(1.0)
    entry = record(budget, update)
    verdict = admit(reply(TrainReply.trained(SITE, update, METRICS, entry).to_content()), privacy_required=True)
    assert isinstance(verdict, Admitted) and verdict.site == SITE
    assert verdict.entry == entry and verdict.entry.written == entry.written
    assert verdict.reply.metrics == METRICS
    np.testing.assert_array_equal(verdict.reply.update_state()["w"], update["w"])


def test_an_exhausted_site_is_not_a_rejection(budget):
    metrics = {protocol.NUM_EXAMPLES: 0, protocol.SITE_WEIGHT: 0, protocol.EPSILON: 7.9}
    verdict = admit(reply(TrainReply.exhausted(SITE, metrics).to_content()), privacy_required=True)
    assert isinstance(verdict, Exhausted) and verdict.site == SITE
    assert verdict.reply.metrics[protocol.EPSILON] == 7.9 and verdict.reply.update is None


def test_an_error_reply_failed_and_is_named_by_its_node():
    verdict = admit(Message(Error(code=0, reason="out of memory"), reply_to=instruction()), privacy_required=True)
    assert verdict == Failed(f"node-{NODE}", "out of memory")


def test_missing_privacy_record_is_rejected_in_a_private_run_only(budget):
    update = state(1.0)
    content = TrainReply(SITE, protocol.OK, METRICS, update=protocol.to_record(update)).to_content()
    assert protocol.PRIVACY not in content
    verdict = admit(reply(content), privacy_required=True)
    assert verdict == Rejected(SITE, "no privacy record came with the update")
    assert isinstance(admit(reply(content), privacy_required=False), Admitted)


def test_tampered_entry_is_rejected(budget):
    update = state(1.0)
    entry = record(budget, update)
    written = entry.written
    written["record"]["accounting"]["epsilon"] = 0.01  # under-report what was spent
    content = TrainReply.trained(SITE, update, METRICS, entry).to_content()
    verdict = admit(with_entry(content, written), privacy_required=True)
    assert isinstance(verdict, Rejected) and "hash mismatch" in verdict.reason


def test_bad_signature_is_rejected(budget):
    # The record is edited and its hash recomputed: only the signature can tell.
    from fedpriv.common.privacy.ledger import entry_hash

    update = state(1.0)
    entry = record(budget, update)
    written = entry.written
    written["record"]["mechanism"]["noise_multiplier"] = 10.0
    written["hash"] = entry_hash(written["seq"], written["prev"], written["record"])
    content = TrainReply.trained(SITE, update, METRICS, entry).to_content()
    verdict = admit(with_entry(content, written), privacy_required=True)
    assert isinstance(verdict, Rejected) and "bad signature" in verdict.reason


def test_update_changed_after_recording_is_rejected(budget):
    recorded = state(1.0)
    entry = record(budget, recorded)
    sent = state(1.5)  # not the update the site recorded (and the audit will recompute)
    verdict = admit(reply(TrainReply.trained(SITE, sent, METRICS, entry).to_content()), privacy_required=True)
    assert verdict == Rejected(SITE, "the update differs from the one its privacy record describes")


def test_update_without_noise_is_rejected_in_a_private_run(budget):
    update = state(1.0)
    entry = record(budget, update, sigma=0.0)
    content = TrainReply.trained(SITE, update, METRICS, entry).to_content()
    verdict = admit(reply(content), privacy_required=True)
    assert verdict == Rejected(SITE, "update released without DP noise in a private federation")
    admitted = admit(reply(content), privacy_required=False)
    assert isinstance(admitted, Admitted) and admitted.entry.record.mechanism.noise_multiplier == 0.0


def test_privacy_record_that_is_not_json_or_not_a_release_is_rejected(budget):
    update = state(1.0)
    entry = record(budget, update)
    content = TrainReply.trained(SITE, update, METRICS, entry).to_content()
    verdict = admit(with_entry(content, '{"seq": 0, "rec'), privacy_required=True)
    assert isinstance(verdict, Rejected) and "privacy record is not JSON" in verdict.reason

    content = TrainReply.trained(SITE, update, METRICS, entry).to_content()
    written = entry.written
    del written["signature"]
    verdict = admit(with_entry(content, written), privacy_required=True)
    assert isinstance(verdict, Rejected) and "malformed (signature: Field required)" in verdict.reason

    # A correctly signed entry of another kind is no release.
    other = budget.ledger.append(SiteExhausted(round=1, site=SITE, epsilon=1.0))
    content = TrainReply.trained(SITE, update, METRICS, entry).to_content()
    verdict = admit(with_entry(content, other.written), privacy_required=True)
    assert isinstance(verdict, Rejected) and "'site-exhausted' record, not a release" in verdict.reason


def test_protocol_errors_name_the_site_and_the_missing_part(budget):
    update = state(1.0)
    entry = record(budget, update)
    no_arrays = TrainReply(SITE, protocol.OK, METRICS, entry=entry).to_content()
    with pytest.raises(ProtocolError, match=f"train reply from {SITE}: no 'arrays' record"):
        TrainReply.from_message(reply(no_arrays))
    verdict = admit(reply(no_arrays), privacy_required=True)
    assert isinstance(verdict, Rejected) and verdict.site == SITE and "no 'arrays' record" in verdict.reason

    no_site = TrainReply.trained(SITE, update, METRICS, entry).to_content()
    del no_site[protocol.SITE]
    verdict = admit(reply(no_site), privacy_required=True)
    assert verdict == Rejected(
        f"node-{NODE}", f"train reply from node-{NODE}: no 'site' record (the site's name and status)"
    )

    bad_status = TrainReply.trained(SITE, update, METRICS, entry).to_content()
    bad_status[protocol.SITE] = ConfigRecord({protocol.SITE_NAME: SITE, protocol.SITE_STATUS: "tired"})
    with pytest.raises(ProtocolError, match="unknown status 'tired'"):
        TrainReply.from_message(reply(bad_status))

    metrics_as_config = TrainReply.trained(SITE, update, METRICS, entry).to_content()
    metrics_as_config[protocol.METRICS] = ConfigRecord({"num-examples": 1})
    with pytest.raises(ProtocolError, match="the 'metrics' record is a ConfigRecord, not a MetricRecord"):
        TrainReply.from_message(reply(metrics_as_config))


def test_replies_and_instructions_read_back_as_written(budget):
    update = state(2.0)
    entry = record(budget, update)
    sent = TrainReply.trained(SITE, update, METRICS, entry)
    assert TrainReply.from_message(reply(sent.to_content())) == sent

    evaluated = EvaluateReply(SITE, {protocol.NUM_EXAMPLES: 10, protocol.LOSS: 0.7, protocol.ACCURACY: 0.5})
    assert EvaluateReply.from_message(reply(evaluated.to_content())) == evaluated

    received = Instruction.from_message(instruction())
    assert (received.server_round, received.proximal_mu) == (1, 0.1)
    np.testing.assert_array_equal(received.state()["w"], state()["w"])
    # The keys are those Flower's strategies write.
    assert set(instruction().content.keys()) == {"arrays", "config"}
    assert set(instruction().content["config"].keys()) == {"server-round", "proximal-mu"}


def test_entry_is_checked_over_the_bytes_written_not_a_redump(budget):
    """A site entry whose floats were written as integers (8, not 8.0) still verifies and is admitted."""
    from fedpriv.common.privacy.ledger import entry_hash

    update = state(1.0)
    written = record(budget, update).written
    written["record"]["mechanism"]["noise_multiplier"] = 2  # an int where the model holds a float
    written["record"]["accounting"]["epsilon_cap"] = 8
    written["hash"] = entry_hash(written["seq"], written["prev"], written["record"])
    written["signature"] = signing.sign(budget.ledger.key, written["hash"].encode())
    assert b'"noise_multiplier":2,' in canonical_json(written)
    content = TrainReply(SITE, protocol.OK, METRICS, update=protocol.to_record(update)).to_content()
    verdict = admit(with_entry(content, written), privacy_required=True)
    assert isinstance(verdict, Admitted), verdict
    assert verdict.entry.record.mechanism.noise_multiplier == 2.0
    assert canonical_json(verdict.entry.written) == canonical_json(written)  # what a receipt will carry


def test_with_the_rounds_context_a_poisoned_or_replayed_update_is_rejected(budget):
    from fedpriv.server.update_checks import ReleaseHistory, RoundContext

    context = RoundContext(run_id="run", round=1, sent=state(), max_update_norm=1e5, max_examples=10**6)
    history = ReleaseHistory()
    update = state(1.0)
    entry = record(budget, update)
    honest = reply(TrainReply.trained(SITE, update, METRICS, entry).to_content())
    assert isinstance(admit(honest, True, context, history), Admitted)
    replayed = admit(reply(TrainReply.trained(SITE, update, METRICS, entry).to_content()), True, context, history)
    assert isinstance(replayed, Rejected) and "a replay" in replayed.reason and replayed.site == SITE

    poisoned = state(1.0)
    poisoned["w"][0, 0] = np.nan
    bad = admit(
        reply(TrainReply.trained(SITE, poisoned, METRICS, record(budget, poisoned)).to_content()), True, context
    )
    assert isinstance(bad, Rejected) and bad.reason == "array w: holds NaN or infinite values"
    huge = admit(
        reply(
            TrainReply.trained(
                SITE, update, {**METRICS, protocol.NUM_EXAMPLES: 10**12}, record(budget, update)
            ).to_content()
        ),
        True,
        context,
    )
    assert isinstance(huge, Rejected) and "strategy.max-site-examples" in huge.reason
