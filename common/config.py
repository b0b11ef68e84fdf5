"""The run configuration: one validated model shared by every role.

The same settings reach the aggregator and every site as a Flower *run config*,
which only carries flat scalar values. `to_run_config` / `from_run_config`
translate between the two, so a setting has one name and one default
everywhere: in a fedpriv TOML file, on the command line, in the pyproject's
`[tool.flwr.app.config]` and inside the apps.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from fedpriv.common import files
from fedpriv.common.errors import FedprivError
from fedpriv.common.schema import FrozenKebabModel, kebab
from fedpriv.common.site_settings import DataFormat, Delta

if TYPE_CHECKING:
    from fedpriv.common.privacy.site_policy import SitePolicy


class ConfigError(FedprivError, ValueError):
    """A setting is missing, unknown or out of range; the message names it."""


class _Section(FrozenKebabModel):
    # inf or nan passes every `gt`/`le` bound (inf > 0) and then breaks training or accounting at each site.
    model_config = ConfigDict(allow_inf_nan=False)


class DataConfig(DataFormat):
    """The run's data; its table format (text-column ... max-chars) is a site's own (`site_settings.DataFormat`):
    a simulation's sites read it from here, a deployed site from its own kit."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    path: str = Field(
        "builtin:banking77/train.csv",
        description="Dataset split into sites by the simulation (a site agent reads its own file instead).",
    )
    test_path: str = Field(
        "builtin:banking77/test.csv",
        description="Test set held by the aggregator for central evaluation; empty for none.",
    )
    labels: str = Field(
        "builtin:banking77/categories.json",
        description="The federation's fixed label set: a .json list or .txt file (one label per line), or an inline JSON list.",
    )
    validation_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of each site's rows kept for federated evaluation."
    )
    max_length: int = Field(128, ge=8, le=4096, description="Tokens per text after truncation.")


class ModelConfig(_Section):
    name: str = Field(
        "builtin:all-MiniLM-L6-v2",
        description="Hugging Face encoder: a local model directory, a cached hub id, or builtin:all-MiniLM-L6-v2.",
    )
    mode: Literal["head", "lora", "full"] = Field(
        "head",
        description="head: frozen encoder, train the classifier; lora: LoRA adapters + classifier; full: every weight.",
    )
    feature_scale: float = Field(
        4.0, gt=0.0, description="Length of the normalised sentence embedding fed to the classifier."
    )
    head_init: Literal["label-names", "zeros"] = Field(
        "label-names",
        description="Start the classifier from the embeddings of the label names (public) or from zeros.",
    )
    lora_rank: int = Field(8, ge=1, description="LoRA rank r.")
    lora_alpha: float = Field(16.0, gt=0.0, description="LoRA scaling alpha (update scale alpha/r).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    lora_targets: str = Field("query,value", description="Comma-separated module names that get adapters.")


class TrainConfig(_Section):
    local_epochs: float = Field(3.0, gt=0.0, le=1000.0, description="Passes over the site's data per round (expected).")
    sample_rate: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Chance that each example is in a step's batch (Poisson sampling); expected batch = rate x rows.",
    )
    max_physical_batch: int = Field(
        64, ge=1, description="Largest batch run through the model at once; bigger logical batches are split."
    )
    optimizer: Literal["auto", "sgd", "adam", "adamw"] = Field(
        "auto", description="auto: SGD for head, AdamW for lora and full."
    )
    learning_rate: float = Field(
        0.0, ge=0.0, description="0 picks the tuned default of the mode (head: 20, 40 with distributed noise)."
    )
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="SGD momentum.")
    weight_decay: float = Field(0.0, ge=0.0, description="Weight decay of the local optimizer.")


class PrivacyConfig(_Section):
    enabled: bool = Field(True, description="false trains without DP (a non-private baseline).")
    target_epsilon: float = Field(8.0, gt=0.0, le=1000.0, description="Each site's epsilon after all planned rounds.")
    delta: Delta = 1e-5
    noise_multiplier: float = Field(
        0.0, ge=0.0, le=1000.0, description="0 derives it from target-epsilon over the planned rounds."
    )
    max_grad_norm: float = Field(0.5, gt=0.0, le=1e6, description="Per-example gradient clipping norm.")
    accountant: Literal["pld", "prv", "rdp"] = Field(
        "pld",
        description="Accountant of the site's budget: pld (tight, dp-accounting), rdp (Renyi DP, an upper bound) or prv (Opacus PRV, training releases only).",
    )
    epsilon_cap: float = Field(
        0.0,
        ge=0.0,
        le=1000.0,
        description="Epsilon a site never exceeds (0: the target). A deployed site's own node config (epsilon-cap) wins.",
    )

    site_level_noise: float = Field(
        0.0,
        ge=0.0,
        le=1000.0,
        description="Site-level DP at the aggregator: noise multiplier on the sum of clipped site updates (0: off).",
    )
    site_level_clip: float = Field(
        1.0, gt=0.0, le=1e6, description="Site-level DP: clipping norm of each site's update."
    )
    site_level_cap: float = Field(
        0.0, ge=0.0, le=1000.0, description="Site-level DP: epsilon the federation may not exceed (0: no cap)."
    )
    secure_aggregation: bool = Field(
        False,
        description="Mask every update so the aggregator learns only the sum of the sites' updates (SecAgg+ style).",
    )
    noise: Literal["local", "distributed"] = Field(
        "local",
        description="local: each site adds all its DP noise; distributed: each adds a share, the sum carries central DP-SGD noise (needs secure-aggregation).",
    )
    max_colluding_sites: int = Field(
        1,
        ge=0,
        description="Secure aggregation: sites that may collude with the aggregator or drop out; the round needs sites minus this many.",
    )
    distributed_batch: float = Field(
        0.0,
        ge=0.0,
        description="Distributed noise: the public expected batch of the whole federation per step; 0: sample-rate x rows (simulation only).",
    )

    evaluation: Literal["off", "noised", "clear"] = Field(
        "off",
        description="Federated evaluation of a private run: off (nothing leaves the site), noised (Gaussian noise on each site's correct/total counts, recorded and counted in its budget) or clear (a deployed site refuses unless allow-non-private).",
    )
    evaluation_noise: float = Field(
        20.0, gt=0.0, le=1e6, description="Noised evaluation: standard deviation of the Gaussian noise on each count."
    )

    def cap(self) -> float:
        return self.epsilon_cap or self.target_epsilon


# Aggregations that resist poisoned updates: each needs every site's own update.
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum")


class StrategyConfig(_Section):
    name: Literal["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum"] = Field(
        "fedavg",
        description="Aggregation: fedavg, fedprox or fedadam; robust to poisoned updates: fedmedian (coordinate "
        "median), fedtrimmedavg (mean without the top and bottom trim-fraction) or krum (the update closest to "
        "its neighbours).",
    )
    trim_fraction: float = Field(
        0.2, gt=0.0, lt=0.5, description="fedtrimmedavg: share of sites cut at each end of every coordinate."
    )
    malicious_sites: int = Field(1, ge=0, description="krum: sites that may send poisoned updates.")
    fraction_train: float = Field(
        1.0, gt=0.0, le=1.0, description="Share of connected sites asked to train each round."
    )
    fraction_evaluate: float = Field(
        1.0, ge=0.0, le=1.0, description="Share asked to evaluate (0: no federated evaluation)."
    )
    evaluate_every: int = Field(
        1, ge=1, description="Rounds between federated evaluations (the last round is always one)."
    )
    min_sites: int = Field(2, ge=1, description="Sites that must be connected before a round starts.")
    proximal_mu: float = Field(0.01, ge=0.0, description="FedProx proximal weight.")
    server_learning_rate: float = Field(0.1, gt=0.0, description="FedAdam eta.")
    beta_1: float = Field(0.9, ge=0.0, lt=1.0, description="FedAdam first-moment decay.")
    beta_2: float = Field(0.99, ge=0.0, lt=1.0, description="FedAdam second-moment decay.")
    tau: float = Field(1e-3, gt=0.0, description="FedAdam adaptivity (epsilon of the update).")
    tail_average: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="Average the global models of this last fraction of rounds into the final model (free under DP).",
    )
    round_timeout: float = Field(3600.0, gt=0.0, description="Seconds to wait for the sites in a round.")
    max_update_norm: float = Field(
        1e5, gt=0.0, description="A site update whose L2 distance from the model sent exceeds this is rejected."
    )
    max_site_examples: int = Field(
        10_000_000, ge=1, description="A site claiming more training examples than this is rejected."
    )


class SimulationConfig(_Section):
    sites: int = Field(10, ge=1, le=100_000, description="Number of simulated sites (for column: set from the data).")
    partitioner: Literal["iid", "dirichlet", "column"] = Field(
        "dirichlet", description="How the dataset is split: iid, dirichlet (label skew) or column."
    )
    alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration: smaller means more label skew.")
    column: str = Field("", description="For partitioner=column: the column whose values are the sites.")
    site_caps: str = Field(
        "", description="Per-site epsilon caps, e.g. 'site-001=2.5,site-004=4' (others: privacy.epsilon-cap)."
    )
    site_policies: str = Field(
        "",
        description="Simulated sites that keep a policy of their own, as a deployed site's operator sets it (the "
        "keys of a federation file's [site-defaults.policy]; keys not named keep a real site's strict defaults), "
        "e.g. 'site-002: min-colluding-sites=2; site-004: modes=head max-release-epsilon=1'. The other sites "
        "follow the simulation's settings and refuse nothing.",
    )
    backend: Literal["ray", "in-process"] = Field(
        "ray",
        description="Where sites train: ray (Ray actors, sized by cpus-per-site and gpus-per-site, sites in "
        "parallel) or in-process (one site at a time in the simulation's own process: no start-up cost).",
    )
    cpus_per_site: float = Field(1.0, gt=0.0, description="backend ray: CPU cores per worker (workers = cores / this).")
    gpus_per_site: float = Field(
        0.0, ge=0.0, description="backend ray: GPU share per worker, e.g. 0.25 for four per GPU."
    )
    ray_address: str = Field(
        "",
        description="backend ray: an existing Ray cluster to run on (auto, or its head's HOST:PORT); empty: a "
        "private Ray on this machine.",
    )

    audit_canaries: int = Field(
        0,
        ge=0,
        le=100_000,
        description="Set by fedpriv audit --empirical: head inputs reserved for white-box canaries (no text fills "
        "them); 0 in any other run.",
    )
    audit_canary_site: str = Field(
        "", description="Set by fedpriv audit --empirical: the simulated site that holds the canaries."
    )

    @field_validator("ray_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        value = value.strip()
        if value.startswith("ray://"):
            raise ValueError(
                "fedpriv simulate runs on a node of the cluster (as `flwr run` does): give the head's HOST:PORT "
                "or auto, not a Ray Client ray:// address"
            )
        if value and value != "auto":
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{value!r} is not auto or HOST:PORT")
        return value

    @field_validator("site_caps")
    @classmethod
    def _parse_caps(cls, value: str) -> str:
        _parse_caps(value)
        return value

    def caps(self) -> dict[str, float]:
        return _parse_caps(self.site_caps)

    @field_validator("site_policies")
    @classmethod
    def _parse_policies(cls, value: str) -> str:
        _parse_policies(value)
        return value

    def policies(self) -> dict[str, SitePolicy]:
        return _parse_policies(self.site_policies)


def _parse_policies(text: str) -> dict[str, SitePolicy]:
    from fedpriv.common.privacy.site_policy import PREFIX, PolicyError, SitePolicy

    known = {name.replace("_", "-") for name in SitePolicy.model_fields}
    policies = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        site, colon, rest = item.partition(":")
        site = site.strip()
        if not colon or not site:
            raise ValueError(f"'{item}' is not 'SITE: key=value ...'")
        node: dict[str, str] = {}
        for setting in rest.split():
            key, equals, value = setting.partition("=")
            if not equals or key not in known:
                raise ValueError(f"{site}: '{setting}' is not key=value with a policy key ({', '.join(sorted(known))})")
            node[key if key == "allow-non-private" else PREFIX + key] = value
        try:
            policies[site] = SitePolicy.from_node_config(node)
        except PolicyError as error:
            raise ValueError(f"{site}: {error}".replace("node config ", "").replace(PREFIX, "")) from None
    return policies


def _parse_caps(text: str) -> dict[str, float]:
    caps = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        site, _, value = item.partition("=")
        try:
            cap = float(value)
        except ValueError:
            cap = -1.0
        if not site.strip() or cap <= 0:
            raise ValueError(f"'{item}' is not site=epsilon with epsilon > 0")
        caps[site.strip()] = cap
    return caps


# Bounds of a plan every part can carry out: beyond them a run stalls in accounting or
# training long before it would end (10^12 rounds), so they are refused up front.
MAX_ROUNDS = 100_000
MAX_STEPS = 10_000_000  # DP-SGD steps a site's plan holds over all rounds


class FedprivConfig(_Section):
    rounds: int = Field(40, ge=1, le=MAX_ROUNDS, description="Federated rounds (the privacy plan covers all of them).")
    seed: int = Field(
        42, ge=0, lt=2**63, description="Seed of partitioning, splits and (in simulation only) sampling and noise."
    )
    run_dir: str = Field("", description="Where the aggregator writes the run; empty: runs/<date>-<time>.")
    central_eval_every: int = Field(1, ge=0, description="Rounds between central evaluations (0: final only).")
    keep_checkpoints: int = Field(
        0,
        ge=0,
        description="Round checkpoints kept in the run directory (0: all; full mode writes the whole model each round).",
    )
    aggregator_key: str = Field(
        "", description="The aggregator's Ed25519 ledger key (PEM); empty: one is made in the run directory."
    )
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    strategy: StrategyConfig = StrategyConfig()
    simulation: SimulationConfig = SimulationConfig()

    @field_validator("data", mode="before")
    @classmethod
    def _inline_label_list(cls, value: Any) -> Any:
        # A TOML file may list the labels; the run config needs one string.
        if isinstance(value, Mapping) and isinstance(value.get("labels"), list):
            value = dict(value)
            value["labels"] = json.dumps([str(v) for v in value["labels"]])
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FedprivConfig:
        if self.simulation.partitioner == "column" and not self.simulation.column:
            raise ValueError("simulation.column must name a column when simulation.partitioner is 'column'")
        if self.simulation.ray_address and self.simulation.backend != "ray":
            raise ValueError(
                "simulation.ray-address runs the sites on a Ray cluster: it needs simulation.backend = ray"
            )
        p, s, t = self.privacy, self.strategy, self.train
        # As accounting.steps_per_round counts them (importing it here would load dp-accounting with every config).
        distributed = p.enabled and p.noise == "distributed"  # one step of the pooled data per round
        steps = (1 if distributed else max(1, round(t.local_epochs / t.sample_rate))) * self.rounds
        if steps > MAX_STEPS:
            raise ValueError(
                f"rounds x train.local-epochs / train.sample-rate plans {steps:.3g} training steps per site "
                f"(at most {MAX_STEPS:.0e}); lower rounds or train.local-epochs, or raise train.sample-rate"
            )
        if p.noise == "distributed" and not p.secure_aggregation:
            raise ValueError("privacy.noise = 'distributed' needs privacy.secure-aggregation = true")
        if p.noise == "distributed" and not p.enabled:
            raise ValueError("privacy.noise = 'distributed' needs privacy.enabled = true")
        if s.name in ROBUST_STRATEGIES:
            if p.secure_aggregation:
                raise ValueError(
                    f"strategy.name: {s.name} needs each site's update, and secure aggregation shows only their sum"
                )
            if p.site_level_noise:
                raise ValueError(
                    f"strategy.name: {s.name} is not an average, so site-level DP's noise would not cover it; "
                    "use fedavg with privacy.site-level-noise"
                )
            if s.name == "krum" and s.min_sites < 2 * s.malicious_sites + 3:
                raise ValueError(
                    f"strategy.malicious-sites: krum with {s.malicious_sites} needs strategy.min-sites >= "
                    f"{2 * s.malicious_sites + 3}"
                )
        if p.secure_aggregation:
            if p.site_level_noise:
                raise ValueError(
                    "privacy.site-level-noise: not with privacy.secure-aggregation (the aggregator sees only the sum)"
                )
            if s.name != "fedavg":
                raise ValueError("strategy.name: secure aggregation averages the sites' updates; use fedavg")
            if s.fraction_train != 1.0:
                raise ValueError("strategy.fraction-train: secure aggregation needs the whole cohort, set it to 1")
            if s.min_sites < 2 or p.max_colluding_sites >= s.min_sites:
                raise ValueError(
                    "privacy.max-colluding-sites must be below strategy.min-sites (at least 2) for secure aggregation"
                )
            if self.simulation.sites < 2:
                # A simulated round would wait forever for a second site (a deployment ignores this section).
                raise ValueError(
                    "simulation.sites: secure aggregation needs at least 2 sites (--preset local runs one)"
                )
        return self

    def federated_evaluation_rounds(self) -> list[int]:
        """The rounds with a federated evaluation: none in a private run unless privacy.evaluation allows it."""
        if self.strategy.fraction_evaluate == 0 or (self.privacy.enabled and self.privacy.evaluation == "off"):
            return []
        every = self.strategy.evaluate_every
        return [r for r in range(1, self.rounds + 1) if r % every == 0 or r == self.rounds]

    # -- Flower run config -------------------------------------------------

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        return flatten(self.model_dump(by_alias=True))

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FedprivConfig:
        return parse_config(unflatten(dict(run_config)), source="run config")

    def replace(self, **dotted: Any) -> FedprivConfig:
        """A copy with `section.key=value` overrides applied and validated again."""
        return apply_overrides(self, dotted)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: '{part}' is a value, not a section")
        node[leaf] = value
    return tree


def _describe(error: ValidationError, source: str) -> ConfigError:
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown setting"
        lines.append(f"{field}: {message}")
    return ConfigError(f"invalid configuration ({source}):\n  " + "\n  ".join(lines))


def parse_config(tree: Mapping[str, Any], source: str = "configuration") -> FedprivConfig:
    try:
        return FedprivConfig.model_validate(tree)
    except ValidationError as error:
        raise _describe(error, source) from None


def presets() -> dict[str, Path]:
    """The settings files shipped with fedpriv (`--preset NAME`), by name."""
    from fedpriv.common.resources import BUILTIN_DIR

    return {p.stem: p for p in sorted((BUILTIN_DIR / "presets").glob("*.toml"))}


def user_settings(path: str | Path | None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """What a config file and `--set` items say, flat and dotted (no defaults filled in)."""
    flat: dict[str, Any] = {}
    if path is not None:
        given = read_toml(path, "config file")
        flat.update(flatten(given.get("fedpriv", given)))
    flat.update(parse_overrides(overrides))
    return {kebab(k): v for k, v in flat.items()}


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] = (), preset: str | None = None
) -> FedprivConfig:
    """Read a preset and/or a TOML config file (both optional; the file wins) and apply `section.key=value` overrides."""
    tree: dict[str, Any] = {}
    sources = []
    if preset is not None:
        known = presets()
        if preset not in known:
            raise ConfigError(f"--preset: no preset '{preset}' (available: {', '.join(known) or 'none'})")
        tree = read_toml(known[preset], "preset")
        sources.append(f"preset {preset}")
    if path is not None:
        sources.append(str(path))
        # A fedpriv file may keep its settings under [fedpriv] next to other tools' tables.
        given = read_toml(path, "config file")
        tree = _merged(tree, given.get("fedpriv", given))
    config = parse_config(tree, " + ".join(sources) or "defaults")
    return apply_overrides(config, parse_overrides(overrides))


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_toml(path: str | Path, what: str, error: type[Exception] = ConfigError) -> dict[str, Any]:
    return files.read_toml(path, what, error)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`key=value` strings; values are read as TOML (so 3, 0.5, true, "x")."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected section.key=value")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare word is a string
        parsed[key] = value
    return parsed


def apply_overrides(config: FedprivConfig, overrides: Mapping[str, Any]) -> FedprivConfig:
    if not overrides:
        return config
    flat = config.to_run_config()
    for key, value in overrides.items():
        key = kebab(key)
        if key not in flat:
            raise ConfigError(f"{key}: unknown setting (see `fedpriv config show` for every setting)")
        flat[key] = value
    return parse_config(unflatten(flat), "overrides")
