"""Site data: reading a table, checking it against the federation's labels.

Every problem is reported as a `DataError` naming the file, the column and the
(1-based) row, before any training starts — a site operator must be able to
fix their export without reading a traceback.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedpriv.common.config import DataConfig
from fedpriv.common.errors import FedprivError
from fedpriv.common.logs import DATA_LOG
from fedpriv.common.resources import resolve_path

log = logging.getLogger(DATA_LOG)
MAX_CHARS = DataConfig.model_fields["max_chars"].default

# File kinds by extension; a delimited kind's default delimiter beside it.
SUPPORTED = {
    ".csv": "CSV",
    ".tsv": "TSV",
    ".tab": "TSV",
    ".txt": "TSV",  # GLUE and many exports: tab-separated with a header
    ".jsonl": "JSONL",
    ".json": "JSONL",
    ".parquet": "Parquet",
}
DELIMITERS = {"CSV": ",", "TSV": "\t"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}


class DataError(FedprivError, ValueError):
    """Bad site data; the message names the file, column and row."""

    def __init__(self, path: str | Path, message: str, *, column: str | None = None, row: int | None = None):
        self.path, self.column, self.row = str(path), column, row
        where = [self.path]
        if column is not None:
            where.append(f"column '{column}'")
        if row is not None:
            where.append(f"row {row}")
        super().__init__(f"{', '.join(where)}: {message}")


@dataclass(frozen=True)
class LabelSet:
    """The federation's labels in a fixed order; a label's id is its position."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("the label set is empty")
        seen: set[str] = set()
        for name in self.names:
            if name in seen:
                raise ValueError(f"label '{name}' appears twice in the label set")
            seen.add(name)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def to_json(self) -> str:
        return json.dumps(list(self.names))

    @classmethod
    def load(cls, spec: str) -> LabelSet:
        """From an inline JSON list, a .json list file, or a text file with one label per line."""
        text = spec.strip()
        if text.startswith("["):
            source, raw = "data.labels", text
        else:
            path = resolve_path(spec)
            source = str(path)
            try:
                raw = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise DataError(path, "labels file not found (data.labels)") from None
            except IsADirectoryError:
                raise DataError(path, "is a folder, not a labels file (data.labels)") from None
            except UnicodeDecodeError as error:
                raise DataError(path, f"labels file is not UTF-8 text ({error.reason})") from None
            if path.suffix != ".json":
                names = [line.strip() for line in raw.splitlines() if line.strip()]
                return cls._checked(names, source)
        try:
            names = json.loads(raw)
        except json.JSONDecodeError as error:
            raise DataError(source, f"labels are not a JSON list: {error}") from None
        if not isinstance(names, list):
            raise DataError(source, "labels must be a JSON list of strings")
        return cls._checked([str(n) for n in names], source)

    @classmethod
    def _checked(cls, names: list[str], source: str) -> LabelSet:
        try:
            return cls(tuple(names))
        except ValueError as error:
            raise DataError(source, str(error)) from None


@dataclass
class TextDataset:
    """Texts with integer labels (ids into the federation's `LabelSet`)."""

    texts: list[str]
    labels: np.ndarray
    source: str
    cut_rows: tuple[int, ...] = ()  # rows of the file whose text was cut to data.max-chars

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: np.ndarray) -> TextDataset:
        return TextDataset([self.texts[i] for i in indices], self.labels[indices], self.source)


def file_kind(path: Path) -> tuple[str, str | None]:
    """(kind, compression) from the file name: train.tsv.gz -> ("TSV", "gzip")."""
    suffixes = [x.lower() for x in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    kind = SUPPORTED.get(suffixes[-1]) if suffixes else None
    if kind is None or (kind == "Parquet" and compression):
        shown = "".join(path.suffixes) or "(none)"
        raise DataError(
            path,
            f"unsupported file type '{shown}' (use .csv, .tsv, .txt, .jsonl or .parquet; "
            ".gz or .zst compression for the text formats)",
        )
    return kind, compression


def _decompress(path: Path, raw: bytes, compression: str | None) -> bytes:
    try:
        if compression == "gzip":
            return gzip.decompress(raw)
        if compression == "zstd":
            import zstandard

            return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    except (OSError, EOFError, zlib.error, ValueError) as error:
        raise DataError(path, f"cannot decompress ({compression}): {error}") from None
    except Exception as error:  # zstandard raises its own ZstdError
        raise DataError(path, f"cannot decompress ({compression}): {error}") from None
    return raw


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "is not a regular file (a device, socket or pipe?)")


def _refuse_duplicates(path: Path, names, row: int | None = None) -> None:
    """Two columns of one name: pandas would rename the second and the first would be used, silently."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            where = "the header" if row is None else "this line"
            raise DataError(path, f"appears twice in {where}; rename or drop one of them", column=name, row=row)
        if name != "":
            seen.add(name)


def _unique_keys(path: Path, number: int):
    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        _refuse_duplicates(path, [key for key, _ in pairs], row=number)
        return dict(pairs)

    return hook


def _read_table(path: Path, delimiter: str = "") -> pd.DataFrame:
    if path.is_dir():
        raise DataError(path, "is a folder, not a data file")
    kind, compression = file_kind(path)
    _check_file(path)
    if kind == "Parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as error:  # pyarrow raises many types for a bad file
            raise DataError(path, f"cannot read Parquet: {error}") from None
        _refuse_duplicates(path, [str(c) for c in frame.columns])
        return frame
    raw = _decompress(path, path.read_bytes(), compression)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        row = line - 1 if kind != "JSONL" else line  # a delimited file's line 1 is the header
        raise DataError(path, f"text is not valid UTF-8 (byte {error.start}, line {line})", row=row) from None
    if not text.strip():
        raise DataError(path, "file is empty")
    if kind in DELIMITERS:
        separator = delimiter or DELIMITERS[kind]
        try:
            # A quote in a TSV is text (GLUE's sentences have them); CSV keeps standard quoting.
            quoting = csv.QUOTE_NONE if separator == "\t" and not delimiter else csv.QUOTE_MINIMAL
            _refuse_duplicates(path, next(csv.reader(io.StringIO(text), delimiter=separator, quoting=quoting)))
            return pd.read_csv(
                io.StringIO(text), sep=separator, dtype=str, keep_default_na=False, na_values=[], quoting=quoting
            )
        except (pd.errors.ParserError, csv.Error) as error:
            name = {",": "CSV", "\t": "tab-separated"}.get(separator, f"'{separator}'-separated")
            raise DataError(path, f"malformed {name} file: {error}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys(path, number))
        except json.JSONDecodeError as error:
            raise DataError(path, f"line is not JSON: {error.msg}", row=number) from None
        if not isinstance(record, dict):
            raise DataError(path, "each line must be a JSON object", row=number)
        record["__row__"] = number
        rows.append(record)
    return pd.DataFrame(rows)


def read_columns(path: str | Path, columns: list[str], delimiter: str = "") -> tuple[pd.DataFrame, list[int]]:
    """The named columns of a table, with each row's 1-based number in the file."""
    path = Path(path)
    frame = _read_table(path, delimiter)
    if len(frame) == 0:
        raise DataError(path, "file has no data rows")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        found = ", ".join(str(c) for c in frame.columns if c != "__row__") or "none"
        raise DataError(path, f"missing column (found: {found})", column=missing[0])
    numbers = frame["__row__"].tolist() if "__row__" in frame.columns else list(range(1, len(frame) + 1))
    return frame[columns], numbers


def _as_text(value: object) -> str | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, float) and math.isnan(value):
        return ""
    if not isinstance(value, str):
        return None
    return value


def load_dataset(
    path: str | Path,
    labels: LabelSet,
    text_column: str,
    label_column: str,
    min_rows: int = 1,
    delimiter: str = "",
    max_chars: int = MAX_CHARS,
) -> TextDataset:
    """Read and validate a site's table; any bad row stops with a `DataError`.

    A text longer than `max_chars` is cut to it (tokenizing a whole 50 MB row
    once took a worker to 7 GB); a warning names the file and the rows.
    """
    path = resolve_path(str(path))
    frame, numbers = read_columns(path, [text_column, label_column], delimiter)
    index = labels.index
    texts: list[str] = []
    ids: list[int] = []
    cut: list[int] = []
    for number, text, label in zip(numbers, frame[text_column], frame[label_column], strict=True):
        clean = _as_text(text)
        if clean is None:
            raise DataError(
                path, f"expected text, got {type(text).__name__} {text!r:.40}", column=text_column, row=number
            )
        if len(clean) > max_chars:
            clean = clean[:max_chars]
            cut.append(number)
        if "\ufffd" in clean:
            raise DataError(path, "text contains undecodable characters (U+FFFD)", column=text_column, row=number)
        if not clean.strip():
            raise DataError(path, "empty text", column=text_column, row=number)
        name = _as_text(label)
        if name is None and isinstance(label, (int, np.integer)):
            name = str(label)
        if name is None or not name.strip():
            raise DataError(path, "missing label", column=label_column, row=number)
        name = name.strip()
        if name not in index:
            raise DataError(
                path,
                f"unknown label '{name}' (not one of the federation's {len(labels)} labels)",
                column=label_column,
                row=number,
            )
        texts.append(clean)
        ids.append(index[name])
    if len(texts) < min_rows:
        raise DataError(path, f"too few rows: {len(texts)} (at least {min_rows} needed, data.min-rows)")
    if cut:
        log.warning("%s", cut_warning(path, text_column, cut, max_chars))
    return TextDataset(texts, np.asarray(ids, dtype=np.int64), str(path), tuple(cut))


def cut_warning(path: str | Path, column: str, rows: list[int], max_chars: int) -> str:
    shown = ", ".join(map(str, rows[:5])) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
    return (
        f"{path}, column '{column}', row{'s' if len(rows) > 1 else ''} {shown}: text longer than "
        f"data.max-chars={max_chars} characters, cut to that length"
    )


def load_configured(data: DataConfig, labels: LabelSet, path: str | Path | None = None) -> TextDataset:
    """The training file the settings name (or another file read the same way, e.g. the test set)."""
    return load_dataset(
        data.path if path is None else path,
        labels,
        data.text_column,
        data.label_column,
        1,
        data.delimiter,
        data.max_chars,
    )


def read_column(path: str | Path, column: str, delimiter: str = "") -> list[str]:
    """One column as strings (the natural partition column of a simulation)."""
    path = resolve_path(str(path))
    frame, numbers = read_columns(path, [column], delimiter)
    values = []
    for number, value in zip(numbers, frame[column], strict=True):
        text = _as_text(value)
        if text is None and isinstance(value, (int, np.integer)):
            text = str(value)
        if text is None or not text.strip():
            raise DataError(path, "missing value", column=column, row=number)
        values.append(text.strip())
    return values


def split_validation(dataset: TextDataset, fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """A fixed (seeded) train/validation split; validation is empty for fraction 0."""
    order = np.random.default_rng(seed).permutation(len(dataset))
    count = int(round(fraction * len(dataset)))
    if fraction > 0 and len(dataset) >= 2:
        count = min(max(count, 1), len(dataset) - 1)
    return dataset.subset(order[count:]), dataset.subset(order[:count])
