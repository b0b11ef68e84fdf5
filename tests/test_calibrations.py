"""Noise calibrations kept on disk: found once per machine, and never trusted without the accountant's check."""

from __future__ import annotations

import json

import pytest

from fedpriv.common.privacy import accounting
from fedpriv.common.privacy.accounting import calibrate_noise, epsilon, poisson_gaussian
from fedpriv.common.privacy.calibrations import Calibrations

PLAN = (8.0, 1e-5, 0.5, 3, "rdp")  # RDP: the cheapest search


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh disk cache, and no calibration remembered in this process."""
    monkeypatch.setenv("FEDPRIV_CACHE_DIR", str(tmp_path / "cache"))
    calibrate_noise.cache_clear()
    yield tmp_path / "cache" / "noise-calibrations"
    calibrate_noise.cache_clear()


def _no_search(monkeypatch):
    def search(*args):
        raise AssertionError("searched again")

    monkeypatch.setattr(accounting, "_dp_accounting_noise", search)


def _entry(cache) -> dict:
    (path,) = cache.glob("*.json")
    return json.loads(path.read_text())


def test_a_later_process_reuses_the_noise_found_and_records_what_it_was_found_for(cache, monkeypatch):
    sigma = calibrate_noise(*PLAN)
    entry = _entry(cache)
    assert entry["noise-multiplier"] == sigma
    assert entry["inputs"]["steps"] == 3 and entry["inputs"]["library"][0] == "dp-accounting"

    calibrate_noise.cache_clear()  # as a new process would start
    _no_search(monkeypatch)
    assert calibrate_noise(*PLAN) == sigma
    with pytest.raises(AssertionError, match="searched again"):  # other inputs: another entry
        calibrate_noise(8.0, 1e-5, 0.5, 4, "rdp")


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> tuple[float, str]:
    """PLAN's noise multiplier, searched once, and the name of the entry it is kept under."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("honest")
        patch.setenv("FEDPRIV_CACHE_DIR", str(folder))
        calibrate_noise.cache_clear()
        sigma = calibrate_noise(*PLAN)
        calibrate_noise.cache_clear()
    (path,) = (folder / "noise-calibrations").glob("*.json")
    return sigma, path.name


@pytest.mark.parametrize("kept", [0.05, "not a number", None])
def test_a_kept_noise_that_fails_the_target_or_is_damaged_is_searched_again_and_replaced(honest, cache, kept):
    honest, name = honest
    cache.mkdir(parents=True)
    text = "{ half written" if kept is None else json.dumps({"noise-multiplier": kept})
    (cache / name).write_text(text)

    sigma = calibrate_noise(*PLAN)
    assert sigma == honest
    assert epsilon([poisson_gaussian(sigma, 0.5, 3)], 1e-5, "rdp") <= 8.0
    assert _entry(cache)["noise-multiplier"] == honest


def test_a_cache_that_cannot_be_written_only_costs_the_search(cache, monkeypatch):
    cache.parent.mkdir(parents=True)
    cache.write_text("a file where the folder should be")
    sigma = calibrate_noise(*PLAN)
    assert epsilon([poisson_gaussian(sigma, 0.5, 3)], 1e-5, "rdp") <= 8.0
    assert Calibrations().candidate({"any": "inputs"}) is None
