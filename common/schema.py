"""Settings models whose fields read as kebab-case in TOML and on the command line.

`text_column` in Python is `text-column` in a file, `--set data.text-column=`
and Flower's run config; both spellings are accepted on input.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


def kebab(name: str) -> str:
    return name.replace("_", "-")


class KebabModel(BaseModel):
    """Unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(alias_generator=kebab, populate_by_name=True, extra="forbid")


class FrozenKebabModel(KebabModel):
    model_config = ConfigDict(alias_generator=kebab, populate_by_name=True, extra="forbid", frozen=True)
