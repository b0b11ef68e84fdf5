"""Site names: the one rule for every place a site's name becomes a path or an identity.

A site's name is a ledger file (`ledgers/NAME.jsonl`), a key (`keys/NAME.key`),
a progress file, a Flower node name and a Kubernetes object name. Lower-case
DNS labels are safe as all of them: no '/', no '..', no shell or path
characters. Some names are the aggregator's own files and are reserved, so no
site can overwrite them (`ledgers/federation.jsonl`, `keys/aggregator.key`).

The simulation's column partitioner takes site names from data; `from_value`
maps a value to a name under the rule and the caller refuses collisions.
"""

from __future__ import annotations

import re
import unicodedata

from fedpriv.common.errors import FedprivError

MAX_LENGTH = 63
RULE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# The aggregator's key and ledger live beside the sites' under these names.
RESERVED = ("aggregator", "federation")
EXPLAINED = (
    f"use lower-case letters, digits and '-' (at most {MAX_LENGTH}, not starting or ending with '-'), "
    f"and none of {', '.join(repr(r) for r in RESERVED)}"
)


class SiteNameError(FedprivError, ValueError):
    """A site name that could not be used as a file name; the message says which and why."""


def check(name: str, what: str = "site name") -> str:
    """`name` itself if it follows the rule; otherwise a `SiteNameError` that names it."""
    if not isinstance(name, str) or not RULE.match(name) or name in RESERVED:
        raise SiteNameError(f"{what} {name!r}: {EXPLAINED}")
    return name


def from_value(value: str) -> str:
    """A site name for a data value: the value if it is one already, else its lower-case slug.

    "Customer Support" -> "customer-support", "../../x" -> "x". Returns "" when
    nothing usable is left (the caller names the value); a reserved result is
    returned as is, for the caller to refuse.
    """
    if RULE.match(value):
        return value
    ascii_text = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode("ascii").lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")
    return slug[:MAX_LENGTH].rstrip("-")
