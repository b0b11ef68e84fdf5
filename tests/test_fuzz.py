"""Property-based tests: whatever bytes or settings a user hands fedpriv, no traceback, and a named refusal.

Readers of site data, of configs and of ledgers either accept the input or
raise fedpriv's own error, whose message names the file (and row or line) or
the setting at fault.
"""

from __future__ import annotations

import gzip
import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpriv.common.config import ConfigError, FedprivConfig, apply_overrides, load_config, parse_overrides
from fedpriv.common.data import DataError, LabelSet, load_dataset
from fedpriv.common.errors import FedprivError
from fedpriv.common.privacy.ledger import Ledger, LedgerError, verify_ledger
from tests.helpers import LABELS

LABEL_SET = LabelSet(tuple(LABELS))
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

cells = st.one_of(
    st.sampled_from(LABELS),
    st.text(max_size=30),
    st.text(alphabet=",;\t\"'\n\r\\", max_size=6),
    st.integers().map(str),
)
rows = st.lists(st.tuples(cells, cells), max_size=8)


def _table_bytes(kind: str, header: tuple[str, str], body: list[tuple[str, str]]) -> bytes:
    if kind == "jsonl":
        return "\n".join(json.dumps({header[0]: a, header[1]: b}) for a, b in body).encode()
    sep = "," if kind == "csv" else "\t"
    return "\n".join(sep.join(r) for r in [header, *body]).encode()


def _assert_named(error: FedprivError, path: Path) -> None:
    assert str(error).startswith(str(path)), str(error)


@FUZZ
@given(
    kind=st.sampled_from(["csv", "tsv", "jsonl"]),
    header=st.sampled_from([("text", "category"), ("message", "category"), ("text", "label")]),
    body=rows,
    garbage=st.binary(max_size=40),
    compress=st.booleans(),
)
def test_site_data_is_read_or_refused_by_file_and_row(tmp_path, kind, header, body, garbage, compress):
    raw = _table_bytes(kind, header, body) + garbage
    path = tmp_path / (f"site.{kind}" + (".gz" if compress else ""))
    path.write_bytes(gzip.compress(raw) if compress else raw)
    try:
        data = load_dataset(path, LABEL_SET, "text", "category")
    except DataError as error:
        _assert_named(error, path)
    else:
        assert len(data.texts) == len(data.labels) >= 1
        assert set(data.labels.tolist()) <= set(range(len(LABELS)))


@FUZZ
@given(raw=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".tsv", ".jsonl", ".parquet", ".csv.zst", ".txt"]))
def test_arbitrary_bytes_never_escape_as_a_traceback(tmp_path, raw, suffix):
    path = tmp_path / f"any{suffix}"
    path.write_bytes(raw)
    try:
        load_dataset(path, LABEL_SET, "text", "category")
    except DataError as error:
        _assert_named(error, path)


keys = st.sampled_from(sorted(FedprivConfig().to_run_config())) | st.text(
    alphabet=string.ascii_lowercase + ".-_", min_size=1, max_size=20
)
values = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", '""', '"x"', "[]", "{}", "nan", "-1", "1e309", "inf"]),
    st.text(max_size=12),
)


@FUZZ
@given(items=st.lists(st.tuples(keys, values), max_size=4))
def test_overrides_are_applied_or_refused_naming_the_setting(items):
    overrides = [f"{k}={v}" for k, v in items]
    try:
        config = apply_overrides(FedprivConfig(), parse_overrides(overrides))
    except ConfigError as error:
        message = str(error)
        assert any(k in message or k.replace("_", "-") in message for k, _ in items) or "=" in message, message
    else:
        assert isinstance(config, FedprivConfig)


@FUZZ
@given(text=st.text(max_size=200))
def test_config_files_are_read_or_refused_naming_the_file(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except FedprivError as error:
        assert str(path) in str(error) or "run.toml" in str(error), str(error)


@FUZZ
@given(
    lines=st.lists(
        st.one_of(
            st.text(max_size=60),
            st.builds(
                json.dumps, st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=4)
            ),
        ),
        max_size=5,
    )
)
def test_ledgers_are_read_or_refused_by_line(tmp_path, lines):
    path = tmp_path / "site.ledger.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        Ledger(path).entries()
    except LedgerError as error:
        assert str(error).startswith(f"{path} line "), str(error)
    entries, problems = verify_ledger(path)
    assert all(str(p).startswith(path.name) or str(p).startswith(str(path)) for p in problems)


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00\n", b"{\n", b'{"seq": 0}\n'])
def test_ledger_examples_that_once_escaped(tmp_path, raw):
    path = tmp_path / "l.jsonl"
    path.write_bytes(raw)
    with pytest.raises(LedgerError):
        Ledger(path).entries()
