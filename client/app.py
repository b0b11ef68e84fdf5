"""The fedpriv ClientApp: a site's answer to the aggregator's train/evaluate messages."""

from __future__ import annotations

import json
import logging
import math
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpriv.client.runtime import WORKER
from fedpriv.client.site import noise_multiplier
from fedpriv.client.training import DpSettings, LocalPlan, train_local
from fedpriv.common.accounting import Release, prefetch, steps_per_round
from fedpriv.common.config import FedprivConfig
from fedpriv.common.logs import CLIENT_LOG
from fedpriv.common.progress import ProgressWriter
from fedpriv.common.records import Mechanism, state_sha256
from fedpriv.common.transport import from_record, to_record

log = logging.getLogger(CLIENT_LOG)

OK = "ok"
EXHAUSTED = "budget-exhausted"

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
        proximal_mu=float(msg.content["config"].get("proximal-mu", 0.0)),
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, bundle, site = _setup(context)
    server_round = int(msg.content["config"].get("server-round", 0))
    plan = _plan(config, msg)
    privacy = config.privacy
    budget = site.budget

    if privacy.enabled:
        dp = DpSettings(noise_multiplier(config), privacy.max_grad_norm)
        release = Release(dp.noise_multiplier, plan.sample_rate, plan.steps)
        if not budget.allows(release):
            spent = budget.spent()
            log.warning(
                "%s round %d: budget exhausted (spent %.4f, this round would reach %.4f > cap %.4f); not training",
                site.name, server_round, spent, budget.after(release), budget.cap,
            )
            metrics = {"num-examples": 0, "site-weight": 0, "epsilon": spent, "epsilon-cap": budget.cap}
            content = RecordDict(
                {"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name, "status": EXHAUSTED})}
            )
            return Message(content=content, reply_to=msg)
    else:
        if not site.allows_non_private:
            raise PermissionError(
                f"{site.name} refuses to train without DP (privacy.enabled=false); "
                "its operator can allow it with allow-non-private=true in the node config"
            )
        dp = None

    global_state = from_record(msg.content["arrays"])
    bundle.set_state(global_state)
    progress = None
    if site.simulated and config.run_dir:
        progress = ProgressWriter(config.run_dir, site.name, server_round, plan.steps)
    started = time.time()
    result = train_local(
        bundle,
        site.train,
        plan,
        dp=dp,
        seed=site.training_seed(server_round),
        anchor=global_state,
        on_step=progress,
    )
    update = bundle.get_state()
    mechanism = Mechanism(
        noise_multiplier=dp.noise_multiplier if dp else 0.0,
        sample_rate=plan.sample_rate,
        steps=result.steps,
        max_grad_norm=privacy.max_grad_norm,
        dataset_size=len(site.train),
    )
    # Recorded (signed, fsynced) before the update leaves the site.
    entry = budget.record(
        run_id=str(context.run_id),
        server_round=server_round,
        site=site.name,
        mechanism=mechanism,
        update_sha256=state_sha256(update),
    )
    spent = entry["record"]["accounting"]["epsilon"]
    spent = math.inf if spent is None else spent
    if dp is not None and site.simulated:
        # PRV accounting takes about a second per new history; work out next
        # round's check now, while this (resident) worker waits for the
        # aggregator. A deployed site runs each round in a fresh process.
        prefetch([*budget.releases(), release], budget.delta, budget.accountant)
    metrics = {
        "num-examples": len(site.train),
        "site-weight": 1,  # equal weights, for site-level DP at the aggregator
        "train-loss": result.loss,
        "steps": result.steps,
        "epsilon": spent,
        "epsilon-cap": budget.cap,
        "delta": budget.delta,
        "noise-multiplier": mechanism.noise_multiplier,
        "sample-rate": plan.sample_rate,
        "seconds": time.time() - started,
    }
    log.info("%s round %d: loss %.4f, epsilon %.3f", site.name, server_round, result.loss, spent)
    content = RecordDict(
        {
            "arrays": to_record(update),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"name": site.name, "status": OK}),
            "privacy": ConfigRecord({"entry": json.dumps(entry)}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, bundle, site = _setup(context)
    bundle.set_state(from_record(msg.content["arrays"]))
    result = bundle.evaluate(site.validation)
    metrics = {
        "num-examples": result["num-examples"],
        "site-weight": 1 if result["num-examples"] else 0,
        "loss": result["loss"],
        "accuracy": result["accuracy"],
    }
    if not result["num-examples"]:
        metrics.update(loss=0.0, accuracy=0.0)  # no validation part (data.validation-fraction=0)
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name, "status": OK})})
    return Message(content=content, reply_to=msg)
