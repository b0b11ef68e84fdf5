"""The README is the front door: keep what it states true."""

import re
from pathlib import Path

from fedpriv.cli_settings import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_settings_table_matches_the_code():
    table = re.search(r"<!-- settings:begin -->\n(.*?)\n<!-- settings:end -->", README, re.S).group(1)
    assert table == reference_markdown()


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ("./setup.sh", ".venv/bin/pytest"):
        assert command in README and command in ci
    assert ".venv/bin/fedpriv simulate" in README
