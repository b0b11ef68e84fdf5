"""A disk cache of frozen-encoder embeddings.

In `head` mode the encoder never changes, so a site embeds its texts once and
every later round (and every later process: a deployed site runs each round
in a fresh process) trains on the cached features. The cache lives on the
machine that holds the data and is keyed by content, never by file name.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedpriv.common.files import cache_dir


def model_fingerprint(source: str, max_length: int) -> str:
    """Identifies the encoder weights cheaply (paths, sizes, mtimes), not by hashing GBs."""
    digest = hashlib.sha256(f"{source}|{max_length}".encode())
    root = Path(source)
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix in {".safetensors", ".bin", ".json"}:
                stat = path.stat()
                digest.update(f"{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


class FeatureCache:
    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else cache_dir()

    def _path(self, fingerprint: str, token_ids: list[list[int]]) -> Path:
        lengths = np.fromiter((len(ids) for ids in token_ids), dtype=np.int32, count=len(token_ids))
        flat = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int32, count=int(lengths.sum()))
        digest = hashlib.sha256(lengths.tobytes())
        digest.update(flat.tobytes())
        return self.directory / "features" / fingerprint / f"{digest.hexdigest()[:32]}.safetensors"

    def get(self, fingerprint: str, token_ids: list[list[int]]) -> torch.Tensor | None:
        path = self._path(fingerprint, token_ids)
        if not path.is_file():
            return None
        try:
            features = load_file(path)["features"]
        except Exception:  # a damaged entry is recomputed, never trusted
            return None
        return features if features.shape[0] == len(token_ids) else None

    def put(self, fingerprint: str, token_ids: list[list[int]], features: torch.Tensor) -> None:
        path = self._path(fingerprint, token_ids)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({"features": features.contiguous()}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader sees all or nothing
