"""The fedpriv ClientApp: a site's answer to the aggregator's train/evaluate messages."""

from __future__ import annotations

import logging
import math
import time
import warnings

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import noise_multiplier, resident_model, site_data, training_seed
from client.training import DpSettings, LocalPlan, train_local
from common.accounting import Release, epsilon, steps_per_round
from common.config import FedprivConfig
from common.data import LabelSet
from common.progress import ProgressWriter
from common.transport import from_record, to_record

log = logging.getLogger("fedpriv.client")
warnings.filterwarnings("ignore", message="Full backward hook is firing")

PRIVACY_STATE = "fedpriv-privacy"

app = ClientApp()


def _setup(context: Context):
    config = FedprivConfig.from_run_config(context.run_config)
    labels = LabelSet.load(config.data.labels)
    bundle = resident_model(config, labels)
    site = site_data(context, config, labels, bundle)
    return config, bundle, site


def _history(context: Context) -> list[Release]:
    record = context.state.config_records.get(PRIVACY_STATE)
    if record is None:
        return []
    return [Release(float(s), float(q), int(n)) for s, q, n in zip(record["noise"], record["rate"], record["steps"])]


def _remember(context: Context, history: list[Release]) -> None:
    context.state[PRIVACY_STATE] = ConfigRecord(
        {
            "noise": [r.noise_multiplier for r in history],
            "rate": [r.sample_rate for r in history],
            "steps": [r.steps for r in history],
        }
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, bundle, site = _setup(context)
    server_round = int(msg.content["config"].get("server-round", 0))
    global_state = from_record(msg.content["arrays"])
    bundle.set_state(global_state)

    optimizer, learning_rate = config.optimizer_settings()
    plan = LocalPlan(
        steps=steps_per_round(config.train.local_epochs, config.train.sample_rate),
        sample_rate=config.train.sample_rate,
        optimizer=optimizer,
        learning_rate=learning_rate,
        momentum=config.train.momentum,
        weight_decay=config.train.weight_decay,
        max_physical_batch=config.train.max_physical_batch,
        proximal_mu=float(msg.content["config"].get("proximal-mu", 0.0)),
    )
    privacy = config.privacy
    dp = DpSettings(noise_multiplier(config), privacy.max_grad_norm) if privacy.enabled else None

    progress = None
    if site.simulated and config.run_dir:
        progress = ProgressWriter(config.run_dir, site.name, server_round, plan.steps)
    started = time.time()
    result = train_local(
        bundle,
        site.train,
        plan,
        dp=dp,
        seed=training_seed(config, site, server_round),
        anchor=global_state,
        on_step=progress,
    )
    history = _history(context)
    if dp is not None:
        history.append(Release(dp.noise_multiplier, plan.sample_rate, result.steps))
        _remember(context, history)
        spent = epsilon(history, privacy.delta, privacy.accountant)
    else:
        spent = math.inf
    metrics = {
        "num-examples": len(site.train),
        "train-loss": result.loss,
        "steps": result.steps,
        "epsilon": spent,
        "delta": privacy.delta if dp else 0.0,
        "noise-multiplier": dp.noise_multiplier if dp else 0.0,
        "sample-rate": plan.sample_rate,
        "seconds": time.time() - started,
    }
    log.info("%s round %d: loss %.4f, epsilon %.3f", site.name, server_round, result.loss, spent)
    content = RecordDict(
        {
            "arrays": to_record(bundle.get_state()),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"name": site.name}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, bundle, site = _setup(context)
    bundle.set_state(from_record(msg.content["arrays"]))
    result = bundle.evaluate(site.validation)
    metrics = {"num-examples": result["num-examples"], "loss": result["loss"], "accuracy": result["accuracy"]}
    if not result["num-examples"]:
        metrics.update(loss=0.0, accuracy=0.0)  # no validation part (data.validation-fraction=0)
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})})
    return Message(content=content, reply_to=msg)
