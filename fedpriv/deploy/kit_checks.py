"""What a party checks in its kit before it starts anything: secrets kept secret, files that parse.

A kit that is wrong in one file should be reported as that file, with the
fix, before Flower starts: Flower itself turns a corrupted `ca.crt` into
"could not connect" and never looks at who can read a private key.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shlex
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedpriv.deploy.kit import KitError


def check_secret(path: str | Path) -> Path:
    """Refuses a private key that others can read, as ssh does, with the command that fixes it.

    The owner's bits are the owner's business; group or world bits are not
    accepted, except group-read on a root-owned file: that is how a
    Kubernetes Secret mounted with an `fsGroup` arrives (defaultMode is OR'ed
    with 0440), and PostgreSQL accepts root-owned keys on the same terms.
    """
    path = Path(path)
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    loose = mode & 0o077
    if info.st_uid == 0 and os.geteuid() != 0 and not mode & 0o037:
        loose = 0
    if loose:
        who = " and ".join(w for w, bits in (("its group", 0o070), ("everyone", 0o007)) if loose & bits)
        raise KitError(
            f"{path}: private key is accessible by {who} (mode {mode:04o}); refusing to use it, as ssh does. "
            f"Fix: chmod 600 {shlex.quote(str(path))}"
        )
    return path


def check_secrets(directory: Path, *names: str) -> None:
    for name in names:
        if (directory / name).is_file():
            check_secret(directory / name)


def check_certificate(path: Path, what: str) -> x509.Certificate:
    """A PEM certificate; a truncated or wrong file is named, with what it was meant to be."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as error:
        raise KitError(
            f"{path}: not a readable PEM certificate ({error}); it should be {what}: copy it again from the "
            "provisioned kit"
        ) from None


def check_node_key(path: Path) -> None:
    """The site's node-authentication key, as Flower will read it (OpenSSH private key)."""
    try:
        serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise KitError(
            f"{path}: not a readable OpenSSH private key ({error}); it should be this site's node key: "
            "copy it again from the provisioned kit"
        ) from None


def check_public_keys(path: Path) -> dict[str, str]:
    """`public-keys.json`: party -> Ed25519 public key (base64); a bad file is named with the entry at fault."""
    try:
        keys = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KitError(f"{path}: not JSON ({error}); copy public-keys.json again from the aggregator's kit") from None
    if not isinstance(keys, dict) or not keys:
        raise KitError(
            f"{path}: expected a JSON object of party -> Ed25519 public key; copy it again from the aggregator's kit"
        )
    for owner, value in keys.items():
        try:
            raw = base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise KitError(
                f"{path}: entry '{owner}' is not an Ed25519 public key (32 bytes, base64); "
                "copy public-keys.json again from the aggregator's kit"
            )
    return keys
