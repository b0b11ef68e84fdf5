"""The aggregator's side of secure aggregation: it routes the stages and learns only the sum.

Each stage is one exchange of messages with the cohort (see
`fedpriv.common.wire.secure_protocol`). Keys are agreed once (advertise, after
setup for nodes it has not named yet) and serve round after round: a steady
round is two exchanges, mask and unmask. Keys are agreed again before a round
when the nodes available are not those they were agreed among (a site joined
or left), or when the last round did not go cleanly (a site dropped, was
rejected, refused, asked for new keys because its state is gone, or the round
was abandoned). A site that answers a mask request for keys it does not hold
(`REKEY`) computed nothing: it misses that round, counted as dropped, and is
back after the new agreement.

A site that does not answer a stage is left out of the later ones of the
round: its masks are removed with what the survivors reveal. Below the
threshold the round is abandoned: nothing is applied, the run goes on. The
masked vectors are admitted like plain updates (signed ledger entry, its hash
of this very masked vector, DP noise in a private federation, a new record of
this run and round), since they are all the aggregator can check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedpriv.common.config import FedprivConfig
from fedpriv.common.logs import SERVER_LOG
from fedpriv.common.privacy.ledger import verify_entry
from fedpriv.common.privacy.records import LedgerEntry, PrivacyRecord
from fedpriv.common.run_events import (
    RunEvent,
    SecureKeys,
    SecureRoundAbandoned,
    SecureStage,
    SiteBudgetExhausted,
    SiteError,
    SiteRefused,
    SiteRejected,
    SiteRekey,
)
from fedpriv.common.wire.protocol import METRICS, REFUSED, ProtocolError, sender, withheld
from fedpriv.common.wire.secagg import AggregatorSession, RoundAbandoned, SecAggConfig, SecAggError, default_threshold
from fedpriv.common.wire.secure_protocol import (
    ADVERTISE,
    MASK,
    SETUP,
    UNMASK,
    StageReply,
    StageRequest,
    advertisements_to_data,
    masked_sha256,
    message_type,
    rekey_reason,
    unmask_from_data,
)
from fedpriv.server.exchange import exchange
from fedpriv.server.update_checks import ReleaseHistory, RoundContext, metrics_problem

log = logging.getLogger(SERVER_LOG)

SCALE, BOUND = 2.0**20, 2**40  # the sites' encoding (client.secure_aggregation.encoding)
SETUP_TIMEOUT = 300.0  # the key-exchange stages are small; only masking trains


@dataclass
class SecureOutcome:
    """What one secure round gave: the sum of the survivors' vectors, or why there is none."""

    total: np.ndarray | None
    survivors: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    entries: dict[str, LedgerEntry] = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)
    exhausted: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # sites whose own policy refused the round
    declining: set[int] = field(default_factory=set)  # the nodes of the refused and exhausted sites
    rekey: list[str] = field(default_factory=list)  # sites that held no keys of the round's agreement
    abandoned: str = ""


@dataclass
class _Epoch:
    """Keys agreed with a cohort: the session, the nodes it was agreed among, and why it may serve no more."""

    session: AggregatorSession
    nodes: frozenset[int]
    node_of: dict[str, int]
    forward: dict[str, bytes]  # the advertisements, sent with the epoch's first mask request
    stale: str = ""  # why keys must be agreed again before the next round ("" while they serve)


class SecureRound:
    def __init__(
        self,
        grid: Grid,
        config: FedprivConfig,
        run_id: str,
        length: int,
        history: ReleaseHistory,
        log_event: Callable[[RunEvent], None],
    ):
        self.grid, self.config, self.run_id, self.length = grid, config, run_id, length
        self.history, self.log_event = history, log_event
        self.names: dict[int, str] = {}  # node -> site, learnt at setup and kept for the run
        self.epoch: _Epoch | None = None

    def _exchange(
        self, rnd: int, stage: str, requests: dict[int, StageRequest], timeout: float, outcome: SecureOutcome
    ) -> dict[str, Message]:
        """Sends a stage's requests; the replies by site (error replies, refusals and strangers are logged and
        left out)."""
        messages = [
            Message(content=r.to_content(), message_type=message_type(stage), dst_node_id=node)
            for node, r in requests.items()
        ]
        # Who was asked what, before waiting: an operator (or a test) can tell a site that never got a
        # stage from one that got it and fell silent.
        asked = sorted(self.names.get(node, str(node)) for node in requests)
        self.log_event(SecureStage(round=rnd, stage=stage, sites=asked))
        replies: dict[str, Message] = {}
        for reply in exchange(self.grid, messages, timeout):
            node = reply.metadata.src_node_id
            site = self.names.get(node) or sender(reply)
            held = withheld(reply)
            if reply.has_error():
                self.log_event(SiteError(round=rnd, site=site, reason=reply.error.reason, phase=stage))
                log.warning("round %d: %s failed at %s: %s", rnd, site, stage, reply.error.reason)
            elif (why := rekey_reason(reply)) is not None:
                outcome.rekey.append(site)
                self.log_event(SiteRekey(round=rnd, site=site, reason=why, phase=stage))
                log.warning("round %d: %s holds no keys of this round: %s", rnd, site, why)
            elif held is not None and held[0] == REFUSED:
                outcome.refused.append(site)
                outcome.declining.add(node)
                self.log_event(SiteRefused(round=rnd, site=site, reason=held[1], phase=stage))
                log.warning("round %d: %s refused the round at %s: %s", rnd, site, stage, held[1])
            elif held is not None:
                outcome.exhausted.append(site)
                outcome.declining.add(node)
                metrics: dict = dict(reply.content.metric_records.get(METRICS) or {})
                self.log_event(SiteBudgetExhausted(round=rnd, site=site, **metrics))
            elif stage == SETUP and site in replies:
                self.log_event(SiteRejected(round=rnd, site=site, reason="two nodes claim this site's name"))
            elif stage == SETUP or node in self.names:
                replies[site] = reply
        return replies

    def nodes_of(self, sites) -> set[int]:
        """The nodes of the named sites (those met at setup)."""
        wanted = set(sites)
        return {node for node, site in self.names.items() if site in wanted}

    def _nodes(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.config.strategy.min_sites or time.monotonic() > deadline:
                return nodes
            time.sleep(1.0)

    def run(self, rnd: int, arrays: ArrayRecord, context: RoundContext) -> SecureOutcome:
        outcome = SecureOutcome(total=None)
        try:
            return self._run(rnd, arrays, context, outcome)
        except (RoundAbandoned, SecAggError) as error:
            if self.epoch is not None:
                self.epoch.stale = f"round {rnd} was abandoned"
            self.log_event(SecureRoundAbandoned(round=rnd, reason=str(error)))
            log.warning("round %d abandoned: %s", rnd, error)
            outcome.total, outcome.abandoned = None, str(error)
            return outcome

    def _why_agree(self, available: frozenset[int]) -> str:
        """Why keys must be agreed before this round, or "" when the current ones serve."""
        epoch = self.epoch
        if epoch is None:
            return "no keys agreed yet"
        if available != epoch.nodes:
            joined = sorted(self.names[n] for n in available - epoch.nodes)
            left = sorted(self.names.get(n, str(n)) for n in epoch.nodes - available)
            return f"the sites available changed (joined {joined}, left {left})"
        return epoch.stale

    def _agree(self, rnd: int, why: str, available: frozenset[int], timeout: float, outcome: SecureOutcome) -> _Epoch:
        """Key agreement among the available sites: each advertises keys signed by its identity key.

        A site that declines (its policy refuses the round, or its budget is spent) stays out of the cohort,
        and the keys are agreed again among the sites that accepted, under the threshold rule for their
        number. Kept at the threshold for everyone asked, the cohort would tolerate fewer dropouts than the
        rule gives it, or none: two sites of five that always decline would abandon every round. The epoch
        still covers every site asked, so the ones that declined are asked again when keys are next agreed.
        """
        self.epoch = None
        node_of = {self.names[n]: n for n in available}
        sites = sorted(node_of)
        t = self.config.privacy.max_colluding_sites
        while True:
            if len(sites) < max(2, t + 1):
                self.log_event(SecureKeys(round=rnd, reason=why, sites=len(sites)))
                raise RoundAbandoned(f"round {rnd}: only {len(sites)} site(s) answered; secure aggregation needs more")
            secagg = SecAggConfig(
                run_id=self.run_id,
                round=rnd,
                sites=tuple(sites),
                threshold=default_threshold(len(sites), t),
                max_colluding=t,
                length=self.length,
                scale=SCALE,
                bound=BOUND,
            )
            self.log_event(SecureKeys(round=rnd, reason=why, sites=len(sites), threshold=secagg.threshold))
            session = AggregatorSession(secagg)
            request = StageRequest(ADVERTISE, rnd, secagg.to_json())
            replies = self._exchange(rnd, ADVERTISE, {node_of[s]: request for s in sites}, timeout, outcome)
            declined = sorted(set(sites) & {*outcome.refused, *outcome.exhausted})
            if not declined or len(replies) == len(sites):
                break
            sites = sorted(replies)
            why = f"{', '.join(declined)} declined; agreeing again among the {len(sites)} that accepted"
        ads = {s: dict(StageReply.from_message(m, ADVERTISE).data) for s, m in replies.items()}
        broadcast = advertisements_to_data(session.collect_advertisements(ads))
        self.epoch = _Epoch(session, available, node_of, broadcast)
        return self.epoch

    def _run(self, rnd: int, arrays: ArrayRecord, context: RoundContext, outcome: SecureOutcome) -> SecureOutcome:
        timeout = self.config.strategy.round_timeout
        quick = min(timeout, SETUP_TIMEOUT)
        nodes = self._nodes(timeout)
        unknown = [n for n in nodes if n not in self.names]
        if unknown:
            replies = self._exchange(rnd, SETUP, {n: StageRequest(SETUP, rnd) for n in unknown}, quick, outcome)
            for site, reply in replies.items():
                self.names[reply.metadata.src_node_id] = site
        available = frozenset(n for n in nodes if n in self.names)
        why = self._why_agree(available)
        if why:
            epoch = self._agree(rnd, why, available, quick, outcome)
        else:
            assert self.epoch is not None
            epoch = self.epoch
        session, node_of = epoch.session, epoch.node_of
        secagg = session.config.for_round(rnd)
        round_config = secagg.to_json()
        forward, epoch.forward = epoch.forward, {}
        epoch.stale = f"round {rnd} did not finish"  # until it does, cleanly
        replies = self._exchange(
            rnd,
            MASK,
            {node_of[s]: StageRequest(MASK, rnd, round_config, data=forward, arrays=arrays) for s in session.group},
            timeout,
            outcome,
        )
        masked: dict[str, np.ndarray] = {}
        sealed: dict[str, dict[str, bytes]] = {}
        for site, reply in replies.items():
            decoded = self._admit(rnd, site, reply, context, outcome, session.group)
            if decoded is not None and decoded.masked is not None:
                masked[site], sealed[site] = decoded.masked, dict(decoded.data)
        survivors, dropped, routed = session.collect_masked(secagg, masked, sealed)
        outcome.survivors, outcome.dropped = survivors, dropped
        replies = self._exchange(
            rnd,
            UNMASK,
            {
                node_of[s]: StageRequest(
                    UNMASK, rnd, round_config, data=routed[s], survivors=tuple(survivors), dropped=tuple(dropped)
                )
                for s in survivors
            },
            quick,
            outcome,
        )
        seed_shares: dict[str, dict[str, bytes]] = {}
        pair_keys: dict[str, dict[str, bytes]] = {}
        for site, reply in replies.items():
            try:
                data = StageReply.from_message(reply, UNMASK).data
                seed_shares[site], pair_keys[site] = unmask_from_data(data, site)
            except ProtocolError as error:
                self.log_event(SiteRejected(round=rnd, site=site, reason=str(error)))
        outcome.total = session.collect_unmask(seed_shares, pair_keys)
        if dropped or len(seed_shares) < len(survivors):
            silent = sorted(set(survivors) - set(seed_shares))
            epoch.stale = f"round {rnd}: {dropped} dropped, {silent} did not answer the unmask request"
        else:
            epoch.stale = ""
        return outcome

    def _admit(
        self, rnd: int, site: str, reply: Message, context: RoundContext, outcome: SecureOutcome, group: tuple[str, ...]
    ) -> StageReply | None:
        """The site's answer if its masked vector may enter the sum; else why not is logged and it counts as
        dropped."""
        try:
            decoded = StageReply.from_message(reply, MASK)
        except (ProtocolError, KeyError) as error:
            self.log_event(SiteRejected(round=rnd, site=site, reason=str(error)))
            return None
        problem = _release_problem(site, decoded, self.config.privacy.enabled, context, self.history)
        if problem is None:
            problem = metrics_problem(decoded.metrics, context)
        if problem is None:
            missing = sorted(set(group) - {site} - set(decoded.data))
            problem = f"no sealed seed share for {missing}" if missing else None
        if problem:
            self.log_event(SiteRejected(round=rnd, site=site, reason=problem))
            log.warning("round %d: masked update of %s rejected: %s", rnd, site, problem)
            return None
        if decoded.entry is not None:
            self.history.accept(site, decoded.entry)
            outcome.entries[site] = decoded.entry
        outcome.metrics[site] = dict(decoded.metrics)
        return decoded


def _release_problem(
    site: str, reply: StageReply, privacy_required: bool, context: RoundContext, history: ReleaseHistory
) -> str | None:
    entry = reply.entry
    if entry is None:
        return "no privacy record came with the masked update" if privacy_required else None
    reason = verify_entry(entry)
    if reason:
        return f"privacy record rejected: {reason}"
    record = entry.record
    if not isinstance(record, PrivacyRecord):
        return "the privacy record is not a release"
    if reply.masked is None or record.update_sha256 != masked_sha256(reply.masked):
        return "the masked update differs from the one its privacy record describes"
    if privacy_required and not record.mechanism.noise_multiplier > 0:
        return "update released without DP noise in a private federation"
    return history.problem(site, entry, context)


def unflatten(vector: np.ndarray, names: Iterable[str], like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A flat vector in `names` order, back into arrays shaped like `like`."""
    out, start = {}, 0
    for name in names:
        size = like[name].size
        out[name] = vector[start : start + size].reshape(like[name].shape)
        start += size
    if start != vector.size:
        raise ValueError(f"vector of {vector.size} values does not fit the model's {start}")
    return out
