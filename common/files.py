"""Reading settings files, and writing files so that none is left half written or silently replaced.

Every fedpriv file that is replaced (summaries, configs, key maps, progress)
is written to a temporary name beside it and renamed over the old one, so a
reader sees the old or the new content, never a mix.

Secrets (private keys) and the certificates issued with them are the
opposite: created with O_EXCL, never replaced, so writing one again cannot
silently swap a key that sites or ledgers already depend on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedpriv.common.errors import FedprivError


class SecretExistsError(FedprivError, FileExistsError):
    """A key or certificate is already on disk; fedpriv never replaces one."""


class StorageError(FedprivError, OSError):
    """A file could not be written (disk full, read-only, no permission); nothing partial was kept."""

    def __str__(self) -> str:
        return str(self.strerror)


_STORAGE = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
}


@contextlib.contextmanager
def storage(path: str | Path, what: str) -> Iterator[None]:
    """Turns a failed write of `what` into a `StorageError` that names the file and the cause."""
    try:
        yield
    except StorageError:
        raise
    except OSError as error:
        cause = _STORAGE.get(error.errno or 0) or error.strerror or str(error)
        name = errno.errorcode.get(error.errno or 0, "")
        raise StorageError(
            error.errno or 0,
            f"{path}: cannot write the {what}: {cause}{f' ({name})' if name else ''}; "
            "nothing partial was kept, and what was written before still verifies",
        ) from None


def cache_dir() -> Path:
    """fedpriv's disk cache (embeddings, the built-in tiny model, noise calibrations): $FEDPRIV_CACHE_DIR or ~/.cache/fedpriv."""
    return Path(os.environ.get("FEDPRIV_CACHE_DIR", Path.home() / ".cache" / "fedpriv"))


def read_toml(path: str | Path, what: str, error: type[Exception] = FedprivError) -> dict[str, Any]:
    """A TOML file's contents; a missing or malformed file is an `error` naming it."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: {what} expected, found a folder") from None
    except UnicodeDecodeError:
        raise error(f"{path}: {what} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as decode_error:
        raise error(f"{path}: not valid TOML: {decode_error}") from None


def write_atomic(path: str | Path, data: str | bytes, what: str = "file") -> Path:
    """Replaces `path` with `data` in one rename (text is written as UTF-8); a failed write leaves the old file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with storage(path, what):
            if isinstance(data, bytes):
                tmp.write_bytes(data)
            else:
                tmp.write_text(data, encoding="utf-8")
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_new(path: str | Path, data: bytes, mode: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise SecretExistsError(f"{path}: already exists; refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def write_secret(path: str | Path, data: bytes) -> Path:
    """A new file readable by its owner only; refuses to replace an existing one."""
    path = _write_new(path, data, 0o600)
    os.chmod(path, 0o600)  # exactly 0600 whatever the umask: the owner must still be able to read it
    return path


def write_public(path: str | Path, data: bytes) -> Path:
    """A new world-readable file (certificates, public keys); never replaces one either."""
    return _write_new(path, data, 0o644)
