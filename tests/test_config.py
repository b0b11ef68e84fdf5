import tomllib
from pathlib import Path

import pytest

from fedpriv.common.config import ConfigError, FedprivConfig, load_config, parse_overrides
from fedpriv.common.schema import kebab

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_flower_config_lists_every_setting_with_its_default():
    # `flwr run .` only accepts overrides of keys in this table, and the apps
    # validate what they get: the two must never drift apart.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flower = project["tool"]["flwr"]["app"]["config"]
    assert flower == FedprivConfig().model_dump(by_alias=True)
    assert project["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedpriv.server.app:app",
        "clientapp": "fedpriv.simulation.flower_clientapp:app",  # `flwr run .` simulates: nodes declared so
    }


def test_run_config_round_trip_keeps_every_value():
    config = FedprivConfig().replace(**{"privacy.target-epsilon": 3.0, "model.mode": "lora", "rounds": 7})
    flat = config.to_run_config()
    assert flat["privacy.target-epsilon"] == 3.0
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert FedprivConfig.from_run_config(flat) == config


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rounds = 4\n[privacy]\ntarget-epsilon = 2.5\n[data]\nlabels = ["a", "b"]\n')
    config = load_config(path, ["strategy.name=fedprox", "simulation.alpha=0.1"])
    assert config.rounds == 4
    assert config.privacy.target_epsilon == 2.5
    assert config.data.labels == '["a", "b"]'
    assert config.strategy.name == "fedprox"
    assert config.simulation.alpha == 0.1


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["privacy.target-epsilon=-1"], "privacy.target-epsilon"),
        (["model.mode=everything"], "model.mode"),
        (["train.sample-rate=1.5"], "train.sample-rate"),
        (["privacy.epsilon=3"], "privacy.epsilon"),
        (["simulation.partitioner=column"], "simulation.column"),
    ],
)
def test_bad_settings_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "override, message",
    [
        # Each once passed validation, then failed at every site or stalled the run.
        ("privacy.target-epsilon=inf", r"privacy\.target-epsilon: Input should be a finite number"),
        ("privacy.max-grad-norm=inf", r"privacy\.max-grad-norm: Input should be a finite number"),
        ("privacy.noise-multiplier=1e308", r"privacy\.noise-multiplier: Input should be less than or equal to 1000"),
        ("train.local-epochs=inf", r"train\.local-epochs: Input should be a finite number"),
        ("train.learning-rate=nan", r"train\.learning-rate: Input should be a finite number"),
        ("strategy.round-timeout=inf", r"strategy\.round-timeout: Input should be a finite number"),
        ("rounds=1000000000000", r"rounds: Input should be less than or equal to 100000"),
        ("simulation.sites=1000000000", r"simulation\.sites: Input should be less than or equal to 100000"),
        ("seed=-1", r"seed: Input should be greater than or equal to 0"),
        ("data.max-chars=0", r"data\.max-chars: Input should be greater than or equal to 100"),
    ],
)
def test_non_finite_and_absurd_settings_are_refused_naming_the_setting(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override], "local")


def test_one_simulated_site_under_secure_aggregation_is_refused():
    # It once waited forever for a second site.
    with pytest.raises(ConfigError, match=r"simulation\.sites: secure aggregation needs at least 2 sites"):
        load_config(None, ["simulation.sites=1"], "distributed")
    assert load_config(None, ["simulation.sites=1", "strategy.min-sites=1"], "local").simulation.sites == 1


def test_a_plan_too_long_to_run_is_refused_naming_its_settings():
    # 100 rounds of 1000 epochs at rate 0.001: 10^8 steps per site, hours of accounting before round 1.
    settings = ["rounds=100", "train.local-epochs=1000", "train.sample-rate=0.001"]
    with pytest.raises(ConfigError, match=r"rounds x train\.local-epochs / train\.sample-rate plans 1e\+08"):
        load_config(None, settings, "local")
    # Distributed noise takes one step a round, whatever the local epochs.
    assert load_config(None, settings, "distributed").rounds == 100


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlearning-rat = 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.learning-rat: unknown setting"):
        load_config(path)


def test_missing_and_broken_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_config(broken)


def test_override_values_are_typed():
    assert parse_overrides(["a=3", "b=0.5", "c=true", 'd="x y"', "e=word"]) == {
        "a": 3,
        "b": 0.5,
        "c": True,
        "d": "x y",
        "e": "word",
    }
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_overrides(["novalue"])


def test_mode_picks_tuned_optimizer_unless_set():
    from fedpriv.common.privacy.plan import plan_for

    def optimizer(config):
        plan = plan_for(config)
        return plan.optimizer, plan.learning_rate

    assert optimizer(FedprivConfig()) == ("sgd", 20.0)
    lora = FedprivConfig().replace(**{"model.mode": "lora"})
    assert optimizer(lora)[0] == "adamw"
    custom = lora.replace(**{"train.optimizer": "sgd", "train.learning-rate": 0.5})
    assert optimizer(custom) == ("sgd", 0.5)
    distributed = load_config(preset="distributed")
    assert optimizer(distributed) == ("sgd", 40.0)  # the aggregator's step on a federation-wide batch
    assert optimizer(distributed.replace(**{"model.mode": "lora"})) == ("adamw", 2e-3)
    assert optimizer(distributed.replace(**{"train.learning-rate": 20.0})) == ("sgd", 20.0)


def test_a_preset_is_a_starting_point_that_a_file_and_overrides_refine(tmp_path):
    from fedpriv.common.config import ConfigError, load_config, presets

    assert "distributed" in presets()
    preset = load_config(preset="distributed")
    assert (preset.rounds, preset.privacy.secure_aggregation, preset.privacy.noise) == (240, True, "distributed")
    mine = tmp_path / "mine.toml"
    mine.write_text('[privacy]\ntarget-epsilon = 3.0\n[model]\nmode = "head"\n')
    refined = load_config(mine, ["rounds=100"], preset="distributed")
    assert refined.privacy.noise == "distributed" and refined.privacy.target_epsilon == 3.0  # merged per section
    assert refined.rounds == 100
    with pytest.raises(ConfigError, match="--preset: no preset 'gpu' \\(available: distributed, local"):
        load_config(preset="gpu")
    local = load_config(preset="local")
    assert (local.rounds, local.privacy.secure_aggregation, local.privacy.noise) == (40, False, "local")
    assert local == FedprivConfig().replace(rounds=40)  # the base settings, spelled out


def test_simulate_starts_from_distributed_dp_unless_the_settings_ask_for_what_it_excludes(tmp_path):
    from fedpriv.cli_settings import simulation_preset
    from fedpriv.common.config import load_config, user_settings

    assert simulation_preset({}) == ("distributed", "the default")
    assert simulation_preset({"privacy.target-epsilon": 3, "rounds": 100})[0] == "distributed"
    for settings in (
        {"privacy.enabled": False},
        {"privacy.noise": "local"},
        {"privacy.secure_aggregation": False},
        {"privacy.site-level-noise": 1.0},
        {"strategy.name": "fedmedian"},
        {"strategy.fraction-train": 0.5},
        {"simulation.sites": 1},
    ):
        preset, why = simulation_preset(settings)
        assert preset == "local" and kebab(next(iter(settings))) in why, settings
    # Each choice yields a valid configuration with the user's settings on top.
    mine = tmp_path / "mine.toml"
    mine.write_text('[fedpriv.strategy]\nname = "krum"\nmin-sites = 5\n')
    given = user_settings(mine, ["simulation.sites=5"])
    assert given == {"strategy.name": "krum", "strategy.min-sites": 5, "simulation.sites": 5}
    preset, _ = simulation_preset(given)
    assert load_config(mine, ["simulation.sites=5"], preset).strategy.name == "krum"
    assert load_config(preset=simulation_preset({})[0]).privacy.noise == "distributed"


def test_simulate_names_an_unknown_preset_before_anything_runs(tmp_path):
    from tests.helpers import fedpriv_here

    result = fedpriv_here("simulate", "--preset", "fastest", "--output", tmp_path / "run")
    assert result.returncode == 2 and "--preset: no preset 'fastest' (available: distributed, local)" in result.stderr
    assert not (tmp_path / "run").exists()
