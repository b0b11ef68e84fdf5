"""The fedpriv Flower App: where its ServerApp and ClientApp live, and its app folder.

A Flower App is a folder with a pyproject.toml naming the two components and
the run config. fedpriv's carries no code (`fab-exclude`): every party runs
the fedpriv its own operator installed, so the bundle an aggregator sends can
change settings, never the code a site runs. The folder can therefore be
written anywhere from an installed fedpriv, with no source tree at hand.
"""

from __future__ import annotations

from pathlib import Path

import tomli_w

from fedpriv import __version__
from fedpriv.common.config import FedprivConfig

SERVER_APP = "fedpriv.server.app:app"
CLIENT_APP = "fedpriv.client.app:app"
APP_NAME = "fedpriv"


def app_project(config: FedprivConfig | None = None) -> dict:
    """The pyproject.toml of the fedpriv Flower App, with `config` as the run config's defaults."""
    return {
        "project": {"name": APP_NAME, "version": __version__, "dependencies": [f"fedpriv=={__version__}"]},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedpriv",
                    "fab-exclude": ["**"],
                    "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
                    "config": (config or FedprivConfig()).model_dump(by_alias=True),
                }
            }
        },
    }


def write_app_dir(directory: str | Path, config: FedprivConfig | None = None) -> Path:
    """Writes the Flower App folder (for `flwr run DIR` or the simulation engine); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(tomli_w.dumps(app_project(config)), encoding="utf-8")
    return directory
