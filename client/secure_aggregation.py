"""A site's side of secure aggregation: keys agreed once per epoch, kept in Flower's per-node state.

The session (`SiteSession`: its X25519 keys, its verified peers, the round
it masked) lives in the node's `context.state` from the key agreement
(advertise) through every round of the epoch (mask, unmask). A mask request
for keys it does not hold (its agent restarted and the state is empty, or it
missed an agreement) is answered `REKEY` before anything is computed, and the
aggregator agrees keys again.

The site decides alone what it takes part in, at every stage that runs each
round as at key agreement: the round's settings must match its own policy (it
is in the cohort, the threshold and the collusion bound are at least what it
requires, the vector has its model's length, the round is the one it is asked
about and comes after every round it masked in this run), its peers' keys
must be signed by their provisioned identity keys, and its budget must allow
the release (`release.check`, before anything is computed). Its masked vector
leaves only after the release is in its signed ledger.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedpriv.client.audit_fault import clip_norm_used, dp_actually_used, noise_actually_added
from fedpriv.client.distributed_dp import NoiseShare, clipped_gradient_sum, noisy_share
from fedpriv.client.release import Made, Proposal, Withheld, check, release
from fedpriv.client.runtime import SiteRuntime
from fedpriv.client.site import local_plan
from fedpriv.client.training import DpSettings, LocalPlan, train_local
from fedpriv.common.config import FedprivConfig
from fedpriv.common.logs import CLIENT_LOG
from fedpriv.common.node_config import PEER_KEYS
from fedpriv.common.privacy.plan import ENCODING_BOUND, ENCODING_SCALE, plan_for
from fedpriv.common.privacy.records import DistributedNoise, PrivacyRecord
from fedpriv.common.rundir import RunDirectory
from fedpriv.common.wire.protocol import (
    DELTA,
    EPSILON,
    EPSILON_CAP,
    NOISE_MULTIPLIER,
    REFUSED,
    SAMPLE_RATE,
    SECONDS,
    STEPS,
    TRAIN_LOSS,
    from_record,
    withheld_content,
)
from fedpriv.common.wire.secagg import SecAggConfig, SecAggError, SiteSession, default_threshold
from fedpriv.common.wire.secagg.site_session import KEYED
from fedpriv.common.wire.secure_protocol import (
    ADVERTISE,
    MASK,
    SETUP,
    UNMASK,
    StageReply,
    StageRequest,
    masked_sha256,
    rekey_content,
    unmask_to_data,
)
from fedpriv.common.wire.secure_protocol import advertisements_from_data as read_advertisements

log = logging.getLogger(CLIENT_LOG)

STATE = "fedpriv-secagg"  # the session's record in Flower's per-node context.state
LAST_ROUND = "fedpriv-secagg-round"  # the last round masked in the run, kept when the keys change


def encoding(config: FedprivConfig) -> tuple[float, int]:
    """(scale, bound) of the fixed-point encoding (the privacy plan's)."""
    return ENCODING_SCALE, ENCODING_BOUND


def pinned_keys(site: SiteRuntime, config: FedprivConfig) -> dict[str, str]:
    """The federation's identity keys by site: provisioned (node config), or made for this simulated run."""
    if PEER_KEYS in site.node_config:
        path = Path(str(site.node_config[PEER_KEYS])).expanduser()
    elif site.simulated and config.run_dir:
        path = RunDirectory(config.run_dir).public_keys
    else:
        raise SecAggError(
            f"{site.name}: secure aggregation needs the federation's public keys; set {PEER_KEYS} in its node config"
        )
    try:
        keys = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SecAggError(f"{site.name}: cannot read the federation's public keys {path}: {error}") from None
    return {str(k): str(v) for k, v in keys.items()}


def _check_round(secagg: SecAggConfig, request: StageRequest, site: SiteRuntime, config: FedprivConfig, run_id: str):
    """The round must be the one asked about and fit this site; its privacy is `release.refusal`'s to judge."""
    wanted = default_threshold(len(secagg.sites), secagg.max_colluding)
    length = site.model.trainable_size
    problems = [
        (site.name not in secagg.sites, "it is not in the cohort"),
        (secagg.threshold < wanted, f"threshold {secagg.threshold} is below n - t = {wanted}"),
        (secagg.length != length, f"vector length {secagg.length}, its model has {length}"),
        (secagg.run_id != run_id, f"run {secagg.run_id} is not this run ({run_id})"),
        (secagg.round != request.server_round, f"round {secagg.round} is not the round asked ({request.server_round})"),
        (request.stage == ADVERTISE and secagg.epoch != secagg.round, "keys are agreed in the round they are for"),
        ((secagg.scale, secagg.bound) != encoding(config), "the encoding is not the one this federation uses"),
    ]
    refused = [why for bad, why in problems if bad]
    if refused:
        raise SecAggError(f"{site.name} refuses the secure-aggregation round: " + "; ".join(refused))


def _session(context: Context, site: SiteRuntime, config: FedprivConfig) -> SiteSession | None:
    record = context.state.config_records.get(STATE)
    if record is None:
        return None
    return SiteSession.from_state(dict(record), site.budget.ledger.key, pinned_keys(site, config))


def _save(context: Context, session: SiteSession) -> None:
    context.state[STATE] = ConfigRecord(session.to_state())


def _last_masked(context: Context, site: SiteRuntime, run_id: str) -> int:
    """The last round this site masked in this run, whatever keys it used then."""
    record = context.state.config_records.get(LAST_ROUND)
    if record is not None and record.get("run") == run_id:
        return int(str(record["round"]))
    # No record (its agent restarted, or a first round): its ledger holds every release it made.
    rounds = [
        r.round
        for r in site.budget.ledger.records()
        if isinstance(r, PrivacyRecord) and r.party == "site" and r.run_id == run_id
    ]
    return max(rounds, default=0)


def handle(msg: Message, context: Context, config: FedprivConfig, site: SiteRuntime) -> Message:
    """Answers one stage's request."""
    request = StageRequest.from_message(msg)
    run_id = str(context.run_id)
    if request.stage == SETUP:
        context.state.config_records.pop(STATE, None)  # a node new to the aggregator: no keys of before are reused
        return Message(StageReply(site.name).to_content(), reply_to=msg)
    secagg = SecAggConfig.from_json(request.round_config)
    _check_round(secagg, request, site, config, run_id)
    if request.stage == ADVERTISE:
        context.state.config_records.pop(STATE, None)  # a new agreement: the old keys serve no round again
        roster = pinned_keys(site, config)
        # Refused before any key is made: a site that will not release stays out of the epoch's cohort.
        withheld = check(site, _release_plan(config, site, secagg, roster).proposal, request.server_round)
        if withheld is not None:
            return Message(_withheld(site, withheld), reply_to=msg)
        session = SiteSession(secagg, site.name, site.budget.ledger.key, roster)
        advertisement = session.advertise()
        _save(context, session)
        return Message(StageReply(site.name, advertisement).to_content(), reply_to=msg)
    session = _session(context, site, config)
    if request.stage == MASK:
        return Message(_mask(request, secagg, session, context, config, site), reply_to=msg)
    if request.stage == UNMASK:
        if session is None:
            raise SecAggError(f"{site.name}: no secure-aggregation session for round {request.server_round}")
        survivors, cohort, t = len(set(request.survivors)), len(secagg.sites), secagg.max_colluding
        if survivors < cohort - t:
            # More than t of the cohort are gone after the noise shares were fixed: the sum of the survivors
            # would carry less noise than every site accounted for. Revealing nothing abandons the round.
            reason = (
                f"{site.name} refuses to unmask: only {survivors} of the {cohort} sites survived, more than "
                f"t = {t} dropped, so the sum would carry less noise than accounted"
            )
            log.warning("%s round %d: %s", site.name, request.server_round, reason)
            context.state.config_records.pop(STATE, None)  # nothing of this round is ever revealed
            return Message(withheld_content(site.name, REFUSED, reason, {}), reply_to=msg)
        seed_shares, pair_keys = session.unmask(secagg, request.survivors, request.dropped, request.data)
        _save(context, session)
        return Message(StageReply(site.name, unmask_to_data(seed_shares, pair_keys)).to_content(), reply_to=msg)
    raise SecAggError(f"{site.name}: unknown stage {request.stage!r}")


def _withheld(site: SiteRuntime, withheld: Withheld):
    return withheld_content(site.name, withheld.status, withheld.reason, withheld.metrics)


@dataclass(frozen=True)
class _ReleasePlan:
    """What a secure round asks this site to release, as its settings plan it."""

    proposal: Proposal
    rate: float
    steps: int
    dp: DpSettings | None
    share: NoiseShare | None = None  # distributed noise: this site's share
    shared: DistributedNoise | None = None  # ... as recorded
    plan: LocalPlan | None = None  # local noise: the local training


def _release_plan(config: FedprivConfig, site: SiteRuntime, secagg: SecAggConfig, roster) -> _ReleasePlan:
    privacy = config.privacy
    distributed = privacy.enabled and privacy.noise == "distributed"
    common = {
        "mode": config.model.mode,
        "noise": privacy.noise if privacy.enabled else None,
        "max_colluding": secagg.max_colluding,
        "cohort": secagg.sites,
        "roster": frozenset(roster),
    }
    if distributed:
        length = secagg.length
        # The share is sized by the round's t, which the policy check holds to at least the site's own.
        share = NoiseShare(
            noise_multiplier=plan_for(config).distributed_noise_multiplier(length),
            max_grad_norm=privacy.max_grad_norm,
            cohort=len(secagg.sites),
            max_colluding=secagg.max_colluding,
            gamma=1.0 / secagg.scale,
        )
        shared = DistributedNoise(
            total_noise_multiplier=share.noise_multiplier,
            noise_share=share.share_std / share.max_grad_norm,
            cohort=share.cohort,
            max_colluding=share.max_colluding,
            quantization=share.gamma,
            dimension=length,
        )
        rate = config.train.sample_rate
        # The site adds only its share; the recorded sigma is the sum's.
        dp = DpSettings(share.noise_multiplier, privacy.max_grad_norm, normaliser=1.0)
        planned = site.update_mechanism(dp, rate, 1, shared)
        return _ReleasePlan(Proposal("update", planned, **common), rate, 1, dp, share=share, shared=shared)
    plan = local_plan(config)
    dp = None
    if privacy.enabled:
        dp = DpSettings(plan_for(config).noise_multiplier, privacy.max_grad_norm, site.normaliser())
    planned = site.update_mechanism(dp, plan.sample_rate, plan.steps) if dp else None
    return _ReleasePlan(Proposal("update", planned, **common), plan.sample_rate, plan.steps, dp, plan=plan)


def _mask(
    request: StageRequest,
    secagg: SecAggConfig,
    session: SiteSession | None,
    context: Context,
    config: FedprivConfig,
    site: SiteRuntime,
) -> RecordDict:
    """Trains (local noise) or computes its noisy share (distributed), records the release, masks."""
    run_id = str(context.run_id)
    if session is None or session.config != secagg.keys:
        held = "none" if session is None else f"those of round {session.config.epoch}"
        reason = f"{site.name} holds no keys of round {secagg.epoch} (it holds {held}); keys must be agreed again"
        log.warning("%s round %d: %s", site.name, request.server_round, reason)
        return rekey_content(site.name, reason)
    if request.data:  # the epoch's first round: the advertisements, to check against the pinned identity keys
        session.accept_peers(read_advertisements(request.data))
        _save(context, session)
    elif session.stage != KEYED:
        reason = f"{site.name} never received its peers' keys of round {secagg.epoch}; keys must be agreed again"
        return rekey_content(site.name, reason)
    last = _last_masked(context, site, run_id)
    if secagg.round <= last:
        raise SecAggError(
            f"{site.name} refuses round {secagg.round}: it already released round {last} of this run "
            f"(one masked vector per round)"
        )
    session.check_round(secagg)
    privacy, bundle, budget = config.privacy, site.model, site.budget
    release_plan = _release_plan(config, site, secagg, pinned_keys(site, config))
    seed = site.training_seed(request.server_round)

    def compute() -> Made:
        global_state = from_record(request.arrays)
        bundle.set_state(global_state)
        started = time.time()
        share, dp = release_plan.share, release_plan.dp
        if share is not None:
            vector, _ = clipped_gradient_sum(
                bundle,
                site.train,
                sample_rate=release_plan.rate,
                max_grad_norm=clip_norm_used(privacy.max_grad_norm, site.name, site.fault),
                seed=seed,
                max_physical_batch=config.train.max_physical_batch,
            )
            added = noise_actually_added(share.noise_multiplier, site.name, site.fault)
            vector = noisy_share(
                vector, dataclasses.replace(share, noise_multiplier=added), np.random.default_rng(seed)
            )
            loss, taken = math.nan, 1
        else:
            assert release_plan.plan is not None
            noised = dp_actually_used(dp, site.name, site.fault)
            result = train_local(bundle, site.train, release_plan.plan, dp=noised, seed=seed, anchor=global_state)
            trained = bundle.get_state()
            vector = np.concatenate(
                [
                    (trained[n].astype(np.float64) - global_state[n].astype(np.float64)).ravel()
                    for n in bundle.trainable_names
                ]
            )
            loss, taken = result.loss, result.steps
        masked, sealed = session.mask(secagg, vector)
        mechanism = site.update_mechanism(dp, release_plan.rate, taken, release_plan.shared)
        metrics = {
            TRAIN_LOSS: loss,
            STEPS: taken,
            NOISE_MULTIPLIER: mechanism.noise_multiplier,
            SAMPLE_RATE: release_plan.rate,
            SECONDS: time.time() - started,
        }
        # The record names the very masked vector sent; the aggregator checks it.
        return Made((masked, sealed), mechanism, masked_sha256(masked), metrics)

    outcome = release(site, release_plan.proposal, compute, run_id=run_id, server_round=request.server_round)
    if isinstance(outcome, Withheld):
        return _withheld(site, outcome)
    # Saved before the reply leaves (Flower keeps the state when the handler returns): no second vector of it.
    _save(context, session)
    context.state[LAST_ROUND] = ConfigRecord({"run": run_id, "round": request.server_round})
    planned = release_plan.proposal.planned
    if planned is not None:
        # Next round's budget check, worked out while the aggregator unmasks (as the plain round does); a
        # deployed site's resident worker keeps it for the next message.
        budget.prefetch(planned)
    metrics = {**outcome.metrics, EPSILON: outcome.epsilon, EPSILON_CAP: budget.cap, DELTA: budget.delta}
    masked, sealed = outcome.payload
    return StageReply(site.name, sealed, masked=masked, metrics=metrics, entry=outcome.entry).to_content()
