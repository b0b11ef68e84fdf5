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
CLIENT_APP = "fedpriv.client.app:app"  # a site's; the only one a deployed site runs
# The same handlers, declaring Flower's virtual nodes simulated (`flwr run` of a local simulation).
SIMULATION_CLIENT_APP = "fedpriv.simulation.flower_clientapp:app"
# The same handlers, with the site's run files kept on the driver (`fedpriv simulate` on a Ray cluster).
CLUSTER_CLIENT_APP = "fedpriv.simulation.cluster_clientapp:app"
APP_NAME = "fedpriv"


def app_project(config: FedprivConfig | None = None, client_app: str = CLIENT_APP) -> dict:
    """The pyproject.toml of the fedpriv Flower App, with `config` as the run config's defaults.

    A deployment's names the site's ClientApp; one for Flower's own simulation (`flwr run`) names
    `SIMULATION_CLIENT_APP`, which fedpriv sites refuse.
    """
    return {
        "project": {"name": APP_NAME, "version": __version__, "dependencies": [f"fedpriv=={__version__}"]},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedpriv",
                    "fab-exclude": ["**"],
                    "components": {"serverapp": SERVER_APP, "clientapp": client_app},
                    "config": (config or FedprivConfig()).model_dump(by_alias=True),
                }
            }
        },
    }


def write_app_dir(directory: str | Path, config: FedprivConfig | None = None, client_app: str = CLIENT_APP) -> Path:
    """Writes the Flower App folder (for `flwr run DIR` or the simulation engine); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(tomli_w.dumps(app_project(config, client_app)), encoding="utf-8")
    return directory
