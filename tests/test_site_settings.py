"""A site's own settings are described once (`common/site_settings.py`) and read alike wherever they travel."""

from __future__ import annotations

import typing

import pytest
from flwr.app import Context, RecordDict
from pydantic.fields import FieldInfo

from fedpriv.common import node_config
from fedpriv.common.config import DataConfig, PrivacyConfig
from fedpriv.common.data import DataError
from fedpriv.common.site_settings import DataFormat
from fedpriv.deploy.kit import KitData, SiteKit
from fedpriv.deploy.provision import DataSpec, SiteDefaults, SiteSpec

FORMAT = ("text_column", "label_column", "delimiter", "min_rows", "max_chars")


def _declaration(model, name):
    """(description, bounds) of a field, looked up inside `T | None` too (an optional override)."""
    field = model.model_fields[name]
    if field.description is not None:
        return field.description, field.metadata
    for arg in typing.get_args(field.annotation):
        for meta in typing.get_args(arg)[1:]:
            if isinstance(meta, FieldInfo):
                return meta.description, meta.metadata
    raise AssertionError(f"{model.__name__}.{name} is not declared by a site_settings type")


def _same_declaration(models, name):
    first, *rest = [_declaration(m, name) for m in models]
    assert first[0] and all(d == first for d in rest), name


def test_the_table_format_is_one_declaration_in_run_settings_federation_file_and_kit():
    for name in FORMAT:
        _same_declaration([DataFormat, DataConfig, DataSpec, KitData], name)
        defaults = {m.model_fields[name].default for m in (DataFormat, DataConfig, DataSpec, KitData)}
        assert len(defaults) == 1, name
    # Its kebab-case names are the node-config keys the agent writes and the ClientApp reads.
    keys = (node_config.TEXT_COLUMN, node_config.LABEL_COLUMN, node_config.DELIMITER, node_config.MIN_ROWS)
    assert set(DataFormat().format_settings()) == {*keys, node_config.MAX_CHARS}


def test_budget_settings_are_one_declaration_in_federation_file_kit_and_run_settings():
    for name in ("epsilon_cap", "delta", "declared_rows"):
        _same_declaration([SiteDefaults, SiteSpec, SiteKit], name)
    _same_declaration([SiteKit, PrivacyConfig], "delta")
    assert (node_config.EPSILON_CAP, node_config.DELTA, node_config.DECLARED_ROWS) == (
        "epsilon-cap",
        "delta",
        "declared-rows",
    )
    with pytest.raises(ValueError, match="delta"):
        SiteSpec(name="north", delta=1.5)


def test_a_deployed_site_reads_its_table_as_its_own_node_config_says_not_as_the_run_asks(tiny_config, tmp_path):
    from fedpriv.client.runtime import WorkerRuntime
    from tests.helpers import easy_rows, write_csv

    data = write_csv(tmp_path / "site.csv", easy_rows(30, seed=3))
    node = {
        "data-path": str(data),
        "site-name": "north",
        "declared-rows": 100,
        **DataFormat(min_rows=40).format_settings(),
    }
    # The run asks for at most 5 rows; the site's own minimum is 40 and wins.
    run = tiny_config.replace(**{"data.min-rows": 5})
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run.to_run_config())
    with pytest.raises(DataError, match="40"):
        WorkerRuntime().site(context, run)
    # A node config without the format (a SuperNode started by hand) reads the run's, as before.
    bare = {"data-path": str(data), "site-name": "north", "declared-rows": 100}
    context = Context(run_id=1, node_id=7, node_config=bare, state=RecordDict(), run_config=run.to_run_config())
    assert WorkerRuntime().site(context, run).name == "north"
