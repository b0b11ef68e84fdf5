"""Reading settings files and writing files so that a crash never leaves half of one.

Every fedpriv file that is replaced (summaries, configs, key maps, progress)
is written to a temporary name beside it and renamed over the old one, so a
reader sees the old or the new content, never a mix.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from fedpriv.common.errors import FedprivError


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


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Replaces `path` with `data` in one rename (text is written as UTF-8)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
