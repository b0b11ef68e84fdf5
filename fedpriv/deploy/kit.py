"""Kits: the folder of keys, certificates and settings each party runs from.

`fedpriv provision` writes one kit for the aggregator and one per site; the
aggregator and the site agent read them. Both sides must agree on the file
names and on the meaning of `kit.toml`, so both live here.

A kit is flat (no sub-folders) so that it can be turned into a Kubernetes
Secret with `kubectl create secret generic NAME --from-file=KIT_DIR` and
mounted read-only; whatever a party writes (ledgers, Flower state) goes to a
separate state directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from fedpriv.common import site_names
from fedpriv.common.errors import FedprivError
from fedpriv.common.files import read_toml
from fedpriv.common.privacy.site_policy import SitePolicy
from fedpriv.common.schema import KebabModel
from fedpriv.common.site_settings import DataFormat, DeclaredRows, Delta, EpsilonCap

KIT_CONFIG = "kit.toml"
CA_CERT = "ca.crt"
TLS_CERT = "tls.crt"
TLS_KEY = "tls.key"
LEDGER_KEY = "ledger.key"
NODE_KEY = "node.key"
NODE_PUB = "node.pub"
PUBLIC_KEYS = "public-keys.json"  # owner -> Ed25519 ledger public key (base64); what `fedpriv audit --keys` reads
NODE_KEYS = "node-keys.json"  # site -> node-authentication public key (OpenSSH)
AGGREGATOR = "aggregator"


class KitError(FedprivError, ValueError):
    """A kit is missing, incomplete or unreadable; the message names the file."""


def check_site_name(name: str) -> str:
    """The site-name rule of every path a name becomes (fedpriv.common.site_names), as a kit error."""
    try:
        return site_names.check(name)
    except site_names.SiteNameError as error:
        raise KitError(str(error)) from None


class KitData(DataFormat):
    """The federation's labels and how this site reads its table (its own: the agent hands it to the ClientApp)."""

    labels: str = Field(description="The federation's label set as an inline JSON list.")


class SiteKit(KebabModel):
    role: Literal["site"] = "site"
    federation: str
    site: str
    superlink: str = Field(description="The aggregator's Fleet API address, HOST:PORT.")
    epsilon_cap: EpsilonCap
    delta: Delta
    declared_rows: DeclaredRows | None = None
    # Kits written before policies existed read as the (strict) defaults.
    policy: SitePolicy = SitePolicy()
    data: KitData

    @field_validator("site")
    @classmethod
    def _site(cls, value: str) -> str:
        # The agent makes its ledger's path from this name: a hand-edited kit must not point it elsewhere.
        return site_names.check(value)


class AggregatorEndpoints(KebabModel):
    address: str = Field(description="The Fleet API address sites dial, HOST:PORT.")
    fleet_listen: str = "0.0.0.0:9092"
    control_listen: str = "127.0.0.1:9093"


class AggregatorKit(KebabModel):
    role: Literal["aggregator"] = "aggregator"
    federation: str
    aggregator: AggregatorEndpoints
    # fedpriv settings every run of this federation starts from (same names as a run's TOML file).
    run: dict[str, Any] = Field(default_factory=dict)


def _read(directory: Path) -> dict[str, Any]:
    if not (directory / KIT_CONFIG).exists():
        raise KitError(f"{directory}: not a fedpriv kit (no {KIT_CONFIG}); make kits with `fedpriv provision`")
    return read_toml(directory / KIT_CONFIG, "kit settings", KitError)


def _validate(model: type[BaseModel], tree: dict[str, Any], path: Path):
    try:
        return model.model_validate(tree)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise KitError(f"{path}: {problems}") from None


def load_site_kit(directory: str | Path) -> SiteKit:
    directory = Path(directory)
    tree = _read(directory)
    if tree.get("role") != "site":
        raise KitError(f"{directory / KIT_CONFIG}: this is a kit for the {tree.get('role', '?')}, not a site")
    return _validate(SiteKit, tree, directory / KIT_CONFIG)


def load_aggregator_kit(directory: str | Path) -> AggregatorKit:
    directory = Path(directory)
    tree = _read(directory)
    if tree.get("role") != "aggregator":
        raise KitError(
            f"{directory / KIT_CONFIG}: this is a kit for {tree.get('role', '?')} {tree.get('site', '')}, not the aggregator"
        )
    return _validate(AggregatorKit, tree, directory / KIT_CONFIG)


def require(directory: Path, *names: str) -> None:
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise KitError(f"{directory}: kit is missing {', '.join(missing)}")


def split_address(address: str, default_port: int | None = None) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets) into its parts."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        if default_port is None:
            raise KitError(f"'{address}': expected HOST:PORT")
        host, port = address, str(default_port)
    return host.strip("[]"), int(port)
