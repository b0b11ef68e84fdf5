"""The command line's settings policy: which preset `fedpriv simulate` starts from, and the settings reference.

What a setting means lives in `common/config.py`; how the CLI chooses a
starting point for a user and renders every setting (`fedpriv config show`,
the README's table) lives here, beside the commands that use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from fedpriv.common.config import FedprivConfig
from fedpriv.common.schema import kebab

# `fedpriv simulate` starts from distributed DP under secure aggregation: it beat local DP by 3 points
# at epsilon 8 and 8 at epsilon 3 (bench/README.md). Settings that secure aggregation cannot serve send
# it to the local preset instead of failing, since the user asked for them, not for the preset.
DEFAULT_SIMULATION_PRESET = "distributed"


def simulation_preset(settings: Mapping[str, Any]) -> tuple[str, str]:
    """The preset `fedpriv simulate` starts from for these user settings (flat, dotted), and why."""
    given = {kebab(k): v for k, v in settings.items()}
    reasons = [
        ("privacy.enabled", lambda v: v is False, "DP is off"),
        ("privacy.noise", lambda v: v == "local", "local noise was asked for"),
        ("privacy.secure-aggregation", lambda v: v is False, "secure aggregation is off"),
        ("privacy.site-level-noise", lambda v: _number(v) > 0, "site-level DP needs each site's update"),
        ("strategy.name", lambda v: v != "fedavg", "the strategy is not fedavg"),
        ("strategy.fraction-train", lambda v: _number(v) < 1, "only part of the cohort trains"),
        ("simulation.sites", lambda v: _number(v) < 2, "secure aggregation needs two sites"),
        ("strategy.min-sites", lambda v: _number(v) < 2, "secure aggregation needs two sites"),
    ]
    for key, applies, why in reasons:
        if key in given and applies(given[key]):
            return "local", f"{why} ({key} = {given[key]!r})"
    return DEFAULT_SIMULATION_PRESET, "the default"


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")  # left for validation to name


def settings_table(config: FedprivConfig | None = None) -> list[tuple[str, Any, str]]:
    """(dotted name, value, description) for every setting, for docs and `config show`."""
    config = config or FedprivConfig()
    rows = []

    def walk(model: BaseModel, prefix: str) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            key = f"{prefix}{kebab(name)}"
            if isinstance(value, BaseModel):
                walk(value, f"{key}.")
            else:
                rows.append((key, value, field.description or ""))

    walk(config, "")
    return rows


def reference_markdown() -> str:
    """The README's settings table (tests keep the README in step with this)."""
    import tomli_w

    lines = ["| setting | default | meaning |", "| --- | --- | --- |"]
    for key, value, description in settings_table():
        shown = tomli_w.dumps({"v": value})[4:].strip()
        lines.append(f"| `{key}` | `{shown}` | {description.replace('|', '/')} |")
    return "\n".join(lines)
