"""The aggregator's secure rounds over a stand-in grid: keys agreed once, two exchanges a round in steady state.

The sites here answer with the real secagg sessions (no training: each sends a
fixed vector), so what is checked is `SecureRound`'s routing: which stages it
sends each round (its `secure-stage` events), when it agrees keys again, and
that each round's sum is the sum of the sites that survived it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Message

from fedpriv.common.privacy import signing
from fedpriv.common.wire.protocol import to_record
from fedpriv.common.wire.secagg import EncodingOverflowError, SecAggConfig, SecAggError, SiteSession
from fedpriv.common.wire.secure_protocol import (
    ADVERTISE,
    MASK,
    SETUP,
    UNMASK,
    StageReply,
    StageRequest,
    advertisements_from_data,
    rekey_content,
    unmask_to_data,
)

LENGTH = 64
NAMES = ("site-a", "site-b", "site-c", "site-d")


class Site:
    """A site that keeps its session between messages, as Flower's per-node state keeps it."""

    def __init__(self, name: str, pinned: dict[str, str], identity: Ed25519PrivateKey, rng: np.random.Generator):
        self.name, self.pinned, self.identity = name, pinned, identity
        self.state: dict | None = None
        self.vector = rng.normal(size=LENGTH)
        self.silent_at: set[str] = set()

    def answer(self, msg: Message) -> Message | None:
        request = StageRequest.from_message(msg)
        if request.stage in self.silent_at:
            return None
        if request.stage == SETUP:
            self.state = None
            return Message(StageReply(self.name).to_content(), reply_to=msg)
        config = SecAggConfig.from_json(request.round_config)
        if request.stage == ADVERTISE:
            session = SiteSession(config, self.name, self.identity, self.pinned)
            content = StageReply(self.name, session.advertise()).to_content()
        else:
            if self.state is None:
                assert request.stage == MASK
                return Message(rekey_content(self.name, "no keys"), reply_to=msg)
            session = SiteSession.from_state(self.state, self.identity, self.pinned)
            if request.stage == MASK:
                if session.config != config.keys:
                    return Message(rekey_content(self.name, "other keys"), reply_to=msg)
                if request.data:
                    session.accept_peers(advertisements_from_data(request.data))
                masked, sealed = session.mask(config, self.vector)
                content = StageReply(self.name, sealed, masked=masked).to_content()
            else:
                revealed = session.unmask(config, request.survivors, request.dropped, request.data)
                content = StageReply(self.name, unmask_to_data(*revealed)).to_content()
        self.state = session.to_state()
        return Message(content, reply_to=msg)


class Grid:
    """Flower's Grid as `SecureRound` uses it: node ids, and messages answered by the online sites."""

    def __init__(self, sites: dict[int, Site]):
        self.sites, self.online = sites, set(sites)
        self._ids = itertools.count()
        self._replies: dict[str, Message] = {}

    def get_node_ids(self):
        return sorted(self.online)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m-{next(self._ids)}"
            node = msg.metadata.dst_node_id
            reply = self.sites[node].answer(msg) if node in self.online else None
            if reply is not None:
                replies.append(reply)
        return replies

    def push_messages(self, messages):
        ids = []
        for reply in self.send_and_receive(list(messages)):
            self._replies[reply.metadata.reply_to_message_id] = reply
            ids.append(reply.metadata.reply_to_message_id)
        return ids

    def pull_messages(self, ids):
        return [self._replies.pop(i) for i in list(ids) if i in self._replies]


@pytest.fixture
def federation(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from fedpriv.common.config import FedprivConfig
    from fedpriv.server.secure_round import SecureRound
    from fedpriv.server.update_checks import ReleaseHistory

    # What a ServerApp's process has set when it makes messages.
    for name, value in [("_task_id", 1), ("_run_id", 1), ("_node_id", 1)]:
        monkeypatch.setattr(TaskIdentity, name, value)
    rng = np.random.default_rng(0)
    identities = {name: Ed25519PrivateKey.generate() for name in NAMES}
    pinned = {name: signing.public_b64(key) for name, key in identities.items()}
    sites = {100 + i: Site(name, pinned, identities[name], rng) for i, name in enumerate(NAMES)}
    grid = Grid(sites)
    grid.online = {100, 101, 102}  # site-d joins later
    config = FedprivConfig().replace(
        **{
            "privacy.secure-aggregation": True,
            "privacy.enabled": False,
            "privacy.max-colluding-sites": 1,
            "strategy.min-sites": 2,
            "strategy.round-timeout": 5,
            "run-dir": str(tmp_path / "run"),
        }
    )
    events: list[dict] = []
    secure = SecureRound(
        grid,
        config,
        "run-1",
        LENGTH,
        ReleaseHistory(),
        lambda event: events.append({"kind": event.KIND, **event.fields()}),
    )
    return grid, secure, events


def _round(federation, rnd: int):
    from fedpriv.server.update_checks import RoundContext

    grid, secure, events = federation
    before = len(events)
    context = RoundContext(run_id="run-1", round=rnd, sent={}, max_update_norm=0.0, max_examples=10**6)
    outcome = secure.run(rnd, to_record({"w": np.zeros(1, dtype=np.float32)}), context)
    stages = [e["stage"] for e in events[before:] if e["kind"] == "secure-stage" and e["round"] == rnd]
    if outcome.total is not None:
        vectors = {site.name: site.vector for site in grid.sites.values()}
        expected = np.sum([vectors[s] for s in outcome.survivors], axis=0)
        assert np.max(np.abs(outcome.total - expected)) < 1e-4
    return stages, outcome


def test_two_exchanges_a_round_once_keys_are_agreed_and_again_after_the_cohort_changes(federation):
    grid, secure, events = federation
    sites = grid.sites
    agreement = [SETUP, ADVERTISE, MASK, UNMASK]
    steady = [MASK, UNMASK]

    stages, outcome = _round(federation, 1)  # first round: name the nodes, agree keys, mask, unmask
    assert stages == agreement and outcome.survivors == ["site-a", "site-b", "site-c"]
    for rnd in (2, 3):
        stages, outcome = _round(federation, rnd)
        assert stages == steady and len(outcome.survivors) == 3 and outcome.dropped == []

    # site-c's agent restarts: its state is gone. It says so at the mask stage (computing nothing); the round
    # completes without it (its masks with the others are removed), and keys are agreed again for the next.
    sites[102].state = None
    stages, outcome = _round(federation, 4)
    assert stages == steady and outcome.rekey == ["site-c"] and outcome.dropped == ["site-c"]
    assert outcome.total is not None
    stages, outcome = _round(federation, 5)
    assert stages == [ADVERTISE, MASK, UNMASK] and outcome.survivors == ["site-a", "site-b", "site-c"]
    assert _round(federation, 6)[0] == steady

    # site-d joins: named, then keys agreed among all four.
    grid.online.add(103)
    stages, outcome = _round(federation, 7)
    assert stages == agreement and outcome.survivors == ["site-a", "site-b", "site-c", "site-d"]
    assert [e["sites"] for e in events if e["kind"] == "secure-stage" and e["round"] == 7][0] == [
        "103"
    ]  # not yet named
    assert _round(federation, 8)[0] == steady

    # A steady-state dropout after masking: site-b masks, then is silent at unmask; nobody dropped, so its
    # self-mask comes from the others' shares. Before masking: site-a is silent; the survivors reveal their
    # pair keys with it of this round.
    sites[101].silent_at = {UNMASK}
    stages, outcome = _round(federation, 9)
    assert stages == steady and outcome.dropped == [] and "site-b" in outcome.survivors
    sites[101].silent_at = set()
    assert _round(federation, 10)[0] == [ADVERTISE, MASK, UNMASK]  # a round that did not finish cleanly
    sites[100].silent_at = {MASK}
    stages, outcome = _round(federation, 11)
    assert stages == steady and outcome.dropped == ["site-a"] and outcome.total is not None
    sites[100].silent_at = set()

    # site-a leaves for good: keys are agreed among the three left.
    grid.online.discard(100)
    stages, outcome = _round(federation, 12)
    assert stages == [ADVERTISE, MASK, UNMASK] and outcome.survivors == ["site-b", "site-c", "site-d"]
    assert _round(federation, 13)[0] == steady
    reasons = [e["reason"] for e in events if e["kind"] == "secure-keys"]
    assert len(reasons) == 5 and "left ['site-a']" in reasons[-1] and "joined ['site-d']" in reasons[2]


def test_keys_of_a_dropped_pair_revealed_in_one_round_do_not_unmask_the_next(federation):
    """The aggregator replays, in round 3, a site's masked vector and the unmask answers of round 2."""
    from fedpriv.common.wire.secagg import AggregatorSession

    grid, secure, _ = federation
    _round(federation, 1)
    sites = grid.sites
    epoch = secure.epoch
    assert epoch is not None
    session: AggregatorSession = epoch.session

    def mask(rnd):
        config = session.config.for_round(rnd)
        out = {}
        for node in (100, 101, 102):
            s = SiteSession.from_state(sites[node].state, sites[node].identity, sites[node].pinned)
            out[sites[node].name] = s.mask(config, sites[node].vector)
            sites[node].state = s.to_state()
        return config, out

    config_2, out_2 = mask(2)
    survivors, dropped, routed_2 = session.collect_masked(
        config_2, {k: v[0] for k, v in out_2.items()}, {k: v[1] for k, v in out_2.items()}
    )
    answers_2 = {}
    for node in (100, 101, 102):
        s = SiteSession.from_state(sites[node].state, sites[node].identity, sites[node].pinned)
        answers_2[sites[node].name] = s.unmask(config_2, survivors, dropped, routed_2[sites[node].name])
        sites[node].state = s.to_state()
    session.collect_unmask({k: v[0] for k, v in answers_2.items()}, {k: v[1] for k, v in answers_2.items()})

    config_3, out_3 = mask(3)
    replayed = {k: v[0] for k, v in out_3.items()} | {"site-b": out_2["site-b"][0]}
    survivors, dropped, _ = session.collect_masked(config_3, replayed, {k: v[1] for k, v in out_3.items()})
    truth = np.sum([sites[n].vector for n in (100, 101, 102)], axis=0)

    try:  # round 2's answers: round 3's self-masks are not removed
        total = session.collect_unmask({k: v[0] for k, v in answers_2.items()}, {k: v[1] for k, v in answers_2.items()})
    except EncodingOverflowError:
        total = None
    assert total is None or np.max(np.abs(total - truth)) > 1.0
    # ...and a site asked to reveal round 3 with round 2's sealed shares refuses.
    s = SiteSession.from_state(sites[100].state, sites[100].identity, sites[100].pinned)
    with pytest.raises(SecAggError, match="do not authenticate"):
        s.unmask(config_3, survivors, dropped, routed_2["site-a"])
