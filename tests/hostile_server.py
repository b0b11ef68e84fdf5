"""A deliberately hostile aggregator: a ServerApp that asks the sites for what their policies forbid.

It runs inside a real SuperLink (`LocalFederation.submit(server_app=...)`
submits a settings-only app whose serverapp is `tests.hostile_server:app`,
imported from the repository). Which attacks a run makes is read from
`$FEDPRIV_HOSTILE_DIR/plan.json` (a list of attack names); what every site
answered goes to `$FEDPRIV_HOSTILE_DIR/result-<run id>.json`:

    {attack: {site: {"status": ok | policy-refused | budget-exhausted | error, "reason": text}}}

The run's settings (run config) are whatever the test submitted: those that
decide a site's privacy (DP on or off, noise, sample rate) are the attack
themselves; the others are forged in the messages.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedpriv.common.config import FedprivConfig
from fedpriv.common.data import LabelSet
from fedpriv.common.run_events import RunEnd, RunStart
from fedpriv.common.rundir import RunDirectory
from fedpriv.common.wire.protocol import Instruction, to_record, withheld
from fedpriv.common.wire.secagg import AggregatorSession, SecAggConfig, default_threshold
from fedpriv.common.wire.secure_protocol import (
    ADVERTISE,
    MASK,
    SETUP,
    UNMASK,
    StageReply,
    StageRequest,
    advertisements_to_data,
    message_type,
)
from fedpriv.server.exchange import exchange
from fedpriv.server.summary import write_summary

app = ServerApp()
TIMEOUT = 240.0


def _answers(replies: list[Message], names: dict[int, str]) -> dict[str, dict]:
    out = {}
    for reply in replies:
        site = names.get(reply.metadata.src_node_id, f"node-{reply.metadata.src_node_id}")
        if reply.has_error():
            out[site] = {"status": "error", "reason": reply.error.reason}
            continue
        held = withheld(reply)
        out[site] = {"status": held[0], "reason": held[1]} if held else {"status": "ok", "reason": ""}
    return out


class Hostile:
    def __init__(self, grid: Grid, config: FedprivConfig, run_id: int):
        self.grid, self.config, self.run_id = grid, config, run_id
        from fedpriv.server.global_model import GlobalModel

        model = GlobalModel(config.replace(**{"data.test-path": ""}), LabelSet.load(config.data.labels))
        self.state = model.initial_state()
        self.length = model.bundle.trainable_size
        deadline = time.monotonic() + TIMEOUT
        while len(grid.get_node_ids()) < config.strategy.min_sites and time.monotonic() < deadline:
            time.sleep(0.5)
        self.nodes = sorted(grid.get_node_ids())
        replies = self.send(SETUP, {n: StageRequest(SETUP, 1) for n in self.nodes})
        self.names = {r.metadata.src_node_id: StageReply.from_message(r, SETUP).site for r in replies}
        self.node_of = {site: node for node, site in self.names.items()}

    def send(self, stage: str, requests: dict[int, StageRequest]) -> list[Message]:
        messages = [
            Message(content=r.to_content(), message_type=message_type(stage), dst_node_id=n)
            for n, r in requests.items()
        ]
        return exchange(self.grid, messages, TIMEOUT)  # polls often, as fedpriv's own ServerApp does

    def secagg(self, rnd: int, sites=None, t: int = 1) -> SecAggConfig:
        sites = tuple(sorted(sites or self.node_of))
        return SecAggConfig(
            run_id=str(self.run_id),
            round=rnd,
            sites=sites,
            threshold=default_threshold(len(sites), t),
            max_colluding=t,
            length=self.length,
            scale=2.0**20,
            bound=2**40,
        )

    def advertise(self, secagg: SecAggConfig) -> list[Message]:
        real = [s for s in secagg.sites if s in self.node_of]
        return self.send(
            ADVERTISE, {self.node_of[s]: StageRequest(ADVERTISE, secagg.round, secagg.to_json()) for s in real}
        )

    # -- attacks -------------------------------------------------------------

    def plain_train(self, rnd: int) -> dict:
        """A plain training round with the run's settings (its DP settings are the attack)."""
        content = Instruction(to_record(self.state), server_round=rnd).to_content()
        messages = [Message(content=content, message_type="train", dst_node_id=n) for n in self.nodes]
        return _answers(exchange(self.grid, messages, TIMEOUT), self.names)

    def secure_advertise(self, rnd: int) -> dict:
        """An honest-looking secure round's first stage with the run's settings."""
        return _answers(self.advertise(self.secagg(rnd)), self.names)

    def no_collusion(self, rnd: int) -> dict:
        """t = 0: every site's noise share shrinks to sigma / sqrt(n), as if nobody could collude."""
        return _answers(self.advertise(self.secagg(rnd, t=0)), self.names)

    def ghost_cohort(self, rnd: int) -> dict:
        """A cohort padded with sites that do not exist: n grows, so each real site's share shrinks."""
        return _answers(self.advertise(self.secagg(rnd, sites=(*self.node_of, "ghost-1", "ghost-2"))), self.names)

    def lying_dropout(self, rnd: int) -> dict:
        """A real round to the mask stage (keys agreed, then masked), then each site is told the two others
        dropped (more than t = 1)."""
        secagg = self.secagg(rnd)
        session = AggregatorSession(secagg)
        ads = {
            self.names[r.metadata.src_node_id]: dict(StageReply.from_message(r, ADVERTISE).data)
            for r in self.advertise(secagg)
        }
        broadcast = advertisements_to_data(session.collect_advertisements(ads))
        arrays = to_record(self.state)
        masked = self.send(
            MASK,
            {self.node_of[s]: StageRequest(MASK, rnd, secagg.to_json(), data=broadcast, arrays=arrays) for s in ads},
        )
        answers = {f"mask/{k}": v for k, v in _answers(masked, self.names).items()}
        requests = {}
        for site in ads:
            others = tuple(s for s in ads if s != site)
            requests[self.node_of[site]] = StageRequest(
                UNMASK, rnd, secagg.to_json(), survivors=(site,), dropped=others
            )
        answers.update(_answers(self.send(UNMASK, requests), self.names))
        return answers


ATTACKS = {
    "plain-train": Hostile.plain_train,
    "secure-advertise": Hostile.secure_advertise,
    "no-collusion": Hostile.no_collusion,
    "ghost-cohort": Hostile.ghost_cohort,
    "lying-dropout": Hostile.lying_dropout,
}


@app.main()
def main(grid: Grid, context: Context) -> None:
    folder = Path(os.environ["FEDPRIV_HOSTILE_DIR"])
    plan = json.loads((folder / "plan.json").read_text())
    config = FedprivConfig.from_run_config(context.run_config)
    run = RunDirectory.create(config.run_dir)  # what `fedpriv aggregator run` follows to the run's end
    run.log(RunStart(run_id=context.run_id, rounds=len(plan)))
    hostile = Hostile(grid, config, context.run_id)
    results = {"sites": sorted(hostile.node_of)}
    for rnd, attack in enumerate(plan, start=1):
        results[attack] = ATTACKS[attack](hostile, rnd)
    out = folder / f"result-{context.run_id}.json"
    out.write_text(json.dumps(results, indent=1, default=lambda v: np.asarray(v).tolist()))
    run.log(RunEnd(seconds=0.0, model=""))
    write_summary(run)
