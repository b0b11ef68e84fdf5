"""`fedpriv audit --empirical`: canaries, their placement, the deliberate fault, and one real run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context, RecordDict

from fedpriv.client.audit_fault import UNCLIPPED, dp_actually_used
from fedpriv.client.runtime import WORKER, WorkerRuntime
from fedpriv.client.training import DpSettings
from fedpriv.common.data import DataError, LabelSet, load_dataset
from fedpriv.common.node_config import (
    AUDIT_FAULT,
    DATA_PATH,
    NUM_PARTITIONS,
    PARTITION_ID,
    SIMULATED,
    SITE_NAME,
    AuditFault,
    audit_fault,
)
from fedpriv.common.partition import split_for
from fedpriv.simulation import canary_audit as empirical
from tests.helpers import fedpriv_here

ROOT = Path(__file__).resolve().parents[1]


def context(config, node_config) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=config.to_run_config())


def test_canaries_are_distinct_repeatable_and_each_coin_is_fair():
    words = [f"word{chr(97 + i)}{chr(97 + j)}" for i in range(20) for j in range(20)]
    a = empirical.make_canaries(words, num_labels=7, m=2000, seed=3)
    b = empirical.make_canaries(words, num_labels=7, m=2000, seed=3)
    c = empirical.make_canaries(words, num_labels=7, m=2000, seed=4)
    assert a.texts == b.texts and np.array_equal(a.included, b.included)
    assert a.texts != c.texts
    assert len(set(a.texts)) == 2000
    assert all(len(t.split()) == empirical.CANARY_WORDS for t in a.texts)
    assert set(np.unique(a.labels)) == set(range(7))
    assert 0.45 < a.included.mean() < 0.55
    with pytest.raises(empirical.EmpiricalAuditError, match="canaries"):
        empirical.make_canaries(words, 7, 1, seed=0)


def test_only_included_canaries_join_and_only_the_chosen_site(tiny_config):
    labels = LabelSet.load(tiny_config.data.labels)
    data = tiny_config.data
    dataset = load_dataset(data.path, labels, data.text_column, data.label_column)
    canaries = empirical.make_canaries(empirical.vocabulary(dataset.texts), len(labels), 50, seed=0)
    table, name, sites = empirical.audit_dataset(tiny_config, labels, canaries, site=1)

    parts, names = split_for(tiny_config, dataset, tiny_config.simulation.sites)
    assert (name, sites) == (names[1], 3)
    assert len(table) == len(dataset) + canaries.included.sum()
    # every real row keeps the site the configured partitioner gives it
    for site_name, rows in zip(names, parts, strict=True):
        real = table.iloc[: len(dataset)]
        assert set(real[real[empirical.SITE_COLUMN] == site_name][data.text_column]) == {dataset.texts[i] for i in rows}
    added = table.iloc[len(dataset) :]
    assert set(added[empirical.SITE_COLUMN]) == {names[1]}
    expected = {t for t, keep in zip(canaries.texts, canaries.included, strict=True) if keep}
    assert set(added[data.text_column]) == expected
    assert not {t for t, keep in zip(canaries.texts, canaries.included, strict=True) if not keep} & set(
        table[data.text_column]
    )
    with pytest.raises(empirical.EmpiricalAuditError, match="--site"):
        empirical.audit_dataset(tiny_config, labels, canaries, site=3)


def test_the_fault_setting_is_parsed_strictly(tiny_config, tmp_path):
    assert audit_fault(None) == audit_fault("") == AuditFault()
    assert audit_fault("noise/10") == AuditFault(noise_divisor=10.0)
    assert audit_fault("skip-clipping") == AuditFault(skip_clipping=True)
    assert audit_fault("skip-noise").at_canary_site
    for bad in ("noise/0.5", "noise/x", "clip/10", "10", "skip-clip"):
        with pytest.raises(ValueError, match=AUDIT_FAULT):
            audit_fault(bad)
    # checked before the audit writes anything
    with pytest.raises(empirical.EmpiricalAuditError, match="--fault"):
        empirical.empirical_audit(tiny_config, tmp_path / "out", fault="noise/zero")
    assert not (tmp_path / "out").exists()


def test_the_fault_is_read_from_the_node_config_of_declared_simulated_sites_only(tiny_config):
    from fedpriv.client.audit_fault import noise_actually_added

    assert noise_actually_added(4.0, "site-000", AuditFault()) == 4.0
    assert noise_actually_added(4.0, "site-000", AuditFault(noise_divisor=100.0)) == pytest.approx(0.04)
    assert noise_actually_added(4.0, "site-000", AuditFault(skip_noise=True)) == 0.0
    # The harness declares its nodes simulated and sets the fault; a deployed node that names its data
    # ignores a fault in its node config, and so does a node with only Flower's partition keys (refused).
    simulated = {PARTITION_ID: 0, NUM_PARTITIONS: 3, SIMULATED: True, AUDIT_FAULT: "noise/10"}
    site = WorkerRuntime().site(context(tiny_config, simulated), tiny_config)
    assert site.simulated and site.fault == AuditFault(noise_divisor=10.0)
    deployed = {DATA_PATH: tiny_config.data.path, SITE_NAME: "branch", AUDIT_FAULT: "noise/10"}
    site = WorkerRuntime().site(context(tiny_config, deployed), tiny_config)
    assert not site.simulated and site.fault == AuditFault()
    with pytest.raises(DataError, match="partition-id alone does not make a node a simulated site"):
        WorkerRuntime().site(
            context(tiny_config, {PARTITION_ID: 0, NUM_PARTITIONS: 3, AUDIT_FAULT: "noise/10"}), tiny_config
        )
    # A fault meant for the canary site does nothing at a site without canaries.
    one_site = {**simulated, AUDIT_FAULT: "skip-clipping"}
    assert WorkerRuntime().site(context(tiny_config, one_site), tiny_config).fault == AuditFault()
    # Both paths of a secure round (local noise, distributed share) ask it; so does the plain round.
    secure = (ROOT / "client/secure_aggregation.py").read_text()
    assert "noise_actually_added(" in secure and "clip_norm_used(" in secure and "dp_actually_used(" in secure
    assert "dp_actually_used(" in (ROOT / "client/app.py").read_text()


def test_the_fault_weakens_the_noise_it_is_set_for():
    dp = DpSettings(1.2, 0.5, normaliser=30)
    assert dp_actually_used(dp, "site-000", AuditFault()) is dp
    assert dp_actually_used(dp, "site-000", AuditFault(noise_divisor=10.0)).noise_multiplier == pytest.approx(0.12)
    assert dp_actually_used(None, "site-000", AuditFault(noise_divisor=10.0)) is None
    # Unclipped, Opacus' noise (multiplier x clip norm) stays the planned 1.2 x 0.5.
    unclipped = dp_actually_used(dp, "site-000", AuditFault(skip_clipping=True))
    assert unclipped.max_grad_norm == UNCLIPPED
    assert unclipped.noise_multiplier * unclipped.max_grad_norm == pytest.approx(0.6)


def test_an_empirical_audit_refuses_what_it_cannot_test(tiny_config, tmp_path):
    with pytest.raises(empirical.EmpiricalAuditError, match="privacy.enabled"):
        empirical.empirical_audit(tiny_config.replace(**{"privacy.enabled": False}), tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "earlier.json").write_text("{}")
    with pytest.raises(empirical.EmpiricalAuditError, match="not empty"):
        empirical.empirical_audit(tiny_config, tmp_path / "b")
    assert os.listdir(tmp_path / "b") == ["earlier.json"]


def test_audit_command_arguments_are_checked(tmp_path):
    none = fedpriv_here("audit")
    assert none.returncode == 2 and "give run directories" in none.stderr
    both = fedpriv_here("audit", "--empirical", tmp_path)
    assert both.returncode == 2 and "--empirical runs its own federation" in both.stderr
    alone = fedpriv_here("audit", "--black-box", tmp_path)
    assert alone.returncode == 2 and "give --empirical with it" in alone.stderr


DISTRIBUTED = {"privacy.secure-aggregation": True, "privacy.noise": "distributed", "rounds": 3}


@pytest.mark.slow
@pytest.mark.parametrize("noise", ["local", "distributed"])
def test_an_empirical_audit_runs_the_federation_and_its_bound_is_recomputable(tiny_config, tmp_path, noise):
    config = tiny_config.replace(**{"rounds": 1, "privacy.target-epsilon": 4.0})
    if noise == "distributed":  # secure aggregation: the canary site's update is only ever seen in the sum
        config = config.replace(**DISTRIBUTED)
    result = empirical.empirical_audit(config, tmp_path / "audit", canaries=40, seed=7)  # the black-box audit

    assert result.site == "site-000" and result.canaries == 40
    assert result.claimed == pytest.approx(4.0, rel=0.02)  # the ledger's own claim
    assert 0 <= result.lower_bound <= result.claimed and not result.refuted
    table = pd.read_csv(tmp_path / "audit" / "canaries.csv")
    assert len(table) == 40 and table["score"].notna().all()
    assert result.included == int(table["included"].sum())
    assert np.ptp(table["score"]) > 0  # the released model moved: scores are not all equal
    # the auditor's reference trained on the same rows without a single canary
    reference = pd.read_csv(tmp_path / "audit" / "reference.csv")
    assert not set(reference["text"]) & set(table["text"])
    assert len(reference) + result.included == len(pd.read_csv(tmp_path / "audit" / "data.csv"))
    assert (tmp_path / "audit" / "reference" / "model").is_dir()
    # The reference run's fault (no noise) reached its sites through Flower's engine, in their node config
    # (the in-process backend serves them from this process's resident runtime).
    reference_sites = [s for s in WORKER._sites.values() if s.config.run_dir == str(tmp_path / "audit" / "reference")]
    assert reference_sites and all(s.simulated and s.fault.noise_divisor == 1e9 for s in reference_sites)
    again = empirical.recompute(tmp_path / "audit")
    assert (again.lower_bound, again.guesses, again.correct) == (
        result.lower_bound,
        result.guesses,
        result.correct,
    )
