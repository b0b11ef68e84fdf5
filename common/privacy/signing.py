"""Ed25519 keys and signatures for privacy records (the `cryptography` package).

A site signs each of its privacy records with its own ledger key; anyone with
the site's public key can check that the record is the site's and unchanged.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedpriv.common.errors import FedprivError
from fedpriv.common.files import SecretExistsError, write_secret


class SigningKeyError(FedprivError, ValueError):
    """A key file is missing, unreadable or of the wrong kind; the message names it."""


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def write_private_key(key: Ed25519PrivateKey, path: str | Path) -> Path:
    """Writes a PKCS#8 PEM readable by its owner only; never replaces an existing key."""
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        return write_secret(path, data)
    except SecretExistsError:
        raise SigningKeyError(f"{path}: a key already exists here; refusing to overwrite it") from None


def read_private_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise SigningKeyError(f"{path}: ledger key not found") from None
    except ValueError as error:
        raise SigningKeyError(f"{path}: not a PEM private key ({error})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path}: expected an Ed25519 key, found {type(key).__name__}")
    return key


def load_or_create(path: str | Path) -> Ed25519PrivateKey:
    """For simulations: each simulated site gets a key on first use."""
    path = Path(path)
    if not path.exists():
        try:
            write_private_key(generate(), path)
        except SigningKeyError:
            pass  # another worker created it first
    return read_private_key(path)


def public_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def fingerprint(public: str) -> str:
    return "ed25519:" + hashlib.sha256(base64.b64decode(public)).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message)).decode()


def verify(public: str, message: bytes, signature: str) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(base64.b64decode(public)).verify(base64.b64decode(signature), message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
