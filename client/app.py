"""The fedpriv ClientApp: a site's answer to the aggregator's train/evaluate messages."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpriv.client import secure_aggregation
from fedpriv.client.audit_fault import noise_actually_added
from fedpriv.client.runtime import WORKER
from fedpriv.client.site import evaluation_mechanism, noise_multiplier
from fedpriv.client.training import DpSettings, LocalPlan, train_local
from fedpriv.common.accounting import steps_per_round
from fedpriv.common.config import FedprivConfig
from fedpriv.common.logs import CLIENT_LOG
from fedpriv.common.progress import ProgressWriter
from fedpriv.common.protocol import (
    ACCURACY,
    DELTA,
    EPSILON,
    EPSILON_CAP,
    EXHAUSTED,
    LOSS,
    NOISE_MULTIPLIER,
    NOISY_CORRECT,
    NOISY_TOTAL,
    NUM_EXAMPLES,
    SAMPLE_RATE,
    SECONDS,
    SITE_WEIGHT,
    STEPS,
    TRAIN_LOSS,
    EvaluateReply,
    Instruction,
    TrainReply,
)
from fedpriv.common.records import canonical_json, state_sha256
from fedpriv.common.secure_protocol import ADVERTISE, MASK, SETUP, SHARE, UNMASK

log = logging.getLogger(CLIENT_LOG)

app = ClientApp()


def _setup(context: Context):
    """This node's site as the worker keeps it: built at its first message, then reused."""
    config = FedprivConfig.from_run_config(context.run_config)
    site = WORKER.site(context, config)
    return config, site.model, site


def _plan(config: FedprivConfig, msg: Message) -> LocalPlan:
    optimizer, learning_rate = config.optimizer_settings()
    return LocalPlan(
        steps=steps_per_round(config.train.local_epochs, config.train.sample_rate),
        sample_rate=config.train.sample_rate,
        optimizer=optimizer,
        learning_rate=learning_rate,
        momentum=config.train.momentum,
        weight_decay=config.train.weight_decay,
        max_physical_batch=config.train.max_physical_batch,
        proximal_mu=Instruction.from_message(msg).proximal_mu,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, bundle, site = _setup(context)
    server_round = Instruction.from_message(msg).server_round
    plan = _plan(config, msg)
    privacy = config.privacy
    budget = site.budget

    if privacy.enabled:
        dp = DpSettings(noise_multiplier(config), privacy.max_grad_norm, site.normaliser(plan.sample_rate))
        planned = site.update_mechanism(dp, plan.sample_rate, plan.steps)
        if not budget.allows(planned):
            spent = budget.spent()
            log.warning(
                "%s round %d: budget exhausted (spent %.4f, this round would reach %.4f > cap %.4f); not training",
                site.name,
                server_round,
                spent,
                budget.after(planned),
                budget.cap,
            )
            metrics = {NUM_EXAMPLES: 0, SITE_WEIGHT: 0, EPSILON: spent, EPSILON_CAP: budget.cap}
            content = TrainReply.exhausted(site.name, metrics).to_content()
            return Message(content=content, reply_to=msg)
    else:
        if not site.allows_non_private:
            raise PermissionError(
                f"{site.name} refuses to train without DP (privacy.enabled=false); "
                "its operator can allow it with allow-non-private=true in the node config"
            )
        dp = None

    global_state = Instruction.from_message(msg).state()
    bundle.set_state(global_state)
    progress = None
    if site.simulated and config.run_dir:
        progress = ProgressWriter(config.run_dir, site.name, server_round, plan.steps)
    started = time.time()
    result = train_local(
        bundle,
        site.train,
        plan,
        dp=_audit_fault(dp, site),
        seed=site.training_seed(server_round),
        anchor=global_state,
        on_step=progress,
    )
    update = bundle.get_state()
    mechanism = site.update_mechanism(dp, plan.sample_rate, result.steps)
    # Recorded (signed, fsynced) before the update leaves the site.
    entry = budget.record(
        run_id=str(context.run_id),
        server_round=server_round,
        site=site.name,
        mechanism=mechanism,
        update_sha256=state_sha256(update),
    )
    spent = entry.record.accounting.epsilon
    spent = math.inf if spent is None else spent
    if dp is not None and site.simulated:
        # PRV accounting takes about a second per new history; work out next
        # round's check now, while this (resident) worker waits for the
        # aggregator. A deployed site runs each round in a fresh process.
        budget.prefetch(planned)
    metrics = {
        NUM_EXAMPLES: site.public_rows() if dp else (site.declared_rows or len(site.train)),
        SITE_WEIGHT: 1,  # equal weights, for site-level DP at the aggregator
        TRAIN_LOSS: result.loss,
        STEPS: result.steps,
        EPSILON: spent,
        EPSILON_CAP: budget.cap,
        DELTA: budget.delta,
        NOISE_MULTIPLIER: mechanism.noise_multiplier,
        SAMPLE_RATE: plan.sample_rate,
        SECONDS: time.time() - started,
    }
    log.info("%s round %d: loss %.4f, epsilon %.3f", site.name, server_round, result.loss, spent)
    content = TrainReply.trained(site.name, update, metrics, entry).to_content()
    return Message(content=content, reply_to=msg)


def _audit_fault(dp: DpSettings | None, site) -> DpSettings | None:
    if dp is None:
        return dp
    added = noise_actually_added(dp.noise_multiplier, site.name, site.simulated)
    return dp if added == dp.noise_multiplier else dataclasses.replace(dp, noise_multiplier=added)


def _secure_stage(msg: Message, context: Context) -> Message:
    config, _, site = _setup(context)
    return secure_aggregation.handle(msg, context, config, site)


for _stage in (SETUP, ADVERTISE, SHARE, UNMASK):
    app.query(_stage)(_secure_stage)
app.train(MASK)(_secure_stage)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, bundle, site = _setup(context)
    privacy = config.privacy
    if privacy.enabled and privacy.evaluation != "clear":
        if privacy.evaluation == "off":
            raise PermissionError(f"{site.name}: this private run releases no evaluation (privacy.evaluation=off)")
        return _noised_evaluation(msg, context, config, site)
    if privacy.enabled and not site.allows_non_private:
        raise PermissionError(
            f"{site.name} refuses to send evaluation metrics in the clear (privacy.evaluation=clear); "
            "its operator can allow it with allow-non-private=true in the node config"
        )
    bundle.set_state(Instruction.from_message(msg).state())
    result = bundle.evaluate(site.validation)
    metrics = {
        NUM_EXAMPLES: result[NUM_EXAMPLES],
        SITE_WEIGHT: 1 if result[NUM_EXAMPLES] else 0,
        LOSS: result[LOSS],
        ACCURACY: result[ACCURACY],
    }
    if not result[NUM_EXAMPLES]:
        metrics.update({LOSS: 0.0, ACCURACY: 0.0})  # no validation part (data.validation-fraction=0)
    content = EvaluateReply(site.name, metrics).to_content()
    return Message(content=content, reply_to=msg)


def _noised_evaluation(msg: Message, context: Context, config: FedprivConfig, site) -> Message:
    """Correct and total counts of the validation rows, each plus Gaussian noise; recorded before they leave."""
    instruction = Instruction.from_message(msg)
    budget = site.budget
    mechanism = evaluation_mechanism(config, len(site.validation))
    if not budget.allows(mechanism):
        spent = budget.spent()
        log.warning(
            "%s round %d: budget exhausted (spent %.4f); not evaluating", site.name, instruction.server_round, spent
        )
        metrics = {NUM_EXAMPLES: 0, SITE_WEIGHT: 0, EPSILON: spent, EPSILON_CAP: budget.cap}
        return Message(content=EvaluateReply(site.name, metrics, EXHAUSTED).to_content(), reply_to=msg)
    site.model.set_state(instruction.state())
    result = site.model.evaluate(site.validation)
    total = int(result[NUM_EXAMPLES])
    correct = round(result[ACCURACY] * total) if total else 0
    std = config.privacy.evaluation_noise
    rng = np.random.default_rng([site.training_seed(instruction.server_round), 1])  # secret when deployed
    noisy_correct, noisy_total = (float(x + rng.normal(0.0, std)) for x in (correct, total))
    entry = budget.record(
        run_id=str(context.run_id),
        server_round=instruction.server_round,
        site=site.name,
        mechanism=mechanism,
        update_sha256=hashlib.sha256(canonical_json([noisy_correct, noisy_total])).hexdigest(),
    )
    # Only post-processing of the two noisy counts from here on.
    shown_total = max(noisy_total, 1.0)
    metrics = {
        NUM_EXAMPLES: round(shown_total),
        SITE_WEIGHT: 1,
        ACCURACY: min(max(noisy_correct / shown_total, 0.0), 1.0),
        NOISY_CORRECT: noisy_correct,
        NOISY_TOTAL: noisy_total,
        EPSILON: entry.record.accounting.epsilon,
    }
    return Message(content=EvaluateReply(site.name, metrics).to_content(), reply_to=msg)
