"""The fedpriv ClientApp: a site's answer to the aggregator's train/evaluate messages."""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpriv.client import secure_aggregation
from fedpriv.client.audit_fault import dp_actually_used
from fedpriv.client.progress import ProgressWriter
from fedpriv.client.release import Made, Proposal, Withheld, release
from fedpriv.client.runtime import WORKER
from fedpriv.client.site import clear_evaluation_mechanism, local_plan
from fedpriv.client.training import DpSettings, train_local
from fedpriv.common.config import FedprivConfig
from fedpriv.common.logs import CLIENT_LOG
from fedpriv.common.privacy.plan import plan_for
from fedpriv.common.privacy.records import canonical_json, state_sha256
from fedpriv.common.wire.protocol import (
    ACCURACY,
    DELTA,
    EPSILON,
    EPSILON_CAP,
    LOSS,
    NOISE_MULTIPLIER,
    NOISY_CORRECT,
    NOISY_TOTAL,
    NUM_EXAMPLES,
    REFUSED,
    SAMPLE_RATE,
    SECONDS,
    SITE_WEIGHT,
    STEPS,
    TRAIN_LOSS,
    EvaluateReply,
    Instruction,
    TrainReply,
    withheld_content,
)
from fedpriv.common.wire.secure_protocol import MASK, QUERY_STAGES

log = logging.getLogger(CLIENT_LOG)


def _setup(context: Context):
    """This node's site as the worker keeps it: built at its first message, then reused."""
    config = FedprivConfig.from_run_config(context.run_config)
    site = WORKER.site(context, config)
    return config, site.model, site


def withheld_reply(msg: Message, site_name: str, outcome: Withheld) -> Message:
    return Message(content=withheld_content(site_name, outcome.status, outcome.reason, outcome.metrics), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    config, bundle, site = _setup(context)
    instruction = Instruction.from_message(msg)
    server_round = instruction.server_round
    plan = local_plan(config, instruction.proximal_mu)
    privacy = config.privacy
    dp = None
    if privacy.enabled:
        dp = DpSettings(plan_for(config).noise_multiplier, privacy.max_grad_norm, site.normaliser())
    planned = site.update_mechanism(dp, plan.sample_rate, plan.steps) if dp else None
    proposal = Proposal("update", planned, mode=config.model.mode)

    def compute() -> Made:
        global_state = instruction.state()
        bundle.set_state(global_state)
        progress = None
        if site.simulated and config.run_dir:
            progress = ProgressWriter(config.run_dir, site.name, server_round, plan.steps)
        started = time.time()
        result = train_local(
            bundle,
            site.train,
            plan,
            dp=dp_actually_used(dp, site.name, site.fault),
            seed=site.training_seed(server_round),
            anchor=global_state,
            on_step=progress,
        )
        update = bundle.get_state()
        mechanism = site.update_mechanism(dp, plan.sample_rate, result.steps)
        metrics = {
            NUM_EXAMPLES: site.public_rows() if dp else (site.declared_rows or len(site.train)),
            SITE_WEIGHT: 1,  # equal weights, for site-level DP at the aggregator
            TRAIN_LOSS: result.loss,
            STEPS: result.steps,
            NOISE_MULTIPLIER: mechanism.noise_multiplier,
            SAMPLE_RATE: plan.sample_rate,
            SECONDS: time.time() - started,
        }
        return Made(update, mechanism, state_sha256(update), metrics)

    outcome = release(site, proposal, compute, run_id=str(context.run_id), server_round=server_round)
    if isinstance(outcome, Withheld):
        return withheld_reply(msg, site.name, outcome)
    budget = site.budget
    if planned is not None:
        # PRV accounting takes about a second per new history; work out next
        # round's check now, while this resident worker (a simulation's, or a
        # deployed site's) waits for the aggregator.
        budget.prefetch(planned)
    metrics = {**outcome.metrics, EPSILON: outcome.epsilon, EPSILON_CAP: budget.cap, DELTA: budget.delta}
    log.info("%s round %d: loss %.4f, epsilon %.3f", site.name, server_round, metrics[TRAIN_LOSS], outcome.epsilon)
    content = TrainReply.trained(site.name, outcome.payload, metrics, outcome.entry).to_content()
    return Message(content=content, reply_to=msg)


def _secure_stage(msg: Message, context: Context) -> Message:
    config, _, site = _setup(context)
    return secure_aggregation.handle(msg, context, config, site)


def evaluate(msg: Message, context: Context) -> Message:
    config, bundle, site = _setup(context)
    privacy = config.privacy
    instruction = Instruction.from_message(msg)
    if privacy.enabled and privacy.evaluation == "off":
        # The run's own privacy plan has no room for an evaluation release.
        reason = f"{site.name} refuses: this private run planned no evaluation (privacy.evaluation=off)"
        log.warning("%s round %d: refused: %s", site.name, instruction.server_round, reason)
        return withheld_reply(msg, site.name, Withheld(REFUSED, reason, {NUM_EXAMPLES: 0, SITE_WEIGHT: 0}))
    noised = privacy.enabled and privacy.evaluation == "noised"
    planned = plan_for(config).evaluation_mechanism(len(site.validation)) if noised else None

    def compute() -> Made:
        bundle.set_state(instruction.state())
        result = bundle.evaluate(site.validation)
        total = int(result[NUM_EXAMPLES])
        if planned is None:
            metrics = {
                NUM_EXAMPLES: total,
                SITE_WEIGHT: 1 if total else 0,
                LOSS: result[LOSS] if total else 0.0,  # no validation part (data.validation-fraction=0)
                ACCURACY: result[ACCURACY] if total else 0.0,
            }
            released = [metrics[NUM_EXAMPLES], metrics[LOSS], metrics[ACCURACY]]
            return Made(metrics, clear_evaluation_mechanism(total), _digest(released), metrics)
        correct = round(result[ACCURACY] * total) if total else 0
        rng = np.random.default_rng([site.training_seed(instruction.server_round), 1])  # secret when deployed
        std = privacy.evaluation_noise
        noisy_correct, noisy_total = (float(x + rng.normal(0.0, std)) for x in (correct, total))
        # Only post-processing of the two noisy counts from here on.
        shown_total = max(noisy_total, 1.0)
        metrics = {
            NUM_EXAMPLES: round(shown_total),
            SITE_WEIGHT: 1,
            ACCURACY: min(max(noisy_correct / shown_total, 0.0), 1.0),
            NOISY_CORRECT: noisy_correct,
            NOISY_TOTAL: noisy_total,
        }
        return Made(metrics, planned, _digest([noisy_correct, noisy_total]), metrics)

    proposal = Proposal("evaluation", planned)
    outcome = release(site, proposal, compute, run_id=str(context.run_id), server_round=instruction.server_round)
    if isinstance(outcome, Withheld):
        return withheld_reply(msg, site.name, outcome)
    metrics = dict(outcome.metrics)
    if planned is not None:
        metrics[EPSILON] = outcome.epsilon
    return Message(content=EvaluateReply(site.name, metrics).to_content(), reply_to=msg)


def _digest(released: list) -> str:
    return hashlib.sha256(canonical_json(released)).hexdigest()


def register(app: ClientApp) -> ClientApp:
    """Puts the site's handlers on `app`: this site's ClientApp below, or the one Flower's simulation runs."""
    app.train()(train)
    app.train(MASK)(_secure_stage)
    for stage in QUERY_STAGES:
        app.query(stage)(_secure_stage)
    app.evaluate()(evaluate)
    return app


# The ClientApp of a site: the only one a deployed site's worker runs (flower_app.CLIENT_APP).
app = register(ClientApp())
