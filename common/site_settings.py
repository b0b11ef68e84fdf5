"""What a site settles for itself, described once: how its table is read, and its budget.

The same settings travel in four places: a run's settings (`data.*`,
`privacy.delta`; a simulation's sites use them), the federation file
(`[data]`, `[site-defaults]`, `[[sites]]`), a site's kit (`kit.toml`) and the
node config the site agent hands the ClientApp. Each is declared here once,
with its bounds and its meaning; the models that carry it use these types and
the kebab-case name, which is also its node-config key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field

from fedpriv.common.schema import KebabModel, kebab

TextColumn = Annotated[str, Field(description="Column holding the text.")]
LabelColumn = Annotated[str, Field(description="Column holding the label name.")]
Delimiter = Annotated[
    str,
    Field(
        max_length=1,
        description="Column delimiter of a delimited text file; empty: by extension (.csv comma, .tsv/.txt tab).",
    ),
]
MinRows = Annotated[int, Field(ge=1, description="A site with fewer usable rows is refused.")]
MaxChars = Annotated[
    int,
    Field(
        ge=100,
        le=10_000_000,
        description="Characters read of each text; a longer one is cut (with a warning naming the file and row) "
        "before tokenizing, which would otherwise hold the whole text in memory.",
    ),
]
EpsilonCap = Annotated[
    float, Field(gt=0.0, le=1000.0, description="Epsilon the site never exceeds, over every run it joins.")
]
Delta = Annotated[float, Field(gt=0.0, lt=1.0, description="The site's delta; keep it below 1/rows.")]
DeclaredRows = Annotated[
    int,
    Field(
        gt=0,
        description="The site's public size (a round figure it may publish): DP updates are divided by sample "
        "rate x this, never by the true row count.",
    ),
]


class DataFormat(KebabModel):
    """How a site's table is read: the same in a run's `[data]`, the federation file's, a kit's, a node config."""

    text_column: TextColumn = "text"
    label_column: LabelColumn = "category"
    delimiter: Delimiter = ""
    min_rows: MinRows = 10
    max_chars: MaxChars = 20_000

    def format_settings(self) -> dict[str, Any]:
        """These settings of any model that carries them (a run's data section too), by kebab-case name."""
        return {kebab(name): getattr(self, name) for name in DataFormat.model_fields}

    @classmethod
    def from_settings(cls, values: Mapping[str, Any], fallback: DataFormat | None = None) -> DataFormat:
        """The format named in `values` (a node config), each setting it lacks taken from `fallback`."""
        base = (fallback or cls()).format_settings()
        return DataFormat.model_validate({k: values.get(k, v) for k, v in base.items()})
