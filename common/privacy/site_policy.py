"""A site's own privacy policy: the lines its operator draws, whatever a run asks.

The aggregator proposes a run's settings (noise, rounds, sample rate, mode,
collusion bound); a deployed site checks every release those settings would
make against this policy before it trains, and refuses a round that would
weaken it. The policy reaches the site from its own operator only: the
federation file's `[site-defaults.policy]` (or a site's `policy`) is written
into its kit by `fedpriv provision`, and the agent passes it to the ClientApp
in the node config under the keys below. A kit written before policies
existed gets the defaults, which are strict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from fedpriv.common.errors import FedprivError
from fedpriv.common.schema import FrozenKebabModel

Mode = Literal["head", "lora", "full"]
NoiseMode = Literal["local", "distributed"]

# The node-config key of each field is its kebab-case name, prefixed so that it
# cannot be mistaken for a run setting (all but allow-non-private, which predates it).
PREFIX = "policy-"


class PolicyError(FedprivError, ValueError):
    """A site policy that cannot be read; the message names the key."""


class SitePolicy(FrozenKebabModel):
    allow_non_private: bool = Field(
        False, description="Ever release without DP (training or evaluation metrics in the clear)."
    )
    min_colluding_sites: int = Field(
        1,
        ge=0,
        description="Secure aggregation: the collusion bound t the site assumes at least; a round planned for a smaller t (so a smaller noise share) is refused.",
    )
    min_noise_multiplier: float = Field(
        0.5, ge=0, description="Smallest noise multiplier of any private release the site makes."
    )
    max_release_epsilon: float = Field(
        4.0,
        gt=0,
        description="Largest epsilon one release may cost on its own (one round's update or one noised evaluation), at the site's delta.",
    )
    modes: tuple[Mode, ...] = Field(("head", "lora", "full"), description="Fine-tuning modes the site accepts.")
    noise_modes: tuple[NoiseMode, ...] = Field(
        ("local", "distributed"),
        description="Noise modes the site accepts: local (all its noise itself) or distributed (a share, under secure aggregation).",
    )

    @field_validator("modes", "noise_modes", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        if isinstance(value, str):  # node config and --set carry lists as "a,b"
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("min_noise_multiplier", "max_release_epsilon")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    def to_node_config(self) -> dict[str, str | float | int]:
        """The policy as node-config entries (what the agent passes to the ClientApp)."""
        values: dict[str, str | float | int] = {}
        for name, value in self.model_dump(by_alias=True).items():
            key = name if name == "allow-non-private" else PREFIX + name
            if isinstance(value, bool):
                values[key] = "true" if value else "false"
            elif isinstance(value, (list, tuple)):
                values[key] = ",".join(value)
            else:
                values[key] = value
        return values

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any]) -> SitePolicy:
        """The policy a deployed site's operator set; keys it does not name keep their (strict) defaults."""
        tree: dict[str, Any] = {}
        for field_name in cls.model_fields:
            name = field_name.replace("_", "-")
            key = name if name == "allow-non-private" else PREFIX + name
            if key in node:
                value = node[key]
                if name == "allow-non-private":
                    value = str(value).strip().lower()
                    if value not in ("true", "false"):
                        raise PolicyError(f"node config {key}: expected true or false, not {node[key]!r}")
                    value = value == "true"
                tree[name] = value
        try:
            return cls.model_validate(tree)
        except ValidationError as error:
            first = error.errors(include_url=False)[0]
            field = str(first["loc"][0]) if first["loc"] else "policy"
            key = field if field == "allow-non-private" else PREFIX + field
            raise PolicyError(f"node config {key}: {first['msg']}") from None

    @classmethod
    def simulated(cls, max_colluding_sites: int) -> SitePolicy:
        """A simulated site's: the harness's operator sets every site's settings, so nothing is refused."""
        # No per-release limit: infinite, which an operator's policy cannot say (it must be finite).
        return cls.model_construct(
            allow_non_private=True,
            min_colluding_sites=max_colluding_sites,
            min_noise_multiplier=0.0,
            max_release_epsilon=math.inf,
            modes=("head", "lora", "full"),
            noise_modes=("local", "distributed"),
        )
