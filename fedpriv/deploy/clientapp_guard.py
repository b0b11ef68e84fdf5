"""The site's check of the aggregator's app bundle: settings only, naming fedpriv's ClientApp.

Flower 1.39's ClientApp process installs the app bundle (FAB) the
aggregator submitted, puts its folder first on `sys.path` and imports the
`clientapp` component the bundle's pyproject.toml names. A hostile
aggregator could therefore ship Python files (even a `fedpriv/` package
that shadows the installed one) and make every site run them. Flower's own
defence, `--trusted-entities`, needs bundles signed through Flower's hosted
platform: an open-source SuperLink sends none, and the SuperNode then refuses
every run.

fedpriv's bundle carries settings only (`fab-exclude = ["**"]`), so the site
can demand exactly that: the bundle holds `pyproject.toml` and Flower's
manifest and nothing else, and names `fedpriv.client.app:app`, the ClientApp
of the fedpriv its operator installed. Anything else is refused, and the
run's message gets an error reply whose reason says why.

The agent's SuperNode starts no ClientApp process at all: it hands each
message to the site's resident worker (`site_worker.WorkerChannel`), after
checking the run's bundle with `check_fab`. No bundle is ever installed.
"""

from __future__ import annotations

import io
import tomllib
import zipfile

from fedpriv.common.errors import FedprivError
from fedpriv.common.flower_app import CLIENT_APP

# What `flwr build` puts in a bundle built with `fab-exclude = ["**"]`.
ALLOWED = frozenset({"pyproject.toml", ".info/CONTENT"})


class ForeignAppError(FedprivError, RuntimeError):
    """The aggregator sent an app bundle that is not fedpriv's settings-only bundle."""


def check_fab(content: bytes) -> None:
    """Raises `ForeignAppError` unless the bundle is settings only and names fedpriv's ClientApp."""
    try:
        bundle = zipfile.ZipFile(io.BytesIO(content))
        names = [entry.filename for entry in bundle.infolist()]
        extra = sorted(n for n in names if n not in ALLOWED)
        if extra:
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise ForeignAppError(
                f"refused the aggregator's app bundle: it carries files ({shown}); fedpriv's bundle carries "
                "settings only, and this site runs only the ClientApp its operator installed"
            )
        project = tomllib.loads(bundle.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ForeignAppError(f"refused the aggregator's app bundle: not a readable Flower app ({error})") from None
    component = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp")
    if component != CLIENT_APP:
        raise ForeignAppError(
            f"refused the aggregator's app bundle: it names the ClientApp {component!r}; this site runs only "
            f"{CLIENT_APP}, from the fedpriv its operator installed"
        )


class WorkerUnavailable(FedprivError, RuntimeError):
    """A message came while the site's resident worker was not listening."""
