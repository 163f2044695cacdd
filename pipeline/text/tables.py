"""Reading and checking the CSV files the stages exchange.

Bad input stops a stage with one line that names the file, the row and the
column, and says what to do, except where a repair is documented: empty
texts may be dropped (training data) or kept as empty strings (texts to
predict for), and the count is printed.

Example:
```python
df = read_table("test.csv", ["id", "original_text", "rewritten_text"],
                text_columns=["original_text", "rewritten_text"], empty="keep")
```
"""

import csv
import io
from pathlib import Path

import pandas as pd

from pipeline.errors import InputError

TEST_COLUMNS = ["id", "original_text", "rewritten_text"]
TRAIN_COLUMNS = ["id", "original_text", "rewrite_prompt", "rewritten_text"]
SUBMISSION_COLUMNS = ["id", "rewrite_prompt"]


class TableError(InputError):
    """A CSV file cannot be used as it is; the message says where and why."""


def read_table(path, columns, text_columns=(), empty="error", log=print):
    """Reads `path`, checks columns, UTF-8, ids and texts.

    empty: what to do with rows whose text column is empty or missing:
    "error" (stop), "drop" (remove the row) or "keep" (use "").
    """
    path = Path(path)
    if not path.exists():
        raise TableError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise TableError(
            f"{path}: line {line}: byte 0x{raw[e.start]:02x} is not UTF-8; "
            "re-save the file as UTF-8"
        ) from None
    _check_shape(text, path, columns)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8", index_col=False)
    except pd.errors.ParserError as e:
        raise TableError(f"{path}: not a valid CSV file: {e}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise TableError(
            f"{path}: missing column {missing[0]!r}; the file has {list(df.columns)} "
            f"and needs {columns} (its first line must be the header)"
        )
    df = df[columns].copy()
    if "id" in columns:
        _check_ids(df, path)
    for column in text_columns:
        df = _handle_empty(df, column, path, empty, log)
    return df.reset_index(drop=True)


def _check_shape(text, path, columns):
    """A header, at least one row, and as many fields in every row as in the
    header (pandas would silently take the extra leading fields of a longer
    row as its index, shifting the columns)."""
    allow_fields_as_long_as(text)
    try:
        records = [r for r in csv.reader(io.StringIO(text, newline="")) if r]
    except csv.Error as e:
        raise TableError(f"{path}: not a valid CSV file: {e}") from None
    if not records:
        raise TableError(
            f"{path}: the file is empty; it needs a header line ({','.join(columns)}) and rows"
        )
    if len(records) == 1:
        raise TableError(f"{path}: a header ({','.join(records[0])}) and no rows; add rows")
    header = [name.strip() for name in records[0]]
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        # pandas would rename the second one (`name.1`) and use the first silently.
        raise TableError(
            f"{path}: line 1 (the header): column {twice[0]!r} appears {header.count(twice[0])} "
            "times; "
            "give each column its own name"
        )
    for row, record in enumerate(records[1:], 1):
        if len(record) != len(records[0]):
            raise TableError(
                f"{path}: row {row}: {len(record)} fields under a header of {len(records[0])} "
                f"({','.join(records[0])}); quote texts that hold commas"
            )


def allow_fields_as_long_as(text):
    """Raises the csv module's field limit (128 KiB by default) to the file's
    length: a long text is valid CSV, and the stages cut texts to their token
    budget anyway."""
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))


def _check_ids(df, path):
    ids = df["id"].str.strip()
    blank = ids == ""
    if blank.any():
        row = int(blank.idxmax()) + 1
        raise TableError(f"{path}: row {row}, column 'id': empty id; give every row an id")
    dup = ids.duplicated(keep=False)
    if dup.any():
        rows = [int(i) + 1 for i in df.index[dup & (ids == ids[dup].iloc[0])]]
        raise TableError(
            f"{path}: rows {rows[0]} and {rows[1]}, column 'id': duplicate id "
            f"{ids[dup].iloc[0]!r}; ids must be unique"
        )


def _handle_empty(df, column, path, empty, log):
    blank = df[column].str.strip() == ""
    if not blank.any():
        return df
    row = int(blank.idxmax()) + 1
    if empty == "error":
        raise TableError(
            f"{path}: row {row}, column {column!r}: empty text; fill it in or remove the row"
        )
    count = int(blank.sum())
    if empty == "drop":
        log(f"{path}: dropped {count} row(s) with an empty {column!r} (first: row {row})")
        return df[~blank]
    log(f"{path}: {count} row(s) with an empty {column!r} kept as empty text (first: row {row})")
    return df


def read_header(path):
    """The column names of a CSV file's first line."""
    path = Path(path)
    if not path.exists():
        raise TableError(f"{path}: file not found")
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return [name.strip() for name in next(csv.reader(f), [])]


def write_table(df, path):
    """Writes atomically: a crash leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)


def split_rows(n_rows, split_cfg):
    """Contiguous (train, validation, holdout) row ranges of a data CSV."""
    n_holdout = int(round(n_rows * split_cfg.holdout))
    n_validation = int(round(n_rows * split_cfg.validation))
    n_train = n_rows - n_validation - n_holdout
    if n_train <= 0:
        raise TableError(f"split.validation + split.holdout leave no training rows out of {n_rows}")
    return (
        range(0, n_train),
        range(n_train, n_train + n_validation),
        range(n_train + n_validation, n_rows),
    )
