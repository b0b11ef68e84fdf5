"""A site's side of a secure-aggregation round: five stages, its secrets kept in Flower's per-node state.

The site decides alone what it takes part in: the round's settings must
match its own policy (it is in the cohort, the threshold and the collusion
bound are at least what it requires, the vector has its model's length, the
round is the one it is asked about), its peers' keys must be signed by their
provisioned identity keys, and its budget must allow the release. Its masked
vector leaves only after the release is in its signed ledger.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message

from fedpriv.client.audit_fault import noise_actually_added
from fedpriv.client.distributed_dp import NoiseShare, clipped_gradient_sum, noisy_share
from fedpriv.client.runtime import SiteRuntime
from fedpriv.client.site import noise_multiplier
from fedpriv.client.training import DpSettings, LocalPlan, train_local
from fedpriv.common.accounting import calibrate_noise, steps_per_round
from fedpriv.common.config import FedprivConfig
from fedpriv.common.logs import CLIENT_LOG
from fedpriv.common.node_config import PEER_KEYS
from fedpriv.common.protocol import (
    DELTA,
    EPSILON,
    EPSILON_CAP,
    NOISE_MULTIPLIER,
    NUM_EXAMPLES,
    SAMPLE_RATE,
    SECONDS,
    SITE_WEIGHT,
    STEPS,
    TRAIN_LOSS,
    TrainReply,
    from_record,
)
from fedpriv.common.records import DistributedNoise
from fedpriv.common.secagg import SecAggConfig, SecAggError, SiteSession, default_threshold
from fedpriv.common.secure_protocol import (
    ADVERTISE,
    MASK,
    SETUP,
    SHARE,
    UNMASK,
    StageReply,
    StageRequest,
    masked_sha256,
)
from fedpriv.common.secure_protocol import advertisements_from_data as read_advertisements

log = logging.getLogger(CLIENT_LOG)

STATE = "fedpriv-secagg"  # the session's record in Flower's per-node context.state
PUBLIC_KEYS = "public-keys.json"


def encoding(config: FedprivConfig) -> tuple[float, int]:
    """(scale, bound) of the fixed-point encoding: a grid of 2^-20, values up to 2^20 in size."""
    return 2.0**20, 2**40


def pinned_keys(site: SiteRuntime, config: FedprivConfig) -> dict[str, str]:
    """The federation's identity keys by site: provisioned (node config), or made for this simulated run."""
    if PEER_KEYS in site.node_config:
        path = Path(str(site.node_config[PEER_KEYS])).expanduser()
    elif site.simulated and config.run_dir:
        path = Path(config.run_dir) / "keys" / PUBLIC_KEYS
    else:
        raise SecAggError(
            f"{site.name}: secure aggregation needs the federation's public keys; set {PEER_KEYS} in its node config"
        )
    try:
        keys = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SecAggError(f"{site.name}: cannot read the federation's public keys {path}: {error}") from None
    return {str(k): str(v) for k, v in keys.items()}


def _check_policy(secagg: SecAggConfig, request: StageRequest, site: SiteRuntime, config: FedprivConfig, run_id: str):
    """The site's own rules for taking part; the aggregator's word is not enough."""
    t = config.privacy.max_colluding_sites
    wanted = default_threshold(len(secagg.sites), secagg.max_colluding)
    length = site.model.trainable_size
    problems = [
        (site.name not in secagg.sites, "it is not in the cohort"),
        (secagg.max_colluding < t, f"max-colluding {secagg.max_colluding} is below its own {t}"),
        (secagg.threshold < wanted, f"threshold {secagg.threshold} is below n - t = {wanted}"),
        (secagg.length != length, f"vector length {secagg.length}, its model has {length}"),
        (secagg.run_id != run_id, f"run {secagg.run_id} is not this run ({run_id})"),
        (secagg.round != request.server_round, f"round {secagg.round} is not the round asked ({request.server_round})"),
        ((secagg.scale, secagg.bound) != encoding(config), "the encoding is not the one this federation uses"),
    ]
    refused = [why for bad, why in problems if bad]
    if refused:
        raise SecAggError(f"{site.name} refuses the secure-aggregation round: " + "; ".join(refused))


def _session(context: Context, site: SiteRuntime, config: FedprivConfig, request: StageRequest) -> SiteSession:
    record = context.state.config_records.get(STATE)
    if record is None:
        raise SecAggError(f"{site.name}: no secure-aggregation session for round {request.server_round}")
    session = SiteSession.from_state(dict(record), site.budget.ledger.key, pinned_keys(site, config))
    if session.config.to_json() != request.round_config:
        raise SecAggError(f"{site.name}: the round's settings changed between stages; refusing")
    return session


def _save(context: Context, session: SiteSession) -> None:
    context.state[STATE] = ConfigRecord(session.to_state())


def handle(msg: Message, context: Context, config: FedprivConfig, site: SiteRuntime) -> Message:
    """Answers one stage's request."""
    request = StageRequest.from_message(msg)
    run_id = str(context.run_id)
    if request.stage == SETUP:
        context.state.config_records.pop(STATE, None)  # a new round: nothing of the last one is reused
        return Message(StageReply(site.name).to_content(), reply_to=msg)
    if request.stage == ADVERTISE:
        secagg = SecAggConfig.from_json(request.round_config)
        _check_policy(secagg, request, site, config, run_id)
        session = SiteSession(secagg, site.name, site.budget.ledger.key, pinned_keys(site, config))
        advertisement = session.advertise()
        _save(context, session)
        return Message(StageReply(site.name, advertisement).to_content(), reply_to=msg)
    session = _session(context, site, config, request)
    if request.stage == SHARE:
        sealed = session.share_keys(read_advertisements(request.data))
        _save(context, session)
        return Message(StageReply(site.name, sealed).to_content(), reply_to=msg)
    if request.stage == MASK:
        content = _mask(msg, request, session, context, config, site)
        _save(context, session)
        return Message(content, reply_to=msg)
    if request.stage == UNMASK:
        revealed = session.unmask(request.survivors, request.dropped)
        context.state.config_records.pop(STATE, None)
        return Message(StageReply(site.name, revealed).to_content(), reply_to=msg)
    raise SecAggError(f"{site.name}: unknown stage {request.stage!r}")


def _mask(msg, request: StageRequest, session: SiteSession, context: Context, config: FedprivConfig, site):
    """Trains (local noise) or computes its noisy share (distributed), records the release, masks."""
    privacy, bundle, budget = config.privacy, site.model, site.budget
    secagg = session.config
    global_state = from_record(request.arrays)
    bundle.set_state(global_state)
    started = time.time()
    seed = site.training_seed(request.server_round)
    distributed = privacy.noise == "distributed"
    length = secagg.length
    if distributed:
        share = NoiseShare(
            noise_multiplier=distributed_noise_multiplier(config, length),
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
        rate, steps = config.train.sample_rate, 1
        # The site adds only its share; the recorded sigma is the sum's.
        dp = DpSettings(share.noise_multiplier, privacy.max_grad_norm, normaliser=1.0)
    else:
        plan = _local_plan(config)
        rate, steps, shared = plan.sample_rate, plan.steps, None
        dp = (
            DpSettings(noise_multiplier(config), privacy.max_grad_norm, site.normaliser(rate))
            if privacy.enabled
            else None
        )
    planned = site.update_mechanism(dp, rate, steps, shared)
    sigma = planned.noise_multiplier
    if privacy.enabled and not budget.allows(planned):
        spent = budget.spent()
        log.warning(
            "%s round %d: budget exhausted (spent %.4f); not taking part", site.name, request.server_round, spent
        )
        metrics = {NUM_EXAMPLES: 0, SITE_WEIGHT: 0, EPSILON: spent, EPSILON_CAP: budget.cap}
        return TrainReply.exhausted(site.name, metrics).to_content()
    if distributed:
        vector, _ = clipped_gradient_sum(
            bundle,
            site.train,
            sample_rate=rate,
            max_grad_norm=privacy.max_grad_norm,
            seed=seed,
            max_physical_batch=config.train.max_physical_batch,
        )
        added = noise_actually_added(share.noise_multiplier, site.name, site.simulated)
        vector = noisy_share(vector, dataclasses.replace(share, noise_multiplier=added), np.random.default_rng(seed))
        loss, taken = math.nan, 1
    else:
        if dp is not None:
            added = noise_actually_added(dp.noise_multiplier, site.name, site.simulated)
            dp = dataclasses.replace(dp, noise_multiplier=added)
        result = train_local(bundle, site.train, plan, dp=dp, seed=seed, anchor=global_state)
        trained = bundle.get_state()
        vector = np.concatenate(
            [
                (trained[n].astype(np.float64) - global_state[n].astype(np.float64)).ravel()
                for n in bundle.trainable_names
            ]
        )
        loss, taken = result.loss, result.steps
    masked = session.mask(request.data, vector)
    mechanism = site.update_mechanism(dp, rate, taken, shared)
    # Recorded (signed, fsynced) before the masked vector leaves; the aggregator can check this hash.
    entry = budget.record(
        run_id=str(context.run_id),
        server_round=request.server_round,
        site=site.name,
        mechanism=mechanism,
        update_sha256=masked_sha256(masked),
    )
    spent = entry.record.accounting.epsilon
    if privacy.enabled and site.simulated:
        # Next round's budget check, worked out while the aggregator unmasks (as the plain round does).
        budget.prefetch(planned)
    metrics = {
        TRAIN_LOSS: loss,
        STEPS: taken,
        EPSILON: math.inf if spent is None else spent,
        EPSILON_CAP: budget.cap,
        DELTA: budget.delta,
        NOISE_MULTIPLIER: sigma,
        SAMPLE_RATE: rate,
        SECONDS: time.time() - started,
    }
    return StageReply(site.name, masked=masked, metrics=metrics, entry=entry).to_content()


def _local_plan(config: FedprivConfig) -> LocalPlan:
    optimizer, learning_rate = config.optimizer_settings()
    return LocalPlan(
        steps=steps_per_round(config.train.local_epochs, config.train.sample_rate),
        sample_rate=config.train.sample_rate,
        optimizer=optimizer,
        learning_rate=learning_rate,
        momentum=config.train.momentum,
        weight_decay=config.train.weight_decay,
        max_physical_batch=config.train.max_physical_batch,
    )


def distributed_noise_multiplier(config: FedprivConfig, length: int) -> float:
    """sigma of the sum: given, or just enough that the accounted sigma meets the target epsilon after
    `rounds` steps at the sample rate (the grid's rounding slightly raises the sensitivity, so sigma too)."""
    p = config.privacy
    if p.noise_multiplier > 0:
        return p.noise_multiplier
    sigma = calibrate_noise(p.target_epsilon, p.delta, config.train.sample_rate, config.rounds, p.accountant)
    scale, _ = encoding(config)
    return sigma * (p.max_grad_norm + math.sqrt(length) / scale) / p.max_grad_norm
