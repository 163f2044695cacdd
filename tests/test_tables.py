import pytest

from pipeline.run.config import SplitConfig
from pipeline.text.tables import TEST_COLUMNS, TableError, read_table, split_rows, write_table

TEXTS = ["original_text", "rewritten_text"]


def _csv(tmp_path, text, name="t.csv"):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_reads_and_keeps_only_needed_columns(tmp_path):
    path = _csv(tmp_path, "id,original_text,rewritten_text,extra\n1,a,b,x\n2,c,d,y\n")
    df = read_table(path, TEST_COLUMNS, TEXTS)
    assert list(df.columns) == TEST_COLUMNS and list(df["id"]) == ["1", "2"]


def test_missing_column_names_file_and_column(tmp_path):
    path = _csv(tmp_path, "id,original_text\n1,a\n")
    with pytest.raises(TableError, match=r"t\.csv: missing column 'rewritten_text'"):
        read_table(path, TEST_COLUMNS, TEXTS)


def test_empty_text_error_names_row_and_column(tmp_path):
    path = _csv(tmp_path, "id,original_text,rewritten_text\n1,a,b\n2,c,\n")
    with pytest.raises(TableError, match=r"row 2, column 'rewritten_text': empty text"):
        read_table(path, TEST_COLUMNS, TEXTS)


def test_empty_text_drop_and_keep_are_counted(tmp_path):
    path = _csv(tmp_path, "id,original_text,rewritten_text\n1,a,b\n2,,d\n3,e,f\n")
    logs = []
    dropped = read_table(path, TEST_COLUMNS, TEXTS, empty="drop", log=logs.append)
    assert list(dropped["id"]) == ["1", "3"]
    assert "dropped 1 row(s)" in logs[0]
    kept = read_table(path, TEST_COLUMNS, TEXTS, empty="keep", log=logs.append)
    assert list(kept["original_text"]) == ["a", "", "e"]
    assert "1 row(s) with an empty 'original_text' kept" in logs[1]


def test_duplicate_ids(tmp_path):
    path = _csv(tmp_path, "id,original_text,rewritten_text\n7,a,b\n8,c,d\n7,e,f\n")
    with pytest.raises(TableError, match=r"rows 1 and 3, column 'id': duplicate id '7'"):
        read_table(path, TEST_COLUMNS, TEXTS)


def test_non_utf8_names_line(tmp_path):
    path = _csv(tmp_path, b"id,original_text,rewritten_text\n1,a,b\n2,caf\xe9,d\n")
    with pytest.raises(TableError, match=r"line 3: byte 0xe9 is not UTF-8"):
        read_table(path, TEST_COLUMNS, TEXTS)


def test_missing_file(tmp_path):
    with pytest.raises(TableError, match="file not found"):
        read_table(tmp_path / "none.csv", TEST_COLUMNS)


def test_multiline_and_quoted_texts_survive(tmp_path):
    import pandas as pd

    df = pd.DataFrame(
        {"id": ["a"], "original_text": ['line one\n"two", three'], "rewritten_text": ["x"]}
    )
    write_table(df, tmp_path / "m.csv")
    assert read_table(tmp_path / "m.csv", TEST_COLUMNS, TEXTS).equals(df)


def test_split_is_contiguous_and_complete():
    train, val, hold = split_rows(100, SplitConfig(validation=0.04, holdout=0.12))
    assert (train, val, hold) == (range(0, 84), range(84, 88), range(88, 100))
    with pytest.raises(TableError, match="no training rows"):
        split_rows(3, SplitConfig(validation=0.5, holdout=0.5))
    with pytest.raises(TableError, match="no training rows"):  # exactly none left
        split_rows(4, SplitConfig(validation=0.5, holdout=0.5))
    assert split_rows(5, SplitConfig(validation=0.4, holdout=0.4))[0] == range(0, 1)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "",
            r"t.csv: the file is empty; it needs a header line \(id,original_text,rewritten_text\) "
            r"and rows",
        ),
        (
            "id,original_text,rewritten_text\n",
            r"t.csv: a header \(id,original_text,rewritten_text\) and no rows; add rows",
        ),
        (
            "1,some text,its rewrite\n2,more,again\n",
            r"t.csv: missing column 'id'; .* \(its first line must be the header\)",
        ),
        (
            "id,original_text,rewritten_text\n1,a,b,c,d\n",
            r"t.csv: row 1: 5 fields under a header of 3 .*; quote texts",
        ),
        (
            "id,original_text,rewritten_text\n1,a,b\n2,a,b,c\n",
            r"t.csv: row 2: 4 fields under a header of 3",
        ),
        (
            "id,original_text,rewritten_text,original_text\n1,a,b,c\n",
            r"t.csv: line 1 \(the header\): column 'original_text' appears 2 times; give each "
            r"column its own name",
        ),
    ],
    ids=[
        "empty",
        "header-only",
        "no-header",
        "extra-fields-first-row",
        "extra-fields-later",
        "column-twice",
    ],
)
def test_malformed_files_stop_with_file_row_and_what_to_do(tmp_path, text, message):
    with pytest.raises(TableError, match=message):
        read_table(_csv(tmp_path, text), TEST_COLUMNS, TEXTS)


def test_a_text_longer_than_the_csv_modules_field_limit_loads(tmp_path):
    long_text = "word " * 60_000  # 300,000 characters, over csv's 131,072
    path = _csv(tmp_path, f'id,original_text,rewritten_text\n1,"{long_text}",b\n')
    df = read_table(path, TEST_COLUMNS, TEXTS)
    assert df["original_text"][0] == long_text
