"""The site's `flwr-clientapp`: Flower's own, refusing an app bundle that carries code or names another ClientApp.

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
of the fedpriv its operator installed. Anything else is refused before it is
unpacked; the run's message gets an error reply whose reason says why.

The agent puts its own `flwr-clientapp` first on the SuperNode's PATH
(SuperExec starts the ClientApp process by that name): a forwarder to the
site's resident worker (`site_worker`), which runs `check_fab` on every
bundle. When no worker listens, the forwarder runs this module's `main`,
Flower's own ClientApp process told to refuse the message with the reason.
"""

from __future__ import annotations

import io
import shlex
import sys
import tomllib
import zipfile
from pathlib import Path

from fedpriv.common.errors import FedprivError
from fedpriv.common.flower_app import CLIENT_APP

# What `flwr build` puts in a bundle built with `fab-exclude = ["**"]`.
ALLOWED = frozenset({"pyproject.toml", ".info/CONTENT"})
COMMAND = "flwr-clientapp"
SUPEREXEC = "flower-superexec"


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


FORWARDER = """\
# fedpriv's flwr-clientapp: hands this message to the site's resident worker (fedpriv.deploy.site_worker).
# The standard library only: it runs once per message, so it must start in milliseconds.
import json, os, socket, sys

WORKER, PYTHON = {worker!r}, {python!r}


def unavailable(why):
    # Flower's own ClientApp process, told to refuse: the aggregator gets an error reply naming why.
    os.execv(PYTHON, [PYTHON, "-m", "fedpriv.deploy.clientapp_guard", "--worker-unavailable", why, *sys.argv[1:]])


try:
    with open(os.path.join(WORKER, "secret"), encoding="utf-8") as f:
        secret = f.read().strip()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(os.path.join(WORKER, "socket"))
except OSError as error:
    unavailable("the site worker is not running (%s); its agent restarts it" % (error.strerror or error))
try:
    conn.sendall(json.dumps({{"secret": secret, "argv": sys.argv[1:], "cwd": os.getcwd()}}).encode() + b"\\n")
    answer = conn.makefile("rb").readline()
except OSError:
    answer = b""
if not answer:
    unavailable("the site worker stopped while it answered this message; its agent restarts it")
sys.exit(int(json.loads(answer)["exit"]))
"""


class WorkerUnavailable(FedprivError, RuntimeError):
    """A message came while the site's resident worker was not listening."""


def write_launcher(directory: Path, worker: Path) -> Path:
    """The commands the SuperNode starts by name, in `directory` (first on its PATH).

    `flwr-clientapp` forwards each message to the resident worker in `worker`;
    `flower-superexec` is Flower's, idling at a slower poll (`fedpriv.deploy.superexec`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    forwarder = directory / "forward-to-worker.py"
    _write(forwarder, FORWARDER.format(worker=str(worker), python=sys.executable))
    python = shlex.quote(sys.executable)
    # -I -S: no site-packages, no environment: a bare interpreter starts in milliseconds.
    _write(directory / COMMAND, f'#!/bin/sh\nexec {python} -I -S {shlex.quote(str(forwarder))} "$@"\n')
    _write(directory / SUPEREXEC, f'#!/bin/sh\nexec {python} -m fedpriv.deploy.superexec "$@"\n')
    return directory


def _write(path: Path, text: str) -> None:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(0o700)
    tmp.replace(path)


def main() -> None:
    from fedpriv.common.flower_compat import run_clientapp_checking_bundles

    unavailable = None
    if len(sys.argv) > 2 and sys.argv[1] == "--worker-unavailable":
        unavailable = sys.argv[2]
        del sys.argv[1:3]

    def checked(content: bytes) -> None:
        if unavailable is not None:
            print(f"fedpriv: refused a message: {unavailable}", file=sys.stderr, flush=True)
            raise WorkerUnavailable(unavailable)
        try:
            check_fab(content)
        except ForeignAppError as error:
            print(f"fedpriv: {error}", file=sys.stderr, flush=True)  # the site's log; the reply carries it too
            raise

    run_clientapp_checking_bundles(checked)


if __name__ == "__main__":
    main()
