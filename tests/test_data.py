import json

import numpy as np
import pandas as pd
import pytest

from fedpriv.common.data import DataError, LabelSet, load_dataset, split_validation
from tests.helpers import LABELS, easy_rows, write_csv

LABEL_SET = LabelSet(tuple(LABELS))


def load(path, **kw):
    return load_dataset(path, LABEL_SET, "text", "category", **kw)


def test_reads_csv_jsonl_and_parquet_alike(tmp_path):
    rows = easy_rows(12)
    csv_data = load(write_csv(tmp_path / "a.csv", rows))
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "category": c}) for t, c in rows) + "\n")
    parquet = tmp_path / "a.parquet"
    pd.DataFrame(rows, columns=["text", "category"]).to_parquet(parquet)
    for other in (load(jsonl), load(parquet)):
        assert other.texts == csv_data.texts
        assert np.array_equal(other.labels, csv_data.labels)
    assert csv_data.labels.tolist()[:3] == [0, 1, 2]


def test_missing_column_names_file_and_column(tmp_path):
    path = write_csv(tmp_path / "site.csv", [("hi", "card")], header=("message", "category"))
    with pytest.raises(DataError, match=r"site\.csv, column 'text': missing column \(found: message, category\)"):
        load(path)


def test_unknown_label_names_row(tmp_path):
    rows = easy_rows(5) + [("where is my loan", "loans")]
    path = write_csv(tmp_path / "site.csv", rows)
    with pytest.raises(DataError, match=r"site\.csv, column 'category', row 6: unknown label 'loans'"):
        load(path)


def test_empty_file_and_header_only(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: file is empty"):
        load(empty)
    header = write_csv(tmp_path / "header.csv", [])
    with pytest.raises(DataError, match=r"header\.csv: file has no data rows"):
        load(header)


def test_undecodable_text_names_row(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,category\nfine,card\ncaf\xe9 card,card\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv, row 2: text is not valid UTF-8"):
        load(path)


def test_empty_text_and_missing_label(tmp_path):
    path = write_csv(tmp_path / "gaps.csv", [("ok", "card"), ("   ", "cash")])
    with pytest.raises(DataError, match=r"column 'text', row 2: empty text"):
        load(path)
    path = write_csv(tmp_path / "nolabel.csv", [("ok", "card"), ("fine", "")])
    with pytest.raises(DataError, match=r"column 'category', row 2: missing label"):
        load(path)


def test_jsonl_bad_line_and_wrong_type(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "category": "card"}\n{oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, row 2: line is not JSON"):
        load(path)
    path.write_text('{"text": "a", "category": "card"}\n{"text": 5, "category": "card"}\n')
    with pytest.raises(DataError, match=r"column 'text', row 2: expected text, got int"):
        load(path)


def test_too_few_rows(tmp_path):
    path = write_csv(tmp_path / "small.csv", easy_rows(3))
    with pytest.raises(DataError, match=r"small\.csv: too few rows: 3 \(at least 10"):
        load(path, min_rows=10)


def test_unsupported_and_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"data\.xlsx: unsupported file type"):
        load(tmp_path / "data.xlsx")
    with pytest.raises(DataError, match=r"gone\.csv: file not found"):
        load(tmp_path / "gone.csv")


def test_label_set_sources(tmp_path):
    txt = tmp_path / "labels.txt"
    txt.write_text("b\na\n\n")
    assert LabelSet.load(str(txt)).names == ("b", "a")
    assert LabelSet.load('["x", "y"]').index == {"x": 0, "y": 1}
    assert len(LabelSet.load("builtin:banking77/categories.json")) == 77
    dup = tmp_path / "dup.json"
    dup.write_text('["a", "a"]')
    with pytest.raises(DataError, match="label 'a' appears twice"):
        LabelSet.load(str(dup))


def test_site_with_some_labels_keeps_federation_ids(tmp_path):
    path = write_csv(tmp_path / "cash-only.csv", [("atm ate my card", "cash")] * 3)
    assert load(path).labels.tolist() == [2, 2, 2]  # "cash" is id 2 in the federation


def test_validation_split_is_seeded_and_disjoint(tmp_path):
    data = load(write_csv(tmp_path / "a.csv", easy_rows(50)))
    train, val = split_validation(data, 0.2, seed=3)
    again, _ = split_validation(data, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert train.texts == again.texts
    assert sorted(train.texts + val.texts) == sorted(data.texts)


def test_tsv_txt_and_compressed_files_read_like_csv(tmp_path):
    import gzip

    import zstandard

    rows = easy_rows(12)
    # GLUE style: tab-separated, a quote inside a sentence is text, not a quoting character.
    rows[1] = ('my "new" card has not arrived', rows[1][1])
    tsv = "text\tcategory\n" + "".join(f"{t}\t{c}\n" for t, c in rows)
    expected = [t for t, _ in rows]
    (tmp_path / "a.tsv").write_text(tsv)
    (tmp_path / "a.txt").write_text(tsv)
    (tmp_path / "a.tsv.gz").write_bytes(gzip.compress(tsv.encode()))
    write_csv(tmp_path / "b.csv", rows)
    (tmp_path / "b.csv.zst").write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "b.csv").read_bytes()))
    for name in ("a.tsv", "a.txt", "a.tsv.gz", "b.csv.zst"):
        data = load(tmp_path / name)
        assert data.texts == expected, name
        assert data.labels.tolist() == load(tmp_path / "b.csv").labels.tolist()


def test_a_delimiter_setting_reads_other_separators_and_names_the_file(tmp_path):
    rows = easy_rows(6)
    path = tmp_path / "semi.csv"
    path.write_text("text;category\n" + "".join(f"{t};{c}\n" for t, c in rows))
    assert load(path, delimiter=";").texts == [t for t, _ in rows]
    with pytest.raises(DataError, match=r"semi\.csv, column 'text': missing column \(found: text;category\)"):
        load(path)


def test_broken_compressed_and_compressed_parquet_files_are_named(tmp_path):
    bad = tmp_path / "site.tsv.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"site\.tsv\.gz: cannot decompress \(gzip\)"):
        load(bad)
    zst = tmp_path / "site.jsonl.zst"
    zst.write_bytes(b"\x28\xb5\x2f\xfd garbage")
    with pytest.raises(DataError, match=r"site\.jsonl\.zst: cannot decompress \(zstd\)"):
        load(zst)
    with pytest.raises(DataError, match=r"site\.parquet\.gz: unsupported file type '\.parquet\.gz'"):
        load(tmp_path / "site.parquet.gz")


def test_simulate_help_lists_the_data_formats():
    from typer.testing import CliRunner

    from fedpriv.cli import app

    result = CliRunner().invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for fmt in (".csv", ".tsv", ".txt", ".jsonl", ".parquet", ".gz", ".zst", "data.delimiter"):
        assert fmt in result.output, fmt


def test_duplicate_column_names_are_refused_naming_file_and_column(tmp_path):
    # pandas would rename the second 'text' to 'text.1' and the first would be used, silently.
    path = write_csv(tmp_path / "dup.csv", [("my card", "card", "old text")], header=("text", "category", "text"))
    with pytest.raises(DataError, match=r"dup\.csv, column 'text': appears twice in the header"):
        load(path)
    tsv = tmp_path / "dup.tsv"
    tsv.write_text("category\ttext\tcategory\ncard\tmy card\tcash\n")
    with pytest.raises(DataError, match=r"dup\.tsv, column 'category': appears twice in the header"):
        load(tsv)
    jsonl = tmp_path / "dup.jsonl"
    jsonl.write_text('{"text": "a", "category": "card"}\n{"text": "b", "category": "card", "text": "c"}\n')
    with pytest.raises(DataError, match=r"dup\.jsonl, column 'text', row 2: appears twice in this line"):
        load(jsonl)


def test_a_folder_is_named_as_a_folder_not_as_a_missing_file(tmp_path):
    (tmp_path / "x.csv").mkdir()
    with pytest.raises(DataError, match=r"x\.csv: is a folder, not a data file"):
        load(tmp_path / "x.csv")
    (tmp_path / "labels.json").mkdir()
    with pytest.raises(DataError, match=r"labels\.json: is a folder, not a labels file \(data\.labels\)"):
        LabelSet.load(str(tmp_path / "labels.json"))


def test_a_huge_text_is_cut_to_max_chars_with_a_warning_naming_file_and_row(tmp_path, caplog):
    # A 50 MB row once took a worker to 7 GB while tokenizing; only max-chars of it is kept.
    rows = [("my card", "card"), ("cash " * 10_000, "cash"), ("sent it", "transfer")]
    path = write_csv(tmp_path / "big.csv", rows)
    with caplog.at_level("WARNING", logger="flwr.fedpriv.data"):
        data = load(path)
    assert [len(t) for t in data.texts] == [7, 20_000, 7] and data.cut_rows == (2,)
    assert "big.csv, column 'text', row 2: text longer than data.max-chars=20000 characters" in caplog.text
    assert load(path, max_chars=100_000).texts[1] == rows[1][0] and load(path, max_chars=4).cut_rows == (1, 2, 3)
