"""The aggregator's round loop.

Flower's `Strategy.start` runs a fixed loop with no place to checkpoint, to
resume or to look at each site's reply, so fedpriv drives the strategy's
configure/aggregate steps itself: every round ends with its events in the run
directory and a checkpoint on disk, and a restarted aggregator continues from
the last completed round.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Strategy

from fedpriv.common.config import FedprivConfig
from fedpriv.common.logs import SERVER_LOG
from fedpriv.common.privacy import signing
from fedpriv.common.privacy.ledger import Ledger
from fedpriv.common.privacy.plan import plan_for
from fedpriv.common.privacy.records import PrivacyRecord, SiteExhausted, state_sha256
from fedpriv.common.run_events import (
    AllBudgetsExhausted,
    AllSitesRefused,
    CentralEvaluate,
    FederatedEvaluate,
    Resumed,
    RoundEnd,
    RoundStart,
    SiteBudgetExhausted,
    SiteError,
    SiteEvaluate,
    SiteLevelBudgetExhausted,
    SiteLevelRelease,
    SiteRefused,
    SiteRejected,
    SiteTrain,
    TrainAggregate,
)
from fedpriv.common.rundir import RunDirectory
from fedpriv.common.wire.protocol import (
    EPSILON,
    OK,
    REFUSED,
    EvaluateReply,
    ProtocolError,
    TrainReply,
    from_record,
    sender,
    to_record,
)
from fedpriv.server import checkpoint, site_level_dp
from fedpriv.server.admission import Admitted, Exhausted, Failed, Refused, admit
from fedpriv.server.canary_observer import WEIGHT, CanaryObserver
from fedpriv.server.distributed_step import ServerOptimizer
from fedpriv.server.exchange import exchange
from fedpriv.server.global_model import GlobalModel
from fedpriv.server.ledger_heads import ReleaseHeads
from fedpriv.server.secure_round import SecureRound, unflatten
from fedpriv.server.strategy import restore_strategy, strategy_state
from fedpriv.server.update_checks import ReleaseHistory, RoundContext

log = logging.getLogger(SERVER_LOG)


@dataclass
class TailAverage:
    """Running mean of the global models of the last rounds: post-processing, so free under DP."""

    start_round: int
    mean: dict[str, np.ndarray] = field(default_factory=dict)
    count: int = 0

    def update(self, server_round: int, state: dict[str, np.ndarray]) -> None:
        if server_round < self.start_round:
            return
        self.count += 1
        if not self.mean:
            self.mean = {k: v.astype(np.float64) for k, v in state.items()}
        else:
            for k, v in state.items():
                self.mean[k] += (v - self.mean[k]) / self.count

    def release(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model to evaluate and export: the tail average once it has begun."""
        if not self.count:
            return state
        return {k: v.astype(state[k].dtype) for k, v in self.mean.items()}


class Federation:
    def __init__(
        self,
        config: FedprivConfig,
        grid: Grid,
        strategy: Strategy,
        model: GlobalModel,
        run: RunDirectory,
        ledger: Ledger,
        run_id: str = "",
    ):
        self.config, self.grid, self.strategy, self.model, self.run = config, grid, strategy, model, run
        self.ledger = ledger
        self.heads = ReleaseHeads(ledger)  # receipts go through it; it signs each round's head
        self.run_id = run_id
        self.history = ReleaseHistory()  # the releases sites sent in this run: a record is accepted once
        self.node_names = run.node_names()  # a deployment's registrations: a site that drops names no one
        # Nodes whose last answer was a refusal or a spent budget: they will say the same next round. The run
        # ends for them only once every connected node is one (a round may ask only some of the sites).
        self.declining: set[int] = set()
        p = config.privacy
        self.secure = (
            SecureRound(grid, config, run_id, model.bundle.trainable_size, self.history, run.log)
            if p.secure_aggregation
            else None
        )
        self.server_optimizer = (
            ServerOptimizer(config, model.bundle.trainable_names) if p.noise == "distributed" else None
        )
        self.normaliser = (
            plan_for(config).federation_normaliser(model.training_rows) if p.noise == "distributed" else 1.0
        )
        self.observer = CanaryObserver.for_run(run, config, model.bundle.model.config.encoder.hidden_size)
        self.evaluation_rounds = set(config.federated_evaluation_rounds())
        self._site_level_releases = 0
        tail_rounds = int(math.floor(config.strategy.tail_average * config.rounds))
        self.average = TailAverage(start_round=config.rounds - tail_rounds + 1 if tail_rounds else config.rounds + 1)

    def _resume_or_start(self) -> tuple[int, dict[str, np.ndarray]]:
        saved = checkpoint.latest(self.run.checkpoints)
        if saved is None:
            state = self.model.initial_state()
            if self.model.test is not None:
                self._central(0, state)
            return 1, state
        restore_strategy(self.strategy, saved.strategy)
        if self.server_optimizer is not None:
            self.server_optimizer.restore(saved.strategy)
        self._site_level_releases = sum(
            1 for r in self.ledger.records() if isinstance(r, PrivacyRecord) and r.party == "aggregator"
        )
        site_level_dp.replay(self.strategy, self._site_level_releases, self.config)
        self.average.mean, self.average.count = saved.average, saved.averaged_rounds
        if saved.round not in {e.round for e in self.run.read(RoundEnd)}:
            # Stopped between writing the round's checkpoint and logging its end: the round is complete.
            self.run.log(RoundEnd(round=saved.round, seconds=None, recovered=True))
        self.run.log(Resumed(round=saved.round))
        log.info("resuming after round %d from %s", saved.round, self.run.checkpoints)
        return saved.round + 1, saved.state

    def run_rounds(self) -> dict[str, np.ndarray]:
        first, state = self._resume_or_start()
        for rnd in range(first, self.config.rounds + 1):
            started = time.time()
            # The hash of the model sent out ties a resumed round to the checkpoint it continued from.
            self.run.log(RoundStart(round=rnd, rounds=self.config.rounds, **{"global-sha256": state_sha256(state)}))
            arrays = to_record(state)
            context = RoundContext(
                run_id=self.run_id,
                round=rnd,
                sent=state,
                max_update_norm=self.config.strategy.max_update_norm,
                max_examples=self.config.strategy.max_site_examples,
            )
            train = self._secure_train if self.secure is not None else self._plain_train
            state, stop = train(rnd, arrays, state, context)
            if stop:
                break
            self.average.update(rnd, state)
            if rnd in self.evaluation_rounds:
                self._federated_evaluation(rnd, to_record(state))
            every = self.config.central_eval_every
            if rnd == self.config.rounds or (every and rnd % every == 0):
                self._central(rnd, self.average.release(state))
            # Before the checkpoint: a round the checkpoints show as done always has its signed head.
            self.heads.close_round(self.run_id, rnd)
            checkpoint.save(
                self.run.checkpoints,
                checkpoint.Checkpoint(
                    round=rnd,
                    state=state,
                    average=self.average.mean,
                    averaged_rounds=self.average.count,
                    signer=signing.fingerprint(signing.public_b64(self.ledger.key)) if self.ledger.key else "",
                    strategy={
                        **strategy_state(self.strategy),
                        **(self.server_optimizer.state() if self.server_optimizer else {}),
                    },
                ),
                keep=self.config.keep_checkpoints,
            )
            self.run.log(RoundEnd(round=rnd, seconds=round(time.time() - started, 3)))
        return self.average.release(state)

    def _plain_train(
        self, rnd: int, arrays: ArrayRecord, state: dict[str, np.ndarray], context: RoundContext
    ) -> tuple[dict[str, np.ndarray], bool]:
        """One round of training with updates in the clear; (the new global model, whether the run must end)."""
        try:
            messages = self.strategy.configure_train(rnd, arrays, ConfigRecord(), self.grid)
        except PrivacyBudgetExhausted as error:
            self.run.log(SiteLevelBudgetExhausted(round=rnd, reason=str(error)))
            log.info("round %d: the federation's site-level privacy budget is spent; ending the run", rnd)
            return state, True
        replies = exchange(self.grid, messages, self.config.strategy.round_timeout)
        accepted, exhausted, refused = self._record_train(rnd, replies, context)
        if self._nobody_trains(rnd, bool(accepted), exhausted, refused):
            return state, True
        if self.observer is not None:
            replies_by_site = {r.site: r for r in map(TrainReply.from_message, accepted)}
            canary = replies_by_site.get(self.observer.site)
            if canary is not None:
                self.observer.observe_update(rnd, state, canary.update_state())
        new_arrays, aggregated = self.strategy.aggregate_train(rnd, accepted)
        if new_arrays is None:
            log.warning("round %d: no usable site update; the global model is unchanged", rnd)
        else:
            state = from_record(new_arrays)
            self._record_site_level_release(rnd, state)
        self.run.log(TrainAggregate(round=rnd, sites=len(accepted), **dict(aggregated or {})))
        return state, False

    def _secure_train(
        self, rnd: int, arrays: ArrayRecord, state: dict[str, np.ndarray], context: RoundContext
    ) -> tuple[dict[str, np.ndarray], bool]:
        """One round under secure aggregation: only the sum of the survivors' vectors is ever seen here."""
        assert self.secure is not None
        outcome = self.secure.run(rnd, arrays, context)
        for site, entry in sorted(outcome.entries.items()):
            self.heads.receipt(rnd, site, entry)
            self.heads.reported_in(site, outcome.metrics.get(site, {}))
            self.run.log(SiteTrain(round=rnd, site=site, **outcome.metrics.get(site, {})))
        for site in outcome.exhausted:
            self.ledger.append(SiteExhausted(round=rnd, site=site))
        self.declining -= self.secure.nodes_of(outcome.entries)
        self.declining |= outcome.declining
        if outcome.total is None:
            exhausted, refused = len(outcome.exhausted), len(outcome.refused)
            return state, self._nobody_trains(rnd, bool(outcome.entries), exhausted, refused)
        names = self.model.bundle.trainable_names
        summed = unflatten(outcome.total, names, state)
        if self.observer is not None:
            self.observer.observe(rnd, state, summed[WEIGHT], "sum", outcome.survivors)
        if self.server_optimizer is not None:
            state = self.server_optimizer.step(state, summed, self.normaliser)
        else:
            count = len(outcome.survivors)
            state = {k: (v + summed[k] / count).astype(v.dtype) if k in summed else v for k, v in state.items()}
        self.run.log(TrainAggregate(round=rnd, sites=len(outcome.survivors), dropped=len(outcome.dropped), secure=True))
        return state, False

    def _record_site_level_release(self, rnd: int, state: dict[str, np.ndarray]) -> None:
        spent = self.strategy.privacy_spent() if hasattr(self.strategy, "privacy_spent") else None
        if spent is None or spent.num_releases <= self._site_level_releases:
            return
        self._site_level_releases = spent.num_releases
        record = site_level_dp.release_record(self.strategy, self.config, self.run_id, rnd, state_sha256(state))
        self.ledger.append(record)
        self.run.log(SiteLevelRelease(round=rnd, epsilon=spent.epsilon, delta=spent.delta))

    def _nobody_trains(self, rnd: int, accepted: bool, exhausted: int, refused: int) -> bool:
        """Whether the run must end: no update came, and every connected site will say what it said last.

        Sites that refused or are out of budget say the same next round; a site not asked this round (the
        strategy samples a fraction of them), or whose reply failed or was rejected, may still train.
        """
        if accepted or not (exhausted or refused):
            return False
        waiting = set(self.grid.get_node_ids()) - self.declining
        if waiting:
            log.info("round %d: no update; %d connected site(s) may still train in a later round", rnd, len(waiting))
            return False
        if refused:
            # The same settings meet the same policies next round: say so once and stop.
            self.run.log(AllSitesRefused(round=rnd, sites=refused, exhausted=exhausted))
            log.warning("round %d: no site accepts this run's settings (see the site-refused events); ending", rnd)
        else:
            self.run.log(AllBudgetsExhausted(round=rnd, sites=exhausted))
            log.info("round %d: every site has exhausted its privacy budget; ending the run", rnd)
        return True

    def _record_train(
        self, rnd: int, replies: list[Message], context: RoundContext | None = None
    ) -> tuple[list[Message], int, int]:
        """The updates admitted to the aggregate, and how many sites said their budget is spent or refused."""
        accepted, exhausted, refused = [], 0, 0
        for reply in replies:
            verdict = admit(reply, self.config.privacy.enabled, context, self.history)
            site = verdict.site
            if isinstance(verdict, Failed):
                site = self._name(reply, site)
                self.run.log(SiteError(round=rnd, site=site, reason=verdict.reason))
                log.warning("round %d: %s failed: %s", rnd, site, verdict.reason)
            elif isinstance(verdict, Exhausted):
                exhausted += 1
                self.declining.add(reply.metadata.src_node_id)
                metrics = dict(verdict.reply.metrics)
                self.run.log(SiteBudgetExhausted(round=rnd, site=site, **metrics))
                self.ledger.append(SiteExhausted(round=rnd, site=site, epsilon=metrics.get(EPSILON)))
                self.heads.reported_in(site, metrics)
                log.info("round %d: %s has exhausted its privacy budget and did not train", rnd, site)
            elif isinstance(verdict, Refused):
                refused += 1
                self.declining.add(reply.metadata.src_node_id)
                self.run.log(SiteRefused(round=rnd, site=site, reason=verdict.reason, phase="train"))
                log.warning("round %d: %s refused the round: %s", rnd, site, verdict.reason)
            elif isinstance(verdict, Admitted):
                self.declining.discard(reply.metadata.src_node_id)
                if verdict.entry is not None:
                    self.heads.receipt(rnd, site, verdict.entry)
                self.heads.reported_in(site, dict(verdict.reply.metrics))
                self.run.log(SiteTrain(round=rnd, site=site, **dict(verdict.reply.metrics)))
                accepted.append(reply)
            else:
                self.run.log(SiteRejected(round=rnd, site=site, reason=verdict.reason))
                log.warning("round %d: update of %s rejected: %s", rnd, site, verdict.reason)
        return accepted, exhausted, refused

    def _name(self, reply: Message, fallback: str) -> str:
        """The site an error reply came from: Flower's error replies carry only a node id."""
        return self.node_names.get(reply.metadata.src_node_id, fallback)

    def _federated_evaluation(self, rnd: int, arrays: ArrayRecord) -> None:
        messages = list(self.strategy.configure_evaluate(rnd, arrays, ConfigRecord(), self.grid))
        if not messages:
            return
        replies = exchange(self.grid, messages, self.config.strategy.round_timeout)
        answered = []
        for reply in replies:
            if reply.has_error():
                site = self._name(reply, sender(reply))
                self.run.log(SiteError(round=rnd, site=site, reason=reply.error.reason, phase="evaluate"))
                continue
            try:
                decoded = EvaluateReply.from_message(reply)
            except ProtocolError as error:
                self.run.log(SiteError(round=rnd, site=sender(reply), reason=str(error), phase="evaluate"))
                continue
            if decoded.status == REFUSED:
                self.run.log(SiteRefused(round=rnd, site=decoded.site, reason=decoded.reason, phase="evaluate"))
                log.warning("round %d: %s refused to evaluate: %s", rnd, decoded.site, decoded.reason)
                continue
            self.run.log(SiteEvaluate(round=rnd, site=decoded.site, status=decoded.status, **dict(decoded.metrics)))
            self.heads.reported_in(decoded.site, dict(decoded.metrics))
            if decoded.status == OK:
                answered.append(reply)
        aggregated = self.strategy.aggregate_evaluate(rnd, answered)
        if aggregated is not None:
            self.run.log(FederatedEvaluate(round=rnd, **dict(aggregated)))

    def _central(self, rnd: int, state: dict[str, np.ndarray]) -> None:
        result = self.model.evaluate(state)
        if result is not None:
            self.run.log(CentralEvaluate(round=rnd, **result))
            log.info("round %d: central accuracy %.4f", rnd, result["accuracy"])
